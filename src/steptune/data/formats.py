"""Converters between our trajectories and the formats of the ecosystem.

In:  ETO / ShareGPT (`conversations` with `from`/`value`, or `role`/`content`), OpenAI chat `messages` with a
     per-assistant `weight`, Axolotl `train` flags, AgentGym / Agent-FLAN `loss` flags.
Out: OpenAI-`weight` JSONL and ShareGPT with `loss` flags (LLaMA-Factory, Axolotl, AgentGym can train on them).

ETO's layout: the instruction, an "OK" from the agent, the task, then Thought/Action and Observation turns.
A turn flagged as not trained (weight 0 / train false / loss false) becomes an `error` step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from steptune.data.trajectory import (
    RecordError,
    Step,
    Trajectory,
    TrajectoryFileError,
    describe_validation_error,
    format_observation,
    format_react,
)
from steptune.errors import UserError

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
           "observation": "user", "function": "user"}
_REACT = re.compile(r"^\s*(?:Thought:\s*(?P<thought>.*?)\s*)?Action:\s*(?P<action>.+?)\s*$", re.S | re.I)
_ACK = {"ok", "ok.", "okay", "okay."}


class FormatError(UserError, ValueError):
    pass


def _split_react(text: str) -> tuple[str, str]:
    m = _REACT.match(text)
    if not m:
        raise FormatError(f"assistant turn has no 'Action:': {text[:80]!r}")
    return (m.group("thought") or "").strip(), m.group("action").strip()


def _turns(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalise any supported record to [{'role', 'content', 'trained': bool | None}]."""
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise FormatError("record has no 'conversations' or 'messages' list")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise FormatError(f"turn {i} is not an object")
        role = ROLE_OF.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise FormatError(f"turn {i} needs from/value or role/content, got keys {sorted(turn)}")
        trained = next((turn[k] for k in ("weight", "train", "loss") if k in turn), None)
        turns.append({"role": role, "content": content, "trained": None if trained is None else bool(trained)})
    return turns


def record_to_trajectory(record: dict[str, Any], env: str = "unknown", default_id: str = "") -> Trajectory:
    turns = _turns(record)
    system = [t["content"] for t in turns if t["role"] == "system"]
    turns = [t for t in turns if t["role"] != "system"]
    if turns[0]["role"] != "user":
        raise FormatError("conversation must start with a user turn")
    head = [turns[0]["content"]]
    i = 1
    # ETO: instruction, "OK", task — fold the acknowledgement away
    if len(turns) > 2 and turns[1]["role"] == "assistant" and turns[1]["content"].strip().lower() in _ACK:
        head.append(turns[2]["content"])
        i = 3
    instruction = "\n\n".join(system + head[:-1]) if len(head) > 1 else "\n\n".join(system)
    task = head[-1]
    steps: list[Step] = []
    while i < len(turns):
        turn = turns[i]
        if turn["role"] != "assistant":
            raise FormatError(f"expected an assistant turn at position {i}")
        thought, action = _split_react(turn["content"])
        trained = turn["trained"] if turn["trained"] is not None else True
        observation = None
        if i + 1 < len(turns) and turns[i + 1]["role"] == "user":
            observation = re.sub(r"^\s*Observation:\s*", "", turns[i + 1]["content"])
            i += 1
        steps.append(Step(thought=thought, action=action, observation=observation,
                          weight=int(trained), kind="expert" if trained else "error"))
        i += 1
    meta = {k: v for k, v in record.items() if k not in ("id", "conversations", "messages", "reward", "success")}
    reward = float(record.get("reward", 1.0))
    return Trajectory(id=str(record.get("id", default_id)), env=env, task_id=str(record.get("id", default_id)),
                      instruction=instruction, task=task, steps=steps, reward=min(max(reward, 0.0), 1.0),
                      success=bool(record.get("success", reward >= 1.0)), meta=meta)


def trajectory_to_openai(traj: Trajectory) -> dict[str, Any]:
    """OpenAI fine-tuning chat format; assistant messages carry `weight` 0/1. The instruction becomes the system
    message so that it can be told apart from the task on import."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": traj.instruction}] if traj.instruction else []
    bare = traj.model_copy(update={"instruction": ""})
    for m in bare.messages():
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant":
            msg["weight"] = m.weight
        msgs.append(msg)
    return {"id": traj.id, "messages": msgs}


def trajectory_to_sharegpt(traj: Trajectory) -> dict[str, Any]:
    """ETO-style ShareGPT (instruction, OK, task, ...) with AgentGym's per-turn `loss` flags."""
    convs = []
    if traj.instruction:
        convs += [{"from": "human", "value": traj.instruction, "loss": False},
                  {"from": "gpt", "value": "OK", "loss": False}]
    convs.append({"from": "human", "value": traj.task, "loss": False})
    for i, s in enumerate(traj.steps):
        convs.append({"from": "gpt", "value": format_react(s.thought, s.action), "loss": bool(s.weight)})
        if s.observation is not None and i < len(traj.steps) - 1:
            convs.append({"from": "human", "value": format_observation(s.observation), "loss": False})
    return {"id": traj.id, "conversations": convs, "reward": traj.reward}


EXPORTERS = {"openai": trajectory_to_openai, "sharegpt": trajectory_to_sharegpt,
             "steptune": lambda t: json.loads(t.model_dump_json(exclude_none=True))}


def detect_format(record: dict[str, Any]) -> str:
    if "steps" in record and "task" in record:
        return "steptune"
    if "conversations" in record or "messages" in record:
        return "chat"
    raise FormatError("unknown record format: expected our trajectory fields, 'conversations' or 'messages'")


def read_any(path: str | Path, env: str = "unknown") -> list[Trajectory]:
    """Read a JSONL (or JSON list) file in any supported format. Every bad record is reported with file and
    line (or list index); nothing is silently dropped."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        items = [(i + 1, r) for i, r in enumerate(json.loads(text))]
    else:
        items = []
        errors: list[RecordError] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    errors.append(RecordError(str(path), lineno, f"not valid JSON: {e.msg}"))
        if errors:
            raise TrajectoryFileError(errors)
    out, errors = [], []
    for lineno, record in items:
        try:
            if not isinstance(record, dict):
                raise FormatError("record is not a JSON object")
            if detect_format(record) == "steptune":
                out.append(Trajectory.model_validate(record))
            else:
                out.append(record_to_trajectory(record, env, default_id=f"{path.stem}-{lineno}"))
        except ValidationError as e:
            errors.append(RecordError(str(path), lineno, describe_validation_error(e)))
        except (FormatError, ValueError) as e:
            errors.append(RecordError(str(path), lineno, str(e).splitlines()[0] if str(e) else type(e).__name__))
    if errors:
        raise TrajectoryFileError(errors)
    return out


def write_as(trajs: list[Trajectory], path: str | Path, fmt: str) -> int:
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for t in trajs:
            fh.write(json.dumps(EXPORTERS[fmt](t), ensure_ascii=False) + "\n")
    return len(trajs)
