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


def stage_key(config: Any, input_digests: list[str]) -> str:
    """A stage's key: its config and the digests of its inputs (`Manifest.digest`)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for digest in input_digests:
        h.update(digest.encode())
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
        self.dir = run_dir
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
        """A stage that resumes its own unfinished run (the same key) counts the runs it has taken, `parts`: its
        `seconds` then time the last of them only (a killed run leaves no time)."""
        old = self.data["stages"].get(stage, {})
        resumed = old.get("key") == key and old.get("status") in ("running", "failed")
        self.data["stages"][stage] = {"status": "running", "key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if resumed:
            self.data["stages"][stage]["parts"] = old.get("parts", 1) + 1
        self.save()
        return time.perf_counter()

    def finish(self, stage: str, t0: float, outputs: list[Path], info: dict[str, Any] | None = None) -> None:
        rec = self.data["stages"][stage]
        rec.update(status="done", seconds=round(time.perf_counter() - t0, 2),
                   outputs={str(p): file_digest(p) for p in outputs if p.exists()}, info=info or {})
        self.save()

    # models whose weights `steptune prune` deleted once nothing left to run read them: {path in the run: the
    # digest the model had}, which the stages that read it keep using, so they stay up to date
    def released(self, path: Path) -> str | None:
        return self.data.get("released", {}).get(self._inside(path))

    def release(self, path: Path, digest: str) -> None:
        self.data.setdefault("released", {})[self._inside(path)] = digest
        self.save()

    def unrelease(self, path: Path) -> None:
        """`path` is written anew (its stage runs again): its own digest counts from now on."""
        self.data.get("released", {}).pop(self._inside(path), None)

    def digest(self, path: Path) -> str:
        """What a stage's key hashes of an input: its contents, or the digest of weights that were released."""
        return self.released(path) or file_digest(path)

    def _inside(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.dir))
        except ValueError:
            return str(path)

    def key(self, stage: str) -> str | None:
        return self.data["stages"].get(stage, {}).get("key")

    def fail(self, stage: str, t0: float, error: BaseException) -> None:
        rec = self.data["stages"][stage]
        message = " ".join(str(error).split())[:500] or type(error).__name__
        rec.update(status="failed", seconds=round(time.perf_counter() - t0, 2), error=message)
        self.save()
