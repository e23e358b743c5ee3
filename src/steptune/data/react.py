"""The ReAct text format, in one place: how a step is written, how a reply is read back, where a turn ends.

An agent turn is `Thought: ...\\nAction: ...` (just `Action: ...` without a thought); the environment's turn is
`Observation: ...`. Prompts follow ETO: the first user turn holds the instruction, an optional worked example
(`EXAMPLE_HEADER`, then `YOUR_TURN` before the task), then the task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXAMPLE_HEADER = "Here is an example:\n"
YOUR_TURN = "Now, it's your turn.\n"

# ETO's answer to a reply without an action (kept verbatim so scores stay comparable).
INVALID_FORMAT_OBSERVATION = "Invalid format. The input must contain 'Action: '"

# A ReAct turn ends with its Action line. A model that keeps going writes the environment's reply or its next
# thought, so stopping at either ends the turn at the Action line (and stays within OpenAI's limit of 4 stops).
REACT_STOP = ["\nObservation", "\nThought:", "\n\n"]

# new tokens per agent turn unless a stage says otherwise: a thought and an action fit with room to spare
REACT_MAX_NEW_TOKENS = 128

_ACTION_LINE = re.compile(r"^[ \t]*action[ \t]*:", re.IGNORECASE | re.MULTILINE)
_THOUGHT_LABEL = re.compile(r"^\s*thought\s*:\s*", re.IGNORECASE)
_OBSERVATION_LABEL = re.compile(r"^\s*observation\s*:\s*", re.IGNORECASE)


def format_react(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}" if thought else f"Action: {action}"


def format_observation(observation: str) -> str:
    return f"Observation: {observation}"


@dataclass
class ParsedStep:
    thought: str
    action: str


def parse_react(text: str, *, recorded: bool = False) -> ParsedStep | None:
    """Thought and action of an agent turn (any casing and spacing of the labels); None when there is no action.

    A model's reply (the default) must have exactly one non-empty action line, and the action is that line:
    guessing which of two actions the model meant would train on noise. A recorded turn (a data file's
    assistant turn, `recorded=True`) takes its action from the last line that starts with `Action:`, to the end
    of the turn (a thought may mention "Action:" itself); the action may be empty there, for the caller to judge.
    """
    matches = list(_ACTION_LINE.finditer(text))
    if not matches or (len(matches) != 1 and not recorded):
        return None
    last = matches[-1]
    rest = text[last.end():]
    action = rest.strip() if recorded else rest.lstrip().split("\n", 1)[0].strip()
    if not action and not recorded:
        return None
    return ParsedStep(thought=_THOUGHT_LABEL.sub("", text[: last.start()], count=1).strip(), action=action)


def is_observation(content: str) -> bool:
    return bool(_OBSERVATION_LABEL.match(content))


def parse_observation(content: str) -> str:
    """The observation of a user turn, less its `Observation:` label (as `format_observation` writes it, undone
    exactly; other spellings of the label too)."""
    if content.startswith("Observation: "):
        return content[len("Observation: "):]
    return _OBSERVATION_LABEL.sub("", content, count=1)
