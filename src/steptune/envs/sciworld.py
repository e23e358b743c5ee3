"""ScienceWorld with the ETO split (train 1,483 / seen 194 / unseen 211 `[task_name, variation]` pairs).

Speed: `ScienceWorldEnv.step` of the library also asks the JVM for look/inventory/task text and enumerates every
valid action-object combination (~100-140 ms a step); we call the server's `step`, `getScore` and
`getCompleted` only (~7 ms). The gold path is generated at `load` (generateGoldPath=True), and we never call the
library's `reset()` afterwards, because a reset after a gold-path load regenerates the gold path (up to 25 s):
each episode is a fresh `load`, which already puts the world at its first move.

Reward = best score reached so far / 100; negative scores (a failed task) count as 0 and end the episode.
Invalid actions get the simulator's own answer ("No known action matches that input.") and `info["invalid"]`.

Expert: `expert_actions()` is the rest of the gold path while the agent has followed it exactly; once the agent
took any other action the expert can no longer tell (None). Mendelian tasks draw random seeds, so a gold path
may not replay to success: `replay_gold` re-loads (regenerating it) up to `retries` times.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from steptune.envs.base import Env, Reset, StepResult, TaskRef

SPLIT_FILES = {"train": "train_indices.json", "seen": "dev_indices.json", "dev": "dev_indices.json",
               "unseen": "test_indices.json", "test": "test_indices.json"}
INVALID_MARK = "No known action matches that input."


@cache
def _eto_file(name: str):
    return json.loads(resources.files("steptune").joinpath("resources/eto_sciworld/" + name).read_text())


class ScienceWorldEnv(Env):
    name = "sciworld"

    def __init__(self, simplifications: str = "easy", heap: str = "512m", step_limit: int = 1000):
        self.simplifications = simplifications
        self.heap = heap
        self.step_limit = step_limit
        self._sw = None  # the JVM starts on the first reset, so listing tasks is free
        self._gold: list[str] = []
        self._taken: list[str] = []
        self._best = 0.0

    def tasks(self, split: str) -> list[TaskRef]:
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r} for sciworld; use train, seen or unseen")
        return [TaskRef(self.name, name, int(var), split) for name, var in _eto_file(SPLIT_FILES[split])]

    def max_steps(self, task: TaskRef) -> int:
        return int(_eto_file("max_steps.json").get(task.name, 30))

    def _server(self):
        if self._sw is None:
            import os

            # the library launches java itself; the heap flag travels through JAVA_TOOL_OPTIONS
            opts = os.environ.get("JAVA_TOOL_OPTIONS", "")
            if "-Xmx" not in opts:
                os.environ["JAVA_TOOL_OPTIONS"] = f"{opts} -Xmx{self.heap}".strip()
            from scienceworld import ScienceWorldEnv as _Lib

            self._sw = _Lib("", envStepLimit=self.step_limit)
        return self._sw

    def reset(self, task: TaskRef) -> Reset:
        sw = self._server()
        sw.load(task.name, int(task.variation), self.simplifications, generateGoldPath=True)
        self._gold = [a for a in sw.get_gold_action_sequence() if not a.startswith("ERROR")]
        self._taken = []
        self._best = 0.0
        description = str(sw.server.getTaskDescription())
        first = str(sw.server.step("look around"))
        return Reset(task=description, observation=first, info={"task_id": task.id})

    def step(self, action: str) -> StepResult:
        if self._sw is None:
            raise RuntimeError("step() before reset()")
        server = self._sw.server
        observation = str(server.step(action.strip()))
        score = float(server.getScore())
        failed = score < 0
        self._best = max(self._best, max(score, 0.0))
        self._taken.append(action.strip())
        won = bool(server.getCompleted()) and not failed and score >= 1.0
        done = bool(server.getCompleted()) or failed
        info = {"won": won}
        if observation.strip() == INVALID_MARK:
            info["invalid"] = True
        return StepResult(observation=observation, reward=min(self._best, 1.0), done=done, info=info)

    def gold_path(self) -> list[str]:
        return list(self._gold)

    def expert_actions(self) -> list[str] | None:
        if self._taken != self._gold[:len(self._taken)]:
            return None  # the agent left the gold path; a gold path can't be recomputed mid-episode
        return self._gold[len(self._taken):]

    def close(self) -> None:
        if self._sw is not None:
            try:
                self._sw.close()
            finally:
                self._sw = None
