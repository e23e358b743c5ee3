"""ScienceWorld adapter on the real simulator: ETO splits, gold replay, invalid actions, expert, pool restart."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _own_processes import tagged_pids

from steptune.envs.pool import EnvFailure, EnvPool
from steptune.envs.sciworld import INVALID_MARK, ScienceWorldEnv

ETO = Path(__file__).resolve().parents[2] / "shared" / "data" / "eto-sciworld"  # shared/ beside the clone


def _find_task(env, split="seen", prefix="task-3-find"):
    return next(t for t in env.tasks(split) if t.name.startswith(prefix))


def _java_children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,ppid=,comm=", "-e"], capture_output=True, text=True, check=False).stdout
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
    if ETO.exists():  # packaged copy equals the shared ETO files, names and variations in order
        for split, f in (("train", "train_indices"), ("seen", "dev_indices"), ("unseen", "test_indices")):
            pairs = json.loads((ETO / f"{f}.json").read_text())
            assert [[t.name, t.variation] for t in env.tasks(split)] == pairs
    assert all(t.split == "seen" and t.env == "sciworld" for t in env.tasks("seen"))
    from steptune.envs.sciworld import _eto_file

    # ETO's own file where shared/ lies beside the clone, else the packaged copy (compared with ETO's above)
    limits = json.loads((ETO / "max_steps.json").read_text()) if ETO.exists() else _eto_file("max_steps.json")
    task = _find_task(env)
    assert env.max_steps(task) == limits[task.name] == 15
    assert ScienceWorldEnv(max_steps=7).max_steps(task) == 7
    assert env._sw is None  # listing tasks starts no JVM
    with pytest.raises(ValueError):
        env.tasks("nope")
    lifespan = ["task-6-lifespan-(longest-lived)", "task-6-lifespan-(shortest-lived)"]
    short = ScienceWorldEnv(task_types=lifespan).tasks("train")
    assert len(short) == 166 and {t.name for t in short} == set(lifespan)
    assert short == [t for t in env.tasks("train") if t.name in lifespan]  # ETO order kept
    with pytest.raises(ValueError, match="task-6-lifespan"):
        ScienceWorldEnv(task_types=["task-6-lifespan"]).tasks("train")


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

        # fresh episode: an invalid action is answered as the benchmark does, rewards nothing, keeps the expert
        env.reset(task)
        gold = env.expert_actions()  # regenerated at load; find-animal tasks may pick another animal
        before = env.step("look around")
        assert not before.info["invalid"] and env.expert_actions() == gold  # a no-op keeps the gold prefix
        bad = env.step("fly to the moon")
        assert bad.observation.strip() == INVALID_MARK and bad.info["invalid"] and not bad.done
        assert bad.reward == before.reward < 1.0
        assert env.expert_actions() == gold

        # divergence: follow one gold step, then go somewhere else; the expert re-plans from the gold remainder
        env.step(gold[0])
        detour = next(a for a in ("teleport to bathroom", "teleport to workshop") if a not in gold)
        assert not env.step(detour).info["invalid"]
        plan = env.expert_actions()  # best effort: the unexecuted gold actions from the first one valid now
        assert plan and plan[-1] == gold[-1] and gold[0] not in plan
        assert plan == [a for a in gold[1:] if a in plan] and gold[1:].index(plan[0]) + len(plan) == len(gold) - 1
        assert plan[0] in set(env._sw.get_valid_action_object_combinations())
        valid = env.valid_actions()  # what the recovery benchmark draws its off-plan errors from
        assert plan[0] in valid and detour in valid and "fly to the moon" not in valid
        assert not env.step(plan[0]).info["invalid"]


def test_reset_without_the_expert_builds_the_gold_path_when_first_asked():
    with ScienceWorldEnv() as env:
        task = _find_task(env)
        env.reset(task)
        gold = env.expert_actions()
        moved = gold[: next(i for i, a in enumerate(gold) if a.startswith("go to")) + 1]  # up to leaving the room
        plain = env.reset_without_expert(task)  # loads without the gold path (most of a load's cost)
        assert "find" in plain.task and plain.observation
        for action in moved:
            assert not env.step(action).info["invalid"]
        where = env.step("look around").observation.splitlines()[0]
        # asked late: the task loads again with its gold path and the steps taken so far are replayed
        plan = env.expert_actions()
        assert plan and env.gold_path()[: len(moved)] == moved
        assert env.step("look around").observation.splitlines()[0] == where
        result = None
        for action in plan:
            result = env.step(action)
        assert result.done and result.info["won"]


def test_pool_restarts_after_jvm_sigkill_and_leaves_nothing(own_jvms):
    # the options a crowded pool gives its JVMs (more simulators than cores), so this JVM must run with them
    options = ScienceWorldEnv.crowded_jvm_options
    pool = EnvPool("sciworld", size=1, jvm_options=options)
    try:
        task = _find_task(pool.spec)
        assert not isinstance(pool.reset(0, task), EnvFailure)
        worker = pool.worker_pids()[0]
        jvms = _java_children(worker)
        assert jvms, "the worker should own a ScienceWorld JVM"
        assert set(jvms) <= tagged_pids("scienceworld", own_jvms)  # the tag reaches the JVMs
        environ = Path(f"/proc/{jvms[0]}/environ").read_text().split("\0")
        assert options and any(e.startswith("JAVA_TOOL_OPTIONS=") and options in e for e in environ)
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
    time.sleep(0.5)
    assert not tagged_pids("scienceworld", own_jvms), "a ScienceWorld JVM was left behind"


def test_expert_trajectories_replay_to_success_and_resume(tmp_path):
    from steptune.data.trajectory import load_trajectories
    from steptune.synthesis.golden import write_expert_trajectories

    out = tmp_path / "expert.jsonl"
    stats = write_expert_trajectories("sciworld", "seen", out, limit=2, workers=1)
    assert stats.written == 2 and stats.dropped == 0
    trajs = load_trajectories(out)
    assert all(t.success and t.reward == 1.0 and all(s.kind == "expert" and s.weight == 1 for s in t.steps) for t in trajs)
    thoughts = [s.thought for t in trajs for s in t.steps]
    assert all(thoughts) and len(set(thoughts)) > len(thoughts) // 2  # informative, not one fixed template
    again = write_expert_trajectories("sciworld", "seen", out, limit=2, workers=1)
    assert again.written == 0 and again.skipped_done == 2


def test_short_gold_paths_replay_to_success_across_task_types():
    with ScienceWorldEnv() as env:
        picks = [next(t for t in env.tasks("unseen") if t.name.startswith(p)) for p in ("task-6-lifespan", "task-3-find")]
        for task in picks:
            env.reset(task)
            for action in env.expert_actions():
                result = env.step(action)
                assert not result.info["invalid"], action
            assert result.done and result.info["won"] and result.reward == 1.0, task
