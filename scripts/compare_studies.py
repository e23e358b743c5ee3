"""Two (or more) studies side by side: every paired difference with its 95% CI, plain per split and with one injected
error, plus the base agent's U2 success and the recovery rates (the README's pretrained-vs-tiny table).

    python scripts/compare_studies.py docs/results/study.json docs/results/study-smollm2.json --names tiny SmolLM2

Prints a markdown table and ends with one line of JSON ({name: {pair_split: mean}}).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steptune.pipeline.study import PAIR_TITLES, _ci, _rate


def rows(studies: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(label, one cell per study) for every paired difference any of the studies has."""
    splits = []
    for s in studies.values():
        splits += [sp for sp in next(iter(s["success"].values())) if sp not in splits]
    out = []
    for name, title in PAIR_TITLES.items():
        for sp in [*splits, "injected"]:
            key = f"{name}_{sp}"
            if any(key in s for s in studies.values()):
                label = f"{title}, {'with one injected error' if sp == 'injected' else sp}"
                out.append((label, [_ci(s.get(key)) for s in studies.values()]))
    for method, title in (("step", "STeP"), ("golden_d1", "golden D1")):
        out.append((f"recovery rate, {title}", [_rate(s.get(f"recovery_{method}")) for s in studies.values()]))
    out.append(("base agent on U2 (%)", [str(s.get("base_agent_success_u2", {}).get("mean", "–"))
                                         for s in studies.values()]))
    out.append(("seeds × test episodes per split",
                [f"{len(s['seeds'])} × {min(s['test_episodes_per_split_per_seed'].values())}" for s in studies.values()]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", type=Path, help="study.json files")
    ap.add_argument("--names", nargs="+", help="a column title per study (default: the file's folder and name)")
    args = ap.parse_args()
    names = args.names or [str(p) for p in args.studies]
    if len(names) != len(args.studies):
        ap.error("--names: give one name per study")
    studies = {n: json.loads(p.read_text()) for n, p in zip(names, args.studies)}
    print("| percentage points (95% CI) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, cells in rows(studies):
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(json.dumps({n: {k: v["mean"] for k, v in s.items() if k.startswith("step_minus_") and isinstance(v, dict)}
                      for n, s in studies.items()}))


if __name__ == "__main__":
    main()
