"""Masked-SFT throughput: padding-free packing vs padding each sample, and the trainer's overhead vs bare PyTorch.

Synthetic trajectories with ScienceWorld-like lengths (a long instruction, 3-60 steps: a few hundred to a few
thousand tokens) and a small Llama on the CPU (fp32). Both modes run through steptune's real training path (TRL
SFTTrainer, with the loss and the per-sample packed attention steptune uses on a CPU); the bare loop runs
forward/backward/clip/optimizer step, with the trainer's own optimizer class, on the very batches the trainer trained
on, each bare step right after the trainer's step on the same batch (interleaved, so drift hits both alike). Two
more runs show what packing costs with transformers' stock sdpa attention (one dense block-diagonal mask per row)
and with TRL's fused LM head (steptune's default on a GPU).
overhead_vs_torch = median trainer step / median bare-loop step - 1 (0.10 = 10% slower), over the same timed batches
(the totals are printed too).

    python benchmarks/train_throughput.py [--quick]

Prints a table and ends with one JSON line: {"packed_vs_padded": ..., "overhead_vs_torch": ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from transformers import AutoTokenizer, Trainer, TrainerCallback

from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.envs.prompts import SCIWORLD_INSTRUCTION
from steptune.models.tiny import TinyModelConfig, build_tiny_model
from steptune.training.sft import TrainConfig, build_dataset, load_model, sft_args

WORDS = ("you see a the beaker thermometer kitchen stove water pot table door hallway greenhouse seed flower "
         "orange blue substance temperature measure focus on move to pick up pour into activate wait look around "
         "contains is in which an inventory room it celsius degrees").split()


def trajectories(n: int, rng: random.Random, step_counts=(3, 5, 8, 12, 20, 30, 45, 60)) -> list[Trajectory]:
    """Synthetic ScienceWorld-like trajectories with a STeP-like share (~10%) of weight-0 steps."""
    out = []
    for i in range(n):
        steps = []
        for _ in range(rng.choice(step_counts)):
            wrong = rng.random() < 0.1  # a STeP-like share of weight-0 steps
            steps.append(Step(thought=" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))),
                              action=" ".join(rng.choice(WORDS) for _ in range(3)),
                              observation=" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))),
                              kind="error" if wrong else "expert", weight=0 if wrong else 1))
        out.append(Trajectory(id=str(i), env="sciworld", task_id=str(i), instruction=SCIWORLD_INSTRUCTION,
                              task="Your task is to boil water. " + " ".join(rng.choice(WORDS) for _ in range(60)),
                              steps=steps))
    return out


class BareLoop:
    """Forward/backward/clip/optimizer step of plain PyTorch on its own copy of the model, set up as steptune sets
    up the trainer's (same attention, no KV cache, the optimizer class the trainer builds from the same arguments)."""

    def __init__(self, cfg: TrainConfig):
        torch.manual_seed(0)
        self.model = load_model(cfg, "fp32")
        self.model.train()
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(sft_args(cfg, "fp32"), self.model)
        self.opt = opt_cls(self.model.parameters(), **opt_kwargs)

    def step(self, batch) -> float:
        t0 = time.perf_counter()
        self.model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


class StepClock(TrainerCallback):
    """Times each trainer step (end to end, as the trainer loop runs it). With a bare loop, runs its step on the
    batch the trainer just trained on right after, outside the trainer's timing: both are measured side by side,
    step by step, so the machine's drift hits them alike."""

    def __init__(self, batches: list, bare: BareLoop | None):
        self.batches, self.bare = batches, bare
        self.trainer_s: list[float] = []
        self.bare_s: list[float] = []
        self.last = None

    def on_step_begin(self, args, state, control, **kw):
        if self.last is None:
            self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.trainer_s.append(time.perf_counter() - self.last)
        if self.bare is not None:
            self.bare_s.append(self.bare.step(self.batches[-1]))
        self.last = time.perf_counter()


