"""The recovery benchmark's injected error: every method meets the same mistake at the same point, then must carry
on alone. The rollout loop (steptune.agent.rollout) executes it; its metrics are steptune.evaluation.recovery.

The rule (what `steptune eval --inject-error` does to each episode):
1. **Where.** The error comes at agent step `k`: `step` when it is set (1-based), else drawn per task uniformly from
   1..`max_step` by a generator seeded with (`seed`, task id). Steps 1..k-1 are the expert's (the environment's
   expert plan, re-planned every step, with the expert's thoughts as in golden trajectories), so every method
   reaches step k in the same state with the same history. `k` is capped so that at least one expert action is
   left: the error never comes after the task could have been finished.
2. **What** (the error model). A valid action that is not the expert's next action, chosen by the same seeded
   generator among the environment's valid actions in sorted order: one that is nowhere in the expert's remaining
   plan if there is such an action, else one that the plan only takes later (out of order, e.g. the way back
   before the way there). Pure look-ups (`look`, `inventory`, `examine`, ...) are left out: they change nothing,
   so they are no mistake to recover from. Where the environment lists no valid actions, or none qualifies, the
   fixed invalid action `INVALID_ACTION`.
3. **How.** The injected action is executed and stays in the agent's history as if the agent had written it, with
   the neutral thought `NEUTRAL_THOUGHT` (step kind "injected", weight 0). Then the agent continues on its own.
So the same seed gives the same injected steps and actions for every model (given a deterministic expert).
"""

from __future__ import annotations

import hashlib
import random

from pydantic import BaseModel, ConfigDict, Field

from steptune.envs.base import TaskRef

NEUTRAL_THOUGHT = "I will try this."
INVALID_ACTION = "take the invisible key"  # no environment here has one; a plausible-looking invalid action
LOOKUPS = ("look", "inventory", "examine", "read", "task", "check valid actions", "wait", "score")


class InjectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int | None = Field(1, ge=1)  # inject at this agent step; None: draw per task from 1..max_step
    max_step: int = Field(3, ge=1)
    seed: int = 0


def _rng(cfg: InjectionConfig, task: TaskRef) -> random.Random:
    # a stable digest (Python's str hash changes per process), independent of the model and the batch
    digest = hashlib.sha256(f"{cfg.seed}|{task.id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def injection_step(cfg: InjectionConfig, task: TaskRef) -> int:
    return cfg.step if cfg.step is not None else _rng(cfg, task).randint(1, cfg.max_step)


def injected_error(cfg: InjectionConfig, task: TaskRef, valid: list[str] | None, plan: list[str]) -> tuple[str, str]:
    """(action, "off_plan" | "invalid") for the task's state, per the error model above."""
    plan = [" ".join(a.split()) for a in plan]
    acts = sorted(a for a in valid or [] if not a.startswith(LOOKUPS) and " ".join(a.split()) != plan[0])
    nowhere = [a for a in acts if " ".join(a.split()) not in plan]
    rng = _rng(cfg, task)
    rng.random()  # the first draw is the step's; keep the two independent of whether `step` is fixed
    if nowhere or acts:
        return rng.choice(nowhere or acts), "off_plan"
    return INVALID_ACTION, "invalid"
