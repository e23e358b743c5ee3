"""Does the TWC expert's plan win from states off its gold path? Random walks of 1, 3, 6 and 10 valid actions from
the start of each training game, then the expert's plan, action after action.

    python scripts/twc_expert_check.py --params numLocations=2,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0

Prints one line per setting and ends with one line of JSON ({"states": N, "failed": F, "mean_plan": L}).
"""

from __future__ import annotations

import argparse
import json
import random

from steptune.envs.base import TaskRef
from steptune.envs.twx import TextWorldExpressEnv


def check(params: str, games: int, seed: int = 0) -> dict:
    env = TextWorldExpressEnv(game="twc", game_params=params, max_steps=200)
    rng, states, failed, lengths = random.Random(seed), 0, 0, []
    try:
        for game in range(games):
            for walk in (1, 3, 6, 10):
                env.reset(TaskRef("twx", "twc", game, "train"))
                res = None
                for _ in range(walk):
                    res = env.step(rng.choice(sorted(env.valid_actions())))
                    if res.done:
                        break
                if res is not None and res.done:
                    continue  # the walk itself ended the game
                states += 1
                plan = env.expert_actions() or []
                lengths.append(len(plan))
                won = False
                for action in plan:
                    res = env.step(action)
                    if res.info["invalid"] or res.info["won"]:
                        won = res.info["won"]
                        break
                failed += not won
    finally:
        env.close()
    return {"states": states, "failed": failed, "mean_plan": round(sum(lengths) / max(len(lengths), 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="numLocations=2,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0")
    ap.add_argument("--games", type=int, default=60)
    args = ap.parse_args()
    result = check(args.params, args.games)
    print(f"{args.params}: {result['failed']} of {result['states']} states without a winning plan; "
          f"mean plan {result['mean_plan']} actions")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
