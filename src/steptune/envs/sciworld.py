"""ScienceWorld with the ETO split (train 1,483 / seen 194 / unseen 211 `[task_name, variation]` pairs).

Speed: the library's `ScienceWorldEnv.step` also asks the JVM for look/inventory/task text and enumerates every
valid action-object combination (~100-140 ms a step); our `step` calls the server's `step`, `getScore` and
`getCompleted` only (~7 ms). The gold path is generated at `load` (generateGoldPath=True), and we never call the
library's `reset()` afterwards, because a reset after a gold-path load regenerates the gold path (up to 25 s):
each episode is a fresh `load`, which already puts the world at its first move. An episode whose expert nobody will
ask for (`reset_without_expert`: a plain evaluation, the student's rollouts) loads without the gold path, about 16x
faster.

Reward = best score reached so far / 100, clipped to 0..1; a negative score (a failed task) counts as 0 and ends
the episode. Invalid actions get the simulator's own answer ("No known action matches that input.") and
`info["invalid"] = True`. The ETO data files ship inside the package (resources/eto_sciworld).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import cache
from importlib import resources

from steptune.envs.base import Env, Reset, StepResult, TaskRef, set_jvm_options
from steptune.envs.prompts import SCIWORLD_INSTRUCTION

SPLIT_FILES = {"train": "train_indices.json", "seen": "dev_indices.json", "dev": "dev_indices.json",
               "unseen": "test_indices.json", "test": "test_indices.json"}
INVALID_MARK = "No known action matches that input."
NO_OPS = frozenset({"look around", "look", "inventory"})  # change nothing, so they never break the gold prefix


@cache
def _eto_file(name: str):
    return json.loads(resources.files("steptune").joinpath("resources/eto_sciworld/" + name).read_text())


def _norm(action: str) -> str:
    return " ".join(action.strip().split())


class ScienceWorldEnv(Env):
    name = "sciworld"
    # More JVMs than cores: a reset builds a whole world, which wants the optimizing compiler (C1 alone made a
    # crowded rollout 25% slower), but every JVM's parallel GC and compiler thread pools fight over the cores.
    # One GC thread and the fewest compiler threads: 16 ScienceWorld JVMs on 2 cores started and warmed up in
    # 94 s instead of 116 s and ran a rollout 19% faster (58 s vs 72 s; benchmarks/rollout_throughput.py
    # --env sciworld --quick, batched part).
    crowded_jvm_options = "-XX:+UseSerialGC -XX:CICompilerCount=2"

    def __init__(self, simplification: str = "easy", max_steps: int | None = None, jar: str | None = None,
                 heap: str = "512m", step_limit: int = 10_000, simplifications: str | None = None,
                 task_types: list[str] | None = None):
        self.simplification = simplifications if simplifications is not None else simplification
        self.task_types = task_types  # None: every task type; else keep these (e.g. the short lifespan tasks)
        self.max_steps_override = max_steps  # None: ETO's per-task limit
        self.jar = jar  # None: the JAR inside the scienceworld wheel
        self.heap = heap
        self.step_limit = step_limit
        self._sw = None  # the JVM starts on the first reset, so listing tasks is free
        self._task: TaskRef | None = None
        self._gold: list[str] | None = []  # None: this episode was reset without the expert and has not built it
        self._stepped: list[str] = []
        self._done_actions: list[str] = []  # valid, state-changing actions taken this episode
        self._best = 0.0

    def tasks(self, split: str) -> list[TaskRef]:
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r} for sciworld; use train, seen or unseen")
        pairs = _eto_file(SPLIT_FILES[split])
        if self.task_types is not None:
            known = {name for name, _ in pairs}
            if unknown := sorted(set(self.task_types) - known):
                raise ValueError(f"unknown ScienceWorld task type(s) {unknown} for split {split!r}; "
                                 f"known: {', '.join(sorted(known))}")
            pairs = [(name, var) for name, var in pairs if name in self.task_types]
        return [TaskRef(self.name, name, int(var), split) for name, var in pairs]

    def instruction(self) -> str:
        return SCIWORLD_INSTRUCTION

    def max_steps(self, task: TaskRef) -> int:
        if self.max_steps_override is not None:
            return int(self.max_steps_override)
        return int(_eto_file("max_steps.json").get(task.name, 30))

    def _server(self):
        if self._sw is None:
            # the library launches java itself; the heap flag travels through JAVA_TOOL_OPTIONS
            heap_set = "-Xmx" in os.environ.get("JAVA_TOOL_OPTIONS", "")
            set_jvm_options("" if heap_set or not self.heap else f"-Xmx{self.heap}")
            from scienceworld import ScienceWorldEnv as _Lib

            self._sw = _Lib("", serverPath=self.jar, envStepLimit=self.step_limit)
        return self._sw

    def reset(self, task: TaskRef) -> Reset:
        return self._load(task, gold_path=True)

    def reset_without_expert(self, task: TaskRef) -> Reset:
        """`reset` without building the gold path, which is most of a load's cost (0.9 of 1.0 s a task, measured on
        24 unseen tasks on this project's 2-core machine). If the expert is asked all the same, the task is loaded
        again with its gold path and the episode's actions are replayed; ScienceWorld's simulator is not fully
        deterministic (loaded twice with the gold path, 12 of 30 tasks differed somewhere along it: objects' order,
        a thermometer's reading), so that rebuilt state can differ in such details."""
        return self._load(task, gold_path=False)

    def _load(self, task: TaskRef, gold_path: bool) -> Reset:
        self._server()
        self._task = task
        description, first = self._start(gold_path)
        self._stepped = []  # every action sent this episode, to rebuild the state if the gold path is built late
        self._done_actions = []
        self._best = 0.0
        return Reset(task=f"{description}\n{first}", observation=first,
                     info={"task_id": task.id, "task_type": task.name})

    def _start(self, gold_path: bool) -> tuple[str, str]:
        """Load this episode's task afresh and take the first look: (task description, first observation)."""
        sw, task = self._sw, self._task
        sw.load(task.name, int(task.variation), self.simplification, generateGoldPath=gold_path)
        self._gold = None
        if gold_path:
            self._gold = [_norm(a) for a in sw.get_gold_action_sequence() if not a.startswith("ERROR")]
        return str(sw.server.getTaskDescription()), str(sw.server.step("look around"))

    def _gold_path(self) -> list[str]:
        if self._gold is None and self._sw is not None:  # reset without the expert: rebuild the state with it
            self._start(gold_path=True)
            for action in self._stepped:
                self._sw.server.step(action)
        return self._gold or []

    def step(self, action: str) -> StepResult:
        if self._sw is None:
            raise RuntimeError("step() before reset()")
        action = _norm(action)
        server = self._sw.server
        observation = str(server.step(action))  # the raw server step: no valid-action enumeration
        self._stepped.append(action)
        score = float(server.getScore())  # 0..1 (the library's step multiplies by 100)
        invalid = observation.strip() == INVALID_MARK
        if not invalid and action not in NO_OPS:
            self._done_actions.append(action)
        failed = score < 0
        self._best = min(1.0, max(self._best, score, 0.0))
        won = not failed and score >= 1.0
        done = bool(server.getCompleted()) or failed or won
        return StepResult(observation=observation, reward=self._best, done=done,
                          info={"invalid": invalid, "won": won, "lost": failed})

    def valid_actions(self) -> list[str] | None:
        """ScienceWorld's valid action-object combinations (the JVM enumerates ~900 of them: ~100 ms)."""
        if self._sw is None:
            return None
        return sorted({_norm(a) for a in self._sw.get_valid_action_object_combinations()})

    def gold_path(self) -> list[str]:
        return list(self._gold_path())

    def expert_actions(self) -> list[str] | None:
        """The expert's remaining plan (first = next action), or None.

        1. On the gold path: if the valid, non-no-op actions taken so far (`look around`, `look` and
           `inventory` ignored, invalid actions ignored) are a prefix of the gold path with the same actions
           removed, the rest of that gold path.
        2. Off the gold path (best effort, not a true re-plan: ScienceWorld cannot plan mid-episode): the gold
           actions not yet executed (multiset difference, gold order kept), starting from the first one that is
           a currently valid action (asks the JVM for the valid-action list, ~100 ms, only here); None when no
           remaining gold action is valid now.
        """
        gold = [a for a in self._gold_path() if a not in NO_OPS]
        taken = self._done_actions
        if taken == gold[:len(taken)]:
            return gold[len(taken):]
        left, remaining = Counter(taken), []
        for a in gold:
            if left[a] > 0:
                left[a] -= 1
            else:
                remaining.append(a)
        if not remaining or self._sw is None:
            return None
        valid = {_norm(a) for a in self._sw.get_valid_action_object_combinations()}
        start = next((i for i, a in enumerate(remaining) if a in valid), None)
        return None if start is None else remaining[start:]

    def close(self) -> None:
        if self._sw is not None:
            try:
                self._sw.close()
            finally:
                self._sw = None
