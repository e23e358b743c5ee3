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

from steptune.envs.pool import EnvPool
from steptune.envs.sciworld import ScienceWorldEnv
from steptune.envs.twx import TextWorldExpressEnv

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
        server = env._sw.server  # the same JVM; the three calls the adapter needs, nothing around them

        def raw(action: str):
            return server.step(action), server.getScore(), server.getCompleted()

        _rate(raw, n)  # warm-up: the JVM's JIT would otherwise favour whichever runs second
        rates = {"raw server step+score": _rate(raw, n), "adapter step": _rate(env.step, n)}
        lib_n = max(10, n // 10)  # the library's step is ~15x slower; fewer calls keep --quick quick
        rates["library env.step"] = _rate(env._sw.step, lib_n)
        # interleave once more so JIT warm-up does not favour whichever ran later
        rates["raw server step+score"] = max(rates["raw server step+score"], _rate(raw, n))
        rates["adapter step"] = max(rates["adapter step"], _rate(env.step, n))
    return rates


TWX_ACTIONS = ["look around", "inventory"]


def twx_rates(n: int) -> dict[str, float]:
    with TextWorldExpressEnv(game="twc") as env:
        env.reset(env.tasks("train")[0])
        raw = env._env  # textworld_express's own step (it returns the valid actions itself)
        rates = {}
        for _ in range(2):  # twice, interleaved, best of: JIT warm-up favours neither
            for key, fn in (("twx raw env.step", raw.step), ("twx adapter step", env.step)):
                t0 = time.perf_counter()
                for i in range(n):
                    fn(TWX_ACTIONS[i % 2])
                rates[key] = max(rates.get(key, 0.0), n / (time.perf_counter() - t0))
        return rates


def pool_rate(env_name: str, workers: int, rounds: int) -> float:
    with EnvPool(env_name, size=workers) as pool:
        if env_name == "sciworld":
            task = next(t for t in pool.tasks("seen") if t.name.startswith("task-3-find"))
        else:
            task = pool.tasks("train")[0]
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
    rows.update(twx_rates(n * 5))
    one, two = pool_rate("sciworld", 1, n), pool_rate("sciworld", 2, n)
    rows["pool sciworld, 1 worker"] = one
    rows["pool sciworld, 2 workers"] = two
    rows["pool twx, 1 worker"] = pool_rate("twx", 1, n * 2)
    rows["pool twx, 2 workers"] = pool_rate("twx", 2, n * 2)
    print(f"{'what':32s} {'steps/s':>10s}")
    for k, v in rows.items():
        print(f"{k:32s} {v:10.1f}")
    print(json.dumps({"adapter_vs_raw": round(sw["adapter step"] / sw["raw server step+score"], 3),
                      "adapter_vs_library_step": round(sw["adapter step"] / sw["library env.step"], 2),
                      "two_workers_vs_one": round(two / one, 3),
                      "sciworld_adapter_steps_per_s": round(sw["adapter step"], 1),
                      "twx_adapter_vs_raw": round(rows["twx adapter step"] / rows["twx raw env.step"], 3),
                      "twx_two_workers_vs_one": round(rows["pool twx, 2 workers"] / rows["pool twx, 1 worker"], 3),
                      "twx_steps_per_s": round(rows["twx adapter step"], 1)}))


if __name__ == "__main__":
    main()
