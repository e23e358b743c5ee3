"""Stage 2 and the base agent's evaluations of a finished run, again, into a separate directory: to check that a
change to the rollout engine (or the environment backend) writes the same records.

    python scripts/rollout_records.py RUN_DIR OUT_DIR [--temperature 0.5] [--backend process|ray]
    diff <(python scripts/rollout_records.py --strip OUT_A) <(python scripts/rollout_records.py --strip OUT_B)

Reruns, with the run's own config and its trained base agent (models/golden_d1), the synthesis stage
(OUT_DIR/synthesized.jsonl) and the evaluations eval:golden_d1 (with its injected-error episodes) and
eval:base_agent_u2 (OUT_DIR/eval/...). `--strip` prints every record of an OUT_DIR without timing fields.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TIMING_KEYS = {"seconds", "wall_s", "elapsed_s", "time_s", "episodes_per_s"}


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path, nargs="?")
    ap.add_argument("--temperature", type=float, default=None, help="stage 2 sampling (default: the run's)")
    ap.add_argument("--backend", default="process", choices=["process", "ray"])
    ap.add_argument("--parts", default="synthesis,eval", help="synthesis, eval or both (comma-separated)")
    ap.add_argument("--strip", action="store_true", help="print RUN_DIR's records without timing fields")
    args = ap.parse_args()
    if args.strip:
        for path in sorted(args.run_dir.rglob("*.json*")):
            if path.name == "config.json":
                continue
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
            for line in lines:
                print(path.relative_to(args.run_dir), json.dumps(strip(json.loads(line)), sort_keys=True))
        return

    from steptune.evaluation.eval import evaluate
    from steptune.pipeline.run import Run
    from steptune.synthesis.synthesize import synthesize

    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    cfg = load_config_from(manifest["config"])
    run = Run(cfg, args.run_dir)
    out = args.out_dir
    (out / "eval").mkdir(parents=True, exist_ok=True)
    extra = {"env_backend": args.backend} if args.backend != "process" else {}
    s = run.synthesis_config().model_copy(update={"out": str(out / "synthesized.jsonl"), **extra,
                                                  **({"temperature": args.temperature} if args.temperature is not None
                                                     else {})})
    if "synthesis" in args.parts:
        print(json.dumps(synthesize(s)))
    for name, ev in [] if "eval" not in args.parts else (("golden_d1", run.eval_config("golden_d1")), ("base_agent_u2", run.base_agent_eval_config())):
        ev = ev.model_copy(update={"out": str(out / "eval" / name), **extra})
        print(name, json.dumps(evaluate(ev)["overall"]))


def load_config_from(data: dict):
    from steptune.pipeline.config import PipelineConfig

    return PipelineConfig.model_validate(data)


if __name__ == "__main__":
    main()
