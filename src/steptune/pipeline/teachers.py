"""The teacher study (`steptune study … --teachers expert,mc,self`): who judges stage 2, and what STeP gains.

For every seed of a study and every teacher, stage 2 runs again from that seed's own base agent with that teacher
alone changed, and STeP is retrained on D1 ∪ the teacher's Dr and evaluated on the study's splits (plain and with
the injected error). The study's own teacher is the study's run itself. Each other teacher's run lives in
`<out>/teachers/<teacher>/seed-<S>`, starts from copies of the seed's golden data, D1/D2 and base agent (same
content, so its stage keys are stable and a rerun resumes) and runs only synthesize → filter → train:step →
eval:step. Golden D1 and golden D1 ∪ D2 are not retrained: their episodes in the study's run are the same test
tasks in the same seed, so every STeP result is paired with them task by task.

What `teachers.json` holds per teacher: its flags' precision and recall against the expert-grounded teacher's
verdicts on the same steps (steptune.evaluation.judges; the expert against itself is the check that a replay
reproduces synthesis), the yield (Dr size, errors per kept trajectory), the cost of stage 2 (environment steps,
model calls, wall time) and STeP's success with 95% CIs, paired against golden D1 and golden D1 ∪ D2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from steptune.data.trajectory import load_trajectories
from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.layout import RunLayout
from steptune.pipeline.manifest import file_digest
from steptune.pipeline.methods import BASE_AGENT, STEP

GOLDEN_ALL = "golden_all"
VERSUS = {"step_minus_golden_d1": BASE_AGENT, "step_minus_golden_all": GOLDEN_ALL}
AGREEMENT_FILE = "agreement_with_expert.json"
# bumped when steptune.evaluation.judges changes what it counts: a cached agreement of another version is recomputed
AGREEMENT_VERSION = 2  # 2: a refused action is an error at replay too, as it was during synthesis


def teacher_dir(out: Path, teacher: str) -> Path:
    return out / "teachers" / teacher


def teacher_config(cfg: PipelineConfig, teacher: str, seed: int) -> PipelineConfig:
    """The study's run with `teacher` judging stage 2 (its default settings) and STeP the only method trained."""
    from steptune.teacher.registry import TEACHERS

    settings = TEACHERS[teacher].model_validate({"name": teacher})
    return cfg.model_copy(update={
        "seed": seed, "methods": [STEP],
        "synthesis": cfg.synthesis.model_copy(update={"teacher": settings}),
        "eval": cfg.eval.model_copy(update={"base_agent_u2": False})})


def run_dirs(cfg: PipelineConfig, out: Path, teacher: str, seeds: list[int]) -> list[Path]:
    """Where each seed's stage 2 with `teacher` lives: the study's own run for its own teacher."""
    from steptune.pipeline.study import seed_dir

    own = teacher == cfg.synthesis.teacher.name
    return [seed_dir(out if own else teacher_dir(out, teacher), s) for s in seeds]


def run_teachers(cfg: PipelineConfig, seeds: list[int], out: Path, teachers: list[str],
                 command: str | None = None) -> dict[str, Any]:
    """Run every teacher's stage 2 and STeP for every seed (resumable), then write teachers.{json,md,html}."""
    from steptune.pipeline.run import console, run_pipeline
    from steptune.pipeline.study import seed_dir

    unknown = sorted(set(teachers) - _teacher_names())
    if unknown:
        from steptune.errors import UserError

        raise UserError(f"--teachers: unknown teacher(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(_teacher_names()))}")
    for teacher in teachers:
        if teacher == cfg.synthesis.teacher.name:
            continue  # the study's own runs
        for seed, target in zip(seeds, run_dirs(cfg, out, teacher, seeds)):
            console.rule(f"[bold]teacher study: {teacher}, seed {seed}")
            _copy_upstream(RunLayout(seed_dir(out, seed)), RunLayout(target))
            run_pipeline(teacher_config(cfg, teacher, seed), target,
                         only={"synthesize", "filter", f"train:{STEP}", f"eval:{STEP}"})
    result = summarize(cfg, out, seeds, teachers)
    write_teachers(out, result, command)
    return result


