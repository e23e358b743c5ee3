"""TextWorldExpress adapter and the environment worker pool, on the real simulator."""

import os
import signal
import subprocess
import sys
import time

import pytest
from _own_processes import tagged_pids

from steptune.envs.base import JVM_LOG_TO_STDERR, TaskRef
from steptune.envs.pool import EnvFailure, EnvPool
from steptune.envs.twx import TextWorldExpressEnv


@pytest.fixture(scope="module")
def env():
    e = TextWorldExpressEnv(game="twc")
    yield e
    e.close()


def test_gold_paths_replay_to_success(env):
    for split in ("train", "seen", "unseen"):
        for task in env.tasks(split)[:4]:
            env.reset(task)
            plan = env.expert_actions()
            assert plan
            for action in plan:
                res = env.step(action)
                assert not res.info["invalid"], action
            assert res.done and res.info["won"] and res.reward == 1.0


def test_invalid_action_and_replanning_after_a_wrong_put(env):
    env.reset(TaskRef("twx", "twc", 0, "train"))
    res = env.step("dance with the wardrobe")
    assert res.info["invalid"] and not res.done and res.reward == 0.0
    gold = env.expert_actions()
    item = next(a for a in gold if a.startswith("take ")).removeprefix("take ")
    env.step(f"take {item}")
    wrong = next(a for a in env._valid if a.startswith(f"put {item} in ") and f"put {item} in" not in " ".join(gold)
                 or a.startswith("open ") and a.removeprefix("open ") not in " ".join(gold))
    if wrong.startswith("open "):
        env.step(wrong)
        wrong = f"put {item} in {wrong.removeprefix('open ')}"
    assert not env.step(wrong).info["invalid"]
    plan = env.expert_actions()  # re-planned from the state, not the stale gold path
    assert plan[0] == f"take {item}"
    for action in plan:
        res = env.step(action)
    assert res.info["won"]


def test_twc_expert_walks_back_to_the_box_it_left_behind(env):
    """The agent took the item, then walked into the other room, where the box is not: the expert's plan walks back
    (its old re-plan put the item in a box that is not there: an action the game refuses, again and again)."""
    two_rooms = TextWorldExpressEnv(game="twc", game_params="numLocations=2,numItemsToPutAway=1,includeDoors=0")
    try:
        two_rooms.reset(TaskRef("twx", "twc", 0, "train"))
        assert "open chest of drawers" in two_rooms.expert_actions()  # the chest is in this room, the bedroom
        two_rooms.step("take plaid bed sheet")
        assert "You are in the bathroom" in two_rooms.step("move north").observation
        assert two_rooms.expert_actions() == ["move south", "open chest of drawers",
                                              "put plaid bed sheet in chest of drawers"]
    finally:
        two_rooms.close()


@pytest.mark.parametrize("params", ["numLocations=2,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0",
                                    "numLocations=3,numItemsToPutAway=2,includeDoors=1,limitInventorySize=0"])
def test_twc_expert_wins_from_wherever_a_random_walk_leaves_the_agent(params):
    """From any state (items carried off or put in the wrong box, boxes opened and closed, doors opened, other
    rooms), following the expert's plan wins, each of its actions valid when taken."""
    import random

    env = TextWorldExpressEnv(game="twc", game_params=params, max_steps=100)
    rng, played = random.Random(0), 0
    try:
        for seed in range(15):
            for walk in (2, 5, 9):
                env.reset(TaskRef("twx", "twc", seed, "train"))
                for _ in range(walk):
                    res = env.step(rng.choice(sorted(env._valid)))
                    if res.done:
                        break
                if res.done:
                    continue
                played += 1
                plan = env.expert_actions()
                for action in plan:
                    res = env.step(action)
                    assert not res.info["invalid"], (seed, walk, action, plan)
                assert res.info["won"], (seed, walk, plan)
    finally:
        env.close()
    assert played >= 30


