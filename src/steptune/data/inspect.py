"""`steptune inspect`: see exactly which tokens of a trajectory will be trained.

Trained tokens are green; weight-0 assistant steps (wrong steps kept in context) red; everything else — the
instruction, observations, role headers — dim. The same view is written as HTML.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass

from steptune.data.tokenize import IGNORE_INDEX, Encoded, encode_trajectory
from steptune.data.trajectory import Trajectory

STYLES = {"trained": "bold green", "masked": "red", "context": "dim"}
CSS = {"trained": "background:#d4f7d4;color:#064", "masked": "background:#fbd5d5;color:#900;text-decoration:line-through",
       "context": "color:#777"}


@dataclass
class Piece:
    text: str
    status: str  # trained | masked | context


def token_pieces(traj: Trajectory, tokenizer, max_length: int | None = None) -> tuple[list[Piece], Encoded]:
    enc = encode_trajectory(traj, tokenizer, max_length)
    messages = traj.messages()
    status = ["context"] * len(enc.input_ids)
    for start, end, k in enc.step_spans:
        if not messages[k].weight:
            status[start:end] = ["masked"] * (end - start)
    for i, label in enumerate(enc.labels):
        if label != IGNORE_INDEX:
            status[i] = "trained"
    pieces = [Piece(tokenizer.decode([tok]), st) for tok, st in zip(enc.input_ids, status)]
    return pieces, enc


def step_counts(traj: Trajectory, enc: Encoded) -> dict[str, dict[str, int]]:
    """Per step kind: steps, steps trained, tokens in context, tokens trained."""
    messages = traj.messages()
    out: dict[str, Counter] = {}
    for start, end, k in enc.step_spans:
        c = out.setdefault(messages[k].kind or "assistant", Counter())
        c["steps"] += 1
        c["trained_steps"] += bool(messages[k].weight)
        c["tokens"] += end - start
        c["trained_tokens"] += sum(lab != IGNORE_INDEX for lab in enc.labels[start:end])
    return {k: dict(v) for k, v in out.items()}


def to_rich(pieces: list[Piece]):
    from rich.text import Text

    text = Text()
    for p in pieces:
        text.append(p.text, style=STYLES[p.status])
    return text


def to_html(title: str, pieces: list[Piece], counts: dict[str, dict[str, int]]) -> str:
    spans = "".join(f'<span class="{p.status}" title="{p.status}">{html.escape(p.text)}</span>' for p in pieces)
    rows = "".join(f"<tr><td>{k}</td><td>{c['steps']}</td><td>{c['trained_steps']}</td><td>{c['tokens']}</td>"
                   f"<td>{c['trained_tokens']}</td></tr>" for k, c in counts.items())
    css = "".join(f".{k}{{{v}}}" for k, v in CSS.items())
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif}}pre{{white-space:pre-wrap;font-size:13px}}{css}"
            "span{border-right:1px solid #eee}td,th{padding:2px 10px}</style>"
            f"<h2>{html.escape(title)}</h2><p><span class=trained>trained</span> · "
            "<span class=masked>in context, not trained (weight 0)</span> · <span class=context>context</span></p>"
            "<table><tr><th>kind</th><th>steps</th><th>trained steps</th><th>tokens</th><th>trained tokens</th></tr>"
            f"{rows}</table><pre>{spans}</pre>")
