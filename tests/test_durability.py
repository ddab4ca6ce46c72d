"""Durable state: the SQLite journal, recovery, kill -9, injected I/O errors and bad journals."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from actorflow.actors import Runtime
from actorflow.actors import state as state_module
from actorflow.core import TERMINAL_STATES, JournalError, RuntimeConfig, Task, TaskState
from actorflow.core.journal import Journal
from actorflow.services import ResultStore, ServiceSet, seed_pipeline
from tests.conftest import payload
from tests.faults import Gate
from tests.journal_child import run_then_kill

S = TaskState
SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline, whose table every history here must follow."""


def _assert_histories_are_legal(records: list[Any]) -> None:
    for record in records:
        history = record.history
        assert history[0].from_state is None
        assert history[0].to_state is S.CREATED
        for previous, entry in itertools.pairwise(history):
            assert entry.from_state is previous.to_state, record
            assert SEED.is_allowed(previous.to_state, entry.to_state), record
        assert record.state is history[-1].to_state


def _integrity_ok(path: Path) -> bool:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        connection.close()


def test_state_survives_a_restart_and_get_and_tasks_see_every_earlier_task(tmp_path: Path) -> None:
    config = RuntimeConfig(journal_path=str(tmp_path / "tasks.db"))
    with Runtime(config) as runtime:
        ids = [runtime.submit(payload(i)).task_id for i in range(20)]
        bad = runtime.submit({"name": "", "data": 1}).task_id
        runtime.join(10)
        before = {r.task_id: r for r in runtime.tasks()}
    with Runtime(config) as runtime:
        after = {r.task_id: r for r in runtime.tasks()}
        assert after == before
        assert runtime.get(ids[3]) == before[ids[3]]
        assert runtime.get(bad).state is S.FAILED
        assert runtime.stats()["COMPLETED"] == 20
        assert runtime.handle(ids[0]).result(timeout=0).state is S.COMPLETED


def test_recovery_round_trip_resumes_every_unfinished_task_from_its_last_committed_state(tmp_path: Path) -> None:
    journal = str(tmp_path / "tasks.db")
    gate = Gate()
    services = ServiceSet(process=gate.process, workers={"processor": 2})
    first = Runtime(RuntimeConfig(journal_path=journal), services=services)
    ids = [first.submit(payload(i)).task_id for i in range(10)]
    assert gate.entered.wait(10)
    first.close(drain=False)  # mid-flight: tasks left CREATED, VALIDATED or PROCESSING
    gate.opened.set()
    with Journal.open_readonly(journal) as reader:
        unfinished = [r for r in reader.records() if r.state not in TERMINAL_STATES]
    assert unfinished, "the close must have left work in flight"

    with structlog.testing.capture_logs() as logs, Runtime(RuntimeConfig(journal_path=journal)) as second:
        assert second.join(timeout=20)  # join waits for the recovered tasks too
        records = [second.get(task_id) for task_id in ids]
    started = next(e for e in logs if e["event"] == "runtime.started")
    assert started["recovered"] == len(unfinished)
    recovered = {e["task_id"]: e["state"] for e in logs if e["event"] == "task.recovered"}
    assert recovered == {r.task_id: r.state.value for r in unfinished}
    assert all(r.state is S.COMPLETED for r in records)
    _assert_histories_are_legal(records)
    for record in records:  # each transition recorded exactly once
        assert record.path() == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]


def test_a_replayed_persistence_stage_leaves_one_result_per_task(tmp_path: Path) -> None:
    journal, results = str(tmp_path / "tasks.db"), str(tmp_path / "results.db")
    gate = Gate()
    config = RuntimeConfig(journal_path=journal, result_store=results)
    first = Runtime(config, services=ServiceSet(persist=_persist_then_wait(results, gate)))
    task_id = first.submit(payload()).task_id
    assert gate.entered.wait(10)  # the result is written, COMPLETED is not yet committed
    first.close(drain=False)
    gate.opened.set()
    with Runtime(config) as second:
        assert second.join(10)
        assert second.get(task_id).state is S.COMPLETED
        assert second.results is not None
        assert second.results.count() == 1


