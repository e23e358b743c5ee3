"""`steptune run`: STeP end to end, one stage after another, in one run directory.

    golden → split → [init_model] → train:golden_d1 (base agent) → eval:base_agent_u2, eval:golden_d1, synthesize
           → filter → train:<other methods> → eval:<other methods> → report
    (`eval.after_each_training`: train:<method> → eval:<method> for each other method)

Each stage is a plain function of its own typed config (`TrainConfig`, `SynthesisConfig`, `FilterConfig`,
`EvalConfig`, ...) and owns the paths it writes. Its key in manifest.json is a hash of that config and of its
inputs' contents, so:
  * an unchanged stage that finished is skipped, and one that was killed resumes from what it wrote;
  * a stage whose key changed (or that `--from` names) first removes its outputs and those of every stage that
    depends on them, so a run directory never mixes results of different settings.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console

from steptune.data.trajectory import load_trajectories, save_trajectories
from steptune.pipeline.config import EvalSection, PipelineConfig
from steptune.pipeline.layout import BASE_AGENT_U2, RELEASED_LOG, TRAIN_LOG, RunLayout, keep_released_log
from steptune.pipeline.lock import hold_run
from steptune.pipeline.manifest import (
    Manifest,
    check_stage,
    code_digests,
    file_digest,
    library_versions,
    some_of,
    stage_key,
)
from steptune.pipeline.methods import BASE_AGENT, METHODS, Method
from steptune.pipeline.split import split_by_task

console = Console()


@dataclass
class Stage:
    name: str
    inputs: list[Path]
    outputs: list[Path]  # everything the stage writes: removed when its key changes
    config: Callable[[], Any]  # the stage's config, built when the stage is reached (its inputs exist then)
    fn: Callable[..., dict | None]  # runs the stage with that config
    # may run in a process of its own beside its neighbours that may too (evaluations and stage 2:
    # `eval.processes`); its fn then also takes `progress`, the label of its progress lines
    parallel: bool = False


def config_for_key(config: Any, run_dir: Path | None = None) -> Any:
    """What a stage's key hashes of its settings: not those a config class names in `speed_only` (they change how
    fast a stage runs, never what it writes), not one it names in `added_defaults` while at that default (a setting
    added after runs existed, whose default does what they did: such runs stay up to date), one it names in
    `keyed_as` at that value whatever it is (a speed-only setting that keys once hashed), and paths inside the run
    directory relative to it (a run directory that was moved or copied, e.g. from a cluster to a laptop, is still up
    to date). A plain dict (an environment's kwargs) is hashed whole, whatever its keys are called."""
    return _for_key(None, config, run_dir)


def _for_key(obj: Any, data: Any, run_dir: Path | None) -> Any:
    """`data` as a key hashes it; `obj` is the config object it was dumped from, if any (whose class names its
    speed-only settings and added defaults)."""
    if isinstance(data, BaseModel):
        obj, data = data, data.model_dump(mode="json")
    if isinstance(data, dict):
        if not isinstance(obj, BaseModel):
            return {k: _for_key(None, v, run_dir) for k, v in data.items()}
        speed_only = getattr(obj, "speed_only", frozenset())
        added = getattr(obj, "added_defaults", {})
        data = {**data, **getattr(obj, "keyed_as", {})}
        return {k: _for_key(getattr(obj, k, None), v, run_dir) for k, v in data.items()
                if k not in speed_only and not (k in added and v == added[k])}
    if isinstance(data, (list, tuple)):
        parts = list(obj) if isinstance(obj, (list, tuple)) and len(obj) == len(data) else [None] * len(data)
        return [_for_key(o, v, run_dir) for o, v in zip(parts, data)]
    if run_dir is not None and isinstance(data, str) and (data == str(run_dir) or data.startswith(f"{run_dir}/")):
        return "<run>" + data[len(str(run_dir)):]
    return data


@dataclass
class Run:
    cfg: PipelineConfig
    dir: Path
    manifest: Manifest = field(init=False)
    paths: RunLayout = field(init=False)

    def __post_init__(self) -> None:
        self.paths = RunLayout(self.dir)
        self.manifest = Manifest(self.dir)  # read only: `open()` writes, once the request has been checked

    def open(self, only: set[str] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest.data["config"] = self.cfg.model_dump(mode="json")
        # the stages this run runs, where it runs some only (an epoch-curve point): `steptune prune` waits for no other
        self.manifest.data["only"] = sorted(only) if only is not None else None
        self.manifest.data["versions"] = library_versions()
        self.manifest.save()

    # paths (steptune.pipeline.layout) ------------------------------------------------------------
    @property
    def golden(self) -> Path:
        return self.paths.dataset("golden")

    @property
    def synthesized(self) -> Path:
        return self.paths.dataset("synthesized")

    @property
    def base_model(self) -> Path | str:
        if self.cfg.model.gguf_package:
            from steptune.models.gguf import converted_package_model, is_converted, package_model_dir

            package = self.cfg.model.gguf_package
            if not is_converted(package):
                console.print(f"converting the GGUF model of {package} once into {package_model_dir(package)} "
                              "(set STEPTUNE_CACHE to choose the place)")
            return converted_package_model(package)
        return self.paths.model_dir("init") if self.cfg.model.init else self.cfg.model.base  # type: ignore[return-value]

    def start_model(self, method: Method) -> Path | str:
        return self.paths.model_dir(BASE_AGENT) if method.start == "base_agent" else self.base_model

    # stages --------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        cfg, paths = self.cfg, self.paths
        d1, d2, dr = paths.dataset("d1"), paths.dataset("d2"), paths.dataset("dr")
        out: list[Stage] = [
            Stage("golden", [], [self.golden], lambda: {"golden": cfg.golden, "env": cfg.env}, self._golden),
            Stage("split", [self.golden], [d1, d2], lambda: {"split": cfg.split, "seed": cfg.seed}, self._split),
        ]
        if cfg.model.init:
            out.append(Stage("init_model", [self.golden], [paths.model_dir("init")],
                             lambda: cfg.model.init.model_copy(update={"seed": self.init_seed}), self._init_model))
        out.append(self._train_stage(METHODS[BASE_AGENT]))
        # the base agent's evaluations first: its U2 success says at once whether STeP's premise holds, before stage
        # 2 spends its time, and once stage 2 is done too nothing else reads its weights (`steptune prune`)
        if cfg.eval.base_agent_u2:
            out.append(Stage(f"eval:{BASE_AGENT_U2}", [paths.model_dir(BASE_AGENT), d2],
                             [paths.eval_dir(BASE_AGENT_U2)], self.base_agent_eval_config, self._evaluate_base,
                             parallel=True))
        # beside the base agent's evaluations (`eval.processes`): all three only read the base agent. Stage 2, the
        # longest, before golden D1's evaluation: two at a time, it starts with U2's and golden D1's games take the
        # core U2's end frees; started last, it ran on alone (a seed of the SmolLM2 study left a core idle ~40 min)
        out.append(Stage("synthesize", [paths.model_dir(BASE_AGENT), d2], [self.synthesized, paths.teacher_stats],
                         self.synthesis_config, self._synthesize, parallel=True))
        out += [self._eval_stage(m) for m in cfg.methods if m == BASE_AGENT]
        out.append(Stage("filter", [self.synthesized], [dr, paths.filter_stats], lambda: cfg.filter, self._filter))
        others = [m for m in cfg.methods if m != BASE_AGENT]
        if cfg.eval.after_each_training:
            out += [stage for m in others for stage in (self._train_stage(METHODS[m]), self._eval_stage(m))]
        else:
            out += [self._train_stage(METHODS[m]) for m in others] + [self._eval_stage(m) for m in others]
        out.append(Stage("report", [paths.eval_summary(m) for m in cfg.methods], [paths.report_dir],
                         dict, self._report))
        return out

    def _golden(self, _) -> dict:
        g = self.cfg.golden
        if g.source == "file":
            from steptune.data.formats import read_any

            trajs = read_any(g.path, env=self.cfg.env.name)[: g.limit]
            return {"trajectories": save_trajectories(trajs, self.golden)}
        from steptune.synthesis.golden import check_drops, write_expert_trajectories

        stats = write_expert_trajectories(self.cfg.env.name, g.split, self.golden, limit=g.limit,
                                          env_kwargs=self.cfg.env.kwargs, workers=self.cfg.env.workers)
        if warning := check_drops(stats, g.max_drop_fraction):
            console.print(f"[yellow]{warning}[/yellow]")
        # the file's count, not this call's: a resumed stage writes only what was missing
        return {"trajectories": len(load_trajectories(self.golden)), "dropped": stats.dropped,
                "reasons": stats.reasons}

    def _split(self, _) -> dict:
        golden = load_trajectories(self.golden)
        d1, d2 = split_by_task(golden, self.cfg.split.d1_fraction, self.cfg.seed, self.cfg.split.stratify)
        save_trajectories(d1, self.paths.dataset("d1"))
        save_trajectories(d2, self.paths.dataset("d2"))
        return {"d1": len(d1), "d2": len(d2), "u1_tasks": len({t.task_id for t in d1}),
                "u2_tasks": len({t.task_id for t in d2})}

    def _init_model(self, init) -> dict:
        from steptune.models.tiny import build_tiny_model

        texts = [m.content for t in load_trajectories(self.golden) for m in t.messages(include_final_observation=True)]
        build_tiny_model(texts, self.paths.model_dir("init"), init)
        return {"corpus_messages": len(texts), "seed": init.seed}

    @property
    def init_seed(self) -> int:
        """The tiny model's initial weights follow the run seed unless `model.init.seed` pins them."""
        init = self.cfg.model.init
        return self.cfg.seed if init is None or init.seed is None else init.seed

    def train_config(self, method: Method):
        from steptune.training.sft import TrainConfig

        settings = self.cfg.train.model_dump(exclude_unset=False)
        if settings["seed"] is None:  # the trainer's seed (data order) is the run's unless train.seed pins it
            settings["seed"] = self.cfg.seed
        return TrainConfig(**settings, model=str(self.start_model(method)),
                           data=[str(self.paths.dataset(d)) for d in method.data],
                           output_dir=str(self.paths.model_dir(method.name)), unmask_errors=method.unmask_errors)

    def _train(self, cfg) -> dict:
        from steptune.training.sft import train

        empty = [p for p in cfg.data if not load_trajectories(p)]
        target = Path(cfg.output_dir)
        if len(empty) == len(cfg.data):
            # nothing survived filtering (Dr is a method's only data): its model is its start model
            remove(target)
            target.symlink_to(Path(cfg.model).resolve(), target_is_directory=True)
            console.print(f"[yellow]{target.name}: no training data (Dr is empty); using {cfg.model} as is[/yellow]")
            return {"skipped": "no training data", "model": cfg.model}
        if empty:  # e.g. STeP when the filter kept nothing: it trains on the rest (D1 alone), and says so
            rest = [p for p in cfg.data if p not in empty]
            console.print(f"[yellow]{target.name}: {', '.join(Path(p).name for p in empty)} is empty (nothing "
                          f"survived filtering); training on {', '.join(Path(p).name for p in rest)} alone[/yellow]")
            cfg = cfg.model_copy(update={"data": rest})
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
        return self.cfg.student.model_copy(update={"model": str(self.paths.model_dir(method))})

    def synthesis_config(self):
        from steptune.synthesis.synthesize import SynthesisConfig

        s, env = self.cfg.synthesis, self.cfg.env
        return SynthesisConfig(
            **s.model_dump(exclude={"use_golden_reference", "seed"}), seed=self.cfg.seed if s.seed is None else s.seed,
            student=self.student(BASE_AGENT), env=env.name, env_kwargs=env.kwargs, split=self.cfg.golden.split,
            tasks=self.u2_tasks(), workers=env.workers, env_backend=env.backend, ray_address=env.ray_address,
            out=str(self.synthesized),
            golden=str(self.paths.dataset("d2")) if s.use_golden_reference else None)

    def _synthesize(self, cfg, progress: bool | str = True) -> dict:
        from steptune.synthesis.synthesize import synthesize

        return synthesize(cfg, progress=progress)

    def _filter(self, cfg) -> dict:
        from steptune.synthesis.filtering import filter_trajectories
        from steptune.synthesis.synthesize import synthesis_stats

        trajs = load_trajectories(self.synthesized)
        kept, report = filter_trajectories(trajs, cfg)
        save_trajectories(kept, self.paths.dataset("dr"))
        report = {**synthesis_stats(trajs), **report}
        self.paths.filter_stats.write_text(json.dumps(report, indent=2))
        return report

    def eval_config(self, method: str, out: str | None = None, **settings):
        """`steptune eval` of a method's model into eval/<out>, with the run's env, workers and token budget."""
        from steptune.evaluation.eval import EvalConfig

        env = self.cfg.env
        pipeline_only = EvalSection.model_fields.keys() - EvalConfig.model_fields.keys()  # how the pipeline evaluates
        return EvalConfig(**{**self.cfg.eval.model_dump(exclude=pipeline_only),
                             "model": self.student(method),
                             "env": env.name, "workers": env.workers, "env_backend": env.backend,
                             "ray_address": env.ray_address, "out": str(self.paths.eval_dir(out or method)),
                             "name": out or method, "env_kwargs": env.kwargs, **settings})

    def base_agent_eval_config(self):
        """The base agent alone (greedy, no teacher) on the synthesis tasks U2."""
        return self.eval_config(BASE_AGENT, BASE_AGENT_U2, splits=[self.cfg.golden.split], limit=None,
                                inject=None, tasks=self.u2_tasks())

    def _evaluate(self, cfg, progress: bool | str = True) -> dict:
        from steptune.evaluation.eval import evaluate

        summary = evaluate(cfg, progress=progress)
        return {"splits": summary["splits"], **({"injection": summary["injection"]} if cfg.inject else {})}

    def _evaluate_base(self, cfg, progress: bool | str = True) -> dict:
        from steptune.pipeline.report import premise_note

        info = self._evaluate(cfg, progress)
        if note := premise_note(info["splits"].get(self.cfg.golden.split, {}).get("success_rate")):
            console.print(f"[yellow]warning: {note}[/yellow]")
        return info

    def u2_tasks(self) -> list[str]:
        """The task ids of U2 (the synthesis tasks), from D2."""
        return sorted({t.task_id for t in load_trajectories(self.paths.dataset("d2"))})

    def _report(self, _) -> dict:
        from steptune.pipeline.report import write_run_report

        paths = write_run_report(self.dir)
        return {k: str(v) for k, v in paths.items()}

    def _eval_stage(self, method: str) -> Stage:
        return Stage(f"eval:{method}", [self.paths.model_dir(method)], [self.paths.eval_dir(method)],
                     lambda: self.eval_config(method), self._evaluate, parallel=True)

    def _train_stage(self, method: Method) -> Stage:
        inputs = [self.paths.dataset(d) for d in method.data]
        if method.start == "base_agent":
            inputs.append(self.paths.model_dir(BASE_AGENT))
        if self.cfg.model.init:
            inputs.append(self.paths.model_dir("init"))
        return Stage(f"train:{method.name}", inputs, [self.paths.model_dir(method.name)],
                     lambda: self.train_config(method), self._train)


def remove(path: Path) -> None:
    """Remove a file, a directory or a symlink (never what the symlink points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def reads(stage: Stage, path: Path) -> bool:
    """Whether `stage` reads `path` (a file, or a folder such as a model) or something inside it."""
    return any(i == path or i.is_relative_to(path) for i in stage.inputs)


def dependents(stages: list[Stage], name: str) -> list[str]:
    """`name` and every stage that reads, directly or through others, what it writes (in pipeline order)."""
    hit = {name}
    for stage in stages:  # stages are in dependency order, so one pass finds every transitive dependent
        written = [o for s in stages if s.name in hit for o in s.outputs]
        if stage.name not in hit and any(reads(stage, o) for o in written):
            hit.add(stage.name)
    return [s.name for s in stages if s.name in hit]


def clear(run: Run, stages: list[Stage], name: str, only: set[str] | None = None) -> None:
    """Remove the outputs and manifest records of `name` and of everything that depends on it (of those in `only`:
    a partial run leaves what it does not run alone, e.g. the study data an equal-steps run copied in)."""
    by_name = {s.name: s for s in stages}
    for dep in dependents(stages, name):
        if only is not None and dep not in only:
            continue
        stale = [p for p in by_name[dep].outputs if p.exists() or p.is_symlink()]
        for path in stale:
            remove(path)
            run.manifest.unrelease(path)
        if stale:
            why = "its settings or inputs changed" if dep == name else f"they came from an earlier {name}"
            console.print(f"[yellow]{dep}: removed its outputs ({why})[/yellow]")
        run.manifest.data["stages"].pop(dep, None)
    run.manifest.save()


def run_pipeline(cfg: PipelineConfig, run_dir: Path | None = None, from_stage: str | None = None,
                 until_stage: str | None = None, only: set[str] | None = None,
                 reuse_from: Sequence[Path] = (), same_as: Mapping[str, Path] | None = None) -> Path:
    """Run every stage in order (or up to and including `until_stage`), skipping the up-to-date ones; `only`: just
    these stages (the study's epoch curve and equal-steps runs, whose other inputs exist or are not needed);
    `reuse_from`: other run directories whose finished stages with this run's key are copied instead of rerun (a
    study and its epoch curve train the same base agent); `same_as`: stage name → a run that finished the same work
    under another key, by the caller's judgement, copied like `reuse_from`'s (an equal-steps training of S steps that
    the study's own training of whole epochs already took)."""
    run = Run(cfg, Path(run_dir or cfg.output_dir))
    stages = run.stages()
    names = [s.name for s in stages]
    for name in (from_stage, until_stage):
        if name:
            check_stage(names, name)  # before anything is written
    if cfg.model.gguf_package:
        from steptune.models.gguf import find_gguf

        find_gguf(cfg.model.gguf_package)  # a package that is not installed: one line, before anything is written
    with hold_run(run.dir, "this run"):
        run.manifest = Manifest(run.dir)  # as the last process that held the lock left it
        run.open(only)
        if from_stage:
            clear(run, stages, from_stage)
        t_start = time.perf_counter()
        todo = [s for s in (stages[: names.index(until_stage) + 1] if until_stage else stages)
                if only is None or s.name in only]
        _run_stages(run, stages, todo, reuse_from, only, same_as or {})
        run.manifest.data["total_seconds"] = round(time.perf_counter() - t_start, 1)
        run.manifest.save()
    return run.dir


def _run_stages(run: Run, stages: list[Stage], todo: list[Stage], reuse_from: Sequence[Path],
                only: set[str] | None, same_as: Mapping[str, Path]) -> None:
    """Run the stages of `todo` that are not up to date or copied from `reuse_from`, in order; consecutive evaluations
    at once where `eval.processes` allows."""
    cfg = run.cfg
    while todo:
        n = 1
        if todo[0].parallel and cfg.eval.processes > 1:
            while n < len(todo) and todo[n].parallel:
                n += 1
        group, todo = todo[:n], todo[n:]
        ready = []
        for stage in group:
            config = stage.config()
            key = _key(run, stage, config)
            if run.manifest.is_done(stage.name, key, stage.outputs):
                console.print(f"[dim]✓ {stage.name}: up to date, skipped[/dim]")
                if changed := run.manifest.code_changes(stage.name, cfg.env.name):
                    console.print(f"[yellow]  {stage.name} was made by other code ({some_of(changed)} changed "
                                  f"since): `--from {stage.name}` makes it again with this code[/yellow]")
            elif source := _reuse(run, stages, stage, key, reuse_from, only):
                console.print(f"[green]✓ {stage.name}[/green]: the same stage (same settings and inputs) copied "
                              f"from {source}")
            elif stage.name in same_as and (source := _reuse(run, stages, stage, key, [same_as[stage.name]], only,
                                                             any_key=True)):
                console.print(f"[green]✓ {stage.name}[/green]: the same work, copied from {source}")
            else:
                retrain_released(run, stages, stage, only)
                check_budget(run, stage)
                ready.append((stage, config, key))
        if len(ready) > 1:
            _run_at_once(run, stages, ready, cfg.eval.processes, only)
        elif ready:
            _run_stage(run, stages, *ready[0], only)


def _key(run: Run, stage: Stage, config: Any) -> str:
    """The stage's key in the manifest: its settings and the digests of its inputs (those of released weights too)."""
    return stage_key(config_for_key(config, run.dir), [run.manifest.digest(p) for p in stage.inputs if p.exists()])


def _reuse(run: Run, stages: list[Stage], stage: Stage, key: str, sources: Sequence[Path],
           only: set[str] | None, any_key: bool = False) -> Path | None:
    """Copy `stage`'s outputs from the first of `sources` that finished it with the same key (with any key where
    `any_key`: the caller knows the work is the same); that run, or None. The copy is recorded under this run's key,
    so a rerun finds it up to date. Copies, not links: a later rerun of either run must not change the other's
    files."""
    try:
        inside = [p.relative_to(run.dir) for p in stage.outputs]
    except ValueError:  # an output outside the run directory: nothing to copy it from
        return None
    for source in sources:
        if source.resolve() == run.dir.resolve():
            continue
        theirs, manifest = [source / p for p in inside], Manifest(source)
        their_key = manifest.key(stage.name) if any_key else key
        if not manifest.is_done(stage.name, their_key, theirs) or any(manifest.released(p) for p in theirs):
            continue
        record = manifest.data["stages"][stage.name]
        clear(run, stages, stage.name, only)
        for src, dst in zip(theirs, stage.outputs):
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst, follow_symlinks=False)
        run.manifest.data["stages"][stage.name] = {
            **record, "key": key, "outputs": {str(p): file_digest(p) for p in stage.outputs if p.exists()},
            "reused_from": str(source), **({"its_key": record.get("key")} if any_key else {})}
        run.manifest.save()
        return source
    return None


def retrain_released(run: Run, stages: list[Stage], stage: Stage, only: set[str] | None) -> None:
    """A stage about to run that reads a model whose weights `steptune prune` released: train the model again in
    place by its training stage, whose settings, data and seed are unchanged (its key is), so the model is the one
    its other readers saw and they stay up to date (stage 2 of a SmolLM2 seed costs an hour). The losses are
    compared with the released model's log, which says whether the training repeated exactly."""
    from steptune.errors import UserError

    for path in stage.inputs:
        if not run.manifest.released(path):
            continue
        maker = next(s for s in stages if path in s.outputs)
        config = maker.config()
        key = _key(run, maker, config)
        # done, or a retraining in place that was interrupted (it resumes): the same key either way
        if run.manifest.key(maker.name) != key or (only is not None and maker.name not in only):
            raise UserError(f"{stage.name} must run (it is new, or its settings changed) and reads {path}, whose "
                            f"weights `steptune prune` deleted, and {maker.name} cannot make them again as they were "
                            f"(its settings or inputs changed): `steptune run <config> --output {run.dir} --from "
                            f"{maker.name}` makes them anew and reruns what depends on them")
        retrain_released(run, stages, maker, only)  # its own start model first
        console.print(f"[yellow]{stage.name} must run and reads {path.name}, whose weights `steptune prune` "
                      f"released: {maker.name} trains them again in place (same settings, data and seed)[/yellow]")
        _run_stage(run, stages, maker, config, key, only)


def _compare_losses(model: Path) -> dict[str, Any] | None:
    """After a retraining in place: whether it logged the losses the released model had (RELEASED_LOG, kept when
    the retraining first began, since a resumed one has rewritten the log). Said, and returned for the manifest;
    None for a model built, not trained (the tiny model's init)."""
    before, after = _losses(model / RELEASED_LOG), _losses(model / TRAIN_LOG)
    if not before and not after:
        return None
    if before and before == after:
        console.print(f"[dim]  {model.name}: the same loss at all {len(after)} logged steps as before[/dim]")
    elif before:
        console.print(f"[yellow]  {model.name}: its losses differ from the released model's (first logged "
                      f"{before[0]} then, {after[0] if after else None} now): another machine or library "
                      "version, so its readers that run now see a slightly different model[/yellow]")
    return {"logged_steps": len(after), "same_losses": before == after if before else None,
            "first_loss_released": before[0] if before else None, "first_loss_now": after[0] if after else None}


def check_budget(run: Run, stage: Stage) -> None:
    """Before a stage spends its time: the token budget of the turns it generates (or, for a training, those its
    model's evaluation will) holds the longest turn the model learns; a UserError with both numbers if not."""
    from steptune.errors import UserError
    from steptune.pipeline.budget import budget_problem

    kind, _, name = stage.name.partition(":")
    if kind == "synthesize":
        method, setting, budget = METHODS[BASE_AGENT], "synthesis.max_new_tokens", run.cfg.synthesis.max_new_tokens
        tokenizer = run.paths.model_dir(BASE_AGENT)
    elif kind in ("train", "eval"):
        method, setting, budget = METHODS[BASE_AGENT if name == BASE_AGENT_U2 else name], "eval.max_new_tokens", \
            run.cfg.eval.max_new_tokens
        tokenizer = run.start_model(method) if kind == "train" else run.paths.model_dir(method.name)
    else:
        return
    learned = dict.fromkeys([*method.data, *(METHODS[BASE_AGENT].data if method.start == "base_agent" else ())])
    if problem := budget_problem(budget, setting, f"{stage.name}'s model", [run.paths.dataset(d) for d in learned],
                                 tokenizer):
        raise UserError(f"{stage.name} did not start: {problem}")


def _losses(log: Path) -> list[float]:
    """The logged training losses in a train log (empty where there is none: a built model)."""
    if not log.exists():
        return []
    return [e["loss"] for e in map(json.loads, log.read_text().splitlines()) if "loss" in e]


def _begin(run: Run, stages: list[Stage], stage: Stage, key: str, only: set[str] | None) -> float:
    if run.manifest.key(stage.name) != key:  # not a resume of this very stage: what is there is stale
        clear(run, stages, stage.name, only)
    for path in stage.outputs:  # released: a retraining in place, whose log is written anew (keep the old one)
        if run.manifest.released(path):
            keep_released_log(path)
    return run.manifest.start(stage.name, key, code_digests(stage.name, run.cfg.env.name))


def _finish(run: Run, stage: Stage, t0: float, info: dict | None) -> None:
    # released, yet written by this very key (a changed key unreleases): trained again in place
    retrained = [p for p in stage.outputs if run.manifest.released(p)]
    if compared := {p.name: found for p in retrained if (found := _compare_losses(p))}:
        info = {**(info or {}), "retrained_in_place": compared}
    run.manifest.finish(stage.name, t0, stage.outputs, info)
    for path in retrained:
        run.manifest.mark_retrained(path)
    console.print(f"[green]✓ {stage.name}[/green] in {run.manifest.data['stages'][stage.name]['seconds']:.1f} s")


def _run_stage(run: Run, stages: list[Stage], stage: Stage, config: Any, key: str, only: set[str] | None) -> None:
    console.rule(f"[bold]{stage.name}")
    t0 = _begin(run, stages, stage, key, only)
    try:
        info = stage.fn(config)
    except BaseException as e:
        run.manifest.fail(stage.name, t0, e)
        raise
    finally:
        _give_back_memory()
    _finish(run, stage, t0, info)


def _give_back_memory() -> None:
    """Hand what a finished stage freed back to the system: glibc keeps a freed heap for reuse, and after the
    trainings (in this process) the evaluations run in processes of their own beside it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        pass


def _run_at_once(run: Run, stages: list[Stage], ready: list[tuple[Stage, Any, str]], processes: int,
                 only: set[str] | None) -> None:
    """Independent stages, `processes` at a time, each in a fresh process (spawned: this one may hold torch's
    threads) with one torch thread; each stage is recorded as it ends, and the first failure is raised once the
    others have ended. Fresh for every stage: a process that has held one evaluation's model keeps much of that
    memory, and the next evaluation's environment workers would be forked from it."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from steptune.threads import beside_parent

    width = min(processes, len(ready))
    console.rule(f"[bold]{len(ready)} stages, {width} at a time")
    console.print(", ".join(s.name for s, _, _ in ready), soft_wrap=True)
    queue, running, failures = list(ready), {}, []
    with ProcessPoolExecutor(width, mp_context=mp.get_context("spawn"), initializer=beside_parent,
                             initargs=(os.getpid(),), max_tasks_per_child=1) as pool:
        while queue or running:
            while queue and len(running) < width:
                stage, config, key = queue.pop(0)
                t0 = _begin(run, stages, stage, key, only)
                if isinstance(config, BaseModel) and "processes" in type(config).model_fields:  # beside others
                    config = config.model_copy(update={"processes": 1})
                running[pool.submit(stage.fn, config, progress=stage.name)] = (stage, t0)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage, t0 = running.pop(future)
                try:
                    info = future.result()
                except BaseException as e:  # noqa: BLE001 - recorded, raised after the others
                    run.manifest.fail(stage.name, t0, e)
                    console.print(f"[red]✗ {stage.name}[/red]: {' '.join(str(e).split())[:300]}")
                    failures.append(e)
                    continue
                _finish(run, stage, t0, info)
    if failures:
        raise failures[0]
