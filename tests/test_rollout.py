"""The policy's prompt (steptune.data.prompt) and the batched rollout loop (steptune.agent.rollout), on real
TextWorldExpress with real tiny models."""

import pytest
from _react_model import react_model_fixture
from _twx_pool import twx_pool

from steptune.data.prompt import build_conversation
from steptune.agent.rollout import RolloutTotals, repeating, run_episodes
from steptune.backends.base import ChatBackend, GenerationConfig
from steptune.backends.local import LocalBackend
from steptune.data.react import INVALID_FORMAT_OBSERVATION
from steptune.data.trajectory import Critique, Step, Trajectory
from steptune.envs.base import TaskRef
from steptune.evaluation.eval import summarize
from steptune.evaluation.recovery import ends_repeating
from steptune.teacher.base import Verdict


@pytest.fixture(scope="module")
def react_model_dir(tmp_path_factory):
    return react_model_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def pool():
    p = twx_pool(4)
    yield p
    p.close()


def _traj(n_steps: int) -> Trajectory:
    steps = [Step(thought=f"thought {i} " * 10, action=f"act {i}", observation=f"obs {i} " * 10, kind="student")
             for i in range(n_steps)]
    return Trajectory(id="t", env="twx", task_id="twx/coin/0", instruction="INSTR", task="TASK", steps=steps)


def test_conversation_alternates_and_ends_with_last_observation():
    conv, cut = build_conversation(_traj(3), example="EXAMPLE")
    assert not cut
    assert [m["role"] for m in conv] == ["user"] + ["assistant", "user"] * 3
    assert conv[0]["content"].startswith("INSTR") and "EXAMPLE" in conv[0]["content"] and "TASK" in conv[0]["content"]
    assert conv[1]["content"] == "Thought: " + "thought 0 " * 10 + "\nAction: act 0"
    assert conv[-1]["content"].startswith("Observation: obs 2")


def test_truncation_keeps_head_and_most_recent_steps():
    full, _ = build_conversation(_traj(10))
    conv, cut = build_conversation(_traj(10), max_context_tokens=150)
    assert cut and len(conv) < len(full)
    assert conv[0] == full[0] and conv[-1] == full[-1] and conv[1]["role"] == "assistant"
    from steptune.data.prompt import TRUNCATION_BLOCK, approx_token_count

    assert approx_token_count(conv) <= 150
    dropped = (len(full) - len(conv)) // 2
    assert dropped % TRUNCATION_BLOCK == 0  # whole blocks of steps, and no more blocks than needed
    assert approx_token_count(full[:1] + full[1 + 2 * (dropped - TRUNCATION_BLOCK):]) > 150


def test_truncated_history_starts_at_the_same_step_for_several_turns():
    """What lets a prefix KV cache serve truncated prompts: each turn's prompt extends the previous one."""
    firsts = []
    for n in range(10, 22):
        conv, cut = build_conversation(_traj(n), max_context_tokens=400)
        assert cut
        firsts.append(conv[1]["content"])
    runs = [firsts[i] == firsts[i - 1] for i in range(1, len(firsts))]
    assert sum(runs) >= len(runs) // 2  # the first kept step moves once every few turns, not every turn


def test_truncation_drops_the_fewest_blocks_and_counts_tokens_rarely_turn_after_turn():
    """The search (from the previous turn's cut) finds what dropping block after block finds."""
    from steptune.data.prompt import TRUNCATION_BLOCK, approx_token_count

    dropped, counts, turns = 0, 0, 0
    for n in range(8, 60):
        full, _ = build_conversation(_traj(n))
        blocks = 0
        while approx_token_count(full[:1] + full[1 + 2 * TRUNCATION_BLOCK * blocks:]) > 400 and \
                1 + 2 * TRUNCATION_BLOCK * blocks < len(full):
            blocks += 1
        expected = full[:1] + full[1 + 2 * TRUNCATION_BLOCK * blocks:]

        def count(conv):
            nonlocal counts
            counts += 1
            return approx_token_count(conv)

        conv, cut = build_conversation(_traj(n), max_context_tokens=400, count_tokens=count, dropped_before=dropped)
        assert conv == expected and cut == (blocks > 0)
        dropped = n - sum(m["role"] == "assistant" for m in conv)
        turns += 1
    assert counts <= 2 * turns  # one count on most turns (a linear scan needs a dozen by the end)


