"""The report of a whole run: method × split table, plots (reward by method and split, per task type, training
loss curves, synthesis statistics), as markdown and a self-contained HTML page."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from steptune.data.trajectory import one_line
from steptune.evaluation.recovery import REPEATED
from steptune.evaluation.report import (
    grouped_bars,
    html_page,
    injection_table,
    markdown_table,
    markdown_to_html,
    plot_injection,
    plot_rewards,
    task_type_table,
)
from steptune.pipeline.layout import BASE_AGENT_U2, RunLayout
from steptune.pipeline.methods import STEP, title


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_summaries(run_dir: Path) -> list[dict]:
    paths = RunLayout(run_dir)
    manifest = json.loads(paths.manifest.read_text())
    out = []
    for method in manifest["config"]["methods"]:
        path = paths.eval_summary(method)
        if path.exists():
            s = json.loads(path.read_text())
            s["name"] = title(method)
            s["method"] = method
            out.append(s)
    return out


def loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for log in RunLayout(run_dir).train_logs():
        points = []
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                points.append((int(rec["step"]), float(rec["loss"])))
        if points:
            curves[log.parent.name] = points
    return curves


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=title(name))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked SFT loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_task_type(summaries: list[dict], split: str, path: Path) -> Path:
    types = sorted({t for s in summaries for t in s["task_types"].get(split, {})})
    series = {s["name"]: [s["task_types"].get(split, {}).get(t, {}).get("avg_reward", 0.0) for t in types]
              for s in summaries}
    return grouped_bars(types, series, path, f"{split}: average reward (x100)")


def plot_synthesis(stats: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    items = {"synthesized": stats.get("total", 0), "kept": stats.get("kept", 0),
             **{f"dropped: {k}": v for k, v in stats.get("dropped", {}).items()}}
    ax.barh(list(items), list(items.values()), color=["#888", "#2a2"] + ["#c55"] * (len(items) - 2))
    ax.invert_yaxis()
    ax.set_xlabel("trajectories")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def base_agent_u2(run_dir: Path) -> dict | None:
    """The base agent's own success on the synthesis tasks U2 (eval:base_agent_u2), if it ran."""
    path = RunLayout(run_dir).eval_summary(BASE_AGENT_U2)
    return json.loads(path.read_text())["overall"] if path.exists() else None


def reflection_counts(runs: list[Path], method: str) -> dict[str, Any]:
    """The method's reflections at test time (steptune.evaluation.recovery), runs (seeds) pooled, plain and injected:
    episodes, those with a reflection, those of them won, and up to three won examples."""
    from steptune.data.trajectory import load_trajectories
    from steptune.evaluation.recovery import reflections_at_test_time

    out: dict[str, Any] = {}
    for kind, injected in (("plain", False), ("injected", True)):
        found = [(r.name, reflections_at_test_time(load_trajectories(p)))
                 for r in runs if (p := RunLayout(r).episodes(method, injected)).exists()]
        out[kind] = {k: sum(f[k] for _, f in found) for k in ("episodes", "with_reflection", "succeeded",
                                                             "repeated_after_reflection", "ended_repeating",
                                                             "agent_steps", "steps_without_action")}
        # the agent's own mistakes first, from any run; one example per reflection text (a tiny model writes the
        # same few reflections in every run)
        pooled = sorted(({**e, "run": name} for name, f in found for e in f["examples"]),
                        key=lambda e: not e["own_mistake"])
        firsts: dict[str, dict] = {}
        for e in pooled:
            firsts.setdefault(e["reflection"], e)
        out[kind]["examples"] = list(firsts.values())[:3]
    return out


def injected_by_action(runs: list[Path], method: str) -> dict[str, dict[str, int]]:
    """The method's recovery benchmark by the kind of wrong action injected (steptune.evaluation.recovery
    .by_injected_action), runs (seeds) and splits pooled."""
    from steptune.data.trajectory import load_trajectories
    from steptune.evaluation.recovery import by_injected_action

    pooled: dict[str, dict[str, int]] = {}
    for run in runs:
        layout = RunLayout(run)
        if not (path := layout.episodes(method, injected=True)).exists():
            continue
        plain = load_trajectories(p) if (p := layout.episodes(method)).exists() else []
        for verb, counts in by_injected_action(plain, load_trajectories(path)).items():
            row = pooled.setdefault(verb, dict.fromkeys(counts, 0))
            for k, n in counts.items():
                row[k] += n
    return pooled


