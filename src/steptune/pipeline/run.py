"""`steptune run`: STeP end to end, one stage after another, in one run directory.

    golden → split → [init_model] → train:golden_d1 (base agent) → synthesize → filter
           → train:<other methods> → eval:<method> → report

Each stage is a plain function of its own typed config (`TrainConfig`, `SynthesisConfig`, `FilterConfig`,
`EvalConfig`, ...) and owns the paths it writes. Its key in manifest.json is a hash of that config and of its
inputs' contents, so:
  * an unchanged stage that finished is skipped, and one that was killed resumes from what it wrote;
  * a stage whose key changed (or that `--from` names) first removes its outputs and those of every stage that
    depends on them, so a run directory never mixes results of different settings.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from steptune.data.trajectory import load_trajectories, save_trajectories
from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.manifest import (
    Manifest,
    check_stage,
    library_versions,
    stage_key,
)
from steptune.pipeline.split import split_by_task

console = Console()

# settings that change how fast a stage runs, never what it writes: left out of its key
SPEED_ONLY = {"workers", "progress", "num_threads"}


@dataclass
class Stage:
    name: str
    inputs: list[Path]
    outputs: list[Path]  # everything the stage writes: removed when its key changes
    config: Callable[[], Any]  # the stage's config, built when the stage is reached (its inputs exist then)
    fn: Callable[[Any], dict | None]  # runs the stage with that config


def config_for_key(config: Any) -> Any:
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    if isinstance(data, dict):
        return {k: config_for_key(v) for k, v in data.items() if k not in SPEED_ONLY}
    if isinstance(data, list):
        return [config_for_key(v) for v in data]
    return data


@dataclass
class Run:
    cfg: PipelineConfig
    dir: Path
    manifest: Manifest = field(init=False)

    def __post_init__(self) -> None:
        self.manifest = Manifest(self.dir)  # read only: `open()` writes, once the request has been checked

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest.data["config"] = self.cfg.model_dump(mode="json")
        self.manifest.data["versions"] = library_versions()
        self.manifest.save()

    # paths ---------------------------------------------------------------------------------------
    @property
    def golden(self) -> Path:
        return self.dir / "data" / "golden.jsonl"

    @property
    def d1(self) -> Path:
        return self.dir / "data" / "d1.jsonl"

    @property
    def d2(self) -> Path:
        return self.dir / "data" / "d2.jsonl"

    @property
    def synthesized(self) -> Path:
        return self.dir / "data" / "synthesized.jsonl"

    @property
    def dr(self) -> Path:
        return self.dir / "data" / "dr.jsonl"

    @property
    def teacher_stats(self) -> Path:
        return self.dir / "data" / "synthesized_teacher.json"

    @property
    def filter_stats(self) -> Path:
        return self.dir / "data" / "filter_stats.json"

    @property
    def base_model(self) -> Path | str:
        return self.dir / "models" / "init" if self.cfg.model.init else self.cfg.model.base  # type: ignore[return-value]

    def model_dir(self, method: str) -> Path:
        return self.dir / "models" / method

    def eval_dir(self, method: str) -> Path:
        return self.dir / "eval" / method

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    # stages --------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg = self.cfg
        out: list[Stage] = [
            Stage("golden", [], [self.golden], lambda: {"golden": cfg.golden, "env": cfg.env}, self._golden),
            Stage("split", [self.golden], [self.d1, self.d2], lambda: {"split": cfg.split, "seed": cfg.seed},
                  self._split),
        ]
        if cfg.model.init:
            out.append(Stage("init_model", [self.golden], [self.model_dir("init")],
                             lambda: cfg.model.init.model_copy(update={"seed": self.init_seed}), self._init_model))
        out.append(self._train_stage("golden_d1", [self.d1]))
        out += [
            Stage("synthesize", [self.model_dir("golden_d1"), self.d2], [self.synthesized, self.teacher_stats],
                  self.synthesis_config, self._synthesize),
            Stage("filter", [self.synthesized], [self.dr, self.filter_stats], lambda: cfg.filter, self._filter),
        ]
        data_of = {"golden_all": [self.d1, self.d2], "step": [self.d1, self.dr], "step_unmasked": [self.d1, self.dr],
                   "sequential": [self.dr]}
        for method in cfg.methods:
            if method != "golden_d1":
                out.append(self._train_stage(method, data_of[method]))
        if cfg.eval.base_agent_u2:
            out.append(Stage("eval:base_agent_u2", [self.model_dir("golden_d1"), self.d2],
                             [self.eval_dir("base_agent_u2")], self.base_agent_eval_config, self._evaluate))
        for method in cfg.methods:
            out.append(Stage(f"eval:{method}", [self.model_dir(method)], [self.eval_dir(method)],
                             lambda m=method: self.eval_config(m), self._evaluate))
        out.append(Stage("report", [self.eval_dir(m) / "summary.json" for m in cfg.methods], [self.report_dir],
                         dict, self._report))
        return out

    def _golden(self, _) -> dict:
        g = self.cfg.golden
        if g.source == "file":
            from steptune.data.formats import read_any

            trajs = read_any(g.path, env=self.cfg.env.name)[: g.limit]
            return {"trajectories": save_trajectories(trajs, self.golden)}
        from steptune.synthesis.golden import write_expert_trajectories

        stats = write_expert_trajectories(self.cfg.env.name, g.split, self.golden, limit=g.limit,
                                          env_kwargs=self.cfg.env.kwargs, workers=self.cfg.env.workers)
        # the file's count, not this call's: a resumed stage writes only what was missing
        return {"trajectories": len(load_trajectories(self.golden)), "dropped": stats.dropped,
                "reasons": stats.reasons}

    def _split(self, _) -> dict:
        golden = load_trajectories(self.golden)
        d1, d2 = split_by_task(golden, self.cfg.split.d1_fraction, self.cfg.seed, self.cfg.split.stratify)
        save_trajectories(d1, self.d1)
        save_trajectories(d2, self.d2)
        return {"d1": len(d1), "d2": len(d2), "u1_tasks": len({t.task_id for t in d1}),
                "u2_tasks": len({t.task_id for t in d2})}

    def _init_model(self, init) -> dict:
        from steptune.models.tiny import build_tiny_model

        texts = [m.content for t in load_trajectories(self.golden) for m in t.messages(include_final_observation=True)]
        build_tiny_model(texts, self.model_dir("init"), init)
        return {"corpus_messages": len(texts), "seed": init.seed}

    @property
    def init_seed(self) -> int:
        """The tiny model's initial weights follow the run seed unless `model.init.seed` pins them."""
        init = self.cfg.model.init
        return self.cfg.seed if init is None or init.seed is None else init.seed

    def train_config(self, method: str, data: list[Path]):
        from steptune.training.sft import TrainConfig

        start = self.model_dir("golden_d1") if method == "sequential" else self.base_model
        settings = self.cfg.train.model_dump(exclude_unset=False)
        if settings["seed"] is None:  # the trainer's seed (data order) is the run's unless train.seed pins it
            settings["seed"] = self.cfg.seed
        return TrainConfig(**settings, model=str(start), data=[str(p) for p in data],
                           output_dir=str(self.model_dir(method)), unmask_errors=method == "step_unmasked")

    def _train(self, cfg) -> dict:
        from steptune.training.sft import train

        if not any(load_trajectories(p) for p in cfg.data):
            # nothing survived filtering: sequential training has no data, so its model is its start model
            target = Path(cfg.output_dir)
            remove(target)
            target.symlink_to(Path(cfg.model).resolve(), target_is_directory=True)
            console.print(f"[yellow]{target.name}: no training data (Dr is empty); using {cfg.model} as is[/yellow]")
            return {"skipped": "no training data", "model": cfg.model}
        out = train(cfg) if self.cfg.launcher is None else self._launch_training(cfg)
        return json.loads((out / "train_summary.json").read_text())

    def _launch_training(self, cfg) -> Path:
        import subprocess
        import sys

        import yaml

        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "train_config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        launch = self.cfg.launcher
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if launch.accelerate_config:
            cmd += ["--config_file", launch.accelerate_config]
        if launch.num_processes:
            cmd += ["--num_processes", str(launch.num_processes)]
        cmd += [*launch.extra_args, "-m", "steptune.training.sft", str(cfg_path)]
        console.print(f"[dim]{' '.join(cmd)}[/dim]")
        subprocess.run(cmd, check=True)
        return out

    def student(self, method: str):
        """The student's backend config for a method's model."""
        return self.cfg.student.model_copy(update={"model": str(self.model_dir(method))})

    def synthesis_config(self):
        from steptune.synthesis.synthesize import SynthesisConfig

        s, env = self.cfg.synthesis, self.cfg.env
        return SynthesisConfig(
            student=self.student("golden_d1"), env=env.name, env_kwargs=env.kwargs, split=self.cfg.golden.split,
            tasks=self.u2_tasks(), limit=s.limit, samples_per_task=s.samples_per_task, temperature=s.temperature,
            max_new_tokens=self.cfg.eval.max_new_tokens, workers=env.workers, teacher=s.teacher, mc=s.mc,
            teacher_backend=s.teacher_backend, golden=str(self.d2) if s.use_golden_reference else None,
            out=str(self.synthesized), seed=self.cfg.seed if s.seed is None else s.seed)

    def _synthesize(self, cfg) -> dict:
        from steptune.synthesis.synthesize import synthesize

        return synthesize(cfg)

    def _filter(self, cfg) -> dict:
        from steptune.synthesis.filtering import filter_trajectories
        from steptune.synthesis.synthesize import synthesis_stats

        trajs = load_trajectories(self.synthesized)
        kept, report = filter_trajectories(trajs, cfg)
        save_trajectories(kept, self.dr)
        report = {**synthesis_stats(trajs), **report}
        self.filter_stats.write_text(json.dumps(report, indent=2))
        return report

    def eval_config(self, method: str, out: str | None = None, **settings):
        """`steptune eval` of a method's model into eval/<out>, with the run's env, workers and token budget."""
        from steptune.evaluation.eval import EvalConfig

        e, env = self.cfg.eval, self.cfg.env
        defaults = {"splits": e.splits, "limit": e.limit, "inject": e.inject}
        return EvalConfig(**{"model": self.student(method), "env": env.name, "workers": env.workers,
                             "out": str(self.eval_dir(out or method)), "name": out or method,
                             "max_new_tokens": e.max_new_tokens, "env_kwargs": env.kwargs, **defaults, **settings})

    def base_agent_eval_config(self):
        """The base agent alone (greedy, no teacher) on the synthesis tasks U2."""
        return self.eval_config("golden_d1", "base_agent_u2", splits=[self.cfg.golden.split], limit=None,
                                inject=None, tasks=self.u2_tasks())

    def _evaluate(self, cfg) -> dict:
        from steptune.evaluation.eval import evaluate

        summary = evaluate(cfg)
        return {"splits": summary["splits"], **({"injection": summary["injection"]} if cfg.inject else {})}

    def u2_tasks(self) -> list[str]:
        """The task ids of U2 (the synthesis tasks), from D2."""
        return sorted({t.task_id for t in load_trajectories(self.d2)})

    def _report(self, _) -> dict:
        from steptune.pipeline.report import write_run_report

        paths = write_run_report(self.dir)
        return {k: str(v) for k, v in paths.items()}

    def _train_stage(self, method: str, data: list[Path]) -> Stage:
        inputs = list(data) + ([self.model_dir("golden_d1")] if method == "sequential" else [])
        if self.cfg.model.init:
            inputs.append(self.model_dir("init"))
        return Stage(f"train:{method}", inputs, [self.model_dir(method)], lambda: self.train_config(method, data),
                     self._train)


