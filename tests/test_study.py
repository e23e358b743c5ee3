"""`steptune study`'s statistics (steptune.pipeline.study): the two-level bootstrap and the aggregation of
hand-made run directories."""

import json

import numpy as np
import pytest

from steptune.data.react import INVALID_FORMAT_OBSERVATION
from steptune.data.trajectory import Step, Trajectory
from steptune.evaluation.recovery import REPEATED
from steptune.pipeline.study import _bootstrap, _ratio


def _ep(i: int, success: bool, injection: dict | None = None, split: str = "seen") -> Trajectory:
    return Trajectory(id=f"{split}:twx/coin/{i}", env="twx", task_id=f"twx/coin/{i}", split=split, task="t",
                      success=success, reward=float(success), steps=[Step(action="take coin")],
                      meta={"injection": injection} if injection else {})


def test_bootstrap_ci_covers_the_mean_and_narrows_with_data():
    rng = np.random.default_rng(1)
    small = [rng.binomial(1, 0.5, 20).astype(float) for _ in range(3)]
    large = [rng.binomial(1, 0.5, 400).astype(float) for _ in range(3)]
    a, b = _bootstrap(small), _bootstrap(large)
    for r, data in ((a, small), (b, large)):
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]
        assert r["mean"] == pytest.approx(100 * np.concatenate(data).mean(), abs=0.01)
    assert b["ci_high"] - b["ci_low"] < a["ci_high"] - a["ci_low"]
    assert _bootstrap([np.array([])]) == {"mean": None, "ci_low": None, "ci_high": None}
    # a recovery rate where nothing succeeded without the error is undefined, not NaN in study.json
    assert _bootstrap([np.array([[0.0, 0.0], [1.0, 0.0]])], stat=_ratio)["mean"] is None
    json.dumps(a)  # plain floats, fit for study.json


