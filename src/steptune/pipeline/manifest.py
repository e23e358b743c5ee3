"""The run directory's manifest: which stages ran, on which inputs, producing which outputs, how fast.

A stage is skipped on rerun when the manifest holds it as finished with the same key (a hash of its
config and of its inputs' contents) and its outputs still exist. So `kill -9` at any moment followed by a
rerun continues where it stopped; stages that write record by record (synthesis, evaluation) resume inside
the stage on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from steptune.errors import UserError

LIBRARIES = ["steptune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "scienceworld",
             "textworld-express", "alfworld", "vllm", "openai"]


def file_digest(path: Path) -> str:
    """sha256 of a file's contents; for a directory (a model: possibly many GB) only names and sizes."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(path)}:{p.stat().st_size}".encode())
        return h.hexdigest()[:16]
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def stage_key(config: Any, inputs: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for p in inputs:
        h.update(file_digest(p).encode())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class UnknownStageError(UserError, ValueError):
    """A stage name (--from / --until) that the run does not have."""


def check_stage(stages: list[str], name: str) -> None:
    if name not in stages:
        raise UnknownStageError(f"unknown stage {name!r}; stages are: {', '.join(stages)}")


MANIFEST_FILE = "manifest.json"


class Manifest:
    def __init__(self, run_dir: Path):
        self.path = run_dir / MANIFEST_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def is_done(self, stage: str, key: str, outputs: list[Path]) -> bool:
        rec = self.data["stages"].get(stage)
        return bool(rec and rec.get("status") == "done" and rec.get("key") == key and all(p.exists() for p in outputs))

    def start(self, stage: str, key: str) -> float:
        self.data["stages"][stage] = {"status": "running", "key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()
        return time.perf_counter()

    def finish(self, stage: str, t0: float, outputs: list[Path], info: dict[str, Any] | None = None) -> None:
        rec = self.data["stages"][stage]
        rec.update(status="done", seconds=round(time.perf_counter() - t0, 2),
                   outputs={str(p): file_digest(p) for p in outputs if p.exists()}, info=info or {})
        self.save()

    def key(self, stage: str) -> str | None:
        return self.data["stages"].get(stage, {}).get("key")

    def fail(self, stage: str, t0: float, error: BaseException) -> None:
        rec = self.data["stages"][stage]
        message = " ".join(str(error).split())[:500] or type(error).__name__
        rec.update(status="failed", seconds=round(time.perf_counter() - t0, 2), error=message)
        self.save()