def _persist_then_wait(results: str, gate: Gate) -> Any:
    store = ResultStore(results)

    def persist(task: Task, result: Mapping[str, Any]) -> None:
        store(task, result)
        gate.wait_here()

    return persist


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_minus_nine_at_random_moments_never_loses_an_acknowledged_task(tmp_path: Path) -> None:
    journal, results = tmp_path / "tasks.db", tmp_path / "results.db"
    rng = random.Random(7)
    acked: set[str] = set()
    rounds, per_round = 20, 60
    interrupted = 0  # tasks caught mid-flight by a kill, summed over the rounds
    for round_index in range(rounds):
        kill_after = rng.randrange(1, per_round)  # a random moment: after this many acknowledgements
        acks = run_then_kill(
            [journal, results, round_index * per_round, per_round], prefix="acked ", kill_after=kill_after
        )
        acked.update(task_id for (task_id,) in acks)
        assert _integrity_ok(journal)
        with Journal.open_readonly(str(journal)) as reader:
            interrupted += sum(1 for r in reader.records() if r.state not in TERMINAL_STATES)

        # Restart: everything acknowledged is there, and everything reaches a terminal state.
        with Runtime(RuntimeConfig(journal_path=str(journal), result_store=str(results))) as runtime:
            assert runtime.join(timeout=30)
            records = runtime.tasks()
            known = {r.task_id for r in records}
            assert acked <= known, sorted(acked - known)[:5]
            assert all(r.state is S.COMPLETED for r in records), [r for r in records if r.state is not S.COMPLETED][:3]
            _assert_histories_are_legal(records)
            assert runtime.results is not None
            assert runtime.results.count() == len(records)
    assert len(acked) >= rounds
    assert interrupted > 0, "no kill landed while tasks were in flight: the test proved nothing"


class _InterruptNthWrite:
    """Make the journal's SQLite connection fail with a real OperationalError on chosen writes."""

    def __init__(self, failing_writes: set[int]) -> None:
        self.failing = failing_writes
        self.writes = 0
        self.original = Journal.write_batch

    def as_method(self) -> Any:
        def write_batch(journal: Journal, created: Any, changed: Any, keys: Any = ()) -> None:
            self(journal, created, changed, keys)

        return write_batch

    def __call__(self, journal: Journal, created: Any, changed: Any, keys: Any = ()) -> None:
        self.writes += 1
        if self.writes in self.failing:
            connection = journal._connection  # the fault is injected at the SQLite level
            assert connection is not None
            connection.set_progress_handler(lambda: 1, 1)  # "interrupted": sqlite3.OperationalError
            try:
                self.original(journal, created, changed, keys)
            finally:
                connection.set_progress_handler(None, 0)
            return
        self.original(journal, created, changed, keys)


def test_an_injected_operational_error_on_one_write_is_reported_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    injector = _InterruptNthWrite({5})
    monkeypatch.setattr(Journal, "write_batch", injector.as_method())
    monkeypatch.setattr(state_module, "_JOURNAL_BACKOFF_S", (0.0, 0.0))  # no backoff: the next submit may write
    handles = []
    refused = 0
    with structlog.testing.capture_logs() as logs, Runtime(RuntimeConfig(journal_path=str(tmp_path / "t.db"))) as rt:
        for i in range(20):
            try:
                handles.append(rt.submit(payload(i)))
            except JournalError:  # a creation in the failed batch is refused, never acknowledged
                refused += 1
        assert rt.join(10)
        states = [h.result(timeout=0).state for h in handles]
    assert refused <= 1
    assert states == [S.COMPLETED] * len(handles)
    failures = [e for e in logs if e["event"] == "journal.write_failed"]
    assert len(failures) == 1
    assert "interrupted" in failures[0]["error"]
    with Journal.open_readonly(str(tmp_path / "t.db")) as reader:
        assert reader.counts()["COMPLETED"] == len(handles)


