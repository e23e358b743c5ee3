"""Where a run or a study stands (`steptune status`): each stage of each run under a directory, done (how long it
took), out of date (the next run makes it again) or copied from another run, running (in which process) or
interrupted (a rerun resumes it) with what it has written so far, failed, or not started. A SmolLM2 study runs for a
day over many restarts; this answers "how far is it" from the files alone, without starting anything."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steptune.evaluation.eval import EPISODES_FILE, INJECTED_FILE, part_paths
from steptune.pipeline.layout import RunLayout
from steptune.pipeline.lock import holder, taken_at
from steptune.pipeline.manifest import Manifest, some_of

if TYPE_CHECKING:
    from steptune.pipeline.run import Run, Stage


def find_runs(path: Path) -> list[Path]:
    """`path` if it is a run directory, else every run below it (a study's seed-<S>, epoch-curve/epochs-<E>/seed-<S>,
    equal-steps/seed-<S> ...), in path order."""
    manifest = RunLayout(path).manifest
    if manifest.exists():
        return [path]
    return sorted(p.parent for p in path.rglob(manifest.name))


def run_status(run: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The stages the run has started, in the order it started them ({stage, state, seconds, parts, progress}), and the
    names of the stages it runs that it has not started yet."""
    from steptune.pipeline.config import PipelineConfig
    from steptune.pipeline.run import Run

    layout = RunLayout(run)
    manifest = Manifest(run)
    env = manifest.data.get("config", {}).get("env", {}).get("name", "")
    held = holder(run)
    # a "running" record older than the holder's lock was left by an earlier process that was stopped or killed
    since = taken_at(run) if held else 0
    try:
        stages = (pipeline := Run(PipelineConfig.model_validate(manifest.data["config"]), run)).stages()
        outdated = _out_of_date(pipeline, stages)
    except Exception:  # noqa: BLE001 - a manifest from another version: show what it records
        stages, outdated = [], set()
    rows = []
    for name, rec in manifest.data.get("stages", {}).items():
        status = rec.get("status", "?")
        state = "out of date" if status == "done" and name in outdated else \
            "copied" if status == "done" and rec.get("reused_from") else \
            {"running": f"running (pid {held[0]})" if held and _started_at(rec.get("started")) >= since else
             "interrupted"}.get(status, status)
        progress = _done(manifest, layout, name, env) if status == "done" else rec.get("error", "") \
            if status == "failed" else _progress(layout, name, rec.get("started"))
        if name in outdated:
            progress = "; ".join(p for p in (OUT_OF_DATE if status == "done" else RESTARTS, progress) if p)
        rows.append({"stage": name, "state": state, "seconds": rec.get("seconds"), "parts": rec.get("parts", 1),
                     "progress": progress})
    started, only = {r["stage"] for r in rows}, manifest.data.get("only")
    # a partial run (an equal-steps or epoch-curve run) never runs the stages outside `only`
    return rows, [s.name for s in stages if s.name not in started and (only is None or s.name in only)]


OUT_OF_DATE = "its settings or inputs changed since: the next run makes it again"
RESTARTS = "its settings or inputs changed since it started: the next run starts it over"


def _out_of_date(run: Run, stages: list[Stage]) -> set[str]:
    """The recorded stages the next run of the config it last ran with makes again (or starts over): those whose key
    (settings and inputs) is no longer the one recorded, and everything that reads what they write. A config edited
    since, but not run, is not known here. Empty where the key cannot be computed without work a status must not do
    (a GGUF model not converted on this machine)."""
    from steptune.pipeline.run import _key, dependents

    if run.cfg.model.gguf_package:
        from steptune.models.gguf import is_converted

        if not is_converted(run.cfg.model.gguf_package):
            return set()
    out: set[str] = set()
    for stage in stages:
        recorded = run.manifest.data["stages"].get(stage.name, {})
        if stage.name in out or not recorded:
            continue
        try:
            key = _key(run, stage, stage.config())
        except Exception:  # noqa: BLE001 - e.g. an input deleted by hand: the next run will say what is wrong
            continue
        if recorded.get("key") != key:
            out.update(dependents(stages, stage.name))
    return out


