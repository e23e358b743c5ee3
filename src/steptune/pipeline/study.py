"""`steptune study`: the pipeline once per training seed, then every comparison with 95% confidence intervals.

Each seed is a whole run (`<out>/seed-<S>`, resumable like any run): the run seed reaches the D1/D2 split, the tiny
model's initial weights, the trainer's data order and stage-2 sampling; the golden set and the test tasks stay the
same. Confidence intervals come from a two-level bootstrap: resample the seeds, then the test episodes within each
resampled seed, and take the 2.5th and 97.5th percentiles. Differences between methods are paired: the same test
task in the same seed, so task difficulty cancels out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from steptune.data.trajectory import load_trajectories
from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.layout import BASE_AGENT_U2, RunLayout
from steptune.pipeline.methods import BASE_AGENT, METHODS, STEP, title
from steptune.pipeline.report import (REPEATING_COLUMNS, by_injected_action_markdown, injected_by_action, premise_note,
                                      reflection_counts, reflection_examples, reflection_rows)
from steptune.teacher.expert import NOT_VALID

BOOTSTRAP = 2000
# paired comparisons: STeP minus each method the registry marks with `vs_step`
PAIRS = {f"step_minus_{m.vs_step}": (STEP, m.name) for m in METHODS.values() if m.vs_step}
PAIR_TITLES = {f"step_minus_{m.vs_step}": m.vs_step_title for m in METHODS.values() if m.vs_step}
# the figures `steptune study` prints as its last line
HEADLINE_KEYS = ["base_agent_success_u2", *(f"{name}_unseen" for name in PAIRS), f"recovery_{STEP}",
                 f"recovery_{BASE_AGENT}"]
# --quick: the same study with 30 test games per split and one synthesis sample per U2 task, for a first look in
# under 15 minutes on 2 CPU cores (its intervals are wide)
QUICK = {"eval.limit": 30, "synthesis.samples_per_task": 1}


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def runs_of_seed(out: Path, seed: int) -> list[Path]:
    """Every run of `seed` in a study directory (the study's own, its epoch curve's points): a stage one of them
    finished with the same settings and inputs is copied into another instead of run again (the curve's golden D1
    at the chosen count is the study's base agent)."""
    return [seed_dir(out, seed), *sorted(out.glob(f"epoch-curve/epochs-*/seed-{seed}"))]


def run_study(cfg: PipelineConfig, seeds: list[int], out: Path, command: str | None = None) -> dict:
    from steptune.pipeline.run import console, run_pipeline

    out.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        console.rule(f"[bold]study: seed {seed}")
        run_pipeline(cfg.model_copy(update={"seed": seed}), seed_dir(out, seed), reuse_from=runs_of_seed(out, seed))
        if i + 1 < len(seeds):  # a study of a real model runs for days: each finished seed updates its report
            write_study(out, seeds[: i + 1], command, planned=seeds)
            console.print(f"[green]✓ interim study of seed{'s' * (i > 0)} {', '.join(map(str, seeds[: i + 1]))}"
                          f"[/green] in {out / 'study.md'}")
    return write_study(out, seeds, command)


# what decides STeP's premise for a setting: the base agent and its success on U2 (the same stage keys as the study's,
# so a study of the chosen setting continues from them)
PREMISE_STAGES = ("golden", "split", "init_model", f"train:{BASE_AGENT}", f"eval:{BASE_AGENT_U2}")


def run_premise(cfg: PipelineConfig, seeds: list[int], out: Path) -> dict[int, float]:
    """Only the premise stages of each seed's run (resumable); {seed: the base agent's U2 success in %}."""
    from steptune.pipeline.report import base_agent_u2
    from steptune.pipeline.run import console, run_pipeline

    if not cfg.eval.base_agent_u2:
        from steptune.errors import UserError

        raise UserError("--premise-only needs eval.base_agent_u2: true (the base agent's U2 run is what it measures)")
    out.mkdir(parents=True, exist_ok=True)
    success = {}
    for seed in seeds:
        console.rule(f"[bold]premise: seed {seed}")
        run_pipeline(cfg.model_copy(update={"seed": seed}), seed_dir(out, seed), only=set(PREMISE_STAGES),
                     reuse_from=runs_of_seed(out, seed))
        success[seed] = base_agent_u2(seed_dir(out, seed))["success_rate"]
    return success


def _success(run: Path, method: str, injected: bool = False) -> dict[str, dict[str, float]]:
    """{split: {task id: 1.0 | 0.0}} for one method of one seed's run."""
    out: dict[str, dict[str, float]] = {}
    path = RunLayout(run).episodes(method, injected)
    for t in load_trajectories(path) if path.exists() else []:
        out.setdefault(t.split or "unknown", {})[t.id] = float(t.success)
    return out


def _bootstrap(per_seed: list[np.ndarray], stat=np.mean, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Mean (x100) and 95% CI over seeds, then episodes within each seed (two-level bootstrap)."""
    rng = rng or np.random.default_rng(0)
    per_seed = [a for a in per_seed if len(a)]
    if not per_seed:
        return {"mean": None, "ci_low": None, "ci_high": None}
    point = float(stat(np.concatenate(per_seed)))
    if not np.isfinite(point):  # e.g. a recovery rate where nothing succeeded without the error
        return {"mean": None, "ci_low": None, "ci_high": None}
    draws = []
    for _ in range(BOOTSTRAP):
        seeds = rng.integers(0, len(per_seed), len(per_seed))
        draws.append(stat(np.concatenate([per_seed[s][rng.integers(0, len(per_seed[s]), len(per_seed[s]))]
                                          for s in seeds])))
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"mean": round(100 * point, 2), "ci_low": round(100 * float(low), 2), "ci_high": round(100 * float(high), 2)}


def _ratio(pairs: np.ndarray) -> float:
    """Recovery rate from rows (success with injection, success without): the ratio of the two means."""
    without = pairs[:, 1].mean()
    return pairs[:, 0].mean() / without if without else np.nan


def paired_differences(a: list[dict], b: list[dict], a_injected: list[dict], b_injected: list[dict],
                       splits: list[str], rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """`a` minus `b`, task by task, with CIs: per split, and with one injected error per episode (the recovery
    benchmark, splits pooled) under `injected`. Each argument holds one `_success` result per seed."""
    out = {}
    for sp in splits:
        out[sp] = _bootstrap([np.array([x[sp][t] - y[sp][t] for t in x.get(sp, {}) if t in y.get(sp, {})])
                              for x, y in zip(a, b)], rng=rng)
    out["injected"] = _bootstrap([np.array([x[sp][t] - y[sp][t] for sp in x for t in x[sp] if t in y.get(sp, {})])
                                  for x, y in zip(a_injected, b_injected)], rng=rng)
    return out


def aggregate(out: Path, seeds: list[int]) -> dict[str, Any]:
    runs = [seed_dir(out, s) for s in seeds]
    manifest = json.loads(RunLayout(runs[0]).manifest.read_text())
    methods = manifest["config"]["methods"]
    splits = manifest["config"]["eval"]["splits"]
    success = {m: [_success(r, m) for r in runs] for m in methods}
    injected = {m: [_success(r, m, injected=True) for r in runs] for m in methods}
    rng = np.random.default_rng(0)

    result: dict[str, Any] = {
        "seeds": seeds,
        "test_episodes_per_split_per_seed": {sp: min(len(success[methods[0]][i].get(sp, {})) for i in range(len(runs)))
                                             for sp in splits},
        "methods": {m: title(m) for m in methods},
        "success": {m: {sp: _bootstrap([np.array(list(s.get(sp, {}).values())) for s in success[m]], rng=rng)
                        for sp in splits} for m in methods},
    }
    for name, (a, b) in PAIRS.items():
        if a in methods and b in methods:
            for key, diff in paired_differences(success[a], success[b], injected[a], injected[b], splits,
                                                rng).items():
                if diff["mean"] is not None or key != "injected":
                    result[f"{name}_{key}"] = diff
    for m in methods:
        pairs = [np.array([(inj[sp][t], ok[sp][t]) for sp in inj for t in inj[sp] if t in ok.get(sp, {})])
                 .reshape(-1, 2) for inj, ok in zip(injected[m], success[m])]
        if any(len(p) for p in pairs):
            rec = _bootstrap(pairs, stat=_ratio, rng=rng)
            result[f"recovery_{m}"] = {k: None if v is None else round(v / 100, 3) for k, v in rec.items()}
            result[f"success_injected_{m}"] = _bootstrap([p[:, 0] for p in pairs], rng=rng)
    base = [json.loads(p.read_text())["overall"] for r in runs
            if (p := RunLayout(r).eval_summary(BASE_AGENT_U2)).exists()]
    result["base_agent_success_u2"] = {"per_seed": [b["success_rate"] for b in base],
                                       "mean": round(float(np.mean([b["success_rate"] for b in base])), 2)
                                       if base else None}
    result["premise_note"] = premise_note(result["base_agent_success_u2"]["mean"],
                                          f"the base agent (mean of {len(base)} seed{'s' * (len(base) != 1)})")
    result["stage2"] = [json.loads(p.read_text()) if (p := RunLayout(r).filter_stats).exists() else None
                        for r in runs]
    result["training"] = {m: [json.loads(p.read_text()) if (p := RunLayout(r).train_summary(m)).exists()
                              else None for r in runs] for m in methods}
    result["retrained_in_place"] = [x for seed, r in zip(seeds, runs) for x in retrained_in_place(seed, r)]
    result["stage2_quality"] = [stage2_quality(r) for r in runs]
    result["reflections_at_test_time"] = {m: reflection_counts(runs, m) for m in methods}
    result["recovery_by_injected_action"] = {m: injected_by_action(runs, m) for m in methods}
    result["per_seed_success"] = {m: [{sp: round(100 * float(np.mean(list(s[sp].values()))), 1) for sp in s}
                                      for s in success[m]] for m in methods}
    return result


def retrained_in_place(seed: int, run: Path) -> list[dict[str, Any]]:
    """The models of a run trained again in place after `steptune prune` released them (steptune.pipeline.run
    .retrain_released), each with whether its losses repeated the released model's: where they did not (another
    machine), what read it afterwards saw a slightly different model than what read it before."""
    stages = json.loads(RunLayout(run).manifest.read_text()).get("stages", {})
    return [{"seed": seed, "model": model, **found} for rec in stages.values()
            for model, found in ((rec.get("info") or {}).get("retrained_in_place") or {}).items()]


def _spread(xs: list[int]) -> dict[str, float]:
    q = np.percentile(xs, [25, 50, 75]) if xs else [0, 0, 0]
    return {"n": len(xs), "mean": round(float(np.mean(xs)), 2) if xs else 0.0,
            "p25": float(q[0]), "median": float(q[1]), "p75": float(q[2])}


def stage2_quality(run: Path) -> dict[str, Any] | None:
    """What stage 2 gave STeP, against the golden trajectories of the same U2 tasks (D2): Dr's lengths (steps per
    trajectory, wrong ones included) and D2's, the share of U2 tasks Dr covers, and the flagged steps by kind:
    invalid (the environment refused the action, or there was none) or valid but judged wrong (off the plan, for the
    expert)."""
    layout = RunLayout(run)
    paths = [layout.dataset(name) for name in ("synthesized", "dr", "d2")]
    if not all(p.exists() for p in paths):
        return None
    synthesized, dr, u2 = (load_trajectories(p) for p in paths)
    flagged = [st for t in synthesized for st in t.steps if st.kind == "error"]
    recorded = any(st.invalid is not None for t in synthesized for st in t.steps)
    invalid = sum(bool(st.invalid) for st in flagged) if recorded else _expert_said_invalid(flagged)
    u2_tasks = {t.task_id for t in u2}
    return {"dr_length": _spread([len(t.steps) for t in dr]), "u2_golden_length": _spread([len(t.steps) for t in u2]),
            "u2_tasks": len(u2_tasks), "u2_tasks_in_dr": len(u2_tasks & {t.task_id for t in dr}),
            "dr_with_reflection": sum(any(st.kind == "reflection" for st in t.steps) for t in dr),
            "flagged": len(flagged), "flagged_invalid": invalid,
            "flagged_valid": None if invalid is None else len(flagged) - invalid}


def _expert_said_invalid(flagged: list) -> int | None:
    """Runs recorded before steps carried `invalid`: the expert teacher's verdict says it in words; other teachers'
    do not (None)."""
    if not all(st.critique and st.critique.teacher == "expert" for st in flagged):
        return None
    return sum(st.critique.error.endswith(NOT_VALID) for st in flagged)


def flagged_success_rate(stage2: dict) -> float | None:
    """Stage 2's success rate among the episodes the teacher flagged (named `recovery_rate` in older run directories)."""
    return stage2.get("flagged_success_rate", stage2.get("recovery_rate"))


