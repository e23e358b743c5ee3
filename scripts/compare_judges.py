"""Precision and recall of step judges against the expert-grounded teacher, on a pipeline run's U2 tasks.

    python scripts/compare_judges.py RUN_DIR --judges mc self [--limit 8] [--set mc.margin=0.4]
    python scripts/compare_judges.py --file SYNTH.jsonl --env twx --env-kwargs '{"game": "coin"}'   # one file, as is

RUN_DIR is a `steptune run` directory whose base agent is trained (stage train:golden_d1). For each judge, stage 2
runs again with that judge (the run's own synthesis settings: tasks, samples, temperature, seed) into
RUN_DIR/judges/<judge>.jsonl (resumable; the run's own data/synthesized.jsonl where the judge and settings are the
run's), then every step the student chose is replayed and judged by the expert
(steptune.evaluation.judges). `llm` needs the run's synthesis.teacher to be an llm teacher (its backend).
`--set mc.KEY=VALUE` changes an MC setting (the file name then says so). Prints a table, writes RUN_DIR/judges/agreement.json, and ends with one
line of JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from steptune.data.trajectory import load_trajectories
from steptune.envs.pool import EnvPool
from steptune.evaluation.judges import compare_with_expert
from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.run import Run
from steptune.synthesis.synthesize import synthesize
from steptune.teacher.registry import TEACHERS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, nargs="?")
    ap.add_argument("--file", type=Path, help="score this synthesized file as it is (needs --env)")
    ap.add_argument("--env")
    ap.add_argument("--env-kwargs", type=json.loads, default={})
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--judges", nargs="+", default=["mc", "self"], choices=sorted(TEACHERS))
    ap.add_argument("--limit", type=int, default=None, help="U2 tasks (default: the run's synthesis.limit)")
    ap.add_argument("--set", action="append", default=[], metavar="mc.KEY=VALUE")
    args = ap.parse_args()
    if args.file:
        with EnvPool(args.env, args.workers, args.env_kwargs) as pool:
            summary = compare_with_expert(load_trajectories(args.file), pool).summary()
        print(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("steps", "judge_flags", "expert_flags", "precision", "recall")}))
        return

    cfg = PipelineConfig.model_validate(json.loads((args.run_dir / "manifest.json").read_text())["config"])
    run = Run(cfg, args.run_dir)
    mc = {k.removeprefix("mc."): yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    tag = "".join(f"_{k}{v}" for k, v in sorted(mc.items()))
    out_dir = args.run_dir / "judges"
    out_dir.mkdir(exist_ok=True)
    rows = {}
    for judge in args.judges:
        base = run.synthesis_config()
        name = judge + (tag if judge == "mc" else "")
        settings = base.teacher.model_dump() if base.teacher.name == judge else {"name": judge}
        if judge == "llm":
            settings.setdefault("backend", getattr(base.teacher, "backend", None))
        teacher = TEACHERS[judge].model_validate({**settings, **(mc if judge == "mc" else {})})
        scfg = base.model_copy(update={"teacher": teacher, "out": str(out_dir / f"{name}.jsonl"),
                                       "limit": args.limit or base.limit})
        if scfg == base.model_copy(update={"out": scfg.out}) and run.synthesized.exists():
            scfg = base  # the run's own stage 2 is this judge's: read it, do not run it again
        t0 = time.perf_counter()
        stats = synthesize(scfg, progress=False)  # resumes: nothing to do where the file is complete
        seconds = time.perf_counter() - t0
        trajs = load_trajectories(scfg.out)
        with EnvPool(cfg.env.name, cfg.env.workers, cfg.env.kwargs) as pool:
            agreement = compare_with_expert(trajs, pool).summary()
        rows[name] = {**agreement, "episodes": stats["episodes"], "success_rate": stats["success_rate"],
                      "teacher": stats["teacher"], "synthesis_seconds_this_call": round(seconds, 1)}
    (out_dir / "agreement.json").write_text(json.dumps(rows, indent=2))
    print(f"{'judge':<16}{'steps':>7}{'flags':>7}{'expert':>7}{'prec':>7}{'recall':>7}{'f1':>7}{'rollouts':>10}")
    for name, r in rows.items():
        f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"{name:<16}{r['steps']:>7}{r['judge_flags']:>7}{r['expert_flags']:>7}{f(r['precision']):>7}"
              f"{f(r['recall']):>7}{f(r['f1']):>7}{r['teacher'].get('rollouts', 0):>10}")
    print(json.dumps({name: {k: r[k] for k in ("steps", "precision", "recall", "f1")} for name, r in rows.items()}))


if __name__ == "__main__":
    main()
