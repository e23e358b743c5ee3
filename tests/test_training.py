"""Masked SFT with real transformers / TRL / peft on a tiny Llama: masks, loss, packing, learning, LoRA, resume."""

import contextlib
import itertools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from steptune.data.tokenize import IGNORE_INDEX, encode_trajectory
from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.training.sft import TrainConfig, build_dataset, checkpoint_bytes, train

ITEMS = [("red shirt", "wardrobe"), ("blue mug", "cupboard"), ("old book", "shelf"), ("green sock", "drawer"),
         ("toy car", "toy box"), ("white plate", "dish rack")]


def tidy_trajectory(i: int, with_error: bool = False) -> Trajectory:
    item, box = ITEMS[i % len(ITEMS)]
    steps = [Step(thought=f"The {item} is out of place.", action=f"take {item}", observation=f"You take the {item}.")]
    if with_error:
        steps.append(Step(thought="Maybe the bed.", action=f"put {item} on bed", observation="Done.", kind="error",
                          weight=0))
        steps.append(Step(thought=f"Wrong: it belongs in the {box}.", action=f"take {item}",
                          observation="Taken.", kind="reflection"))
    steps.append(Step(thought=f"A {item} goes in the {box}.", action=f"put {item} in {box}", observation="You win."))
    return Trajectory(id=f"t{i}{with_error}", env="twx", task_id=f"twc/{i}", task=f"Tidy up: you see a {item}.",
                      steps=steps, reward=1.0, success=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    save_trajectories([tidy_trajectory(i, with_error=i % 2 == 1) for i in range(12)], path)
    return path


def base_cfg(model_dir, data_file, out, **kw) -> TrainConfig:
    defaults = {"model": str(model_dir), "data": [str(data_file)], "output_dir": str(out), "max_length": 512,
                "max_steps": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 2, "logging_steps": 1,
                "save_steps": 1000, "num_threads": 1, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                "progress": False}
    return TrainConfig(**(defaults | kw))


def test_weight0_steps_carry_exactly_zero_loss_and_gradient(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc = encode_trajectory(tidy_trajectory(1, with_error=True), tok)
    ids = torch.tensor([enc.input_ids])
    err_start, err_end, _ = enc.step_spans[1]
    assert all(label == IGNORE_INDEX for label in enc.labels[err_start:err_end])

    def loss_and_grads(labels):
        model.zero_grad()
        loss = model(input_ids=ids, labels=torch.tensor([labels])).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(enc.labels)
    # a different target for every position of the wrong step changes nothing — it is not in the loss
    tampered = list(enc.labels)
    tampered[err_start:err_end] = [IGNORE_INDEX] * (err_end - err_start)
    loss_b, grads_b = loss_and_grads(tampered)
    assert loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # ... whereas training that step (the "no masking" ablation) does change the gradient
    unmasked = list(enc.labels)
    unmasked[err_start:err_end] = enc.input_ids[err_start:err_end]
    loss_c, grads_c = loss_and_grads(unmasked)
    assert loss_c != loss_a and not all(torch.equal(a, c) for a, c in zip(grads_a, grads_c))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU's bf16 (a GPU trains bf16 weights)")
def test_bf16_on_a_cpu_trains_in_mixed_precision(tiny_model_dir, data_file, tmp_path):
    """`bf16: true` on a CPU stopped in transformers ("doesn't support bf16/gpu"); it now trains fp32 weights (and
    AdamW states) with bf16 matmuls: the losses move off fp32's, a little, and the saved weights are fp32."""
    from safetensors import safe_open

    def losses(out, **kw):
        train(base_cfg(tiny_model_dir, data_file, out, **kw))
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        return [e["loss"] for e in log if "loss" in e]

    fp32, mixed = losses(tmp_path / "fp32", bf16=False), losses(tmp_path / "bf16", bf16=True)
    assert len(fp32) == len(mixed) == 4
    assert fp32 != mixed  # bf16 matmuls ran
    assert all(abs(a - b) <= 0.05 * a for a, b in zip(fp32, mixed))  # the same training, to bf16's rounding
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("attention", [None, "sdpa"], ids=["per-sample-sdpa", "stock-sdpa"])
@pytest.mark.parametrize("fused", [True, False], ids=["trl-fused-lm-head", "model-loss"])
def test_trainer_loss_equals_hand_computed_masked_ce_on_packed_batch(tiny_model_dir, data_file, tmp_path, fused,
                                                                     attention):
    from trl import SFTConfig

    from steptune.models.packed_attention import NAME
    from steptune.training.sft import load_model, masked_sft_trainer

    cfg = base_cfg(tiny_model_dir, data_file, tmp_path, attn_implementation=attention)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset, stats = build_dataset(cfg, tok)
    assert stats["masked_error_steps"] == 6 and stats["untrainable"] == 0
    model = load_model(cfg, "fp32")  # as `steptune train` loads it
    assert model.config._attn_implementation == (attention or NAME)
    trainer = masked_sft_trainer()(model=model, processing_class=tok, train_dataset=dataset, args=SFTConfig(
        output_dir=str(tmp_path / "ck"), max_length=512, packing=True, packing_strategy="bfd", padding_free=True,
        per_device_train_batch_size=4, report_to="none", bf16=False))
    trainer.fused_lm_head = fused
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1  # padding-free: one row holding several samples
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
    assert len(starts) > 2
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch)).item()
        # by hand: each sample on its own (no packing, no attention across samples), summed token CE / tokens
        total, count = 0.0, 0
        for a, b in itertools.pairwise(starts):
            ids = batch["input_ids"][:, a:b]
            labels = batch["labels"][:, a:b]
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            keep = target != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    assert trainer_loss == pytest.approx(total / count, rel=1e-4)
    # the first token of every packed sample is never a target (no prediction across the boundary)
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts[:-1])


