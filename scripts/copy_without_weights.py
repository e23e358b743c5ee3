"""Copy a study's (or a run's) directory without model weights: what a long study on a machine that may be replaced
keeps in git between sessions, and what anyone can re-aggregate or inspect without the models.

    steptune prune /work/runs/study-smollm2          # release the weights nothing left to run reads
    python scripts/copy_without_weights.py /work/runs/study-smollm2 docs/results/study-smollm2-runs
    # on a new machine: cp -r docs/results/study-smollm2-runs /work/runs/study-smollm2, then the same study command

Every run's manifest, data sets, evaluations and report are copied as they are (a stage that was writing resumes
from its partial file). Of a model only its train_summary.json and train log come along: one that `steptune prune`
released stays released (with the log of those weights, should they be training again in place), and a finished
one that was not is recorded as released in the copy, with the digest its readers hashed. Its stage stays done and
so do its readers; a stage that still needs its weights trains it again in place with the same settings, data and
seed (`steptune.pipeline.run.retrain_released`), so nothing that read it (stage 2, say) runs again. A model whose
training had not finished is left out: its training starts over. The destination is replaced.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pydantic import ValidationError

from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.layout import RELEASED_LOG
from steptune.pipeline.lock import LOCK_FILE
from steptune.pipeline.manifest import Manifest
from steptune.pipeline.run import Run
from steptune.pipeline.status import find_runs
from steptune.training.sft import SUMMARY, TRAIN_LOG

MODEL_RECORDS = {SUMMARY, TRAIN_LOG, RELEASED_LOG}  # what the reports and the study read of a finished model


def finished_outputs(run: Path, manifest: Manifest) -> set[Path]:
    """What the run's finished stages wrote (its stages as the pipeline lists them); none for a manifest whose config
    this version cannot read."""
    try:
        stages = Run(PipelineConfig.model_validate(manifest.data["config"]), run).stages()
    except (KeyError, ValidationError):
        return set()
    return {out for s in stages if manifest.data["stages"].get(s.name, {}).get("status") == "done" for out in s.outputs}


def copy_run(run: Path, dest: Path) -> tuple[list[str], list[str]]:
    """Copy one run directory; (the models released in the copy only, the models left out)."""
    manifest, left_out = Manifest(run), []
    finished = finished_outputs(run, manifest)

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder)
        if here == run / "models":
            skip = {n for n in names if (here / n).is_symlink()
                    or not (manifest.released(here / n) or here / n in finished)}
            left_out.extend(sorted(skip))
            return skip
        if here.parent == run / "models":  # its weights stay behind; its tokenizer comes with steptune
            return set(names) - MODEL_RECORDS
        return {n for n in names if n.endswith((".tmp", ".partial")) or n == LOCK_FILE}  # whose process is gone

    shutil.copytree(run, dest, ignore=ignore)
    copied, released_here = Manifest(dest), []
    for model in sorted((dest / "models").iterdir() if (dest / "models").exists() else []):
        if run / "models" / model.name not in finished and (model / RELEASED_LOG).exists():  # released and being
            shutil.copy2(model / RELEASED_LOG, model / TRAIN_LOG)  # trained again in place: the whole log, not a part
        if not copied.released(model):
            copied.release(model, manifest.digest(run / "models" / model.name))
            released_here.append(model.name)
    return released_here, left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    runs = find_runs(args.source)
    if not runs:
        raise SystemExit(f"no run under {args.source}")
    if args.dest.exists():
        if any(args.dest.iterdir()) and not find_runs(args.dest):
            raise SystemExit(f"{args.dest} holds something other than an earlier copy: not replacing it")
        shutil.rmtree(args.dest)
    for run in runs:
        released_here, left_out = copy_run(run, args.dest / run.relative_to(args.source))
        print(f"{run}: copied"
              + (f"; released in the copy (they train again in place where needed): {', '.join(released_here)}"
                 if released_here else "")
              + (f"; left out (training not finished): {', '.join(left_out)}" if left_out else ""))
    if runs != [args.source]:  # a study: its own files too (study.json, epoch_curve.json ...)
        for path in sorted(p for p in args.source.glob("*") if p.is_file()):
            shutil.copy2(path, args.dest / path.name)
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"{args.dest}: {size / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
