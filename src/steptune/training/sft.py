"""Masked SFT — STeP stage 1 (golden D1) and stage 3 (D1 ∪ Dr with partial masking) share this entry point.

Trajectories are encoded with their per-step weights (steptune.data.tokenize) into `input_ids` + `labels`, and
handed pre-tokenized to TRL's SFTTrainer, which packs them padding-free (best-fit decreasing, position ids
restart per sample, no token attends across samples) and computes the loss over labelled tokens only. Runs
as is on one CPU or GPU, and under `accelerate launch` (DDP, DeepSpeed, FSDP) for several:

    accelerate launch --num_processes 8 -m steptune.training.sft train.yaml
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from steptune.errors import DeprecatedKeyWarning, UserError, show_deprecated_keys_in_one_line

TRAIN_LOG = "train_log.jsonl"
SUMMARY = "train_summary.json"
TRAINER_STATE = "trainer_state.json"  # transformers writes it last into a checkpoint
CHECKPOINTS = "checkpoints"  # under output_dir: transformers' checkpoint-<step> folders


# old key -> the name transformers / TRL / peft use; the old names are read, with a warning, until release 0.3
RENAMED_KEYS = {"batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
                "lr_scheduler": "lr_scheduler_type", "resume": "resume_from_checkpoint", "epochs": "num_train_epochs"}
RENAMED_LORA_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# the old `precision` choices as bf16 / fp16 (auto: neither set)
OLD_PRECISION = {"auto": {}, "fp32": {"bf16": False, "fp16": False}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


def _deprecated(old: str, advice: str) -> None:
    warnings.warn(f"config key `{old}` is deprecated and will be removed in 0.3: {advice}", DeprecatedKeyWarning,
                  stacklevel=4)


def _rename_old_keys(data: Any, renamed: dict[str, str], prefix: str = "") -> Any:
    """The old names moved to the new ones, one warning per old name given; both names given is an error."""
    if not isinstance(data, dict) or not (set(renamed) | {"precision"}) & set(data):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old in data:
            if new in data:
                raise ValueError(f"give `{prefix}{new}` only (`{prefix}{old}` is its old name)")
            _deprecated(prefix + old, f"use `{prefix}{new}`")
            data[new] = data.pop(old)
    if not prefix and "precision" in data:
        if "bf16" in data or "fp16" in data:
            raise ValueError("give `bf16` / `fp16` only (`precision` is their old name)")
        old = data.pop("precision")
        if old not in OLD_PRECISION:
            raise ValueError(f"precision: expected one of auto, fp32, bf16, fp16, got {old!r}")
        keys = ", ".join(f"`{k}: {str(v).lower()}`" for k, v in OLD_PRECISION[old].items())
        _deprecated("precision", f"use {keys}" if keys else "leave `bf16` and `fp16` unset (bf16 where the GPU has it)")
        data.update(OLD_PRECISION[old])
    return data


class LoraSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True  # save the merged model (loads like any model) rather than the adapter alone

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _rename_old_keys(data, RENAMED_LORA_KEYS, prefix="lora.")


class NoTrainingDataError(UserError, ValueError):
    """Every trajectory given is empty, or too long to keep one whole step."""


class TrainSettings(BaseModel):
    """How to train: a pipeline config's `train:` section (every method of a run shares it). The keys are those of
    transformers' TrainingArguments / TRL's SFTConfig / peft's LoraConfig where they have one."""

    # how fast it trains, never the model: left out of a pipeline stage's key (steptune.pipeline.run.config_for_key)
    speed_only: ClassVar[frozenset[str]] = frozenset({"num_threads", "progress"})

    model_config = ConfigDict(extra="forbid")

    chat_template: str | None = None  # override the model's template (chatml, llama2, llama3, mistral, gemma)
    max_length: int = Field(4096, ge=16)  # longer trajectories are cut at a step boundary, never mid-step
    # every method of a run trains this many epochs over its own data, as in the paper
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides num_train_epochs
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    per_device_train_batch_size: int = Field(4, ge=1)  # packed rows of max_length tokens when packing, else samples
    gradient_accumulation_steps: int = Field(1, ge=1)
    packing: bool = True
    lora: LoraSection | None = None
    seed: int | None = None  # data order and dropout; None: 0, or in a pipeline the run's seed
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int = Field(2, ge=1)
    resume_from_checkpoint: bool = True  # continue from the newest complete checkpoint in output_dir/checkpoints
    # checkpoints exist to resume an interrupted run; a finished run's model is in output_dir, so its checkpoints
    # (weights + optimizer: 1.6 GB each for a 135M model in fp32) are deleted unless kept: a study trains dozens
    keep_checkpoints: bool = False
    # neither set: bf16 on a GPU that has it, else fp32; either set: exactly that (bf16: false alone is fp32)
    bf16: bool | None = None
    fp16: bool | None = None
    gradient_checkpointing: bool = False
    report_to: list[str] = Field(default_factory=list)  # e.g. ["tensorboard"], ["wandb"]
    num_threads: int | None = None  # CPU torch threads (None: torch's default)
    progress: bool = True
    # TRL's fused LM head never builds the full logits (saves GPU memory on large vocabularies) but is slower on a
    # CPU (benchmarks/train_throughput.py); None: fused on a GPU, the model's own loss on a CPU
    fused_lm_head: bool | None = None
    # None: per-sample SDPA on packed rows (steptune.models.packed_attention), else the model's default;
    # any name transformers takes ("flash_attention_2", "sdpa", "eager", ...) overrides
    attn_implementation: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _rename_old_keys(data, RENAMED_KEYS)

    @model_validator(mode="after")
    def _one_precision(self) -> TrainSettings:
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one")
        return self