def real_tokens(batch) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def run_trainer(model_dir: Path, data: Path, packing: bool, batch_size: int, steps: int, warm: int, tmp: Path,
                fused: bool = False, attn_implementation: str | None = None, with_bare: bool = False):
    from steptune.training.sft import masked_sft_trainer

    cfg = TrainConfig(model=str(model_dir), data=[str(data)], output_dir=str(tmp / f"ck{packing}{fused}"),
                      max_length=4096, max_steps=steps, per_device_train_batch_size=batch_size, packing=packing,
                      progress=False,
                      learning_rate=1e-3, logging_steps=10_000, save_steps=10_000,
                      attn_implementation=attn_implementation)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = build_dataset(cfg, tok)
    batches: list = []

    class RecordingTrainer(masked_sft_trainer()):
        def training_step(self, model, inputs, num_items_in_batch=None):
            batches.append(dict(inputs))  # the very batches trained on, for token counts and the bare loop
            return super().training_step(model, inputs, num_items_in_batch)

    clock = StepClock(batches, BareLoop(cfg) if with_bare else None)
    torch.manual_seed(0)
    trainer = RecordingTrainer(model=load_model(cfg, "fp32"), args=sft_args(cfg, precision="fp32"),
                               train_dataset=dataset, processing_class=tok, callbacks=[clock])
    trainer.fused_lm_head = fused
    trainer.train()
    tokens = sum(real_tokens(b) for b in batches[warm:steps])
    trainer_s = clock.trainer_s[warm:]
    return tokens / sum(trainer_s), trainer_s, clock.bare_s[warm:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n_traj, steps, warm = (24, 6, 2) if a.quick else (120, 30, 5)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trajs = trajectories(n_traj, random.Random(0))
        data = tmp / "data.jsonl"
        save_trajectories(trajs, data)
        texts = [m.content for t in trajs[:20] for m in t.messages(include_final_observation=True)]
        model_dir = build_tiny_model(texts, tmp / "model", TinyModelConfig(hidden_size=128, num_hidden_layers=4,
                                                                          max_position_embeddings=4096))
        tok = AutoTokenizer.from_pretrained(model_dir)
        from steptune.data.tokenize import encode_trajectory

        lengths = sorted(len(encode_trajectory(t, tok).input_ids) for t in trajs)
        packed_tps, packed_s, bare_s = run_trainer(model_dir, data, True, 1, steps, warm, tmp, with_bare=True)
        padded_tps, padded_s, _ = run_trainer(model_dir, data, False, 4, steps, warm, tmp)
        dense_tps, dense_s, _ = run_trainer(model_dir, data, True, 1, steps, warm, tmp, attn_implementation="sdpa")
        fused_tps, fused_s, _ = run_trainer(model_dir, data, True, 1, steps, warm, tmp, fused=True)
    overhead = median(packed_s) / median(bare_s) - 1
    rows = [("padded (4 samples/step)", padded_tps, padded_s),
            ("packed, padding-free (1 row of 4096)", packed_tps, packed_s),
            ("packed, stock sdpa (dense block mask)", dense_tps, dense_s),
            ("packed, TRL's fused LM head", fused_tps, fused_s),
            ("bare PyTorch loop, same packed batches", None, bare_s)]
    print(f"trajectory lengths (tokens): min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
          f"{steps - warm} timed steps after {warm} warm-up; {a.threads} torch threads; fp32 CPU")
    print(f"{'mode':42} {'tokens/s':>10} {'seconds':>9} {'median step s':>14}")
    for name, tps, s in rows:
        print(f"{name:42} {'-' if tps is None else round(tps):>10} {sum(s):9.2f} {median(s):14.3f}")
    print(json.dumps({"packed_vs_padded": round(packed_tps / padded_tps, 2), "overhead_vs_torch": round(overhead, 3),
                      "fused_lm_head_overhead_vs_torch": round(median(fused_s) / median(bare_s) - 1, 3),
                      "per_sample_vs_dense_mask": round(packed_tps / dense_tps, 2),
                      "packed_tokens_per_s": round(packed_tps), "padded_tokens_per_s": round(padded_tps)}))


if __name__ == "__main__":
    main()
