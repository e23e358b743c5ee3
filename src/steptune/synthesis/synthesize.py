"""STeP stage 2: run the base agent on the U2 tasks while a teacher judges every step in real time.

Each finished episode is appended to the output JSONL as soon as it ends (resumable: a rerun skips the
(task, sample) pairs already there). Wrong steps stay with weight 0, each followed by the teacher's
reflection-and-correction step (weight 1) that was executed in the environment.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from steptune.agent.backends import BackendConfig, make_backend
from steptune.agent.backends.base import GenerationConfig
from steptune.data.trajectory import Trajectory, TrajectoryWriter, load_trajectories
from steptune.envs.base import TaskRef


class SynthesisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student: str | BackendConfig  # backend spec of the base agent: local:PATH, vllm:PATH, openai:MODEL@URL
    env: str
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    split: str = "train"
    tasks: list[str] | None = None  # task ids (TaskRef.id) to run; default: the split's first `limit`
    limit: int | None = None
    samples_per_task: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 128
    workers: int = 2
    teacher: Literal["expert", "llm", "self"] = "expert"
    teacher_model: str | BackendConfig | None = None  # backend spec of the LLM teacher
    golden: str | None = None  # golden trajectories (JSONL) shown to the LLM teacher as a reference
    out: str
    seed: int = 0


def make_teacher(cfg: SynthesisConfig, student_backend):
    if cfg.teacher == "expert":
        from steptune.teacher.expert import ExpertTeacher

        return ExpertTeacher()
    from steptune.teacher.llm import LLMTeacher

    golden = {}
    if cfg.golden:
        for t in load_trajectories(cfg.golden):
            golden[t.id] = "\n".join(f"Action: {s.action}" for s in t.steps)
    if cfg.teacher == "self":
        return LLMTeacher(student_backend, name="self", self_teacher=True, golden=golden)
    if not cfg.teacher_model:
        raise ValueError("teacher 'llm' needs teacher_model (a backend spec, e.g. openai:Qwen2-72B@http://host/v1)")
    return LLMTeacher(make_backend(cfg.teacher_model), name="llm", golden=golden)


def synthesize(cfg: SynthesisConfig, pool_factory=None, progress: bool = True) -> dict:
    from steptune.agent.rollout import derive_seed, run_episodes

    if pool_factory is None:
        from steptune.envs.pool import EnvPool as pool_factory  # noqa: N813
    out = Path(cfg.out)
    pool = pool_factory(cfg.env, cfg.workers, cfg.env_kwargs or None)
    try:
        all_tasks = pool.tasks(cfg.split)
        if cfg.tasks is not None:
            wanted = set(cfg.tasks)
            all_tasks = [t for t in all_tasks if t.id in wanted]
        tasks = all_tasks[: cfg.limit]
        with TrajectoryWriter(out) as writer:
            jobs: list[tuple[TaskRef, int]] = [(t, k) for k in range(cfg.samples_per_task) for t in tasks
                                               if _record_id(t, k) not in writer.done_ids]
            if not jobs:
                return summarize(out)
            backend = make_backend(cfg.student)
            teacher = make_teacher(cfg, backend)
            gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)

            def write(ep, k: int) -> None:
                ep.trajectory.id = _record_id(ep.task, k)
                ep.trajectory.meta.update({"sample": k, "teacher": teacher.name})
                writer.write(ep.trajectory)

            for k in range(cfg.samples_per_task):  # one pass per sample index keeps ids deterministic
                batch = [t for t, kk in jobs if kk == k]
                if batch:  # sample k of a task draws from seeds derived from (seed, k, task, step): see rollout
                    run_episodes(pool, batch, backend, replace(gen, seed=derive_seed(cfg.seed, k)), judge=teacher,
                                 progress=progress,
                                 on_episode_end=lambda ep, k=k: write(ep, k))
            (out.parent / (out.stem + "_teacher.json")).write_text(json.dumps(teacher.stats(), indent=2))
            backend.close()
    finally:
        pool.close()
    return summarize(out)


def _record_id(task: TaskRef, sample: int) -> str:
    return f"{task.split}:{task.id}#{sample}"


def summarize(path: str | Path) -> dict:
    trajs = load_trajectories(path) if Path(path).exists() else []
    return synthesis_stats(trajs)


def synthesis_stats(trajs: list[Trajectory]) -> dict:
    n = len(trajs)
    with_err = [t for t in trajs if t.n_errors]
    return {
        "episodes": n,
        "success_rate": round(100 * sum(t.success for t in trajs) / n, 1) if n else 0.0,
        "steps": sum(len(t.steps) for t in trajs),
        "flagged_steps": sum(t.n_errors for t in trajs),
        "episodes_with_errors": len(with_err),
        "errors_per_episode": round(sum(t.n_errors for t in trajs) / n, 2) if n else 0.0,
        # recovery rate: of the episodes where the teacher flagged an error, how many still succeeded
        "recovery_rate": round(100 * sum(t.success for t in with_err) / len(with_err), 1) if with_err else 0.0,
    }
