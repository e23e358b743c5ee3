"""Two evaluations of the same model, episode by episode: the same outcome? Is each episode of the second the
start of the first's (e.g. a run with `eval.max_repeats` against one played to the step budget)?

    python scripts/compare_evals.py runs/old/eval/golden_d1 runs/new/eval/golden_d1

Prints one line per file (episodes.jsonl, injected.jsonl) and ends with one line of JSON
({file: {"episodes", "same_outcome", "prefix", "steps_first", "steps_second"}}).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steptune.evaluation.eval import EPISODES_FILE, INJECTED_FILE, load_episodes


def compare(first: Path, second: Path, filename: str) -> dict:
    old = {t.id: t for t in load_episodes(first, filename)}
    new = {t.id: t for t in load_episodes(second, filename)}
    both = [i for i in new if i in old]
    return {"episodes": len(both),
            "same_outcome": sum(new[i].success == old[i].success for i in both),
            "prefix": sum(new[i].steps == old[i].steps[: len(new[i].steps)] for i in both),
            "won_first": sum(old[i].success for i in both), "won_second": sum(new[i].success for i in both),
            "stopped_repeating": sum(new[i].meta.get("stopped") == "repeating" for i in both),
            "steps_first": sum(len(old[i].steps) for i in both), "steps_second": sum(len(new[i].steps) for i in both)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()
    out = {}
    for name in (EPISODES_FILE, INJECTED_FILE):
        if (args.first / name).exists() and (args.second / name).exists():
            r = out[name] = compare(args.first, args.second, name)
            print(f"{name}: {r['episodes']} episodes in both; same outcome {r['same_outcome']}; the second's steps "
                  f"the start of the first's {r['prefix']}; won {r['won_first']} / {r['won_second']}; stopped "
                  f"repeating {r['stopped_repeating']}; steps {r['steps_first']} -> {r['steps_second']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
