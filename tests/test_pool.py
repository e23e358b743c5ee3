"""The environment pool's spares (resets off the critical path) and its Ray transport, on real TextWorldExpress."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _twx_pool import twx_kwargs

from steptune.backends.base import ChatBackend, GenerationConfig
from steptune.agent.rollout import run_episodes
from steptune.envs.pool import EnvFailure, EnvPool
from steptune.teacher.expert import ExpertTeacher

ROOT = Path(__file__).resolve().parents[1]
MOVES = ["look around", "move east", "take coin", "move west", "inventory", "move north"]
FOUR_ROOMS = "numLocations=4,includeDoors=0"


class Wanders(ChatBackend):
    """Acts by turn number and the conversation's first words: episodes differ in length and outcome."""

    def complete(self, conversations, gen):
        out = []
        for c in conversations:
            turn = sum(m["role"] == "assistant" for m in c)
            out.append(f"Thought: t\nAction: {MOVES[(turn + len(c[-1]['content'])) % len(MOVES)]}")
        return out


def _records(pool: EnvPool, tasks, teacher=None) -> list[str]:
    eps = run_episodes(pool, tasks, Wanders(), GenerationConfig(max_new_tokens=8), teacher=teacher, progress=False)
    return [e.trajectory.model_dump(mode="json") for e in eps]


@pytest.mark.parametrize("teacher", [None, ExpertTeacher()], ids=["no-teacher", "expert-teacher"])
def test_resets_ahead_write_the_same_records_as_resets_inline(teacher):
    kwargs = twx_kwargs(max_steps=5, game_params=FOUR_ROOMS)
    with EnvPool("twx", 3, kwargs, spares=0) as inline:
        tasks = inline.tasks("train")[:9]
        expected = _records(inline, tasks, teacher)
    with EnvPool("twx", 3, kwargs) as ahead:
        got = _records(ahead, tasks, teacher)
        assert ahead.spares == 3 and ahead.resets_ahead >= 5  # all but the first round's episodes, or nearly
    for g, e in zip(got, expected):
        assert {k: v for k, v in g.items() if v != e[k]} == {}, e["id"]
    assert got == expected


def test_a_spare_whose_worker_dies_fails_only_the_episode_it_was_preparing():
    with EnvPool("twx", 1, twx_kwargs(max_steps=5), spares=1) as pool:
        tasks = pool.tasks("train")[:3]
        assert not isinstance(pool.reset(0, tasks[0]), EnvFailure)
        pool.prepare([tasks[1]], plans=True)
        spare_worker = pool.worker_pids()[1]
        os.kill(spare_worker, signal.SIGKILL)
        time.sleep(0.3)
        out = pool.reset(0, tasks[1])
        assert isinstance(out, EnvFailure) and "died" in out.reason and pool.restarts == 1
        assert spare_worker not in pool.worker_pids()
        # the slot now runs in the replaced worker's environment: a fresh reset works, its expert answers
        assert not isinstance(pool.reset(0, tasks[2]), EnvFailure) and pool.expert_actions(0)


def test_a_reset_prepared_without_the_expert_serves_only_resets_without_it():
    # (ScienceWorld skips its gold path in such a reset; an episode that wants the expert must not start from one)
    with EnvPool("twx", 1, twx_kwargs(max_steps=5), spares=1) as pool:
        tasks = pool.tasks("train")[:2]
        assert not isinstance(pool.reset(0, tasks[0]), EnvFailure)
        pool.prepare([tasks[1]], expert=False)
        assert not isinstance(pool.reset(0, tasks[1]), EnvFailure) and pool.resets_ahead == 0
        pool.prepare([tasks[0]], expert=False)
        assert not isinstance(pool.reset(0, tasks[0], expert=False), EnvFailure) and pool.resets_ahead == 1
        assert pool.expert_actions(0)  # TextWorldExpress plans either way


PIPED = """
import sys
sys.path.insert(0, {tests!r})
from _twx_pool import twx_pool
from test_pool import Wanders
from steptune.backends.base import GenerationConfig
from steptune.agent.rollout import run_episodes
with twx_pool(2, max_steps=3) as pool:
    run_episodes(pool, pool.tasks("train")[:10], Wanders(), GenerationConfig(max_new_tokens=8))
print("done")
"""


def test_progress_prints_plain_lines_when_output_is_not_a_terminal():
    out = subprocess.run([sys.executable, "-c", PIPED.format(tests=str(ROOT / "tests"))], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("episodes ")]
    assert [ln.split()[1] for ln in lines] == [f"{n}/10" for n in range(1, 11)]  # every tenth of the run
    assert "ep/s" in lines[-1] and "reward" in lines[-1]
    assert "\x1b[" not in out.stderr + out.stdout  # no bar, no terminal codes in a log file


def _ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::|default_worker.py"], capture_output=True,
                         text=True).stdout
    return {int(p) for p in out.split()}


@pytest.mark.slow
def test_ray_actors_write_the_same_records_and_leave_nothing_running():
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'steptune[ray]'")
    kwargs = twx_kwargs(max_steps=5, game_params=FOUR_ROOMS)
    before = _ray_processes()
    with EnvPool("twx", 2, kwargs) as local:
        tasks = local.tasks("train")[:6]
        expected = _records(local, tasks, ExpertTeacher())
    # 2 slots and 2 spares in 2 actors on a local Ray instance started (and stopped) by the pool
    with EnvPool("twx", 2, kwargs, workers=2, transport="ray") as pool:
        assert _records(pool, tasks, ExpertTeacher()) == expected
        assert pool.resets_ahead > 0
        # a dead actor: its episode fails, the actor is replaced, the slot serves again after a reset
        assert not isinstance(pool.reset(0, tasks[0]), EnvFailure)
        actor_pid = pool._workers[pool._slot_env[0] % 2].pid
        os.kill(actor_pid, signal.SIGKILL)
        out = pool.step_many([(0, "look around")])[0]
        assert isinstance(out, EnvFailure) and pool.restarts == 1
        assert not isinstance(pool.reset(0, tasks[1]), EnvFailure)
        assert not isinstance(pool.step_many([(0, "look around")])[0], EnvFailure)
    time.sleep(2.0)
    assert _ray_processes() <= before, "a Ray process was left running"
