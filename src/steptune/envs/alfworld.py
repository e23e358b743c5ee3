"""ALFWorld (Shridhar et al. 2021), text-only TextWorld engine, as a steptune Env.

Needs the optional extra: `pip install 'steptune[alfworld]'` (alfworld 0.4.2 + textworld[pddl]; ≈3 min, it
compiles fast-downward). Games live under a data root laid out like ALFWorld's own:
`<root>/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/{traj_data.json, game.tw-pddl}`.
Use the real data ($ALFWORLD_DATA after `alfworld-download`) or games made offline by
`steptune.envs.alfworld_games.generate_games` (not the benchmark).

Splits: `train`; `seen` = valid_seen (140 games, ETO's seen test); `unseen` = valid_unseen (134, ETO's unseen test).
Reward 0/1 (won). The expert is ALFWorld's planner, asked from the *current* state on each call, so it still
knows the way after the agent has wandered off (what a teacher needs).

Action wording: ALFWorld 0.4 says `move X to Y`; ALFWorld 0.1-era prompts (ReAct, ETO) say `put X in/on Y`.
Both are accepted (the old form is translated); the expert speaks the engine's `move X to Y`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from steptune.envs.base import Env, Reset, StepResult, TaskRef

ALFWORLD_INSTRUCTION = (
    "Interact with a household to solve a task. Imagine you are an intelligent agent in a household environment "
    "and your target is to perform actions to complete the task goal. At the beginning of your interactions, you "
    "will be given a detailed description of the current environment and your goal to accomplish.\n"
    "For each of your turn, you will be given the observation of the last turn. You should first think about the "
    "current condition and plan for your future actions, and then output your action in this turn. Your output "
    'must strictly follow this format:"Thought: your thoughts.\\nAction: your next action".\n\n'
    "The available actions are:\n"
    "1. go to {recep}\n"
    "2. take {obj} from {recep}\n"
    '3. move {obj} to {recep}  ("put {obj} in/on {recep}" also works)\n'
    "4. open {recep}\n"
    "5. close {recep}\n"
    "6. use {obj}\n"
    "7. clean {obj} with {recep}\n"
    "8. heat {obj} with {recep}\n"
    "9. cool {obj} with {recep}\n"
    "10. examine {obj} / examine {recep}\n"
    "11. inventory\n"
    "12. look\n"
    "where {obj} and {recep} correspond to objects and receptacles.\n"
    "After your each turn, the environment will give you immediate feedback based on which you plan your next few "
    'steps. If the environment outputs "Nothing happens.", that means the previous action is invalid and you '
    "should try more options.\n\n"
    "Reminder:\n"
    "1. The action must be chosen from the given available actions. Any actions except provided available actions "
    "will be regarded as illegal.\n"
    "2. Think when necessary, try to act directly more in the process."
)

SPLIT_FOLDERS = {
    "train": "train",
    "seen": "valid_seen",
    "valid_seen": "valid_seen",
    "unseen": "valid_unseen",
    "valid_unseen": "valid_unseen",
}
WELCOME = "-= Welcome to TextWorld, ALFRED! =-"
PUT_RE = re.compile(r"^put (.+?) (?:in|on|in/on|into|onto) (.+)$")


class AlfWorldError(RuntimeError):
    """ALFWorld cannot run here (no games, missing extra, bad game file)."""


def translate_action(action: str) -> str:
    """Normalise an action to ALFWorld 0.4 wording: 'put apple 1 in/on fridge 1' → 'move apple 1 to fridge 1'."""
    action = " ".join(action.strip().split()).lower().rstrip(".")
    m = PUT_RE.match(action)
    return f"move {m.group(1)} to {m.group(2)}" if m else action


def find_games(root: str | Path, split: str) -> list[Path]:
    """Playable game files of a split, filtered like the stock loader (solvable, no movable/sliced tasks)."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"unknown ALFWorld split {split!r}; known: {sorted(SPLIT_FOLDERS)}")
    folder = Path(root) / "json_2.1.1" / SPLIT_FOLDERS[split]
    games = []
    for traj in sorted(folder.rglob("traj_data.json")):
        game = traj.with_name("game.tw-pddl")
        if "movable" in str(traj.parent) or "Sliced" in str(traj.parent) or not game.exists():
            continue
        try:
            solvable = json.loads(game.read_text()).get("solvable", False)
        except json.JSONDecodeError as e:
            raise AlfWorldError(f"{game} is not a valid game file: {e}") from e
        if solvable:
            games.append(game)
    return games


