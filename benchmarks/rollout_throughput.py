"""Agent steps/s with N concurrent episodes batched into one generate call per round vs one episode at a time.

Same tiny model (trained for a few seconds on golden TextWorldExpress coin games so it emits real actions),
same tasks, same greedy decoding, measured side by side in one run. Reports where the time goes (model vs env).
The batched run goes twice: with resets inline (a finished slot's next reset runs while the model waits) and with
resets ahead (spare environments reset the next tasks while the model generates: the default).

The episodes are plain, as in an evaluation: no expert plan is asked for, so ScienceWorld loads its tasks without
building their gold paths. `--expert-resets` builds them at every reset, as stage 2 with the expert teacher does.

    python benchmarks/rollout_throughput.py [--quick] [--env twx|sciworld] [--concurrency 16] [--tasks 64]
                                            [--expert-resets]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Several rooms, so that episodes last many steps (the model was trained on one-room games and wanders).
ENV_KWARGS = {"game": "coin", "game_params": "numLocations=4,includeDoors=0", "max_steps": 15}
WARMUP_RESETS = {"twx": 10}  # resets per slot before timing (ScienceWorld's take seconds: its episode warms it)


def make_pool(size: int, env: str = "twx", workers: int | None = None, spares: int | None = None,
              expert_resets: bool = False):
    from steptune.envs.pool import EnvPool

    class ExpertResets(EnvPool):  # every reset as if the expert's plan were wanted
        def reset_many(self, calls, expert=True):
            return super().reset_many(calls, expert=True)

        def prepare(self, tasks, plans=False, expert=True):
            return super().prepare(tasks, plans, expert=True)

    cls = ExpertResets if expert_resets else EnvPool
    pool = cls(env, size, ENV_KWARGS if env == "twx" else None, workers=workers, spares=spares)
    return pool, f"EnvPool ({len(pool.worker_pids())} worker process(es), {pool.spares} spare environment(s))"


def measure(model_dir: Path, concurrency: int, n_tasks: int, env: str = "twx", workers: int | None = None,
            spares: int | None = None, expert_resets: bool = False) -> dict:
    from steptune.agent.rollout import RolloutTotals, run_episodes
    from steptune.backends.base import GenerationConfig
    from steptune.backends.local import LocalBackend

    backend = LocalBackend(model_dir, max_batch_size=64)
    pool, pool_kind = make_pool(concurrency, env, workers, spares, expert_resets)
    try:
        tasks = pool.tasks("unseen")[:n_tasks]
        # Warm up every slot (JVM start and JIT compilation are one-off costs, not throughput): a few resets each,
        # then one episode each.
        warm = pool.tasks("seen")
        for k in range(WARMUP_RESETS.get(env, 0)):
            pool.reset_many([(slot, warm[k * concurrency + slot]) for slot in range(concurrency)])
        # (two rounds of episodes with spares, so that the spares' simulators are warm too)
        n_warm = concurrency * (2 if pool.spares else 1)
        run_episodes(pool, warm[:n_warm], backend, GenerationConfig(max_new_tokens=40), progress=False)
        totals = RolloutTotals()
        t0 = time.perf_counter()
        eps = run_episodes(pool, tasks, backend, GenerationConfig(max_new_tokens=40), progress=False, totals=totals)
        wall = time.perf_counter() - t0
    finally:
        pool.close()
    return {"concurrency": concurrency, "episodes": len(eps), "agent_steps": totals.agent_steps, "wall_s": wall,
            "steps_per_s": totals.agent_steps / wall, "model_s": totals.model_seconds, "env_s": totals.env_seconds,
            "reset_s": totals.reset_seconds,
            "other_s": wall - totals.model_seconds - totals.env_seconds, "model_calls": totals.model_calls,
            "success_rate": sum(e.success for e in eps) / len(eps), "pool": pool_kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 tasks, under a minute")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--env", default="twx", help="twx (coin, 4 rooms) or sciworld")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--env-workers", type=int, default=None,
                    help="environment processes (default: one per environment)")
    ap.add_argument("--spares", type=int, default=None,
                    help="spare environments that reset the next tasks while the model generates (default: one per "
                         "slot); the table also shows the batched run without them (resets on the critical path)")
    ap.add_argument("--expert-resets", action="store_true",
                    help="build the expert's plan at every reset (stage 2 with the expert teacher; ScienceWorld's gold "
                         "path), though these episodes never ask for it")
    args = ap.parse_args()
    n_tasks = args.tasks or (24 if args.quick else 96)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from _react_model import train_react_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = train_react_model(Path(tmp) / "model", steps=60)
        expert = args.expert_resets
        seq = measure(model_dir, 1, n_tasks, args.env, spares=0, expert_resets=expert)
        inline = measure(model_dir, args.concurrency, n_tasks, args.env, args.env_workers, 0, expert)
        bat = measure(model_dir, args.concurrency, n_tasks, args.env, args.env_workers, args.spares, expert)

    print(f"\nRollout throughput, {args.env}, {n_tasks} episodes, tiny Llama, greedy, "
          f"{args.threads} torch thread(s), pool: {bat['pool']}, "
          f"{'expert plans built at every reset' if args.expert_resets else 'no expert plans'}")
    print(f"{'mode':<36}{'steps':>7}{'wall s':>9}{'steps/s':>10}{'model s':>9}{'env s':>8}{'(resets)':>10}"
          f"{'other s':>9}{'gen calls':>11}{'success':>9}")
    rows = (("sequential", seq), (f"batched x{args.concurrency}, resets inline", inline),
            (f"batched x{args.concurrency}, resets ahead", bat))
    for name, r in rows:
        print(f"{name:<36}{r['agent_steps']:>7}{r['wall_s']:>9.2f}{r['steps_per_s']:>10.1f}{r['model_s']:>9.2f}"
              f"{r['env_s']:>8.2f}{r['reset_s']:>10.2f}{r['other_s']:>9.2f}{r['model_calls']:>11}{r['success_rate']:>9.0%}")
    ratio = bat["steps_per_s"] / seq["steps_per_s"]
    print(json.dumps({"batched_vs_sequential": round(ratio, 2),
                      "batched_resets_inline_vs_sequential": round(inline["steps_per_s"] / seq["steps_per_s"], 2),
                      "resets_ahead_vs_inline": round(bat["steps_per_s"] / inline["steps_per_s"], 2), "batched_steps_per_s": round(bat["steps_per_s"], 1),
                      "sequential_steps_per_s": round(seq["steps_per_s"], 1), "concurrency": args.concurrency,
                      "episodes": n_tasks, "expert_resets": args.expert_resets, "batched_model_share": round(bat["model_s"] / bat["wall_s"], 3),
                      "batched_env_share": round(bat["env_s"] / bat["wall_s"], 3)}))


if __name__ == "__main__":
    main()
