"""The trajectory: the one data structure every stage reads and writes.

A trajectory is a task (instruction + task text) followed by agent steps. Each step carries its own
`weight` — 1: trained, 0: kept in context but never trained — so STeP's partial masking is a property of
the data, not of the trainer (as torchtune's `Message.masked`). Trajectories live in JSONL, one per line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steptune.data.react import (
    EXAMPLE_HEADER,
    YOUR_TURN,
    format_observation,
    format_react,
)
from steptune.errors import UserError

StepKind = Literal["expert", "student", "error", "reflection", "injected"]  # injected: the recovery benchmark
Role = Literal["system", "user", "assistant"]


def strict_weight(w: Any) -> int:
    """0 or 1, nothing that merely converts to them: a string "0" or a `true` in a data file is a mistake to
    report, not a flag to guess. 0.0 and 1.0 are accepted because JSON writers (pandas, JavaScript) emit whole
    numbers as floats; they mean the same number."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
        raise ValueError(f"weight must be 0 (in context, not trained) or 1 (trained), got {w!r}")
    return int(w)


class Critique(BaseModel):
    """A teacher's judgement of one step (kept on the erroneous step it judged)."""

    model_config = ConfigDict(extra="forbid")

    is_error: bool
    error: str = ""  # what went wrong
    reason: str = ""  # why it is wrong
    reflection: str = ""  # first-person text the agent could have thought on noticing the mistake
    corrected_thought: str = ""
    corrected_action: str = ""
    teacher: str = ""  # which teacher produced it


class Step(BaseModel):
    """One ReAct step: the agent's thought and action, and the observation that followed."""

    model_config = ConfigDict(extra="forbid")

    thought: str = ""
    action: str
    observation: str | None = None
    weight: int = 1  # STeP gives error steps 0; the "no masking" ablation trains them (weight 1, kind kept)
    kind: StepKind = "expert"
    critique: Critique | None = None
    # the environment did not accept the action, or the reply had none (set by the rollout on every step; None: not
    # recorded, as in golden data and runs before it): the study's stage-2 data quality counts flagged steps by it
    invalid: bool | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _binary_weight(cls, w: Any) -> int:
        return strict_weight(w)

    def text(self) -> str:
        """The assistant turn as the agent writes it."""
        return format_react(self.thought, self.action)


