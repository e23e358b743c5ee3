"""The environment interface everything else is written against (in the spirit of Gymnasium).

An environment lists the tasks of a split, resets to one task (→ instruction-free task text + first
observation), steps an action (→ observation, reward, done, info) and, where it has one, names the
expert's next action. Reward is always in 0..1 (ScienceWorld: best score so far / 100).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

# py4j reads the gateway's port from the first line the JVM writes on stdout, and the JVM writes its own warnings
# there too (a /tmp/hsperfdata file another process holds, -XX:+UseLargePages without large pages): such a warning
# failed the simulator's start ("invalid literal for int()"). The simulators' JVMs log to stderr instead.
JVM_LOG_TO_STDERR = "-Xlog:disable -Xlog:all=warning:stderr"


def set_jvm_options(extra: str = "") -> None:
    """Before a simulator library launches its JVM (it reads JAVA_TOOL_OPTIONS): the log off stdout, ahead of the
    options already set (a user's own come later and win); `extra` last."""
    opts = os.environ.get("JAVA_TOOL_OPTIONS", "")
    if JVM_LOG_TO_STDERR not in opts:
        opts = f"{JVM_LOG_TO_STDERR} {opts}"
    os.environ["JAVA_TOOL_OPTIONS"] = f"{opts} {extra}".strip()


@dataclass(frozen=True)
class TaskRef:
    """One episode of an environment: e.g. ('sciworld', 'task-1-boil', 21, 'seen')."""

    env: str
    name: str  # task type / game name
    variation: int | str  # variation, seed or game file
    split: str = "train"

    @property
    def id(self) -> str:
        return f"{self.env}/{self.name}/{self.variation}"


@dataclass
class Reset:
    task: str  # the task description shown to the agent (goal + first observation)
    observation: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    observation: str
    reward: float  # 0..1, cumulative episode score so far (not a delta)
    done: bool
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"invalid": True, "won": True}


class Env(ABC):
    name: str = ""
    max_steps_default: int = 30
    # JVM options (JAVA_TOOL_OPTIONS) for a pool with more of this env's simulators than CPU cores
    crowded_jvm_options: str = ""
    # the same task and actions reach the same state again (the Monte-Carlo teacher replays episodes to their states;
    # it refuses an environment that says False, and reports any replay whose observations differ)
    replays_exactly: bool = True

    @abstractmethod
    def tasks(self, split: str) -> list[TaskRef]: ...

    @abstractmethod
    def reset(self, task: TaskRef) -> Reset: ...

    def reset_without_expert(self, task: TaskRef) -> Reset:
        """`reset` for an episode whose expert plan nobody is expected to ask for (a plain evaluation, the Monte-Carlo
        teacher's rollouts): an environment whose expert costs at reset time may skip that work and build the plan
        on first use instead. The same as `reset` unless the environment overrides it."""
        return self.reset(task)

    @abstractmethod
    def step(self, action: str) -> StepResult: ...

    @abstractmethod
    def instruction(self) -> str:
        """The prompt that explains the environment to the agent (action list, format rules)."""

    def max_steps(self, task: TaskRef) -> int:
        return self.max_steps_default

    def valid_actions(self) -> list[str] | None:
        """The actions the simulator accepts in the current state, or None where it keeps no such list."""
        return None

    def expert_actions(self) -> list[str] | None:
        """The expert's remaining plan from the current state (first = next action), or None if the env
        has no expert here. Used by expert trajectories and the expert-grounded teacher."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
