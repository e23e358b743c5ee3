"""Where everything of a run lives in its directory: the runner writes these paths, the reports and the study
read them, so the layout is written down here only.

    manifest.json                       what ran, with which settings and library versions
    data/golden.jsonl                   golden trajectories
    data/d1.jsonl, data/d2.jsonl        golden split by task: D1 (tasks U1) trains the base agent, D2 (tasks U2)
    data/synthesized.jsonl              stage 2: the base agent on U2 with the teacher's judgements
    data/synthesized_teacher.json       the teacher's accounting over the synthesis file
    data/dr.jsonl, data/filter_stats.json   Dr: what the filter kept (success, at most k wrong steps), and why
    models/<method>/                    one trained model per method (models/init: a tiny model built from scratch);
                                        train_log.released.jsonl: the log of weights `steptune prune` released,
                                        kept when they first train again in place, to compare the losses with
    eval/<method>/                      episodes.jsonl, injected.jsonl, summary.json (eval/base_agent_u2: the base
                                        agent alone on U2)
    report/                             report.md, report.html and the plots
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from steptune.evaluation.eval import EPISODES_FILE, INJECTED_FILE, SUMMARY_FILE
from steptune.pipeline.manifest import MANIFEST_FILE
from steptune.synthesis.synthesize import teacher_stats_path
from steptune.training.sft import SUMMARY as TRAIN_SUMMARY
from steptune.training.sft import TRAIN_LOG

RELEASED_LOG = "train_log.released.jsonl"
BASE_AGENT_U2 = "base_agent_u2"  # the eval folder of the base agent alone on the synthesis tasks U2


def keep_released_log(model: Path) -> None:
    """Before released weights train again in place: their train log, which the training rewrites (from its start,
    or from a checkpoint when it resumes), kept as RELEASED_LOG the first time, to compare the losses with."""
    if (model / TRAIN_LOG).exists() and not (model / RELEASED_LOG).exists():
        shutil.copy2(model / TRAIN_LOG, model / RELEASED_LOG)


@dataclass(frozen=True)
class RunLayout:
    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST_FILE

    def dataset(self, name: str) -> Path:
        """golden, d1, d2, synthesized or dr."""
        return self.dir / "data" / f"{name}.jsonl"

    @property
    def teacher_stats(self) -> Path:
        return teacher_stats_path(self.dataset("synthesized"))

    @property
    def filter_stats(self) -> Path:
        return self.dir / "data" / "filter_stats.json"

    def model_dir(self, name: str) -> Path:
        return self.dir / "models" / name

    def train_summary(self, method: str) -> Path:
        return self.model_dir(method) / TRAIN_SUMMARY

    def train_logs(self) -> list[Path]:
        return sorted((self.dir / "models").glob(f"*/{TRAIN_LOG}"))

    def eval_dir(self, name: str) -> Path:
        return self.dir / "eval" / name

    def eval_summary(self, name: str) -> Path:
        return self.eval_dir(name) / SUMMARY_FILE

    def episodes(self, name: str, injected: bool = False) -> Path:
        return self.eval_dir(name) / (INJECTED_FILE if injected else EPISODES_FILE)

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"
