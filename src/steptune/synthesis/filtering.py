"""Keep the self-reflected trajectories worth training on (METHOD.md, stage 2 filtering).

Default, from the paper: successful trajectories with at most k = 2 erroneous steps (WebShop: 1–2). Error-free
successes are ordinary good trajectories; keeping them is a switch (default on).
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from steptune.data.trajectory import Trajectory


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_errors: int = Field(2, ge=0)  # k
    min_errors: int = Field(0, ge=0)  # 1: only trajectories that contain a reflection
    keep_error_free: bool = True
    require_success: bool = True


def drop_reason(t: Trajectory, cfg: FilterConfig) -> str | None:
    if t.meta.get("failure"):
        return "environment or model failure"
    if cfg.require_success and not t.success:
        return "not successful"
    if t.n_errors > cfg.max_errors:
        return f"more than {cfg.max_errors} errors"
    if t.n_errors == 0 and not cfg.keep_error_free:
        return "no error (error-free kept off)"
    if t.n_errors < cfg.min_errors:
        return f"fewer than {cfg.min_errors} errors"
    if any(s.kind == "error" for s in t.steps[-1:]):
        return "ends on an uncorrected error"
    return None


def filter_trajectories(trajs: list[Trajectory], cfg: FilterConfig) -> tuple[list[Trajectory], dict]:
    kept, dropped = [], Counter()
    for t in trajs:
        why = drop_reason(t, cfg)
        if why is None:
            kept.append(t)
        else:
            dropped[why] += 1
    report = {"total": len(trajs), "kept": len(kept), "kept_with_reflection": sum(t.n_errors > 0 for t in kept),
              "kept_error_free": sum(t.n_errors == 0 for t in kept), "dropped": dict(dropped)}
    return kept, report
