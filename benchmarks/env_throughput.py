"""Environment steps per second: our ScienceWorld adapter vs the raw server call, the library's own
`env.step` (which also enumerates valid actions), TextWorldExpress, and an EnvPool with 1 vs 2 workers.

    python benchmarks/env_throughput.py [--quick]

Ends with one JSON line: adapter_vs_raw (ScienceWorld adapter / raw server step), two_workers_vs_one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAVA_TOOL_OPTIONS", "-Xmx512m")

from steptune.envs.pool import EnvPool  # noqa: E402
from steptune.envs.sciworld import ScienceWorldEnv  # noqa: E402
from steptune.envs.twx import TextWorldExpressEnv  # noqa: E402

ACTIONS = ["look around", "inventory", "look at door", "examine door"]


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(ACTIONS[i % len(ACTIONS)])
    return n / (time.perf_counter() - t0)


def sciworld_rates(n: int) -> dict[str, float]:
    with ScienceWorldEnv() as env:
        task = next(t for t in env.tasks("seen") if t.name.startswith("task-3-find"))
        env.reset(task)
        raw = env._sw.server  # the same JVM, called the way the library's step() starts
        rates = {"raw server.step": _rate(raw.step, n), "adapter step": _rate(env.step, n)}
        lib_n = max(10, n // 10)  # the library's step is ~15x slower; fewer calls keep --quick quick
        rates["library env.step"] = _rate(env._sw.step, lib_n)
        # interleave once more so JIT warm-up does not favour whichever ran later
        rates["raw server.step"] = max(rates["raw server.step"], _rate(raw.step, n))
        rates["adapter step"] = max(rates["adapter step"], _rate(env.step, n))
    return rates


def twx_rate(n: int) -> float:
    with TextWorldExpressEnv(game="twc") as env:
        env.reset(env.tasks("train")[0])
        return _rate(env.step, n)


def pool_rate(workers: int, rounds: int) -> float:
    with EnvPool("sciworld", size=workers) as pool:
        task = next(t for t in pool.tasks("seen") if t.name.startswith("task-3-find"))
        for slot in range(workers):
            pool.reset(slot, task)
        t0 = time.perf_counter()
        for i in range(rounds):
            pool.step_many([(slot, ACTIONS[i % len(ACTIONS)]) for slot in range(workers)])
        return rounds * workers / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 200 if args.quick else 1000
    sw = sciworld_rates(n)
    rows = dict(sw)
    rows["twx adapter step (twc)"] = twx_rate(n * 5)
    one, two = pool_rate(1, n), pool_rate(2, n)
    rows["pool sciworld, 1 worker"] = one
    rows["pool sciworld, 2 workers"] = two
    print(f"{'what':32s} {'steps/s':>10s}")
    for k, v in rows.items():
        print(f"{k:32s} {v:10.1f}")
    print(json.dumps({"adapter_vs_raw": round(sw["adapter step"] / sw["raw server.step"], 3),
                      "adapter_vs_library_step": round(sw["adapter step"] / sw["library env.step"], 2),
                      "two_workers_vs_one": round(two / one, 3),
                      "sciworld_adapter_steps_per_s": round(sw["adapter step"], 1),
                      "twx_steps_per_s": round(rows["twx adapter step (twc)"], 1)}))


if __name__ == "__main__":
    main()