def test_resets_without_reloading_give_the_same_games_as_fresh_loads():
    """The adapter loads the game generator once per (game, params), not on every reset: consecutive resets, game
    switches included, must start exactly the games a freshly loaded simulator starts."""
    tasks = [TaskRef("twx", game, seed, split) for game, seed, split in
             [("twc", 3, "train"), ("twc", 7, "unseen"), ("coin", 2, "seen"), ("coin", 5, "train"), ("twc", 3, "train")]]
    params = "numLocations=2,includeDoors=0"  # known to both games
    reused = TextWorldExpressEnv(game="twc", game_params=params)
    try:
        for task in tasks:
            got = reused.reset(task)
            valid = sorted(reused._valid)
            step = reused.step(valid[0]).observation
            fresh = TextWorldExpressEnv(game="twc", game_params=params)
            try:
                want = fresh.reset(task)
                assert (got.task, valid, step) == (want.task, sorted(fresh._valid), fresh.step(valid[0]).observation)
            finally:
                fresh.close()
    finally:
        reused.close()


def test_no_seed_is_in_two_splits():
    # the folds alone do not separate games: coin starts the same game from one seed in every fold
    coin = TextWorldExpressEnv(game="coin", game_params="numLocations=4,includeDoors=0")
    try:
        starts = {split: coin.reset(TaskRef("twx", "coin", 7, split)).task for split in ("train", "seen", "unseen")}
        assert len(set(starts.values())) == 1
    finally:
        coin.close()
    for game in ("twc", "coin", "cookingworld"):
        env = TextWorldExpressEnv(game=game, tasks_per_split=50)
        seeds = {split: {t.variation for t in env.tasks(split)} for split in ("train", "seen", "unseen")}
        assert all(len(s) == 50 for s in seeds.values())
        assert not (seeds["train"] & seeds["seen"] or seeds["train"] & seeds["unseen"] or seeds["seen"] & seeds["unseen"])


def test_unknown_split(env):
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("validation")


def java_pids(tag: str) -> set[int]:
    return tagged_pids("textworld", tag)


def test_pool_steps_in_parallel_restarts_a_killed_jvm_and_leaves_nothing_behind(own_jvms):
    with EnvPool("twx", 2) as pool:
        tasks = pool.tasks("train")[:2]
        assert all(pool.reset(i, t).task for i, t in enumerate(tasks))
        res = pool.step_many([(0, "look around"), (1, "inventory")])
        assert all(not isinstance(r, EnvFailure) for r in res)
        group = subprocess.run(["pgrep", "-g", str(pool.worker_pids()[0])], capture_output=True, text=True).stdout
        jvm = [int(p) for p in group.split() if "java" in open(f"/proc/{p}/cmdline").read()]
        assert jvm, "the worker's JVM lives in the worker's process group"
        assert set(jvm) <= java_pids(own_jvms)  # the tag reaches the JVMs
        os.kill(jvm[0], signal.SIGKILL)
        time.sleep(0.3)
        res = pool.step_many([(0, "look around"), (1, "look around")])
        assert isinstance(res[0], EnvFailure) and not isinstance(res[1], EnvFailure)
        assert pool.restarts == 1
        assert pool.reset(0, tasks[0]).task  # the restarted worker serves again
    time.sleep(1.0)
    assert not java_pids(own_jvms)