def _ci(x: dict | None) -> str:
    if not x or x.get("mean") is None:
        return "–"
    return f"{x['mean']:+.1f} [{x['ci_low']:+.1f}, {x['ci_high']:+.1f}]"


def _pct(x: dict | None) -> str:
    if not x or x.get("mean") is None:
        return "–"
    return f"{x['mean']:.1f} [{x['ci_low']:.1f}, {x['ci_high']:.1f}]"


def _rate(x: dict | None) -> str:
    """A ratio (the recovery rate) with its CI."""
    if not x or x.get("mean") is None:
        return "–"
    return f"{x['mean']:.2f} [{x['ci_low']:.2f}, {x['ci_high']:.2f}]"


def study_markdown(s: dict, command: str | None = None) -> str:
    splits = list(next(iter(s["success"].values())))
    n = s["test_episodes_per_split_per_seed"]
    md = ["# STeP study", "",
          f"Seeds {', '.join(map(str, s['seeds']))}; test episodes per split per seed: "
          + ", ".join(f"{sp} {n[sp]}" for sp in splits) + ". 95% confidence intervals from a two-level bootstrap "
          "(seeds, then episodes within a seed); differences are paired on the same task and seed.", ""]
    if interim := s.get("interim"):
        md += [f"**Interim: {len(interim['seeds_done'])} of the {len(interim['seeds_planned'])} seeds "
               f"({', '.join(map(str, interim['seeds_planned']))}) are done; the study is still running.**", ""]
    if command:
        md += ["Command:", "", f"    {command}", ""]
    md += ["## Success rate (%)", "", "| method | " + " | ".join(splits) + " | per seed (" + " / ".join(splits) + ") |",
           "|---|" + "---:|" * len(splits) + "---|"]
    for m, label in s["methods"].items():
        # "–": a seed whose evaluation of the method has not played that split yet (an interim report), not 0% won
        per_seed = "; ".join(" / ".join(f"{d[sp]:.0f}" if sp in d else "–" for sp in splits)
                             for d in s["per_seed_success"][m])
        md.append(f"| {label} | " + " | ".join(_pct(s["success"][m][sp]) for sp in splits) + f" | {per_seed} |")
    md += ["", "## Paired differences (percentage points)", "", "| comparison | " + " | ".join(splits) + " |",
           "|---|" + "---:|" * len(splits)]
    for name in PAIRS:
        if f"{name}_{splits[0]}" in s:
            md.append(f"| {PAIR_TITLES[name]} | "
                      + " | ".join(_ci(s.get(f"{name}_{sp}")) for sp in splits) + " |")
    md += ["", "## Recovery benchmark (one injected error per episode, seen and unseen pooled)", "",
           "| method | success % with the error | recovery rate (with ÷ without) |", "|---|---:|---:|"]
    for m, label in s["methods"].items():
        rec = s.get(f"recovery_{m}")
        if rec:
            md.append(f"| {label} | {_pct(s.get(f'success_injected_{m}'))} | {_rate(rec)} |")
    rows = [f"| {PAIR_TITLES[name]} | {_ci(s[f'{name}_injected'])} |" for name in PAIRS if f"{name}_injected" in s]
    if rows:
        md += ["", "Paired differences in success with the injected error (percentage points):", "",
               "| comparison | with one injected error |", "|---|---:|", *rows]
    md += by_injected_action_markdown(s.get("recovery_by_injected_action", {}), s["methods"], "seeds and splits pooled")
    base = s["base_agent_success_u2"]
    table = reflection_rows(s.get("reflections_at_test_time", {}), s["methods"])
    if table:
        md += ["", "## Reflections at test time", "",
               "Episodes in which the agent reflected on its previous step (a thought that opens as stage 2's "
               "reflections do), of all its episodes, seeds pooled, and how many of those it won; "
               + REPEATING_COLUMNS, "", *table]
        if examples := reflection_examples(s["reflections_at_test_time"], runs=True):
            md += ["", *examples[:-1]]
    md += ["", "## Stage 2 and the base agent", "",
           f"Base agent alone on U2 (greedy), success % per seed: {base['per_seed']} (mean {base['mean']}).", "",
           *([f"**Note:** {s['premise_note']}.", ""] if s.get("premise_note") else []),
           "| seed | U2 episodes | success % with corrections | flagged steps / steps | success % of flagged episodes "
           "| kept (Dr) |",
           "|---:|---:|---:|---:|---:|---:|"]
    for seed, st in zip(s["seeds"], s["stage2"]):
        if st:
            md.append(f"| {seed} | {st.get('episodes')} | {st.get('success_rate')} | {st.get('flagged_steps')} / "
                      f"{st.get('steps')} | {flagged_success_rate(st)} | {st.get('kept')} |")
    md += stage2_quality_markdown(s)
    md += ["", "## Training (per seed)", "", "| method | epochs | optimizer steps | trained tokens |",
           "|---|---|---|---|"]
    for m, runs in s["training"].items():
        cells = [" / ".join(str(r.get(k, "–")) if r else "–" for r in runs)
                 for k in ("epochs", "steps", "trained_tokens")]
        md.append(f"| {s['methods'][m]} | " + " | ".join(cells) + " |")
    md += retrained_markdown(s.get("retrained_in_place") or [], s["methods"])
    from steptune.pipeline.epochs import study_markdown_sections

    md += study_markdown_sections(s)
    return "\n".join(md) + "\n"


