"""Generation budgets against the turns a model learned to write.

A turn cut by `max_new_tokens` has no `Action:`, and the environment answers "Invalid format". Stage 2's reflections
are the longest turns an agent learns: in the SmolLM2 study up to 102 tokens, against 48 for a golden step. So a
budget that fits the golden agents cut every reflection of the STeP agents, and their evaluations measured that
instead of STeP (docs/smollm2.md, "A 48-token budget cuts every reflection"). The pipeline compares each budget with
the longest trained turn of the data the model learns from, in the model's own tokens, before a stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steptune.data.trajectory import load_trajectories


@dataclass(frozen=True)
class Turn:
    tokens: int
    kind: str  # the step's kind: expert, student, reflection, ...
    file: Path


def longest_turn(data: list[Path], tokenizer) -> Turn | None:
    """The longest assistant turn with a loss (`Thought: ...\\nAction: ...`) in `data`, in `tokenizer`'s tokens; None
    when the files hold no trained turn."""
    turns = [(m.content, m.kind or "expert", path) for path in data if path.exists()
             for t in load_trajectories(path) for m in t.messages() if m.role == "assistant" and m.weight > 0]
    if not turns:
        return None
    lengths = [len(ids) for ids in tokenizer([c for c, _, _ in turns], add_special_tokens=False)["input_ids"]]
    i = max(range(len(turns)), key=lengths.__getitem__)
    return Turn(lengths[i], turns[i][1], turns[i][2])


def budget_problem(budget: int, setting: str, who: str, data: list[Path], tokenizer_source: str | Path) -> str | None:
    """Why `budget` new tokens per turn cannot hold the turns `who` learned from `data`; None when it can."""
    from transformers import AutoTokenizer

    turn = longest_turn(data, AutoTokenizer.from_pretrained(str(tokenizer_source)))
    if turn is None or turn.tokens <= budget:
        return None
    return (f"{setting} is {budget}, but {who} learns turns of up to {turn.tokens} tokens in its tokenizer (the "
            f"longest: a step of kind {turn.kind} in {turn.file.name}): its turns would be cut before their `Action:` "
            f"and the environment would answer 'Invalid format'. Set {setting} to at least {turn.tokens}")