class Message(BaseModel):
    """A chat message; `weight` only matters for assistant messages."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    weight: int = 0
    kind: StepKind | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _binary_weight(cls, w: Any) -> int:
        return strict_weight(w)


class Trajectory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    env: str
    task_id: str
    split: str | None = None
    instruction: str = ""  # the environment's prompt: action list, format rules, optional example
    task: str  # the task description (and first observation) shown to the agent
    # a worked example shown between the instruction and the task (ETO's in-context example): context, never trained
    example: str | None = None
    steps: list[Step] = Field(default_factory=list)
    reward: float = 0.0
    success: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("example")
    @classmethod
    def _no_empty_example(cls, e: str | None) -> str | None:
        return e or None  # "" and None both mean no example; one spelling keeps round trips exact

    @field_validator("reward")
    @classmethod
    def _reward_in_range(cls, r: float) -> float:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"reward must be in 0..1, got {r}")
        return r

    @property
    def task_type(self) -> str:
        """`meta["task_type"]` where the writer knew it, else the type part of the task id (`env/type/variation`)."""
        if self.meta.get("task_type"):
            return str(self.meta["task_type"])
        parts = self.task_id.split("/")
        return parts[1] if len(parts) == 3 else parts[0]

    @property
    def n_errors(self) -> int:
        return sum(s.kind == "error" for s in self.steps)

    def messages(self, include_final_observation: bool = False) -> list[Message]:
        """ReAct conversation: user(instruction + task), then assistant step / user observation pairs.

        The instruction goes into the first user turn rather than a system turn because several chat
        templates (Gemma, older Mistral) reject a system role. The final observation carries no loss and
        nothing follows it, so it is left out of training renders by default.
        """
        msgs = [Message(role="user", content=self.head())]
        for i, step in enumerate(self.steps):
            msgs.append(Message(role="assistant", content=step.text(), weight=step.weight, kind=step.kind))
            last = i == len(self.steps) - 1
            if step.observation is not None and (include_final_observation or not last):
                msgs.append(Message(role="user", content=format_observation(step.observation)))
        return msgs


    def head(self) -> str:
        """The first user turn: instruction, the worked example if any, the task (the layout steptune's own
        evaluation prompt uses, steptune.data.react)."""
        parts = [self.instruction] if self.instruction else []
        parts += [EXAMPLE_HEADER + self.example, YOUR_TURN + self.task] if self.example else [self.task]
        return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------- JSONL I/O


@dataclass
class RecordError:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {' '.join(self.message.split())}"  # one line, whatever the message held


class FormatError(UserError, ValueError):
    """A data file or record that steptune cannot read as trajectories; the message names the file and line.
    Every reader here (`read_any`, `load_trajectories`) raises only this type (or its subclass below)."""


class TrajectoryFileError(FormatError):
    """A file with malformed records; `errors` lists every one of them, the message (one line) the first few."""

    SHOWN = 5

    def __init__(self, errors: list[RecordError]):
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[: self.SHOWN])
        more = f"; and {len(errors) - self.SHOWN} more" if len(errors) > self.SHOWN else ""
        head = "" if len(errors) == 1 else f"{len(errors)} malformed trajectory records: "
        super().__init__(f"{head}{shown}{more}")


def describe_validation_error(err: ValidationError, whole: str = "<record>") -> str:
    """pydantic's errors as one line, each at its key path (`train.max_stpes: Extra inputs are not permitted`);
    an error about the whole object is put at `whole`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-")) or whole
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def iter_trajectories(path: str | Path, errors: list[RecordError] | None = None) -> Iterator[Trajectory]:
    """Yield trajectories; malformed records go to `errors` if given, else raise after reading all lines."""
    path = Path(path)
    collected: list[RecordError] = [] if errors is None else errors
    with path.open("rb") as fh:  # bytes, so that a line that is not UTF-8 is reported with its number
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                collected.append(RecordError(str(path), lineno, f"not UTF-8 text (byte 0x{raw[e.start]:02x}): "
                                                               "a binary file, or another encoding?"))
                continue
            if not line.strip():
                continue
            try:
                yield Trajectory.model_validate_json(line)
            except ValidationError as e:
                collected.append(RecordError(str(path), lineno, describe_validation_error(e)))
    if errors is None and collected:
        raise TrajectoryFileError(collected)


def load_trajectories(path: str | Path) -> list[Trajectory]:
    """Load a JSONL file; raises TrajectoryFileError naming the file and line of every bad record."""
    errors: list[RecordError] = []
    trajs = list(iter_trajectories(path, errors))
    if errors:
        raise TrajectoryFileError(errors)
    return trajs


def save_trajectories(trajs: Iterable[Trajectory], path: str | Path) -> int:
    """Write atomically (tmp file + rename) so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for t in trajs:
            fh.write(t.model_dump_json(exclude_none=True) + "\n")
            n += 1
    tmp.replace(path)
    return n


def planned_path(path: str | Path) -> Path:
    """Where a writer notes how many records its file will hold when the run is done (`steptune status` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".planned")


class TrajectoryWriter:
    """Append-only JSONL writer for long runs: each record is flushed and fsynced as it is produced,
    and a torn last line (from kill -9) is dropped on reopen, so resumed runs neither lose nor duplicate.
    `planned`, the number of records the finished file will hold, is noted beside it."""

    def __init__(self, path: str | Path, planned: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_ids = self._repair_and_index()
        self._fh = self.path.open("a", encoding="utf-8")
        if planned is not None:
            planned_path(self.path).write_text(f"{planned}\n")

    def _repair_and_index(self) -> set[str]:
        if not self.path.exists():
            return set()
        ids: set[str] = set()
        good: list[str] = []
        torn = False
        for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                ids.add(json.loads(line)["id"])
                good.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                torn = True
        if torn:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(good), encoding="utf-8")
            tmp.replace(self.path)
        return ids

    def write(self, record: BaseModel | dict) -> None:
        line = record.model_dump_json(exclude_none=True) if isinstance(record, BaseModel) else json.dumps(record)
        rid = json.loads(line)["id"]
        if rid in self.done_ids:
            return
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done_ids.add(rid)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TrajectoryWriter:  # noqa: PYI034  (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def one_line(text: str | None, n: int) -> str:
    """`text` on one line, cut to at most `n` characters (for messages and reports)."""
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"