def test_study_aggregates_paired_differences_over_seeds(tmp_path):
    """study.json from hand-made run directories: per-method success, the paired difference, the recovery rate."""
    from steptune.data.trajectory import save_trajectories
    from steptune.pipeline.study import write_study

    methods = ["golden_d1", "golden_all", "step", "step_unmasked"]
    won = {"golden_d1": [1, 0, 0, 0], "golden_all": [1, 1, 0, 0], "step": [1, 1, 1, 0], "step_unmasked": [1, 1, 0, 0]}
    for seed in (0, 1):
        run = tmp_path / f"seed-{seed}"
        (run / "eval" / "base_agent_u2").mkdir(parents=True)
        (run / "eval" / "base_agent_u2" / "summary.json").write_text(json.dumps({"overall": {"success_rate": 40.0}}))
        # seed 1's golden D1 was released and trained again in place on another machine
        again = {"golden_d1": {"logged_steps": 2, "same_losses": False, "first_loss_released": 1.0901947,
                               "first_loss_now": 1.0902009}}
        stages = {"train:golden_d1": {"status": "done", "info": {"retrained_in_place": again}}} if seed else {}
        (run / "manifest.json").write_text(json.dumps({"config": {"methods": methods, "eval": {"splits": ["unseen"]}},
                                                       "stages": stages}))
        for m in methods:
            plain = [_ep(i, bool(w), split="unseen") for i, w in enumerate(won[m])]
            if m == "step":  # STeP reflects at test time in episode 1 (won) of each seed, in other words in each
                plain[1].steps = [Step(thought="", action="move west", observation="You cannot go that way."),
                                  Step(thought="I tried to move west, but that is not something I can do here."
                                       + " I take the coin." * seed, action="take coin", observation="Taken.")]
            if m == "step" and seed == 1:  # and seed 1 once more in the words of seed 0: shown once; this time
                plain[2].steps = plain[1].steps[:1] + [plain[1].steps[1].model_copy(  # it moves west again anyway
                    update={"thought": "I tried to move west, but that is not something I can do here."}),
                    Step(action="move west", observation="You cannot go that way.")]
            if m == "golden_d1":  # lost the last episode repeating an invalid action, as greedy agents do
                plain[3].steps = [Step(action="move west", observation="You cannot go that way.")] * REPEATED
            if m == "step_unmasked":  # a reply cut before its action, in the last episode of each seed
                plain[3].steps = [Step(thought="I tried to", action="", observation=INVALID_FORMAT_OBSERVATION)]
            injected = [_ep(i, bool(w) and i == 0, {"step": 1, "action": "move west", "error": "off_plan",
                                                     "steps_to_plan": 1}, split="unseen") for i, w in enumerate(won[m])]
            save_trajectories(plain, run / "eval" / m / "episodes.jsonl")
            save_trajectories(injected, run / "eval" / m / "injected.jsonl")
    # a study that runs for days reports each seed it has finished, and says it is not done
    interim = write_study(tmp_path, [0], "steptune study test", planned=[0, 1])
    assert interim["interim"] == {"seeds_done": [0], "seeds_planned": [0, 1]} and interim["seeds"] == [0]
    assert "**Interim: 1 of the 2 seeds (0, 1) are done; the study is still running.**" in \
        (tmp_path / "study.md").read_text()
    s = write_study(tmp_path, [0, 1], "steptune study test")
    assert "interim" not in s and "Interim" not in (tmp_path / "study.md").read_text()
    assert s["test_episodes_per_split_per_seed"] == {"unseen": 4}
    assert s["success"]["step"]["unseen"]["mean"] == 75.0 and s["success"]["golden_d1"]["unseen"]["mean"] == 25.0
    diff = s["step_minus_golden_d1_unseen"]
    assert diff["mean"] == 50.0 and diff["ci_low"] <= 50.0 <= diff["ci_high"]
    assert s["step_minus_golden_all_unseen"]["mean"] == 25.0
    assert s["recovery_step"]["mean"] == pytest.approx(1 / 3, abs=1e-3)  # 1 of 4 with the error, 3 of 4 without
    assert s["recovery_golden_d1"]["mean"] == 1.0
    assert s["base_agent_success_u2"] == {"per_seed": [40.0, 40.0], "mean": 40.0}
    refl = s["reflections_at_test_time"]
    assert {k: refl["step"]["plain"][k] for k in ("episodes", "with_reflection", "succeeded",
                                                  "repeated_after_reflection")} == \
        {"episodes": 8, "with_reflection": 3, "succeeded": 3, "repeated_after_reflection": 1}
    assert refl["golden_d1"]["plain"]["with_reflection"] == 0 and refl["step"]["injected"]["with_reflection"] == 0
    assert [(e["run"], e["id"]) for e in refl["step"]["plain"]["examples"]] == \
        [("seed-0", "unseen:twx/coin/1"), ("seed-1", "unseen:twx/coin/1")]
    assert refl["step"]["plain"]["examples"][0]["before"]["action"] == "move west"
    assert refl["golden_d1"]["plain"]["ended_repeating"] == 2 and refl["step"]["plain"]["ended_repeating"] == 0
    assert (refl["step_unmasked"]["plain"]["steps_without_action"], refl["step_unmasked"]["plain"]["agent_steps"]) \
        == (2, 8) and refl["step"]["plain"]["steps_without_action"] == 0
    on_disk = json.loads((tmp_path / "study.json").read_text())
    assert on_disk["step_minus_golden_d1_unseen"] == diff
    md = (tmp_path / "study.md").read_text()
    assert "STeP − golden D1" in md and "| 3 / 8 (3 won, 1 again) | 0 / 8 (0 won) | 0 / 8 | 0 / 8 | 0 / 12; 0 / 8 |" in md
    assert ('- `unseen:twx/coin/1` (seed-1, unseen, step 2 of 2, after its own mistake): it did `move west` → "You '
            'cannot go that way.", then thought "I tried to move west, but that is not something I can do here. I take '
            'the coin." '
            'and did `take coin` → "Taken.".') in md
    assert "| Golden SFT on D1 (base agent) | 0 / 8 (0 won) | 0 / 8 (0 won) | 2 / 8 | 0 / 8 |" in md
    assert "| STeP without masking | 0 / 8 (0 won) | 0 / 8 (0 won) | 0 / 8 | 0 / 8 | 2 / 8; 0 / 8 |" in md
    assert s["retrained_in_place"] == [{"seed": 1, "model": "golden_d1", **again["golden_d1"]}]
    assert "- seed 1, Golden SFT on D1 (base agent): **its losses differ** (first logged 1.0901947 then, 1.0902009 " \
           "now: another machine or library version)" in " ".join(md.split())
    assert (tmp_path / "study.html").stat().st_size > 5000
    # a seed whose evaluation has not played its plain games yet (a report while the study runs): "–", not 0 won
    (tmp_path / "seed-1" / "eval" / "step_unmasked" / "episodes.jsonl").unlink()
    write_study(tmp_path, [0, 1], "steptune study test")
    row = next(line for line in (tmp_path / "study.md").read_text().splitlines()
               if line.startswith("| STeP without masking | 50.0"))
    assert row.endswith("| 50; – |")


