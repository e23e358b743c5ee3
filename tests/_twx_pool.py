"""Real TextWorldExpress coin games through the real env pool (one worker process per slot), for the agent tests."""

from __future__ import annotations

from steptune.envs.pool import EnvPool

ONE_ROOM = "numLocations=1,includeDoors=0"


def twx_kwargs(max_steps: int = 6, game_params: str = ONE_ROOM) -> dict:
    return {"game": "coin", "game_params": game_params, "max_steps": max_steps}


def twx_pool(size: int, max_steps: int = 6, game_params: str = ONE_ROOM) -> EnvPool:
    return EnvPool("twx", size, twx_kwargs(max_steps, game_params))
