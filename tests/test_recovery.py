"""The recovery benchmark (error injection: steptune.agent.injection, its metrics: steptune.evaluation.recovery), the
deterministic coin expert and per-episode sampling — on the real TextWorldExpress, with real tiny models."""


import pytest
from _react_model import react_model_fixture

from steptune.agent.injection import (
    INVALID_ACTION,
    NEUTRAL_THOUGHT,
    InjectionConfig,
    injected_error,
)
from steptune.backends import make_backend
from steptune.backends.base import GenerationConfig
from steptune.data.trajectory import Step, Trajectory, load_trajectories
from steptune.envs.base import TaskRef
from steptune.envs.pool import EnvPool
from steptune.envs.twx import TextWorldExpressEnv
from steptune.evaluation.eval import EvalConfig, evaluate
from steptune.evaluation.recovery import injection_summary, reflections_at_test_time
from steptune.synthesis.golden import write_expert_trajectories

FOUR_ROOMS = "numLocations=4,numDistractorItems=0,includeDoors=0"
COIN4 = {"game": "coin", "game_params": FOUR_ROOMS, "max_steps": 8}


@pytest.fixture(scope="module")
def react_model_dir(tmp_path_factory):
    return react_model_fixture(tmp_path_factory)


def test_coin_expert_is_deterministic_explores_and_replans():
    """The simulator's own coin gold path is a random walk that the seed does not fix; ours explores: the nearest room
    not yet visited until the coin is in sight, the same route in every fresh simulator."""
    plans = []
    for _ in range(3):  # three fresh simulators
        env = TextWorldExpressEnv(**COIN4)
        try:
            plans.append([(env.reset(TaskRef("twx", "coin", s, "train")), env.expert_actions())[1] for s in range(8)])
        finally:
            env.close()
    assert plans[0] == plans[1] == plans[2]
    assert any(len(p) > 2 for p in plans[0]) and all(p[-1] == "take coin" for p in plans[0])

    env = TextWorldExpressEnv(**COIN4)
    try:
        for seed in range(8):
            reset = env.reset(TaskRef("twx", "coin", seed, "train"))
            plan = env.expert_actions()
            if "take coin" in env.valid_actions():
                assert plan == ["take coin"]
                continue
            # its first move leads to a room the agent has not been in: one the room's exits name
            assert plan[0].startswith("move ") and plan[0].removeprefix("move ").capitalize() in reset.observation
            wrong = next(a for a in env.valid_actions() if a.startswith("move ") and a != plan[0])
            assert not env.step(wrong).info["invalid"]
            replanned = env.expert_actions()  # from the room the wrong move led to
            assert replanned != plan
            for action in replanned:
                res = env.step(action)
            assert res.info["won"], (seed, wrong, replanned)
    finally:
        env.close()


