"""Make ALFWorld games offline, from what the `alfworld` wheel ships (domain, grammar, layouts, tables, goals).

The published ALFWorld games come only from `alfworld-download` (not reachable offline). For tests and demos we
build an ALFRED PDDL problem by hand — a small made-up kitchen, or one of the real AI2-THOR kitchen layouts the
wheel ships, with sampled objects and one of four goal types — and pack it exactly like a real game
(`game.tw-pddl` next to a `traj_data.json`), so both our AlfWorldEnv and the stock `AlfredTWEnv` loader play it
with the real ALFWorld engine and text.

These games are NOT the ALFWorld benchmark: goals and object placements are sampled by us, there are fewer task
types, and numbers on them say nothing about published ALFWorld results.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Task types we can generate (ALFRED names, as in traj_data.json) → the object property their goal needs.
TASK_PROPERTIES = {
    "pick_and_place_simple": None,
    "pick_clean_then_place_in_recep": "cleanable",
    "pick_heat_then_place_in_recep": "heatable",
    "pick_cool_then_place_in_recep": "coolable",
}

# Kitchen objects: (type, properties). All are pickupable.
KITCHEN_OBJECTS = {
    "Apple": ("cleanable", "heatable", "coolable"),
    "Potato": ("cleanable", "heatable", "coolable"),
    "Tomato": ("cleanable", "heatable", "coolable"),
    "Egg": ("heatable", "coolable"),
    "Mug": ("cleanable", "heatable", "coolable"),
    "Cup": ("cleanable", "heatable", "coolable"),
    "Bread": ("heatable", "coolable"),
    "Lettuce": ("cleanable", "coolable"),
    "Plate": ("cleanable", "heatable", "coolable"),
    "Spatula": ("cleanable",),
    "Fork": ("cleanable",),
}
# Receptacles: type → openable. Microwave, fridge and sink are always present (heat, cool, clean).
KITCHEN_RECEPTACLES = {
    "CounterTop": False,
    "Cabinet": True,
    "Drawer": True,
    "Shelf": False,
    "DiningTable": False,
    "StoveBurner": False,
    "GarbageCan": False,
    "Microwave": True,
    "Fridge": True,
    "SinkBasin": False,
}
ALWAYS_PRESENT = ("Microwave", "Fridge", "SinkBasin", "CounterTop")
OPENABLE = {"Cabinet", "Drawer", "Microwave", "Fridge", "Safe", "Box", "Laptop"}  # ALFRED's openable receptacles
PLACE_TARGETS = ("CounterTop", "Cabinet", "Drawer", "Shelf", "DiningTable", "GarbageCan", "Fridge", "Microwave")


@dataclass(frozen=True)
class GeneratedGame:
    game_file: Path
    task_type: str
    object_target: str
    parent_target: str


def _coord(x: float) -> str:
    """ALFRED's id mangling of a coordinate: -1.25 → '_minus_01_dot_25'."""
    sign = "_minus_" if x < 0 else "_plus_"
    whole, frac = f"{abs(x):05.2f}".split(".")
    return f"{sign}{whole}_dot_{frac}"


def _thing_id(kind: str, xyz: tuple[float, float, float]) -> str:
    return kind + "".join("_bar_" + _coord(c) for c in xyz)


def _location_id(i: int) -> str:
    return f"loc_bar_{i}_bar_{i % 4}_bar_{i % 4}_bar_30"


def _alfworld_assets() -> tuple[str, str, dict]:
    try:
        from alfworld.gen import goal_library
        from alfworld.info import ALFWORLD_DATA  # noqa: F401 - proves the package imports
    except ImportError as e:
        raise ImportError("ALFWorld games need the optional extra: pip install 'steptune[alfworld]'") from e
    import alfworld

    data = Path(alfworld.__file__).parent / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text(), goal_library.gdict


