"""The pipeline with one CPU core taken by another program, against the same machine without it.

A user's laptop is rarely idle. This runs a representative slice of the quickstart preset -- its first training
stage (train:golden_d1) and the evaluation of that model (eval:golden_d1, with the recovery benchmark), each as the
`steptune` command a user would run, in a fresh process -- once with the machine as it is ("quiet") and once while a
subprocess the benchmark starts spins on one core ("busy"; it is always killed, and dies by itself if this script
does). Conditions are interleaved and their order alternates between repetitions, so drift in the machine's
background load hits both alike; the figures are medians over repetitions.

  busy_vs_quiet = median busy wall time / median quiet wall time   (train + eval; 1.0 = a busy core costs nothing)

`--variants shipped,spin` also runs the old thread settings (`spin`: STEPTUNE_THREAD_DEFAULTS=0, OpenMP's default
spin-then-sleep waiting, see steptune/threads.py) beside the shipped ones; `threads1` runs every torch op on one
thread (OMP_NUM_THREADS=1, train.num_threads=1). `--slice quickstart` times the whole quickstart instead (minutes
per run). Setup (golden data, split, tokenizer, the evaluated model) is built once and not timed.

    python benchmarks/under_load.py [--quick] [--reps N] [--variants shipped,spin,threads1] [--slice quickstart]

Prints a table and ends with one JSON line: {"busy_vs_quiet": ..., "quiet_s": ..., "busy_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import yaml

from steptune.pipeline.config import load_config
from steptune.pipeline.methods import BASE_AGENT, METHODS
from steptune.pipeline.run import Run, run_pipeline
from steptune.threads import ADDED

PRESET = Path(__file__).resolve().parent.parent / "src" / "steptune" / "resources" / "presets" / "quickstart.yaml"
# a core kept busy for as long as this script lives: the spinner checks its parent every ~50 ms and leaves with it
SPIN = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(200_000): pass\n"
VARIANTS = {
    "shipped": {},  # steptune's defaults (passive OpenMP waiting)
    "spin": {"STEPTUNE_THREAD_DEFAULTS": "0"},  # OpenMP's own default: spin, then sleep
    "threads1": {"OMP_NUM_THREADS": "1"},  # plus train.num_threads=1 (below)
    "spin_short": {"STEPTUNE_THREAD_DEFAULTS": "0", "GOMP_SPINCOUNT": "10000"},  # spin ~0.1 ms, then sleep
}


def steptune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from steptune.cli import main; sys.argv[0] = 'steptune'; main()", *args]


def setup(work: Path, quick: bool) -> tuple[Run, list[str]]:
    """The run directory up to the base agent (not timed), and the preset overrides the timed slice uses."""
    overrides = {"golden.limit": 60, "train.max_steps": 12, "eval.limit": 4, "eval.splits": ["seen"]} if quick \
        else {}
    cfg = load_config(PRESET, {**overrides, "train.progress": False})
    run = Run(cfg, work / "setup")
    run_pipeline(cfg, run.dir, until_stage=f"train:{BASE_AGENT}")
    return run, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def timed_slice(run: Run, work: Path, tag: str, variant: str, kind: str, overrides: list[str]) -> dict[str, float]:
    """Wall seconds of each timed command, run in a fresh process with the variant's environment."""
    # the user's environment as it was before steptune set its defaults here, then the variant's settings
    env = {k: v for k, v in os.environ.items() if k not in ADDED} | VARIANTS[variant] | {"HF_HUB_OFFLINE": "1"}
    out = work / tag
    if kind == "quickstart":
        sets = [a for o in overrides for a in ("--set", o)]
        cmds = {"quickstart": steptune_cmd("quickstart", "--output", str(out), *sets, "--set", "train.progress=false")}
        if variant == "threads1":
            cmds["quickstart"] += ["--set", "train.num_threads=1"]
    else:
        train_cfg = run.train_config(METHODS[BASE_AGENT]).model_copy(
            update={"output_dir": str(out / "model"), "progress": False,
                    **({"num_threads": 1} if variant == "threads1" else {})})
        (work / f"{tag}-train.yaml").write_text(yaml.safe_dump(train_cfg.model_dump(mode="json")))
        eval_cfg = run.eval_config(BASE_AGENT).model_copy(update={"out": str(out / "eval")})
        (work / f"{tag}-eval.json").write_text(eval_cfg.model_dump_json())
        cmds = {"train": steptune_cmd("train", str(work / f"{tag}-train.yaml")),
                "eval": steptune_cmd("eval", "--config", str(work / f"{tag}-eval.json"), "--quiet")}
    times = {}
    for name, cmd in cmds.items():
        t0, cpu0 = time.perf_counter(), _children_cpu()
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times[name] = time.perf_counter() - t0
        times[f"{name} cpu"] = _children_cpu() - cpu0  # CPU seconds of the command and the processes it waited for
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({variant}, {tag}):\n{done.stderr[-3000:]}")
    return times