def test_recovery_by_the_kind_of_injected_action_pools_seeds_and_pairs_each_task(tmp_path):
    """Which mistakes a method repairs: its injected episodes by the injected action's first word, each counted won
    with the error and, for the same task, won without it; the action no game accepts is "invalid" (not "take"), and
    an episode that ended before its injection step is "none"."""
    from steptune.agent.injection import INVALID_ACTION
    from steptune.data.trajectory import save_trajectories
    from steptune.pipeline.study import write_study

    methods = ["golden_d1", "step"]
    injected_action = ["put apple in sink", "put apple in oven", "open fridge", None, INVALID_ACTION]  # task i's
    won_plain = {"golden_d1": [1, 1, 1, 0, 1], "step": [1, 1, 0, 1, 1]}
    won_injected = {"golden_d1": [0, 0, 1, 0, 0], "step": [1, 0, 0, 1, 1]}
    for seed in (0, 1):
        run = tmp_path / f"seed-{seed}"
        (run / "manifest.json").parent.mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({"config": {"methods": methods, "eval": {"splits": ["seen"]}},
                                                       "stages": {}}))
        for m in methods:
            plain = [_ep(i, bool(w)) for i, w in enumerate(won_plain[m])]
            injected = [_ep(i, bool(w), {"step": 2, "action": a, "error": "invalid" if a == INVALID_ACTION
                                         else "off_plan"} if a else None)
                        for i, (w, a) in enumerate(zip(won_injected[m], injected_action))]
            save_trajectories(plain[::-1], run / "eval" / m / "episodes.jsonl")  # paired by task, not by line
            save_trajectories(injected, run / "eval" / m / "injected.jsonl")
    s = write_study(tmp_path, [0, 1])
    assert s["recovery_by_injected_action"] == {
        "golden_d1": {"put": {"episodes": 4, "won": 0, "won_without": 4},
                      "open": {"episodes": 2, "won": 2, "won_without": 2},
                      "none": {"episodes": 2, "won": 0, "won_without": 0},
                      "invalid": {"episodes": 2, "won": 0, "won_without": 2}},
        "step": {"put": {"episodes": 4, "won": 2, "won_without": 4},
                 "open": {"episodes": 2, "won": 0, "won_without": 0},
                 "none": {"episodes": 2, "won": 2, "won_without": 2},
                 "invalid": {"episodes": 2, "won": 2, "won_without": 2}}}
    md = (tmp_path / "study.md").read_text()
    assert "| injected action | episodes | Golden SFT on D1 (base agent) | STeP (D1 ∪ Dr, partial masking) |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| put |", "| open |", "| none |", "| invalid |"))]
    assert rows == ["| put | 4 | 0 / 4 | 2 / 4 |", "| invalid | 2 | 0 / 2 | 2 / 2 |", "| open | 2 | 2 / 2 | 0 / 0 |",
                    "| none | 2 | 0 / 0 | 2 / 2 |"]