class TrainConfig(TrainSettings):
    """One training run: the settings plus what to train, on what, into where."""

    model: str  # hub id or local path, exactly as transformers takes it
    data: list[str]  # trajectory files (our JSONL or any format `steptune convert` reads)
    output_dir: str
    unmask_errors: bool = False  # ablation "STeP without masking": train the erroneous steps too


def load_train_config(path: str | Path) -> TrainConfig:
    return TrainConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def _precision(cfg: TrainSettings) -> str:
    import torch

    if cfg.bf16 or cfg.fp16:
        return "bf16" if cfg.bf16 else "fp16"
    if cfg.bf16 is not None or cfg.fp16 is not None:
        return "fp32"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


@cache
def masked_sft_trainer():
    """TRL's SFTTrainer; with `fused_lm_head = False` the loss is the model's own masked cross-entropy (the
    labels already carry the partial mask), computed as transformers' Trainer does."""
    from transformers import Trainer
    from trl import SFTTrainer

    class MaskedSFTTrainer(SFTTrainer):
        fused_lm_head = True
        labelled_logits_only = True  # the model's own loss path: logits only where a target is trained

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.fused_lm_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not self.labelled_logits_only or "labels" not in inputs or self.label_smoother is not None \
                    or self.compute_loss_func is not None:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return self._labelled_loss(model, inputs, return_outputs, num_items_in_batch)

        def _labelled_loss(self, model, inputs, return_outputs, num_items_in_batch):
            """The model's masked cross-entropy with the LM head run only at positions whose next token is
            trained. With STeP's masks most tokens (instructions, observations, weight-0 steps) are never targets,
            and their logits over the whole vocabulary (49k for SmolLM2: a fifth of the model's FLOPs and the
            largest activation) would be computed, softmaxed and backpropagated for nothing."""
            import torch

            inputs = dict(inputs)
            labels = inputs.pop("labels")
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position i predicts token i+1
            keep = targets != -100
            outputs = model(**inputs, logits_to_keep=keep)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
                raise RuntimeError(f"{type(model).__name__} ignores a boolean logits_to_keep; train with "
                                   "fused_lm_head: true")
            # as transformers' ForCausalLMLoss: summed over targets, divided by the batch's target count
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum())
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                scale = self.accelerator.num_processes // self.get_tp_size()  # as Trainer.compute_loss
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

        def _issue_warnings_after_load(self, load_result):
            # a checkpoint stores a tied weight once (SmolLM2's LM head is its embedding): the other name is
            # "missing" but loaded through the parameter it shares, and a warning on every resume would alarm
            from accelerate.utils import find_tied_parameters

            missing = set(load_result.missing_keys)
            loaded_through_a_twin = {name for group in find_tied_parameters(self.model) if not set(group) <= missing
                                     for name in group}
            load_result.missing_keys[:] = [k for k in load_result.missing_keys if k not in loaded_through_a_twin]
            super()._issue_warnings_after_load(load_result)

        def _run_epoch(self, *args, **kwargs):
            # transformers tests max_steps only after a step: resumed from the last checkpoint of a run whose
            # max_steps ends inside an epoch, it would train one step too many
            if self.state.global_step < self.state.max_steps:
                super()._run_epoch(*args, **kwargs)

    return MaskedSFTTrainer


def trains_on_cpu() -> bool:
    """Whether transformers' Trainer will put the model on the CPU (no CUDA device, no Apple GPU)."""
    import torch

    return not torch.cuda.is_available() and not torch.backends.mps.is_available()


