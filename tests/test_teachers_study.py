"""`steptune study --teachers`: every teacher judges stage 2 from the study's own base agent, STeP is retrained on its
Dr and paired with the study's golden methods (steptune.pipeline.teachers), on real TextWorldExpress games."""

import json

import numpy as np
import pytest

from steptune.data.trajectory import load_trajectories
from steptune.pipeline.study import seed_dir
from steptune.pipeline.teachers import run_teachers, teacher_dir


@pytest.mark.slow
def test_each_teacher_judges_the_same_base_agent_and_step_is_paired_with_the_studys_golden_runs(tiny_study):
    cfg, tmp_path, _ = tiny_study
    s = run_teachers(cfg, [0], tmp_path, ["expert", "mc"], command="steptune study test --teachers expert,mc")
    study, mc = seed_dir(tmp_path, 0), seed_dir(teacher_dir(tmp_path, "mc"), 0)

    # the study's own teacher is the study's run; another teacher starts from the very same base agent and split
    assert s["teachers"]["expert"]["runs"] == [str(study)]
    weights = "models/golden_d1/model.safetensors"
    assert (mc / weights).read_bytes() == (study / weights).read_bytes()
    assert (mc / "data" / "d2.jsonl").read_bytes() == (study / "data" / "d2.jsonl").read_bytes()
    stages = json.loads((mc / "manifest.json").read_text())["stages"]
    assert set(stages) == {"synthesize", "filter", "train:step", "eval:step"}  # nothing upstream retrained
    assert json.loads((mc / "manifest.json").read_text())["config"]["synthesis"]["teacher"]["name"] == "mc"

    # the expert against its own verdicts: a replay reproduces synthesis, so they agree on every step
    expert = s["teachers"]["expert"]["agreement_pooled"]
    assert expert["expert_flags"] > 0 and expert["precision"] == expert["recall"] == 1.0
    flagged = sum(st.kind == "error" for t in load_trajectories(study / "data" / "synthesized.jsonl") for st in t.steps)
    assert expert["judge_flags"] == flagged
    # the MC judge's cost is its rollouts, counted on top of the episodes' own steps
    cost = s["teachers"]["mc"]["stage2"][0]
    assert cost["rollouts"] > 0 and cost["model_calls"] > cost["steps"] and cost["environment_steps"] > cost["steps"]
    assert s["teachers"]["expert"]["stage2"][0]["model_calls"] == s["teachers"]["expert"]["stage2"][0]["steps"]
    # its margin sweep scores the steps it judged: at its own margin it flags what it flagged
    mc_flags = s["teachers"]["mc"]["agreement_pooled"]
    assert {r["margin"]: r["judge_flags"] for r in mc_flags["margin_sweep"]}[0.2] == mc_flags["judge_flags"]

    # STeP of each teacher paired task by task with the study's golden D1
    for teacher, run in (("expert", study), ("mc", mc)):
        step = {t.id: t.success for t in load_trajectories(run / "eval" / "step" / "episodes.jsonl")
                if t.split == "seen"}
        d1 = {t.id: t.success for t in load_trajectories(study / "eval" / "golden_d1" / "episodes.jsonl")
              if t.split == "seen"}
        assert step.keys() == d1.keys()
        want = 100 * np.mean([float(step[k]) - float(d1[k]) for k in step])
        assert s["teachers"][teacher]["step_minus_golden_d1_seen"]["mean"] == pytest.approx(want, abs=0.01)
    # and the teachers themselves compared: STeP under mc minus STeP under the study's expert, task by task
    seen = {r: {t.id: float(t.success) for t in load_trajectories(r / "eval" / "step" / "episodes.jsonl")
                if t.split == "seen"} for r in (study, mc)}
    want = 100 * np.mean([seen[mc][k] - seen[study][k] for k in seen[mc]])
    assert s["teachers"]["mc"]["minus_expert_seen"]["mean"] == pytest.approx(want, abs=0.01)
    assert "minus_expert_seen" not in s["teachers"]["expert"]
    assert json.loads((tmp_path / "teachers.json").read_text())["command"].endswith("--teachers expert,mc")
    assert "| mc |" in (tmp_path / "teachers.md").read_text()

    # resumable: a second call retrains and re-judges nothing
    before = (mc / "models" / "step" / "train_summary.json").stat().st_mtime_ns
    agreement = (mc / "data" / "agreement_with_expert.json").stat().st_mtime_ns
    run_teachers(cfg, [0], tmp_path, ["expert", "mc"])
    assert (mc / "models" / "step" / "train_summary.json").stat().st_mtime_ns == before
    assert (mc / "data" / "agreement_with_expert.json").stat().st_mtime_ns == agreement


def test_an_unknown_teacher_is_one_clear_error(tmp_path):
    from _tiny_study import TINY

    from steptune.pipeline.config import PipelineConfig

    with pytest.raises(Exception, match="unknown teacher.*oracle.*known: expert"):
        run_teachers(PipelineConfig.model_validate(TINY), [0], tmp_path, ["expert", "oracle"])
