"""Trajectory JSONL I/O and converters: round trips, flags ↔ weights, and every bad record reported."""

import json
import os
import signal
import subprocess
import sys

import pytest

from steptune.data.formats import (
    read_any,
    record_to_trajectory,
    trajectory_to_openai,
    trajectory_to_sharegpt,
    write_as,
)
from steptune.data.trajectory import (
    Critique,
    Step,
    Trajectory,
    TrajectoryFileError,
    TrajectoryWriter,
    load_trajectories,
    save_trajectories,
)


def sample() -> Trajectory:
    return Trajectory(
        id="twc-3", env="twx", task_id="twc/3", split="train", instruction="Interact with a household.",
        task="Your task is to tidy up the bedroom.", reward=1.0, success=True,
        steps=[Step(thought="Shirts go in the wardrobe.", action="take clean brown shirt", observation="Taken.",
                    kind="student"),
               Step(thought="Put it away.", action="put clean brown shirt in chest of drawers",
                    observation="Done.", kind="error", weight=0,
                    critique=Critique(is_error=True, error="wrong container", reason="shirts go in the wardrobe")),
               Step(thought="Wrong place; the wardrobe is for shirts.", action="take clean brown shirt",
                    observation="Taken.", kind="reflection"),
               Step(thought="Now the wardrobe.", action="put clean brown shirt in wardrobe",
                    observation="You win.", kind="student")])


ETO_RECORD = {
    "id": "sciworld_12",
    "conversations": [
        {"from": "human", "value": "You are a helpful assistant to do some scientific experiments."},
        {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "Your task is to boil water."},
        {"from": "gpt", "value": "Thought: I need a pot.\nAction: go to kitchen"},
        {"from": "human", "value": "Observation: You move to the kitchen."},
        {"from": "gpt", "value": "Thought: Take the pot.\nAction: pick up pot"},
    ],
}


def test_eto_sharegpt_import():
    t = record_to_trajectory(ETO_RECORD, env="sciworld")
    assert t.instruction.startswith("You are a helpful assistant") and t.task == "Your task is to boil water."
    assert [(s.thought, s.action, s.observation) for s in t.steps] == [
        ("I need a pot.", "go to kitchen", "You move to the kitchen."), ("Take the pot.", "pick up pot", None)]
    assert all(s.weight == 1 and s.kind == "expert" for s in t.steps)


@pytest.mark.parametrize("flag", ["weight", "train", "loss"])
def test_per_turn_flags_become_weights(flag):
    rec = {"id": "x", "messages": [
        {"role": "user", "content": "Find the coin."},
        {"role": "assistant", "content": "Thought: north?\nAction: go north", flag: 0 if flag == "weight" else False},
        {"role": "user", "content": "Observation: a wall"},
        {"role": "assistant", "content": "Action: take coin", flag: 1 if flag == "weight" else True}]}
    t = record_to_trajectory(rec)
    assert [(s.weight, s.kind) for s in t.steps] == [(0, "error"), (1, "expert")]
    assert t.steps[1].thought == "" and t.steps[1].action == "take coin"


def test_openai_weight_and_sharegpt_loss_round_trip(tmp_path):
    t = sample()
    for fmt, export in (("openai", trajectory_to_openai), ("sharegpt", trajectory_to_sharegpt)):
        back = record_to_trajectory(export(t), env="twx")
        assert [(s.thought, s.action, s.weight) for s in back.steps] == [(s.thought, s.action, s.weight) for s in t.steps]
        assert back.task == t.task and back.instruction == t.instruction
        assert [s.observation for s in back.steps[:-1]] == [s.observation for s in t.steps[:-1]]
        write_as([t], tmp_path / f"{fmt}.jsonl", fmt)
        assert [s.weight for s in read_any(tmp_path / f"{fmt}.jsonl")[0].steps] == [1, 0, 1, 1]
    save_trajectories([t], tmp_path / "ours.jsonl")
    assert read_any(tmp_path / "ours.jsonl") == [t] == load_trajectories(tmp_path / "ours.jsonl")


