"""STeP's premise — the base agent succeeds on 30-70% of the synthesis tasks U2 — checked and reported: a warning on
the console and a note in the run report and the study report, on hand-made run directories."""

import json
from pathlib import Path

import pytest

from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.pipeline.report import premise_note, print_summary, write_run_report
from steptune.pipeline.study import study_markdown, write_study

METHODS = ["golden_d1", "step"]


def test_premise_band_edges():
    assert premise_note(None) is None
    assert premise_note(30.0) is None and premise_note(50.0) is None and premise_note(70.0) is None
    low, high = premise_note(29.9), premise_note(70.1)
    assert "29.9% of the U2 tasks, below 30%" in low and "teacher's corrections" in low
    assert "70.1% of the U2 tasks, above 70%" in high and "little to reflect on" in high


def _run(run: Path, base_u2: float | None) -> Path:
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "config": {"name": "t", "env": {"name": "twx"}, "methods": METHODS, "eval": {"splits": ["seen"]}},
        "stages": {}}))
    for m in METHODS:
        trajs = [Trajectory(id=f"seen:twx/coin/{i}", env="twx", task_id=f"twx/coin/{i}", split="seen", task="t",
                            success=i < 2, reward=float(i < 2), steps=[Step(action="take coin", kind="student")],
                            meta={"task_type": "coin"}) for i in range(4)]
        save_trajectories(trajs, run / "eval" / m / "episodes.jsonl")
        from steptune.evaluation.eval import summarize

        (run / "eval" / m / "summary.json").write_text(json.dumps(summarize(trajs, name=m)))
    if base_u2 is not None:
        (run / "eval" / "base_agent_u2").mkdir(parents=True)
        (run / "eval" / "base_agent_u2" / "summary.json").write_text(
            json.dumps({"overall": {"success_rate": base_u2, "episodes": 10}}))
    return run


@pytest.mark.parametrize("base_u2, note", [(10.0, "below 30%"), (90.0, "above 70%"), (50.0, None), (None, None)])
def test_run_report_and_console_say_when_the_premise_fails(tmp_path, capsys, base_u2, note):
    run = _run(tmp_path / "run", base_u2)
    md = write_run_report(run)["markdown"].read_text()
    print_summary(run)
    out = " ".join(capsys.readouterr().out.split())
    if note:
        assert "**Note:** STeP's premise does not hold" in md and note in md
        assert "warning: STeP's premise does not hold" in out and note in out
    else:
        assert "premise" not in md and "premise" not in out


def test_study_report_notes_the_premise_from_the_mean_over_seeds(tmp_path):
    for seed, base in ((0, 20.0), (1, 30.0)):
        _run(tmp_path / f"seed-{seed}", base)
    s = write_study(tmp_path, [0, 1])
    assert s["base_agent_success_u2"]["mean"] == 25.0
    assert "the base agent (mean of 2 seeds) succeeds on 25.0% of the U2 tasks, below 30%" in s["premise_note"]
    assert json.loads((tmp_path / "study.json").read_text())["premise_note"] == s["premise_note"]
    assert f"**Note:** {s['premise_note']}." in (tmp_path / "study.md").read_text()
    (tmp_path / "seed-1" / "eval" / "base_agent_u2" / "summary.json").write_text(
        json.dumps({"overall": {"success_rate": 40.0, "episodes": 10}}))
    s = write_study(tmp_path, [0, 1])
    assert s["premise_note"] is None and "Note:" not in study_markdown(s)


def test_premise_only_runs_the_base_agent_on_u2_and_the_study_continues_from_it(tmp_path):
    """`steptune study --premise-only` on real coin games: only golden, split, the base agent and its U2 run; it prints
    the U2 success per seed; the study of that setting then skips those stages (the same stage keys)."""
    import contextlib
    import io

    import yaml
    from _tiny_study import TINY
    from typer.testing import CliRunner

    from steptune.cli.app import app
    from steptune.pipeline.config import PipelineConfig
    from steptune.pipeline.study import PREMISE_STAGES, run_study

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["study", str(tmp_path / "tiny.yaml"), "--seeds", "0", "--premise-only",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    rate = json.loads(result.output.strip().splitlines()[-1])["base_agent_success_u2"]["0"]
    summary = json.loads((out / "seed-0" / "eval" / "base_agent_u2" / "summary.json").read_text())["overall"]
    assert rate == summary["success_rate"] and summary["episodes"] > 0
    assert f"seed 0: the base agent succeeds on {rate:.1f}% of U2" in " ".join(result.output.split())
    done = set(json.loads((out / "seed-0" / "manifest.json").read_text())["stages"])
    assert done == set(PREMISE_STAGES) and not (out / "study.json").exists()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run_study(PipelineConfig.model_validate(TINY), [0], out)
    for stage in PREMISE_STAGES:
        assert f"{stage}: up to date, skipped" in log.getvalue()
    assert "synthesize: up to date" not in log.getvalue() and (out / "study.json").exists()
    both = CliRunner().invoke(app, ["study", str(tmp_path / "tiny.yaml"), "--premise-only", "--equal-steps",
                                    "--output", str(out)])
    assert both.exit_code != 0 and "--premise-only runs no study" in " ".join(both.output.split())
