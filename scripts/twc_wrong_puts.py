"""What each agent does after putting the item in a wrong place, in one-item TextWorld Commonsense games (the
SmolLM2 study's game), where a put that the game accepts and that does not end the episode is a wrong one.

    python scripts/twc_wrong_puts.py runs/study-smollm2/seed-0 [--injected]

Per method: the episodes with such a put (the first one of each episode counts), those in which the agent took the
item back next, those in which its next put then went to the same wrong place, and how many of the episodes with a
wrong put it won. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from steptune.data.trajectory import Trajectory, load_trajectories
from steptune.pipeline.layout import RunLayout


def first_wrong_put(t: Trajectory) -> int | None:
    """The index of the episode's first accepted put that did not end it (the agent's, not an injected step)."""
    for i, st in enumerate(t.steps):
        ends = i == len(t.steps) - 1 and t.success
        if st.kind != "injected" and st.action.startswith("put ") and st.observation.startswith("You put") \
                and not ends:
            return i
    return None


def after_wrong_puts(trajs: list[Trajectory]) -> dict[str, int]:
    out = Counter(episodes=len(trajs))
    for t in trajs:
        if (i := first_wrong_put(t)) is None:
            continue
        out["with_wrong_put"] += 1
        out["won_after_it"] += t.success
        nxt = t.steps[i + 1].action if i + 1 < len(t.steps) else ""
        if nxt.startswith("take "):  # took the item back: where does it go next?
            out["took_it_back"] += 1
            later = [st.action for st in t.steps[i + 2:] if st.action.startswith("put ")]
            out["then_the_same_wrong_put"] += bool(later) and later[0] == t.steps[i].action
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory (one seed of a study)")
    ap.add_argument("--injected", action="store_true", help="the episodes with an injected error instead")
    args = ap.parse_args()
    layout = RunLayout(args.run)
    methods = json.loads(layout.manifest.read_text())["config"]["methods"]
    found = {m: after_wrong_puts(load_trajectories(p)) for m in methods
             if (p := layout.episodes(m, args.injected)).exists()}
    print("| method | episodes | with a wrong put | took it back next | then put it in the same wrong place "
          "| won after the wrong put |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, c in found.items():
        print(f"| {m} | {c['episodes']} | {c.get('with_wrong_put', 0)} | {c.get('took_it_back', 0)} "
              f"| {c.get('then_the_same_wrong_put', 0)} | {c.get('won_after_it', 0)} |")
    print(json.dumps(found))


if __name__ == "__main__":
    main()
