"""Shared test fixtures. Tests run fully offline on CPU with one torch thread (see shared FACTS)."""

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAVA_TOOL_OPTIONS", "-Xmx512m")

import pytest  # noqa: E402
import torch  # noqa: E402
from _own_processes import TAG_VAR  # noqa: E402

torch.set_num_threads(1)

REACT_CORPUS = [
    "You are in the kitchen. You see a fridge, a counter and a stove. Your task is to cook a meal.",
    "Thought: I need the knife to slice the carrot.\nAction: take knife",
    "Observation: You take the knife.",
    "Thought: The recipe needs a sliced carrot.\nAction: slice carrot with knife",
    "Observation: You slice the carrot.",
    "Thought: I should open the fridge first.\nAction: open fridge",
    "Observation: That action is not valid. Available actions: look, inventory, go north, take coin.",
    "Reflection: I went the wrong way; the coin is in the hallway, so I must go back north.",
    "Your task is to boil water. First, focus on the substance. Then, take actions that will cause it to change.",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + trained BPE tokenizer (ChatML), saved with save_pretrained."""
    from steptune.models.tiny import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    cfg = TinyModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return build_tiny_model(REACT_CORPUS * 20, out, cfg)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """`steptune study` of tests/_tiny_study.py for seed 0, run once: (config, study directory, console output).
    Tests add what they study (the epoch curve, the equal-steps row, other teachers) beside its run, never in it."""
    import contextlib
    import io

    from _tiny_study import TINY

    from steptune.pipeline.config import PipelineConfig
    from steptune.pipeline.study import run_study

    cfg, out, log = PipelineConfig.model_validate(TINY), tmp_path_factory.mktemp("tiny-study"), io.StringIO()
    with contextlib.redirect_stdout(log):
        run_study(cfg, [0], out)
    return cfg, out, log.getvalue()



@pytest.fixture
def own_jvms(monkeypatch):
    """A tag in the environment that every process this test starts inherits (its simulators' JVMs included), so
    that `tagged_pids` counts this test's processes only: a study, a quickstart or another test run on the same
    machine starts and ends JVMs of its own meanwhile."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv(TAG_VAR, tag)
    return tag
