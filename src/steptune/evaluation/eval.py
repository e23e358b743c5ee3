"""Evaluate an agent on an environment split: episodes to JSONL (resumable), a summary JSON.

Layout of an eval run directory:
  episodes.jsonl   one Trajectory per finished episode (meta: steps, invalid actions, truncations, failure, and
                   "stopped": "repeating" where `max_repeats` ended it)
  injected.jsonl   with `inject`: the same tasks again, each with one injected error (the recovery benchmark,
                   steptune.agent.injection; meta["injection"] says where, what, and when the agent got back)
  summary.json     average reward x100 and success rate, overall, per split and per task type; with `inject`,
                   the recovery metrics per split under "injection"
  config.json      the EvalConfig it ran with
A rerun with the same --out skips episodes already in episodes.jsonl, so a killed run loses at most the
episodes that were in flight and never duplicates one.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from steptune.agent.injection import InjectionConfig
from steptune.backends import BackendConfig, make_backend, parse_backend_spec
from steptune.backends.base import GenerationConfig
from steptune.data.react import REACT_MAX_NEW_TOKENS
from steptune.data.trajectory import Trajectory, TrajectoryWriter, iter_trajectories
from steptune.envs.base import TaskRef
from steptune.envs.pool import PoolSettings
from steptune.evaluation.recovery import injection_summary, steps_without_action

EPISODES_FILE = "episodes.jsonl"
INJECTED_FILE = "injected.jsonl"
SUMMARY_FILE = "summary.json"


class EvalSettings(BaseModel):
    """What a user chooses about evaluation (the pipeline's `eval:` section is these settings)."""

    model_config = ConfigDict(extra="forbid")
    # settings added after runs existed, whose default does what those runs did: they stay up to date
    added_defaults: ClassVar[dict[str, Any]] = {"max_repeats": None}

    splits: list[str] = Field(default_factory=lambda: ["unseen"], min_length=1)
    limit: int | None = Field(None, ge=1)  # first N tasks of each split
    max_new_tokens: int = Field(REACT_MAX_NEW_TOKENS, ge=1)  # per agent turn
    temperature: float = Field(0.0, ge=0)
    top_p: float = 1.0
    seed: int | None = None
    max_context_tokens: int | None = None
    example: str | None = None  # one in-context example (text of a golden trajectory)
    inject: InjectionConfig | None = None  # also run every task with one injected error (the recovery benchmark)
    # end an episode, lost, once the agent has taken one action with one result this many times in a row. A greedy
    # agent that does not notice its mistake repeats it until the step budget ends, and those steps, with the longest
    # prompts, are most of an evaluation's time (docs/smollm2.md). None: every episode plays to its step budget
    max_repeats: int | None = Field(None, ge=2)


class EvalConfig(EvalSettings, PoolSettings):
    speed_only: ClassVar[frozenset[str]] = PoolSettings.speed_only | {"processes"}
    model: str | BackendConfig  # a backend spec string (see steptune.backends) or a full config
    tasks: list[str] | None = None  # only these task ids (TaskRef.id), e.g. the U2 tasks of a run
    workers: int = 4
    out: str
    name: str | None = None  # label in reports; defaults to the out directory's name
    # N > 1: the episodes in N shards, each in a process of its own with one torch thread, each writing a file of its
    # own (episodes.part<k>.jsonl, gathered into episodes.jsonl as the evaluation ends). On this project's 2-core
    # machine an evaluation played as fast on 2 threads as on 1 (117 s and 120 s for 16 SmolLM2 episodes), and two
    # at once, one thread each, took 134 s: one process left a core idle
    processes: int = Field(1, ge=1)


def evaluate(cfg: EvalConfig, progress: bool | str = True) -> dict:
    """Run the not-yet-finished episodes of every split, then (re)write and return the summary."""
    backend_cfg = parse_backend_spec(cfg.model) if isinstance(cfg.model, str) else cfg.model
    if backend_cfg.kind != "openai":
        from steptune.models.gguf import check_model_path

        check_model_path(backend_cfg.model, "model")  # before anything is written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    runs = [(EPISODES_FILE, None)] + ([(INJECTED_FILE, cfg.inject)] if cfg.inject else [])
    tasks = _tasks(cfg)
    plays = []
    for filename, injection in runs:
        path = out / filename
        gather_parts(path)  # what a killed sharded run wrote
        with TrajectoryWriter(path, planned=len(tasks)) as writer:  # notes the count for `steptune status`
            todo = [t for t in tasks if f"{t.split}:{t.id}" not in writer.done_ids]
        plays.append(_Play(path, injection, todo))
    if cfg.processes > 1:
        _play_in_shards(cfg, backend_cfg, plays, progress)
    else:
        _play(cfg, backend_cfg, plays, progress)
    played = {filename: load_episodes(out, filename) for filename, _ in runs}
    summary = summarize(played[EPISODES_FILE], name=cfg.name or out.name, model=backend_cfg.model, env=cfg.env)
    if cfg.inject:
        summary["injection"] = injection_summary(played[EPISODES_FILE], played[INJECTED_FILE])
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    warn_of_replies_without_action(cfg, played)
    return summary


def warn_of_replies_without_action(cfg: EvalConfig, played: dict[str, list[Trajectory]], share: float = 0.05) -> None:
    """Say on the console when more than `share` of an evaluation's steps had no action: an agent whose turns are
    cut by `max_new_tokens` loses those steps, and the success rate measures the budget, not the agent (the tiny
    coin study's were mostly replies without the label or with two action lines, which the budget does not cause)."""
    from rich.console import Console

    for filename, trajs in played.items():
        missing, steps = steps_without_action(trajs)
        if steps and missing > share * steps:
            Console(stderr=True).print(
                f"[yellow]warning: {cfg.name or Path(cfg.out).name} ({filename}): {missing} of {steps} agent steps had "
                f"no `Action:`: replies without an `Action:` line or with more than one, or turns cut at "
                f"max_new_tokens = {cfg.max_new_tokens}[/yellow]")


def _tasks(cfg: EvalConfig) -> list[TaskRef]:
    from steptune.envs.registry import make_env

    spec = make_env(cfg.env, **cfg.env_kwargs)  # lists tasks; starts no simulator
    wanted = set(cfg.tasks) if cfg.tasks is not None else None
    return [t for split in cfg.splits for t in spec.tasks(split)[: cfg.limit] if wanted is None or t.id in wanted]


@dataclass
class _Play:
    """Episodes to play into a file: the tasks, with one injected error each or none."""

    path: Path
    injection: InjectionConfig | None
    tasks: list[TaskRef]
    label: str | None = None  # the progress bar's, if not the evaluation's


def _play(cfg: EvalConfig, backend_cfg: BackendConfig, plays: list[_Play], progress: bool | str) -> None:
    """Play `plays` in this process, one environment pool and one model for all of them."""
    from steptune.agent.rollout import run_episodes

    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                           seed=cfg.seed)
    if not any(p.tasks for p in plays):
        return
    pool = cfg.open_pool()
    backend = make_backend(backend_cfg)
    try:
        for play in (p for p in plays if p.tasks):  # what `evaluate` found missing from its file
            with TrajectoryWriter(play.path) as writer:
                run_episodes(pool, play.tasks, backend, gen, max_context_tokens=cfg.max_context_tokens,
                             example=cfg.example, progress=progress and (play.label or progress),
                             injection=play.injection, max_repeats=cfg.max_repeats,
                             on_episode_end=lambda ep, w=writer: w.write(ep.trajectory))
    finally:
        pool.close()
        backend.close()


