"""What a task may store is capped, and what a caller hands in is copied, never shared.

`RuntimeConfig.max_value_bytes` bounds every payload (refused at `submit`) and every
value a stage returns (its task FAILS, charged once), on every backend; error messages
stored in records are cut to a bound with a marker. A `FrozenDict` is deeply immutable,
so a list its builder keeps cannot change a submitted payload; and frozen values hold
only plain str, int and float, so they can always be pickled to a worker process.
"""

from __future__ import annotations

import math
import pickle
import threading
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from actorflow.actors import Runtime
from actorflow.core import (
    ConfigError,
    FrozenDict,
    InvalidPayload,
    Pipeline,
    RuntimeConfig,
    Stage,
    Task,
    TaskState,
    ValueTooLarge,
    freeze,
)
from actorflow.core.failures import MAX_MESSAGE_CHARS
from actorflow.core.journal import Journal
from actorflow.core.types import encode_json
from tests.value_stages import Unpicklable, raises_long_message, returns_unpicklable, too_big, too_big_async

S = TaskState
LIMIT = 100_000
"""The tests' `max_value_bytes`: half of what `too_big` returns for its "big" task."""


def _keep(task: Task, value: Any) -> None:
    """Hands the value on unchanged."""


def _config(tmp_path: Path, *, journal: bool = True, **fields: Any) -> RuntimeConfig:
    path = str(tmp_path / "tasks.db") if journal else None
    return RuntimeConfig(journal_path=path, max_value_bytes=LIMIT, **fields)


# --- the setting ----------------------------------------------------------------------------------


def test_max_value_bytes_defaults_to_64_mib_and_refuses_values_outside_its_bounds() -> None:
    assert RuntimeConfig().max_value_bytes == 64 * 1024 * 1024
    assert RuntimeConfig(max_value_bytes=1024).max_value_bytes == 1024
    assert RuntimeConfig(max_value_bytes=256 * 1024 * 1024).max_value_bytes == 256 * 1024 * 1024
    for bad in (0, 1023, 256 * 1024 * 1024 + 1, 10**9, True, 1.5e6, "big", None):
        with pytest.raises(ConfigError, match=r"RuntimeConfig\.max_value_bytes must be an int from 1024 to 268435456"):
            RuntimeConfig(max_value_bytes=bad)  # type: ignore[arg-type]


