"""How long to train, so that a study compares data and not optimizer steps (`steptune study --epoch-curve`).

The epoch curve: golden SFT on D1 and on D1 ∪ D2 trained for each candidate epoch count and evaluated on the *seen*
split only (never unseen). The rule: each count's score is the mean of the two methods' seen success (episodes of
every seed pooled); the chosen count is the smallest whose score is within `TIE_PP` percentage points of the best
(fewer epochs on a tie: cheaper, and no more fitted to the training tasks than the curve shows is useful). Every
method of the study then trains that many epochs.

The equal-steps sensitivity row: every method retrained for the same number of optimizer steps S — per seed, the
largest step count any method took at the chosen epochs (that of the method with the most data: golden D1 ∪ D2, or
STeP where Dr outgrows D2), so no method gets fewer updates than in the study itself — on the study's own data (D1,
D2, Dr copied from its run: the base agent is retrained too, but stage 2 is not rerun, so only the optimizer steps
change), evaluated on the study's splits without the injected error. The methods that took S steps in the study are
not trained again: S steps are whole epochs of their data, the same training, so their models are copied.

Both are resumable like the study: one run directory per setting and seed,
`<out>/epoch-curve/epochs-<E>/seed-<S>` and `<out>/equal-steps/seed-<S>`. The study and its curve copy each other's
finished stages where settings and inputs are the same (`runs_of_seed`): the curve's golden D1 and golden D1 ∪ D2
at the chosen count are the study's, and a base agent trained by `--premise-only` is the curve's point at that
count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from steptune.pipeline.config import PipelineConfig
from steptune.pipeline.layout import RunLayout
from steptune.pipeline.methods import BASE_AGENT

GOLDEN_ALL = "golden_all"
CURVE_METHODS = [BASE_AGENT, GOLDEN_ALL]
CURVE_SPLIT = "seen"
TIE_PP = 1.0  # scores this close (percentage points) to the best count as a tie
RULE = (f"score = mean of golden D1's and golden D1 ∪ D2's seen success (seeds pooled); the smallest epoch count "
        f"whose score is within {TIE_PP:g} pp of the best")
EQUAL_STEPS_RULE = ("every method trained S optimizer steps, S per seed = the most steps any method took at the "
                    "chosen epochs; on the study's D1, D2 and Dr (stage 2 not rerun); no injected error")


def curve_dir(out: Path, epochs: float) -> Path:
    return out / "epoch-curve" / f"epochs-{epochs:g}"


def equal_steps_dir(out: Path) -> Path:
    return out / "equal-steps"


def curve_config(cfg: PipelineConfig, epochs: float, seed: int) -> PipelineConfig:
    """The run for one point of the curve: the two golden methods, `epochs` epochs, seen split only."""
    return cfg.model_copy(update={
        "seed": seed, "methods": CURVE_METHODS,
        "train": cfg.train.model_copy(update={"num_train_epochs": epochs, "max_steps": -1}),
        "eval": cfg.eval.model_copy(update={"splits": [CURVE_SPLIT], "inject": None, "base_agent_u2": False})})


def curve_stages(cfg: PipelineConfig) -> set[str]:
    """Golden data, the split and the two golden methods: no stage 2 (nothing in the curve reads it)."""
    return {"golden", "split", *(["init_model"] if cfg.model.init else []),
            *(f"{kind}:{m}" for kind in ("train", "eval") for m in CURVE_METHODS)}


def run_epoch_curve(cfg: PipelineConfig, seeds: list[int], out: Path, counts: list[float]) -> dict[str, Any]:
    """Train and evaluate every point of the curve (resumable), write `<out>/epoch_curve.json`, return it."""
    from steptune.pipeline.run import console, run_pipeline
    from steptune.pipeline.study import runs_of_seed, seed_dir

    for epochs in counts:
        for seed in seeds:
            console.rule(f"[bold]epoch curve: {epochs:g} epochs, seed {seed}")
            point = curve_config(cfg, epochs, seed)
            run_pipeline(point, seed_dir(curve_dir(out, epochs), seed), only=curve_stages(point),
                         reuse_from=runs_of_seed(out, seed))
    curve = epoch_curve(out, seeds, counts)
    choose_epochs(curve["points"])  # an error if no point has results
    (out / "epoch_curve.json").write_text(json.dumps(curve, indent=2))
    console.print("[bold]epoch curve[/bold] (seen success %, mean of the two golden methods): "
                  + ", ".join(f"{p['epochs']:g} → {p['score']}" for p in curve["points"])
                  + f"; chosen: {curve['chosen']:g} epochs")
    if curve["note"]:
        console.print(f"[yellow]warning: {curve['note']}[/yellow]")
    return curve


def epoch_curve(out: Path, seeds: list[int], counts: list[float]) -> dict[str, Any]:
    """The curve from its run directories: per count, each method's seen success and training, the score, and the
    chosen count (None while no point has both methods' results)."""
    from steptune.pipeline.study import _success, seed_dir

    points = []
    for epochs in counts:
        runs = [seed_dir(curve_dir(out, epochs), s) for s in seeds]
        seen: dict[str, float | None] = {}
        training: dict[str, list] = {}
        for m in CURVE_METHODS:
            won = [v for r in runs for v in _success(r, m).get(CURVE_SPLIT, {}).values()]
            seen[m] = round(100 * float(np.mean(won)), 2) if won else None
            summaries = [json.loads(p.read_text()) if (p := RunLayout(r).train_summary(m)).exists()
                         else {} for r in runs]
            training[m] = [{"steps": t.get("steps"), "train_loss": t.get("train_loss")} for t in summaries]
        scores = [v for v in seen.values() if v is not None]
        episodes = min((len(_success(r, m).get(CURVE_SPLIT, {})) for r in runs for m in CURVE_METHODS), default=0)
        points.append({"epochs": epochs, "seen_success": seen, "training": training, "episodes_per_seed": episodes,
                       "score": round(float(np.mean(scores)), 2) if len(scores) == len(CURVE_METHODS) else None})
    chosen = choose_epochs(points) if any(p["score"] is not None for p in points) else None
    return {"split": CURVE_SPLIT, "seeds": seeds, "rule": RULE, "points": points, "chosen": chosen,
            "note": edge_note(points, chosen)}


def edge_note(points: list[dict[str, Any]], chosen: float | None) -> str | None:
    """A warning when the chosen count is the largest tried (so it beat every smaller one by more than the tie
    margin): the curve has not shown that longer training stops paying (the SmolLM2 study's 1, 2, 4 chose 4, 19.5
    points above 2)."""
    scored = sorted((p for p in points if p["score"] is not None), key=lambda p: p["epochs"])
    if chosen is None or len(scored) < 2 or chosen != scored[-1]["epochs"]:
        return None
    gain = scored[-1]["score"] - scored[-2]["score"]
    return (f"the chosen {chosen:g} epochs is the largest count tried and beat {scored[-2]['epochs']:g} by "
            f"{gain:.1f} points: longer training may still pay; add a larger count to --epoch-curve")


def choose_epochs(points: list[dict[str, Any]], tie_pp: float = TIE_PP) -> float:
    """The smallest epoch count whose score is within `tie_pp` of the best (see the module's docstring)."""
    scored = [p for p in points if p["score"] is not None]
    if not scored:
        from steptune.errors import UserError

        raise UserError("epoch curve: no seen-split results to choose from (did its evaluations run?)")
    best = max(p["score"] for p in scored)
    return min(p["epochs"] for p in scored if p["score"] >= best - tie_pp)


def with_epochs(cfg: PipelineConfig, epochs: float) -> PipelineConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_train_epochs": epochs, "max_steps": -1})})


def _steps(run: Path, method: str) -> int | None:
    """The optimizer steps `method`'s training took in the run at `run` (None before it finished)."""
    path = RunLayout(run).train_summary(method)
    return (json.loads(path.read_text()).get("steps") or 0) if path.exists() else None


def equal_steps(runs: list[Path], methods: list[str]) -> list[int]:
    """S per seed: the most optimizer steps any method of that seed's study run took."""
    steps = []
    for run in runs:
        taken = [n for m in methods if (n := _steps(run, m)) is not None]
        if not taken:
            from steptune.errors import UserError

            raise UserError(f"equal steps: {run} has no trained methods yet (run the study first)")
        steps.append(max(taken))
    return steps


def run_equal_steps(cfg: PipelineConfig, seeds: list[int], out: Path) -> None:
    """The sensitivity row's runs: the study's data, every method trained S steps, evaluated without injection."""
    from steptune.pipeline.run import Run, console, run_pipeline
    from steptune.pipeline.study import seed_dir

    for seed, steps in zip(seeds, equal_steps([seed_dir(out, s) for s in seeds], cfg.methods)):
        console.rule(f"[bold]equal steps: {steps} optimizer steps per method, seed {seed}")
        run_cfg = cfg.model_copy(update={
            "seed": seed, "train": cfg.train.model_copy(update={"max_steps": steps}),
            "eval": cfg.eval.model_copy(update={"inject": None, "base_agent_u2": False})})
        source, target = Run(run_cfg, seed_dir(out, seed)), Run(run_cfg, seed_dir(equal_steps_dir(out), seed))
        target.dir.mkdir(parents=True, exist_ok=True)
        paths = source.paths
        for path in (*(paths.dataset(d) for d in ("golden", "d1", "d2", "synthesized", "dr")), paths.filter_stats,
                     paths.teacher_stats):
            copy = target.dir / path.relative_to(source.dir)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)  # same content, same stage keys: a rerun resumes
        only = {*(["init_model"] if cfg.model.init else []),
                *(f"{kind}:{m}" for kind in ("train", "eval") for m in cfg.methods)}
        # a method whose study training took S steps is trained no differently here (the same data, schedule and
        # batches: tests/test_training.py), so its study model is copied, not trained again
        same = {f"train:{m}": source.dir for m in cfg.methods if _steps(source.dir, m) == steps}
        run_pipeline(run_cfg, target.dir, only=only, same_as=same)


