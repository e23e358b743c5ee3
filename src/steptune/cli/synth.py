"""CLI commands: stage 2 (`synthesize`, `filter`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from steptune.cli.app import app


@app.command()
def synthesize(
    model: str = typer.Option(..., help="The base agent: local:PATH, vllm:PATH or openai:MODEL@URL."),
    env: str = typer.Option(..., help="An environment of steptune.envs.registry (twx, sciworld, ...)."),
    out: Path = typer.Option(..., help="Output JSONL (resumable)."),
    split: str = typer.Option("train"),
    limit: Optional[int] = typer.Option(None, help="First N tasks of the split."),
    samples: int = typer.Option(1, help="Rollouts per task."),
    temperature: float = typer.Option(0.0),
    teacher: str = typer.Option("expert", help="A teacher of steptune.teacher.registry: expert, llm, self, mc (the student's own rollouts), ..."),
    teacher_model: Optional[str] = typer.Option(None, help="LLM teacher backend spec, e.g. openai:Qwen1.5-110B-Chat@http://host:8000/v1"),
    teacher_api_key_env: str = typer.Option("OPENAI_API_KEY", help="Name of the variable holding the teacher's API key."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Name of the variable holding the base agent's API key (openai:)."),
    golden: Optional[Path] = typer.Option(None, help="Golden trajectories shown to an LLM teacher as reference."),
    workers: int = typer.Option(2, help="Environment processes."),
    env_kwargs: str = typer.Option("{}", help="Adapter options as JSON."),
    env_backend: str = typer.Option("process", help="process (this machine) | ray (Ray actors: pip install 'steptune[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="With --env-backend ray: the cluster, e.g. ray://head:10001 "
                                                         "(default: RAY_ADDRESS, else a local Ray instance)."),
) -> None:
    """Run the base agent with a teacher judging every step; write self-reflected trajectories."""
    from steptune.backends import parse_backend_spec
    from steptune.synthesis.synthesize import SynthesisConfig
    from steptune.synthesis.synthesize import synthesize as run

    student = parse_backend_spec(model).model_copy(update={"api_key_env": api_key_env})
    teacher_settings: dict = {"name": teacher}
    if teacher_model:
        teacher_settings["backend"] = parse_backend_spec(teacher_model).model_copy(
            update={"api_key_env": teacher_api_key_env})
    stats = run(SynthesisConfig(student=student, env=env, env_kwargs=json.loads(env_kwargs), split=split, limit=limit,
                                samples_per_task=samples, temperature=temperature, teacher=teacher_settings,
                                golden=str(golden) if golden else None, workers=workers, env_backend=env_backend,
                                ray_address=ray_address, out=str(out)))
    typer.echo(json.dumps(stats, indent=2))


@app.command("filter")
def filter_cmd(
    src: Path = typer.Argument(..., exists=True, dir_okay=False),
    dst: Path = typer.Argument(...),
    max_errors: int = typer.Option(2, help="Keep successful trajectories with at most this many wrong steps."),
    keep_error_free: bool = typer.Option(True, help="Keep successes without any wrong step."),
) -> None:
    """Keep successful self-reflected trajectories with at most k erroneous steps."""
    from steptune.data.trajectory import load_trajectories, save_trajectories
    from steptune.synthesis.filtering import FilterConfig, filter_trajectories

    kept, report = filter_trajectories(load_trajectories(src), FilterConfig(max_errors=max_errors,
                                                                             keep_error_free=keep_error_free))
    save_trajectories(kept, dst)
    typer.echo(json.dumps(report, indent=2))