def _mangle(alfred_id: str) -> str:
    """ALFRED's PDDL id mangling: 'Cabinet|+00.02|-01.31' → 'Cabinet_bar__plus_00_dot_02_bar__minus_01_dot_31'."""
    for raw, safe in (("|", "_bar_"), ("+", "_plus_"), ("-", "_minus_"), (".", "_dot_")):
        alfred_id = alfred_id.replace(raw, safe)
    return alfred_id


def _receptacle_type(alfred_id: str) -> str:
    return "SinkBasin" if alfred_id.endswith("|SinkBasin") else alfred_id.split("|")[0]


@dataclass
class Scene:
    receptacles: list[tuple[str, str, str]]  # (pddl id, type, location id)
    object_types: list[str]  # pickupable object types that may appear
    start_location: str


def small_kitchen(rng: random.Random) -> Scene:
    """A made-up kitchen: microwave, fridge, sink basin, countertop + 3 random receptacles (7-9 in all)."""
    extra = rng.sample([r for r in KITCHEN_RECEPTACLES if r not in ALWAYS_PRESENT], k=3)
    receptacles = []
    for rtype in list(ALWAYS_PRESENT) + extra:
        for copy in range(2 if rtype in ("Cabinet", "Drawer") else 1):
            xyz = (round(rng.uniform(-3, 3), 2), round(0.5 + copy * 0.4, 2), round(rng.uniform(-3, 3), 2))
            rid = _thing_id("Sink" if rtype == "SinkBasin" else rtype, xyz)
            if rtype == "SinkBasin":
                rid += "_bar_SinkBasin"  # ALFRED names the basin after its sink
            receptacles.append((rid, rtype, _location_id(len(receptacles) + 1)))
    return Scene(receptacles, list(KITCHEN_OBJECTS), _location_id(0))


def _layouts_dir() -> Path:
    from alfworld.gen import constants

    return Path(constants.__file__).parent / "layouts"