@pytest.mark.slow
def test_tiny_model_learns_the_trained_actions_and_not_the_errors(data_file, tmp_path):
    from steptune.data.trajectory import load_trajectories
    from steptune.models.tiny import TinyModelConfig, build_tiny_model

    texts = [m.content for t in load_trajectories(data_file) for m in t.messages(include_final_observation=True)]
    model_dir = build_tiny_model(texts, tmp_path / "init", TinyModelConfig(num_hidden_layers=2, vocab_size=600))
    # 500 cosine-decayed steps at 3e-3 reach a loss of ~0.001 for seeds 0-2; 300 steps at 5e-3 stopped at 0.02-0.07
    # and, depending on the seed, 2-8 of 30 greedy steps copied another trajectory's item
    out = train(base_cfg(model_dir, data_file, tmp_path / "m", max_steps=500, per_device_train_batch_size=1,
                         learning_rate=3e-3, lr_scheduler_type="cosine"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] > 1.0 and max(losses[-10:]) < 0.05
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    for i in range(12):
        traj = tidy_trajectory(i, with_error=i % 2 == 1)  # exactly as trained
        msgs = [{"role": m.role, "content": m.content} for m in traj.messages()]
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id)
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            step = traj.steps[[j for j, mm in enumerate(msgs) if mm["role"] == "assistant"].index(k)]
            if step.weight:
                assert text == m["content"], (k, text)
            else:
                assert "on bed" not in text  # the masked wrong step was never learned


def test_lora_adapter_and_merged_model_reload(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel

    adapter = train(base_cfg(tiny_model_dir, data_file, tmp_path / "a",
                             lora={"merge": False, "r": 4, "lora_alpha": 8}))
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter)
    merged_dir = train(base_cfg(tiny_model_dir, data_file, tmp_path / "b", lora={"r": 4, "lora_alpha": 8}))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base(ids).logits)  # LoRA changed the weights
        assert peft_model(ids).logits.shape == merged(ids).logits.shape