def test_what_agents_do_after_a_wrong_put_in_a_twc_game(tmp_path):
    """scripts/twc_wrong_puts.py on a hand-made run: an accepted put that does not end a one-item TWC game is a
    wrong one; whether the agent takes the item back, and puts it in the same wrong place again. An injected put is
    not the agent's."""
    import subprocess
    import sys
    from pathlib import Path

    from steptune.data.trajectory import save_trajectories

    def ep(i: int, actions: list[str], won: bool, injected_at: int | None = None) -> Trajectory:
        answer = {"take": "You take the apple.", "put": "You put the apple in the {}.", "move": "You are in the hall."}
        steps = [Step(action=a, observation=answer[a.split()[0]].format(a.split(" in ")[-1]),
                      kind="injected" if k == injected_at else "student") for k, a in enumerate(actions)]
        steps[-1].observation = "Unknown action: I'm not sure what you mean." if not won else steps[-1].observation
        return Trajectory(id=f"seen:twx/twc/{i}", env="twx", task_id=f"twx/twc/{i}", split="seen", task="t",
                          steps=steps, success=won, reward=float(won))

    wrong, right, take = "put apple in desk", "put apple in trash can", "take apple"
    run = tmp_path / "seed-0"
    (run / "manifest.json").parent.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"config": {"methods": ["golden_all", "step_unmasked"]}}))
    save_trajectories([ep(0, [take, wrong, wrong], False)], run / "eval" / "golden_all" / "episodes.jsonl")
    save_trajectories([ep(0, [take, wrong, take, wrong, "move west"], False),  # back, and to the same wrong place
                       ep(1, [take, wrong, take, right], True),  # back, and to the right one: won
                       ep(2, [take, right], True)],  # no wrong put
                      run / "eval" / "step_unmasked" / "episodes.jsonl")
    save_trajectories([ep(3, [take, wrong, take, right], True, injected_at=1)],  # the wrong put was injected
                      run / "eval" / "step_unmasked" / "injected.jsonl")
    script = Path(__file__).resolve().parents[1] / "scripts" / "twc_wrong_puts.py"
    out = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, check=True).stdout
    assert "| golden_all | 1 | 1 | 0 | 0 | 0 |" in out and "| step_unmasked | 3 | 2 | 2 | 1 | 1 |" in out
    injected = subprocess.run([sys.executable, str(script), str(run), "--injected"], capture_output=True, text=True,
                              check=True).stdout
    assert json.loads(injected.splitlines()[-1]) == {"step_unmasked": {"episodes": 1}}


def test_two_studies_side_by_side_show_each_paired_difference_with_its_ci():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "docs/results/study-2epochs.json", root / "docs/results/study.json"]
    out = subprocess.run([sys.executable, str(root / "scripts/compare_studies.py"), *map(str, files),
                          "--names", "two", "eight"], capture_output=True, text=True, check=True).stdout.splitlines()
    studies = [json.loads(f.read_text()) for f in files]
    row = next(line for line in out if line.startswith("| STeP − golden D1 ∪ D2, unseen |"))
    for s in studies:
        d = s["step_minus_golden_all_unseen"]
        assert f"{d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]" in row
    assert json.loads(out[-1])["eight"]["step_minus_golden_d1_injected"] == studies[1]["step_minus_golden_d1_injected"]["mean"]


