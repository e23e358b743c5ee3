"""Converters between our trajectories and the formats of the ecosystem.

In:  ETO / ShareGPT (`conversations` with `from`/`value`, or `role`/`content`), OpenAI chat `messages` with a
     per-assistant `weight`, Axolotl `train` flags, AgentGym / Agent-FLAN `loss` flags; JSONL, a JSON list of
     records, or a JSON list of conversations (ETO's in-context example files).
Out: OpenAI-`weight` JSONL and ShareGPT with `loss` flags (LLaMA-Factory, Axolotl, AgentGym can train on them).

ETO's layout: the instruction, an "OK" from the agent, the task, then Thought/Action and Observation turns.
ETO's evaluation histories put a worked example between the "OK" and the task: the example's task and turns,
then a user turn with the real task ("Now, it's your turn ..." in later versions; in ETO's own code the first
user turn that is not an "Observation:"). The example becomes the trajectory's `example` (context, never trained).

Training flags: `weight` takes 0 or 1 (0.0 and 1.0 too: JSON writers emit whole numbers as floats), `train` and
`loss` take true or false (null: no flag, as AgentGym writes on user turns); anything else ("1", a null weight,
0.5) is refused with its file and line, never guessed. A turn
flagged as not trained becomes an `error` step.

Round trips: fields a record has beyond the conversation (ALFWorld's `game_file`, ETO's `meta`) are kept in the
trajectory's `meta` and written back at the top level on export; what only steptune knows (env, task id, split,
success, each step's kind and critique, the last observation, the example) travels in one `steptune` key, so
export then import gives back the same trajectory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from steptune.data.react import (
    EXAMPLE_HEADER,
    YOUR_TURN,
    format_observation,
    format_react,
    is_observation,
    parse_observation,
    parse_react,
)
from steptune.data.trajectory import (
    FormatError,
    RecordError,
    Step,
    Trajectory,
    TrajectoryFileError,
    describe_validation_error,
)

__all__ = ["EXPORTERS", "FormatError", "TrajectoryFileError", "detect_format", "read_any", "record_to_trajectory",
           "trajectory_to_openai", "trajectory_to_sharegpt", "write_as"]

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
           "observation": "user", "function": "user"}
_YOUR_TURN = re.compile(r"^\s*(?:-{3,}\s*)?now,?\s+it['’]?s\s+your\s+turn", re.IGNORECASE)
_EXAMPLES_INTRO = re.compile(r"^\s*here\s+(?:is\s+an\s+example|are\s+\d+\s+examples)\s*[.:]?[ \t]*\n", re.IGNORECASE)
_ACK = {"ok", "ok.", "okay", "okay."}
STEPTUNE_KEY = "steptune"  # steptune-only fields of an exported record
_RESERVED = {"id", "conversations", "messages", "reward", "success", STEPTUNE_KEY}


def _flag(turn: dict[str, Any], index: int) -> bool | None:
    """Whether a turn is to be trained, from its weight / train / loss flag (None: no flag)."""
    seen: dict[str, bool] = {}
    for key in ("weight", "train", "loss"):
        if key not in turn:
            continue
        value = turn[key]
        if value is None and key != "weight":  # AgentGym writes `"loss": null` on the turns it never trains
            continue
        if key == "weight":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
                raise FormatError(f"turn {index}: weight must be 0 or 1, got {value!r}")
        elif not isinstance(value, bool):
            raise FormatError(f"turn {index}: {key} must be true or false, got {value!r}")
        seen[key] = bool(value)
    if len(set(seen.values())) > 1:
        raise FormatError(f"turn {index}: its flags disagree ({', '.join(f'{k}={turn[k]!r}' for k in seen)})")
    return next(iter(seen.values()), None)


def _turns(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalise any supported record to [{'role', 'content', 'trained': bool | None, 'index'}]."""
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise FormatError("record has no 'conversations' or 'messages' list (or it is empty)")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise FormatError(f"turn {i} is not an object")
        role = ROLE_OF.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise FormatError(f"turn {i} needs from/value or role/content, got keys {sorted(map(str, turn))}")
        turns.append({"role": role, "content": content, "trained": _flag(turn, i), "index": i})
    return turns


