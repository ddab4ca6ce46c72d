"""What a long-running runtime holds stays bounded, however many workers are replaced."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.actors.threads import ThreadBook
from actorflow.core import RuntimeConfig, Task, TaskState
from actorflow.services import ResultStore, ServiceSet
from tests.conftest import payload

S = TaskState


def _run_in_short_lived_threads(count: int, target: Any) -> None:
    for _ in range(count):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()


def test_the_thread_book_forgets_threads_that_have_ended() -> None:
    book = ThreadBook()
    _run_in_short_lived_threads(200, lambda: book.record_current("worker"))
    assert len(book) <= 1
    assert book.role_of_current() is None  # the main thread was never recorded


def test_the_thread_book_never_mistakes_a_new_thread_for_an_ended_one_with_the_same_id() -> None:
    book = ThreadBook()
    roles: list[object] = []
    _run_in_short_lived_threads(1, lambda: book.record_current("central"))
    # Thread ids are reused once a thread has ended: a new thread must not inherit the role.
    _run_in_short_lived_threads(50, lambda: roles.append(book.role_of_current()))
    assert roles == [None] * 50


@pytest.mark.parametrize("where", ["memory", "file"])
def test_the_result_store_closes_the_connections_of_threads_that_have_ended(tmp_path: Path, where: str) -> None:
    store = ResultStore(None if where == "memory" else str(tmp_path / "results.db"))
    try:
        counter = iter(range(10_000))

        def persist_one() -> None:
            index = next(counter)
            store(Task(f"t{index}", {}), {"n": index})

        _run_in_short_lived_threads(100, persist_one)
        assert store.open_connections <= 3  # the anchor, the last thread's, and the main thread's at most
        assert store.count() == 100  # the in-memory database survived: its anchor stays open
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_replacing_workers_many_times_leaves_threads_and_connections_bounded() -> None:
    store = ResultStore()
    crashes = 0

    def persist(task: Task, result: Mapping[str, Any]) -> None:
        nonlocal crashes
        store(task, result)
        if task.payload["name"] == "crash":
            crashes += 1
            raise SystemExit("a worker that exits")  # contained: the worker is replaced

    config = RuntimeConfig(max_attempts=1, max_restarts=1000)
    try:
        with Runtime(config, services=ServiceSet(persist=persist)) as runtime:
            for _ in range(60):
                assert runtime.submit({"name": "crash", "data": {}}).result(timeout=10).state is S.FAILED
            assert runtime.submit(payload(0)).result(timeout=10).state is S.COMPLETED
            actors = 2 + sum(pool["size"] for pool in runtime.stats()["pools"].values())
            assert crashes == 60
            # Without the bound both would have grown by 60. A retired worker's thread takes a moment
            # to end; the slack of 10 covers those still ending when the next worker is recorded.
            assert len(runtime._threads) <= actors + 10
            assert store.open_connections <= 1 + runtime.stats()["pools"]["persistence"]["size"] + 10
    finally:
        store.close()
