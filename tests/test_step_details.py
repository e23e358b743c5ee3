"""The details that make this STeP and not another method: which model each method trains from and on which data,
what the expert teacher counts as an error, what counts as success, and what `unmask_errors` trains."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from test_tokenize import trained_runs

from steptune.agent.rollout import run_episodes
from steptune.backends.base import ChatBackend, GenerationConfig
from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.envs.base import Env, Reset, StepResult, TaskRef
from steptune.envs.pool import EnvPool
from steptune.envs.twx import TextWorldExpressEnv
from steptune.models.tiny import train_tokenizer
from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.run import Run
from steptune.teacher.base import StepToJudge
from steptune.teacher.expert import ExpertTeacher
from steptune.training.sft import TrainConfig, build_dataset


def tidy_trajectory() -> Trajectory:
    """A self-reflected trajectory: a student step, a wrong step (weight 0), its reflection, the winning step."""
    steps = [Step(thought="The shirt is out of place.", action="take red shirt", observation="You take the shirt."),
             Step(thought="Maybe the bed.", action="put red shirt on bed", observation="Done.", kind="error",
                  weight=0),
             Step(thought="Wrong: shirts go in the wardrobe.", action="take red shirt", observation="Taken.",
                  kind="reflection"),
             Step(thought="A shirt goes in the wardrobe.", action="put red shirt in wardrobe", observation="You win.")]
    return Trajectory(id="t", env="twx", task_id="twc/1", task="Tidy up: you see a red shirt.",
                      steps=steps, reward=1.0, success=True)


# 1. Which model each method starts from, and on which data ---------------------------------------------------

@pytest.mark.parametrize("source", ["base", "init"])
def test_each_method_trains_from_the_right_model_on_the_right_data(tmp_path, monkeypatch, source):
    """STeP retrains the ORIGINAL base model on D1 ∪ Dr; only the `sequential` ablation continues the stage-1 agent.
    The real TrainConfig of every training stage is captured instead of training (the wiring is what is tested)."""
    model = {"base": {"base": "org/base-llm"}, "init": {"init": {"vocab_size": 256}}}[source]
    run = Run(PipelineConfig(model=model, train={"max_steps": 1}), tmp_path)
    d1, d2, dr = (run.paths.dataset(name) for name in ("d1", "d2", "dr"))
    for path in (d1, d2, dr):
        save_trajectories([tidy_trajectory()], path)
    trained: dict[str, TrainConfig] = {}

    def fake_train(cfg: TrainConfig) -> Path:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True)
        (out / "train_summary.json").write_text("{}")
        trained[out.name] = cfg
        return out

    monkeypatch.setattr("steptune.training.sft.train", fake_train)
    stages = {s.name: s for s in run.stages()}
    names = list(stages)
    for stage in stages.values():
        if stage.name.startswith("train:"):
            stage.fn(stage.config())

    base = str(tmp_path / "models" / "init") if source == "init" else "org/base-llm"
    agent = tmp_path / "models" / "golden_d1"
    expected = {"golden_d1": (base, [d1]), "golden_all": (base, [d1, d2]), "step": (base, [d1, dr]),
                "step_unmasked": (base, [d1, dr]), "sequential": (str(agent), [dr])}
    assert set(trained) == set(expected)
    for method, (start, data) in expected.items():
        cfg = trained[method]
        assert cfg.model == start, method
        assert cfg.data == [str(p) for p in data], method
        assert cfg.output_dir == str(tmp_path / "models" / method)
        assert cfg.unmask_errors is (method == "step_unmasked"), method
        # the stage key names the upstream model, so retraining it re-runs what depends on it
        inputs = stages[f"train:{method}"].inputs
        assert [p for p in inputs if p.parent != tmp_path / "models"] == data, method
        assert (agent in inputs) is (method == "sequential"), method
        assert (tmp_path / "models" / "init" in inputs) is (source == "init"), method
    # the stage-1 agent acts in synthesis; everything trained on Dr comes after it is filtered
    assert agent in stages["synthesize"].inputs
    assert names.index("train:golden_d1") < names.index("synthesize") < names.index("filter")
    assert all(names.index("filter") < names.index(f"train:{m}") for m in ("step", "step_unmasked", "sequential"))


# 2. The expert teacher judges by the plan, not by the reward -------------------------------------------------

def test_expert_teacher_flags_off_plan_steps_and_not_on_plan_ones_on_a_real_game():
    """A real twc game (1 room, 2 items) whose gold path is take brown shirt, take blue T-shirt, open wardrobe,
    put both in the wardrobe. Opening the wardrobe first and re-taking a shirt are on the plan but raise no score:
    not errors. Opening / filling the chest of drawers is off the plan: errors, and only those."""
    actions = ["open wardrobe",  # on plan (later: a harmless reordering), reward stays 0
               "open chest of drawers",  # off plan: error
               "take clean brown shirt",  # on plan, reward rises
               "put clean brown shirt in chest of drawers",  # off plan (wrong place): error
               "take clean brown shirt",  # on the re-planned path, reward stays (the best score is kept)
               "put clean brown shirt in wardrobe"]  # on plan, reward rises
    task = TaskRef("twx", "twc", 0, "train")
    env = TextWorldExpressEnv(game="twc", max_steps=12)  # twc's default: 1 room, 2 items to put away
    teacher = ExpertTeacher()
    verdicts, rewards, history, reward = [], [], [], 0.0
    try:
        task_text = env.reset(task).task
        assert env.expert_actions()[:3] == ["take clean brown shirt", "take clean blue T-shirt", "open wardrobe"]
        for action in actions:
            plan = env.expert_actions()  # the plan from before the step, as the rollout gives it
            res = env.step(action)
            assert not res.info["invalid"] and not res.done, action
            step = Step(thought="", action=action, observation=res.observation, kind="student")
            item = StepToJudge(task=task, task_text=task_text, history=list(history), step=step, reward_before=reward,
                               reward_after=res.reward, done=res.done, plan_before=plan,
                               plan_after=env.expert_actions())
            history.append(step)
            reward = res.reward
            [v] = teacher.judge([item])
            crit = v.critique
            assert v.requests == 0 and v.failed_requests == 0  # no model behind it
            verdicts.append(crit.is_error)
            rewards.append((item.reward_before, item.reward_after))
            if crit.is_error:  # the correction is the expert's next action from where the wrong step left the world
                assert crit.corrected_action == item.plan_after[0]
    finally:
        env.close()
    assert [i for i, err in enumerate(verdicts) if err] == [1, 3]
    assert [a for a, err in zip(actions, verdicts) if err] == ["open chest of drawers",
                                                               "put clean brown shirt in chest of drawers"]
    # the premise: the on-plan steps 0 and 4 did not raise the reward, yet were not flagged
    assert rewards[0] == (0.0, 0.0) and rewards[4] == (0.25, 0.25) and not verdicts[0] and not verdicts[4]


def test_expert_teacher_flags_a_walk_away_from_the_goal_on_a_real_twc_game():
    """TextWorldExpress's TWC gold path ends with a move after the winning put. Where the item and its place are in
    the starting room, walking out along that move is a mistake; it must not pass as a step the plan takes later."""
    params = "numLocations=2,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0"  # study-smollm2's game
    env = TextWorldExpressEnv(game="twc", game_params=params, max_steps=30)
    teacher, judged = ExpertTeacher(), 0
    try:
        for task in env.tasks("train")[:30]:
            task_text = env.reset(task).task
            gold = [a.split()[0] for a in env._env.getGoldActionSequence() if a != "look around"]
            if gold != ["take", "put", "move"]:  # the item and its place in the starting room
                continue
            plan, away = env.expert_actions(), env._env.getGoldActionSequence()[-1]
            res = env.step(away)
            step = Step(thought="", action=away, observation=res.observation, kind="student")
            [v] = teacher.judge([StepToJudge(task=task, task_text=task_text, history=[], step=step, reward_before=0.0,
                                             reward_after=res.reward, done=res.done, plan_before=plan,
                                             plan_after=env.expert_actions())])
            assert v.critique.is_error and v.critique.corrected_action == env.expert_actions()[0], (task, plan)
            judged += 1
    finally:
        env.close()
    assert judged >= 2


# 3. Success means the environment said "won" ------------------------------------------------------------------

SCRIPTS = {  # task name -> (reward, done, won) for each step
    "partial_then_lost": [(0.5, False, False), (0.5, True, False)],
    "partial_out_of_steps": [(0.9, False, False)] * 3,
    "won_below_one": [(0.2, False, False), (0.6, True, True)],
}


class ScriptedScores(Env):
    """A test double of the ENVIRONMENT's scores only: each task replays its row of SCRIPTS."""

    name = "scripted"
    max_steps_default = 3

    def tasks(self, split):
        return [TaskRef(self.name, name, 0, split) for name in SCRIPTS]

    def instruction(self):
        return "Act."

    def reset(self, task):
        self.script = iter(SCRIPTS[task.name])
        return Reset(task="Do the task.", observation="A room.")

    def step(self, action):
        reward, done, won = next(self.script)
        return StepResult("Something happens.", reward, done, {"won": won, "lost": done and not won})


