"""CLI commands: data (`inspect`, `convert`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steptune.cli.app import app


@app.command()
def inspect(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="Trajectories (JSONL, any supported format)."),
    model: str = typer.Option(..., "--model", "-m", help="Tokenizer: hub id or local path."),
    index: list[int] = typer.Option([0], "--index", "-i", help="Which trajectories to show (repeatable)."),
    chat_template: Optional[str] = typer.Option(None, help="Override the model's chat template (chatml, llama2, ...)."),
    max_length: Optional[int] = typer.Option(None, help="Truncate as training would."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write the view as an HTML file."),
) -> None:
    """Show a trajectory's tokens with the trained spans marked, and per-kind counts: what will be learned."""
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from steptune.data.formats import read_any
    from steptune.data.inspect import to_html, to_rich, token_pieces, step_counts
    from steptune.data.templates import apply_chat_template_override

    console = Console()
    trajs = read_any(file)
    tokenizer = apply_chat_template_override(AutoTokenizer.from_pretrained(model), chat_template)
    pages = []
    for i in index:
        if not 0 <= i < len(trajs):
            raise typer.BadParameter(f"--index {i}: the file has {len(trajs)} trajectories")
        traj = trajs[i]
        pieces, enc = token_pieces(traj, tokenizer, max_length)
        counts = step_counts(traj, enc)
        console.rule(f"[bold]{traj.id}[/bold]  ({traj.env}, reward {traj.reward:.2f})")
        console.print(to_rich(pieces))
        table = Table("kind", "steps", "trained steps", "tokens", "trained tokens")
        for kind, c in counts.items():
            table.add_row(kind, *(str(c[k]) for k in ("steps", "trained_steps", "tokens", "trained_tokens")))
        console.print(table)
        console.print(f"{len(enc.input_ids)} tokens, {enc.n_trained_tokens} trained"
                      + (f", {enc.n_dropped_steps} steps dropped by truncation" if enc.n_dropped_steps else ""))
        pages.append(to_html(f"{traj.id} ({traj.env})", pieces, counts))
    if html_out:
        html_out.write_text("<hr>".join(pages), encoding="utf-8")
        console.print(f"HTML view: {html_out}")


@app.command()
def convert(
    src: Path = typer.Argument(..., exists=True, dir_okay=False),
    dst: Path = typer.Argument(...),
    to: str = typer.Option("steptune", help="steptune | openai (per-message weight) | sharegpt (per-turn loss)"),
    env: str = typer.Option("unknown", help="Environment name recorded on imported trajectories."),
) -> None:
    """Convert trajectories between formats (ETO/ShareGPT, OpenAI weight, Axolotl train, AgentGym loss)."""
    from steptune.data.formats import read_any, write_as

    n = write_as(read_any(src, env=env), dst, to)
    typer.echo(f"wrote {n} trajectories to {dst} ({to})")