def floorplan_kitchen(rng: random.Random, floorplan: int | None = None) -> Scene:
    """A real AI2-THOR kitchen layout shipped in the wheel (FloorPlan1-30: 9-47 receptacles with their ids and
    agent poses, and the object types that scene holds), so scenes are ALFWorld-sized."""
    from alfworld.gen import constants

    number = floorplan or rng.randint(1, 30)
    layouts = _layouts_dir()
    poses = json.loads((layouts / f"FloorPlan{number}-openable.json").read_text())
    in_scene = set(json.loads((layouts / f"FloorPlan{number}-objects.json").read_text()))
    receptacles = []
    for alfred_id, (x, z, rotation, horizon) in sorted(poses.items()):
        # ALFRED locations are agent poses on a 0.25 m grid: loc|x/0.25|z/0.25|rotation/90|horizon
        loc = _mangle(f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{round(rotation / 90) % 4}|{round(horizon)}")
        receptacles.append((_mangle(alfred_id), _receptacle_type(alfred_id), loc))
    containable = set().union(*constants.VAL_RECEPTACLE_OBJECTS.values())
    object_types = sorted(
        t for t in in_scene & containable if "Sliced" not in t and t not in constants.STATIC_RECEPTACLES
    )
    return Scene(receptacles, object_types, "loc_bar__minus_99_bar__minus_99_bar_0_bar_30")


def _object_properties(otype: str) -> list[str]:
    if otype in KITCHEN_OBJECTS:
        return list(KITCHEN_OBJECTS[otype])
    from alfworld.gen import constants

    return [
        name.lower() for name in ("Cleanable", "Heatable", "Coolable") if otype in constants.VAL_ACTION_OBJECTS[name]
    ]


def _can_contain(rtype: str, otype: str) -> bool:
    from alfworld.gen import constants

    allowed = constants.VAL_RECEPTACLE_OBJECTS.get(rtype)
    return otype in allowed if allowed is not None else rtype in KITCHEN_RECEPTACLES


def build_problem(
    task_type: str, rng: random.Random, scene: str = "small", n_objects: int = 4, floorplan: int | None = None
) -> tuple[str, dict]:
    """An ALFRED PDDL problem for one generated kitchen, and its traj_data.json content.

    scene="small": a made-up 7-9 receptacle kitchen (fast; tests). scene="floorplan": a real AI2-THOR kitchen
    layout from the wheel (ALFWorld-sized, slower)."""
    if task_type not in TASK_PROPERTIES:
        raise ValueError(f"cannot generate {task_type!r}; choose from {sorted(TASK_PROPERTIES)}")
    if scene not in ("small", "floorplan"):
        raise ValueError(f"unknown scene kind {scene!r}; use 'small' or 'floorplan'")
    _, _, goals = _alfworld_assets()
    room = small_kitchen(rng) if scene == "small" else floorplan_kitchen(rng, floorplan)
    needed = TASK_PROPERTIES[task_type]
    present = sorted({rtype for _, rtype, _ in room.receptacles})

    def homes(otype: str) -> list[tuple[str, str, str]]:
        return [r for r in room.receptacles if _can_contain(r[1], otype)]

    candidates = [o for o in room.object_types if (needed is None or needed in _object_properties(o)) and homes(o)]
    if not candidates:
        raise ValueError(f"this scene has no object for {task_type}")
    target_type = rng.choice(candidates)
    parents = [r for r in present if r in PLACE_TARGETS and _can_contain(r, target_type)]
    parent_type = rng.choice(parents or [r for r in present if _can_contain(r, target_type)])
    others = [o for o in room.object_types if o != target_type and homes(o)]
    object_types = [target_type] + [rng.choice(others) for _ in range(max(0, n_objects - 1))]

    objects: list[tuple[str, str, tuple[str, str, str]]] = []  # (id, type, receptacle)
    for otype in object_types:
        places = homes(otype)
        if otype == target_type:  # never start in the goal receptacle, so the episode needs real work
            places = [r for r in places if r[1] != parent_type] or places
        receptacle = rng.choice(places)
        xyz = (round(rng.uniform(-3, 3), 2), round(rng.uniform(0.8, 1.6), 2), round(rng.uniform(-3, 3), 2))
        objects.append((_thing_id(otype, xyz), otype, receptacle))

    locations = sorted({loc for _, _, loc in room.receptacles} | {room.start_location})
    otypes = sorted(set(room.object_types) | set(KITCHEN_OBJECTS))
    rtypes = sorted(set(present) | set(KITCHEN_RECEPTACLES))
    decl = ["agent1 - agent"]
    decl += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    decl += [f"{oid} - object" for oid, _, _ in objects] + [f"{rid} - receptacle" for rid, _, _ in room.receptacles]
    decl += [f"{loc} - location" for loc in locations]

    init = [f"(atLocation agent1 {room.start_location})"]
    for rid, rtype, loc in room.receptacles:
        init += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {loc})"]
        if rtype in OPENABLE:
            init.append(f"(openable {rid})")
    for rtype in present:
        init += [f"(canContain {rtype}Type {otype}Type)" for otype in otypes if _can_contain(rtype, otype)]
    for oid, otype, (rid, _, loc) in objects:
        init += [
            f"(objectType {oid} {otype}Type)",
            f"(pickupable {oid})",
            f"(inReceptacle {oid} {rid})",
            f"(objectAtLocation {oid} {loc})",
        ]
        init += [f"({prop} {oid})" for prop in _object_properties(otype)]

    goal = goals[task_type]["pddl"].replace("#", "-").format(obj=target_type, recep=parent_type)
    problem = (
        "(define (problem plan_generated)\n(:domain alfred)\n(:objects\n        "
        + "\n        ".join(decl)
        + "\n        )\n(:init\n        "
        + "\n        ".join(init)
        + "\n        )\n"
        + goal
    )
    traj_data = {
        "task_type": task_type,
        "pddl_params": {
            "object_target": target_type,
            "parent_target": parent_type,
            "object_sliced": False,
            "toggle_target": "",
            "mrecep_target": "",
        },
        "scene": {"scene_kind": scene, "generated_by": "steptune.envs.alfworld_games"},
        "turk_annotations": {"anns": []},
    }
    return problem, traj_data


