"""STeP stage 0: split the golden set by task into U1 (its trajectories D1 are trained on) and U2 (the tasks
the base agent is run on during synthesis; their golden trajectories D2 are only used by baselines)."""

from __future__ import annotations

import random
from collections import defaultdict

from steptune.data.trajectory import Trajectory


def split_by_task(trajs: list[Trajectory], fraction: float = 0.5, seed: int = 0,
                  stratify: bool = True) -> tuple[list[Trajectory], list[Trajectory]]:
    """Return (D1, D2). All trajectories of a task land on the same side; with `stratify`, each task type is
    split on its own so both halves cover every type (a type with one task goes to D1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"d1_fraction must be in (0, 1), got {fraction}")
    by_task: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        by_task[t.task_id].append(t)
    strata: dict[str, list[str]] = defaultdict(list)
    for task_id, group in by_task.items():
        strata[group[0].task_type if stratify else "all"].append(task_id)
    rng = random.Random(seed)
    u1: set[str] = set()
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        n1 = min(len(ids) - 1, max(1, round(len(ids) * fraction))) if len(ids) > 1 else 1
        u1.update(ids[:n1])
    d1 = [t for t in trajs if t.task_id in u1]
    d2 = [t for t in trajs if t.task_id not in u1]
    return d1, d2
