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


def episode_args(ap, quick: str, model: str) -> None:
    """The options of a benchmark that plays real episodes with a trained agent."""
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--model", type=Path, help=model)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)


def play(backend, env_kwargs: dict, n: int) -> tuple[list, float]:
    """The first `n` unseen TextWorldExpress games of `env_kwargs`, played at once and greedily through `backend`:
    (episodes, wall seconds)."""
    import time

    from steptune.agent.rollout import run_episodes
    from steptune.backends.base import GenerationConfig
    from steptune.envs.pool import EnvPool

    with EnvPool("twx", n, env_kwargs) as pool:
        tasks = pool.tasks("unseen")[:n]
        t0 = time.perf_counter()
        eps = run_episodes(pool, tasks, backend, GenerationConfig(max_new_tokens=48, temperature=0.0), progress=False)
        return eps, time.perf_counter() - t0