def test_a_finished_run_deletes_its_checkpoints_unless_kept(tiny_model_dir, data_file, tmp_path):
    out = train(base_cfg(tiny_model_dir, data_file, tmp_path / "d", max_steps=4, save_steps=2))
    assert (out / "train_summary.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "checkpoints").exists()


def test_max_steps_equal_to_the_steps_of_whole_epochs_is_the_same_training(tiny_model_dir, data_file, tmp_path):
    """What lets the equal-steps row copy a study's training that took S steps instead of training max_steps=S
    again: the same schedule (warmup and cosine over S steps), the same batches in the same order, the same weights."""
    schedule = {"lr_scheduler_type": "cosine", "warmup_ratio": 0.25}
    by_epochs = train(base_cfg(tiny_model_dir, data_file, tmp_path / "e", max_steps=-1, num_train_epochs=3,
                               **schedule))
    steps = json.loads((by_epochs / "train_summary.json").read_text())["steps"]
    by_steps = train(base_cfg(tiny_model_dir, data_file, tmp_path / "s", max_steps=steps, **schedule))
    assert steps % 3 == 0 and json.loads((by_steps / "train_summary.json").read_text())["steps"] == steps
    a, b = load_file(by_epochs / "model.safetensors"), load_file(by_steps / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ...and one step fewer is another training, as the check is meant to tell
    fewer = train(base_cfg(tiny_model_dir, data_file, tmp_path / "f", max_steps=steps - 1, **schedule))
    c = load_file(fewer / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


@contextlib.contextmanager
def trainer_warnings():
    """The messages transformers' Trainer logs meanwhile."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addHandler(handler)
    try:
        yield messages
    finally:
        trainer_log.removeHandler(handler)


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "r"
    train(base_cfg(tiny_model_dir, data_file, out, max_steps=4, save_steps=2, keep_checkpoints=True))
    assert (out / "checkpoints" / "checkpoint-4").exists()
    with trainer_warnings() as warnings:
        train(base_cfg(tiny_model_dir, data_file, out, max_steps=6, save_steps=2))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 6
    # the tiny model ties its LM head to its embedding, as SmolLM2 does: a checkpoint stores it once, and a resume
    # neither warns of a "missing" LM head nor unties it
    assert not [w for w in warnings if "missing keys" in w]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_missing_weight_that_is_not_tied_is_still_reported(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "r"
    train(base_cfg(tiny_model_dir, data_file, out, max_steps=2, save_steps=2, keep_checkpoints=True))
    ckpt = out / "checkpoints" / "checkpoint-2" / "model.safetensors"
    weights = load_file(ckpt)
    dropped = next(k for k in weights if "layers.0" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, ckpt, metadata={"format": "pt"})
    with trainer_warnings() as warnings:
        train(base_cfg(tiny_model_dir, data_file, out, max_steps=3, save_steps=2))
    missing = [w for w in warnings if "missing keys" in w]
    assert missing and dropped in missing[0] and "lm_head" not in missing[0]



@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data_file, tmp_path_factory):
    """4 steps of 3 per epoch (the last checkpoint ends inside an epoch), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(base_cfg(tiny_model_dir, data_file, out, max_steps=4, save_steps=2, keep_checkpoints=True))
    return out


def rerun(tiny_model_dir, data_file, finished_run, tmp_path, damage=None) -> Path:
    """A copy of the finished run, damaged as a kill would have left it, trained again with the same config."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    if damage:
        damage(out / "checkpoints" / "checkpoint-4")
    train(base_cfg(tiny_model_dir, data_file, out, max_steps=4, save_steps=2, keep_checkpoints=True))
    return out


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


KILLED_WHILE_SAVING = {
    # transformers writes weights, optimizer, scheduler, RNG state, then trainer_state.json
    "before-trainer-state": lambda ckpt: (ckpt / "trainer_state.json").unlink(),
    "mid-trainer-state": lambda ckpt: cut_in_half(ckpt / "trainer_state.json"),
    "mid-weights": lambda ckpt: [cut_in_half(ckpt / "model.safetensors"), (ckpt / "trainer_state.json").unlink()],
    "before-checkpoint-dir": shutil.rmtree,
    # not from a kill while saving: one while rotation deletes a checkpoint, and a disk that filled up
    "weights-deleted": lambda ckpt: (ckpt / "model.safetensors").unlink(),
    "weights-truncated": lambda ckpt: cut_in_half(ckpt / "model.safetensors"),
}


@pytest.mark.parametrize("damage", KILLED_WHILE_SAVING.values(), ids=KILLED_WHILE_SAVING.keys())
def test_rerun_after_a_kill_while_saving_resumes_from_the_last_complete_checkpoint_and_matches_the_whole_run(
        tiny_model_dir, data_file, finished_run, tmp_path, damage):
    out = rerun(tiny_model_dir, data_file, finished_run, tmp_path, damage)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    reference = json.loads((finished_run / "train_summary.json").read_text())
    # the loss of steps 1-2 (trained before the kill) counts as much as that of steps 3-4
    assert summary["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    assert summary["epochs"] == reference["epochs"]
    log = (out / "train_log.jsonl").read_text()
    assert [json.loads(line)["step"] for line in log.splitlines()] == [1, 2, 3, 4]
    assert log == (finished_run / "train_log.jsonl").read_text()
    # the resumed run ends where the uninterrupted one did, to the bit
    assert (out / "model.safetensors").read_bytes() == (finished_run / "model.safetensors").read_bytes()


def test_the_disk_estimate_is_the_size_of_a_real_checkpoint(tiny_model_dir, finished_run):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    on_disk = sum(f.stat().st_size for f in (finished_run / "checkpoints" / "checkpoint-4").iterdir())
    assert checkpoint_bytes(model, lora=False) == pytest.approx(on_disk, rel=0.1)
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert checkpoint_bytes(adapter, lora=True) < on_disk / 10  # the adapter and its optimizer alone


def test_rerun_after_the_final_checkpoint_trains_no_further_step(tiny_model_dir, data_file, finished_run, tmp_path):
    out = rerun(tiny_model_dir, data_file, finished_run, tmp_path)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["steps"] == 4
    assert json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / "checkpoints" / "checkpoint-5").exists()
    assert summary["train_loss"] == json.loads((finished_run / "train_summary.json").read_text())["train_loss"]
    assert (out / "train_log.jsonl").read_text() == (finished_run / "train_log.jsonl").read_text()
    assert (out / "model.safetensors").read_bytes() == (finished_run / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tiny_model_dir, data_file, tmp_path):
    cfg = base_cfg(tiny_model_dir, data_file, tmp_path / "ddp", max_steps=3)
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(cfg.model_dump()))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "steptune.training.sft", str(path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["world_size"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ddp") is not None


def test_packed_batches_keep_every_mask_exact(tiny_model_dir, data_file, tmp_path):
    """After TRL's padding-free packing, every sample in the row still trains exactly its weight-1 steps."""
    from trl import SFTConfig, SFTTrainer

    from steptune.data.trajectory import load_trajectories

    cfg = base_cfg(tiny_model_dir, data_file, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset, _ = build_dataset(cfg, tok)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tok,
                         train_dataset=dataset, args=SFTConfig(
                             output_dir=str(tmp_path / "ck"), max_length=512, packing=True, packing_strategy="bfd",
                             padding_free=True, per_device_train_batch_size=2, report_to="none", bf16=False))
    expected = {}
    trajs = load_trajectories(data_file)
    for t in trajs:
        ids = tuple(encode_trajectory(t, tok).input_ids)
        expected[ids] = [s.text() + tok.eos_token for s in t.steps if s.weight]
    seen = 0
    for batch in trainer.get_train_dataloader():
        pos = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in itertools.pairwise(starts):
            ids = tuple(batch["input_ids"][0, a:b].tolist())
            labels = batch["labels"][0, a:b].tolist()
            runs, cur = [], []
            for tok_id, lab in zip(ids, labels):
                if lab != IGNORE_INDEX:
                    cur.append(tok_id)
                elif cur:
                    runs.append(cur)
                    cur = []
            runs += [cur] if cur else []
            assert [tok.decode(r) for r in runs] == expected[ids]  # the sample is found whole, masks intact
            seen += 1
    assert seen == len(trajs)  # every sample, once


# -- config keys: the names of transformers / TRL / peft; the old ones read for one release, with one warning each

OLD_KEYS = [("batch_size", 3, "per_device_train_batch_size", 3), ("grad_accum", 2, "gradient_accumulation_steps", 2),
            ("lr_scheduler", "linear", "lr_scheduler_type", "linear"), ("resume", False, "resume_from_checkpoint", False),
            ("epochs", 5, "num_train_epochs", 5.0), ("lora.alpha", 8, "lora.lora_alpha", 8),
            ("lora.dropout", 0.2, "lora.lora_dropout", 0.2), ("precision", "bf16", "bf16", True),
            ("precision", "fp32", "fp16", False)]


def _nested(key: str, value) -> dict:
    section, _, leaf = key.rpartition(".")
    return {section: {leaf: value}} if section else {key: value}


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _load_pipeline(tmp_path, train: dict, overrides: dict | None = None):
    import warnings

    import yaml

    from steptune.pipeline.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"base": "m"}, "train": train}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path, overrides)
    return cfg, [str(w.message) for w in caught]


