"""CLI commands: environments (`expert`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from steptune.cli.app import app


@app.command()
def expert(
    env: str = typer.Option(..., help="An environment of steptune.envs.registry (twx, sciworld, ...)."),
    split: str = typer.Option("train", help="train | seen | unseen"),
    out: Path = typer.Option(..., help="Output JSONL (resumable: tasks already in it are skipped)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N tasks of the split."),
    workers: int = typer.Option(2, help="Environment processes."),
    env_kwargs: str = typer.Option("{}", help='Adapter options as JSON, e.g. \'{"game": "twc"}\'.'),
    thought_model: Optional[str] = typer.Option(None, help="Backend spec of an LLM that writes the thoughts."),
) -> None:
    """Write golden trajectories from the environment's expert (gold path / planner), replayed to success."""
    from steptune.synthesis.golden import check_drops, write_expert_trajectories

    backend = None
    if thought_model:
        from steptune.backends import make_backend

        backend = make_backend(thought_model)
    stats = write_expert_trajectories(env, split, out, limit=limit, env_kwargs=json.loads(env_kwargs),
                                      workers=workers, thought_backend=backend)
    typer.echo(f"wrote {stats.written}, skipped {stats.skipped_done} already done, dropped {stats.dropped} "
               f"{stats.reasons or ''} → {out}")
    if warning := check_drops(stats, max_drop_fraction=1.0):  # here a warning, never an error
        typer.secho(warning, fg="yellow")
