"""The store seam: journals opened by URL, and a StateActor that knows only the store Protocols."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pykka
import pytest

from actorflow.actors import Runtime, StateActor
from actorflow.actors.messages import CreateTask, CreateTasks
from actorflow.cli.inspect import main as inspect
from actorflow.core import ConfigError, RuntimeConfig, TaskState, UnstorableValue
from actorflow.core.journal import (
    Change,
    IdempotencyKey,
    Journal,
    JournalReader,
    WriterStore,
    open_reader,
    open_store,
)
from actorflow.core.tracing import new_trace
from actorflow.core.types import TERMINAL_STATES, TaskRecord
from actorflow.services import seed_pipeline
from tests.conftest import payload

S = TaskState
SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline, for a StateActor started by hand: its table is what these tests use."""


# --- opening by URL ---------------------------------------------------------------------------------


def test_a_plain_path_and_an_sqlite_url_open_the_same_sqlite_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = tmp_path / "absolute.db"
    for target, file in (
        ("relative.db", tmp_path / "relative.db"),
        ("sqlite:///relative.db", tmp_path / "relative.db"),
        (f"sqlite:///{absolute}", absolute),  # sqlite:////... : the path after the three slashes is absolute
        (absolute, absolute),
    ):
        store = open_store(target)
        try:
            assert isinstance(store, Journal)
            assert os.path.samefile(store.path, file)
        finally:
            store.close()
        with open_reader(target) as reader:
            assert isinstance(reader, JournalReader)
            assert reader.location == str(target).removeprefix("sqlite:///")
            assert reader.records() == []


@pytest.mark.parametrize(
    "url",
    ["postgresql://app:s3cret@db.example/tasks", "postgres://db/tasks", "mysql://db/tasks", "SQLITE2:///x.db"],
)
def test_a_url_of_another_scheme_is_refused_naming_the_schemes_supported_and_hiding_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    scheme = url.split(":", 1)[0].lower()
    for opening in (open_store, open_reader):
        with pytest.raises(
            ConfigError, match=rf"no journal store for the scheme '{scheme}'.*sqlite:///PATH"
        ) as refused:
            opening(url)
        assert "s3cret" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["sqlite://tasks.db", "sqlite:///", "sqlite://"])
def test_an_sqlite_url_that_names_no_file_is_refused_saying_how_to_write_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"names no file: write sqlite:///PATH"):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


