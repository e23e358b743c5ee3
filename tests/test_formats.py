"""Trajectory JSONL I/O and converters: round trips, flags ↔ weights, and every bad record reported."""

import json
import os
import signal
import subprocess
import sys

import pytest

from steptune.data.formats import read_any, record_to_trajectory, trajectory_to_openai, trajectory_to_sharegpt, write_as
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
