"""Idempotency-Keys in the journal: written with their task's creation, found after a restart, bounded.

The journal-level half; tests/test_api_cli.py kills a real server with SIGKILL and
retries against its successor on the same journal.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pykka
import pytest
import structlog

from actorflow.actors import Milestone, Runtime, StateActor, TaskHandle
from actorflow.api import create_app, serve_in_background
from actorflow.core import (
    InvalidPayload,
    JournalError,
    RuntimeConfig,
    RuntimeStopped,
    UnknownPipeline,
    UnstorableValue,
)
from actorflow.core.journal import KEY_RETENTION_S, IdempotencyKey, Journal, JournalReader
from actorflow.core.types import TaskRecord, TaskState, Transition, freeze
from tests.conftest import payload


def created(task_id: str, *, at: float) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        state=TaskState.CREATED,
        payload=freeze({"n": 1}),
        history=(Transition(None, TaskState.CREATED, at, "submitted"),),
        created_at=at,
        updated_at=at,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "tasks.db")
    try:
        yield opened
    finally:
        opened.close()


def test_a_key_is_written_in_the_batch_that_creates_its_task_and_no_other(journal: Journal) -> None:
    journal.write_batch([created("t0", at=time.time())], [])  # a batch with no key

    assert journal.find_key("key-1") is None

    journal.write_batch([created("t1", at=time.time())], [], [IdempotencyKey("key-1", "t1", "fp-1")])

    assert journal.find_key("key-1") == ("t1", "fp-1")


def test_a_batch_that_fails_writes_neither_the_task_nor_its_key_and_a_retry_writes_both(journal: Journal) -> None:
    journal.write_batch([created("t1", at=time.time())], [])
    key = IdempotencyKey("key-2", "t2", "fp-2")
    batch = [created("t2", at=time.time()), created("t1", at=time.time())]  # t1 again: the batch is refused

    with pytest.raises(JournalError):
        journal.write_batch(batch, [], [key])

    assert journal.find_key("key-2") is None
    assert not journal.contains("t2")
    journal.write_batch(batch[:1], [], [key])
    assert journal.find_key("key-2") == ("t2", "fp-2")


def test_a_key_whose_task_is_not_created_in_its_batch_is_refused_and_nothing_of_the_batch_is_written(
    journal: Journal,
) -> None:
    with pytest.raises(ValueError, match=r"names task 't9', which this batch does not create"):
        journal.write_batch([created("t3", at=time.time())], [], [IdempotencyKey("key-3", "t9", "fp-3")])
    with pytest.raises(ValueError, match="which this batch does not create"):
        journal.write_batch([], [], [IdempotencyKey("key-3", "t9", "fp-3")])

    assert journal.find_key("key-3") is None
    assert not journal.contains("t3")


def test_a_key_that_is_not_valid_text_is_refused_naming_its_task_and_nothing_of_the_batch_is_written(
    journal: Journal,
) -> None:
    batch = [created("t4", at=time.time()), created("t5", at=time.time())]

    with pytest.raises(UnstorableValue, match=r"task 't5': its Idempotency-Key's key is not valid UTF-8") as refused:
        journal.check_batch(batch, [], [IdempotencyKey("key-4", "t4", "fp"), IdempotencyKey("\udc80", "t5", "fp")])

    assert refused.value.task_id == "t5"
    assert not journal.contains("t4")
    assert journal.find_key("key-4") is None


def test_keys_older_than_the_retention_are_forgotten_and_pruned(journal: Journal, tmp_path: Path) -> None:
    old = time.time() - KEY_RETENTION_S - 60
    journal.write_batch([created("t-old", at=old)], [], [IdempotencyKey("old-key", "t-old", "fp")])

    assert journal.find_key("old-key") is None  # expired on reading

    journal.write_batch([created("t-new", at=time.time())], [], [IdempotencyKey("new-key", "t-new", "fp")])

    with sqlite3.connect(tmp_path / "tasks.db") as raw:
        keys = [row[0] for row in raw.execute("SELECT key FROM idempotency_keys")]
    assert keys == ["new-key"]  # pruned by the next write


def test_a_reader_of_a_journal_without_the_keys_table_finds_no_key(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    Journal(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE idempotency_keys")  # as a journal written before keys were kept

    with JournalReader(path) as reader:
        assert reader.find_key("any") is None


def test_a_key_found_in_the_journal_answers_with_its_task_and_another_payload_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "tasks.db")
    first = Runtime(RuntimeConfig(journal_path=path))
    try:
        with serve_in_background(create_app(first)) as running:
            original = httpx.post(f"{running.url}/tasks", json={"name": "a"}, headers={"Idempotency-Key": "k"})
    finally:
        first.close()
    again = Runtime(RuntimeConfig(journal_path=path))  # a new server: its in-memory keys are empty
    try:
        with serve_in_background(create_app(again)) as running, httpx.Client(base_url=running.url) as http:
            retried = http.post("/tasks", json={"name": "a"}, headers={"Idempotency-Key": "k"})
            other = http.post("/tasks", json={"name": "b"}, headers={"Idempotency-Key": "k"})
            listed = http.get("/tasks").json()["tasks"]
    finally:
        again.close()

    assert original.status_code == 201
    assert retried.status_code == 201
    assert retried.json()["task_id"] == original.json()["task_id"]
    assert retried.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422
    assert "different payload" in other.json()["error"]
    assert len(listed) == 1


# --- through a runtime: the key travels with its task to the StateActor -------------------------


class LoggedEvent:
    """A structlog processor that sets `seen` once an event called `name` is logged (and drops every event)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = threading.Event()

    def __call__(self, logger: object, method: str, event: MutableMapping[str, Any]) -> NoReturn:
        if event.get("event") == self.name:
            self.seen.set()
        raise structlog.DropEvent


