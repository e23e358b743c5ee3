"""Property-based tests of the loaders and converters: whatever the input, only FormatError (the documented
error, a UserError) escapes read_any; export then import gives back the same trajectory in every export format."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steptune.data.formats import EXPORTERS, read_any, write_as
from steptune.data.trajectory import Critique, FormatError, Step, Trajectory

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)  # any text JSON can hold
words = st.text(st.sampled_from("ab Action: Thought: Observation: OK\n\t é,."), max_size=30)
any_text = text | words
stripped = any_text.map(str.strip)
action = stripped.map(lambda s: " ".join(s.split()))  # one line, as actions are
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids,
                                                                                                max_size=3),
                          max_leaves=8)

critique = st.builds(Critique, is_error=st.booleans(), error=any_text, reason=any_text, reflection=any_text,
                     corrected_action=action)
step = st.builds(Step, thought=stripped, action=action, observation=st.none() | any_text,
                 weight=st.sampled_from([0, 1]),
                 kind=st.sampled_from(["expert", "student", "error", "reflection", "injected"]),
                 critique=st.none() | critique)
trajectory = st.builds(
    Trajectory, id=text, env=text, task_id=text, split=st.none() | text, instruction=any_text, task=any_text,
    example=st.none() | any_text, steps=st.lists(step, max_size=4),
    reward=st.floats(0.0, 1.0), success=st.booleans(),
    meta=st.dictionaries(st.sampled_from(["game_file", "id", "messages", "steptune", "meta", "x"]) | text,
                         json_value, max_size=3))


@FAST
@given(traj=trajectory, fmt=st.sampled_from(sorted(EXPORTERS)))
def test_export_then_import_is_the_identity(tmp_path_factory, traj, fmt):
    path = tmp_path_factory.mktemp("rt") / "out.jsonl"
    write_as([traj], path, fmt)
    assert read_any(path) == [traj]


def _read(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fz") / "in.jsonl"
    path.write_bytes(data)
    try:
        read_any(path)
    except FormatError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e)


@FAST
@given(data=st.binary(max_size=200))
def test_any_bytes_give_trajectories_or_a_format_error(tmp_path_factory, data):
    _read(tmp_path_factory, data)


turn = st.dictionaries(st.sampled_from(["from", "role", "value", "content", "weight", "train", "loss"]),
                       json_value | st.sampled_from(["human", "gpt", "user", "assistant", "system",
                                                     "Action: look", "Thought: t\nAction: a", "OK",
                                                     "Observation: x", "Now, it's your turn.\nTask"]), max_size=5)
record = st.fixed_dictionaries({}, optional={
    "id": json_value, "conversations": st.lists(turn, max_size=6) | json_value,
    "messages": st.lists(turn, max_size=6), "reward": json_value, "success": json_value,
    "meta": json_value, "steptune": st.dictionaries(st.sampled_from(["env", "kinds", "critiques", "example",
                                                                     "final_observation", "meta", "success"]),
                                                    json_value, max_size=3),
    "steps": json_value, "task": json_value})


@FAST
@given(records=st.lists(record | json_value | st.lists(turn, max_size=4), min_size=1, max_size=3),
       layout=st.sampled_from(["jsonl", "array", "truncated"]))
def test_any_json_gives_trajectories_or_a_format_error(tmp_path_factory, records, layout):
    if layout == "jsonl":
        data = "\n".join(json.dumps(r) for r in records)
    else:
        data = json.dumps(records, indent=1)
        data = data[: len(data) // 2] if layout == "truncated" else data
    _read(tmp_path_factory, data.encode())