def test_every_malformed_record_is_reported_with_its_line(tmp_path):
    good = sample().model_dump_json()
    bad_weight = json.loads(good)
    bad_weight["steps"][0]["weight"] = 0.5
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good, "{not json", json.dumps(bad_weight), good, json.dumps({"id": 3})]) + "\n")
    with pytest.raises(TrajectoryFileError) as err:
        load_trajectories(path)
    assert [e.line for e in err.value.errors] == [2, 3, 5]
    assert "steps.0.weight" in str(err.value) and f"{path}:2" in str(err.value)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(ETO_RECORD) + "\n" + json.dumps({"conversations": [
        {"from": "human", "value": "task"}, {"from": "gpt", "value": "I will just look"}]}) + "\n{oops\n")
    with pytest.raises(TrajectoryFileError) as err:
        read_any(chat)
    assert [e.line for e in err.value.errors] == [3]  # JSON errors first: nothing is half-read
    chat.write_text(json.dumps(ETO_RECORD) + "\n" + json.dumps({"conversations": [
        {"from": "human", "value": "task"}, {"from": "gpt", "value": "I will just look"}]}) + "\n")
    with pytest.raises(TrajectoryFileError, match="chat.jsonl:2: assistant turn has no 'Action:'"):
        read_any(chat)


WRITER_SCRIPT = """
import sys, time
from steptune.data.trajectory import TrajectoryWriter, Trajectory
with TrajectoryWriter(sys.argv[1]) as w:
    for i in range(10_000):
        w.write(Trajectory(id=f"ep{i}", env="twx", task_id=str(i), task="t" * 200))
        print(i, flush=True)
"""


def test_writer_survives_kill9_without_loss_or_duplicates(tmp_path):
    path = tmp_path / "episodes.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(50):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with path.open("a") as fh:  # simulate a torn last line, as a kill mid-write leaves it
        fh.write('{"id": "ep-torn", "env"')
    with TrajectoryWriter(path) as w:
        n_done = len(w.done_ids)
        assert n_done >= 50
        for i in range(n_done + 5):
            w.write(Trajectory(id=f"ep{i}", env="twx", task_id=str(i), task="t"))
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == [f"ep{i}" for i in range(n_done + 5)]


# ------------------------------------------------------------------------------------------- ETO's other layouts

SCIWORLD_INSTRUCTION = "You are a helpful assistant to do some scientific experiment in an environment."
EXAMPLE_TURNS = [  # the start of ETO's sciworld_icl.json, as ETO's prompt_with_icl lays it out
    ("user", "Your task is to use chemistry to create green paint."),
    ("assistant", "Thought: I need materials, likely in an art studio.\nAction: teleport to art studio"),
    ("user", "Observation: You teleport to the art studio."),
    ("assistant", "Thought: Mix blue and yellow.\nAction: mix cup containing blue paint and yellow paint"),
]
REAL_STEPS = [
    ("assistant", "Thought: Water boils on the stove.\nAction: teleport to kitchen"),
    ("user", "Observation: You teleport to the kitchen."),
    ("assistant", "Thought: Put the pot on the stove.\nAction: move pot to stove"),
]


def eval_history(task_turn: str) -> dict:
    """ETO's evaluation output (State.to_dict): meta + the conversation the agent saw, worked example included."""
    turns = [("user", SCIWORLD_INSTRUCTION), ("assistant", "OK"), *EXAMPLE_TURNS, ("user", task_turn), *REAL_STEPS]
    return {"meta": {"steps": 2, "reward": 0.5, "finished": True, "success": False, "terminate_reason": "max_steps"},
            "conversations": [{"from": "human" if r == "user" else "gpt", "value": c} for r, c in turns]}


@pytest.mark.parametrize("task_turn", [
    "Now, it's your turn and here is the task.\nYour task is to boil water.",  # the marker of later versions
    "Your task is to boil water.",  # ETO's own prompt_with_icl: the task right after the example, unmarked
])
def test_eto_evaluation_history_keeps_the_example_untrained(tmp_path, tiny_model_dir, task_turn):
    from transformers import AutoTokenizer

    from steptune.data.tokenize import IGNORE_INDEX, encode_trajectory

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(eval_history(task_turn)) + "\n")
    t = read_any(path, env="sciworld")[0]
    assert t.instruction == SCIWORLD_INSTRUCTION and t.task == "Your task is to boil water."
    assert [s.action for s in t.steps] == ["teleport to kitchen", "move pot to stove"]
    assert t.example.startswith("Your task is to use chemistry") and "teleport to art studio" in t.example
    assert (t.reward, t.success) == (0.5, False)  # from ETO's meta, not the golden-data default
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = encode_trajectory(t, tok)
    trained = tok.decode([x for x in enc.labels if x != IGNORE_INDEX])
    assert trained == ("Thought: Water boils on the stove.\nAction: teleport to kitchen<|im_end|>"
                       "Thought: Put the pot on the stove.\nAction: move pot to stove<|im_end|>")
    assert "teleport to art studio" in tok.decode(enc.input_ids)  # the example stays in context
    # and the example survives export and import
    for fmt in ("openai", "sharegpt"):
        write_as([t], tmp_path / f"{fmt}.jsonl", fmt)
        assert read_any(tmp_path / f"{fmt}.jsonl") == [t]


