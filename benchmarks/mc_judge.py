"""The Monte-Carlo judge's throughput at two pool sizes, side by side: rollout turns/s, where the time goes (the
student's model, environment steps of the rollouts, resets and replays), and whether the verdicts are the same.

The same student plays the same episodes once; then the MC teacher (steptune.teacher.mc) judges every step of them
with `--slots A` environments, and again, from an empty cache, with `--slots B`. Its rollouts sample from per-row
seeds, so the pool size changes how fast, and what it decides only through rounding: batched with other rows, a
row's fp32 logits can differ in the last bits, and a T = 1 sample may then differ (`same_verdicts`: true at 4
episodes, 1 flag of 217 steps apart at 16, measured 2026-12-05).

    python benchmarks/mc_judge.py [--quick] [--slots 16 48] [--model DIR] [--episodes 8] [--rollouts 5]

Without --model it trains the tests' tiny ReAct model for a few seconds; with a study's base agent
(runs/study-coin/seed-0/models/golden_d1) it measures the teacher study's own case.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _agent import agent_model

ENV_KWARGS = {"game": "coin", "game_params": "numLocations=4,numDistractorItems=0,includeDoors=0", "max_steps": 20}


class Timed:
    """Wraps an object and adds up the seconds spent in the named methods."""

    def __init__(self, inner, names):
        self._inner, self.seconds = inner, dict.fromkeys(names, 0.0)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self.seconds:
            return attr

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def steps_to_judge(model_dir: Path, n_episodes: int):
    """The student's own episodes on unseen games, as the steps a synthesis run would ask the teacher about."""
    from steptune.agent.rollout import run_episodes
    from steptune.backends.base import GenerationConfig
    from steptune.backends.local import LocalBackend
    from steptune.envs.pool import EnvPool
    from steptune.teacher.base import StepToJudge

    backend = LocalBackend(model_dir)
    with EnvPool("twx", 8, ENV_KWARGS) as pool:
        tasks = pool.tasks("unseen")[:n_episodes]
        eps = run_episodes(pool, tasks, backend, GenerationConfig(max_new_tokens=48, temperature=0.5, seed=0),
                           progress=False)
    items = []
    for ep in eps:
        t, reward = ep.trajectory, 0.0
        for i, st in enumerate(t.steps):
            last = i == len(t.steps) - 1
            after = t.reward if last else reward
            items.append(StepToJudge(task=ep.task, task_text=t.task, history=t.steps[:i], step=st,
                                     reward_before=reward, reward_after=after, done=last and bool(t.meta.get("done"))))
    return backend, items, sum(e.trajectory.success for e in eps) / len(eps)


def judge(backend, items, slots: int, rollouts: int) -> dict:
    from steptune.envs.pool import EnvPool
    from steptune.teacher.base import TeacherCounts
    from steptune.teacher.mc import MCTeacher

    model = Timed(backend, ["complete"])
    pool = Timed(EnvPool("twx", slots, ENV_KWARGS), ["step_many", "reset_many", "valid_actions"])
    teacher = MCTeacher(model, pool, rollouts=rollouts, max_new_tokens=48, seed=0)
    try:
        # one episode's steps per call, in order, as synthesis asks (the cache carries an episode's states forward)
        verdicts, t0 = [], time.perf_counter()
        by_episode: dict[str, list] = {}
        for it in items:
            by_episode.setdefault(it.task.id, []).append(it)
        batch = [eps[k] for k in range(max(map(len, by_episode.values()))) for eps in by_episode.values()
                 if k < len(eps)]
        for k in range(0, len(batch), len(by_episode)):
            verdicts += teacher.judge(batch[k : k + len(by_episode)])
        wall = time.perf_counter() - t0
    finally:
        teacher.close()
    counts = TeacherCounts()
    for i, v in enumerate(verdicts):
        counts.add(v, i)
    return {"slots": slots, "wall_s": wall, "rollouts": counts.rollouts, "rollout_steps": counts.rollout_steps,
            "rollout_steps_per_s": counts.rollout_steps / wall, "model_s": model.seconds["complete"],
            "env_step_s": pool.seconds["step_many"], "reset_s": pool.seconds["reset_many"],
            "flags": [v.critique.is_error if v.critique else None for v in verdicts]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 episodes, 2 rollouts per state")
    ap.add_argument("--slots", type=int, nargs=2, default=[16, 48])
    ap.add_argument("--model", type=Path, help="a trained student (default: the tests' tiny ReAct model)")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--rollouts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    n_eps = args.episodes or (2 if args.quick else 8)
    rollouts = args.rollouts or (2 if args.quick else 5)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = agent_model(args.model, Path(tmp))
        backend, items, success = steps_to_judge(model_dir, n_eps)
        a, b = (judge(backend, items, s, rollouts) for s in args.slots)

    print(f"\nMC judge, {len(items)} steps of {n_eps} episodes (student success {success:.0%}), {rollouts} rollouts "
          f"per state, coin 4 rooms, {args.threads} torch thread(s), model {model_dir}")
    print(f"{'slots':>6}{'wall s':>9}{'rollouts':>10}{'turns':>8}{'turns/s':>9}{'model s':>9}{'env s':>8}"
          f"{'resets s':>10}{'other s':>9}{'flags':>7}")
    for r in (a, b):
        other = r["wall_s"] - r["model_s"] - r["env_step_s"] - r["reset_s"]
        print(f"{r['slots']:>6}{r['wall_s']:>9.1f}{r['rollouts']:>10}{r['rollout_steps']:>8}"
              f"{r['rollout_steps_per_s']:>9.1f}{r['model_s']:>9.1f}{r['env_step_s']:>8.1f}{r['reset_s']:>10.1f}"
              f"{other:>9.1f}{sum(bool(f) for f in r['flags']):>7}")
    print(json.dumps({f"slots_{b['slots']}_vs_{a['slots']}": round(a["wall_s"] / b["wall_s"], 2),
                      "rollout_steps_per_s": {str(r["slots"]): round(r["rollout_steps_per_s"], 1) for r in (a, b)},
                      "model_share": {str(r["slots"]): round(r["model_s"] / r["wall_s"], 3) for r in (a, b)},
                      "same_verdicts": a["flags"] == b["flags"], "steps_judged": len(items)}))


if __name__ == "__main__":
    main()