def retrained_markdown(retrained: list[dict], titles: dict[str, str]) -> list[str]:
    if not retrained:
        return []
    md = ["", "Trained again in place (weights released by `steptune prune` between sessions, needed again; the same "
          "settings, data and seed):", ""]
    for r in retrained:
        name = titles.get(r["model"], r["model"])
        if r["same_losses"]:
            md.append(f"- seed {r['seed']}, {name}: the same loss at all {r['logged_steps']} logged steps.")
        elif r["same_losses"] is None:
            md.append(f"- seed {r['seed']}, {name}: no log of the released model to compare with.")
        else:
            md.append(f"- seed {r['seed']}, {name}: **its losses differ** (first logged {r['first_loss_released']} "
                      f"then, {r['first_loss_now']} now: another machine or library version), so the stages that "
                      "read it afterwards saw a slightly different model than those before.")
    return md


def stage2_quality_markdown(s: dict) -> list[str]:
    rows = [(seed, q, st) for seed, q, st in zip(s["seeds"], s.get("stage2_quality") or [], s["stage2"]) if q]
    if not rows:
        return []
    md = ["", "### Stage-2 data quality", "",
          "Dr against the golden trajectories of the same U2 tasks: steps per trajectory (Dr's wrong steps included; "
          "mean, quartiles), the U2 tasks Dr covers, the teacher's flags by kind (invalid: the environment refused the "
          "action or there was none; valid: a real action judged wrong, off the plan for the expert), and what the "
          "filter dropped.", "",
          "| seed | Dr steps | U2 golden steps | U2 tasks in Dr | Dr with a reflection | flagged: invalid / valid | "
          "dropped |", "|---:|---|---|---:|---:|---:|---|"]

    def spread(x: dict) -> str:
        return f"{x['mean']:.2f} ({x['p25']:g}/{x['median']:g}/{x['p75']:g})"

    for seed, q, st in rows:
        kinds = "–" if q["flagged_invalid"] is None else f"{q['flagged_invalid']} / {q['flagged_valid']}"
        dropped = "; ".join(f"{why}: {n}" for why, n in ((st or {}).get("dropped") or {}).items()) or "none"
        md.append(f"| {seed} | {spread(q['dr_length'])} | {spread(q['u2_golden_length'])} | {q['u2_tasks_in_dr']} of "
                  f"{q['u2_tasks']} | {q['dr_with_reflection']} of {q['dr_length']['n']} | {kinds} | {dropped} |")
    return md


