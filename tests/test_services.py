"""The default services are pure functions; persistence is an idempotent upsert."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest

from actorflow.core import Task, ValidationError, freeze
from actorflow.services import ResultStore, ServiceSet, process, validate
from actorflow.services.processor import canonical_json


@pytest.mark.parametrize("payload", [{"name": "a", "data": None}, {"name": "x" * 200, "data": {"k": [1, 2]}}])
def test_the_validator_accepts_a_name_and_any_json_data(payload: dict[str, object]) -> None:
    validate(freeze(payload))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"data": 1}, "'name'"),
        ({"name": "", "data": 1}, "'name'"),
        ({"name": "   ", "data": 1}, "'name'"),
        ({"name": 7, "data": 1}, "'name'"),
        ({"name": "x" * 201, "data": 1}, "'name'"),
        ({"name": "a"}, "'data'"),
        ({"name": "a", "data": 1, "extra": 2}, "'extra'"),
    ],
)
def test_the_validator_rejects_a_bad_payload_naming_the_field(payload: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        validate(freeze(payload))


def test_the_processor_is_deterministic_and_digests_the_canonical_json() -> None:
    task = Task("t1", freeze({"name": "a", "data": {"b": 1, "a": 2}}))
    first, second = process(task), process(task)
    assert first == second
    assert first["bytes"] == len(canonical_json(task.payload))
    assert len(first["sha256"]) == 64
    other = process(Task("t2", freeze({"name": "a", "data": {"b": 2, "a": 1}})))
    assert other["sha256"] != first["sha256"]


def test_the_processor_sleeps_for_data_sleep_ms() -> None:
    task = Task("t", freeze({"name": "a", "data": {"sleep_ms": 30}}))
    started = time.perf_counter()
    process(task)
    assert time.perf_counter() - started >= 0.03


def test_persistence_is_an_idempotent_upsert_per_task_id(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "results.db"))
    try:
        task = Task("t1", freeze({"name": "a", "data": 1}))
        store(task, freeze({"v": 1}))
        store(task, freeze({"v": 2}))  # a replayed stage
        assert store.count() == 1
        assert store.get("t1") == {"v": 2}
    finally:
        store.close()


def test_an_in_memory_result_store_is_shared_by_worker_threads_but_private_to_the_store() -> None:
    store, other = ResultStore(), ResultStore()
    try:
        threads = [
            threading.Thread(target=store, args=(Task(f"t{i}", freeze({"name": "a", "data": i})), freeze({"i": i})))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert store.count() == 8
        assert other.count() == 0
    finally:
        store.close()
        other.close()


def test_a_result_store_pickles_as_its_path(tmp_path: Path) -> None:
    store = ResultStore(str(tmp_path / "r.db"))
    copy = pickle.loads(pickle.dumps(store))
    try:
        store(Task("t", freeze({"name": "a", "data": 1})), freeze({"ok": True}))
        assert copy.get("t") == {"ok": True}
    finally:
        store.close()
        copy.close()


def test_a_service_set_fills_in_defaults_and_refuses_non_callables() -> None:
    store = ResultStore()
    try:
        functions = ServiceSet(process=lambda task: {"x": 1}).functions(result_store=store)
        assert functions["validator"] is validate
        assert functions["persistence"] is store
        assert functions["processor"](None) == {"x": 1}
    finally:
        store.close()
    with pytest.raises(Exception, match=r"ServiceSet\.process must be callable"):
        ServiceSet(process=42)  # type: ignore[arg-type]
