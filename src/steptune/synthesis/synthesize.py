"""STeP stage 2: run the base agent on the U2 tasks while a teacher judges every step in real time.

Each finished episode is appended to the output JSONL as soon as it ends (resumable: a rerun skips the
(task, sample) pairs already there). Wrong steps stay with weight 0, each followed by the teacher's
reflection-and-correction step (weight 1) that was executed in the environment. Each record carries its
episode's teacher accounting (meta "teacher_counts": judged, unjudged, flagged, corrected, requests, failed
requests, unusable replies), so totals summed over the file cover every run that appended to it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from steptune.backends import BackendConfig, make_backend
from steptune.backends.base import GenerationConfig
from steptune.data.react import REACT_MAX_NEW_TOKENS
from steptune.data.trajectory import Trajectory, TrajectoryWriter, load_trajectories
from steptune.envs.base import TaskRef
from steptune.envs.pool import PoolSettings
from steptune.errors import UserError
from steptune.teacher.base import COUNT_KEYS, TeacherContext
from steptune.teacher.expert import ExpertSettings
from steptune.teacher.registry import AnyTeacher


class UnknownTasksError(UserError, ValueError):
    """Task ids (e.g. from an imported golden file) that the environment does not have."""


class SynthesisSettings(BaseModel):
    """What a user chooses about stage 2 (the pipeline's `synthesis:` section is these settings)."""

    model_config = ConfigDict(extra="forbid")

    teacher: AnyTeacher = Field(default_factory=ExpertSettings)  # steptune.teacher.registry
    samples_per_task: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)  # > 0 for several distinct samples per task
    limit: int | None = Field(None, ge=1)  # the first N tasks
    max_new_tokens: int = Field(REACT_MAX_NEW_TOKENS, ge=1)  # per agent turn
    seed: int | None = None  # sampling; None: the run's seed (0 outside a run)

    @model_validator(mode="before")
    @classmethod
    def _old_teacher_backend(cls, data: Any) -> Any:
        """`teacher: llm` with `teacher_backend: {...}` beside it: the layout before teachers had their own
        settings, still read for one release."""
        if isinstance(data, dict) and "teacher_backend" in data:
            data = dict(data)
            backend = data.pop("teacher_backend")
            if backend is not None:
                warnings.warn("synthesis.teacher_backend is deprecated: write teacher: {name: llm, backend: {...}}",
                              FutureWarning, stacklevel=2)
                data["teacher"] = {"name": data.get("teacher", "llm"), "backend": backend}
        return data


class SynthesisConfig(SynthesisSettings, PoolSettings):
    # typed backends, so that settings a spec string cannot carry (api_key_env, timeout_s, max_retries) arrive;
    # strings are parsed at the CLI edge (steptune.backends.parse_backend_spec)
    student: BackendConfig  # the base agent
    split: str = "train"
    tasks: list[str] | None = None  # task ids (TaskRef.id) to run; default: the split's first `limit`
    golden: str | None = None  # golden trajectories (JSONL) shown to an LLM teacher as a reference
    out: str


def synthesize(cfg: SynthesisConfig, progress: bool | str = True) -> dict:
    from steptune.agent.rollout import derive_seed, run_episodes

    out = Path(cfg.out)
    pool = cfg.open_pool()
    backend = teacher_backend = None
    try:
        all_tasks = pool.tasks(cfg.split)
        if cfg.tasks is not None:
            wanted = set(cfg.tasks)
            if unknown := sorted(wanted - {t.id for t in all_tasks}):
                raise UnknownTasksError(
                    f"{len(unknown)} of {len(wanted)} task ids are not tasks of {cfg.env}/{cfg.split} (e.g. "
                    f"{unknown[0]!r}); trajectories must name the environment's task in task_id, like "
                    f"{all_tasks[0].id if all_tasks else 'env/type/variation'!r}")
            all_tasks = [t for t in all_tasks if t.id in wanted]
        tasks = all_tasks[: cfg.limit]
        with TrajectoryWriter(out, planned=cfg.samples_per_task * len(tasks)) as writer:
            jobs: list[tuple[TaskRef, int]] = [(t, k) for k in range(cfg.samples_per_task) for t in tasks
                                               if _record_id(t, k) not in writer.done_ids]
            if jobs:
                backend = make_backend(cfg.student)
                seed = cfg.seed or 0
                teacher, teacher_backend = cfg.teacher.build(TeacherContext(
                    student=backend, golden=cfg.golden, workers=cfg.workers, seed=seed,
                    max_new_tokens=cfg.max_new_tokens,
                    make_pool=cfg.open_pool))
                gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed)

                def write(ep, k: int) -> None:
                    ep.trajectory.id = _record_id(ep.task, k)
                    ep.trajectory.meta.update({"sample": k, "teacher": teacher.name})
                    writer.write(ep.trajectory)

                for k in range(cfg.samples_per_task):  # one pass per sample index keeps ids deterministic
                    batch = [t for t, kk in jobs if kk == k]
                    if batch:  # sample k of a task draws from seeds derived from (seed, k, task, step): see rollout
                        run_episodes(pool, batch, backend, replace(gen, seed=derive_seed(seed, k)),
                                     teacher=teacher, progress=progress, on_episode_end=lambda ep, k=k: write(ep, k))
    finally:
        pool.close()
        for b in (teacher_backend, backend):
            if b is not None:
                b.close()
    stats = summarize(out)
    # the file's totals, not this run's: a resumed run must not report only its own part
    teacher_stats_path(out).write_text(json.dumps(stats["teacher"], indent=2))
    return stats


def teacher_stats_path(out: str | Path) -> Path:
    """Where synthesis writes the teacher's accounting for the trajectories in `out`: beside it."""
    out = Path(out)
    return out.parent / (out.stem + "_teacher.json")


def _record_id(task: TaskRef, sample: int) -> str:
    return f"{task.split}:{task.id}#{sample}"


def summarize(path: str | Path) -> dict:
    trajs = load_trajectories(path) if Path(path).exists() else []
    return synthesis_stats(trajs)


def synthesis_stats(trajs: list[Trajectory]) -> dict:
    """Episode figures and, under "teacher", the teacher's accounting summed over the episodes' records."""
    n = len(trajs)
    with_err = [t for t in trajs if t.n_errors]
    return {
        "episodes": n,
        "success_rate": round(100 * sum(t.success for t in trajs) / n, 1) if n else 0.0,
        "steps": sum(len(t.steps) for t in trajs),
        "flagged_steps": sum(t.n_errors for t in trajs),
        "episodes_with_errors": len(with_err),
        "errors_per_episode": round(sum(t.n_errors for t in trajs) / n, 2) if n else 0.0,
        # of the episodes where the teacher flagged an error, how many still succeeded (not the recovery benchmark's
        # recovery rate, steptune.evaluation.recovery: that one is success with an injected error ÷ without)
        "flagged_success_rate": round(100 * sum(t.success for t in with_err) / len(with_err), 1) if with_err else 0.0,
        "teacher": teacher_totals(trajs),
    }


def teacher_totals(trajs: list[Trajectory]) -> dict[str, int]:
    """The teacher counts (steptune.teacher.base.COUNT_KEYS) summed over the records, and how many records carry
    none (written before the counts existed, or without a teacher)."""
    totals = dict.fromkeys(COUNT_KEYS, 0)
    missing = 0
    for t in trajs:
        counts = t.meta.get("teacher_counts")
        if not isinstance(counts, dict):
            missing += 1
            continue
        for k in COUNT_KEYS:
            totals[k] += int(counts.get(k, 0))
    return {**totals, "episodes_without_counts": missing}
