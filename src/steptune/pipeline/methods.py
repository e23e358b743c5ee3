"""The methods a run trains and compares, in one table: adding an ablation is one `Method(...)` line here.

Notation (STeP, arXiv 2505.20023): the golden trajectories are split by task into D1 (tasks U1) and D2 (tasks U2).
The base agent is trained on D1 alone; stage 2 runs it on U2 with a teacher judging every step, and the filter
keeps the successful episodes with at most k wrong steps: Dr. Each method below is one SFT run over some of
these sets, from the original model or from the base agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str  # config key, model and eval folder name
    title: str  # in reports
    data: tuple[Literal["d1", "d2", "dr"], ...]  # the run's data sets it trains on (steptune.pipeline.layout)
    start: Literal["base", "base_agent"] = "base"  # the original model, or the base agent's weights
    unmask_errors: bool = False  # train the teacher-flagged error steps too (weight 1 instead of 0)
    # the study reports STeP minus this method as `step_minus_<vs_step>_<split>`; None: not compared
    vs_step: str | None = None
    vs_step_title: str = ""


BASE_AGENT = "golden_d1"  # the method whose model stage 2 runs
METHODS = {m.name: m for m in [
    Method(BASE_AGENT, "Golden SFT on D1 (base agent)", ("d1",), vs_step="golden_d1",
           vs_step_title="STeP − golden D1"),
    Method("golden_all", "Golden SFT on D1 ∪ D2", ("d1", "d2"), vs_step="golden_all",
           vs_step_title="STeP − golden D1 ∪ D2"),
    Method("step", "STeP (D1 ∪ Dr, partial masking)", ("d1", "dr")),
    Method("step_unmasked", "STeP without masking", ("d1", "dr"), unmask_errors=True, vs_step="unmasked",
           vs_step_title="STeP − STeP unmasked"),
    Method("sequential", "Sequential (base agent → Dr)", ("dr",), start="base_agent"),
]}
STEP = "step"  # the method the study compares the others with


def title(name: str) -> str:
    """A method's title in reports (a name from an older run that is no longer registered stays as it is)."""
    return METHODS[name].title if name in METHODS else name