def _play_in_shards(cfg: EvalConfig, backend_cfg: BackendConfig, plays: list[_Play], progress: bool | str) -> None:
    """`cfg.processes` processes (spawned: this one may hold torch's threads), one torch thread each; process k
    plays every n-th task of each file from the k-th, the injected ones first (lost more often, they run longer),
    into the file's part k; then each file gathers its parts. The first failure is raised once every process has
    ended."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from steptune.threads import beside_parent

    n = cfg.processes
    label = progress if isinstance(progress, str) else Path(cfg.out).name
    shards = [[_Play(part_path(p.path, k), p.injection, p.tasks[k::n],
                     f"{label} ({'injected' if p.injection else 'plain'} {k + 1}/{n})") for p in reversed(plays)]
              for k in range(n)]
    with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=beside_parent,
                             initargs=(os.getpid(),)) as workers:
        futures = [workers.submit(_play, cfg, backend_cfg, shard, progress) for shard in shards]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
    for p in plays:
        gather_parts(p.path)
    if errors:
        raise errors[0]


def part_path(path: Path, k: int) -> Path:
    """Shard k's file of an evaluation file: episodes.jsonl -> episodes.part<k>.jsonl."""
    return path.with_name(f"{path.stem}.part{k}{path.suffix}")


def part_paths(path: Path) -> list[Path]:
    """The shards' files of an evaluation file that are there (a sharded evaluation playing, or killed)."""
    return sorted(path.parent.glob(f"{path.stem}.part*{path.suffix}"))


