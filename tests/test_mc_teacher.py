"""The Monte-Carlo teacher on real TextWorldExpress coin games: a step is judged by the student's own rollouts from
the replayed states before and after it."""

from __future__ import annotations

import pytest

from steptune.backends.base import ChatBackend
from steptune.data.react import parse_react
from steptune.data.trajectory import Step
from steptune.envs.pool import EnvPool
from steptune.envs.twx import TextWorldExpressEnv
from steptune.teacher.base import StepToJudge, TeacherCounts
from steptune.teacher.mc import MCTeacher

PARAMS = "numLocations=4,numDistractorItems=0,includeDoors=0"


class ExpertStudent(ChatBackend):
    """A test double of the MODEL only: replays the conversation's actions in its own real game and answers with the
    expert's next action from there (a student that always finds the coin when the budget allows)."""

    def __init__(self, tasks, mistakes=None):
        self.env = TextWorldExpressEnv(game="coin", game_params=PARAMS, max_steps=50)
        self.tasks = tasks  # task text -> TaskRef
        self.mistakes = mistakes or {}  # turn -> action, instead of the expert's
        self.calls = 0

    def complete(self, conversations, gen):
        self.calls += 1
        out = []
        for conv in conversations:
            task = next(t for text, t in self.tasks.items() if conv[0]["content"].endswith(text))
            self.env.reset(task)
            for m in conv[1:]:
                if m["role"] == "assistant":
                    self.env.step(parse_react(m["content"]).action)
            plan = self.env.expert_actions() or ["look around"]
            turn = sum(m["role"] == "assistant" for m in conv)
            out.append(f"Thought: I go on.\nAction: {self.mistakes.get(turn, plan[0])}")
        return out

    def close(self):
        self.env.close()


def play(task, actions, budget):
    """Executes `actions` in a real game; the steps to judge, as the rollout would pass them."""
    env = TextWorldExpressEnv(game="coin", game_params=PARAMS, max_steps=budget)
    try:
        text = env.reset(task).task
        steps, items, reward = [], [], 0.0
        for a in actions:
            res = env.step(a)
            st = Step(thought="t", action=a, observation=res.observation)
            items.append(StepToJudge(task=task, task_text=text, history=list(steps), step=st, reward_before=reward,
                                     reward_after=res.reward, done=res.done))
            steps.append(st)
            reward = res.reward
        return text, items
    finally:
        env.close()


def expert_route(env, task, prefix=()):
    """The expert's whole route to the coin from the state `prefix` leaves, following its re-plans."""
    env.reset(task)
    for a in prefix:
        env.step(a)
    route = []
    while (plan := env.expert_actions()) and len(route) < 30:
        route.append(plan[0])
        if env.step(plan[0]).done:
            return route
    return None


@pytest.fixture(scope="module")
def game():
    """A game, its expert route, and a wrong move at step k >= 1 after which the coin is out of reach within a budget
    of the route's length plus one (one wasted step is affordable, a detour is not)."""
    env = TextWorldExpressEnv(game="coin", game_params=PARAMS, max_steps=50)
    try:
        for task in env.tasks("train")[:40]:
            route = expert_route(env, task)
            for k in range(1, len(route or []) - 1):
                expert_route(env, task, route[:k])
                env.reset(task)
                for a in route[:k]:
                    env.step(a)
                for wrong in [a for a in env.valid_actions() if a.startswith("move ") and a != route[k]]:
                    rest = expert_route(env, task, (*route[:k], wrong))
                    if rest is None or k + 1 + len(rest) > len(route) + 1:
                        return task, route, k, wrong
    finally:
        env.close()
    pytest.skip("no coin game with a costly wrong move among the first 40")


def mc_teacher(student, **kw) -> MCTeacher:
    return MCTeacher(student, EnvPool("twx", 2, {"game": "coin", "game_params": PARAMS, "max_steps": kw.pop("budget")}),
                     rollouts=3, **kw)


