"""CLI commands: agent (`eval`, `report`, `serve`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from steptune.cli.app import app
from steptune.data.react import REACT_MAX_NEW_TOKENS
from steptune.errors import UserError


def _config_file(config: Path | None) -> dict:
    if config is None:
        return {}
    try:
        base = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--config {config}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--config {config}: not a JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(base, dict):
        raise UserError(f"--config {config}: expected a JSON object of EvalConfig fields")
    return base


def check_eval_config(fields: dict):
    """The EvalConfig, with what a user can get wrong checked before the evaluation writes anything (its
    config.json and episodes.jsonl): missing options, an unknown environment, a local model that is not there."""
    from pydantic import ValidationError

    from steptune.backends import parse_backend_spec
    from steptune.data.trajectory import describe_validation_error
    from steptune.envs.registry import ENVS
    from steptune.evaluation.eval import EvalConfig
    from steptune.models.gguf import check_model_path

    missing = [k for k in ("model", "env", "out") if not fields.get(k)]
    if missing:
        raise UserError(f"missing {', '.join('--' + m for m in missing)} (or give them in --config)")
    try:
        cfg = EvalConfig(**fields)
    except ValidationError as e:
        raise UserError(f"invalid evaluation config: {describe_validation_error(e)}") from None
    if cfg.env not in ENVS:
        raise UserError(f"--env {cfg.env}: unknown environment; choose one of {', '.join(ENVS)}")
    try:
        backend = parse_backend_spec(cfg.model) if isinstance(cfg.model, str) else cfg.model
    except ValueError as e:
        raise UserError(f"--model {cfg.model}: {e}") from None
    if backend.kind in ("local", "vllm"):
        check_model_path(backend.model)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory")
    return cfg


@app.command("eval")
def eval_cmd(
    model: Annotated[str | None, typer.Option(help="Model path, or backend spec (local:PATH, openai:MODEL@URL, vllm:PATH).")] = None,
    env: Annotated[str | None, typer.Option(help="Environment: sciworld, twx, alfworld, ...")] = None,
    split: Annotated[list[str] | None, typer.Option(help="Split(s) to evaluate (repeatable; default unseen).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks of each split.")] = None,
    workers: Annotated[int, typer.Option(help="Concurrent episodes (environment processes).")] = 4,
    out: Annotated[Path | None, typer.Option(help="Run directory (episodes.jsonl, summary.json); reruns resume.")] = None,
    config: Annotated[Path | None, typer.Option(help="EvalConfig JSON file; command-line options override it.")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = REACT_MAX_NEW_TOKENS,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    name: Annotated[str | None, typer.Option(help="Label for reports.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    inject_error: Annotated[bool, typer.Option(
        "--inject-error", help="Recovery benchmark: also run every task with one injected wrong action (expert steps "
        "up to the injection step, then a valid off-plan action, else an invalid one; then the agent alone).")] = False,
    inject_step: Annotated[int | None, typer.Option(
        min=1, help="Inject at this agent step (1-based); default: drawn per task from 1..--inject-max-step.")] = None,
    inject_max_step: Annotated[int, typer.Option(min=1, help="Upper end of the drawn injection step.")] = 3,
    inject_seed: Annotated[int, typer.Option(help="Seed of the drawn steps and errors (same for every model).")] = 0,
    max_repeats: Annotated[int | None, typer.Option(
        min=2, help="End an episode, lost, once the agent took one action with one result this many times in a row "
        "(default: play to the step budget).")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="The episodes in this many processes, in shards, one torch thread each (a small model on a CPU "
        "keeps one core busy).")] = None,
) -> None:
    """Evaluate an agent on an environment split; resumable; writes episodes.jsonl and summary.json (and with
    --inject-error, injected.jsonl and the recovery metrics)."""
    from steptune.evaluation.eval import evaluate

    base = _config_file(config)
    overrides = {"model": model, "env": env, "out": str(out) if out else None, "limit": limit, "name": name}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if split or not config:
        base["splits"] = split or ["unseen"]
    if not config or workers != 4:
        base["workers"] = workers
    if not config or max_new_tokens != REACT_MAX_NEW_TOKENS:
        base["max_new_tokens"] = max_new_tokens
    if not config or temperature != 0.0:
        base["temperature"] = temperature
    if max_repeats is not None:
        base["max_repeats"] = max_repeats
    if processes is not None:
        base["processes"] = processes
    if inject_error:
        base["inject"] = {"step": inject_step, "max_step": inject_max_step, "seed": inject_seed}
    summary = evaluate(check_eval_config(base), progress=not quiet)
    for sp, agg in summary["splits"].items():
        typer.echo(f"{sp}: reward {agg['avg_reward']:.1f}  success {agg['success_rate']:.1f}%  "
                   f"({agg['episodes']} episodes, {agg['failures']} failed)")
    for sp, inj in summary.get("injection", {}).items():
        rate = "–" if inj["recovery_rate"] is None else f"{inj['recovery_rate']:.2f}"
        steps = "–" if inj["steps_to_plan"] is None else f"{inj['steps_to_plan']:.1f}"
        typer.echo(f"{sp} with an injected error: success {inj['success_rate']:.1f}%  recovery rate {rate}  "
                   f"back on plan {inj['back_on_plan'] or 0:.0f}% after {steps} steps")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Eval run directories to compare.")],
    out: Annotated[Path, typer.Option(help="Where report.md, report.html and rewards.png go.")],
) -> None:
    """Compare eval runs side by side: markdown table + HTML with plots."""
    from steptune.evaluation.report import write_report

    paths = write_report(run_dirs, out)
    typer.echo(paths["markdown"].read_text())
    typer.echo(f"wrote {paths['markdown']}, {paths['html']}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Local model directory (transformers, safetensors).")],
    port: Annotated[int, typer.Option()] = 8000,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    served_name: Annotated[str | None, typer.Option(help="Model name clients use (default: the path).")] = None,
) -> None:
    """Serve a local model over an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from steptune.agent.serve import serve as run_server

    run_server(model, host=host, port=port, model_name=served_name)