def gather_parts(path: Path) -> None:
    """Append the shards' records that `path` lacks to it, then delete the shards' files. A torn last line (a kill)
    is left out, of `path` as of a shard's file: its episode plays again. Killed half-way, it is done again with the
    same result."""
    parts = part_paths(path)
    if not parts and not path.exists():
        return
    with TrajectoryWriter(path) as writer:
        for part in parts:
            for t in iter_trajectories(part, errors=[]):
                writer.write(t)
    for part in parts:
        part.unlink()


def load_episodes(run_dir: str | Path, filename: str = EPISODES_FILE) -> list[Trajectory]:
    path = Path(run_dir) / filename
    return list(iter_trajectories(path)) if path.exists() else []


def _aggregate(trajs: list[Trajectory]) -> dict[str, float | int]:
    n = len(trajs)
    return {
        "episodes": n,
        "avg_reward": round(100 * sum(t.reward for t in trajs) / n, 2) if n else 0.0,
        "success_rate": round(100 * sum(t.success for t in trajs) / n, 2) if n else 0.0,
        "avg_steps": round(sum(t.meta.get("steps_taken", len(t.steps)) for t in trajs) / n, 2) if n else 0.0,
        "invalid_actions": sum(t.meta.get("invalid_actions", 0) for t in trajs),
        # replies with no single `Action:` line: none, two, or a turn cut by the token budget
        "steps_without_action": steps_without_action(trajs)[0],
        "truncations": sum(t.meta.get("truncations", 0) for t in trajs),
        "failures": sum(t.meta.get("failure") is not None for t in trajs),
        "stopped_repeating": sum(t.meta.get("stopped") == "repeating" for t in trajs),  # by `max_repeats`
    }


def summarize(trajs: list[Trajectory], **header: Any) -> dict:
    """Average reward (x100) and success rate (%) overall, per split and per (split, task type)."""
    by_split: dict[str, list[Trajectory]] = defaultdict(list)
    by_type: dict[str, dict[str, list[Trajectory]]] = defaultdict(lambda: defaultdict(list))
    for t in trajs:
        split = t.split or "unknown"
        by_split[split].append(t)
        by_type[split][t.task_type].append(t)
    return {
        **header,
        "overall": _aggregate(trajs),
        "splits": {s: _aggregate(v) for s, v in sorted(by_split.items())},
        "task_types": {s: {k: _aggregate(v) for k, v in sorted(types.items())} for s, types in sorted(by_type.items())},
    }