def _real_task_turn(turns: list[dict[str, Any]], start: int) -> int | None:
    """Where an evaluation history's real task is, if the turns from `start` on hold a worked example first."""
    users = [j for j in range(start, len(turns)) if turns[j]["role"] == "user"]
    marked = [j for j in users if _YOUR_TURN.match(turns[j]["content"])]
    if len(marked) > 1:
        raise FormatError(f"turns {turns[marked[0]]['index']} and {turns[marked[1]]['index']} both say \"Now, "
                          "it's your turn\": which one holds the task?")
    candidates = marked or [j for j in users if not is_observation(turns[j]["content"])]
    if len(candidates) != 1 or (not marked and len(candidates) == len(users)):
        return None  # no marker, and not ETO's unmarked layout (one non-observation among observations)
    j = candidates[0]
    if not any(turns[k]["role"] == "assistant" for k in range(start, j)):
        return None
    return j


def _reward_and_success(record: dict[str, Any], extra: dict[str, Any]) -> tuple[float, bool]:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}  # ETO's evaluation output
    success = extra.get("success", record.get("success", meta.get("success")))
    if success is not None and not isinstance(success, bool):
        raise FormatError(f"success must be true or false, got {success!r}")
    reward = record["reward"] if "reward" in record else meta.get("reward")
    if reward is None:
        reward = 0.0 if success is False else 1.0  # golden data carries no reward: it succeeded
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not 0.0 <= reward <= 1.0:
        raise FormatError(f"reward must be a number in 0..1, got {reward!r}"
                          + (" (a 0..100 score? divide it by 100)" if isinstance(reward, (int, float))
                             and not isinstance(reward, bool) and 1 < reward <= 100 else ""))
    return float(reward), reward >= 1.0 if success is None else success


def record_to_trajectory(record: dict[str, Any], env: str = "unknown", default_id: str = "") -> Trajectory:
    extra = record.get(STEPTUNE_KEY, {})
    if not isinstance(extra, dict):
        raise FormatError(f"'{STEPTUNE_KEY}' must be an object, got {type(extra).__name__}")
    turns = _turns(record)
    system = [t["content"] for t in turns if t["role"] == "system"]
    turns = [t for t in turns if t["role"] != "system"]
    if not turns:
        raise FormatError("conversation has only system turns: no task")
    if turns[0]["role"] != "user":
        raise FormatError("conversation must start with a user turn")
    head = [turns[0]["content"]]
    i = 1
    # ETO: instruction, "OK", task — fold the acknowledgement away
    if len(turns) > 2 and turns[1]["role"] == "assistant" and turns[1]["content"].strip().lower() in _ACK:
        head.append(turns[2]["content"])
        i = 3
    instruction = "\n\n".join(system + head[:-1])
    task = head[-1]
    example = None
    real = _real_task_turn(turns, i)
    if real is not None:
        example = _EXAMPLES_INTRO.sub("", "\n".join(t["content"] for t in turns[i - 1: real]), count=1)
        task = turns[real]["content"]
        first, _, rest = task.partition("\n")
        if _YOUR_TURN.match(first) and rest.strip():
            task = rest.lstrip("\n")  # the marker line; steptune's rendering writes its own
        i = real + 1
    elif isinstance(extra.get("example"), str) and extra["example"]:
        example = extra["example"]
        folded = f"{EXAMPLE_HEADER}{example}\n\n{YOUR_TURN}"
        if not task.startswith(folded):
            raise FormatError(f"'{STEPTUNE_KEY}.example' is not what the task turn starts with")
        task = task[len(folded):]
    steps: list[Step] = []
    while i < len(turns):
        turn = turns[i]
        if turn["role"] != "assistant":
            raise FormatError(f"turn {turn['index']}: expected an assistant turn, got a second user turn in a row")
        parsed = parse_react(turn["content"], recorded=True)
        if parsed is None:
            raise FormatError(f"assistant turn has no 'Action:': {turn['content'][:80]!r}")
        trained = turn["trained"] if turn["trained"] is not None else True
        observation = None
        if i + 1 < len(turns) and turns[i + 1]["role"] == "user":
            observation = parse_observation(turns[i + 1]["content"])
            i += 1
        steps.append(Step(thought=parsed.thought, action=parsed.action, observation=observation,
                          weight=int(trained), kind="expert" if trained else "error"))
        i += 1
    steps = _restore_steps(steps, extra)
    reward, success = _reward_and_success(record, extra)
    meta = {k: v for k, v in record.items() if k not in _RESERVED}
    meta.update(extra.get("meta") or {})
    rid = record.get("id")
    rid = default_id if rid is None else str(rid)
    return Trajectory(id=rid, env=extra.get("env", env), task_id=extra.get("task_id", rid),
                      split=extra.get("split"), instruction=instruction, task=task, example=example, steps=steps,
                      reward=reward, success=success, meta=meta)


