"""`steptune prune`: delete the weights of a run's models once nothing left to run reads them.

A SmolLM2 model is 538 MB of fp32 weights and a study of three seeds trains a dozen and more; a 7B model is 13 GB.
Once a model's readers have finished (its evaluations; for the base agent also stage 2 and its U2 evaluation),
nothing in the run needs its weights again. `prune` deletes them and keeps everything else in the model's folder
(train_summary.json, the train log, its config and tokenizer), and the manifest records the digest the model had.
The stages that read it keep that digest in their keys, so they stay up to date: the same command skips them, the
report and the study are written from what is left, and a pruned run directory is small enough to copy or commit.
A stage that needs the weights again (a new stage, a changed setting) first trains the model again in place, by
its unchanged training stage (steptune.pipeline.run.retrain_released), and the model keeps the digest it had.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from steptune.pipeline.manifest import Manifest

WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")  # transformers' and peft's weight files
CHECKPOINTS = "checkpoints"  # the trainer's resumable checkpoints (kept only with train.keep_checkpoints)


@dataclass
class Pruned:
    run: Path
    model: Path
    state: str  # "released", "would release" (a dry run), "kept" or "already released"
    bytes: int = 0
    waiting_for: tuple[str, ...] = ()


def weight_files(model: Path) -> list[Path]:
    files = [p for pattern in WEIGHTS for p in model.glob(pattern) if p.is_file()]
    return sorted(files) + ([model / CHECKPOINTS] if (model / CHECKPOINTS).is_dir() else [])


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prune_run(run_dir: Path, dry_run: bool = False) -> list[Pruned]:
    """Release the weights of every model in `run_dir` whose stage finished and whose readers (of the stages the run
    runs) all finished and released the models they made: a model that must train again (a copy without its
    weights) still finds its start model. One row per model, in pipeline order. Refused (RunInUse) while a run
    works in `run_dir`: its next save of the manifest would drop the releases; a dry run only reads."""
    from steptune.pipeline.lock import hold_run

    if dry_run:
        return _prune(run_dir, dry_run)
    with hold_run(run_dir, "steptune prune"):
        return _prune(run_dir, dry_run)


def _prune(run_dir: Path, dry_run: bool) -> list[Pruned]:
    from pydantic import ValidationError

    from steptune.errors import UserError
    from steptune.pipeline.config import PipelineConfig
    from steptune.pipeline.run import Run, reads

    manifest = Manifest(run_dir)
    try:
        stages = Run(PipelineConfig.model_validate(manifest.data["config"]), run_dir).stages()
    except (KeyError, ValidationError) as e:  # a manifest from another version: nothing is deleted on a guess
        raise UserError(f"{run_dir}: its manifest's config cannot be read by this version of steptune, so which "
                        f"stages read its models is unknown; nothing deleted ({type(e).__name__})") from e
    only = manifest.data.get("only")
    planned = [s for s in stages if only is None or s.name in only]
    done = {name for name, rec in manifest.data["stages"].items() if rec.get("status") == "done"}

    def is_model(path: Path) -> bool:
        return path.parent.name == "models"

    gone = {p for s in planned for p in s.outputs if is_model(p) and manifest.released(p)}
    rows = []
    for stage in reversed(planned):  # readers first: whether they still need their start model decides
        for model in stage.outputs:
            # a symlink is a method with no data of its own pointing at its start model: never delete through it
            if stage.name not in done or not is_model(model) or not model.is_dir() or model.is_symlink():
                continue
            if manifest.released(model):
                rows.append(Pruned(run_dir, model, "already released"))
                continue
            readers = [s for s in planned if reads(s, model)]
            waiting = tuple(s.name for s in readers if s.name not in done or
                            any(is_model(o) and o not in gone for o in s.outputs))
            files = weight_files(model)
            size = sum(_size(f) for f in files)
            if waiting:
                rows.append(Pruned(run_dir, model, "kept", size, waiting))
                continue
            gone.add(model)
            if not dry_run:
                digest = manifest.digest(model)  # before: what the readers' keys hashed
                for f in files:
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
                manifest.release(model, digest)
            rows.append(Pruned(run_dir, model, "would release" if dry_run else "released", size))
    return rows[::-1]
