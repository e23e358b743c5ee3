"""Harder games must not quietly shrink the golden set: the coin expert opens the doors it needs (real
TextWorldExpress games with includeDoors=1), and a golden stage that drops tasks says so — a console warning above a
tenth, an error above golden.max_drop_fraction."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steptune.data.trajectory import load_trajectories
from steptune.envs.twx import TextWorldExpressEnv
from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.run import run_pipeline
from steptune.synthesis.golden import ExpertStats, GoldenDropError, check_drops, write_expert_trajectories

DOORS = "numLocations=6,numDistractorItems=0,includeDoors=1"
FOUR_ROOMS = "numLocations=4,numDistractorItems=0,includeDoors=0"


def _route_lengths(max_steps: int, n: int) -> list[int]:
    """The expert's whole route (opening doors included) on each of the first n train games."""
    env = TextWorldExpressEnv(game="coin", game_params=DOORS, max_steps=max_steps)
    try:
        return [len((env.reset(task), env.expert_actions())[1]) for task in env.tasks("train")[:n]]
    finally:
        env.close()


@pytest.mark.parametrize("max_steps", [40, 8])
def test_coin_expert_with_doors_succeeds_on_every_game_its_step_budget_allows(tmp_path, max_steps):
    out = tmp_path / "golden.jsonl"
    stats = write_expert_trajectories("twx", "train", out, limit=20, workers=2, progress=False,
                                      env_kwargs={"game": "coin", "game_params": DOORS, "max_steps": max_steps})
    routes = _route_lengths(max_steps, 20)
    assert stats.written == sum(r <= max_steps for r in routes)
    if max_steps == 40:
        assert stats.written == 20 and stats.dropped == 0  # before the fix: 8 of 20
    else:
        assert 0 < stats.dropped < 20  # the budget is the only reason a game is lost
    trajs = load_trajectories(out)
    assert all(t.success for t in trajs)
    opened = [t for t in trajs if any(s.action.startswith("open door to ") for s in t.steps)]
    assert len(opened) >= len(trajs) // 2  # most coins lie behind a door
    # it never opens a door that is open (before the fix it did so until the budget ran out)
    assert not any("already open" in s.observation for t in trajs for s in t.steps)


def test_coin_expert_reopens_a_door_the_agent_closed():
    env = TextWorldExpressEnv(game="coin", game_params=DOORS, max_steps=40)
    try:
        task = next(t for t in env.tasks("train")
                    if (env.reset(t), env.expert_actions())[1][0].startswith("open door to "))
        env.reset(task)
        door = env.expert_actions()[0]
        env.step(door)
        after_open = env.expert_actions()
        assert door not in after_open  # open now: the route walks through it
        env.step(door.replace("open", "close", 1))
        assert env.expert_actions()[0] == door  # closed again by the agent: open it again
        for _ in range(40):
            plan = env.expert_actions()
            result = env.step(plan[0])
            if result.done:
                break
        assert result.info["won"]
    finally:
        env.close()


def test_check_drops_thresholds():
    assert check_drops(ExpertStats(written=9, dropped=1, reasons={"x": 1}), 0.5) is None  # a tenth: quiet
    warning = check_drops(ExpertStats(written=8, dropped=2, reasons={"expert path did not reach success": 2}), 0.5)
    assert "dropped 2 of 10 tasks (20%)" in warning and "expert path did not reach success x2" in warning
    with pytest.raises(GoldenDropError, match="dropped 6 of 10 .* golden.max_drop_fraction = 0.5"):
        check_drops(ExpertStats(written=4, dropped=6, reasons={"reset failed: boom": 6}), 0.5)
    assert check_drops(ExpertStats(written=4, dropped=6, reasons={"x": 6}), 1.0)  # allowed: a warning only


def _config(tmp_path: Path, max_steps: int, **golden) -> dict:
    return {"output_dir": str(tmp_path / "run"),
            "env": {"name": "twx", "kwargs": {"game": "coin", "game_params": FOUR_ROOMS, "max_steps": max_steps}},
            "golden": {"source": "expert", "split": "train", "limit": 20, **golden},
            "model": {"init": {"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1}}}


def test_golden_stage_warns_on_the_console_when_it_drops_over_a_tenth(tmp_path, capsys):
    # 4 steps are too few for the expert's route on 8 of these 20 games (40%)
    cfg = PipelineConfig.model_validate(_config(tmp_path, max_steps=4))
    run_pipeline(cfg, until_stage="golden")
    out = " ".join(capsys.readouterr().out.split())
    assert "golden: the expert dropped 8 of 20 tasks (40%): expert path did not reach success x8" in out
    info = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["golden"]
    assert info["status"] == "done" and info["info"]["dropped"] == 8
    assert len(load_trajectories(tmp_path / "run" / "data" / "golden.jsonl")) == 12


def test_golden_stage_that_drops_over_the_allowed_share_is_a_one_line_error(tmp_path):
    # 1 step: only the games that start in the coin's room succeed (5 of 20)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, max_steps=1)))
    cli = [sys.executable, "-c", "from steptune.cli import main; main()", "run", str(config), "--until", "golden"]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: golden: the expert dropped 15 of 20 tasks (75%)")
    assert "expert path did not reach success x15" in lines[0] and "golden.max_drop_fraction" in lines[0]
    # the trajectories it did write are kept; allowing the drops finishes the stage
    assert len(load_trajectories(tmp_path / "run" / "data" / "golden.jsonl")) == 5
    proc = subprocess.run([*cli, "--set", "golden.max_drop_fraction=0.8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dropped 15 of 20 tasks" in " ".join(proc.stdout.split())