def study_sections(out: Path, seeds: list[int]) -> dict[str, Any]:
    """What study.json gains from the curve and the equal-steps runs, where they exist."""
    from steptune.pipeline.study import PAIRS, aggregate, seed_dir

    extra: dict[str, Any] = {}
    if (path := out / "epoch_curve.json").exists():
        extra["epoch_curve"] = json.loads(path.read_text())
    # the seeds whose equal-steps runs are evaluated (`--equal-steps-seeds` may pick fewer than the study's)
    done = [seed for seed in seeds if _evaluated(seed_dir(equal_steps_dir(out), seed))]
    if done:
        s = aggregate(equal_steps_dir(out), done)
        extra["equal_steps"] = {
            "rule": EQUAL_STEPS_RULE, "seeds": done,
            "steps_per_seed": [max((t or {}).get("steps") or 0 for t in per_method)
                               for per_method in zip(*s["training"].values())],
            "success": s["success"], **{k: v for k, v in s.items() if any(k.startswith(f"{p}_") for p in PAIRS)}}
    return extra


def _evaluated(run: Path) -> bool:
    """Whether every method of the run at `run` has finished its evaluation (episodes are written as they end)."""
    layout = RunLayout(run)
    if not layout.manifest.exists():
        return False
    methods = json.loads(layout.manifest.read_text())["config"]["methods"]
    return all(layout.eval_summary(m).exists() for m in methods)