def test_mc_flags_the_move_that_makes_the_coin_unreachable_and_not_the_experts_steps(game):
    task, route, k, wrong = game
    budget = len(route) + 1
    text, expert_items = play(task, route, budget)
    _, detour = play(task, [*route[:k], wrong], budget)
    student = ExpertStudent({text: task})
    teacher = mc_teacher(student, budget=budget)
    try:
        verdicts = teacher.judge(expert_items + [detour[k]])
    finally:
        teacher.close()
        student.close()
    assert all(v.critique is not None for v in verdicts)
    assert [v.critique.is_error for v in verdicts] == [False] * len(route) + [True]
    flagged = verdicts[-1]
    assert "1.00 before the step, 0.00 after" in flagged.critique.reason
    assert wrong in flagged.critique.reflection and "0." not in flagged.critique.reflection  # no numbers for the agent
    # every rollout is counted, once: one set per distinct state (the states before the expert's steps are the
    # states after the previous ones), and the detour's candidates (no candidate can still reach the coin in time)
    counts = TeacherCounts()
    for i, v in enumerate(verdicts):
        counts.add(v, i)
    assert counts.rollouts % 3 == 0 and counts.rollouts >= 3 * (len(route) + 1)  # the final state is terminal
    assert counts.rollout_steps > 0 and counts.replay_diverged == 0 and counts.failed_rollouts == 0
    assert not flagged.critique.corrected_action  # nothing beats carrying on: no correction is offered
    # each judged step's values go into the record, so other margins can be scored later without new rollouts
    assert flagged.values == (1.0, 0.0) and counts.as_meta()["step_values"][str(len(route))] == [1.0, 0.0]
    assert len(counts.step_values) == len(verdicts)


def test_the_margin_sweep_scores_each_margin_on_the_same_steps():
    from steptune.evaluation.judges import Agreement

    a = Agreement()
    # (value before, value after, expert flags it): drops of 1.0, 0.4, 0.2 and 0 against the expert's verdicts
    a.valued = [(1.0, 0.0, True), (0.6, 0.2, True), (0.4, 0.2, False), (0.8, 0.8, True), (0.2, 0.2, False)]
    sweep = {row["margin"]: row for row in a.margin_sweep()}
    assert [sweep[m]["judge_flags"] for m in (0.0, 0.2, 0.4, 0.6, 0.8)] == [3, 2, 1, 1, 1]
    assert (sweep[0.0]["precision"], sweep[0.0]["recall"]) == (0.667, 0.667)
    assert (sweep[0.2]["precision"], sweep[0.2]["recall"]) == (1.0, 0.667)  # a drop of exactly the margin: no flag
    assert (sweep[0.4]["precision"], sweep[0.4]["recall"]) == (1.0, 0.333)


def test_a_replay_that_diverges_is_reported_not_judged(game):
    task, route, _, _ = game
    text, items = play(task, route[:3], len(route) + 1)
    tampered = items[2].history[1].model_copy(update={"observation": "You are in the attic. You see a coin."})
    items[2].history[1] = tampered
    student = ExpertStudent({text: task})
    teacher = mc_teacher(student, budget=len(route) + 1)
    try:
        verdicts = teacher.judge([items[0], items[2]])  # the record of step 2 does not match the game
    finally:
        teacher.close()
        student.close()
    assert [v.critique is not None for v in verdicts] == [True, False]
    assert "replay diverged" in verdicts[1].why_unjudged and "at step 2" in verdicts[1].why_unjudged
    counts = TeacherCounts()
    for i, v in enumerate(verdicts):
        counts.add(v, i)
    # counted per state: the states before and after step 3 both replay through the bad record
    assert counts.replay_diverged == 2 and counts.unjudged == 1 and counts.notes


def test_two_runs_of_a_sampling_student_judge_alike(game, tiny_model_dir):
    """Every rollout turn draws from a seed derived from (seed, state, rollout, turn): two fresh teachers over a real
    sampling model take the same rollouts, whatever else shares their batches."""
    from steptune.backends.local import LocalBackend

    task, route, _, _ = game
    _, items = play(task, route[:2], len(route) + 1)
    runs = []
    for order in (items, items[::-1]):
        teacher = MCTeacher(LocalBackend(str(tiny_model_dir)), EnvPool("twx", 3, {"game": "coin", "game_params": PARAMS,
                            "max_steps": 4}), rollouts=2, max_new_tokens=12, seed=7)
        try:
            teacher.judge(order)
            runs.append({st: (e.first_actions, e.rewards, e.rollout_steps) for st, e in teacher.cache.items()})
        finally:
            teacher.close()
    assert runs[0] == runs[1] and len(runs[0]) == 2  # the states the two episodes go on from


