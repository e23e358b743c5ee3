"""Compare evaluation runs side by side: a markdown table (for papers) and an HTML page with plots."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from steptune.evaluation.eval import SUMMARY_FILE


def load_summaries(run_dirs: list[str | Path]) -> list[dict]:
    summaries = []
    for d in run_dirs:
        path = Path(d) / SUMMARY_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {d} an eval run directory (steptune eval --out)?")
        s = json.loads(path.read_text())
        s.setdefault("name", Path(d).name)
        summaries.append(s)
    return summaries


def _splits(summaries: list[dict]) -> list[str]:
    return sorted({sp for s in summaries for sp in s["splits"]})


def markdown_table(summaries: list[dict]) -> str:
    """One row per run; per split its average reward (x100) and success rate (%), as papers report them."""
    splits = _splits(summaries)
    head = "| Run | " + " | ".join(f"{sp} reward | {sp} success %" for sp in splits) + " | Episodes |"
    rule = "|---|" + "---:|---:|" * len(splits) + "---:|"
    rows = []
    for s in summaries:
        cells = []
        for sp in splits:
            a = s["splits"].get(sp)
            cells += [f"{a['avg_reward']:.1f}", f"{a['success_rate']:.1f}"] if a else ["–", "–"]
        rows.append(f"| {s['name']} | " + " | ".join(cells) + f" | {s['overall']['episodes']} |")
    return "\n".join([head, rule, *rows])


def task_type_table(summaries: list[dict], split: str) -> str:
    types = sorted({t for s in summaries for t in s["task_types"].get(split, {})})
    head = "| Task type | " + " | ".join(s["name"] for s in summaries) + " |"
    rule = "|---|" + "---:|" * len(summaries)
    rows = []
    for t in types:
        cells = []
        for s in summaries:
            a = s["task_types"].get(split, {}).get(t)
            cells.append(f"{a['avg_reward']:.1f} ({a['episodes']})" if a else "–")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def injection_table(summaries: list[dict]) -> str:
    """The recovery benchmark per method and split (steptune.evaluation.recovery)."""
    head = ("| Method | split | success % with an injected error | success % without (same tasks) | "
            "recovery rate | back on the expert's plan % | steps to the plan |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f="{:.1f}": "–" if v is None else f.format(v)  # noqa: E731
    for s in summaries:
        for split, a in s.get("injection", {}).items():
            rows.append(f"| {s['name']} | {split} | {fmt(a['success_rate'])} | {fmt(a['success_without'])} | "
                        f"{fmt(a['recovery_rate'], '{:.2f}')} | {fmt(a['back_on_plan'])} | "
                        f"{fmt(a['steps_to_plan'], '{:.2f}')} |")
    return "\n".join(rows)


def plot_injection(summaries: list[dict], path: Path) -> Path:
    """Success per method and split, without and with an injected error (the recovery benchmark)."""
    groups, series = [], {"without": [], "with an injected error": []}
    for s in summaries:
        for split, a in s.get("injection", {}).items():
            groups.append(f"{s['name']}\n{split}")
            series["without"].append(a["success_without"] or 0.0)
            series["with an injected error"].append(a["success_rate"])
    return grouped_bars(groups, series, path, "success %")


def grouped_bars(groups: list[str], series: dict[str, list[float]], path: Path, ylabel: str,
                 errors: dict[str, list[list[float]]] | None = None) -> Path:
    """One bar per series in each group (e.g. methods within splits); values on a 0-100 scale; `errors` gives a
    series' [below, above] error-bar lengths (e.g. a confidence interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 + 0.8 * len(groups) * max(1, len(series))), 3.2))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=name,
               yerr=(errors or {}).get(name), capsize=3)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], groups,
                  rotation=20 if len(groups) > 4 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rewards(summaries: list[dict], path: Path) -> Path:
    splits = _splits(summaries)
    series = {s["name"]: [s["splits"].get(sp, {}).get("avg_reward", 0.0) for sp in splits] for s in summaries}
    return grouped_bars(splits, series, path, "average reward (x100)")


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html (plots embedded) and the plots as PNG files alongside to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = load_summaries(run_dirs)
    md = ["# Evaluation report", "", markdown_table(summaries), ""]
    for sp in _splits(summaries):
        md += [f"## {sp}: average reward by task type (episodes)", "", task_type_table(summaries, sp), ""]
    images = [("average reward", plot_rewards(summaries, out / "rewards.png"))]
    if any(s.get("injection") for s in summaries):
        md += ["## Recovery benchmark: one injected error per episode", "", injection_table(summaries), ""]
        images.append(("success with and without an injected error", plot_injection(summaries, out / "recovery.png")))
    (out / "report.md").write_text("\n".join(md + [f"![{title}]({p.name})" for title, p in images]) + "\n")
    body = markdown_to_html(md)
    imgs = "".join(f"<img alt='{title}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                   for title, p in images)
    (out / "report.html").write_text(html_page("steptune report", body + imgs))
    return {"markdown": out / "report.md", "html": out / "report.html", "plot": images[0][1]}


def html_page(title: str, body: str) -> str:
    """A self-contained page: the reports' one stylesheet around `body`."""
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body>{body}</body></html>")


def markdown_to_html(lines: list[str]) -> str:
    """The reports' markdown (headings, paragraphs, pipe tables, "- " lists; blocks apart by blank lines) as HTML."""
    return "\n".join(_block_to_html(b) for b in _blocks(lines))


def _blocks(lines: list[str]) -> list[str]:
    blocks, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    return blocks + (["\n".join(cur)] if cur else [])


def _block_to_html(block: str) -> str:
    if block.startswith("|"):
        return _md_table_to_html(block)
    if block.startswith("#"):
        level = min(3, len(block) - len(block.lstrip("#")))
        return f"<h{level}>{html.escape(block.lstrip('# '))}</h{level}>"
    if all(line.startswith("- ") for line in block.splitlines()):
        return "<ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in block.splitlines()) + "</ul>"
    return f"<p>{html.escape(block)}</p>"


def _md_table_to_html(block: str) -> str:
    lines = block.splitlines()
    cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]
    head, rows = cells[0], cells[1:]
    return ("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