# --- measuring in freeze --------------------------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.text(alphabet=st.characters(max_codepoint=0x7F))  # control characters and quotes: escaped
)
_values = st.recursive(
    _leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_freeze_accepts_a_value_of_exactly_max_bytes_as_json_and_refuses_it_one_byte_lower(value: Any) -> None:
    try:
        frozen = freeze(value)
    except TypeError:
        assume(False)
        return
    size = len(encode_json(frozen))
    assert freeze(value, max_bytes=size) == frozen
    with pytest.raises(ValueTooLarge, match=f"a task may store at most {size - 1} bytes"):
        freeze(value, max_bytes=size - 1)


def test_freeze_stops_walking_a_huge_value_as_soon_as_it_is_over_the_limit() -> None:
    calls = 0

    class Counted(dict[str, Any]):
        def items(self) -> Any:
            nonlocal calls
            calls += 1
            return super().items()

    huge = [Counted(v="x" * 1000) for _ in range(10_000)]  # about 10 MB as JSON
    with pytest.raises(ValueTooLarge, match=r"is at least \d+ bytes as JSON"):
        freeze(huge, max_bytes=50_000)
    assert calls < 100, "the walk went on past the limit"


def test_a_frozen_dict_remembers_its_size_so_freezing_it_again_costs_nothing_and_is_still_capped() -> None:
    inner = freeze({"v": "x" * 5000})
    assert freeze(inner, max_bytes=10_000) is inner
    with pytest.raises(ValueTooLarge):
        freeze({"a": inner, "b": inner}, max_bytes=10_000)


# --- payloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("journal", [False, True], ids=["in memory", "journal"])
def test_a_payload_over_max_value_bytes_is_refused_naming_its_size_and_the_limit_and_nothing_is_created(
    tmp_path: Path, journal: bool
) -> None:
    big = {"name": "big", "data": "x" * (2 * LIMIT)}
    with Runtime(_config(tmp_path, journal=journal)) as runtime:
        with pytest.raises(InvalidPayload, match=r"payload is at least \d+ bytes as JSON.*") as refused:
            runtime.submit(big, task_id="big")
        assert f"at most {LIMIT} bytes" in str(refused.value)
        assert "RuntimeConfig.max_value_bytes" in str(refused.value)
        assert isinstance(refused.value, ValueTooLarge)
        with pytest.raises(InvalidPayload, match=r"payloads\[1\]: payload is at least \d+ bytes"):
            runtime.submit_many([{"name": "fine", "data": 1}, big], task_ids=["fine", "big-2"])
        stats = runtime.stats()
        assert stats["submitted"] == 0
        assert sum(stats[state.value] for state in S) == 0
        assert runtime.submit({"name": "after", "data": 1}).result(timeout=10).state is S.COMPLETED


# --- results, on every backend --------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["thread", "async", "process"])
def test_a_stage_result_over_max_value_bytes_fails_only_its_task_charged_once_naming_the_stage_size_and_limit(
    tmp_path: Path, backend: str
) -> None:
    fn = too_big_async if backend == "async" else too_big
    pipeline = Pipeline("p", [Stage("make", fn, backend=backend), Stage("keep", _keep, state="KEEPING")])  # type: ignore[arg-type]
    config = _config(tmp_path, max_attempts=3)
    with Runtime(config, pipelines=[pipeline]) as runtime:
        big = runtime.submit({"name": "big", "n": 0})
        small = [runtime.submit({"name": f"small-{n}", "n": n}) for n in range(1, 6)]
        record = big.result(timeout=60)
        assert record.state is S.FAILED
        assert (record.calls, record.retries) == (1, 0), "a value too large is a permanent failure, charged once"
        assert record.error is not None
        assert record.error.startswith("make: ValueTooLarge: the value returned by stage 'make' is at least")
        assert f"at most {LIMIT} bytes" in record.error
        assert "RuntimeConfig.max_value_bytes" in record.error
        assert [handle.result(timeout=60).result for handle in small] == [{"n": n} for n in range(1, 6)]
        assert runtime.health()["status"] == "ok"
    with Runtime(config, pipelines=[pipeline]) as reopened:
        assert reopened.get(big.task_id).state is S.FAILED
        assert reopened.stats()["COMPLETED"] == 5


@pytest.mark.timeout(60)
def test_an_exception_message_of_millions_of_characters_is_stored_cut_with_a_marker_saying_how_much(
    tmp_path: Path,
) -> None:
    pipeline = Pipeline("p", [Stage("fail", raises_long_message, backend="process")])
    config = _config(tmp_path)
    with Runtime(config, pipelines=[pipeline]) as runtime:
        record = runtime.submit({"name": "x", "n": 1}).result(timeout=30)
    assert record.state is S.FAILED
    for text in (record.error, record.history[-1].reason):
        assert text is not None
        assert text.startswith("fail: ValueError: yyy")
        assert len(text) <= MAX_MESSAGE_CHARS
        assert "characters cut]" in text
    with Journal.open_readonly(config.journal_path or "") as reader:
        stored = reader.get(record.task_id)
    assert stored is not None
    assert stored.error == record.error


# --- copy, never share ----------------------------------------------------------------------------


def test_a_frozen_dict_copies_what_it_is_built_from_so_a_later_change_of_the_builders_list_shows_nowhere() -> None:
    shared: list[Any] = [1, 2]
    inner = {"k": shared}
    frozen = FrozenDict({"l": shared, "m": inner}, extra=shared)
    shared.append(math.nan)
    inner["k2"] = 3
    assert frozen == {"l": (1, 2), "m": {"k": (1, 2)}, "extra": (1, 2)}
    assert type(frozen["m"]) is FrozenDict
    assert freeze(frozen) is frozen, "a FrozenDict is deeply frozen already: freeze keeps it"
    with pytest.raises(TypeError, match="read-only"):
        frozen.__init__({"l": 3})  # type: ignore[misc]
    assert frozen["l"] == (1, 2)
    with pytest.raises(TypeError, match=r"FrozenDict\['v'\] is nan"):
        FrozenDict(v=math.nan)
    again = pickle.loads(pickle.dumps(frozen))
    assert again == frozen
    assert type(again) is FrozenDict
    assert type(again["m"]) is FrozenDict


@pytest.mark.timeout(60)
def test_a_submitted_frozen_dict_whose_builder_later_appends_a_nan_to_its_list_completes_unchanged(
    tmp_path: Path,
) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold(task: Task, value: Any) -> None:
        if task.payload["name"] == "held":
            entered.set()
            release.wait(30)

    pipeline = Pipeline("p", [Stage("hold", hold), Stage("keep", _keep, state="KEEPING")])
    with Runtime(_config(tmp_path), pipelines=[pipeline]) as runtime:
        shared: list[Any] = [1, 2]
        handle = runtime.submit(FrozenDict({"name": "held", "numbers": shared}))
        others = [runtime.submit({"name": f"other-{n}", "n": n}) for n in range(6)]
        assert entered.wait(30)
        shared.append(math.nan)  # after submit() returned: the caller's list, not the task's
        release.set()
        record = handle.result(timeout=30)
        assert record.state is S.COMPLETED
        assert record.result == {"name": "held", "numbers": (1, 2)}
        assert all(other.result(timeout=30).state is S.COMPLETED for other in others)
        assert runtime.submit({"name": "after", "n": 9}).result(timeout=30).state is S.COMPLETED


class _Level(IntEnum):
    HIGH = 3


class _Ratio(float):
    pass


def test_freeze_hands_on_plain_str_int_and_float_for_their_subclasses_keys_included() -> None:
    frozen = freeze({Unpicklable("key"): [Unpicklable("text"), _Level.HIGH, _Ratio(0.5)], "n": Unpicklable("é")})
    assert frozen == {"key": ("text", 3, 0.5), "n": "é"}
    key = next(iter(frozen))
    assert type(key) is str
    text, level, ratio = frozen["key"]  # type: ignore[misc]
    assert (type(text), type(level), type(ratio)) == (str, int, float)
    assert type(frozen["n"]) is str
    assert pickle.loads(pickle.dumps(frozen)) == frozen


@pytest.mark.timeout(60)
def test_a_process_stage_returning_an_unpicklable_str_subclass_completes_with_a_plain_str_on_its_first_call(
    tmp_path: Path,
) -> None:
    pipeline = Pipeline("p", [Stage("weird", returns_unpicklable, backend="process")])
    with Runtime(_config(tmp_path), pipelines=[pipeline]) as runtime:
        record = runtime.submit({"name": "x", "n": 4}).result(timeout=30)
        assert record.state is S.COMPLETED, record.error
        assert record.result == {"v": "plain text", "n": 4}
        assert record.calls == 1
        assert runtime.stats()["restarts"] == 0