def test_a_failed_write_refuses_only_unacknowledged_work_and_the_runtime_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = str(tmp_path / "t.db")
    monkeypatch.setattr(state_module, "_JOURNAL_BACKOFF_S", (0.0, 0.0))  # no backoff: the next submit may write
    with Runtime(RuntimeConfig(journal_path=journal)) as rt:
        done = rt.submit(payload(0))
        assert done.result(timeout=10).state is S.COMPLETED
        injector = _InterruptNthWrite({1})  # the next batch
        monkeypatch.setattr(Journal, "write_batch", injector.as_method())
        with pytest.raises(JournalError, match="interrupted"):
            rt.submit(payload(1), task_id="refused")
        acked = [rt.submit(payload(i)) for i in range(2, 12)]  # the journal works again
        assert rt.join(10)
        assert all(h.result(timeout=0).state is S.COMPLETED for h in acked)
        with pytest.raises(Exception, match="refused"):
            rt.get("refused")
    with Journal.open_readonly(journal) as reader:
        assert not reader.contains("refused")
        assert reader.counts()["COMPLETED"] == 11


def test_a_journal_locked_by_another_process_for_a_while_delays_but_loses_nothing(tmp_path: Path) -> None:
    journal = tmp_path / "t.db"
    failed = threading.Event()

    def watch(logger: object, name: str, event: dict[str, Any]) -> dict[str, Any]:
        if event["event"] == "journal.write_failed":
            failed.set()
        raise structlog.DropEvent

    with Runtime(RuntimeConfig(journal_path=str(journal))) as rt:
        rt.submit(payload(0)).result(timeout=10)
        locker = sqlite3.connect(str(journal), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        structlog.configure(processors=[watch])
        submitter_result: list[Any] = []

        def submit() -> None:
            with contextlib.suppress(JournalError):  # refused while locked: allowed, as long as it is not acked
                submitter_result.append(rt.submit(payload(1)))

        thread = threading.Thread(target=submit)
        thread.start()
        assert failed.wait(30)  # the runtime reported the locked journal ...
        locker.execute("ROLLBACK")
        locker.close()
        thread.join(30)
        assert rt.join(20)
        # ... and either acknowledged the task once the lock went, or refused it: never acked-then-lost
        if submitter_result:
            assert submitter_result[0].result(timeout=0).state is S.COMPLETED
    with Journal.open_readonly(str(journal)) as reader:
        assert reader.counts()["COMPLETED"] == 1 + len(submitter_result)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_that_is_not_sqlite_is_refused_by_the_runtime_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 10)
    before = sha(path)
    with pytest.raises(JournalError, match="not"):
        Runtime(RuntimeConfig(journal_path=str(path)))
    assert sha(path) == before


def test_a_journal_from_a_newer_schema_is_refused_by_the_runtime(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    Runtime(RuntimeConfig(journal_path=str(path))).close()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    before = sha(path)
    with pytest.raises(JournalError, match="99"):
        Runtime(RuntimeConfig(journal_path=str(path)))
    assert sha(path) == before


def test_a_second_runtime_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"))
    with Runtime(config), pytest.raises(JournalError, match="in use"):
        Runtime(config)


def test_retain_terminal_bounds_memory_and_reads_evicted_records_back(tmp_path: Path) -> None:
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"), retain_terminal=10)
    with Runtime(config) as rt:
        ids = [rt.submit(payload(i)).task_id for i in range(100)]
        assert rt.join(20)
        assert rt.stats()["records_in_memory"] <= 10
        oldest = rt.get(ids[0])
        assert oldest.state is S.COMPLETED
        assert oldest.path() == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
        assert len(rt.tasks()) == 100
        assert len(rt.tasks(S.COMPLETED, limit=7, offset=90)) == 7
        assert rt.stats()["COMPLETED"] == 100
        with pytest.raises(Exception, match="already taken"):
            rt.submit(payload(), task_id=ids[0])  # an evicted id is still taken
    with Runtime(config) as rt:
        assert rt.stats()["records_in_memory"] <= 10
        assert rt.get(ids[0]).state is S.COMPLETED


def test_durability_full_sets_synchronous_full(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with Runtime(RuntimeConfig(journal_path=str(path), durability="full")) as rt:
        rt.submit(payload()).result(timeout=10)
        journal_connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            assert journal_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            journal_connection.close()