def test_rollout_solves_games_and_records_trajectories(react_model_dir, pool):
    backend = LocalBackend(react_model_dir)
    totals = RolloutTotals()
    finished = []
    tasks = pool.tasks("unseen")[:6]
    eps = run_episodes(pool, tasks, backend, GenerationConfig(max_new_tokens=40), progress=False,
                       on_episode_end=finished.append, totals=totals)
    assert [e.task for e in eps] == tasks and len(finished) == 6
    assert sum(e.success for e in eps) >= 4  # the trained policy plays coin: look around, take coin
    for e in eps:
        assert e.trajectory.id == f"unseen:{e.task.id}" and e.trajectory.meta["steps_taken"] == e.steps_taken
        assert all(s.kind == "student" and s.observation is not None for s in e.trajectory.steps)
        assert e.steps_taken <= pool.max_steps(e.task)
    assert totals.agent_steps == sum(e.steps_taken for e in eps) and totals.model_calls >= 2


def test_batched_rollout_matches_one_at_a_time(tiny_model_dir, react_model_dir):
    """Left padding + batching must not change greedy decisions."""
    tasks = [TaskRef("twx", "coin", seed, "unseen") for seed in range(4)]
    gen = GenerationConfig(max_new_tokens=24)
    for model in (react_model_dir, tiny_model_dir):
        backend = LocalBackend(model)
        batched_pool, single_pool = twx_pool(4), twx_pool(1)
        try:
            batched = run_episodes(batched_pool, tasks, backend, gen, progress=False)
            single = run_episodes(single_pool, tasks, backend, gen, progress=False)
        finally:
            batched_pool.close()
            single_pool.close()
        for b, s in zip(batched, single):
            assert b.trajectory.steps == s.trajectory.steps and b.reward == s.reward


def test_invalid_outputs_get_format_observation_and_are_counted(tiny_model_dir, pool):
    # A random-init model writes no "Action:" line: every turn is invalid, none crashes the loop.
    eps = run_episodes(pool, pool.tasks("seen")[:2], LocalBackend(tiny_model_dir), GenerationConfig(max_new_tokens=8),
                       progress=False)
    for e in eps:
        assert e.steps_taken == pool.max_steps(e.task) and e.invalid_actions == e.steps_taken
        assert all(s.observation == INVALID_FORMAT_OBSERVATION for s in e.trajectory.steps)
        assert e.trajectory.meta["invalid_actions"] == e.steps_taken and not e.success


class Insists(ChatBackend):
    """Takes the coin at its first turn, then something the game refuses, always the same."""

    def complete(self, conversations, gen):
        return ["Thought: t\nAction: " + ("take coin" if len(c) == 1 else "put coin in box") for c in conversations]


def test_max_repeats_ends_an_episode_that_repeats_one_refused_action():
    tasks = [TaskRef("twx", "coin", seed, "unseen") for seed in range(3)]
    pool = twx_pool(2, max_steps=12, game_params="numLocations=2,includeDoors=0")  # the coin may be a room away
    try:
        played = run_episodes(pool, tasks, Insists(), GenerationConfig(max_new_tokens=8), progress=False)
        ended = run_episodes(pool, tasks, Insists(), GenerationConfig(max_new_tokens=8), progress=False,
                             max_repeats=4)
    finally:
        pool.close()
    lost = [i for i, e in enumerate(played) if not e.success]
    assert lost  # a coin in the other room: "take coin" fails, and so does every turn after it
    for i, (p, e) in enumerate(zip(played, ended)):
        if p.success:  # won at its first step: nothing to repeat
            assert e.trajectory.steps == p.trajectory.steps and "stopped" not in e.trajectory.meta
            continue
        assert p.steps_taken == 12 and "stopped" not in p.trajectory.meta
        assert e.trajectory.steps == p.trajectory.steps[:e.steps_taken] and not e.success
        assert e.trajectory.meta["stopped"] == "repeating" and ends_repeating(e.trajectory)
        assert e.steps_taken == 5  # "take coin" refused, then the same refused put 4 times
    assert summarize([e.trajectory for e in ended])["overall"]["stopped_repeating"] == len(lost)
    assert summarize([e.trajectory for e in played])["overall"]["stopped_repeating"] == 0


def test_repeating_needs_one_action_with_one_observation():
    same = [Step(thought="t", action="put coin in box", observation="You can't do that.") for _ in range(3)]
    assert repeating(same, 3) and not repeating(same, 4)
    moved = same[:2] + [Step(thought="t", action="put coin in box", observation="Done.")]
    assert not repeating(moved, 3)
    other = same[:2] + [Step(thought="t", action="look around", observation="You can't do that.")]
    assert not repeating(other, 3)


