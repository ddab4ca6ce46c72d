"""Idempotency-Keys in the journal: written with their task's creation, found after a restart, bounded.

The journal-level half; tests/test_api_cli.py kills a real server with SIGKILL and
retries against its successor on the same journal.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actorflow.actors import Runtime
from actorflow.api import create_app, serve_in_background
from actorflow.core import JournalError, RuntimeConfig
from actorflow.core.journal import KEY_RETENTION_S, Journal, JournalReader
from actorflow.core.types import TaskRecord, TaskState, Transition, freeze


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


def test_a_staged_key_is_written_with_its_tasks_creation_and_not_before(journal: Journal) -> None:
    journal.stage_key("key-1", "t1", "fp-1")
    journal.write_batch([created("t0", at=time.time())], [])  # another task's batch

    assert journal.find_key("key-1") is None

    journal.write_batch([created("t1", at=time.time())], [])

    assert journal.find_key("key-1") == ("t1", "fp-1")


def test_a_batch_that_fails_writes_neither_the_task_nor_its_key_and_a_retry_writes_both(journal: Journal) -> None:
    journal.write_batch([created("t1", at=time.time())], [])
    journal.stage_key("key-2", "t2", "fp-2")
    batch = [created("t2", at=time.time()), created("t1", at=time.time())]  # t1 again: the batch is refused

    with pytest.raises(JournalError):
        journal.write_batch(batch, [])

    assert journal.find_key("key-2") is None
    assert not journal.contains("t2")
    journal.write_batch(batch[:1], [])
    assert journal.find_key("key-2") == ("t2", "fp-2")


def test_an_unstaged_key_is_never_written(journal: Journal) -> None:
    journal.stage_key("key-3", "t3", "fp-3")
    journal.unstage_key("t3")

    journal.write_batch([created("t3", at=time.time())], [])

    assert journal.find_key("key-3") is None


def test_keys_older_than_the_retention_are_forgotten_and_pruned(journal: Journal, tmp_path: Path) -> None:
    old = time.time() - KEY_RETENTION_S - 60
    journal.stage_key("old-key", "t-old", "fp")
    journal.write_batch([created("t-old", at=old)], [])

    assert journal.find_key("old-key") is None  # expired on reading

    journal.stage_key("new-key", "t-new", "fp")
    journal.write_batch([created("t-new", at=time.time())], [])

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