def load_model(cfg: TrainConfig, precision: str):
    """The model as steptune trains it (the throughput benchmark's bare loop uses it too)."""
    import torch
    from transformers import AutoModelForCausalLM

    from steptune.models.packed_attention import use_packed_attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if precision == "bf16" and trains_on_cpu():
        # a CPU trains in mixed precision: fp32 weights and AdamW states (their small updates are not rounded away;
        # a CPU has the memory), bf16 matmuls under autocast, which is where the speed is (steptune.models.precision)
        from steptune.models.precision import warn_if_bf16_is_emulated

        warn_if_bf16_is_emulated("training")
        dtype = torch.float32
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, **kwargs)
    if cfg.packing and cfg.attn_implementation is None:
        use_packed_attention(model)
    model.config.use_cache = False  # with a cache transformers would not see the packed samples' boundaries
    return model


def checkpoint_bytes(model, lora: bool) -> int:
    """One checkpoint's size on disk: the trained weights (all of them, or LoRA's adapter alone) and AdamW's two
    fp32 moments of every trained parameter."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    return _bytes(trained if lora else params) + 8 * sum(p.numel() for p in trained)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def warn_if_disk_is_short(out: Path, model, cfg: TrainConfig) -> None:
    """A full disk fails a run at its first checkpoint, maybe hours in: say so before training starts."""
    ckpt = checkpoint_bytes(model, cfg.lora is not None)
    # transformers writes a new checkpoint before it rotates the oldest out; the final model comes on top
    need = ckpt * (cfg.save_total_limit + 1) + _bytes(model.parameters())
    free = shutil.disk_usage(out).free
    if free < need:
        warnings.warn(f"{out}: {free / 1e9:.1f} GB free on its disk, but training may need {need / 1e9:.1f} GB "
                      f"({cfg.save_total_limit} + 1 checkpoints of {ckpt / 1e9:.2f} GB and the final model); "
                      "free space, or lower save_total_limit", stacklevel=2)


def build_dataset(cfg: TrainConfig, tokenizer):
    """Encode every trajectory with its partial mask; returns (datasets.Dataset, stats)."""
    from datasets import Dataset

    from steptune.data.formats import read_any
    from steptune.data.tokenize import encode_trajectory

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    stats = {"trajectories": 0, "untrainable": 0, "dropped_steps": 0, "tokens": 0, "trained_tokens": 0,
             "masked_error_steps": 0}
    for path in cfg.data:
        for traj in read_any(path):
            stats["trajectories"] += 1
            if cfg.unmask_errors:
                traj = traj.model_copy(update={"steps": [s.model_copy(update={"weight": 1}) for s in traj.steps]})
            stats["masked_error_steps"] += sum(s.weight == 0 for s in traj.steps)
            enc = encode_trajectory(traj, tokenizer, cfg.max_length)
            stats["dropped_steps"] += enc.n_dropped_steps
            if not enc.trainable:
                stats["untrainable"] += 1
                continue
            rows["input_ids"].append(enc.input_ids)
            rows["labels"].append(enc.labels)
            stats["tokens"] += len(enc.input_ids)
            stats["trained_tokens"] += enc.n_trained_tokens
    if not rows["input_ids"]:
        raise NoTrainingDataError(f"no trainable trajectory in {cfg.data} (all empty or longer than max_length={cfg.max_length})")
    return Dataset.from_dict(rows), stats


def _log_line(entry: dict) -> str:
    # sorted keys, as trainer_state.json stores log_history: a log rebuilt from a checkpoint reads byte for byte
    # as the one written live
    return json.dumps(entry, sort_keys=True) + "\n"


def _log_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # a log at every checkpoint and at the last step: log_history (which checkpoints carry) then holds
            # every step's loss exactly once, so a resumed run still knows the whole run's loss
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            # the end-of-train record is left out: its loss and speed cover only this call (the summary has the run's)
            if state.is_world_process_zero and logs and "train_runtime" not in logs:
                with path.open("a") as fh:
                    fh.write(_log_line({**logs, "step": state.global_step}))

    return JsonlLog()


def _safetensors_whole(path: Path) -> bool:
    """The file is as long as its header says: 8 bytes of header length, the JSON header, then the tensors."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return path.stat().st_size == 8 + size + end


def _step(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[1])