class AlfWorldEnv(Env):
    name = "alfworld"
    max_steps_default = 40  # ETO's limit

    def __init__(self, data_dir: str | Path | None = None, max_steps: int | None = None):
        """`data_dir` (default $ALFWORLD_DATA) is the root holding json_2.1.1/."""
        try:
            import textworld  # noqa: F401
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler  # noqa: F401
            from textworld.envs.pddl import PddlEnv  # noqa: F401
        except ImportError as e:
            raise AlfWorldError("ALFWorld needs the optional extra: pip install 'steptune[alfworld]'") from e
        data_dir = data_dir or os.environ.get("ALFWORLD_DATA")
        if not data_dir:
            raise AlfWorldError(
                "no ALFWorld data: pass data_dir or set $ALFWORLD_DATA "
                "(real games: alfworld-download; offline demo games: alfworld_games.generate_games)"
            )
        self.root = Path(os.path.expandvars(str(data_dir))).expanduser()
        self.max_steps_default = max_steps or self.max_steps_default
        self._env = None
        self._state = None
        self._steps = 0
        self._done = True

    def instruction(self) -> str:
        return ALFWORLD_INSTRUCTION

    def tasks(self, split: str) -> list[TaskRef]:
        games = find_games(self.root, split)
        if not games:
            # the stock AlfredTWEnv spins forever at 100% CPU in this case; fail loudly instead
            raise AlfWorldError(
                f"no playable ALFWorld games under {self.root / 'json_2.1.1' / SPLIT_FOLDERS[split]} "
                f"(need <task>/<trial>/traj_data.json + game.tw-pddl with solvable=true)"
            )
        return [TaskRef(self.name, g.parent.parent.name, str(g.relative_to(self.root)), split) for g in games]

    def reset(self, task: TaskRef) -> Reset:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler

        game = self.root / str(task.variation)
        if not game.exists():
            raise AlfWorldError(f"ALFWorld game file not found: {game}")
        self.close()
        infos = textworld.EnvInfos(won=True, admissible_commands=True, feedback=True)
        self._env = textworld.start(str(game), infos, wrappers=[AlfredDemangler()])
        self._state = self._env.reset()
        self._steps, self._done = 0, False
        intro = self._state.feedback.replace(WELCOME, "").strip()
        room = intro.split("Your task is to:")[0].strip()
        return Reset(task=intro, observation=room, info={"game_file": str(game)})

    def step(self, action: str) -> StepResult:
        if self._env is None or self._done:
            raise RuntimeError("AlfWorldEnv.step() without an active episode; call reset() first")
        command = translate_action(action)
        invalid = command not in self._state.admissible_commands
        self._state, _, _ = self._env.step(command)
        self._steps += 1
        won = bool(self._state.won)
        truncated = not won and self._steps >= self.max_steps_default
        self._done = won or truncated
        info = {"won": won, "invalid": invalid, "command": command}
        if truncated:
            info["truncated"] = True
        return StepResult(self._state.feedback.strip(), 1.0 if won else 0.0, self._done, info)

    def valid_actions(self) -> list[str] | None:
        """ALFWorld's admissible commands in the current state."""
        return list(self._state.admissible_commands) if self._env is not None and self._state else None

    def expert_actions(self) -> list[str] | None:
        """The planner's plan from the current state (re-planned on every call); [] once won; None if no plan."""
        if self._env is None:
            return None
        if self._state.won:
            return []
        pddl = self._env.unwrapped
        plan = pddl._pddl_state.replan(pddl._entity_infos)  # names already demangled in place by the wrapper
        return list(plan) if plan else None

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