def test_two_expert_runs_write_identical_golden_files(tmp_path):
    for name in ("a", "b"):
        write_expert_trajectories("twx", "train", tmp_path / f"{name}.jsonl", limit=12, env_kwargs=COIN4, workers=1,
                                  progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert len(load_trajectories(tmp_path / "a.jsonl")) == 12


def test_valid_actions_through_the_pool():
    with EnvPool("twx", 2, COIN4) as pool:
        reset = pool.reset(1, TaskRef("twx", "coin", 0, "train"))
        valid = pool.valid_actions(1)
        assert "look around" in valid and any(a.startswith("move ") for a in valid)
        assert all(f"move {d}" not in valid or d.capitalize() in reset.observation for d in ("north", "south"))


def test_error_model_prefers_a_valid_off_plan_action():
    task = TaskRef("twx", "coin", 3, "seen")
    cfg = InjectionConfig(seed=5)
    valid = ["inventory", "look around", "move north", "move west", "take coin"]
    action, kind = injected_error(cfg, task, valid, ["take coin"])
    assert kind == "off_plan" and action in ("move north", "move west")
    assert injected_error(cfg, task, valid, ["take coin"]) == (action, kind)  # seeded, not random per call
    assert injected_error(cfg, task, ["look around", "take coin"], ["take coin"]) == (INVALID_ACTION, "invalid")
    # every valid move is somewhere in the plan: one the plan only takes later is still a wrong step now
    assert injected_error(cfg, task, ["move east", "move west"], ["move east", "move west", "take coin"]) == \
        ("move west", "off_plan")
    assert injected_error(cfg, task, None, ["take coin"]) == (INVALID_ACTION, "invalid")


def test_injected_errors_are_executed_and_identical_for_two_models(react_model_dir, tiny_model_dir, tmp_path):
    cfg = {"env": "twx", "splits": ["seen"], "limit": 6, "workers": 2, "max_new_tokens": 32, "env_kwargs": COIN4,
           "inject": InjectionConfig(step=None, max_step=3, seed=1)}
    summaries, runs = [], []
    for name, model in (("react", react_model_dir), ("random", tiny_model_dir)):
        summaries.append(evaluate(EvalConfig(model=str(model), out=str(tmp_path / name), **cfg), progress=False))
        runs.append(sorted(load_trajectories(tmp_path / name / "injected.jsonl"), key=lambda t: t.id))
    for a, b in zip(*runs):
        ia, ib = a.meta["injection"], b.meta["injection"]
        assert (ia["step"], ia["action"], ia["error"]) == (ib["step"], ib["action"], ib["error"])
        k = ia["step"]
        # the same expert prefix and the same injected step, executed, in both models' histories
        assert [(s.action, s.observation, s.kind) for s in a.steps[:k]] == \
               [(s.action, s.observation, s.kind) for s in b.steps[:k]]
        injected = a.steps[k - 1]
        assert injected.kind == "injected" and injected.weight == 0 and injected.thought == NEUTRAL_THOUGHT
        assert all(s.kind == "expert" for s in a.steps[: k - 1]) and all(s.kind == "student" for s in a.steps[k:])
    assert {t.meta["injection"]["step"] for t in runs[0]} != {1}  # drawn per task, not always the first step

    # executed for real: a fresh simulator that replays the prefix and the error sees the same observation
    t = next(t for t in runs[0] if t.meta["injection"]["error"] == "off_plan")
    env = TextWorldExpressEnv(**COIN4)
    try:
        env.reset(TaskRef("twx", "coin", int(t.task_id.rsplit("/", 1)[1]), "seen"))
        for step in t.steps[: t.meta["injection"]["step"]]:
            res = env.step(step.action)
            assert res.observation == step.observation and not res.info["invalid"]
    finally:
        env.close()
    # the summary sits beside the plain figures and agrees with the episodes
    for summary, trajs in zip(summaries, runs):
        s = summary["injection"]["seen"]
        back = [t.meta["injection"]["steps_to_plan"] is not None for t in trajs]
        assert s["injected"] == 6 and s["back_on_plan"] == pytest.approx(100 * sum(back) / 6, abs=0.01)
        assert s["success_rate"] == pytest.approx(100 * sum(t.success for t in trajs) / 6, abs=0.01)


def _ep(i: int, success: bool, injection: dict | None = None, split: str = "seen") -> Trajectory:
    return Trajectory(id=f"{split}:twx/coin/{i}", env="twx", task_id=f"twx/coin/{i}", split=split, task="t",
                      success=success, reward=float(success), steps=[Step(action="take coin")],
                      meta={"injection": injection} if injection else {})


def test_injection_metrics_on_hand_made_episodes():
    normal = [_ep(0, True), _ep(1, True), _ep(2, False), _ep(3, True)]
    inj = lambda n: {"step": 1, "action": "move west", "error": "off_plan", "steps_to_plan": n}  # noqa: E731
    injected = [_ep(0, True, inj(1)), _ep(1, False, inj(None)), _ep(2, True, inj(3)),
                _ep(3, False, {"step": 2, "action": INVALID_ACTION, "error": "invalid", "steps_to_plan": 2}),
                _ep(4, True, inj(2))]  # task 4 has no run without injection: not paired
    s = injection_summary(normal, injected)["seen"]
    assert s["episodes"] == 5 and s["injected"] == 5 and s["off_plan"] == 4
    assert s["success_rate"] == 60.0 and s["paired_episodes"] == 4 and s["success_without"] == 75.0
    assert s["recovery_rate"] == pytest.approx(2 / 3, abs=1e-3)  # 2 of 4 paired with the error, 3 of 4 without
    assert s["back_on_plan"] == 80.0 and s["steps_to_plan"] == 2.0


def test_sampling_depends_on_the_row_seed_not_the_batch(tiny_model_dir):
    backend = make_backend(f"local:{tiny_model_dir}")
    convs = [[{"role": "user", "content": f"Your task is to find the coin in room {i}."}] for i in range(4)]
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, row_seeds=[11, 22, 33, 44])
    batched = backend.complete(convs, gen)
    alone = [backend.complete([c], GenerationConfig(max_new_tokens=12, temperature=1.0, row_seeds=[s]))[0]
             for c, s in zip(convs, gen.row_seeds)]
    assert batched == alone
    reordered = backend.complete(convs[::-1], GenerationConfig(max_new_tokens=12, temperature=1.0,
                                                               row_seeds=gen.row_seeds[::-1]))
    assert reordered[::-1] == batched
    other = backend.complete(convs, GenerationConfig(max_new_tokens=12, temperature=1.0, row_seeds=[1, 2, 3, 4]))
    assert other != batched  # the seed really drives the draw


