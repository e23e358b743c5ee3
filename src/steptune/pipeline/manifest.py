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

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # steptune's own sources, whose digests a stage's record keeps

# The sources whose code decides what a kind of stage writes ("{env}": the run's environment adapter). A stage made by
# other code stays up to date, since most code changes leave results as they were and a rerun can cost hours, but
# the run and `steptune status` say which files changed (a mended expert once left a stage 2 "up to date").
STAGE_CODE = {
    "golden": ("envs/{env}.py", "envs/base.py", "envs/expert.py", "envs/prompts.py", "synthesis/golden.py", "data"),
    "split": ("pipeline/split.py",),
    "init_model": ("models/tiny.py",),
    "train": ("training", "data", "models"),
    "synthesize": ("envs/{env}.py", "envs/base.py", "envs/expert.py", "envs/prompts.py", "synthesis/synthesize.py",
                   "teacher", "agent", "backends", "data"),
    "filter": ("synthesis/filtering.py",),
    "eval": ("envs/{env}.py", "envs/base.py", "envs/expert.py", "envs/prompts.py", "evaluation/eval.py",
             "evaluation/recovery.py", "agent", "backends", "data"),
}

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


def code_digests(stage: str, env: str) -> dict[str, str]:
    """{source file relative to the package: digest} of the code that decides what `stage` writes (STAGE_CODE)."""
    kind = stage.partition(":")[0]
    files: set[Path] = set()
    for part in STAGE_CODE.get(kind, ()):
        path = PACKAGE_ROOT / part.format(env=env)
        files.update(path.rglob("*.py") if path.is_dir() else [path] if path.exists() else [])
    return {p.relative_to(PACKAGE_ROOT).as_posix(): file_digest(p) for p in sorted(files)}


def code_changes(recorded: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """The source files changed, added or removed since a stage recorded `recorded` (none for a stage recorded before
    stages kept their code's digests)."""
    if recorded is None:
        return []
    return sorted(f for f in recorded.keys() | current.keys() if recorded.get(f) != current.get(f))


def some_of(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, and how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


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

    def start(self, stage: str, key: str, code: dict[str, str] | None = None) -> float:
        """A stage that resumes its own unfinished run (the same key) counts the runs it has taken, `parts`: its
        `seconds` then time the last of them only (a killed run leaves no time). `code`: the digests of the sources
        it runs (code_digests), those of its last run when it resumes."""
        old = self.data["stages"].get(stage, {})
        resumed = old.get("key") == key and old.get("status") in ("running", "failed")
        self.data["stages"][stage] = {"status": "running", "key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      **({"code": code} if code is not None else {})}
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
        self.data.get("retrained", {}).pop(self._inside(path), None)
        self.save()

    # released models trained again in place by their unchanged stage (same settings, data and seed: the same
    # model), keeping the digest their readers hashed: a new train_summary.json's length must not rerun stage 2
    def retrained(self, path: Path) -> str | None:
        return self.data.get("retrained", {}).get(self._inside(path))

    def mark_retrained(self, path: Path) -> None:
        self.data.setdefault("retrained", {})[self._inside(path)] = self.data["released"].pop(self._inside(path))
        self.save()

    def unrelease(self, path: Path) -> None:
        """`path` is written anew (its stage runs again): its own digest counts from now on."""
        for kind in ("released", "retrained"):
            self.data.get(kind, {}).pop(self._inside(path), None)

    def digest(self, path: Path) -> str:
        """What a stage's key hashes of an input: its contents, or the digest of weights that were released (or
        released and trained again in place)."""
        return self.released(path) or self.retrained(path) or file_digest(path)

    def _inside(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.dir))
        except ValueError:
            return str(path)

    def code_changes(self, stage: str, env: str) -> list[str]:
        """The source files that changed since `stage` finished (code_changes)."""
        return code_changes(self.data["stages"].get(stage, {}).get("code"), code_digests(stage, env))

    def key(self, stage: str) -> str | None:
        return self.data["stages"].get(stage, {}).get("key")

    def fail(self, stage: str, t0: float, error: BaseException) -> None:
        rec = self.data["stages"][stage]
        message = " ".join(str(error).split())[:500] or type(error).__name__
        rec.update(status="failed", seconds=round(time.perf_counter() - t0, 2), error=message)
        self.save()
