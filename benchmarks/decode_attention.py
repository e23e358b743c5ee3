"""Decode attention in bf16 on a CPU: PyTorch's SDPA kernel against steptune's `decode_attention`, side by side.

A decoding step attends one new token per row to its whole cache. PyTorch's CPU SDPA kernel is tiled for long
queries and, in bf16, spent 2.5x what two matmuls and an fp32 softmax (transformers' eager attention, without
repeating the key/value heads) spend; a SmolLM2 evaluation's profile had 59% of its time in it. This measures:

1. the op alone at SmolLM2's shapes (9 query heads, 3 key/value heads of 64), a batch of 16, caches of 512 to 2,048
   tokens: milliseconds per layer and the largest error against an fp64 reference;
2. with `--model DIR` (a trained ReAct agent, e.g. a SmolLM2 study's `models/golden_d1`), real episodes of the
   SmolLM2 study's game played greedily in bf16, 16 at once, with each kernel (alternating, twice each unless
   `--quick`): agent steps/s and how many episodes came out the same.

    python benchmarks/decode_attention.py [--quick] [--model DIR] [--episodes 16] [--threads 2]

Ends with one JSON line: `decode_attention_speedup` (the op at 2,048 tokens) and, with --model,
`episodes_speedup` and `same_episodes`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _agent import episode_args, play as play_episodes

ENV_KWARGS = {"game": "twc", "max_steps": 30,
              "game_params": "numLocations=2,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0"}


class _Layer(torch.nn.Module):
    num_key_value_groups = 3


def sdpa_decode(module, query, key, value, attention_mask, scaling=None):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling)


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def op_rows(lengths: list[int], repeats: int) -> list[dict]:
    from steptune.models.packed_attention import decode_attention

    rows, layer = [], _Layer()
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(16, 9, 1, 64, generator=g)
        k, v = torch.randn(16, 3, length, 64, generator=g), torch.randn(16, 3, length, 64, generator=g)
        mask = torch.ones(16, 1, 1, length, dtype=torch.bool)
        mask[::2, :, :, : length // 4] = False  # left padding on half the rows
        ref = sdpa_decode(layer, q.double(), k.double(), v.double(), mask)[0]
        row = {"cached": length}
        for name, fn in (("sdpa", sdpa_decode), ("steptune", decode_attention)):
            args = (layer, q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
            row[f"{name}_ms"] = timed(lambda: fn(*args), repeats)
            row[f"{name}_err"] = (fn(*args)[0].double() - ref).abs().max().item()
        rows.append(row)
    return rows


def play(model_dir: Path, kernel, n: int) -> dict:
    from unittest import mock

    from steptune.backends.local import LocalBackend
    from steptune.models import packed_attention

    # what packed_sdpa_forward calls for a bf16 decoding step
    with mock.patch.object(packed_attention, "decode_attention", kernel):
        eps, wall = play_episodes(LocalBackend(model_dir, dtype="bfloat16"), ENV_KWARGS, n)
    return {"wall_s": wall, "steps": sum(len(e.trajectory.steps) for e in eps),
            "success": sum(e.trajectory.success for e in eps) / len(eps),
            "records": [[s.action for s in e.trajectory.steps] for e in eps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    episode_args(ap, quick="fewer repeats; 4 episodes, one pass each way",
                 model="a trained ReAct agent: also play real episodes with each kernel")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steptune.models import packed_attention

    rows = op_rows([512, 1024, 2048], 10 if args.quick else 50)
    print(f"\ndecode attention, bf16, batch 16, 9 query / 3 key-value heads of 64, {args.threads} thread(s)")
    print(f"{'cached':>7}{'sdpa ms':>9}{'steptune ms':>13}{'speedup':>9}{'sdpa err':>10}{'steptune err':>14}")
    for r in rows:
        print(f"{r['cached']:>7}{r['sdpa_ms']:>9.2f}{r['steptune_ms']:>13.2f}{r['sdpa_ms'] / r['steptune_ms']:>9.2f}"
              f"{r['sdpa_err']:>10.4f}{r['steptune_err']:>14.4f}")
    result = {"decode_attention_speedup": round(rows[-1]["sdpa_ms"] / rows[-1]["steptune_ms"], 2)}

    if args.model:
        n = args.episodes or (4 if args.quick else 16)
        kernels = {"sdpa": sdpa_decode, "steptune": packed_attention.decode_attention}
        order = ["sdpa", "steptune"] if args.quick else ["sdpa", "steptune", "steptune", "sdpa"]
        runs: dict[str, list[dict]] = {k: [] for k in kernels}
        for name in order:
            runs[name].append(play(args.model, kernels[name], n))
        print(f"\n{n} twc episodes (the SmolLM2 study's game) at once, greedy, bf16, model {args.model}")
        print(f"{'kernel':>9}{'wall s':>9}{'steps':>7}{'steps/s':>9}{'success':>9}")
        for name, rs in runs.items():
            for r in rs:
                print(f"{name:>9}{r['wall_s']:>9.1f}{r['steps']:>7}{r['steps'] / r['wall_s']:>9.2f}{r['success']:>9.0%}")
        rate = {k: sum(r["steps"] for r in v) / sum(r["wall_s"] for r in v) for k, v in runs.items()}
        same = sum(a == b for a, b in zip(runs["sdpa"][0]["records"], runs["steptune"][0]["records"]))
        result.update(episodes_speedup=round(rate["steptune"] / rate["sdpa"], 2), same_episodes=f"{same}/{n}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
