"""The expert-grounded teacher: judges student steps against the environment's expert, no LLM needed.

A step is an error when any of these holds:
  * the action was invalid (the environment did not understand it, or the output had no action);
  * it is not in the expert's remaining plan (from the state before the step) AND the reward did not rise.
An action the plan contains later (a harmless reordering) or one that raised the reward is not an error.
The correction is the expert's next action from the state the wrong step left (re-planned), so it can be
executed right away; the reflection says what the step did, why it was wrong, and which subgoal of the plan
it missed. Steps taken when the expert cannot tell (plan None) are left unjudged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from steptune.agent.policy import INVALID_FORMAT_OBSERVATION
from steptune.data.trajectory import Critique, Step
from steptune.envs.expert import explain

_GOAL_VERBS = ("put ", "move ", "focus on ", "cook ", "prepare ", "eat ", "slice ", "use ", "pour ", "mix ",
               "connect ", "activate ", "click[buy")
_INVALID_HINTS = ("not sure what you mean", "unknown action", "no known action", "can't", "cannot",
                  "nothing happens", "invalid")


def _first_sentence(text: str) -> str:
    text = " ".join((text or "").split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m[1] if m else text)[:160]


def _subgoal(plan: list[str]) -> str:
    return next((a for a in plan if a.startswith(_GOAL_VERBS)), plan[-1] if plan else "finish the task")


@dataclass
class ExpertTeacher:
    """JudgeFn for run_episodes (a batch of (episode, step, plan before the step) → critiques)."""

    name: str = "expert"
    wants_expert_plan: bool = True
    wants_plan_after: bool = True
    calls: int = 0
    flagged: int = 0
    unjudged: int = 0

    def __call__(self, batch) -> list[Critique | None]:
        return [self.judge(ep, step, plan) for ep, step, plan in batch]

    def judge(self, ep, step: Step, plan: list[str] | None) -> Critique | None:
        self.calls += 1
        before, after = ep.reward_before, ep.trajectory.reward
        if plan is None:
            self.unjudged += 1
            return None
        obs = step.observation or ""
        invalid = not step.action or obs == INVALID_FORMAT_OBSERVATION or any(h in obs.lower() for h in _INVALID_HINTS)
        on_plan = step.action in plan
        if not invalid and (on_plan or after > before or not plan):
            return Critique(is_error=False, teacher=self.name)
        self.flagged += 1
        fix_plan = ep.expert_plan_after if ep.expert_plan_after else plan
        if not fix_plan:
            return Critique(is_error=True, error="no progress", reason="the expert has no further plan",
                            teacher=self.name)
        goal = _subgoal(fix_plan)
        did = f"I tried to {step.action}" if step.action else "I did not give a valid action"
        if invalid:
            error = f"'{step.action or '(no action)'}' is not a valid action here"
            reason = f"the environment answered: \"{_first_sentence(obs)}\""
            reflection = (f"{did}, but that is not something I can do here. The goal still needs me to {goal}, "
                          f"so the next useful step is to {fix_plan[0]}.")
        else:
            error = f"'{step.action}' does not advance the task"
            reason = (f"it is not part of the plan and the score did not rise; the plan's next step was "
                      f"'{plan[0]}' and the subgoal is to {goal}")
            reflection = (f"{did}: {_first_sentence(obs)} That does not bring me closer to the goal — what is "
                          f"missing is to {goal}. I should {fix_plan[0]} instead.")
        return Critique(is_error=True, error=error, reason=reason, reflection=reflection,
                        corrected_thought=explain(fix_plan[0], fix_plan[1:], obs), corrected_action=fix_plan[0],
                        teacher=self.name)

    def stats(self) -> dict[str, int]:
        return {"teacher_calls": self.calls, "flagged": self.flagged, "unjudged": self.unjudged}