def _restore_steps(steps: list[Step], extra: dict[str, Any]) -> list[Step]:
    """Put back what only steptune's own export carries: each step's kind and critique, the last observation."""
    for key in ("kinds", "critiques"):
        if key in extra and (not isinstance(extra[key], list) or len(extra[key]) != len(steps)):
            raise FormatError(f"'{STEPTUNE_KEY}.{key}' must list one entry per assistant step ({len(steps)})")
    if "final_observation" in extra and not steps:
        raise FormatError(f"'{STEPTUNE_KEY}.final_observation' without any step")
    out = []
    for n, step in enumerate(steps):
        fields = step.model_dump(exclude={"critique"})
        if "kinds" in extra:
            fields["kind"] = extra["kinds"][n]
        if "critiques" in extra:
            fields["critique"] = extra["critiques"][n]
        if n == len(steps) - 1 and "final_observation" in extra:
            fields["observation"] = extra["final_observation"]
        try:
            out.append(Step.model_validate(fields))
        except ValidationError as e:
            raise FormatError(f"step {n}: {describe_validation_error(e)}") from None
    return out


def _extras(traj: Trajectory) -> dict[str, Any]:
    """The record's fields besides the conversation: the trajectory's meta at the top level (as it was read) and
    what only steptune knows under one key."""
    top = {k: v for k, v in traj.meta.items() if k not in _RESERVED}
    ours: dict[str, Any] = {"env": traj.env, "task_id": traj.task_id, "success": traj.success,
                            "kinds": [s.kind for s in traj.steps]}
    if traj.split is not None:
        ours["split"] = traj.split
    if any(s.critique for s in traj.steps):
        ours["critiques"] = [s.critique.model_dump() if s.critique else None for s in traj.steps]
    if traj.steps and traj.steps[-1].observation is not None:
        ours["final_observation"] = traj.steps[-1].observation  # not a turn: trainers want the assistant last
    if traj.example:
        ours["example"] = traj.example
    clashing = {k: v for k, v in traj.meta.items() if k in _RESERVED}
    if clashing:
        ours["meta"] = clashing
    return {**top, STEPTUNE_KEY: ours}


def _task_turn(traj: Trajectory) -> str:
    return traj.model_copy(update={"instruction": ""}).head()


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
    return {"id": traj.id, "messages": msgs, "reward": traj.reward, **_extras(traj)}


def trajectory_to_sharegpt(traj: Trajectory) -> dict[str, Any]:
    """ETO-style ShareGPT (instruction, OK, task, ...) with AgentGym's per-turn `loss` flags."""
    convs = []
    if traj.instruction:
        convs += [{"from": "human", "value": traj.instruction, "loss": False},
                  {"from": "gpt", "value": "OK", "loss": False}]
    convs.append({"from": "human", "value": _task_turn(traj), "loss": False})
    for i, s in enumerate(traj.steps):
        convs.append({"from": "gpt", "value": format_react(s.thought, s.action), "loss": bool(s.weight)})
        if s.observation is not None and i < len(traj.steps) - 1:
            convs.append({"from": "human", "value": format_observation(s.observation), "loss": False})
    return {"id": traj.id, "conversations": convs, "reward": traj.reward, **_extras(traj)}


EXPORTERS = {"openai": trajectory_to_openai, "sharegpt": trajectory_to_sharegpt,
             "steptune": lambda t: json.loads(t.model_dump_json(exclude_none=True))}


