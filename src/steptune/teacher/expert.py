"""The expert-grounded teacher: judges student steps against the environment's expert, no LLM needed.

A step is an error when any of these holds:
  * the action was invalid (the environment said so in its info["invalid"], or the output had no action);
  * it is not in the expert's remaining plan (from the state before the step) AND the reward did not rise AND the
    plan from the state it left is no shorter than the plan before it.
An action the plan contains later (a harmless reordering), one that raised the reward, or one that shortened the
expert's remaining plan (another route, as short as the plan's, e.g. the other of two ways round) is not an error.
The correction is the expert's next action from the state the wrong step left (re-planned), so it can be
executed right away; the reflection says what the step did, why it was wrong, and which subgoal of the plan
it missed. Steps taken when the expert cannot tell (plan None) are left unjudged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from steptune.data.trajectory import Critique
from steptune.envs.expert import explain
from steptune.teacher.base import StepToJudge, TeacherContext, TeacherSettings, Verdict, what_i_did

# a plan step that achieves something, not one that goes somewhere: `move X to Y` (ScienceWorld, ALFWorld) is one,
# `move north` (TextWorldExpress) is not
_GOAL_ACTION = re.compile(r"(put|focus on|cook|prepare|eat|slice|use|pour|mix|connect|activate) |move .+ to |click\[buy")


NOT_VALID = "is not a valid action here"  # how an invalid step's error ends (a study counts flags by kind with it)


def _first_sentence(text: str) -> str:
    text = " ".join((text or "").split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m[1] if m else text)[:160]


def _subgoal(plan: list[str]) -> str:
    return next((a for a in plan if _GOAL_ACTION.match(a)), plan[-1] if plan else "finish the task")


@dataclass
class ExpertTeacher:
    """A Teacher (steptune.teacher.base) that asks no model: every verdict costs no request."""

    name: str = "expert"
    uses_expert_plan: bool = True

    def judge(self, steps: list[StepToJudge]) -> list[Verdict]:
        return [self.judge_one(s) for s in steps]

    def judge_one(self, s: StepToJudge) -> Verdict:
        step, plan = s.step, s.plan_before
        if plan is None:
            return Verdict(why_unjudged="the expert has no plan for this state")
        obs = step.observation or ""
        invalid = s.invalid or not step.action
        on_plan = step.action in plan
        progressed = s.plan_after is not None and len(s.plan_after) < len(plan)
        if not invalid and (on_plan or progressed or s.reward_after > s.reward_before or not plan):
            return Verdict(Critique(is_error=False, teacher=self.name))
        fix_plan = s.plan_after if s.plan_after else plan
        if not fix_plan:
            return Verdict(Critique(is_error=True, error="no progress", reason="the expert has no further plan",
                                    teacher=self.name))
        goal = _subgoal(fix_plan)
        did = what_i_did(step.action)
        if invalid:
            error = f"'{step.action or '(no action)'}' {NOT_VALID}"
            reason = f"the environment answered: \"{_first_sentence(obs)}\""
            reflection = (f"{did}, but that is not something I can do here. The goal still needs me to {goal}, "
                          f"so the next useful step is to {fix_plan[0]}.")
        else:
            error = f"'{step.action}' does not advance the task"
            reason = (f"it is not part of the plan and the score did not rise; the plan's next step was "
                      f"'{plan[0]}' and the subgoal is to {goal}")
            # the plan from where the step led may go on the same way (an explorer's next room lies beyond it)
            then = "again" if fix_plan[0] == step.action else "instead"
            reflection = (f"{did}: {_first_sentence(obs)} That does not bring me closer to the goal — what is "
                          f"missing is to {goal}. I should {fix_plan[0]} {then}.")
        return Verdict(Critique(is_error=True, error=error, reason=reason, reflection=reflection,
                                corrected_thought=explain(fix_plan[0], fix_plan[1:], obs),
                                corrected_action=fix_plan[0], teacher=self.name))


class ExpertSettings(TeacherSettings):
    name: Literal["expert"] = "expert"

    def build(self, ctx: TeacherContext) -> tuple[ExpertTeacher, None]:
        return ExpertTeacher(), None
