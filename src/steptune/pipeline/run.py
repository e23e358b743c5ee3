"""`steptune run`: STeP end to end, one stage after another, in one run directory.

    golden → split → [init_model] → train:golden_d1 (base agent) → synthesize → filter
           → train:<other methods> → eval:<method> → report

Each stage writes under the run directory and is recorded in manifest.json; a finished stage whose key
(its config + its inputs) is unchanged is skipped, so a killed run continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from steptune.data.trajectory import Trajectory, load_trajectories, save_trajectories
from steptune.pipeline.config import METHOD_TITLES, PipelineConfig
from steptune.pipeline.manifest import Manifest, check_stage, library_versions, stage_key
from steptune.pipeline.split import split_by_task

console = Console()


@dataclass
class Stage:
    name: str
    inputs: list[Path]
    outputs: list[Path]
    config: object
    fn: Callable[[], dict | None]


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
            Stage("golden", [], [self.golden], cfg.golden.model_dump() | {"env": cfg.env.model_dump()}, self._golden),
            Stage("split", [self.golden], [self.d1, self.d2], cfg.split.model_dump() | {"seed": cfg.seed}, self._split),
        ]
        if cfg.model.init:
            out.append(Stage("init_model", [self.golden], [self.model_dir("init")],
                             cfg.model.init.model_dump() | {"seed": self.init_seed}, self._init_model))
        out.append(self._train_stage("golden_d1", [self.d1]))
        out += [
            Stage("synthesize", [self.model_dir("golden_d1"), self.d2], [self.synthesized],
                  cfg.synthesis.model_dump() | {"env": cfg.env.model_dump(), "run_seed": cfg.seed}, self._synthesize),
            Stage("filter", [self.synthesized], [self.dr], cfg.synthesis.model_dump(), self._filter),
        ]
        data_of = {"golden_all": [self.d1, self.d2], "step": [self.d1, self.dr], "step_unmasked": [self.d1, self.dr],
                   "sequential": [self.dr]}
        for method in cfg.methods:
            if method != "golden_d1":
                out.append(self._train_stage(method, data_of[method]))
        if cfg.eval.base_agent_u2:
            out.append(Stage("eval:base_agent_u2", [self.model_dir("golden_d1"), self.d2],
                             [self.eval_dir("base_agent_u2") / "summary.json"],
                             cfg.eval.model_dump() | {"env": cfg.env.model_dump()}, self._evaluate_base_agent_u2))
        for method in cfg.methods:
            out.append(Stage(f"eval:{method}", [self.model_dir(method)], [self.eval_dir(method) / "summary.json"],
                             cfg.eval.model_dump() | {"env": cfg.env.model_dump()},
                             lambda m=method: self._evaluate(m)))
        out.append(Stage("report", [self.eval_dir(m) / "summary.json" for m in cfg.methods],
                         [self.report_dir / "report.md", self.report_dir / "report.html"], {}, self._report))
        return out

    def _golden(self) -> dict:
        g = self.cfg.golden
        if g.source == "file":
            from steptune.data.formats import read_any

            if not g.path:
                raise ValueError("golden.source is 'file' but golden.path is not set")
            trajs = read_any(g.path, env=self.cfg.env.name)[: g.limit]
            return {"trajectories": save_trajectories(trajs, self.golden)}
        from steptune.envs.expert import write_expert_trajectories

        stats = write_expert_trajectories(self.cfg.env.name, g.split, self.golden, limit=g.limit,
                                          env_kwargs=self.cfg.env.kwargs, workers=self.cfg.env.workers)
        return {"written": stats.written, "dropped": stats.dropped, "reasons": stats.reasons}

    def _split(self) -> dict:
        golden = load_trajectories(self.golden)
        d1, d2 = split_by_task(golden, self.cfg.split.d1_fraction, self.cfg.seed, self.cfg.split.stratify)
        save_trajectories(d1, self.d1)
        save_trajectories(d2, self.d2)
        return {"d1": len(d1), "d2": len(d2), "u1_tasks": len({t.task_id for t in d1}),
                "u2_tasks": len({t.task_id for t in d2})}

    def _init_model(self) -> dict:
        from steptune.models.tiny import build_tiny_model

        texts = [m.content for t in load_trajectories(self.golden) for m in t.messages(include_final_observation=True)]
        init = self.cfg.model.init.model_copy(update={"seed": self.init_seed})
        build_tiny_model(texts, self.model_dir("init"), init)
        return {"corpus_messages": len(texts), "seed": self.init_seed}

    @property
    def init_seed(self) -> int:
        """The tiny model's initial weights follow the run seed unless `model.init.seed` pins them."""
        init = self.cfg.model.init
        return self.cfg.seed if init is None or init.seed is None else init.seed

    def _train(self, method: str, data: list[Path]) -> dict:
        from steptune.training.sft import TrainConfig, train

        start = self.model_dir("golden_d1") if method == "sequential" else self.base_model
        if not any(load_trajectories(p) for p in data):
            # nothing survived filtering: sequential training has no data, so its model is the base agent
            target = self.model_dir(method)
            if target.is_symlink() or target.exists():
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
            target.symlink_to(Path(start).resolve(), target_is_directory=True)
            console.print(f"[yellow]{method}: no training data (Dr is empty); using {start} as is[/yellow]")
            return {"skipped": "no training data", "model": str(start)}
        # the trainer's seed (data order) is the run's unless train.seed pins it
        cfg = TrainConfig.model_validate({"seed": self.cfg.seed, **self.cfg.train, "model": str(start),
                                          "data": [str(p) for p in data], "output_dir": str(self.model_dir(method)),
                                          "unmask_errors": method == "step_unmasked"})
        if self.cfg.launcher is None:
            out = train(cfg)
        else:
            out = self._launch_training(cfg)
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

    def _synthesize(self) -> dict:
        from steptune.synthesis.synthesize import SynthesisConfig, synthesize

        s, env = self.cfg.synthesis, self.cfg.env
        u2 = self.u2_tasks()
        teacher_model = None
        if s.teacher == "llm":
            teacher_model = f"openai:{s.teacher_model}@{s.teacher_base_url}" if s.teacher_base_url else s.teacher_model
        stats = synthesize(SynthesisConfig(
            student=f"{env.rollout_backend}:{self.model_dir('golden_d1')}", env=env.name, env_kwargs=env.kwargs,
            split=self.cfg.golden.split, tasks=u2, limit=s.limit, samples_per_task=s.samples_per_task,
            temperature=s.temperature, max_new_tokens=self.cfg.eval.max_new_tokens, workers=env.workers,
            teacher=s.teacher,
            teacher_model=teacher_model, golden=str(self.d2) if s.use_golden_reference else None,
            out=str(self.synthesized), seed=self.cfg.seed if s.seed is None else s.seed))
        return stats

    def _filter(self) -> dict:
        from steptune.synthesis.filtering import FilterConfig, filter_trajectories
        from steptune.synthesis.synthesize import synthesis_stats

        s = self.cfg.synthesis
        trajs = load_trajectories(self.synthesized)
        kept, report = filter_trajectories(trajs, FilterConfig(max_errors=s.max_errors,
                                                               keep_error_free=s.keep_error_free))
        save_trajectories(kept, self.dr)
        report = {**synthesis_stats(trajs), **report}
        (self.dir / "data" / "filter_stats.json").write_text(json.dumps(report, indent=2))
        return report

    def _evaluate(self, method: str) -> dict:
        cfg = self.cfg
        summary = self._run_eval(method, method, splits=cfg.eval.splits, limit=cfg.eval.limit, inject=cfg.eval.inject)
        return {"splits": summary["splits"], **({"injection": summary["injection"]} if cfg.eval.inject else {})}

    def _evaluate_base_agent_u2(self) -> dict:
        """The base agent alone (greedy, no teacher) on the synthesis tasks U2."""
        summary = self._run_eval("golden_d1", "base_agent_u2", name="base agent on U2",
                                 splits=[self.cfg.golden.split], tasks=self.u2_tasks())
        return {"splits": summary["splits"]}

    def _run_eval(self, method: str, out: str, **settings) -> dict:
        """`steptune eval` of a method's model into eval/<out>, with the run's env, workers and token budget."""
        from steptune.evaluation.eval import EvalConfig, evaluate

        cfg = self.cfg
        return evaluate(EvalConfig(**{
            "model": f"{cfg.env.rollout_backend}:{self.model_dir(method)}", "env": cfg.env.name,
            "workers": cfg.env.workers, "out": str(self.eval_dir(out)), "name": out,
            "max_new_tokens": cfg.eval.max_new_tokens, "env_kwargs": cfg.env.kwargs, **settings}))

    def u2_tasks(self) -> list[str]:
        """The task ids of U2 (the synthesis tasks), from D2."""
        return sorted({t.meta.get("task_ref_id", t.id) for t in load_trajectories(self.d2)})

    def _report(self) -> dict:
        from steptune.pipeline.report import write_run_report

        paths = write_run_report(self.dir)
        return {k: str(v) for k, v in paths.items()}

    def _train_stage(self, method: str, data: list[Path]) -> Stage:
        inputs = list(data) + ([self.model_dir("golden_d1")] if method == "sequential" else [])
        if self.cfg.model.init:
            inputs.append(self.model_dir("init"))
        key = self.cfg.train | {"method": method, "run_seed": self.cfg.seed}
        return Stage(f"train:{method}", inputs, [self.model_dir(method)], key, lambda: self._train(method, data))


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
    if until_stage:
        stages = stages[: names.index(until_stage) + 1]
    if from_stage:
        run.manifest.invalidate_from(names, from_stage)
    t_start = time.perf_counter()
    for stage in stages:
        key = stage_key(stage.config, [p for p in stage.inputs if p.exists()])
        if run.manifest.is_done(stage.name, key, stage.outputs):
            console.print(f"[dim]✓ {stage.name}: up to date, skipped[/dim]")
            continue
        console.rule(f"[bold]{stage.name}")
        t0 = run.manifest.start(stage.name, key)
        info = stage.fn()
        run.manifest.finish(stage.name, t0, stage.outputs, info)
        console.print(f"[green]✓ {stage.name}[/green] in {run.manifest.data['stages'][stage.name]['seconds']:.1f} s")
    run.manifest.data["total_seconds"] = round(time.perf_counter() - t_start, 1)
    run.manifest.save()
    return run.dir
