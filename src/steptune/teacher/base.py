"""What a teacher is to the rollout: it judges a batch of executed student steps and says, per step, what it found
and what it cost (model requests, failed requests, unusable replies), so that the rollout can keep the accounting
on each episode (trajectory meta "teacher_counts") and a resumed synthesis still sums to the whole run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from steptune.data.react import REACT_MAX_NEW_TOKENS
from steptune.data.trajectory import Critique, Step, load_trajectories
from steptune.envs.base import TaskRef


def what_i_did(action: str) -> str:
    """How a built-in teacher's reflection opens, in the agent's voice (the expert's and the MC judge's)."""
    return f"I tried to {action}" if action else "I did not give a valid action"


# a thought that opens like that is a reflection: stage 2 trains STeP to write them, so at test time they show the
# agent noticing its own step (steptune.evaluation.recovery.reflections_at_test_time)
REFLECTION_OPENINGS = ("I tried to ", "I did not give a valid action")


@dataclass
class StepToJudge:
    task: TaskRef
    task_text: str  # the task as the agent saw it
    history: list[Step]  # the episode's steps before this one
    step: Step  # executed: its observation is set
    reward_before: float
    reward_after: float
    done: bool  # the step ended the episode: a correction would not be executed
    # the environment did not accept the action (its info["invalid"]), or the reply had no action to run
    invalid: bool = False
    # only for teachers with uses_expert_plan: the environment expert's remaining plan from the state before the
    # step and from the state the step left (a correction must be valid from there); None: the expert cannot tell
    plan_before: list[str] | None = None
    plan_after: list[str] | None = None


@dataclass
class Verdict:
    critique: Critique | None = None  # None: the step is left unjudged (it stays a plain student step)
    requests: int = 0  # model requests made for this step, repair requests included
    failed_requests: int = 0  # requests that failed for good (HTTP error after the retries, timeout)
    invalid_replies: int = 0  # replies that were no usable judgement
    why_unjudged: str | None = None
    # a Monte-Carlo teacher's cost: the student's rollouts, their model turns, and what went wrong with them
    rollouts: int = 0
    rollout_steps: int = 0
    failed_rollouts: int = 0  # env or model failures; the value is estimated from the others
    replay_diverged: int = 0  # states that replaying the episode's actions did not reach again
    # a judge that scores states (the Monte-Carlo teacher): the value before the step and after it, so the flags at
    # any other margin can be read off the records (steptune.evaluation.judges' margin sweep)
    values: tuple[float, float] | None = None


@runtime_checkable
class Teacher(Protocol):
    name: str
    # True: the rollout fetches the expert's plan before and after every student step (one extra round trip per
    # episode start; afterwards the plan comes back with each step) and passes it in StepToJudge
    uses_expert_plan: bool

    def judge(self, steps: list[StepToJudge]) -> list[Verdict]:
        """One verdict per step, in order. Never raises for a model failure: that is an unjudged, counted step."""
        ...


@dataclass
class TeacherContext:
    """What synthesis hands a teacher's settings to build the teacher from."""

    student: Any  # the student's ChatBackend (the self-teacher judges with it, the MC teacher rolls out with it)
    golden: str | None = None  # golden trajectories (JSONL) a teacher may show as a reference solution
    # environments of the teacher's own: make_pool(n) opens n slots of synthesis's environment (the MC teacher's
    # rollouts); the teacher closes them
    make_pool: Callable[[int], Any] | None = None
    workers: int = 1  # synthesis's concurrent episodes
    seed: int = 0
    max_new_tokens: int = REACT_MAX_NEW_TOKENS  # a student turn's length

    def golden_references(self) -> dict[str, str]:
        """task id → the golden trajectory's actions, one `Action: ...` line each."""
        if not self.golden:
            return {}
        return {t.task_id: "\n".join(f"Action: {s.action}" for s in t.steps) for t in load_trajectories(self.golden)}


class TeacherSettings(BaseModel):
    """A teacher's typed settings (its `name` is the registry key, steptune.teacher.registry); `build` makes the
    teacher, and returns the backend it opened, if any, for synthesis to close."""

    model_config = ConfigDict(extra="forbid")

    name: str

    def build(self, ctx: TeacherContext) -> tuple[Teacher, Any]:
        raise NotImplementedError


COUNT_KEYS = ("judged", "unjudged", "flagged", "corrected", "requests", "failed_requests", "invalid_replies",
              "rollouts", "rollout_steps", "failed_rollouts", "replay_diverged")
MAX_NOTES = 5  # reasons kept per episode for unjudged steps (the counts are complete; the notes are examples)


@dataclass
class TeacherCounts:
    """One episode's teacher accounting, stored in trajectory meta["teacher_counts"]."""

    judged: int = 0
    unjudged: int = 0
    flagged: int = 0  # judged wrong
    corrected: int = 0  # judged wrong and followed by an executed correction
    requests: int = 0
    failed_requests: int = 0
    invalid_replies: int = 0
    rollouts: int = 0
    rollout_steps: int = 0
    failed_rollouts: int = 0
    replay_diverged: int = 0
    notes: list[str] = field(default_factory=list)
    step_values: dict[str, list[float]] = field(default_factory=dict)  # step index → [value before, value after]

    def add(self, v: Verdict, step_index: int) -> None:
        self.requests += v.requests
        self.failed_requests += v.failed_requests
        self.invalid_replies += v.invalid_replies
        self.rollouts += v.rollouts
        self.rollout_steps += v.rollout_steps
        self.failed_rollouts += v.failed_rollouts
        self.replay_diverged += v.replay_diverged
        if v.critique is None:
            self.unjudged += 1
            if v.why_unjudged and len(self.notes) < MAX_NOTES:
                self.notes.append(f"step {step_index + 1}: {v.why_unjudged}"[:300])
        else:
            self.judged += 1
            self.flagged += v.critique.is_error
            if v.values is not None:
                self.step_values[str(step_index)] = [round(x, 4) for x in v.values]

    def as_meta(self) -> dict:
        return {**{k: getattr(self, k) for k in COUNT_KEYS}, **({"notes": self.notes} if self.notes else {}),
                **({"step_values": self.step_values} if self.step_values else {})}