def detect_format(record: dict[str, Any]) -> str:
    if "steps" in record and "task" in record:
        return "steptune"
    if "conversations" in record or "messages" in record:
        return "chat"
    raise FormatError("unknown record format: expected our trajectory fields, 'conversations' or 'messages'")


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the JSON
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FormatError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}): a binary file, or text saved "
                          "in another encoding?") from None
    if "\x00" in text:
        raise FormatError(f"{path}:{text[: text.index(chr(0))].count(chr(10)) + 1}: a NUL byte: a binary file, "
                          "not JSON text")
    return text


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _array_items(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array file, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"\s*")
    first = True
    while True:
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            rest = ws.match(text, pos + 1).end()
            if rest != len(text):
                raise FormatError(f"{path}:{_line_of(text, rest)}: text after the end of the JSON array")
            return
        if not first:
            if not text.startswith(",", pos):
                where = "the file ends inside the JSON array (truncated?)" if pos >= len(text) else \
                    "expected ',' or ']' between the array's elements"
                raise FormatError(f"{path}:{_line_of(text, pos)}: {where}")
            pos = ws.match(text, pos + 1).end()
        if pos >= len(text):
            raise FormatError(f"{path}:{_line_of(text, pos)}: the file ends inside the JSON array (truncated?)")
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); truncated?") from None
        except ValueError as e:  # e.g. an integer beyond Python's digit limit
            raise FormatError(f"{path}:{_line_of(text, pos)}: not valid JSON ({e})") from None
        yield _line_of(text, pos), item
        pos, first = end, False


def _items(path: Path, text: str) -> list[tuple[int, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        return list(_array_items(path, text))
    items, errors = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(RecordError(str(path), lineno, f"not valid JSON: {e.msg}"))
            except ValueError as e:  # e.g. an integer beyond Python's digit limit
                errors.append(RecordError(str(path), lineno, f"not valid JSON: {e}"))
    if errors and stripped.startswith("{"):
        try:  # one pretty-printed record rather than JSON Lines
            whole = json.loads(text)
        except ValueError:
            whole = None
        if isinstance(whole, dict):
            return [(_line_of(text, text.index("{")), whole)]
    if errors:
        raise TrajectoryFileError(errors)
    return items


def read_any(path: str | Path, env: str = "unknown") -> list[Trajectory]:
    """Read trajectories from JSONL, a JSON list of records or a JSON list of conversations, in any supported
    format. Raises FormatError (one line naming the file and line) for anything it cannot read — a missing,
    empty, binary or truncated file, or bad records (TrajectoryFileError, which lists every bad record); nothing
    is silently dropped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: a directory, not a trajectory file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read it ({e.strerror or e})") from None
    text = _decode(path, data)
    if not text.strip():
        raise FormatError(f"{path}:1: the file is empty: no trajectories")
    try:
        items = _items(path, text)
    except RecursionError:
        raise FormatError(f"{path}: JSON nested too deeply to read") from None
    if not items:
        raise FormatError(f"{path}:1: an empty JSON list: no trajectories")
    in_array = text.lstrip().startswith("[")
    out, errors = [], []
    for n, (lineno, record) in enumerate(items):
        try:
            if isinstance(record, list):  # ETO's in-context example files: a list of conversations
                record = {"conversations": record}
            if not isinstance(record, dict):
                raise FormatError("record is not a JSON object or a list of turns")
            if detect_format(record) == "steptune":
                out.append(Trajectory.model_validate(record))
            else:
                out.append(record_to_trajectory(record, env, default_id=f"{path.stem}-{lineno}"))
        except ValidationError as e:
            errors.append(RecordError(str(path), lineno, _item(in_array, n) + describe_validation_error(e)))
        except (FormatError, ValueError, TypeError) as e:
            errors.append(RecordError(str(path), lineno, _item(in_array, n) + (str(e) or type(e).__name__)))
    if errors:
        raise TrajectoryFileError(errors)
    return out


def _item(in_array: bool, n: int) -> str:
    return f"item {n}: " if in_array else ""


def check_export_format(fmt: str) -> None:
    if fmt not in EXPORTERS:
        raise FormatError(f"unknown output format {fmt!r}; choose one of {', '.join(EXPORTERS)}")


def write_as(trajs: list[Trajectory], path: str | Path, fmt: str) -> int:
    """Write in one of EXPORTERS' formats, atomically (a failed export leaves no half-written file)."""
    check_export_format(fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for t in trajs:
                fh.write(json.dumps(EXPORTERS[fmt](t), ensure_ascii=False, allow_nan=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(trajs)