def test_judge_agreement_replays_the_records_and_scores_flags_against_the_expert(game):
    """The expert teacher's own synthesis agrees with the expert's replayed verdicts exactly; relabelling one of its
    plain steps as an error is one false positive, dropping one flag one false negative."""
    from steptune.backends.base import GenerationConfig
    from steptune.agent.rollout import run_episodes
    from steptune.evaluation.judges import compare_with_expert
    from steptune.teacher.expert import ExpertTeacher

    task, route, k, wrong = game
    kwargs = {"game": "coin", "game_params": PARAMS, "max_steps": len(route) + 6}
    with EnvPool("twx", 1, kwargs) as pool:
        text = pool.reset(0, task).task
        student = ExpertStudent({text: task}, {k: wrong, 0: "take coin"})  # refused: no coin here yet
        [ep] = run_episodes(pool, [task], student, GenerationConfig(max_new_tokens=16), teacher=ExpertTeacher(),
                            progress=False)
        student.close()
        traj = ep.trajectory
        assert traj.n_errors == 2
        exact = compare_with_expert([traj], pool).summary()
        plain = next(i for i, s in enumerate(traj.steps) if s.kind == "student")
        first_error = next(i for i, s in enumerate(traj.steps) if s.kind == "error")
        relabelled = traj.model_copy(deep=True)
        relabelled.steps[plain].kind = "error"
        relabelled.steps[first_error].kind = "student"
        off = compare_with_expert([relabelled], pool).summary()
    judged = sum(s.kind != "reflection" for s in traj.steps)
    assert exact | {"disagreements": []} == exact | {"tp": 2, "fp": 0, "fn": 0, "tn": judged - 2, "precision": 1.0,
                                                     "recall": 1.0, "diverged_trajectories": 0, "disagreements": []}
    assert (off["tp"], off["fp"], off["fn"], off["precision"], off["recall"]) == (1, 1, 1, 0.5, 0.5)


def test_mc_settings_are_checked_when_the_config_loads():
    from steptune.pipeline.config import ConfigError, load_config

    cfg = load_config("configs/study-coin.yaml", {"synthesis.teacher": {"name": "mc", "rollouts": 3}})
    assert cfg.synthesis.teacher.name == "mc" and cfg.synthesis.teacher.rollouts == 3
    assert cfg.synthesis.teacher.margin == 0.2
    assert load_config("configs/study-coin.yaml", {"synthesis.teacher": "mc"}).synthesis.teacher.rollouts == 5
    for key, bad in (("margin", 1.5), ("rollouts", 0), ("temperature", 0), ("colour", "red")):
        with pytest.raises(ConfigError, match=f"synthesis.teacher.mc.{key}|synthesis.teacher.{key}"):
            load_config("configs/study-coin.yaml", {"synthesis.teacher": {"name": "mc", key: bad}})


MC_SYNTH = """
import json, sys
from steptune.synthesis.synthesize import SynthesisConfig, synthesize
synthesize(SynthesisConfig.model_validate_json(sys.argv[1]), progress=False)
"""


@pytest.mark.slow
def test_killed_mc_synthesis_resumes_to_the_records_of_an_uninterrupted_run(tmp_path_factory, tmp_path):
    """A real trained student sampling at T=0.5 with the MC teacher: killed with SIGKILL after its first records, then
    resumed, the file holds exactly the records (teacher accounting included) of a run that was never killed."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from _react_model import react_model_fixture

    from steptune.backends import BackendConfig
    from steptune.data.trajectory import load_trajectories
    from steptune.synthesis.synthesize import SynthesisConfig, synthesize

    model = react_model_fixture(tmp_path_factory)
    cfg = SynthesisConfig(student=BackendConfig(model=str(model)), env="twx",
                          env_kwargs={"game": "coin", "game_params": "numLocations=2,includeDoors=0", "max_steps": 5},
                          split="train", limit=4, workers=2, temperature=0.5, max_new_tokens=16, teacher={"name": "mc", "rollouts": 2, "slots": 4}, out=str(tmp_path / "ref.jsonl"), seed=3)
    reference = synthesize(cfg, progress=False)
    killed = cfg.model_copy(update={"out": str(tmp_path / "killed.jsonl")})
    log = tmp_path / "killed.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", MC_SYNTH, killed.model_dump_json()], stderr=err)
    out, deadline = tmp_path / "killed.jsonl", time.time() + 900
    while time.time() < deadline and proc.poll() is None and (not out.exists() or not out.read_text().splitlines()):
        time.sleep(0.1)
    assert proc.poll() is None, log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(out.read_text().splitlines())
    assert 1 <= n_before < 4
    resumed = synthesize(killed, progress=False)
    by_id = lambda p: {t.id: t.model_dump() for t in load_trajectories(p)}  # noqa: E731
    assert by_id(out) == by_id(cfg.out)
    assert resumed["teacher"] == reference["teacher"] and reference["teacher"]["rollouts"] > 0
    assert json.loads((tmp_path / "killed_teacher.json").read_text())["rollout_steps"] == \
        reference["teacher"]["rollout_steps"]
