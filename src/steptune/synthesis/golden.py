"""Golden (expert) trajectories from an environment's expert: the gold path or planner, replayed in the real
environment. A path that does not reach success is retried once and then dropped, with a count.

Each step gets a thought: from an LLM (`thought_backend`, as ETO did with GPT-4), else the expert's own words
(steptune.envs.expert.explain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steptune.backends.base import ChatBackend, GenerationConfig
from steptune.data.trajectory import Step, Trajectory, TrajectoryWriter
from steptune.envs.base import Reset, TaskRef
from steptune.envs.expert import explain
from steptune.envs.pool import EnvFailure, EnvPool
from steptune.errors import UserError

WARN_DROP_FRACTION = 0.1  # a golden set that lost more than this share of its tasks says so on the console


class GoldenDropError(UserError):
    """The expert failed on more of the golden tasks than the config allows."""


@dataclass
class ExpertStats:
    written: int = 0
    skipped_done: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, why: str) -> None:
        self.dropped += 1
        self.reasons[why] = self.reasons.get(why, 0) + 1

    @property
    def tasks(self) -> int:
        return self.written + self.skipped_done + self.dropped

    def describe_drops(self) -> str:
        """e.g. 'dropped 227 of 300 tasks (76%): expert path did not reach success x227'."""
        why = "; ".join(f"{reason} x{n}" for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return f"dropped {self.dropped} of {self.tasks} tasks ({100 * self.dropped / max(self.tasks, 1):.0f}%): {why}"


def check_drops(stats: ExpertStats, max_drop_fraction: float, setting: str = "golden.max_drop_fraction") -> str | None:
    """A warning when more than a tenth of the tasks were dropped (None otherwise); GoldenDropError when more than
    `max_drop_fraction` were: a golden set that quietly lost the tasks its expert cannot solve trains on the easy
    ones only, while the test tasks keep the hard ones. Dropped tasks are retried on every resume, so `stats` of a
    resumed call counts every drop of the set."""
    if not stats.tasks or stats.dropped <= WARN_DROP_FRACTION * stats.tasks:
        return None
    if stats.dropped > max_drop_fraction * stats.tasks:
        raise GoldenDropError(f"golden: the expert {stats.describe_drops()} — more than {setting} = "
                              f"{max_drop_fraction:g}; give the expert more steps (env max_steps), or set "
                              f"{setting} to train on what it solved")
    return f"golden: the expert {stats.describe_drops()}; the golden set keeps only the tasks it solved"


def _llm_thoughts(backend: ChatBackend, traj: Trajectory) -> None:
    """Ask an LLM for each step's thought (as ETO did with GPT-4), keeping the expert's actions."""
    convs = []
    for i, step in enumerate(traj.steps):
        history = "\n".join(f"Action: {s.action}\nObservation: {s.observation}" for s in traj.steps[:i])
        convs.append([{"role": "user", "content": (
            f"Task: {traj.task}\n{history}\nThe next action is: {step.action}\n"
            "In one or two sentences, in the first person, give the reasoning that leads to this action. "
            "Reply with the reasoning only.")}])
    for step, text in zip(traj.steps, backend.complete(convs, GenerationConfig(max_new_tokens=80))):
        if text.strip():
            step.thought = text.strip().splitlines()[0]


def write_expert_trajectories(env_name: str, split: str, out: str | Path, *, limit: int | None = None,
                              env_kwargs: dict[str, Any] | None = None, workers: int = 2,
                              thought_backend: ChatBackend | None = None, progress: bool = True) -> ExpertStats:
    """Replay the expert on the first `limit` tasks of `split`, writing successful trajectories to `out`
    (resumable: tasks already in the file are skipped)."""
    from rich.progress import Progress

    stats = ExpertStats()
    with EnvPool(env_name, workers, env_kwargs) as pool, TrajectoryWriter(out) as writer:
        tasks = pool.tasks(split)[:limit]
        todo = [t for t in tasks if t.id not in writer.done_ids]
        stats.skipped_done = len(tasks) - len(todo)
        with Progress(disable=not progress) as bar:
            job = bar.add_task(f"expert {env_name}/{split}", total=len(todo))
            for start in range(0, len(todo), pool.size):
                batch = todo[start:start + pool.size]
                for traj, why in _replay_batch(pool, batch, instruction=pool.instruction()):
                    if traj is None:
                        stats.drop(why)
                        continue
                    if thought_backend is not None:
                        _llm_thoughts(thought_backend, traj)
                    writer.write(traj)
                    stats.written += 1
                bar.advance(job, len(batch))
    return stats


def _replay_batch(pool: EnvPool, tasks: list[TaskRef], instruction: str, retries: int = 1):
    """Replay the expert on several tasks at once, one per slot; yields (trajectory | None, reason)."""
    pending = list(enumerate(tasks))
    for attempt in range(retries + 1):
        failed = []
        episodes: dict[int, tuple[TaskRef, Reset, list[Step], float, bool]] = {}
        for slot, task in pending:
            r = pool.reset(slot, task)
            if isinstance(r, EnvFailure):
                failed.append((slot, task, f"reset failed: {r.reason.splitlines()[0]}"))
            else:
                episodes[slot] = (task, r, [], 0.0, False)
        for _ in range(max((pool.max_steps(t) for _, t in pending), default=0)):
            active = [s for s, e in episodes.items() if not e[4]]
            if not active:
                break
            plans = {s: pool.expert_actions(s) for s in active}
            calls = [(s, plans[s][0]) for s in active if plans[s]]
            for s in active:
                if not plans[s]:
                    task, r, steps, rew, _ = episodes[s]
                    episodes[s] = (task, r, steps, rew, True)
            for (s, action), res in zip(calls, pool.step_many(calls)):
                task, r, steps, rew, _ = episodes[s]
                if isinstance(res, EnvFailure):
                    episodes[s] = (task, r, steps, -1.0, True)
                    continue
                last_obs = steps[-1].observation if steps else r.observation
                steps.append(Step(thought=explain(action, plans[s][1:], last_obs or ""), action=action,
                                  observation=res.observation, kind="expert"))
                episodes[s] = (task, r, steps, res.reward, res.done or bool(res.info.get("won")))
        for s, (task, r, steps, rew, _) in episodes.items():
            if rew >= 1.0:
                yield Trajectory(id=task.id, env=task.env, task_id=task.id, split=task.split,
                                 instruction=instruction, task=r.task, steps=steps, reward=1.0, success=True,
                                 meta={"task_type": task.name, "source": "expert", **r.info}), ""
            else:
                failed.append((s, task, "environment failure" if rew < 0 else "expert path did not reach success"))
        if attempt < retries:
            pending = [(s, t) for s, t, _ in failed]
        else:
            for _, _, why in failed:
                yield None, why
        if not failed:
            return