class FollowTheExpert(ChatBackend):
    """A test double of the MODEL only: writes the expert's next action, or `act` where there is no expert."""

    def __init__(self, pool: EnvPool):
        self.pool = pool

    def complete(self, conversations, gen):
        return [f"Thought: next.\nAction: {(self.pool.expert_actions(slot) or ['act'])[0]}"
                for slot in range(len(conversations))]


def test_success_is_the_environments_won_not_the_score(monkeypatch):
    """A partial score without a win is a failure (whether the env ended the episode or the steps ran out); a win is
    a success even when the env scores it below 1."""
    monkeypatch.setattr("steptune.envs.pool.make_env", lambda name, **kw: ScriptedScores())
    with EnvPool("scripted", 1, processes=False) as pool:
        eps = run_episodes(pool, pool.tasks("train"), FollowTheExpert(pool), GenerationConfig(max_new_tokens=16),
                           progress=False)
    got = {ep.task.name: (ep.reward, ep.success, len(ep.trajectory.steps)) for ep in eps}
    assert got == {"partial_then_lost": (0.5, False, 2), "partial_out_of_steps": (0.9, False, 3),
                   "won_below_one": (0.6, True, 2)}


def test_a_real_game_partly_done_is_not_a_success():
    """The real twc game, cut after 4 of its 5 gold steps: one item of two put away scores 0.75 but does not win."""
    task = TaskRef("twx", "twc", 0, "train")
    with EnvPool("twx", 1, {"game": "twc", "max_steps": 4}, processes=False) as pool:
        [ep] = run_episodes(pool, [task], FollowTheExpert(pool), GenerationConfig(max_new_tokens=16), progress=False)
    assert [s.action for s in ep.trajectory.steps] == ["take clean brown shirt", "take clean blue T-shirt",
                                                       "open wardrobe", "put clean brown shirt in wardrobe"]
    assert ep.reward == 0.75 and not ep.done and ep.success is False


