"""TextWorldExpress: fast (1,000+ steps/s) text games with gold paths — the environment of CI and the quickstart.

Splits: `train` = the game's train fold, `seen` = its dev fold, `unseen` = its test fold (TWC's test fold uses
objects never seen in training). A task is (game, seed), and each split draws its seeds from its own block
(train 0.., seen `tasks_per_split`.., unseen 2 x `tasks_per_split`..): the folds alone do not separate games — coin
and cookingworld start the same game from one seed in every fold, mapreader often does — so equal seeds would
put evaluation games into the training data. Reward = the game's normalised score (0..1).
"""

from __future__ import annotations

import re

from steptune.envs.base import Env, Reset, StepResult, TaskRef

FOLDS = {"train": "train", "seen": "dev", "dev": "dev", "unseen": "test", "test": "test"}
SEED_BLOCKS = {"train": 0, "dev": 1, "test": 2}  # by fold, in units of tasks_per_split
DEFAULT_PARAMS = {
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0",
    "cookingworld": "numLocations=1,numIngredients=2,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=2,numDistractorItems=0,includeDoors=0",
}
_PUT = re.compile(r"^put (?P<item>.+) (?:in|on) (?P<box>.+)$")


class TextWorldExpressEnv(Env):
    name = "twx"
    # More JVMs than cores: each one's optimizing (C2) compiler would fight the model and its siblings for the
    # cores, and every short-lived JVM pays its warm-up; the C1 compiler alone warms up fast and cheaply. On 2
    # cores with 16 slots, batched rollouts ran 4.26x sequential instead of 2.98x (benchmarks/rollout_throughput.py
    # --quick). (ScienceWorld's world-building resets want C2: see its crowded_jvm_options.)
    crowded_jvm_options = "-XX:TieredStopAtLevel=1"

    def __init__(self, game: str = "twc", game_params: str | None = None, max_steps: int = 20,
                 tasks_per_split: int = 1000):
        self.game = game
        self.game_params = DEFAULT_PARAMS.get(game, "") if game_params is None else game_params
        self.max_steps_default = max_steps
        self.tasks_per_split = tasks_per_split
        self._env = None  # the JVM starts on the first reset, so listing tasks is free
        self._loaded: tuple[str, str] | None = None  # the (game, params) the simulator's generator is set up for
        self._gold: list[str] = []
        self._history: list[str] = []  # actions that changed something (valid ones)
        self._valid: list[str] = []
        self._score = 0.0

    def tasks(self, split: str) -> list[TaskRef]:
        if split not in FOLDS:
            raise ValueError(f"unknown split {split!r} for twx; use train, seen or unseen")
        first = SEED_BLOCKS[FOLDS[split]] * self.tasks_per_split
        return [TaskRef(self.name, self.game, seed, split) for seed in range(first, first + self.tasks_per_split)]

    def reset(self, task: TaskRef) -> Reset:
        if self._env is None:
            from textworld_express import TextWorldExpressEnv as _TWX

            self._env = _TWX(envStepLimit=10_000)
        # The library's reset reloads the game generator whenever it is given a game name (3-5 ms of a 5-6 ms
        # reset); a new game from a seed needs no reload, so it is loaded once per (game, params).
        if self._loaded != (task.name, self.game_params):
            self._env.load(task.name, self.game_params)
            self._loaded = (task.name, self.game_params)
        obs, info = self._env.reset(seed=int(task.variation), gameFold=FOLDS[task.split], generateGoldPath=True)
        self._gold = list(self._env.getGoldActionSequence())
        self._history = []
        self._valid = list(info["validActions"])
        self._score = 0.0
        return Reset(task=f"{info['taskDescription']}\n{obs}", observation=obs, info={"task_type": task.name})

    def step(self, action: str) -> StepResult:
        action = " ".join(action.strip().split())
        invalid = action not in self._valid
        obs, _, done, info = self._env.step(action)
        self._valid = list(info["validActions"])
        if not invalid:
            self._history.append(action)
        self._score = max(self._score, min(1.0, max(0.0, float(info["score"]))))
        won = bool(info["tasksuccess"])
        return StepResult(obs, 1.0 if won else self._score, bool(done) or won,
                          {"invalid": invalid, "won": won, "lost": bool(info["taskfailure"])})

    def max_steps(self, task: TaskRef) -> int:
        return self.max_steps_default

    def expert_actions(self) -> list[str] | None:
        """The expert's plan from the current state.

        While the agent's valid actions are a prefix of the gold path, the rest of the gold path. After a
        divergence, TWC re-plans from the state: for each gold `put X in Y` not yet done, `take X` if it is not
        held, `open Y` if needed, then the put — checked against the currently valid actions. Other games can
        only follow the gold path; after a divergence their expert returns the gold actions not yet done that
        are valid now, or None when none is.
        """
        gold = [a for a in self._gold if a != "look around"]
        done = [a for a in self._history if a != "look around"]
        if done == gold[: len(done)]:
            return gold[len(done):]
        if self.game == "twc":
            return self._replan_twc(gold, done)
        remaining = [a for a in gold if a not in done]
        return remaining if remaining and remaining[0] in self._valid else None

    def _replan_twc(self, gold: list[str], done: list[str]) -> list[str] | None:
        plan: list[str] = []
        for a in gold:
            m = _PUT.match(a)
            if not m:
                continue
            item, box = m["item"], m["box"]
            last_put = max((i for i, d in enumerate(done) if d.startswith(f"put {item} ")), default=-1)
            if last_put >= 0 and done[last_put] == a:
                continue  # already where it belongs
            if f"take {item}" in self._valid:
                plan.append(f"take {item}")
            if f"open {box}" in self._valid and f"open {box}" not in plan:
                plan.append(f"open {box}")
            plan.append(a)
        return plan or None

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self._loaded = None
