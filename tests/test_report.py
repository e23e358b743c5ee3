"""Side-by-side reports of eval runs: markdown table, HTML with an embedded plot, the CLI command."""

import base64
import re

import pytest
from typer.testing import CliRunner

from steptune.cli import app
from steptune.data.react import INVALID_FORMAT_OBSERVATION
from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.evaluation.eval import summarize
from steptune.evaluation.report import write_report


def _run(tmp_path, name, rewards_by_split):
    """An eval run directory written the way `evaluate` writes it."""
    import json

    trajs = []
    for split, rewards in rewards_by_split.items():
        for i, (task_type, r) in enumerate(rewards):
            trajs.append(Trajectory(id=f"{split}:sw/{task_type}/{i}", env="sciworld", task_id=f"sw/{task_type}/{i}",
                                    split=split, task="t", steps=[Step(action="look", kind="student")], reward=r,
                                    success=r == 1.0, meta={"task_type": task_type, "steps_taken": 1}))
    d = tmp_path / name
    save_trajectories(trajs, d / "episodes.jsonl")
    (d / "summary.json").write_text(json.dumps(summarize(trajs, name=name)))
    return d


@pytest.fixture
def runs(tmp_path):
    base = _run(tmp_path, "sft", {"seen": [("boil", 0.5), ("melt", 1.0)], "unseen": [("boil", 0.25)]})
    step = _run(tmp_path, "step", {"seen": [("boil", 1.0), ("melt", 1.0)], "unseen": [("boil", 0.75), ("melt", 0.0)]})
    return base, step


def test_summary_numbers():
    trajs = [Trajectory(id=str(i), env="e", task_id=f"e/a/{i}", split="s", task="t", reward=r, success=r == 1.0,
                        meta={"task_type": "a", "invalid_actions": 2, **({"stopped": "repeating"} if r == 0.0 else {})})
             for i, r in enumerate([1.0, 0.5, 0.0, 0.3])]
    trajs[2].steps = [Step(action="", observation=INVALID_FORMAT_OBSERVATION),  # a reply cut before its action
                      Step(action="look", observation="You are in the kitchen.")]
    agg = summarize(trajs)["splits"]["s"]
    assert agg == {"episodes": 4, "avg_reward": 45.0, "success_rate": 25.0, "avg_steps": 0.5,
                   "invalid_actions": 8, "truncations": 0, "failures": 0, "stopped_repeating": 1,
                   "steps_without_action": 1}


def test_report_tables_and_html(runs, tmp_path):
    paths = write_report(list(runs), tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "| sft | 75.0 | 50.0 | 25.0 | 0.0 | 3 |" in md
    assert "| step | 100.0 | 100.0 | 37.5 | 0.0 | 4 |" in md
    assert "| boil | 25.0 (1) | 75.0 (1) |" in md and "| melt | – | 0.0 (1) |" in md
    html = paths["html"].read_text()
    assert html.count("<table>") == 3 and "<td>step</td>" in html
    png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", html).group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == paths["plot"].read_bytes()


def test_report_cli_and_missing_run_error(runs, tmp_path):
    result = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "| step |" in result.output and (tmp_path / "r" / "report.html").exists()
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")])
    assert bad.exit_code != 0 and "summary.json not found" in str(bad.exception)