def _done(manifest: Manifest, layout: RunLayout, stage: str, env: str) -> str:
    """What is worth knowing of a finished stage: its weights were released, or trained again in place (did the
    losses repeat?), the code it ran has changed since."""
    kind, _, name = stage.partition(":")
    notes = ["weights released (steptune prune)"] if kind == "train" and manifest.released(layout.model_dir(name)) \
        else []
    for model, found in (manifest.data["stages"][stage].get("info") or {}).get("retrained_in_place", {}).items():
        same = {True: "the same losses", False: "its losses differ from the released model's"}
        notes.append(f"{model} trained again in place: {same.get(found['same_losses'], 'no earlier log to compare')}")
    if changed := manifest.code_changes(stage, env):
        notes.append(f"made by other code: {some_of(changed, 2)} changed since")
    return "; ".join(notes)


def _progress(layout: RunLayout, stage: str, started: str | None = None) -> str:
    """What an unfinished stage has written: the files a rerun resumes from (training: and how long the rest takes at
    the pace of its last two checkpoints, if the run that started at `started` saved both)."""
    kind, _, name = stage.partition(":")
    if kind == "train":
        from steptune.training.sft import CHECKPOINTS, TRAINER_STATE, complete_checkpoints

        if not (checkpoints := complete_checkpoints(layout.model_dir(name) / CHECKPOINTS)):
            return "no checkpoint yet"
        s = json.loads((checkpoints[-1] / TRAINER_STATE).read_text())
        step, total = s.get("global_step"), s.get("max_steps")
        saved = f"step {step} of {total} saved"
        if (pace := _seconds_per_step(checkpoints[-2:], started)) is None or not step or not total:
            return saved
        lately = f"{pace:.0f}" if pace >= 10 else f"{pace:.2g}"  # a tiny model's step: 0.4 s
        return f"{saved}; {lately} s a step lately, ~{_duration((total - step) * pace)} of training left"
    if kind == "eval":
        plain, injected = (_written(layout.eval_dir(name) / file, what) for file, what in
                           ((EPISODES_FILE, "episodes written"), (INJECTED_FILE, "with the injected error")))
        return "; ".join(part for part in (plain, injected) if part)
    if kind == "synthesize":
        return _written(layout.dataset("synthesized"), "stage-2 episodes written")
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def _seconds_per_step(checkpoints: list[Path], started: str | None) -> float | None:
    """Seconds per optimizer step between two checkpoints (when each wrote its state, the last file it writes), if
    the run that started at `started` saved both (a pause between runs is no step's time)."""
    from steptune.training.sft import TRAINER_STATE

    if len(checkpoints) < 2 or started is None:
        return None
    (first, a), (last, b) = ((p.stat().st_mtime, json.loads(p.read_text())["global_step"])
                             for p in (c / TRAINER_STATE for c in checkpoints))
    steps = b - a
    if first < _started_at(started) or steps <= 0 or last <= first:
        return None
    return (last - first) / steps


def _started_at(started: str | None) -> float:
    """A stage record's `started` (the manifest's local time, to the second) in seconds since the epoch; 0 if none."""
    return time.mktime(time.strptime(started, "%Y-%m-%dT%H:%M:%S")) if started else 0.0


def _written(path: Path, what: str) -> str:
    """"N of M <what> (W won)": the records in a trajectory file, of those its run will write when done (if the
    writer noted it), and how many of them succeeded; "" for a file not started."""
    from steptune.data.trajectory import iter_trajectories, planned_path

    planned = planned_path(path)
    if not path.exists() and not planned.exists():
        return ""
    # with the shards' files of an evaluation in several processes; a line torn by a kill is set aside (the writer
    # drops it when the run resumes)
    records = list({t.id: t for p in [path, *part_paths(path)] if p.exists()
                    for t in iter_trajectories(p, errors=[])}.values())
    of = f" of {planned.read_text().strip()}" if planned.exists() else ""
    won = f" ({sum(t.success for t in records)} won)" if records else ""
    return f"{len(records)}{of} {what}{won}"


def print_status(path: Path, console) -> None:
    """Every run under `path`: a table of the stages it started, then those it has not."""
    from rich.table import Table

    for run in find_runs(path):
        rows, not_started = run_status(run)
        console.print(f"[bold]{run}[/bold]")
        table = Table(show_edge=False, pad_edge=False)
        for col in ("stage", "state", "time", "so far"):
            table.add_column(col, overflow="fold")
        for row in rows:
            seconds = row["seconds"]
            time = "" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
            if time and row["parts"] > 1:  # resumed: the earlier runs' time is not known
                time += f", last of {row['parts']} runs"
            style = None if row["state"] in ("done", "copied") else "yellow"
            table.add_row(row["stage"], row["state"], time, row["progress"], style=style)
        console.print(table)
        if not_started:
            console.print(f"[dim]not started: {', '.join(not_started)}[/dim]")
        console.print()
