"""TextWorldExpress: fast (1,000+ steps/s) text games with gold paths — the environment of CI and the quickstart.

Splits: `train` = the game's train fold, `seen` = its dev fold, `unseen` = its test fold (TWC's test fold uses
objects never seen in training). A task is (game, seed), and each split draws its seeds from its own block
(train 0.., seen `tasks_per_split`.., unseen 2 x `tasks_per_split`..): the folds alone do not separate games — coin
and cookingworld start the same game from one seed in every fold, mapreader often does — so equal seeds would
put evaluation games into the training data. Reward = the game's normalised score (0..1).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from steptune.envs.base import Env, Reset, StepResult, TaskRef, set_jvm_options
from steptune.envs.prompts import TWX_INSTRUCTION

FOLDS = {"train": "train", "seen": "dev", "dev": "dev", "unseen": "test", "test": "test"}
SEED_BLOCKS = {"train": 0, "dev": 1, "test": 2}  # by fold, in units of tasks_per_split
DEFAULT_PARAMS = {
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0",
    "cookingworld": "numLocations=1,numIngredients=2,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=2,numDistractorItems=0,includeDoors=0",
}
_PUT = re.compile(r"^put (?P<item>.+) (?:in|on) (?P<box>.+)$")
_ROOM = re.compile(r"You are in the (?P<room>[^.]+)\.")
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


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
        self._history_rooms: list[str] = []  # the room each of them was taken in
        self._valid: list[str] = []
        self._score = 0.0
        self._task: TaskRef | None = None
        self._coin_map: _RoomMap | None = None  # coin's rooms, mapped on the first expert call of an episode
        self._twc_map: _TwcMap | None = None  # TWC's, on the first call after the agent left the gold path
        self._room = ""
        # (room, direction, opened?) of each door opened or closed this episode, in order: TWX lists `open door to X`
        # among the valid actions whether that door is open or closed, so the state comes from what the agent did
        self._door_actions: list[tuple[str, str, bool]] = []
        self._visited: set[str] = set()  # rooms the agent has been in this episode

    def tasks(self, split: str) -> list[TaskRef]:
        if split not in FOLDS:
            raise ValueError(f"unknown split {split!r} for twx; use train, seen or unseen")
        first = SEED_BLOCKS[FOLDS[split]] * self.tasks_per_split
        return [TaskRef(self.name, self.game, seed, split) for seed in range(first, first + self.tasks_per_split)]

    def reset(self, task: TaskRef) -> Reset:
        if self._env is None:
            from textworld_express import TextWorldExpressEnv as _TWX

            set_jvm_options()
            self._env = _TWX(envStepLimit=10_000)
        # The library's reset reloads the game generator whenever it is given a game name (3-5 ms of a 5-6 ms
        # reset); a new game from a seed needs no reload, so it is loaded once per (game, params).
        if self._loaded != (task.name, self.game_params):
            self._env.load(task.name, self.game_params)
            self._loaded = (task.name, self.game_params)
        obs, info = self._env.reset(seed=int(task.variation), gameFold=FOLDS[task.split], generateGoldPath=True)
        gold = list(self._env.getGoldActionSequence())
        if self.game == "twc":  # its gold path goes on with a move after the last put, which wins the game: a plan
            # past the win would let the recovery benchmark's error come after the task could have been finished
            gold = gold[: max((i + 1 for i, a in enumerate(gold) if a.startswith("put ")), default=len(gold))]
        self._gold = gold
        self._history, self._history_rooms = [], []
        self._valid = list(info["validActions"])
        self._score = 0.0
        self._task, self._coin_map, self._twc_map = task, None, None
        self._room, self._door_actions = _room_of(obs), []
        self._visited = {self._room}
        return Reset(task=f"{info['taskDescription']}\n{obs}", observation=obs, info={"task_type": task.name})

    def step(self, action: str) -> StepResult:
        action = " ".join(action.strip().split())
        invalid = action not in self._valid
        obs, _, done, info = self._env.step(action)
        self._valid = list(info["validActions"])
        if not invalid:
            self._history.append(action)
            self._history_rooms.append(self._room)
            if action.startswith(("open door to ", "close door to ")):
                self._door_actions.append((self._room, action.split()[-1], action.startswith("open")))
            elif action.startswith("move "):
                self._room = _room_of(obs) or self._room
                self._visited.add(self._room)
        self._score = max(self._score, min(1.0, max(0.0, float(info["score"]))))
        won = bool(info["tasksuccess"])
        return StepResult(obs, 1.0 if won else self._score, bool(done) or won,
                          {"invalid": invalid, "won": won, "lost": bool(info["taskfailure"])})

    def instruction(self) -> str:
        return TWX_INSTRUCTION

    def max_steps(self, task: TaskRef) -> int:
        return self.max_steps_default

    def valid_actions(self) -> list[str] | None:
        return list(self._valid)

    def expert_actions(self) -> list[str] | None:
        """The expert's plan from the current state.

        Coin: a deterministic explorer's route from where the agent stands — the nearest room not yet visited, again
        and again, until the coin is in sight, then `take coin` (see `_RoomMap.coin_plan`): the simulator's own gold
        path for coin is a random walk that the seed does not fix, and a shortest path to a coin the agent cannot
        see would teach guessing. Other games: while the agent's valid actions are a prefix of the gold path, the
        rest of the gold path. After a divergence, TWC re-plans from the state (`_TwcMap.plan`): for each gold
        `put X in Y` not yet done, the shortest way to X and `take X` unless it is held, then the shortest way to
        Y's room, `open Y` if it is closed, and the put. Other games can only follow the gold path; after a
        divergence their expert returns the gold actions not yet done that are valid now, or None when none is.
        """
        if self.game == "coin":
            return self._plan_coin()
        gold = [a for a in self._gold if a != "look around"]
        done = [a for a in self._history if a != "look around"]
        if done == gold[: len(done)]:
            return gold[len(done):]
        if self.game == "twc":
            return self._replan_twc()
        remaining = [a for a in gold if a not in done]
        return remaining if remaining and remaining[0] in self._valid else None

    def _replan_twc(self) -> list[str] | None:
        assert self._task is not None
        if self._twc_map is None:
            self._twc_map = _TwcMap.explore(self._env, self._task, FOLDS[self._task.split], self._gold)
            self._replay()  # exploring moved the simulator; put it back where the episode stands
        return self._twc_map.plan(self._room, self._history, self._history_rooms, self._door_actions) or None

    def _plan_coin(self) -> list[str]:
        if "take coin" in self._history or self._task is None:
            return []
        if self._coin_map is None:
            self._coin_map = _RoomMap.explore(self._env, self._task, FOLDS[self._task.split])
            self._replay()  # exploring moved the simulator; put it back where the episode stands
        return self._coin_map.coin_plan(self._room, self._coin_map.open_doors(self._door_actions), self._visited)

    def _replay(self) -> None:
        assert self._task is not None
        _, info = self._env.reset(seed=int(self._task.variation), gameFold=FOLDS[self._task.split],
                                  generateGoldPath=False)
        for action in self._history:
            _, _, _, info = self._env.step(action)
        self._valid = list(info["validActions"])

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self._loaded = None


def _room_of(observation: str) -> str:
    m = _ROOM.search(observation)
    return m["room"] if m else ""


class _RoomMap:
    """A game's rooms and exits, found by walking a fresh copy of the game (same seed) breadth-first, and the
    shortest routes between them. Deterministic: exits are tried in sorted order, so ties always break the same
    way. Doors (`includeDoors=1`) start closed; a route opens each closed one it passes through. For coin, also the
    coin's room and an explorer's route to it from any room (`coin_plan`)."""

    def __init__(self, exits: dict[str, dict[str, str]], coin_room: str, doors: set[tuple[str, str]]):
        self.exits, self.coin_room, self.doors = exits, coin_room, doors

    @classmethod
    def explore(cls, sim, task: TaskRef, fold: str) -> _RoomMap:
        def walk(path: list[str]) -> tuple[str, list[str]]:
            obs, info = sim.reset(seed=int(task.variation), gameFold=fold, generateGoldPath=False)
            for direction in path:
                if f"open door to {direction}" in info["validActions"]:
                    sim.step(f"open door to {direction}")
                obs, _, _, info = sim.step(f"move {direction}")
            return _room_of(obs), list(info["validActions"])

        start, valid = walk([])
        paths, exits, doors, coin_room = {start: []}, {}, set(), ""
        queue = [start]
        while queue:
            room = queue.pop(0)
            room_, valid = walk(paths[room])
            assert room_ == room, f"room map: expected the {room}, got {room_!r}"
            if "take coin" in valid:
                coin_room = coin_room or room
            exits[room] = {}
            for direction in sorted(a.removeprefix("move ") for a in valid if a.startswith("move ")):
                if f"open door to {direction}" in valid:
                    doors.add((room, direction))
                neighbour, _ = walk(paths[room] + [direction])
                exits[room][direction] = neighbour
                if neighbour not in paths:
                    paths[neighbour] = paths[room] + [direction]
                    queue.append(neighbour)
        return cls(exits, coin_room, doors)

    def open_doors(self, door_actions: list[tuple[str, str, bool]]) -> set[tuple[str, str]]:
        """The doors open now, from the episode's open/close actions in order; a door is open from both its sides."""
        opened: set[tuple[str, str]] = set()
        for room, direction, is_open in door_actions:
            there = self.exits.get(room, {}).get(direction)
            sides = {(room, direction)}
            if there and direction in _OPPOSITE:
                sides.add((there, _OPPOSITE[direction]))
            opened = opened | sides if is_open else opened - sides
        return opened

    def route(self, path: list[tuple[str, str]], opened: set[tuple[str, str]]) -> list[str]:
        """The actions that walk `path` ((room, direction) steps), opening each closed door on it; `opened` is
        updated."""
        actions = []
        for at, direction in path:
            if (at, direction) in self.doors and (at, direction) not in opened:
                actions.append(f"open door to {direction}")
                opened |= self.open_doors([(at, direction, True)])
            actions.append(f"move {direction}")
        return actions

    def coin_plan(self, room: str, opened: set[tuple[str, str]], visited: set[str]) -> list[str]:
        """An explorer's route from `room`: while the coin is not in sight, walk the shortest path to the nearest
        room not yet visited (ties broken by the path's directions, in alphabetical order), opening doors on the
        way; once the coin's room has been seen, the shortest way back to it through rooms already seen; there,
        `take coin`. Only the stop needs the coin's room: every move is one an agent could choose from what it has
        seen (the exits the rooms name, the rooms it has been in, where it saw the coin)."""
        plan, here, seen, opened = [], room, set(visited) | {room}, set(opened)
        while here != self.coin_room:
            if self.coin_room in seen:  # it walked away from the coin: back the way it knows
                path = self.shortest_path(here, lambda r: r == self.coin_room, within=seen)
            else:
                path = self.shortest_path(here, lambda r: r not in seen)
            if path is None:
                return []
            plan += self.route(path, opened)
            here = self.exits[path[-1][0]][path[-1][1]]
            seen.add(here)
        return plan + ["take coin"]

    def shortest_path(self, start: str, is_target: Callable[[str], bool],
                      within: set[str] | None = None) -> list[tuple[str, str]] | None:
        """The shortest (room, direction) path to the nearest target room, through `within` if given; of equally
        short ones, the first by its directions in alphabetical order. [] when `start` is a target."""
        if is_target(start):
            return []
        paths = {start: []}
        frontier = [start]
        while frontier:
            nxt = []
            for here in frontier:
                for direction, there in sorted(self.exits.get(here, {}).items()):
                    if there not in paths and (within is None or there in within):
                        paths[there] = paths[here] + [(here, direction)]
                        nxt.append(there)
            targets = sorted((tuple(d for _, d in paths[r]), r) for r in nxt if is_target(r))
            if targets:
                return paths[targets[0][1]]
            frontier = nxt
        return None