@pytest.mark.parametrize("old,value,new,expected", OLD_KEYS, ids=[f"{o}={v}" for o, v, _, _ in OLD_KEYS])
def test_an_old_training_key_still_works_with_one_warning_naming_the_new_key(tmp_path, old, value, new, expected):
    cfg, warned = _load_pipeline(tmp_path, _nested(old, value))
    assert _get(cfg.train, new) == expected
    assert len(warned) == 1 and f"`{old}`" in warned[0] and f"`{new}" in warned[0] and "\n" not in warned[0]
    # `steptune run --set train.<old>=...` takes the same path
    cfg, warned = _load_pipeline(tmp_path, {}, {f"train.{old}": value})
    assert _get(cfg.train, new) == expected and len(warned) == 1


def test_the_new_training_keys_load_without_a_warning(tmp_path):
    new = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, "lr_scheduler_type": "linear",
           "resume_from_checkpoint": False, "num_train_epochs": 5, "bf16": True, "lora": {"lora_alpha": 8,
                                                                                          "lora_dropout": 0.2}}
    cfg, warned = _load_pipeline(tmp_path, new)
    assert warned == []
    assert (cfg.train.lora.lora_alpha, cfg.train.lora.lora_dropout) == (8, 0.2)
    for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
              "resume_from_checkpoint", "num_train_epochs", "bf16"):
        assert getattr(cfg.train, k) == new[k]


