"""One value the journal cannot store fails only its own submission or its own task.

`freeze` accepts exactly what the journal's encoder and `TaskRecord.to_dict()`
can store: an int too long to print, a value nested too deep (or containing
itself) and a task id that is not valid Unicode are refused up front, as
InvalidPayload for a submission or as FAILED for a service's result, never as a
JournalError that takes a whole batch down, nor as a RecursionError.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actorflow.actors import Runtime
from actorflow.core import FrozenDict, InvalidPayload, RuntimeConfig, Task, TaskState, freeze, thaw
from actorflow.core.types import MAX_DEPTH, encode_json
from actorflow.services import ServiceSet
from tests.conftest import payload

S = TaskState
HUGE = 10**5000
"""More digits than Python will print (sys.get_int_max_str_digits() is 4300 by default)."""


def _nested(depth: int) -> dict[str, Any]:
    """{"a": {"a": ... {}}}, `depth` mappings deep, built without recursion."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _configs(tmp_path: Path) -> list[RuntimeConfig]:
    return [RuntimeConfig(), RuntimeConfig(journal_path=str(tmp_path / "tasks.db"))]


# --- freeze ---------------------------------------------------------------------------------------


def test_freeze_refuses_an_int_too_long_to_print_and_names_where_it_is() -> None:
    with pytest.raises(TypeError, match=r"payload\['data'\]\['v'\] is an int of .* digits"):
        freeze({"data": {"v": HUGE}})
    assert freeze({"v": -(10**4299)})["v"] == -(10**4299)  # the longest that prints is fine


def test_freeze_refuses_nesting_deeper_than_the_limit_with_a_type_error() -> None:
    assert freeze(_nested(MAX_DEPTH))
    with pytest.raises(TypeError, match=f"nested more than {MAX_DEPTH} levels deep"):
        freeze(_nested(MAX_DEPTH + 1))
    deep_list: list[Any] = []
    for _ in range(sys.getrecursionlimit() * 2):
        deep_list = [deep_list]
    with pytest.raises(TypeError, match="nested more than"):
        freeze({"data": deep_list})


def test_freeze_refuses_a_value_that_contains_itself_with_a_type_error() -> None:
    loop: dict[str, Any] = {"name": "x"}
    loop["self"] = loop
    with pytest.raises(TypeError, match="nested more than"):
        freeze(loop)


_json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([4299, 4300, 5000]).map(lambda digits: 10**digits)  # mapped: a repr of HUGE fails
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
_json_values = st.recursive(
    _json_leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_what_freeze_accepts_the_journal_encodes_and_to_dict_serializes_and_nothing_else(value: object) -> None:
    try:
        frozen = freeze(value)
        accepted = True
    except TypeError:
        accepted = False
    try:
        text = encode_json(value)
        encodable = True
    except (ValueError, RecursionError):
        encodable = False
    if not accepted:
        assert not encodable
        return
    assert encodable
    assert encode_json(frozen) == text
    assert json.loads(json.dumps(thaw(frozen))) == json.loads(text)


# --- submissions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("journal", [False, True], ids=["in memory", "journal"])
@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (payload(0, v=HUGE), "digits"),
        ({"name": "deep", "data": _nested(5000)}, "nested more than"),
    ],
    ids=["huge int", "deep nesting"],
)
def test_a_payload_the_journal_cannot_store_is_invalid_and_the_next_submission_still_works(
    tmp_path: Path, journal: bool, bad: dict[str, Any], what: str
) -> None:
    config = _configs(tmp_path)[journal]
    with Runtime(config) as runtime:
        with pytest.raises(InvalidPayload, match=what):
            runtime.submit(bad)
        assert runtime.submit(payload(1)).result(timeout=10).state is S.COMPLETED


@pytest.mark.parametrize("journal", [False, True], ids=["in memory", "journal"])
def test_a_task_id_with_a_lone_surrogate_is_invalid_payload(tmp_path: Path, journal: bool) -> None:
    config = _configs(tmp_path)[journal]
    with Runtime(config) as runtime:
        with pytest.raises(InvalidPayload, match="task_id"):
            runtime.submit(payload(0), task_id="bad-\udc80")
        assert runtime.submit(payload(1), task_id="good-é").result(timeout=10).state is S.COMPLETED


# --- results --------------------------------------------------------------------------------------


def _bad_results_processor(bad: Mapping[str, Any]) -> Any:
    def process(task: Task) -> Mapping[str, Any]:
        if task.payload["name"] == "bad":
            return bad
        return {"ok": task.payload["data"]["index"]}

    return process


def _recursive() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("journal", [False, True], ids=["in memory", "journal"])
@pytest.mark.parametrize(
    ("bad", "what"),
    [({"v": HUGE}, "digits"), (_recursive(), "nested more than")],
    ids=["huge int", "recursive"],
)
def test_a_result_the_journal_cannot_store_fails_only_its_own_task_with_the_reason(
    tmp_path: Path, journal: bool, bad: Mapping[str, Any], what: str
) -> None:
    config = _configs(tmp_path)[journal]
    # A persist that stores nothing: what must refuse the value is the check up front, not the result store.
    services = ServiceSet(process=_bad_results_processor(bad), persist=lambda task, result: None)
    errors: list[BaseException] = []
    with Runtime(config, services=services) as runtime:
        bad_handle = runtime.submit({"name": "bad", "data": {}})

        def submit_many(start: int) -> None:
            try:
                for index in range(start, start + 50):
                    runtime.submit(payload(index))
            except BaseException as exc:
                errors.append(exc)

        submitters = [threading.Thread(target=submit_many, args=(start,)) for start in (0, 100)]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join()
        record = bad_handle.result(timeout=20)
        assert runtime.join(20)
        assert errors == []
        assert record.state is S.FAILED
        assert record.error is not None
        assert record.error.startswith("processor:")
        assert what in record.error
        assert "RecursionError" not in record.error
        assert runtime.stats()["COMPLETED"] == 100
        json.dumps(record.to_dict())
    if journal:
        with Runtime(config) as reopened:
            assert reopened.get(bad_handle.task_id).state is S.FAILED
            assert reopened.stats()["COMPLETED"] == 100


def test_a_frozen_dict_is_checked_when_it_is_built_and_freeze_keeps_a_valid_one_as_it_is() -> None:
    valid = FrozenDict({"a": (1, 2)})
    assert freeze({"echo": valid})["echo"] is valid
    with pytest.raises(TypeError, match=r"FrozenDict\['v'\] is an int"):
        FrozenDict({"v": HUGE})