def by_injected_action_markdown(by_method: dict[str, dict[str, dict[str, int]]], titles: dict[str, str],
                                pooled: str) -> list[str]:
    """`injected_by_action` of each method as one table: a row per kind of injected action, the most common first."""
    by_method = {m: rows for m, rows in by_method.items() if rows}
    if not by_method:
        return []
    verbs = sorted({v for rows in by_method.values() for v in rows},  # "none" last
                   key=lambda v: (v == "none", -max(rows.get(v, {}).get("episodes", 0) for rows in by_method.values()),
                                  v))
    md = ["", "By the kind of wrong action injected (a valid action's first word; \"invalid\": an action the game "
          "refuses; \"none\": the episode ended before the injection step), "
          f"{pooled}: episodes won with the error / the same tasks won without it.", "",
          "| injected action | episodes | " + " | ".join(titles.get(m, m) for m in by_method) + " |",
          "|---|---:|" + "---:|" * len(by_method)]
    for v in verbs:
        cells = [by_method[m].get(v) for m in by_method]
        n = max(c["episodes"] for c in cells if c)
        md.append(f"| {v} | {n} | " + " | ".join(
            "–" if not c else f"{c['won']} / {c['won_without']}" + (f" (of {c['episodes']})" if c["episodes"] != n
                                                                      else "") for c in cells) + " |")
    return md


def reflection_examples(counts: dict[str, dict[str, Any]], runs: bool = False) -> list[str]:
    """Markdown bullets of up to three STeP episodes won after a reflection (`reflection_counts`' examples, plain
    ones first); `runs`: name the run (seed) each came from."""
    shown = (counts[STEP]["plain"]["examples"] + counts[STEP]["injected"]["examples"])[:3] if STEP in counts else []
    md = ["STeP episodes that it won after a reflection:", ""] if shown else []
    for e in shown:
        where = f"{e['run']}, " if runs and e.get("run") else ""
        md.append(f"- `{e['id']}` ({where}{e['split']}, step {e['step'] + 1} of {e['steps']}, "
                  f"{'after its own mistake' if e['own_mistake'] else 'after the injected error'}): it did "
                  f"`{e['before']['action']}` → \"{one_line(e['before']['observation'], 120)}\", then thought "
                  f"\"{e['reflection']}\" and did `{e['action']}` → \"{one_line(e['observation'], 120)}\".")
    return md + ([""] if shown else [])


