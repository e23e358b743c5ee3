"""Environment names → adapters. Adapters are imported only when asked for (ALFWorld is an optional extra)."""

from __future__ import annotations

from typing import Any

from steptune.envs.base import Env

ENVS = ("twx", "sciworld", "alfworld", "webshop")


def make_env(name: str, **kwargs: Any) -> Env:
    if name == "twx":
        from steptune.envs.twx import TextWorldExpressEnv

        return TextWorldExpressEnv(**kwargs)
    if name == "sciworld":
        from steptune.envs.sciworld import ScienceWorldEnv

        return ScienceWorldEnv(**kwargs)
    if name == "alfworld":
        from steptune.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv(**kwargs)
    if name == "webshop":
        from steptune.envs.webshop import WebShopEnv

        return WebShopEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; choose one of: {', '.join(ENVS)}")