def remove(path: Path) -> None:
    """Remove a file, a directory or a symlink (never what the symlink points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def dependents(stages: list[Stage], name: str) -> list[str]:
    """`name` and every stage that reads, directly or through others, what it writes (in pipeline order)."""
    hit = {name}
    for stage in stages:  # stages are in dependency order, so one pass finds every transitive dependent
        written = [o for s in stages if s.name in hit for o in s.outputs]
        if stage.name not in hit and any(i == o or i.is_relative_to(o) for i in stage.inputs for o in written):
            hit.add(stage.name)
    return [s.name for s in stages if s.name in hit]


def clear(run: Run, stages: list[Stage], name: str) -> None:
    """Remove the outputs and manifest records of `name` and of everything that depends on it."""
    by_name = {s.name: s for s in stages}
    for dep in dependents(stages, name):
        stale = [p for p in by_name[dep].outputs if p.exists() or p.is_symlink()]
        for path in stale:
            remove(path)
        if stale:
            why = "its settings or inputs changed" if dep == name else f"they came from an earlier {name}"
            console.print(f"[yellow]{dep}: removed its outputs ({why})[/yellow]")
        run.manifest.data["stages"].pop(dep, None)
    run.manifest.save()


def run_pipeline(cfg: PipelineConfig, run_dir: Path | None = None, from_stage: str | None = None,
                 until_stage: str | None = None) -> Path:
    """Run every stage in order (or up to and including `until_stage`), skipping the up-to-date ones."""
    run = Run(cfg, Path(run_dir or cfg.output_dir))
    stages = run.stages()
    names = [s.name for s in stages]
    for name in (from_stage, until_stage):
        if name:
            check_stage(names, name)  # before anything is written
    run.open()
    if from_stage:
        clear(run, stages, from_stage)
    t_start = time.perf_counter()
    for stage in stages[: names.index(until_stage) + 1] if until_stage else stages:
        config = stage.config()
        key = stage_key(config_for_key(config), [p for p in stage.inputs if p.exists()])
        if run.manifest.is_done(stage.name, key, stage.outputs):
            console.print(f"[dim]✓ {stage.name}: up to date, skipped[/dim]")
            continue
        console.rule(f"[bold]{stage.name}")
        if run.manifest.key(stage.name) != key:  # not a resume of this very stage: what is there is stale
            clear(run, stages, stage.name)
        t0 = run.manifest.start(stage.name, key)
        try:
            info = stage.fn(config)
        except BaseException as e:
            run.manifest.fail(stage.name, t0, e)
            raise
        run.manifest.finish(stage.name, t0, stage.outputs, info)
        console.print(f"[green]✓ {stage.name}[/green] in {run.manifest.data['stages'][stage.name]['seconds']:.1f} s")
    run.manifest.data["total_seconds"] = round(time.perf_counter() - t_start, 1)
    run.manifest.save()
    return run.dir