def game_data(problem: str, traj_data: dict, rng: random.Random) -> dict:
    """The `game.tw-pddl` content: domain + grammar (with the goal text filled in) + problem."""
    from alfworld.agents.utils.misc import add_task_to_grammar

    domain, grammar, _ = _alfworld_assets()
    return {"pddl_domain": domain, "grammar": add_task_to_grammar(grammar, traj_data, rng=rng), "pddl_problem": problem}


def plan_for(data: dict) -> list[str]:
    """Ask the real planner for a solution from the start state ([] when it finds none)."""
    import textworld
    from textworld.envs.pddl import PddlEnv

    env = PddlEnv(textworld.EnvInfos(policy_commands=True))
    env.load(data)
    state = env.reset()
    return list(state["policy_commands"] or [])


def generate_games(
    root: str | Path,
    n: int,
    seed: int = 0,
    task_types: list[str] | None = None,
    split: str = "train",
    scene: str = "small",
    n_objects: int | None = None,
) -> list[GeneratedGame]:
    """Write `n` solvable games under `root/json_2.1.1/<split>/<task>/<trial>/` (root works as $ALFWORLD_DATA).

    scene: "small" (made-up 7-9 receptacle kitchens, 4 objects) or "floorplan" (real AI2-THOR kitchen layouts,
    9-47 receptacles, 12 objects by default)."""
    n_objects = n_objects or (4 if scene == "small" else 12)
    rng = random.Random(seed)
    kinds = task_types or list(TASK_PROPERTIES)
    games: list[GeneratedGame] = []
    attempts = 0
    while len(games) < n:
        attempts += 1
        if attempts > 5 * n + 10:
            raise RuntimeError(f"generated {len(games)}/{n} solvable games after {attempts} attempts")
        task_type = kinds[len(games) % len(kinds)]
        problem, traj = build_problem(task_type, rng, scene=scene, n_objects=n_objects)
        data = game_data(problem, traj, rng)
        if not plan_for(data):
            continue  # unsolvable scene: draw another
        data["solvable"] = True
        params = traj["pddl_params"]
        folder = (
            Path(root) / "json_2.1.1" / split / f"{task_type}-{params['object_target']}-None-"
            f"{params['parent_target']}-{seed}" / f"trial_gen_{seed}_{len(games):04d}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "traj_data.json").write_text(json.dumps(traj, indent=1))
        (folder / "game.tw-pddl").write_text(json.dumps(data))
        games.append(
            GeneratedGame(folder / "game.tw-pddl", task_type, params["object_target"], params["parent_target"])
        )
    return games


def main(argv: list[str] | None = None) -> None:
    """`python -m steptune.envs.alfworld_games OUT_DIR --n 20 --seed 0` → then `export ALFWORLD_DATA=OUT_DIR`."""
    import argparse

    parser = argparse.ArgumentParser(description="Generate offline ALFWorld demo games (not the benchmark).")
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=["train", "valid_seen", "valid_unseen"])
    parser.add_argument("--task-types", nargs="*", choices=sorted(TASK_PROPERTIES), default=None)
    parser.add_argument("--scene", choices=["small", "floorplan"], default="small")
    parser.add_argument("--n-objects", type=int, default=None)
    args = parser.parse_args(argv)
    games = generate_games(
        args.out_dir, args.n, args.seed, args.task_types, args.split, scene=args.scene, n_objects=args.n_objects
    )
    print(f"wrote {len(games)} games under {Path(args.out_dir) / 'json_2.1.1' / args.split}")


if __name__ == "__main__":
    main()