@pytest.mark.parametrize("train", [{"batch_size": 2, "per_device_train_batch_size": 3},
                                   {"lora": {"alpha": 8, "lora_alpha": 16}},
                                   {"precision": "bf16", "bf16": False},
                                   {"bf16": True, "fp16": True},
                                   {"batch_sise": 2}, {"lora": {"lora_alpa": 8}}],
                         ids=["old-and-new", "lora-old-and-new", "precision-and-bf16", "bf16-and-fp16", "typo",
                              "lora-typo"])
def test_a_key_given_twice_or_misspelt_is_one_line_error(tmp_path, train):
    from steptune.pipeline.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _load_pipeline(tmp_path, train)
    message = str(e.value)
    assert "\n" not in message and ": train" in message
    if "batch_sise" in train or "lora_alpa" in str(train):
        assert "Extra inputs are not permitted" in message
    else:
        assert "only" in message or "choose one" in message


@pytest.mark.parametrize("train,expected", [({}, None), ({"bf16": True}, "bf16"), ({"fp16": True}, "fp16"),
                                            ({"bf16": False}, "fp32"), ({"precision": "fp16"}, "fp16"),
                                            ({"precision": "auto"}, None)])
def test_bf16_and_fp16_choose_the_precision_and_neither_picks_by_hardware(train, expected):
    import warnings

    from steptune.training.sft import TrainSettings, _precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TrainSettings.model_validate(train)
    auto = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert _precision(cfg) == (expected or auto)


def test_steptune_train_prints_one_warning_line_per_old_key(tmp_path):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(tmp_path / "no-model"), "data": ["d.jsonl"], "output_dir": "o",
                                      "batch_size": 2, "lora": {"alpha": 8}}))
    proc = subprocess.run([sys.executable, "-c", "from steptune.cli import main; main()", "train", str(config)],
                          capture_output=True, text=True, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    warned = [line for line in lines if line.startswith("warning:")]
    assert warned == ["warning: config key `batch_size` is deprecated and will be removed in 0.3: use "
                      "`per_device_train_batch_size`",
                      "warning: config key `lora.alpha` is deprecated and will be removed in 0.3: use "
                      "`lora.lora_alpha`"]
    assert proc.returncode == 2 and lines[-1].startswith("error:") and len(lines) == 3  # then the missing model


def test_status_of_an_interrupted_training_gives_its_pace_and_the_time_left(tiny_model_dir, data_file, tmp_path):
    """A real training of 6 steps, checkpoints at 2, 4 and 6, interrupted before step 6 was saved: `steptune status`
    says step 4 of 6 is saved and, from when checkpoints 2 and 4 were written, the pace and the time left; nothing
    of the kind when a pause between two runs lies between the checkpoints."""
    import os
    import time

    from steptune.pipeline.layout import RunLayout
    from steptune.pipeline.status import run_status

    run = tmp_path / "run"
    out = RunLayout(run).model_dir("golden_d1")
    train(base_cfg(tiny_model_dir, data_file, out, max_steps=6, save_steps=2, save_total_limit=3,
                   keep_checkpoints=True))
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")  # killed before step 6 was saved
    for name in ("model.safetensors", "train_summary.json"):
        (out / name).unlink()
    t = time.time() - 3600
    os.utime(out / "checkpoints" / "checkpoint-2" / "trainer_state.json", (t, t))
    os.utime(out / "checkpoints" / "checkpoint-4" / "trainer_state.json", (t + 40, t + 40))

    def progress(started: float) -> str:
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
        stage = {"status": "running", "key": "k", "started": at}
        (run / "manifest.json").write_text(json.dumps({"stages": {"train:golden_d1": stage}}))
        return run_status(run)[0][0]["progress"]

    assert progress(t - 10) == "step 4 of 6 saved; 20 s a step lately, ~40 s of training left"
    assert progress(t + 10) == "step 4 of 6 saved"  # checkpoint 2 came from an earlier run
    os.utime(out / "checkpoints" / "checkpoint-4" / "trainer_state.json", (t + 1, t + 1))  # a tiny model's pace
    assert progress(t - 10) == "step 4 of 6 saved; 0.5 s a step lately, ~1 s of training left"