def plot_study(s: dict, path: Path) -> Path:
    from steptune.evaluation.report import grouped_bars

    splits = list(next(iter(s["success"].values())))
    cells = {title: [s["success"][m][sp] for sp in splits] for m, title in s["methods"].items()}
    means = {title: [c["mean"] or 0.0 for c in row] for title, row in cells.items()}
    errors = {title: [[max(0.0, (c["mean"] or 0) - (c["ci_low"] or 0)) for c in row],
                      [max(0.0, (c["ci_high"] or 0) - (c["mean"] or 0)) for c in row]] for title, row in cells.items()}
    return grouped_bars(splits, means, path, "success % (95% CI)", errors)


def write_study(out: Path, seeds: list[int], command: str | None = None, planned: list[int] | None = None) -> dict:
    """study.json, study.md and study.html (with the plot) in `out`; of `seeds`, finished, when the study runs
    `planned` (an interim report, which says so)."""
    import base64

    from steptune.evaluation.report import html_page, markdown_to_html

    from steptune.pipeline.epochs import study_sections

    s = aggregate(out, seeds)
    if planned is not None and planned != seeds:
        s["interim"] = {"seeds_done": seeds, "seeds_planned": planned}
    s.update(study_sections(out, seeds))  # the epoch curve and the equal-steps row, where they were run
    (out / "study.json").write_text(json.dumps(s, indent=2))
    md = study_markdown(s, command)
    png = plot_study(s, out / "study.png")
    (out / "study.md").write_text(md + "\n![success with 95% CI](study.png)\n")
    body = markdown_to_html(md.splitlines())
    img = base64.b64encode(png.read_bytes()).decode()
    (out / "study.html").write_text(html_page("steptune study", f"{body}<img alt='success with 95% CI' "
                                              f"src='data:image/png;base64,{img}'>"))
    return s