def test_eto_in_context_example_file(tmp_path):
    """ETO's icl_examples/*.json: a JSON list of conversations (ALFWorld's mixes from/role keys)."""
    convs = [[{"role": "user", "content": "You are in the middle of a room.\n\nYour task is to: put a toiletpaper "
                                          "in toiletpaperhanger."},
              {"from": "gpt", "content": "Thought: Check the hanger.\nAction: go to toiletpaperhanger 1"},
              {"role": "user", "content": "Observation: On the toiletpaperhanger 1, you see nothing."},
              {"from": "gpt", "content": "Thought: Find a roll.\nAction: go to toilet 1"}],
             [{"role": "user", "content": "Your task is to boil water."},
              {"role": "assistant", "content": "Action: teleport to kitchen"}]]
    path = tmp_path / "alfworld_icl.json"
    path.write_text(json.dumps(convs, indent=4))
    trajs = read_any(path, env="alfworld")
    assert [[s.action for s in t.steps] for t in trajs] == [["go to toiletpaperhanger 1", "go to toilet 1"],
                                                             ["teleport to kitchen"]]
    assert trajs[0].steps[0].observation == "On the toiletpaperhanger 1, you see nothing."
    assert [t.id for t in trajs] == ["alfworld_icl-2", "alfworld_icl-20"]  # the line each conversation starts on


# ----------------------------------------------------------------------------------------------- round trips


def test_round_trips_keep_unknown_record_fields(tmp_path):
    rec = {"id": "alf-7", "game_file": "json_2.1.1/train/pick_and_place/trial_1/game.tw-pddl", "item_id": 7,
           "conversations": ETO_RECORD["conversations"]}
    src = tmp_path / "eto.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    first = read_any(src, env="alfworld")
    assert first[0].meta == {"game_file": rec["game_file"], "item_id": 7}
    for fmt in ("sharegpt", "openai", "steptune"):
        out = tmp_path / f"{fmt}.jsonl"
        write_as(first, out, fmt)
        exported = json.loads(out.read_text())
        if fmt != "steptune":
            assert exported["game_file"] == rec["game_file"] and exported["item_id"] == 7  # where ETO keeps it
        assert read_any(out) == first


def test_thought_that_mentions_action_survives_export(tmp_path):
    t = sample()
    t.steps[0].thought = "the Action: list says look"
    t.steps[1].thought = "first\nAction: not this one, the next line"
    for fmt in ("sharegpt", "openai"):
        write_as([t], tmp_path / f"{fmt}.jsonl", fmt)
        back = read_any(tmp_path / f"{fmt}.jsonl")[0]
        assert [(s.thought, s.action) for s in back.steps] == [(s.thought, s.action) for s in t.steps]
        assert back == t


# ---------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("flag,value", [("weight", "1"), ("weight", True), ("weight", "0"), ("weight", 0.5),
                                        ("weight", None), ("weight", 2), ("train", "false"), ("train", 0),
                                        ("loss", 0), ("loss", "true")])
def test_only_real_flags_are_accepted(tmp_path, flag, value):
    rec = {"id": "x", "messages": [{"role": "user", "content": "Find the coin."},
                                   {"role": "assistant", "content": "Action: go north", flag: value}]}
    path = tmp_path / "flags.jsonl"
    path.write_text("\n" + json.dumps(rec) + "\n")
    with pytest.raises(TrajectoryFileError, match=rf"flags\.jsonl:2: turn 1: {flag} must be"):
        read_any(path)


@pytest.mark.parametrize("value,weight", [(0, 0), (1, 1), (0.0, 0), (1.0, 1)])
def test_whole_number_weights_are_accepted(value, weight):
    rec = {"messages": [{"role": "user", "content": "t"}, {"role": "assistant", "content": "Action: a",
                                                          "weight": value}]}
    assert record_to_trajectory(rec).steps[0].weight == weight
    assert Step(action="a", weight=value).weight == weight


@pytest.mark.parametrize("value", ["1", True, "0", False, 0.5, None])
def test_steptune_format_refuses_coerced_weights(tmp_path, value):
    good = json.loads(sample().model_dump_json())
    good["steps"][1]["weight"] = value
    path = tmp_path / "ours.jsonl"
    path.write_text(json.dumps(good) + "\n")
    for read in (read_any, load_trajectories):
        with pytest.raises(TrajectoryFileError, match=r"ours\.jsonl:1: steps\.1\.weight"):
            read(path)
