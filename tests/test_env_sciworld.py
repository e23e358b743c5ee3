"""ScienceWorld adapter on the real simulator: ETO splits, gold replay, invalid actions, expert, pool restart."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from steptune.envs.pool import EnvFailure, EnvPool
from steptune.envs.sciworld import INVALID_MARK, ScienceWorldEnv

ETO = Path("/work/shared/data/eto-sciworld")


def _find_task(env, split="seen", prefix="task-3-find"):
    return next(t for t in env.tasks(split) if t.name.startswith(prefix))


def _java_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,ppid=,comm=", "-e"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    kids, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for cpid, ppid, comm in rows:
            if int(ppid) == p:
                frontier.append(int(cpid))
                if "java" in comm:
                    kids.append(int(cpid))
    return kids


def test_splits_match_eto_files():
    env = ScienceWorldEnv()
    assert [len(env.tasks(s)) for s in ("train", "seen", "unseen")] == [1483, 194, 211]
    if ETO.exists():  # packaged copy equals the shared ETO files
        pairs = json.loads((ETO / "test_indices.json").read_text())
        assert [[t.name, t.variation] for t in env.tasks("unseen")] == pairs
    assert env.max_steps(_find_task(env)) == 15
    with pytest.raises(ValueError):
        env.tasks("nope")


def test_gold_replay_invalid_action_and_expert():
    with ScienceWorldEnv() as env:
        task = _find_task(env)
        reset = env.reset(task)
        assert "find" in reset.task and reset.observation
        gold = env.expert_actions()
        assert gold and len(gold) <= env.max_steps(task)
        result = None
        for i, action in enumerate(gold):
            assert env.expert_actions() == gold[i:]
            result = env.step(action)
        assert result.done and result.info["won"] and result.reward == 1.0

        # fresh episode: an invalid action is answered as the benchmark does, and the expert can't tell anymore
        env.reset(task)
        bad = env.step("fly to the moon")
        assert bad.observation.strip() == INVALID_MARK and bad.info["invalid"] and not bad.done
        assert bad.reward < 1.0  # a task may start with a small partial score; an invalid action adds none
        assert env.expert_actions() is None


def test_pool_restarts_after_jvm_sigkill_and_leaves_nothing():
    pool = EnvPool("sciworld", size=1)
    try:
        task = _find_task(pool.spec)
        assert not isinstance(pool.reset(0, task), EnvFailure)
        worker = pool.worker_pids()[0]
        jvms = _java_children(worker)
        assert jvms, "the worker should own a ScienceWorld JVM"
        os.kill(jvms[0], signal.SIGKILL)
        out = pool.step_many([(0, "look around")])[0]
        assert isinstance(out, EnvFailure)
        # the slot was restarted: a new episode works
        assert not isinstance(pool.reset(0, task), EnvFailure)
        gold = pool.expert_actions(0)
        assert gold
        pids = pool.worker_pids()
    finally:
        pool.close()
    alive = [p for p in pids + jvms if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    assert not alive


def test_expert_trajectories_replay_to_success_and_resume(tmp_path):
    from steptune.data.trajectory import load_trajectories
    from steptune.envs.expert import write_expert_trajectories

    out = tmp_path / "expert.jsonl"
    stats = write_expert_trajectories("sciworld", "seen", out, limit=2, workers=1)
    assert stats.written == 2 and stats.dropped == 0
    trajs = load_trajectories(out)
    assert all(t.success and t.reward == 1.0 and all(s.kind == "expert" and s.weight == 1 for s in t.steps) for t in trajs)
    thoughts = [s.thought for t in trajs for s in t.steps]
    assert all(thoughts) and len(set(thoughts)) > len(thoughts) // 2  # informative, not one fixed template
    again = write_expert_trajectories("sciworld", "seen", out, limit=2, workers=1)
    assert again.written == 0 and again.skipped_done == 2