def _teacher_names() -> set[str]:
    from steptune.teacher.registry import TEACHERS

    return set(TEACHERS)


def _copy_upstream(source: RunLayout, target: RunLayout) -> None:
    """The seed's golden data, split, base agent and initial model, into the teacher's run (no checkpoints)."""
    model = source.model_dir(BASE_AGENT)
    if not (model / "model.safetensors").exists():
        from steptune.errors import UserError

        raise UserError(f"teacher study: {source.dir} has no base agent yet (run the study first)")
    for name in ("golden", "d1", "d2"):
        path = target.dataset(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.dataset(name), path)
    for name in (BASE_AGENT, "init"):  # init: the tiny model built from scratch, where the config builds one
        if (source.model_dir(name) / "model.safetensors").exists():
            _copy_model(source.model_dir(name), target.model_dir(name))


def _copy_model(model: Path, copy: Path) -> None:
    weights = "model.safetensors"
    if copy.exists() and file_digest(copy / weights) != file_digest(model / weights):  # the study retrained it
        shutil.rmtree(copy)
    if not copy.exists():  # written beside and renamed, so a killed copy never passes for a whole one
        partial = copy.with_name(copy.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(model, partial, ignore=shutil.ignore_patterns("checkpoints"))
        partial.rename(copy)


def agreement(cfg: PipelineConfig, run: Path) -> dict[str, Any] | None:
    """The run's stage-2 flags against the expert's verdicts on the same steps (cached beside the synthesis file)."""
    layout = RunLayout(run)
    cached = layout.dir / "data" / AGREEMENT_FILE
    synthesized = layout.dataset("synthesized")
    if not synthesized.exists():
        return None
    digest = file_digest(synthesized)
    if cached.exists() and (old := json.loads(cached.read_text())).get("synthesized_sha256") == digest \
            and old.get("version") == AGREEMENT_VERSION:
        return old
    from steptune.envs.pool import EnvPool
    from steptune.evaluation.judges import compare_with_expert

    with EnvPool(cfg.env.name, cfg.env.workers, cfg.env.kwargs) as pool:
        summary = compare_with_expert(load_trajectories(synthesized), pool).summary()
    summary["synthesized_sha256"], summary["version"] = digest, AGREEMENT_VERSION
    cached.write_text(json.dumps(summary, indent=2))
    return summary


def summarize(cfg: PipelineConfig, out: Path, seeds: list[int], teachers: list[str]) -> dict[str, Any]:
    from steptune.pipeline.study import _bootstrap, _success, paired_differences, seed_dir

    rng = np.random.default_rng(0)
    study_runs = [seed_dir(out, s) for s in seeds]
    golden = {m: [_success(r, m) for r in study_runs] for m in VERSUS.values()}
    golden_inj = {m: [_success(r, m, injected=True) for r in study_runs] for m in VERSUS.values()}
    splits = cfg.eval.splits
    rows: dict[str, Any] = {}
    steps: dict[str, list] = {}
    steps_inj: dict[str, list] = {}
    for teacher in teachers:
        runs = run_dirs(cfg, out, teacher, seeds)
        step = [_success(r, STEP) for r in runs]
        step_inj = [_success(r, STEP, injected=True) for r in runs]
        row: dict[str, Any] = {"runs": [str(r) for r in runs], "stage2": [], "agreement": []}
        for run in runs:
            row["stage2"].append(_stage2(run))
            row["agreement"].append(_short(agreement(cfg, run)))
        row["agreement_pooled"] = _pool_agreement(row["agreement"])
        row["success"] = {sp: _bootstrap([np.array(list(s.get(sp, {}).values())) for s in step], rng=rng)
                          for sp in splits}
        row["success_injected"] = _bootstrap([np.array([v for sp in s for v in s[sp].values()]) for s in step_inj],
                                             rng=rng)
        for name, method in VERSUS.items():
            for key, diff in paired_differences(step, golden[method], step_inj, golden_inj[method], splits,
                                                rng).items():
                row[f"{name}_{key}"] = diff
        row["test_episodes_per_split_per_seed"] = {sp: min((len(s.get(sp, {})) for s in step), default=0)
                                                   for sp in splits}
        rows[teacher] = row
        steps[teacher], steps_inj[teacher] = step, step_inj
    own = cfg.synthesis.teacher.name
    for teacher, row in rows.items():  # the teachers themselves compared: STeP under each minus under the study's
        if teacher != own and own in steps:
            for key, diff in paired_differences(steps[teacher], steps[own], steps_inj[teacher], steps_inj[own],
                                                splits, rng).items():
                row[f"minus_{own}_{key}"] = diff
    return {"seeds": seeds, "splits": splits, "study_teacher": cfg.synthesis.teacher.name,
            "golden_success": {m: {sp: _bootstrap([np.array(list(s.get(sp, {}).values())) for s in golden[m]], rng=rng)
                                   for sp in splits} for m in VERSUS.values()},
            "teachers": rows}


def _stage2(run: Path) -> dict[str, Any] | None:
    """Yield and cost of one run's stage 2, from its manifest and its Dr."""
    layout = RunLayout(run)
    if not layout.manifest.exists():
        return None
    stages = json.loads(layout.manifest.read_text())["stages"]
    synth, filt = stages.get("synthesize", {}), stages.get("filter", {})
    if synth.get("status") != "done":
        return None
    info, counts = synth.get("info", {}), synth.get("info", {}).get("teacher", {})
    path = layout.dataset("dr")
    dr = load_trajectories(path) if path.exists() and path.stat().st_size else []  # empty: nothing was kept
    errors = [sum(st.kind == "error" for st in t.steps) for t in dr]
    episode_steps = info.get("steps", 0)
    return {
        "episodes": info.get("episodes"), "success_rate": info.get("success_rate"),
        "flagged_steps": info.get("flagged_steps"), "steps": episode_steps,
        "dr": len(dr) if filt.get("status") == "done" else None,
        "errors_per_kept": round(float(np.mean(errors)), 3) if errors else None,
        "dropped": (filt.get("info") or {}).get("dropped"),
        # cost: the episodes' own steps, plus the MC teacher's rollouts (model turns, each an environment step)
        # and the LLM teachers' requests; replays that reach a rollout's start state are not counted
        "environment_steps": episode_steps + counts.get("rollout_steps", 0),
        "model_calls": episode_steps + counts.get("rollout_steps", 0) + counts.get("requests", 0),
        "rollouts": counts.get("rollouts", 0), "teacher_requests": counts.get("requests", 0),
        "seconds": synth.get("seconds"),
    }


def _short(a: dict[str, Any] | None) -> dict[str, Any] | None:
    keep = ("steps", "judge_flags", "expert_flags", "tp", "fp", "fn", "tn", "precision", "recall", "f1",
            "expert_unjudged", "diverged_trajectories", "margin_sweep")
    return None if a is None else {k: a[k] for k in keep if k in a}


def _pool_agreement(per_seed: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    from steptune.evaluation.judges import Agreement

    got = [a for a in per_seed if a]
    if not got:
        return None

    def scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
        s = Agreement(*(sum(r.get(k, 0) for r in rows) for k in ("tp", "fp", "fn", "tn"))).summary()
        return {k: s[k] for k in ("judge_flags", "expert_flags", "tp", "fp", "fn", "precision", "recall", "f1")}

    pooled = {"steps": sum(a["steps"] for a in got), **scores(got)}
    sweeps = [a["margin_sweep"] for a in got if "margin_sweep" in a]
    if sweeps:  # a judge that scores states: its flags at other margins, the same steps, seeds pooled
        pooled["margin_sweep"] = [{"margin": rows[0]["margin"], **scores(list(rows))} for rows in zip(*sweeps)]
    return pooled


def teachers_markdown(s: dict[str, Any], command: str | None = None) -> str:
    from steptune.pipeline.study import _ci, _pct

    splits = s["splits"]
    md = ["# Teachers compared", "",
          f"Seeds {', '.join(map(str, s['seeds']))}. Every teacher judged stage 2 from the same base agent of each "
          f"seed; STeP was retrained on D1 ∪ that teacher's Dr and paired task by task with golden D1 and golden "
          f"D1 ∪ D2 of the study's own run ({s['study_teacher']} teacher). 95% CIs from a two-level bootstrap.", ""]
    if command:
        md += ["Command:", "", f"    {command}", ""]
    md += ["## Flags against the expert, yield and cost (seeds summed)", "",
           "| teacher | steps judged | flags | expert flags | precision | recall | Dr | errors per kept "
           "| environment steps | model calls | stage-2 s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in s["teachers"].items():
        a, st = row["agreement_pooled"] or {}, [x for x in row["stage2"] if x]
        total = lambda k: sum(x.get(k) or 0 for x in st) if st else "–"  # noqa: E731
        errs = [x["errors_per_kept"] for x in st if x.get("errors_per_kept") is not None]
        f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
        md.append(f"| {name} | {a.get('steps', '–')} | {a.get('judge_flags', '–')} | {a.get('expert_flags', '–')}"
                  f" | {f(a.get('precision'))} | {f(a.get('recall'))} | {total('dr')} "
                  f"| {f(float(np.mean(errs)) if errs else None)} | {total('environment_steps')} "
                  f"| {total('model_calls')} | {round(total('seconds')) if st else '–'} |")
    for name, row in s["teachers"].items():
        if sweep := (row["agreement_pooled"] or {}).get("margin_sweep"):
            f = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
            md += ["", f"Margin sweep of `{name}` (the flags it would have raised at each margin, on the steps its own "
                   "run judged; seeds pooled):", "", "| margin | flags | precision | recall | F1 |",
                   "|---:|---:|---:|---:|---:|"]
            md += [f"| {r['margin']:g} | {r['judge_flags']} | {f(r['precision'])} | {f(r['recall'])} | {f(r['f1'])} |"
                   for r in sweep]
    md += ["", "## STeP's success (%) by teacher", "",
           "| teacher | " + " | ".join(splits) + " | with one injected error |", "|---|" + "---:|" * (len(splits) + 1)]
    for name, row in s["teachers"].items():
        md.append(f"| {name} | " + " | ".join(_pct(row["success"][sp]) for sp in splits)
                  + f" | {_pct(row['success_injected'])} |")
    for m, per in s["golden_success"].items():
        md.append(f"| ({'golden D1' if m == BASE_AGENT else 'golden D1 ∪ D2'}) | "
                  + " | ".join(_pct(per[sp]) for sp in splits) + " | |")
    md += ["", "## STeP minus golden, paired (percentage points)", "",
           "| teacher | comparison | " + " | ".join(splits) + " | injected |",
           "|---|---|" + "---:|" * (len(splits) + 1)]
    own = s["study_teacher"]
    for name, row in s["teachers"].items():
        for key, title in (("step_minus_golden_d1", "STeP − golden D1"),
                           ("step_minus_golden_all", "STeP − golden D1 ∪ D2"),
                           (f"minus_{own}", f"STeP − STeP with the {own} teacher")):
            if f"{key}_injected" not in row:
                continue
            md.append(f"| {name} | {title} | " + " | ".join(_ci(row.get(f"{key}_{sp}")) for sp in splits)
                      + f" | {_ci(row.get(f'{key}_injected'))} |")
    return "\n".join(md) + "\n"


def write_teachers(out: Path, s: dict[str, Any], command: str | None = None) -> None:
    from steptune.evaluation.report import html_page, markdown_to_html

    if command:
        s["command"] = command
    (out / "teachers.json").write_text(json.dumps(s, indent=2))
    md = teachers_markdown(s, command)
    (out / "teachers.md").write_text(md)
    (out / "teachers.html").write_text(html_page("steptune teachers", markdown_to_html(md.splitlines())))