def test_stage2_quality_counts_flags_by_kind_on_real_games(tmp_path):
    """Stage 2 with the real expert teacher on real coin games: a scripted student first walks out of the coin's room
    (a valid step, judged wrong) and then writes an action the game refuses. The steps carry the environment's
    verdict, and the study's data-quality measure counts one flag of each kind, Dr's lengths and coverage."""
    from _twx_pool import twx_pool

    from steptune.agent.rollout import run_episodes
    from steptune.backends.base import ChatBackend, GenerationConfig
    from steptune.data.trajectory import save_trajectories
    from steptune.envs.twx import TextWorldExpressEnv
    from steptune.pipeline.study import stage2_quality, stage2_quality_markdown
    from steptune.teacher.expert import ExpertTeacher

    rooms = "numLocations=4,numDistractorItems=0,includeDoors=0"
    env = TextWorldExpressEnv(game="coin", game_params=rooms)
    try:  # games whose coin lies in the first room, and a way out of it
        starts = []
        for task in env.tasks("train")[:30]:
            env.reset(task)
            if env.expert_actions() == ["take coin"]:
                starts.append((task, next(a for a in env.valid_actions() if a.startswith("move "))))
    finally:
        env.close()
    assert len(starts) >= 2

    class WalksOutThenBabbles(ChatBackend):
        def __init__(self, way_out: str):
            self.way_out = way_out

        def complete(self, conversations, gen):
            return [f"Thought: t\nAction: {self.way_out}" if not any(m["role"] == "assistant" for m in c)
                    else "Thought: t\nAction: dance" for c in conversations]

    episodes = []
    for task, way_out in starts[:2]:
        pool = twx_pool(1, max_steps=8, game_params=rooms)
        try:
            [ep] = run_episodes(pool, [task], WalksOutThenBabbles(way_out), GenerationConfig(max_new_tokens=8),
                                teacher=ExpertTeacher(), progress=False)
        finally:
            pool.close()
        episodes.append(ep.trajectory)
    for t in episodes:
        assert t.success and [s.kind for s in t.steps] == ["error", "reflection", "error", "reflection"]
        assert [s.invalid for s in t.steps] == [False, False, True, False]
    run = tmp_path / "seed-0"
    save_trajectories(episodes, run / "data" / "synthesized.jsonl")
    save_trajectories(episodes[:1], run / "data" / "dr.jsonl")
    golden = [Trajectory(id=f"g{i}", env="twx", task_id=t.task_id, split="train", task="t", success=True,
                         reward=1.0, steps=[Step(action="take coin")]) for i, t in enumerate(episodes)]
    save_trajectories(golden, run / "data" / "d2.jsonl")
    q = stage2_quality(run)
    assert q["flagged"] == 4 and q["flagged_invalid"] == 2 and q["flagged_valid"] == 2
    assert q["dr_length"]["mean"] == 4.0 and q["u2_golden_length"]["mean"] == 1.0
    assert (q["u2_tasks"], q["u2_tasks_in_dr"], q["dr_with_reflection"]) == (2, 1, 1)
    md = "\n".join(stage2_quality_markdown({"seeds": [0], "stage2_quality": [q],
                                            "stage2": [{"dropped": {"more than 2 errors": 1}}]}))
    assert "| 0 | 4.00 (4/4/4) | 1.00 (1/1/1) | 1 of 2 | 1 of 1 | 2 / 2 | more than 2 errors: 1 |" in md
    # a run recorded before steps carried the flag: the expert's words say which flags were invalid actions
    for t in episodes:
        for st in t.steps:
            st.invalid = None
    save_trajectories(episodes, run / "data" / "synthesized.jsonl")
    old = stage2_quality(run)
    assert (old["flagged_invalid"], old["flagged_valid"]) == (2, 2)
    # a run in which the environment refused no action reads 0 refused, not "not recorded" (as it did when only a
    # refusal was written): the valid steps alone, saved and read back, with a teacher whose words say nothing of it
    valid_only = [t.model_copy(update={"steps": [
        st.model_copy(update={"invalid": False, "critique": st.critique.model_copy(update={"teacher": "self"})
                              if st.critique else None}) for st in t.steps[:2]]}) for t in episodes]
    save_trajectories(valid_only, run / "data" / "synthesized.jsonl")
    reloaded = stage2_quality(run)
    assert (reloaded["flagged"], reloaded["flagged_invalid"], reloaded["flagged_valid"]) == (2, 0, 2)