@pytest.mark.timeout(60)
def test_a_key_submitted_while_the_state_actor_is_being_replaced_is_written_with_its_task(tmp_path: Path) -> None:
    path = str(tmp_path / "t.db")
    died = threading.Event()
    replace = threading.Event()

    def on_milestone(reached: Milestone) -> None:
        if reached.name == "state.died":  # on the supervisor's thread, before it starts the new StateActor
            died.set()
            assert replace.wait(30)

    submitted = LoggedEvent("task.submitted")
    structlog.configure(processors=[submitted], wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    runtime = Runtime(RuntimeConfig(journal_path=path), on_milestone=on_milestone)
    handles: list[TaskHandle] = []
    try:
        runtime.submit(payload(0)).result(timeout=10)
        (state,) = pykka.ActorRegistry.get_by_class(StateActor)
        state.stop()
        assert died.wait(10)
        submitter = threading.Thread(
            target=lambda: handles.append(runtime.submit(payload(1), task_id="t-1", idempotency_key=("k-1", "fp-1")))
        )
        submitter.start()
        # The submission is under way (its key with it), and meets a dead StateActor: it waits for the new one.
        assert submitted.seen.wait(10)
        replace.set()
        submitter.join(30)
        assert handles, "the submission raised (see the thread's traceback)"
        assert handles[0].result(timeout=10).state is TaskState.COMPLETED
        assert runtime.find_idempotency_key("k-1") == ("t-1", "fp-1")
    finally:
        replace.set()
        runtime.close()
    with JournalReader(path) as reader:
        assert reader.find_key("k-1") == ("t-1", "fp-1")


def test_a_refused_creation_writes_no_key_and_a_retry_after_a_restart_finds_the_key_of_the_task_that_exists(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "t.db")
    with Runtime(RuntimeConfig(journal_path=path)) as runtime:
        runtime.submit(payload(0), task_id="t-0", idempotency_key=("k-0", "fp-0")).result(timeout=10)
        with pytest.raises(InvalidPayload, match="already taken"):
            runtime.submit(payload(1), task_id="t-0", idempotency_key=("k-1", "fp-1"))
        with pytest.raises(UnknownPipeline):
            runtime.submit(payload(2), pipeline="nowhere", idempotency_key=("k-2", "fp-2"))
        assert runtime.find_idempotency_key("k-1") is None
        assert runtime.find_idempotency_key("k-2") is None
    with Runtime(RuntimeConfig(journal_path=path)) as again:
        assert again.find_idempotency_key("k-0") == ("t-0", "fp-0")
        assert again.find_idempotency_key("k-1") is None


@pytest.mark.parametrize("key", [("k",), ("k", "fp", "x"), ("k", 1), ["k", "fp"], "k"])
def test_an_idempotency_key_that_is_not_a_pair_of_str_is_refused_and_nothing_is_created(
    tmp_path: Path, key: Any
) -> None:
    with Runtime(RuntimeConfig(journal_path=str(tmp_path / "t.db"))) as runtime:
        with pytest.raises(InvalidPayload, match=r"idempotency_key must be a \(key, payload fingerprint\) pair"):
            runtime.submit(payload(0), task_id="t-0", idempotency_key=key)
        assert runtime.tasks() == []


def test_a_key_that_is_not_valid_text_refuses_its_tasks_creation_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    with Runtime(RuntimeConfig(journal_path=str(tmp_path / "t.db"))) as runtime:
        with pytest.raises(UnstorableValue, match=r"cannot store task 't-0'.*not valid UTF-8.*not created"):
            runtime.submit(payload(0), task_id="t-0", idempotency_key=("\udc80", "fp"))
        assert runtime.tasks() == []
        assert runtime.submit(payload(1), idempotency_key=("k-1", "fp")).result(timeout=10).state is TaskState.COMPLETED


def test_find_idempotency_key_without_a_journal_finds_nothing_and_after_close_raises(tmp_path: Path) -> None:
    with Runtime() as runtime:
        runtime.submit(payload(0), idempotency_key=("k-0", "fp")).result(timeout=10)
        assert runtime.find_idempotency_key("k-0") is None
    journaled = Runtime(RuntimeConfig(journal_path=str(tmp_path / "t.db")))
    journaled.submit(payload(0), task_id="t-0", idempotency_key=("k-0", "fp")).result(timeout=10)
    assert journaled.find_idempotency_key("k-0") == ("t-0", "fp")
    journaled.close()
    with pytest.raises(RuntimeStopped):
        journaled.find_idempotency_key("k-0")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["t.db"]  # the reader left no -wal or -shm behind
