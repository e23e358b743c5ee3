"""The one YAML file that describes a whole STeP run (`steptune run CONFIG.yaml`).

Every section is the typed config of the stage that uses it (the trainer's `TrainSettings`, the backends'
`BackendConfig`, the filter's `FilterConfig`), so a YAML file is checked completely, ranges included, when it is
loaded, before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steptune.agent.backends import BackendConfig
from steptune.data.trajectory import describe_validation_error
from steptune.errors import UserError
from steptune.evaluation.injection import InjectionConfig
from steptune.models.tiny import TinyModelConfig
from steptune.synthesis.filtering import FilterConfig
from steptune.teacher.mc import MCSettings
from steptune.training.sft import TrainSettings

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
    workers: int = Field(2, ge=1)  # concurrent episodes = environment processes


class StudentBackend(BackendConfig):
    """How the student runs in synthesis and evaluation; the model is each stage's own (base agent, methods)."""

    kind: Literal["local", "vllm"] = "local"
    model: str | None = None  # filled in by the pipeline


class GoldenSection(_Strict):
    source: Literal["expert", "file"] = "expert"
    path: str | None = None  # source: file — our JSONL or any format `steptune convert` reads
    split: str = "train"
    limit: int | None = Field(None, ge=1)  # number of tasks taken from the split

    @model_validator(mode="after")
    def _file_has_path(self) -> GoldenSection:
        if self.source == "file" and not self.path:
            raise ValueError("golden.source is 'file' but golden.path is not set")
        return self


class SplitSection(_Strict):
    d1_fraction: float = Field(0.5, gt=0, lt=1)
    stratify: bool = True  # by task type


class ModelSection(_Strict):
    base: str | None = None  # hub id or local path, exactly as transformers takes it
    init: TinyModelConfig | None = None  # or: build a small Llama + tokenizer from the golden corpus

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.base is None) == (self.init is None):
            raise ValueError("give exactly one of `base` (hub id or path) or `init` (a small model to build)")
        return self


class SynthesisSection(_Strict):
    teacher: Literal["expert", "llm", "self", "mc"] = "expert"
    mc: MCSettings = Field(default_factory=MCSettings)  # teacher mc: rollouts, temperature, margin
    # teacher llm: e.g. {kind: openai, model: Qwen2-72B-Instruct, base_url: http://host:8000/v1,
    # api_key_env: OPENAI_API_KEY} (the variable's *name*; keys never go in configs), or {kind: local, model: PATH}
    teacher_backend: BackendConfig | None = None
    use_golden_reference: bool = True
    samples_per_task: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0)  # > 0 for several distinct samples per task
    limit: int | None = Field(None, ge=1)  # number of U2 tasks to run
    seed: int | None = None  # sampling; None: the run's seed

    @model_validator(mode="after")
    def _llm_has_backend(self) -> SynthesisSection:
        if self.teacher == "llm" and self.teacher_backend is None:
            raise ValueError("teacher 'llm' needs teacher_backend, e.g. {kind: openai, model: NAME, base_url: URL}")
        if self.teacher_backend and self.teacher_backend.kind == "openai" and not self.teacher_backend.base_url:
            raise ValueError("teacher_backend of kind openai needs base_url, e.g. http://localhost:8000/v1")
        return self


class EvalSection(_Strict):
    splits: list[str] = Field(default_factory=lambda: ["seen", "unseen"], min_length=1)
    limit: int | None = Field(None, ge=1)  # episodes per split
    max_new_tokens: int = Field(64, ge=1)  # per turn, in synthesis too
    # the recovery benchmark (steptune.evaluation.injection): every method also runs each task with one injected error
    inject: InjectionConfig | None = None
    base_agent_u2: bool = True  # also run the base agent alone (greedy) on the U2 tasks: does it succeed on 30-70%?


class LauncherSection(_Strict):
    """Run each training stage under `accelerate launch` (several GPUs or nodes; DeepSpeed / FSDP configs)."""

    accelerate_config: str | None = None  # e.g. configs/accelerate/deepspeed_zero3.yaml
    num_processes: int | None = Field(None, ge=1)
    extra_args: list[str] = Field(default_factory=list)  # e.g. ["--num_machines", "2", "--machine_rank", "0"]


class PipelineConfig(_Strict):
    name: str = "step"
    output_dir: str = "runs/step"
    # the run seed reaches every random source unless a stage pins its own: the D1/D2 split, the tiny model's initial
    # weights (model.init.seed), the trainer's data order (train.seed) and stage-2 sampling (synthesis.seed), where
    # each episode's turns draw from seeds derived from (seed, sample index, episode, step)
    seed: int = 0
    env: EnvSection = Field(default_factory=EnvSection)
    student: StudentBackend = Field(default_factory=StudentBackend)
    golden: GoldenSection = Field(default_factory=GoldenSection)
    split: SplitSection = Field(default_factory=SplitSection)
    model: ModelSection
    train: TrainSettings = Field(default_factory=TrainSettings)  # shared by every method's training
    launcher: LauncherSection | None = None  # None: train in this process
    synthesis: SynthesisSection = Field(default_factory=SynthesisSection)
    # stage 2's filter; the paper keeps successful trajectories with at most k = 2 erroneous steps
    filter: FilterConfig = Field(default_factory=FilterConfig)
    methods: list[Method] = Field(default_factory=lambda: ["golden_d1", "golden_all", "step", "step_unmasked",
                                                           "sequential"], min_length=1)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _base_agent_first(self) -> PipelineConfig:
        if "golden_d1" not in self.methods:
            raise ValueError("methods must include golden_d1: it trains the base agent that stage 2 runs")
        return self


class ConfigError(UserError, ValueError):
    pass


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a YAML config; an error is one line naming the file and each offending key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: cannot set {dotted}: {key} is not a section")
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e, whole='')}") from e