def test_synthesis_at_temperature_is_identical_across_runs_and_pool_sizes(react_model_dir, tmp_path):
    from steptune.backends import BackendConfig
    from steptune.synthesis.synthesize import SynthesisConfig, synthesize

    outs = []
    for name, workers in (("a", 3), ("b", 3), ("c", 1)):
        out = tmp_path / f"{name}.jsonl"
        synthesize(SynthesisConfig(student=BackendConfig(model=str(react_model_dir)), env="twx", env_kwargs=COIN4, split="train",
                                   limit=5, samples_per_task=2, temperature=0.5, max_new_tokens=32, workers=workers,
                                   out=str(out), seed=3), progress=False)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]  # the same run twice: the same bytes
    assert sorted(outs[0].splitlines()) == sorted(outs[2].splitlines())  # one slot: the same records, in end order
    trajs = load_trajectories(tmp_path / "a.jsonl")
    by_task = {}
    for t in trajs:
        by_task.setdefault(t.task_id, []).append([s.action for s in t.steps])
    assert len(trajs) == 10 and any(a != b for a, b in by_task.values())  # the two samples of a task differ somewhere


def test_reflections_at_test_time_tell_the_agents_own_mistakes_from_the_injected_one():
    def episode(i: int, injected_step: int | None, reflect_at: int, won: bool) -> Trajectory:
        steps = [Step(thought=f"I go on {k}.", action=f"move {k}", observation=f"room {k}") for k in range(4)]
        steps[reflect_at].thought = f"I tried to {steps[reflect_at - 1].action}, but that is not something I can do."
        meta = {"injection": {"step": injected_step, "action": "x"}} if injected_step else {}
        return Trajectory(id=f"e{i}", env="twx", task_id=f"twx/coin/{i}", task="t", steps=steps, reward=float(won),
                          success=won, meta=meta, split="unseen")

    eps = [episode(0, 2, 2, True),  # reflects on step 2, the injected one
           episode(1, None, 1, False),  # lost: counted, not shown
           episode(2, 1, 3, True),  # reflects on its own step 3
           Trajectory(id="e3", env="twx", task_id="twx/coin/3", task="t",
                      steps=[Step(thought="I tried to x.", action="x")])]  # a first step reflects on nothing
    r = reflections_at_test_time(eps)
    assert (r["episodes"], r["with_reflection"], r["succeeded"], r["reflection_steps"]) == (4, 3, 2, 3)
    assert [(e["id"], e["own_mistake"], e["before"]["action"]) for e in r["examples"]] == \
        [("e2", True, "move 2"), ("e0", False, "move 1")]
    assert r["repeated_after_reflection"] == 0  # every action of these episodes is new
    # a reflection that did not stick: the agent later takes the action it reflected on; an injected step that
    # happens to be that action is not the agent's
    again, injected_again = episode(4, None, 1, False), episode(5, None, 1, False)
    again.steps[3].action = injected_again.steps[3].action = "move 0"
    injected_again.steps[3].kind = "injected"
    assert reflections_at_test_time([*eps, again, injected_again])["repeated_after_reflection"] == 1


def test_every_twc_episode_meets_its_injected_error_before_the_game_is_won():
    """TextWorldExpress's TWC gold path goes on with a move after the put that wins. The expert's plan ends at the
    win, so an error drawn for step 3 of a task won in two steps (take, put) comes at step 2, before the winning
    put; with the move left in the plan the expert played the put, and the episode was won with no error at all."""
    from steptune.agent.rollout import run_episodes
    from steptune.backends.base import ChatBackend

    params = "numLocations=2,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0"  # study-smollm2's game
    env = TextWorldExpressEnv(game="twc", game_params=params, max_steps=30)
    two_steps = []
    try:
        for task in env.tasks("seen")[:40]:
            env.reset(task)
            plan = env.expert_actions()
            for i, action in enumerate(plan):  # the whole plan, and only the whole plan, wins
                res = env.step(action)
                assert res.info["won"] == res.done == (i == len(plan) - 1), (task, plan, action)
            if len(plan) == 2:
                two_steps.append(task)
    finally:
        env.close()
    assert len(two_steps) >= 2

    class Looks(ChatBackend):
        def complete(self, conversations, gen):
            return ["Thought: t\nAction: look around"] * len(conversations)

    with EnvPool("twx", 2, {"game": "twc", "game_params": params, "max_steps": 4}, processes=False) as pool:
        episodes = run_episodes(pool, two_steps[:2], Looks(), GenerationConfig(max_new_tokens=16),
                                injection=InjectionConfig(step=3), progress=False)
    for ep in episodes:
        t = ep.trajectory
        assert t.meta["injection"]["step"] == 2 and [s.kind for s in t.steps[:2]] == ["expert", "injected"]
        assert t.steps[0].action.startswith("take ") and not t.success