def test_a_runtime_on_an_sqlite_url_keeps_its_tasks_and_inspect_reads_them_by_the_same_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with Runtime(RuntimeConfig(journal_path="sqlite:///tasks.db")) as runtime:
        runtime.submit(payload(0), task_id="t-0").result(timeout=10)

    assert inspect(["sqlite:///tasks.db", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["journal"] == "tasks.db"
    assert [task["task_id"] for task in shown["tasks"]] == ["t-0"]
    with Runtime(RuntimeConfig(journal_path=str(tmp_path / "tasks.db"))) as again:
        assert again.get("t-0").state is S.COMPLETED


def test_a_runtime_or_inspect_on_a_postgresql_url_is_refused_naming_the_schemes_supported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no journal store for the scheme 'postgresql'.*sqlite:///PATH"):
        Runtime(RuntimeConfig(journal_path="postgresql://localhost/tasks"))

    assert inspect(["postgresql://localhost/tasks"]) == 2
    assert "no journal store for the scheme 'postgresql'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert pykka.ActorRegistry.get_all() == []


# --- the StateActor on a store of another kind -------------------------------------------------------


class MemoryStore:
    """A second implementation of `WriterStore`, in memory: the StateActor must need nothing else."""

    def __init__(self) -> None:
        self.rows: dict[str, TaskRecord] = {}
        self.keys: dict[str, tuple[str, str]] = {}
        self.batches = 0
        self.refuse: str | None = None
        """A task id whose creation this store refuses for good (as a value too big would be)."""
        self.lost: str | None = None
        self.closed = False

    def write_batch(
        self, created: Sequence[TaskRecord], changed: Sequence[Change], keys: Sequence[IdempotencyKey] = ()
    ) -> None:
        self.check_batch(created, changed, keys)
        for record in created:
            self.rows[record.task_id] = record
        for record, _ in changed:
            self.rows[record.task_id] = record
        for key in keys:
            self.keys[key.key] = (key.task_id, key.fingerprint)
        self.batches += 1

    def check_batch(
        self, created: Sequence[TaskRecord], changed: Sequence[Change], keys: Sequence[IdempotencyKey] = ()
    ) -> None:
        assert not self.closed
        new = {record.task_id for record in created}
        if self.refuse in new:
            raise UnstorableValue(f"task {self.refuse!r} refused", task_id=self.refuse, fault="refused")
        if not new.isdisjoint(self.rows) or any(key.task_id not in new for key in keys):
            raise ValueError("a task created twice, or a key without its task")

    def get(self, task_id: str) -> TaskRecord | None:
        return self.rows.get(task_id)

    def contains(self, task_id: str) -> bool:
        return task_id in self.rows

    def records(
        self,
        *,
        state: TaskState | None = None,
        terminal: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[TaskRecord]:
        found = [
            record
            for record in sorted(self.rows.values(), key=lambda record: record.created_at, reverse=newest_first)
            if (state is None or record.state is state)
            and (terminal is None or (record.state in TERMINAL_STATES) == terminal)
        ][offset:]
        return found if limit is None else found[:limit]

    def iter_records(self, *, terminal: bool | None = None, batch: int = 1000) -> Iterator[TaskRecord]:
        return iter(self.records(terminal=terminal))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((state.value for state in TaskState), 0)
        for record in self.rows.values():
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
        return counts

    def close(self) -> None:
        self.closed = True


def test_the_state_actor_writes_and_recovers_through_any_writer_store_keys_included() -> None:
    store = MemoryStore()
    store.refuse = "refused"
    writer: WriterStore = store  # what the StateActor is given: the Protocol, not a class
    first = StateActor.start(pipelines=[SEED], journal=writer)
    try:
        proxy: Any = first.proxy()
        proxy.create("t-1", {"name": "a"}).get(timeout=10)
        proxy.transition("t-1", S.VALIDATED).get(timeout=10)
        with pytest.raises(UnstorableValue, match="'refused'"):
            proxy.create("refused", {"name": "b"}).get(timeout=10)
    finally:
        first.stop()
    assert store.closed
    assert store.rows["t-1"].path() == ["CREATED", "VALIDATED"]
    assert "refused" not in store.rows

    store.closed = False
    second = StateActor.start(pipelines=[SEED], journal=writer)
    try:
        proxy = second.proxy()
        assert [record.task_id for record in proxy.non_terminal().get(timeout=10)] == ["t-1"]
        assert proxy.counts().get(timeout=10)["VALIDATED"] == 1
    finally:
        second.stop()


def test_a_creation_with_a_key_hands_the_key_to_the_store_in_the_batch_that_creates_the_task() -> None:
    store = MemoryStore()
    ref = StateActor.start(pipelines=[SEED], journal=store)
    try:
        one = pykka.ThreadingFuture[TaskRecord]()
        ref.tell(CreateTask("t-1", {"name": "a"}, new_trace(), reply=one, idempotency_key=("k-1", "fp-1")))
        one.get(timeout=10)
        many = pykka.ThreadingFuture[tuple[TaskRecord, ...]]()
        tasks = tuple(
            CreateTask(f"t-{n}", {"name": "b"}, new_trace(), idempotency_key=(f"k-{n}", "fp") if n == 3 else None)
            for n in (2, 3)
        )
        ref.tell(CreateTasks(tasks, reply=many))
        many.get(timeout=10)
    finally:
        ref.stop()
    assert store.keys == {"k-1": ("t-1", "fp-1"), "k-3": ("t-3", "fp")}