def test_env_failure_is_recorded_and_other_episodes_continue(react_model_dir, pool, capsys):
    tasks = [TaskRef("twx", "coin", "broken", "seen"), *pool.tasks("seen")[:2]]
    eps = run_episodes(pool, tasks, LocalBackend(react_model_dir), GenerationConfig(max_new_tokens=40), progress="eval")
    assert eps[0].failure.startswith("env reset: ") and "broken" in eps[0].failure and eps[0].trajectory.meta["failure"] == eps[0].failure
    assert all(e.failure is None and e.steps_taken > 0 for e in eps[1:])
    # said on the console, not only in the records
    assert "eval  warning: 1 of 3 episodes failed and count as failures (first: env reset: " in capsys.readouterr().err


def test_a_simulator_that_died_between_episodes_costs_no_episode(react_model_dir):
    """Its reset fails (the worker replaces it); one more reset starts the episode: a passing fault is not a lost
    test episode."""
    import os
    import signal
    import subprocess

    with twx_pool(1) as pool:
        task = pool.tasks("seen")[0]
        pool.reset(0, task)  # the simulator's JVM starts
        group = subprocess.run(["pgrep", "-g", str(pool.worker_pids()[0])], capture_output=True, text=True).stdout
        (jvm,) = [int(p) for p in group.split() if "java" in open(f"/proc/{p}/cmdline").read()]
        os.kill(jvm, signal.SIGKILL)
        (ep,) = run_episodes(pool, [task], LocalBackend(react_model_dir), GenerationConfig(max_new_tokens=40),
                             progress=False)
        assert ep.failure is None and ep.steps_taken > 0
        assert pool.restarts == 1  # the dead simulator was found and replaced, once


def test_judge_turns_wrong_steps_into_error_plus_executed_reflection(react_model_dir):
    seen = []

    class FirstMoveIsWrong:  # a Teacher (steptune.teacher.base)
        name = "test"
        uses_expert_plan = True

        def judge(self, steps):
            out = []
            for s in steps:
                seen.append((s.task, s.step.action, s.plan_before))
                if not s.history and not s.done:  # call every first move wrong, whatever it was
                    out.append(Verdict(Critique(is_error=True, error="wasted a move",
                                                reflection="I should follow the plan.",
                                                corrected_thought="Next is the expert's step.",
                                                corrected_action=s.plan_before[0])))
                else:
                    out.append(Verdict())
            return out

    # Four rooms: the coin is usually out of sight, so a first move rarely ends the game.
    pool = twx_pool(3, max_steps=6, game_params="numLocations=4,includeDoors=0")
    try:
        eps = run_episodes(pool, pool.tasks("seen")[:3], LocalBackend(react_model_dir),
                           GenerationConfig(max_new_tokens=40), teacher=FirstMoveIsWrong(), progress=False)
    finally:
        pool.close()
    assert seen and all(plan for _, _, plan in seen)  # expert plans were fetched before stepping
    corrected = [e for e in eps if e.trajectory.steps[0].kind == "error"]
    assert corrected, "no first move was left open to correct"
    for e in corrected:
        kinds = [(s.kind, s.weight) for s in e.trajectory.steps]
        assert kinds[:2] == [("error", 0), ("reflection", 1)] and all(k == ("student", 1) for k in kinds[2:])
        err, fix = e.trajectory.steps[:2]
        assert err.critique.error == "wasted a move" and err.observation  # the wrong step keeps its observation
        first_plan = next(plan for task, _, plan in seen if task == e.task)
        assert fix.thought == "I should follow the plan. Next is the expert's step." and fix.action == first_plan[0]
        assert fix.observation and e.trajectory.n_errors == 1 and e.steps_taken == len(e.trajectory.steps)


def test_long_episodes_are_truncated_and_counted(react_model_dir):
    pool = twx_pool(2, max_steps=5, game_params="numLocations=4,includeDoors=0")
    backend = LocalBackend(react_model_dir)
    try:
        eps = run_episodes(pool, pool.tasks("seen")[:2], backend, GenerationConfig(max_new_tokens=40),
                           max_context_tokens=400, progress=False)
    finally:
        pool.close()
    for e in eps:
        assert e.steps_taken == 5 and e.truncations > 0 and e.trajectory.meta["truncations"] == e.truncations
