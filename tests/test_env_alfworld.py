"""AlfWorldEnv on games generated offline and played by the real ALFWorld/TextWorld PDDL engine."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("alfworld", reason="ALFWorld is the optional extra: pip install 'steptune[alfworld]'")
pytest.importorskip("fast_downward", reason="ALFWorld needs textworld[pddl] (fast_downward)")

from steptune.envs.alfworld import AlfWorldEnv, AlfWorldError, translate_action
from steptune.envs.alfworld_games import TASK_PROPERTIES, generate_games


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("alfworld-data")
    generate_games(root, n=4, seed=3)  # one game of each generated task type
    return root


@pytest.fixture
def env(data_root):
    with AlfWorldEnv(data_root) as env:
        yield env


def test_translate_action():
    assert translate_action("put apple 1 in/on fridge 1") == "move apple 1 to fridge 1"
    assert translate_action(" Put  mug 2 on countertop 1. ") == "move mug 2 to countertop 1"
    assert translate_action("move apple 1 to fridge 1") == "move apple 1 to fridge 1"
    assert translate_action("take apple 1 from drawer 1") == "take apple 1 from drawer 1"


def test_generated_games_are_laid_out_like_alfworld(data_root):
    games = sorted(data_root.glob("json_2.1.1/train/*/*/game.tw-pddl"))
    assert len(games) == 4
    kinds = {json.loads(g.with_name("traj_data.json").read_text())["task_type"] for g in games}
    assert kinds == set(TASK_PROPERTIES)
    assert all(json.loads(g.read_text())["solvable"] is True for g in games)


def test_generated_game_plays(env):
    task = env.tasks("train")[0]
    reset = env.reset(task)
    assert "Your task is to:" in reset.task and "Welcome" not in reset.task
    assert reset.observation.startswith("You are in the middle of a room")
    assert "look" in env.valid_actions() and any(a.startswith("go to ") for a in env.valid_actions())
    first_stop = next(a for a in env.valid_actions() if a.startswith("go to "))
    result = env.step(first_stop)
    assert result.observation.startswith("You arrive at") and not result.done and result.reward == 0.0


def test_expert_plan_replays_to_success_for_every_task_type(env):
    for task in env.tasks("train"):
        env.reset(task)
        plan = env.expert_actions()
        assert plan, f"no plan for {task.id}"
        for action in plan:
            result = env.step(action)
        assert result.done and result.reward == 1.0 and result.info["won"], task.id
        assert env.expert_actions() == []


def test_expert_replans_after_a_detour_and_old_put_wording_works(env):
    task = env.tasks("train")[0]
    env.reset(task)
    original = env.expert_actions()
    detour = next(a for a in env.valid_actions() if a.startswith("go to ") and a != original[0])
    env.step(detour)
    env.step("inventory")
    replanned = env.expert_actions()
    assert replanned and replanned[0] != detour
    for action in replanned:
        # speak the ETO-era wording to prove the translation reaches the engine
        if action.startswith("move "):
            action = action.replace("move ", "put ", 1).replace(" to ", " in/on ", 1)
        result = env.step(action)
    assert result.done and result.reward == 1.0


def test_invalid_actions_are_flagged_and_harmless(env):
    env.reset(env.tasks("train")[0])
    result = env.step("fly to the moon")
    assert result.observation == "Nothing happens." and result.info["invalid"] and not result.done
    result = env.step("take unicorn 1 from fridge 1")
    assert result.info["invalid"] and result.reward == 0.0
    assert env.expert_actions()  # the game state is intact


def test_max_steps_ends_the_episode(data_root):
    with AlfWorldEnv(data_root, max_steps=3) as env:
        env.reset(env.tasks("train")[0])
        results = [env.step("look") for _ in range(3)]
        assert [r.done for r in results] == [False, False, True]
        assert results[-1].info["truncated"] and results[-1].reward == 0.0
        with pytest.raises(RuntimeError, match="reset"):
            env.step("look")


@pytest.mark.timeout(30)
def test_zero_games_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    (tmp_path / "json_2.1.1" / "valid_seen").mkdir(parents=True)
    env = AlfWorldEnv(tmp_path)
    with pytest.raises(AlfWorldError, match="no playable ALFWorld games"):
        env.tasks("seen")
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        env.tasks("test")
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(AlfWorldError, match="ALFWORLD_DATA"):
        AlfWorldEnv()


def test_unsolvable_and_broken_games_are_handled(data_root, tmp_path):
    src = min(data_root.glob("json_2.1.1/train/*/*"))
    trial = tmp_path / "json_2.1.1" / "train" / src.parent.name / src.name
    trial.mkdir(parents=True)
    (trial / "traj_data.json").write_text((src / "traj_data.json").read_text())
    data = json.loads((src / "game.tw-pddl").read_text())
    data["solvable"] = False
    (trial / "game.tw-pddl").write_text(json.dumps(data))
    with pytest.raises(AlfWorldError, match="no playable"):
        AlfWorldEnv(tmp_path).tasks("train")  # unsolvable games are skipped, like the stock loader does
    (trial / "game.tw-pddl").write_text("{not json")
    with pytest.raises(AlfWorldError, match="not a valid game file"):
        AlfWorldEnv(tmp_path).tasks("train")


def test_stock_alfworld_loader_collects_generated_games(data_root):
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    config = {
        "env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6]},
        "dataset": {"data_path": str(data_root / "json_2.1.1" / "train"), "num_train_games": -1},
    }
    stock = AlfredTWEnv(config, train_eval="train")
    assert stock.num_games == 4


def test_floorplan_scene_uses_a_real_kitchen_layout_and_is_winnable(tmp_path):
    from steptune.envs.alfworld_games import _mangle

    assert (
        _mangle("Sink|+00.05|+00.90|-00.65|SinkBasin")
        == "Sink_bar__plus_00_dot_05_bar__plus_00_dot_90_bar__minus_00_dot_65_bar_SinkBasin"
    )
    generate_games(tmp_path, n=1, seed=5, task_types=["pick_heat_then_place_in_recep"], scene="floorplan")
    with AlfWorldEnv(tmp_path) as env:
        reset = env.reset(env.tasks("train")[0])
        assert reset.task.count(", a ") >= 8  # an ALFWorld-sized room, not the small made-up kitchen
        assert "Your task is to:" in reset.task and ("heat" in reset.task or "hot" in reset.task)
        for action in env.expert_actions():
            result = env.step(action)
        assert result.done and result.reward == 1.0


def test_seen_and_unseen_are_alfworlds_valid_seen_and_valid_unseen_folders(tmp_path):
    """ETO's seen test set is valid_seen and its unseen one valid_unseen; swapping them would score every method on
    the other set without any error."""
    generate_games(tmp_path, n=1, seed=5, split="valid_seen")
    generate_games(tmp_path, n=2, seed=6, split="valid_unseen")
    env = AlfWorldEnv(tmp_path)
    for split, folder, n in (("seen", "valid_seen", 1), ("unseen", "valid_unseen", 2)):
        tasks = env.tasks(split)
        assert len(tasks) == n and all(t.variation.startswith(f"json_2.1.1/{folder}/") for t in tasks), split
        assert all(t.split == split for t in tasks)