def study_markdown_sections(s: dict[str, Any]) -> list[str]:
    """The curve's and the equal-steps row's sections of study.md."""
    from steptune.pipeline.study import PAIR_TITLES, _ci, _pct

    md: list[str] = []
    if curve := s.get("epoch_curve"):
        md += ["", f"## Epoch count, chosen on the {curve['split']} split", "",
               f"Rule: {curve['rule']}. Chosen: **{curve['chosen']:g} epochs** (seeds {curve['seeds']})."
               + (f" Note: {curve['note']}." if curve.get("note") else ""), "",
               "| epochs | golden D1 seen % | golden D1 ∪ D2 seen % | score | optimizer steps (D1 / D1 ∪ D2) "
               "| train loss (D1 / D1 ∪ D2) |", "|---:|---:|---:|---:|---|---|"]
        for p in curve["points"]:
            tr = p["training"]
            steps = " / ".join(",".join(str(t["steps"]) for t in tr[m]) for m in CURVE_METHODS)
            loss = " / ".join(",".join(f"{t['train_loss']:.2f}" if t["train_loss"] is not None else "–"
                                       for t in tr[m]) for m in CURVE_METHODS)
            md.append(f"| {p['epochs']:g} | {p['seen_success'][BASE_AGENT]} | {p['seen_success'][GOLDEN_ALL]} "
                      f"| {p['score']} | {steps} | {loss} |")
    if eq := s.get("equal_steps"):
        splits = list(next(iter(eq["success"].values())))
        md += ["", "## Sensitivity: equal optimizer steps", "",
               f"Rule: {eq['rule']}." + (f" Seeds {eq['seeds']}," if "seeds" in eq else "")
               + f" Steps per seed: {eq['steps_per_seed']}.", "",
               "| | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
        for m, per_split in eq["success"].items():
            md.append(f"| {s['methods'].get(m, m)} success % | " + " | ".join(_pct(per_split[sp]) for sp in splits)
                      + " |")
        for name, title in PAIR_TITLES.items():
            if f"{name}_{splits[0]}" in eq:
                md.append(f"| {title} | " + " | ".join(_ci(eq.get(f"{name}_{sp}")) for sp in splits) + " |")
    return md
