"""Real ReAct episodes through the local backend with and without reusing each reply's keys and values, side by side.

An agent's next prompt repeats its reply, so the prefix cache also keeps the keys and values computed while decoding
it (`LocalBackend(reuse_replies=True)`, the default) and the next turn prefills only the observation after it. This
plays the same coin games greedily both ways (alternating, twice each), and reports prompt tokens prefilled, agent
steps/s and whether the episodes are the same.

    python benchmarks/reply_reuse.py [--quick] [--model DIR] [--episodes 16] [--threads 2]

The figures to quote need an agent that writes ReAct replies, e.g. the SmolLM2 preset's base agent
(`--model runs/smollm2/models/golden_d1` after `steptune quickstart --preset smollm2`); without --model it trains the
tests' tiny ReAct model for a few seconds (it soon stops writing well-formed replies, so little is reused).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _agent import agent_model, episode_args, play as play_episodes

ENV_KWARGS = {"game": "coin", "game_params": "numLocations=4,numDistractorItems=0,includeDoors=0", "max_steps": 20}


def play(model_dir: Path, reuse: bool, n: int) -> dict:
    from steptune.backends.local import LocalBackend

    backend = LocalBackend(model_dir, reuse_replies=reuse)
    eps, wall = play_episodes(backend, ENV_KWARGS, n)
    steps = sum(len(e.trajectory.steps) for e in eps)
    return {"wall_s": wall, "steps": steps, "prefill_tokens": backend.prefill_tokens,
            "generated": backend.tokens_generated, "success": sum(e.trajectory.success for e in eps) / len(eps),
            "records": [(e.trajectory.reward, [s.action for s in e.trajectory.steps]) for e in eps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    episode_args(ap, quick="4 episodes, one pass each way", model="a trained agent (default: the tests' tiny ReAct model)")
    args = ap.parse_args()
    n = args.episodes or (4 if args.quick else 16)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = agent_model(args.model, Path(tmp))
        order = [False, True] if args.quick else [False, True, True, False]
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for reuse in order:
            runs[reuse].append(play(model_dir, reuse, n))

    print(f"\n{n} coin episodes batched, greedy, model {model_dir}, {args.threads} torch thread(s)")
    print(f"{'replies reused':>15}{'wall s':>9}{'steps':>7}{'steps/s':>9}{'prefilled':>11}{'generated':>11}{'success':>9}")
    for reuse in (False, True):
        for r in runs[reuse]:
            print(f"{str(reuse):>15}{r['wall_s']:>9.1f}{r['steps']:>7}{r['steps'] / r['wall_s']:>9.2f}"
                  f"{r['prefill_tokens']:>11}{r['generated']:>11}{r['success']:>9.0%}")
    wall = {k: sum(r["wall_s"] for r in v) for k, v in runs.items()}
    pre = {k: runs[k][0]["prefill_tokens"] for k in runs}
    same = all(r["records"] == runs[False][0]["records"] for v in runs.values() for r in v)
    print(json.dumps({"reply_reuse_speedup": round(wall[False] / wall[True], 3),
                      "prefill_tokens_saved": round(1 - pre[True] / pre[False], 3),
                      "same_records": same, "episodes": n, "agent_steps": runs[True][0]["steps"]}))


if __name__ == "__main__":
    main()