def _checkpoint_complete(ckpt: Path) -> bool:
    """A kill while a checkpoint is written leaves it without trainer_state.json (written last); a kill while
    transformers rotates old checkpoints out can leave one with its state but without weights or optimizer."""
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        names = {p.name for p in ckpt.iterdir()}
        if state.get("global_step") != _step(ckpt):
            return False
        if any((ckpt / n).is_dir() for n in names):
            return True  # a DeepSpeed / FSDP layout: its engine checks its own shards
        weights = [ckpt / n for n in names if n.startswith(("model", "adapter_model", "pytorch_model"))
                   and n.endswith((".safetensors", ".bin"))]  # not training_args.bin
        return (bool(weights) and {"optimizer.pt", "scheduler.pt"} <= names
                and all(_safetensors_whole(w) for w in weights if w.suffix == ".safetensors"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints under `ckpt_dir`, oldest first; reads only."""
    return sorted(filter(_checkpoint_complete, _checkpoints(ckpt_dir)), key=_step)


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under `ckpt_dir`, what a rerun resumes from; reads only."""
    return next(reversed(complete_checkpoints(ckpt_dir)), None)


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint. Incomplete ones are deleted (by the main process): transformers and every
    later rerun would otherwise take the newest of them for the place to resume from."""
    if int(os.environ.get("RANK", "0")) == 0:
        for p in _checkpoints(ckpt_dir):
            if not _checkpoint_complete(p):
                shutil.rmtree(p, ignore_errors=True)
    return last_complete_checkpoint(ckpt_dir)


def _restart_log(path: Path, checkpoint: Path | None) -> None:
    """The log as it stood at the checkpoint (steps logged after it will be trained and logged again)."""
    history = json.loads((checkpoint / TRAINER_STATE).read_text())["log_history"] if checkpoint else []
    path.write_text("".join(_log_line(e) for e in history if "train_runtime" not in e))


def _whole_run_loss(log_history: list[dict]) -> float | None:
    """Mean loss per optimizer step over the whole run, resumed parts included (each logged loss is the mean
    over the steps since the previous log)."""
    total, last = 0.0, 0
    for e in log_history:
        if "loss" in e:
            total += e["loss"] * (e["step"] - last)
            last = e["step"]
    return total / last if last else None


def sft_args(cfg: TrainConfig, precision: str):
    """The TRL SFTConfig steptune trains with (the throughput benchmark uses it too)."""
    import torch
    from trl import SFTConfig

    # several processes without CUDA (under accelerate launch / torchrun, a Mac's too) need gloo; GPUs keep NCCL
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return SFTConfig(
        output_dir=str(Path(cfg.output_dir) / CHECKPOINTS),
        max_length=cfg.max_length,
        packing=cfg.packing,
        packing_strategy="bfd",  # whole samples only: a trajectory is never split across rows
        padding_free=cfg.packing,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the run
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed or 0,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,
        report_to=cfg.report_to or "none",
        dataset_num_proc=None,
        save_only_model=False,
        disable_tqdm=not cfg.progress,
        # transformers takes bf16 on a CPU only when told so
        use_cpu=cpu_ddp or (precision == "bf16" and trains_on_cpu()),
        ddp_backend="gloo" if cpu_ddp else None,
    )


def train(cfg: TrainConfig) -> Path:
    import torch
    from transformers import AutoTokenizer

    from steptune.data.templates import apply_chat_template_override

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    tokenizer = apply_chat_template_override(AutoTokenizer.from_pretrained(cfg.model), cfg.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, stats = build_dataset(cfg, tokenizer)  # bad data stops here, before the output directory exists
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision = _precision(cfg)
    model = load_model(cfg, precision)
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    args = sft_args(cfg, precision)
    trainer = masked_sft_trainer()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                   peft_config=peft_config, callbacks=[_log_callback(out / TRAIN_LOG)])
    trainer.fused_lm_head = torch.cuda.is_available() if cfg.fused_lm_head is None else cfg.fused_lm_head
    resume = _last_checkpoint(out / CHECKPOINTS) if cfg.resume_from_checkpoint else None
    if trainer.is_world_process_zero():
        _restart_log(out / TRAIN_LOG, resume)
        warn_if_disk_is_short(out, trainer.model, cfg)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    if trainer.is_world_process_zero():
        final = trainer.model
        if cfg.lora and cfg.lora.merge:
            final = final.merge_and_unload()
        final.config.use_cache = True  # a saved model generates as usual (only training turns the cache off)
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        # all but seconds (this call's wall time) and resumed_from cover the whole run, however often resumed
        summary = {**stats, "train_loss": _whole_run_loss(trainer.state.log_history),
                   "steps": trainer.state.global_step, "epochs": round(float(trainer.state.epoch or 0.0), 3),
                   "seconds": round(seconds, 2), "precision": precision,
                   "resumed_from": str(resume) if resume else None,
                   "lora": cfg.lora is not None, "world_size": trainer.accelerator.num_processes}
        tmp = out / f"{SUMMARY}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / SUMMARY)
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m steptune.training.sft CONFIG.yaml` — the entry point `accelerate launch` runs."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m steptune.training.sft CONFIG.yaml")
    show_deprecated_keys_in_one_line()
    train(load_train_config(argv[0]))


if __name__ == "__main__":
    main()
