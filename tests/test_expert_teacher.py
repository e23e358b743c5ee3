"""The expert-grounded teacher on real TextWorldExpress coin games: what it flags and what it corrects with."""

from steptune.data.trajectory import Step
from steptune.envs.twx import TextWorldExpressEnv
from steptune.teacher.base import StepToJudge
from steptune.teacher.expert import ExpertTeacher

OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def _judge(env: TextWorldExpressEnv, task, actions: list[str]) -> tuple[StepToJudge, object]:
    """Play `actions` from a reset; the last one is the step judged, with the plans before and after it."""
    reset = env.reset(task)
    history = []
    for action in actions[:-1]:
        history.append(Step(thought="", action=action, observation=env.step(action).observation, kind="student"))
    before = env.expert_actions()
    result = env.step(actions[-1])
    step = Step(thought="", action=actions[-1], observation=result.observation, kind="student")
    item = StepToJudge(task=task, task_text=reset.task, history=history, step=step, reward_before=0.0,
                       reward_after=float(result.reward), done=bool(result.done), invalid=bool(result.info["invalid"]),
                       plan_before=before, plan_after=env.expert_actions())
    return item, ExpertTeacher().judge_one(item)


def test_a_step_away_from_the_coin_in_sight_is_corrected_by_going_back():
    """The explorer's route treated a room already seen as explored, so once the agent had left the coin's room the
    plan was empty, and the correction fell back to `take coin` where there is no coin (an invalid action: 42 of
    the quickstart's 628 corrections). The route now leads back to the coin it saw."""
    env = TextWorldExpressEnv(game="coin", game_params="numLocations=4,numDistractorItems=0,includeDoors=0")
    try:
        tasks = []
        for task in env.tasks("train")[:30]:
            env.reset(task)
            if env.expert_actions() == ["take coin"]:
                tasks.append(task)
        assert len(tasks) >= 2  # the coin in the first room is common on 4 rooms
        for task in tasks[:3]:
            env.reset(task)
            away = next(a for a in env.valid_actions() if a.startswith("move "))
            item, verdict = _judge(env, task, [away])
            back = f"move {OPPOSITE[away.removeprefix('move ')]}"
            assert item.plan_after == [back, "take coin"]
            assert verdict.critique.is_error
            assert verdict.critique.corrected_action == back
            assert "what is missing is to take coin" in verdict.critique.reflection
            for action in item.plan_after:  # the correction and the rest of the plan win the game
                result = env.step(action)
                assert not result.info["invalid"], action
            assert result.done and result.reward == 1.0
    finally:
        env.close()


def test_an_off_plan_step_that_shortens_the_plan_is_not_an_error():
    """6 rooms with doors, train game 47: opening the door to the north from the start is not in the plan's words,
    but the plan would open the same door from its other side later, so the plan gets shorter: not an error."""
    env = TextWorldExpressEnv(game="coin", game_params="numLocations=6,numDistractorItems=0,includeDoors=1")
    try:
        task = next(t for t in env.tasks("train") if int(t.variation) == 47)
        item, verdict = _judge(env, task, ["open door to north"])
        assert "open door to north" not in item.plan_before
        assert len(item.plan_after) < len(item.plan_before)
        assert not verdict.critique.is_error
        # the same step judged without the plan after it (the expert could not tell) is flagged as before
        item.plan_after = None
        assert ExpertTeacher().judge_one(item).critique.is_error
    finally:
        env.close()


def test_a_correction_that_repeats_the_step_says_so():
    """4 rooms, train game 117: the plan goes east to the coin; the agent goes north into the corridor, and from
    there the explorer's next room lies further north. The correction repeats the action: the reflection says
    'again', not 'instead', and names the goal, not the move."""
    env = TextWorldExpressEnv(game="coin", game_params="numLocations=4,numDistractorItems=0,includeDoors=0")
    try:
        task = next(t for t in env.tasks("train") if int(t.variation) == 117)
        item, verdict = _judge(env, task, ["move north"])
        assert item.plan_before == ["move east", "take coin"]
        assert verdict.critique.is_error and verdict.critique.corrected_action == "move north"
        assert verdict.critique.reflection.endswith("what is missing is to take coin. I should move north again.")
    finally:
        env.close()