def reflection_rows(counts: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """A markdown table of `reflection_counts` per method (rows of the methods that were evaluated)."""
    def cell(c: dict[str, Any]) -> str:  # a study.json written before the repeat count has none
        again = f", {c['repeated_after_reflection']} again" if c.get("with_reflection") and \
            "repeated_after_reflection" in c else ""
        return f"{c['with_reflection']} / {c['episodes']} ({c['succeeded']} won{again})" if c["episodes"] else "–"

    def repeating(c: dict[str, Any]) -> str:  # a study.json written before the count has none
        return f"{c['ended_repeating']} / {c['episodes']}" if c["episodes"] and "ended_repeating" in c else "–"

    def no_action(c: dict[str, Any]) -> str:  # a study.json written before the count has none
        return f"{c['steps_without_action']:,} / {c['agent_steps']:,}" if c.get("agent_steps") else "–"

    rows = [f"| {labels[m]} | {cell(c['plain'])} | {cell(c['injected'])} | {repeating(c['plain'])} | "
            f"{repeating(c['injected'])} | {no_action(c['plain'])}; {no_action(c['injected'])} |"
            for m, c in counts.items() if c["plain"]["episodes"] or c["injected"]["episodes"]]
    header = ["| method | reflected: plain episodes | reflected: with one injected error | lost repeating one action: "
              "plain | lost repeating: injected | agent steps without an action: plain; injected |",
              "|---|---:|---:|---:|---:|---:|"]
    return [*header, *rows] if rows else []


# how the reports describe `reflection_rows`' columns after the first two
REPEATING_COLUMNS = ("\"again\": those in which it later took the very action it had reflected on (a reflection "
                     "that did not stick); "
                     f"the episodes it lost repeating one action over its last {REPEATED} steps (a mistake it "
                     "never repaired), and its steps whose reply had no `Action:` (a turn cut by the token budget is "
                     "one; the environment answers \"Invalid format\").")


def reflections_section(run_dir: Path, methods: list[str]) -> list[str]:
    """How often each method's agent reflected on its previous step at test time, and up to three STeP episodes where
    it did and then won (markdown lines; none before any evaluation)."""
    counts = {m: reflection_counts([run_dir], m) for m in methods}
    table = reflection_rows(counts, {m: title(m) for m in methods})
    if not table:
        return []
    md = ["## Reflections at test time", "",
          "Episodes in which the agent wrote a reflection on its previous step (a thought that opens as stage 2's "
          "reflections do: \"I tried to …\"), of all its episodes, and how many of those it won; "
          + REPEATING_COLUMNS, "", *table, ""]
    return md + reflection_examples(counts)


# STeP's premise: the base agent succeeds on some of the synthesis tasks U2, not most and not few (the paper's agents:
# 30-70%). Below, stage 2's trajectories are mostly the teacher's corrections; above, there is little to reflect on.
PREMISE_BAND = (30.0, 70.0)


def premise_note(u2_success: float | None, who: str = "the base agent") -> str | None:
    """A one-sentence warning when the base agent's U2 success (%) is outside PREMISE_BAND, else None."""
    low, high = PREMISE_BAND
    if u2_success is None or low <= u2_success <= high:
        return None
    if u2_success < low:
        why = (f"below {low:g}%, so stage 2's trajectories are mostly the teacher's corrections rather than the "
               "agent's own recoveries")
    else:
        why = f"above {high:g}%, so it makes few mistakes and stage 2 has little to reflect on"
    return (f"STeP's premise does not hold: {who} succeeds on {u2_success:.1f}% of the U2 tasks, {why} "
            f"(STeP expects {low:g}-{high:g}%; make the tasks harder or easier, choosing on seen and U2 only)")


def teacher_accounting(run_dir: Path) -> str | None:
    """Stage 2's teacher accounting over the whole synthesis file (resumes included), in one sentence."""
    path = RunLayout(run_dir).teacher_stats
    if not path.exists():
        return None
    t = json.loads(path.read_text())
    line = (f"teacher: {t.get('judged', 0)} student steps judged, {t.get('flagged', 0)} flagged, "
            f"{t.get('corrected', 0)} corrected, {t.get('unjudged', 0)} left unjudged")
    if t.get("requests"):
        line += (f"; {t['requests']} model requests, {t.get('failed_requests', 0)} failed, "
                 f"{t.get('invalid_replies', 0)} unusable replies")
    if t.get("rollouts"):
        line += (f"; {t['rollouts']} Monte-Carlo rollouts of {t.get('rollout_steps', 0)} student steps, "
                 f"{t.get('failed_rollouts', 0)} failed, {t.get('replay_diverged', 0)} diverged replays")
    return line


def training_table(run_dir: Path, methods: list[str]) -> str:
    rows = ["| Method | trajectories | epochs | optimizer steps | trained tokens | masked error steps |",
            "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        path = RunLayout(run_dir).train_summary(m)
        if path.exists():
            t = json.loads(path.read_text())
            rows.append(f"| {title(m)} | {t.get('trajectories', '–')} | {t.get('epochs', '–')} | "
                        f"{t.get('steps', '–')} | {t.get('trained_tokens', '–')} | {t.get('masked_error_steps', '–')} |")
    return "\n".join(rows)


def headline(run_dir: Path) -> dict[str, float | None]:
    """Flat headline figures of a run: the base agent's U2 success, each method's success per split (%) and its
    recovery rate (success with an injected error ÷ without, over all evaluated splits' paired tasks)."""
    base = base_agent_u2(run_dir)
    out: dict[str, float | None] = {"base_agent_success_u2": base["success_rate"] if base else None}
    for s in method_summaries(run_dir):
        m = s["method"]
        for split, a in s["splits"].items():
            out[f"success_{split}_{m}"] = a["success_rate"]
        inj = s.get("injection", {}).values()
        if inj:
            without = sum((a["success_without"] or 0) * a["paired_episodes"] / 100 for a in inj)
            withinj = sum(a["success_rate"] * a["episodes"] / 100 for a in inj)
            out[f"recovery_{m}"] = round(withinj / without, 3) if without else None
    return out


def write_run_report(run_dir: Path) -> dict[str, Path]:
    paths = RunLayout(run_dir)
    out = paths.report_dir
    out.mkdir(parents=True, exist_ok=True)
    summaries = method_summaries(run_dir)
    manifest = json.loads(paths.manifest.read_text())
    md = [f"# STeP run: {manifest['config']['name']}", "",
          f"Environment `{manifest['config']['env']['name']}`; average reward ×100 and success rate (%) per split.",
          "", markdown_table(summaries), ""]
    base = base_agent_u2(run_dir)
    if base:
        md += [f"Base agent alone on the synthesis tasks U2 (greedy): success {base['success_rate']:.1f}% "
               f"({base['episodes']} episodes).", ""]
        if note := premise_note(base["success_rate"]):
            md += [f"**Note:** {note}.", ""]
    if any(s.get("injection") for s in summaries):
        md += ["## Recovery benchmark: one injected error per episode", "",
               "Each task again, with the expert's steps up to the injection step and then one wrong action "
               "(steptune.agent.injection); recovery rate = success with the error ÷ success without it.", "",
               injection_table(summaries)]
        methods = manifest["config"]["methods"]
        md += [*by_injected_action_markdown({m: injected_by_action([run_dir], m) for m in methods},
                                            {m: title(m) for m in methods}, "splits pooled"), ""]
    md += reflections_section(run_dir, manifest["config"]["methods"])
    md += ["## Training", "", training_table(run_dir, manifest["config"]["methods"]), ""]
    images: list[tuple[str, Path]] = [("average reward by method and split", plot_rewards(summaries, out / "rewards.png"))]
    for split in sorted({sp for s in summaries for sp in s["task_types"]}):
        md += [f"## {split}: average reward by task type (episodes)", "", task_type_table(summaries, split), ""]
        images.append((f"{split}: reward per task type", plot_per_task_type(summaries, split, out / f"types_{split}.png")))
    if any(s.get("injection") for s in summaries):
        images.append(("success with and without an injected error", plot_injection(summaries, out / "recovery.png")))
    curves = loss_curves(run_dir)
    if curves:
        images.append(("training loss", plot_losses(curves, out / "loss.png")))
    synth = paths.filter_stats
    if synth.exists():
        stats = json.loads(synth.read_text())
        md += ["## Synthesis (stage 2)", "", "| statistic | value |", "|---|---:|"]
        md += [f"| {k} | {v} |" for k, v in stats.items() if not isinstance(v, dict)]
        md += [f"| dropped: {k} | {v} |" for k, v in stats.get("dropped", {}).items()] + [""]
        if teacher := teacher_accounting(run_dir):
            md += [teacher[0].upper() + teacher[1:] + ".", ""]
        images.append(("synthesis: kept and dropped trajectories", plot_synthesis(stats, out / "synthesis.png")))
    stage_rows = [f"| {name} | {rec.get('seconds', '–')} |" for name, rec in manifest["stages"].items()]
    md += ["## Stages", "", "| stage | seconds |", "|---|---:|", *stage_rows, ""]
    md_text = "\n".join(md + [f"![{title}]({p.name})" for title, p in images]) + "\n"
    (out / "report.md").write_text(md_text)
    body = markdown_to_html(md)
    imgs = "".join(f"<figure><img alt='{t}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                   f"<figcaption>{t}</figcaption></figure>" for t, p in images)
    (out / "report.html").write_text(html_page("steptune run report", body + imgs))
    return {"markdown": out / "report.md", "html": out / "report.html"}


def print_summary(run_dir: Path) -> None:
    """The method × split table (or, for a run stopped before evaluation, what its stages produced)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summaries = method_summaries(run_dir)
    if not summaries:
        stats = RunLayout(run_dir).filter_stats
        if stats.exists():
            console.print("synthesis and filtering (stage 2):", json.loads(stats.read_text()))
        if teacher := teacher_accounting(run_dir):
            console.print(teacher)
        console.print(f"run directory: {run_dir} (no evaluation yet, so no report)")
        return
    splits = sorted({sp for s in summaries for sp in s["splits"]})
    table = Table(title="STeP: average reward ×100 (success %)")
    table.add_column("method")
    for sp in splits:
        table.add_column(sp, justify="right")
    for s in summaries:
        table.add_row(s["name"], *(f"{s['splits'][sp]['avg_reward']:.1f} ({s['splits'][sp]['success_rate']:.0f}%)"
                                   if sp in s["splits"] else "–" for sp in splits))
    console.print(table)
    if any(s.get("injection") for s in summaries):
        inj = Table(title="recovery benchmark: success % with one injected error (recovery rate)")
        inj.add_column("method")
        for sp in splits:
            inj.add_column(sp, justify="right")
        for s in summaries:
            cells = []
            for sp in splits:
                a = s.get("injection", {}).get(sp)
                rate = "–" if not a or a["recovery_rate"] is None else f"{a['recovery_rate']:.2f}"
                cells.append(f"{a['success_rate']:.0f}% ({rate})" if a else "–")
            inj.add_row(s["name"], *cells)
        console.print(inj)
    base = base_agent_u2(run_dir)
    if base:
        console.print(f"base agent alone on the U2 tasks: {base['success_rate']:.1f}% success "
                      f"({base['episodes']} episodes)")
        if note := premise_note(base["success_rate"]):
            console.print(f"[yellow]warning: {note}[/yellow]")
    if teacher := teacher_accounting(run_dir):
        console.print(teacher)
    console.print(f"report: {RunLayout(run_dir).report_dir / 'report.html'}")
