"""Environment names → adapters: the only place an environment is named. An adapter is imported only when asked
for (ALFWorld is an optional extra), so each line names its class as `module:Class`."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from steptune.envs.base import Env

ENVS = {
    "twx": "steptune.envs.twx:TextWorldExpressEnv",
    "sciworld": "steptune.envs.sciworld:ScienceWorldEnv",
    "alfworld": "steptune.envs.alfworld:AlfWorldEnv",
    "webshop": "steptune.envs.webshop:WebShopEnv",
}


def make_env(name: str, **kwargs: Any) -> Env:
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; choose one of: {', '.join(ENVS)}")
    module, cls = ENVS[name].split(":")
    return getattr(import_module(module), cls)(**kwargs)
