"""The expert's words: a short first-person reason for each action of an expert plan.

Without an LLM, golden trajectories (steptune.synthesis.golden), the recovery benchmark's expert prefix and the
expert-grounded teacher's corrections all explain an action this way: from the action, what comes next in the
plan and the last observation, saying what the action is for, not "I will do X".
"""

from __future__ import annotations

import re


def explain(action: str, rest: list[str], observation: str) -> str:
    """A short reason for `action`, looking ahead in the expert's plan."""
    a = action.lower()
    put = next((r for r in rest if r.startswith("put ") or r.startswith("move ")), None)
    if m := re.match(r"(?:take|pick up) (.+?)(?: from .*)?$", a):
        obj = m[1]
        dest = re.search(rf"{re.escape(obj)} (?:in|on|to|into) (.+)$", put or "")
        if dest:
            return f"The {obj} is not where it belongs; it goes in the {dest[1]}, so I pick it up first."
        return f"I need the {obj} for the next steps of the task, so I take it."
    if m := re.match(r"open (.+)$", a):
        use = next((r for r in rest if m[1] in r), None)
        return f"The {m[1]} is closed, and I need it to {use}." if use else f"I open the {m[1]} to see inside."
    if m := re.match(r"(?:put|move) (.+?) (?:in|on|to|into) (.+)$", a):
        return f"I am holding the {m[1]}, and a {m[1]} usually belongs in the {m[2]}, so I put it there."
    if m := re.match(r"(?:go to|teleport to|move) (.+)$", a):
        return f"What I need next is in the {m[1]}, so I go there."
    if a in ("look around", "look"):
        return "First I look around to see what is here and what is out of place."
    if m := re.match(r"focus on (.+)$", a):
        return f"The task is about the {m[1]}, so I focus on it."
    nxt = f" Then I can {rest[0]}." if rest else " That should complete the task."
    return f"The last observation was: \"{observation[:80].strip()}\". The next step is to {action}.{nxt}"