def wall(times: dict[str, float]) -> float:
    return sum(v for k, v in times.items() if not k.endswith(" cpu"))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Spinner:
    """One core kept busy by a child process, for the duration of a `with` block."""

    def __enter__(self) -> Spinner:
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def load_now() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 training steps, 4 evaluation tasks, 1 repetition.")
    ap.add_argument("--reps", type=int, default=None, help="Repetitions of each condition (default 3, quick 1).")
    ap.add_argument("--variants", default="shipped", help=f"Comma-separated, from {', '.join(VARIANTS)}.")
    ap.add_argument("--slice", choices=["stage", "quickstart"], default="stage",
                    help="stage: train:golden_d1 + eval:golden_d1; quickstart: the whole quickstart.")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the runs here (default: a temporary dir).")
    a = ap.parse_args()
    variants = a.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    reps = a.reps or (1 if a.quick else 3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` blocks (the spinner's kill) still run

    with tempfile.TemporaryDirectory(prefix="under_load-") as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        run, overrides = setup(work, a.quick)
        print(f"setup (not timed): {time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores; "
              f"load average {load_now():.2f} before the timed runs", flush=True)
        rows: dict[tuple[str, str], list[dict[str, float]]] = {}
        loads: list[float] = []
        for rep in range(reps):
            for cond in ("quiet", "busy") if rep % 2 == 0 else ("busy", "quiet"):
                for variant in variants:
                    tag = f"{variant}-{cond}-{rep}"
                    if cond == "busy":
                        with Spinner():
                            times = timed_slice(run, work, tag, variant, a.slice, overrides)
                    else:
                        times = timed_slice(run, work, tag, variant, a.slice, overrides)
                    loads.append(load_now())
                    rows.setdefault((variant, cond), []).append(times)
                    print(f"  rep {rep} {variant:10s} {cond:5s} " + "  ".join(f"{k} {v:6.1f} s" for k, v in
                                                                                times.items()), flush=True)

    phases = list(next(iter(rows.values()))[0])
    print(f"\n{'variant':10s} {'cond':5s} " + " ".join(f"{p + ' s':>12s}" for p in phases) +
          f" {'total s':>9s} {'busy/quiet':>10s}")
    result: dict[str, float] = {}
    for variant in variants:
        totals = {c: median(wall(t) for t in rows[(variant, c)]) for c in ("quiet", "busy")}
        ratio = totals["busy"] / totals["quiet"]
        for cond in ("quiet", "busy"):
            per = [median(t[p] for t in rows[(variant, cond)]) for p in phases]
            print(f"{variant:10s} {cond:5s} " + " ".join(f"{x:12.1f}" for x in per) + f" {totals[cond]:9.1f} " +
                  (f"{ratio:10.2f}" if cond == "busy" else ""))
        key = "" if variant == "shipped" else f"{variant}_"
        result |= {f"{key}busy_vs_quiet": round(ratio, 2), f"{key}quiet_s": round(totals["quiet"], 1),
                   f"{key}busy_s": round(totals["busy"], 1)}
    spread = {f"{v}_{c}": [round(wall(t), 1) for t in ts] for (v, c), ts in rows.items()}
    print(f"\nall runs (s): {json.dumps(spread)}")
    print(f"load average after each run: min {min(loads):.2f}, max {max(loads):.2f} "
          f"(the benchmark's own runs add 1-2, the spinner 1: much more means other programs ran too)")
    print(json.dumps({**result, "reps": reps, "slice": a.slice, "quick": a.quick, "cores": os.cpu_count(),
                      "max_load_average": round(max(loads), 2)}))


if __name__ == "__main__":
    main()
