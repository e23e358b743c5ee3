"""The ReAct text format (steptune.data.react): one parser for a model's reply and a data file's turn."""

import pytest

from steptune.data.react import format_observation, format_react, parse_observation, parse_react


@pytest.mark.parametrize("text, thought, action", [
    ("Thought: go get it\nAction: take coin", "go get it", "take coin"),
    ("  thought:  go\n  ACTION :   open fridge  \n", "go", "open fridge"),
    ("Action: look around", "", "look around"),
    ("I think so.\nAction: take coin", "I think so.", "take coin"),
])
def test_parse_react_tolerates_casing_and_spacing(text, thought, action):
    parsed = parse_react(text)
    assert parsed is not None and (parsed.thought, parsed.action) == (thought, action)


@pytest.mark.parametrize("text", ["Thought: hmm", "", "Action:   ", "Action: a\nAction: b", "Actions: a"])
def test_parse_react_rejects_missing_or_multiple_actions(text):
    assert parse_react(text) is None


@pytest.mark.parametrize("thought, action", [("go get it", "take coin"), ("", "look around"),
                                             ("two\nlines", "put mug in/on table")])
def test_what_is_written_reads_back_the_same(thought, action):
    for recorded in (False, True):
        parsed = parse_react(format_react(thought, action), recorded=recorded)
        assert (parsed.thought, parsed.action) == (thought, action)
    assert parse_observation(format_observation("  spaced  ")) == "  spaced  "


def test_a_recorded_turn_takes_the_last_action_line_to_its_end():
    """A data file's thought may quote "Action:"; a model's reply with two actions is refused instead."""
    text = "Thought: the manual says\nAction: is a label\nAction: take coin\nfrom the table"
    assert parse_react(text) is None
    parsed = parse_react(text, recorded=True)
    assert parsed.thought == "the manual says\nAction: is a label" and parsed.action == "take coin\nfrom the table"
    assert parse_react("Thought: no action here", recorded=True) is None