class _TwcMap:
    """TWC's rooms, and where the gold path takes each item and puts it away: enough to plan from any state the
    agent reaches, in whichever room it stands (its own gold path leads from the start only)."""

    def __init__(self, rooms: _RoomMap, puts: list[tuple[str, str, str]], item_room: dict[str, str],
                 box_room: dict[str, str], closed_at_start: set[str]):
        self.rooms, self.puts, self.item_room, self.box_room = rooms, puts, item_room, box_room
        self.closed_at_start = closed_at_start

    @classmethod
    def explore(cls, sim, task: TaskRef, fold: str, gold: list[str]) -> _TwcMap:
        rooms = _RoomMap.explore(sim, task, fold)
        obs, _ = sim.reset(seed=int(task.variation), gameFold=fold, generateGoldPath=False)
        here, puts, item_room, box_room, closed = _room_of(obs), [], {}, {}, set()
        for action in gold:  # walked, for the room of each take and put
            if action.startswith("take "):
                item_room.setdefault(action.removeprefix("take "), here)
            elif m := _PUT.match(action):
                puts.append((action, m["item"], m["box"]))
                box_room[m["box"]] = here
            elif action.startswith("open ") and not action.startswith("open door to "):
                closed.add(action.removeprefix("open "))
            obs, _, _, _ = sim.step(action)
            if action.startswith("move "):
                here = _room_of(obs) or here
        return cls(rooms, puts, item_room, box_room, closed)

    def plan(self, here: str, history: list[str], history_rooms: list[str],
             door_actions: list[tuple[str, str, bool]]) -> list[str]:
        """From `here`, after the valid actions `history` (taken in `history_rooms`): each gold put not yet done,
        in the gold path's order. [] when no route exists."""
        held, at, open_now, closed_now = set(), {}, set(), set()  # at: item -> (container, room)
        for action, room in zip(history, history_rooms):
            if action.startswith("take "):
                item = action.removeprefix("take ")
                held.add(item)
                at.pop(item, None)
            elif m := _PUT.match(action):
                held.discard(m["item"])
                at[m["item"]] = (m["box"], room)
            elif action.startswith(("open ", "close ")) and not action.startswith(("open door ", "close door ")):
                verb, box = action.split(" ", 1)
                (open_now if verb == "open" else closed_now).add(box)
                (closed_now if verb == "open" else open_now).discard(box)
        doors = self.rooms.open_doors(door_actions)
        plan: list[str] = []

        def go(room: str) -> bool:
            nonlocal here
            path = self.rooms.shortest_path(here, lambda r: r == room)
            if path is None:
                return False
            plan.extend(self.rooms.route(path, doors))
            here = room
            return True

        def opened(box: str) -> None:
            if box in closed_now or box in self.closed_at_start and box not in open_now:
                plan.append(f"open {box}")
                open_now.add(box)
                closed_now.discard(box)

        for put, item, box in self.puts:
            if at.get(item, ("",))[0] == box:
                continue  # where the gold path puts it
            if item not in held:
                container, room = at.get(item, ("", self.item_room.get(item, "")))
                if not room or not go(room):
                    return []
                if container:
                    opened(container)
                plan.append(f"take {item}")
            if box not in self.box_room or not go(self.box_room[box]):
                return []
            opened(box)
            plan.append(put)
            held.discard(item)
            at[item] = (box, here)
        return plan