# 4. `unmask_errors` trains exactly the error steps as well ---------------------------------------------------

@pytest.mark.parametrize("unmask_errors", [False, True], ids=["step", "step_unmasked"])
def test_unmask_errors_labels_exactly_the_error_steps(tmp_path, unmask_errors):
    """STeP keeps the wrong step in context with no label; the "without masking" ablation trains it too — its own
    text and end-of-turn marker, nothing else."""
    traj = tidy_trajectory()
    data = tmp_path / "dr.jsonl"
    save_trajectories([traj], data)
    tok = train_tokenizer([traj.task] + [s.text() for s in traj.steps] + [s.observation for s in traj.steps], 400)
    cfg = TrainConfig(model="unused", data=[str(data)], output_dir=str(tmp_path / "out"), unmask_errors=unmask_errors)
    dataset, stats = build_dataset(cfg, tok)
    [row] = dataset
    runs = [tok.decode(r) for r in trained_runs(SimpleNamespace(input_ids=row["input_ids"], labels=row["labels"]))]
    error = traj.steps[1]
    assert error.kind == "error" and error.weight == 0
    expected = [s.text() + "<|im_end|>" for s in traj.steps if unmask_errors or s.weight == 1]
    assert runs == expected
    assert (error.text() + "<|im_end|>" in runs) is unmask_errors
    assert error.text() in tok.decode(row["input_ids"])  # masked or not, the wrong step stays in the context
    assert stats["masked_error_steps"] == (0 if unmask_errors else 1)
