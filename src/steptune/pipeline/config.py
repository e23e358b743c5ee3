"""The one YAML file that describes a whole STeP run (`steptune run CONFIG.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steptune.errors import UserError
from steptune.evaluation.injection import InjectionConfig
from steptune.models.tiny import TinyModelConfig

Method = Literal["golden_d1", "golden_all", "step", "step_unmasked", "sequential"]
METHOD_TITLES = {
    "golden_d1": "Golden SFT on D1 (base agent)",
    "golden_all": "Golden SFT on D1 ∪ D2",
    "step": "STeP (D1 ∪ Dr, partial masking)",
    "step_unmasked": "STeP without masking",
    "sequential": "Sequential (base agent → Dr)",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvSection(_Strict):
    name: str = "twx"  # sciworld | twx | alfworld | webshop
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the environment's constructor
    workers: int = 2  # concurrent episodes = environment processes
    rollout_backend: Literal["local", "vllm"] = "local"  # how the student is run in synthesis and evaluation


class GoldenSection(_Strict):
    source: Literal["expert", "file"] = "expert"
    path: str | None = None  # source: file — our JSONL or any format `steptune convert` reads
    split: str = "train"
    limit: int | None = None  # number of tasks taken from the split


class SplitSection(_Strict):
    d1_fraction: float = 0.5
    stratify: bool = True  # by task type


class ModelSection(_Strict):
    base: str | None = None  # hub id or local path, exactly as transformers takes it
    init: TinyModelConfig | None = None  # or: build a small Llama + tokenizer from the golden corpus

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.base is None) == (self.init is None):
            raise ValueError("model: give exactly one of `base` (hub id or path) or `init` (a small model to build)")
        return self


class SynthesisSection(_Strict):
    teacher: Literal["expert", "llm", "self"] = "expert"
    teacher_model: str | None = None  # llm/hybrid: model name at the OpenAI-compatible server, or a local path
    teacher_base_url: str | None = None  # e.g. http://localhost:8000/v1 (vLLM / SGLang / TGI / OpenAI)
    teacher_api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable; keys never go in configs
    use_golden_reference: bool = True
    samples_per_task: int = 1
    temperature: float = 0.0  # > 0 for several distinct samples per task
    max_errors: int = 2  # filter: keep successful trajectories with at most k erroneous steps
    keep_error_free: bool = True
    limit: int | None = None  # number of U2 tasks to run
    seed: int | None = None  # sampling; None: the run's seed


class EvalSection(_Strict):
    splits: list[str] = Field(default_factory=lambda: ["seen", "unseen"])
    limit: int | None = None  # episodes per split
    max_new_tokens: int = 64
    # the recovery benchmark (steptune.evaluation.injection): every method also runs each task with one injected error
    inject: InjectionConfig | None = None
    base_agent_u2: bool = True  # also run the base agent alone (greedy) on the U2 tasks: does it succeed on 30-70%?


class LauncherSection(_Strict):
    """Run each training stage under `accelerate launch` (several GPUs or nodes; DeepSpeed / FSDP configs)."""

    accelerate_config: str | None = None  # e.g. configs/accelerate/deepspeed_zero3.yaml
    num_processes: int | None = None
    extra_args: list[str] = Field(default_factory=list)  # e.g. ["--num_machines", "2", "--machine_rank", "0"]


class PipelineConfig(_Strict):
    name: str = "step"
    output_dir: str = "runs/step"
    # the run seed reaches every random source unless a stage pins its own: the D1/D2 split, the tiny model's initial
    # weights (model.init.seed), the trainer's data order (train.seed) and stage-2 sampling (synthesis.seed), where
    # each episode's turns draw from seeds derived from (seed, sample index, episode, step)
    seed: int = 0
    env: EnvSection = Field(default_factory=EnvSection)
    golden: GoldenSection = Field(default_factory=GoldenSection)
    split: SplitSection = Field(default_factory=SplitSection)
    model: ModelSection
    train: dict[str, Any] = Field(default_factory=dict)  # TrainConfig fields shared by every training run
    launcher: LauncherSection | None = None  # None: train in this process
    synthesis: SynthesisSection = Field(default_factory=SynthesisSection)
    methods: list[Method] = Field(default_factory=lambda: ["golden_d1", "golden_all", "step", "step_unmasked", "sequential"])
    eval: EvalSection = Field(default_factory=EvalSection)


class ConfigError(UserError, ValueError):
    pass


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a YAML config; errors name the file and the offending field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid config:\n" + "\n".join(lines)) from e