def _jvms_of(worker_pid: int) -> list[int]:
    group = subprocess.run(["pgrep", "-g", str(worker_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in group.split() if "java" in open(f"/proc/{p}/cmdline").read()]


def test_slots_share_worker_processes_and_fail_alone(own_jvms):
    """4 slots in 2 processes: each process steps its 2 environments; a dead JVM fails only its own slot, a dead
    process fails its slots and its other slot's episode must be reset before it is stepped again."""
    with EnvPool("twx", 4, workers=2) as pool:
        assert len(pool.worker_pids()) == 2
        tasks = pool.tasks("train")[:4]
        resets = pool.reset_many(list(enumerate(tasks)))
        assert all(not isinstance(r, EnvFailure) for r in resets)
        plans = [pool.expert_actions(s) for s in range(4)]
        res = pool.step_many([(s, plans[s][0]) for s in range(4)])
        assert all(not isinstance(r, EnvFailure) for r in res)
        # slots 0 and 2 live in worker 0, each with its own JVM
        jvms = _jvms_of(pool.worker_pids()[0])
        assert len(jvms) == 2
        os.kill(jvms[0], signal.SIGKILL)
        time.sleep(0.3)
        res = pool.step_many([(s, "look around") for s in range(4)])
        assert sum(isinstance(r, EnvFailure) for r in res) == 1 and pool.restarts == 1
        failed = next(s for s, r in enumerate(res) if isinstance(r, EnvFailure))
        assert failed in (0, 2) and not isinstance(pool.reset(failed, tasks[failed]), EnvFailure)
        # now kill worker 1 itself (slots 1 and 3) while only slot 1 is called
        os.killpg(pool.worker_pids()[1], signal.SIGKILL)
        time.sleep(0.3)
        assert isinstance(pool.step_many([(1, "look around")])[0], EnvFailure)
        lost = pool.step_many([(3, "look around")])[0]
        assert isinstance(lost, EnvFailure) and "lost" in lost.reason
        assert not isinstance(pool.reset(3, tasks[3]), EnvFailure)
        assert not isinstance(pool.step_many([(3, "look around")])[0], EnvFailure)
        sibling = 2 if failed == 0 else 0  # shared a process with the dead JVM, kept its episode throughout
        assert not isinstance(pool.step_many([(sibling, "look around")])[0], EnvFailure)
    time.sleep(1.0)
    assert not java_pids(own_jvms)


def _jvm_tool_options(worker_pid: int) -> str | None:
    (jvm,) = _jvms_of(worker_pid)
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{jvm}/environ").read().split("\0") if "=" in kv)
    return env.get("JAVA_TOOL_OPTIONS")


def test_crowded_pools_start_jvms_with_the_quick_compiler_only(monkeypatch):
    from steptune.envs.pool import default_jvm_options
    from steptune.envs.registry import make_env

    CROWDED_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"
    cores = os.cpu_count()
    twx, sciworld = make_env("twx"), make_env("sciworld")  # neither starts a simulator
    assert default_jvm_options(twx, cores) == "" and default_jvm_options(twx, cores + 1) == CROWDED_JVM_OPTIONS
    # world-building resets want the optimizing compiler; fewer GC and compiler threads instead
    assert default_jvm_options(sciworld, cores + 1) == "-XX:+UseSerialGC -XX:CICompilerCount=2"
    assert default_jvm_options(sciworld, cores) == ""
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xmx512m")  # the user's own options are kept, after ours
    with EnvPool("twx", cores + 1) as crowded, EnvPool("twx", 1) as roomy:
        for pool in (crowded, roomy):
            pool.reset(0, pool.tasks("train")[0])  # the simulator starts its JVM
        assert _jvm_tool_options(crowded.worker_pids()[0]) == f"{JVM_LOG_TO_STDERR} {CROWDED_JVM_OPTIONS} -Xmx512m"
        assert _jvm_tool_options(roomy.worker_pids()[0]) == f"{JVM_LOG_TO_STDERR} -Xmx512m"


def test_a_jvm_warning_at_startup_does_not_fail_the_simulator(monkeypatch):
    """py4j reads the gateway's port from the JVM's first line on stdout; a JVM warning used to come first there (a
    locked /tmp/hsperfdata file failed one quickstart test episode so). Here a user's -XX:+UseLargePages on a
    machine without large pages makes the JVM warn at startup."""
    plain = {k: v for k, v in os.environ.items() if k != "JAVA_TOOL_OPTIONS"}  # in-process simulators set it
    warning = subprocess.run(["java", "-XX:+UseLargePages", "-version"], capture_output=True, text=True,
                             env=plain).stdout
    if "warning" not in warning:
        pytest.skip("this machine's JVM does not warn about -XX:+UseLargePages (it has large pages)")
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-XX:+UseLargePages")
    with EnvPool("twx", 1, {"game": "coin"}) as pool:
        reset = pool.reset(0, pool.tasks("seen")[0])
        assert not isinstance(reset, EnvFailure), reset
        assert "coin" in reset.task


KILLED_PARENT = """
import sys, time
from steptune.envs.pool import EnvPool
pool = EnvPool("twx", 2)
for i, t in enumerate(pool.tasks("train")[:2]):
    pool.reset(i, t)
print("ready", flush=True)
if sys.argv[1] == "raise":
    raise RuntimeError("boom")
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["raise", "sigterm", "sigkill"])
def test_no_process_left_after_error_or_kill(how, own_jvms):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, how], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    if how != "raise":  # (raising, the parent may be closing its pool already)
        assert len(java_pids(own_jvms)) == 2  # the parent's pool's two JVMs, found by the tag
    if how != "raise":
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    proc.wait(timeout=30)
    for _ in range(50):
        if not java_pids(own_jvms):
            break
        time.sleep(0.2)
    assert not java_pids(own_jvms)
