"""Payloads and results are frozen: no two threads can share a mutable object through a message."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from actorflow.core import TERMINAL_STATES, FrozenDict, TaskRecord, TaskState, freeze, is_terminal, thaw


def test_freeze_turns_dicts_read_only_and_lists_into_tuples() -> None:
    frozen = freeze({"name": "a", "data": {"list": [1, {"x": 2}]}})
    assert isinstance(frozen, FrozenDict)
    assert frozen["data"]["list"] == (1, {"x": 2})
    with pytest.raises(TypeError, match="read-only"):
        frozen["name"] = "b"
    with pytest.raises(TypeError, match="read-only"):
        frozen["data"].update(x=1)


def test_freeze_copies_so_later_changes_to_the_original_do_not_leak_in() -> None:
    original = {"name": "a", "data": [1, 2]}
    frozen = freeze(original)
    original["data"].append(3)  # type: ignore[attr-defined]
    assert frozen["data"] == (1, 2)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"data": {1, 2}}, "payload['data']"),
        ({"data": float("inf")}, "payload['data']"),
        ({1: "x"}, "key 1"),
        ({"data": [object()]}, "payload['data'][0]"),
    ],
)
def test_freeze_names_the_part_that_is_not_json(value: object, where: str) -> None:
    with pytest.raises(TypeError, match=where.replace("[", r"\[").replace("]", r"\]")):
        freeze(value)


def test_frozen_values_serialize_to_json_and_pickle_and_thaw_back() -> None:
    source = {"name": "ü", "data": {"n": [1, 2.5, None, True]}}
    frozen = freeze(source)
    assert json.loads(json.dumps(frozen)) == source
    assert pickle.loads(pickle.dumps(frozen)) == frozen
    assert thaw(frozen) == source
    assert copy.deepcopy(frozen) is frozen


def test_a_record_counts_calls_and_retries_and_has_no_attempts_alias() -> None:
    record = TaskRecord("t", TaskState.COMPLETED, freeze({"x": 21}), result=42, calls=4, retries=1)
    assert not hasattr(record, "attempts")
    wire = record.to_dict()
    assert (wire["calls"], wire["retries"]) == (4, 1)
    assert "attempts" not in wire
    assert wire["result"] == 42  # the last stage's value, whatever JSON it is
    assert json.loads(json.dumps(wire)) == wire


def test_terminal_states_are_the_same_three_in_every_pipeline() -> None:
    assert frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}) == TERMINAL_STATES
    assert [is_terminal(state) for state in TaskState] == [False, False, False, True, True, True]
