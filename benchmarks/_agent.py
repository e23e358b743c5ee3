"""The agent a benchmark plays with: a trained model directory, or the tests' tiny ReAct model."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def agent_model(model: Path | None, tmp: Path) -> Path:
    """`model`, or the tests' tiny ReAct model trained into `tmp` for a few seconds (it writes real coin actions)."""
    if model is not None:
        return model
    sys.path.insert(0, str(ROOT / "tests"))
    from _react_model import train_react_model

    return train_react_model(tmp / "model", steps=60)
