"""CLI commands: the whole pipeline (`run`, `quickstart`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steptune.cli.app import app

PRESETS_DIR = Path(__file__).resolve().parent.parent / "resources" / "presets"


def _run(config: Path, output: Optional[Path], from_stage: Optional[str], overrides: list[str],
         until_stage: Optional[str] = None) -> Path:
    import yaml

    from steptune.pipeline.config import ConfigError, load_config
    from steptune.pipeline.manifest import UnknownStageError
    from steptune.pipeline.report import print_summary
    from steptune.pipeline.run import run_pipeline

    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects KEY=VALUE (e.g. train.max_steps=100), got {item!r}")
        key, value = item.split("=", 1)
        parsed[key] = yaml.safe_load(value)
    try:
        cfg = load_config(config, parsed)
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from e
    try:
        run_dir = run_pipeline(cfg, output, from_stage, until_stage)
    except UnknownStageError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from e
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
    preset: str = typer.Option("quickstart", help="quickstart (≈10 min on 2 CPU cores) or smoke (≈2 min)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Rerun from this stage on."),
) -> None:
    """The whole pipeline offline on TextWorldExpress with a tiny Llama and the expert-grounded teacher."""
    config = PRESETS_DIR / f"{preset}.yaml"
    if not config.exists():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of: {names}")
    _run(config, output, from_stage, [])
