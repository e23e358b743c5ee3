"""A generation budget must hold the turns a model learned: stage 2's reflections are the longest, and a budget that
fits the golden agents once cut every reflection of the STeP agents before its `Action:` (docs/smollm2.md)."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.errors import UserError
from steptune.pipeline.budget import budget_problem, longest_turn
from steptune.pipeline.run import run_pipeline
from steptune.pipeline.study import seed_dir


def test_the_longest_turn_counts_trained_steps_only_in_the_models_own_tokens(tiny_model_dir, tmp_path):
    long_thought = "I tried to open the door to the north, but it is locked, so I will look for a key. " * 3
    steps = [Step(thought="The coin is not here.", action="move west", observation="You move west.", kind="student"),
             Step(thought=long_thought * 2, action="open door to north", observation="No.", kind="error", weight=0),
             Step(thought=long_thought, action="look around", observation="You see a key.", kind="reflection")]
    data = tmp_path / "dr.jsonl"
    save_trajectories([Trajectory(id="t1", env="twx", task_id="twx/coin/1", task="Find the coin.", steps=steps)], data)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    reflection = len(tok(steps[2].text(), add_special_tokens=False)["input_ids"])

    turn = longest_turn([data], tok)  # the masked error step is longer, but the model never learns to write it
    assert (turn.tokens, turn.kind, turn.file) == (reflection, "reflection", data)
    assert budget_problem(reflection, "eval.max_new_tokens", "STeP", [data], tiny_model_dir) is None
    problem = budget_problem(reflection - 1, "eval.max_new_tokens", "STeP", [data], tiny_model_dir)
    assert f"eval.max_new_tokens is {reflection - 1}" in problem and f"up to {reflection} tokens" in problem

    steps[1].weight = 1  # the ablation without masking learns it
    save_trajectories([Trajectory(id="t1", env="twx", task_id="twx/coin/1", task="Find the coin.", steps=steps)], data)
    assert longest_turn([data], tok).kind == "error"


@pytest.mark.slow
def test_a_budget_that_fits_the_golden_agents_but_cuts_the_reflections_stops_before_step_is_evaluated(
        tiny_study, tmp_path):
    cfg, study, _ = tiny_study
    shutil.copytree(seed_dir(study, 0), tmp_path / "run", symlinks=True)
    run = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(run / "models" / "init")
    golden, dr = longest_turn([run / "data" / "d1.jsonl", run / "data" / "d2.jsonl"], tok), \
        longest_turn([run / "data" / "dr.jsonl"], tok)
    assert dr.kind == "reflection" and dr.tokens > golden.tokens  # stage 2's reflections are the longest turns
    before = json.loads((run / "manifest.json").read_text())["stages"]

    short = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": golden.tokens})})
    with pytest.raises(UserError, match=rf"eval:step did not start: eval.max_new_tokens is {golden.tokens}, but "
                                        rf".* up to {dr.tokens} tokens .* kind reflection in dr.jsonl"):
        run_pipeline(short, run)
    after = json.loads((run / "manifest.json").read_text())["stages"]
    for golden_method in ("golden_d1", "golden_all"):  # their turns fit: evaluated at the new budget
        assert after[f"eval:{golden_method}"]["status"] == "done"
        assert after[f"eval:{golden_method}"]["key"] != before[f"eval:{golden_method}"]["key"]
    assert after["eval:step"] == before["eval:step"] and (run / "eval" / "step" / "summary.json").exists()
