"""`Runtime.submit_many`: N tasks in one message and one journal commit, all or nothing; and group commit.

Commits are counted for real: a trace callback on the journal's SQLite connection
sees every statement the state actor runs, so a transaction is a BEGIN .. COMMIT
in that trace.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from actorflow import (
    InvalidPayload,
    JournalError,
    Overloaded,
    Runtime,
    RuntimeConfig,
    RuntimeStopped,
    ServiceSet,
    TaskState,
    TransitionEvent,
    UnknownPipeline,
    WouldDeadlock,
)
from actorflow.core.journal import Journal
from tests.conftest import MilestoneLog, payload
from tests.faults import Gate
from tests.journal_child import run_then_kill

S = TaskState


class Transactions:
    """Every transaction a journal's connection runs (the runtime's: see `runtime_journals`), as lists of statements."""

    def __init__(self, journal: Journal) -> None:
        self._connection = journal._connection
        assert self._connection is not None
        self._lock = threading.Lock()
        self._open: list[str] | None = None
        self.committed: list[list[str]] = []
        self._connection.set_trace_callback(self._statement)

    def _statement(self, sql: str) -> None:
        words = sql.split(None, 1)
        verb = words[0].upper() if words else ""
        with self._lock:
            if verb == "BEGIN":
                self._open = []
            elif verb in ("COMMIT", "ROLLBACK"):
                if verb == "COMMIT" and self._open is not None:
                    self.committed.append(self._open)
                self._open = None
            elif self._open is not None:
                self._open.append(sql)

    def creating(self) -> int:
        """How many committed transactions created tasks (inserted into `tasks`)."""
        with self._lock:
            return sum(
                1 for statements in self.committed if any(sql.startswith("INSERT INTO tasks") for sql in statements)
            )

    def stop(self) -> None:
        assert self._connection is not None
        self._connection.set_trace_callback(None)


def journaled(tmp_path: Path, **config: Any) -> RuntimeConfig:
    return RuntimeConfig(journal_path=str(tmp_path / "tasks.db"), **config)


def journal_task_ids(tmp_path: Path) -> list[str]:
    with Journal.open_readonly(tmp_path / "tasks.db") as reader:
        return [record.task_id for record in reader.records()]


def created_counts(runtime: Runtime) -> tuple[int, int, int]:
    """(tasks in any state, submitted, in flight) from `stats()`."""
    stats = runtime.stats()
    total = sum(stats[state.value] for state in runtime.states)
    return total, stats["submitted"], stats["in_flight"]


# --- the happy path ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_batch_of_tasks_all_complete_in_order_and_are_in_the_journal_after_a_restart(tmp_path: Path) -> None:
    with Runtime(journaled(tmp_path)) as runtime:
        handles = runtime.submit_many([payload(i) for i in range(300)])
        assert len(handles) == 300
        records = [handle.result(timeout=30) for handle in handles]
        assert all(record.state is S.COMPLETED for record in records)
        assert [record.payload["data"]["index"] for record in records] == list(range(300))
        ids = [handle.task_id for handle in handles]
    with Runtime(journaled(tmp_path)) as reopened:
        assert [reopened.get(task_id).state for task_id in ids] == [S.COMPLETED] * 300
    assert sorted(journal_task_ids(tmp_path)) == sorted(ids)


def test_a_batch_in_memory_completes_and_an_empty_batch_creates_nothing(runtime: Runtime) -> None:
    assert runtime.submit_many([]) == []
    handles = runtime.submit_many((payload(i) for i in range(50)), task_ids=[f"t{i}" for i in range(50)])
    assert [handle.task_id for handle in handles] == [f"t{i}" for i in range(50)]
    assert {handle.result(timeout=10).state for handle in handles} == {S.COMPLETED}


@pytest.mark.timeout(30)
def test_the_whole_batch_is_created_in_one_transaction(tmp_path: Path, runtime_journals: list[Journal]) -> None:
    with Runtime(journaled(tmp_path)) as runtime:
        transactions = Transactions(runtime_journals[-1])
        handles = runtime.submit_many([payload(i) for i in range(120)])
        assert runtime.join(timeout=20)
        transactions.stop()
        assert transactions.creating() == 1
        assert all(handle.done() for handle in handles)
    assert sorted(journal_task_ids(tmp_path)) == sorted(handle.task_id for handle in handles)


# --- all or nothing ------------------------------------------------------------------------------


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"d": value}
    return value


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        pytest.param(["not", "a", "mapping"], "mapping", id="not-a-mapping"),
        pytest.param({"name": "x", "data": object()}, "JSON", id="not-json"),
        pytest.param(_deep(200), "deep", id="too-deep"),
    ],
)
def test_one_bad_payload_in_the_middle_refuses_the_batch_naming_its_index_and_creates_none(
    tmp_path: Path, bad: Any, why: str
) -> None:
    with Runtime(journaled(tmp_path)) as runtime:
        batch: list[Any] = [payload(i) for i in range(10)]
        batch[6] = bad
        with pytest.raises(InvalidPayload, match=r"payloads\[6\]") as raised:
            runtime.submit_many(batch)
        assert why.lower() in str(raised.value).lower()
        assert created_counts(runtime) == (0, 0, 0)
    assert journal_task_ids(tmp_path) == []


def test_a_duplicate_id_within_the_batch_names_both_indexes_and_creates_none(runtime: Runtime) -> None:
    with pytest.raises(InvalidPayload, match=r"payloads\[3\]: task_id 'a' is also the id of payloads\[1\]"):
        runtime.submit_many([payload(i) for i in range(5)], task_ids=["x", "a", "y", "a", "z"])
    assert created_counts(runtime) == (0, 0, 0)


@pytest.mark.parametrize("retain_terminal", [None, 0])
def test_an_id_taken_by_an_earlier_task_refuses_the_batch_and_creates_none(
    tmp_path: Path, retain_terminal: int | None
) -> None:
    with Runtime(journaled(tmp_path, retain_terminal=retain_terminal)) as runtime:
        runtime.submit(payload(0), task_id="taken").result(timeout=10)  # terminal; evicted with retain 0
        with pytest.raises(InvalidPayload, match=r"payloads\[2\]: task_id 'taken' is already taken"):
            runtime.submit_many([payload(i) for i in range(4)], task_ids=["a", "b", "taken", "c"])
        assert created_counts(runtime) == (1, 1, 0)
        assert runtime.submit_many([payload(9)], task_ids=["a"])[0].result(timeout=10).state is S.COMPLETED
    assert sorted(journal_task_ids(tmp_path)) == ["a", "taken"]


def test_an_id_of_a_task_in_flight_refuses_the_batch_and_creates_none() -> None:
    gate = Gate()
    with Runtime(services=ServiceSet(process=gate.process)) as runtime:
        first = runtime.submit(payload(0), task_id="busy")
        assert gate.entered.wait(10)
        with pytest.raises(InvalidPayload, match=r"payloads\[1\]: task_id 'busy' is already taken"):
            runtime.submit_many([payload(1), payload(2)], task_ids=["free", "busy"])
        assert created_counts(runtime) == (1, 1, 1)
        gate.opened.set()
        assert first.result(timeout=10).state is S.COMPLETED


def test_an_unknown_pipeline_or_a_bad_argument_refuses_the_batch(runtime: Runtime) -> None:
    with pytest.raises(UnknownPipeline, match="nope"):
        runtime.submit_many([payload(0)], pipeline="nope")
    with pytest.raises(InvalidPayload, match="sequence of mappings"):
        runtime.submit_many(payload(0))  # type: ignore[arg-type]
    with pytest.raises(InvalidPayload, match="task_ids has 1 id"):
        runtime.submit_many([payload(0), payload(1)], task_ids=["only-one"])
    with pytest.raises(InvalidPayload, match=r"payloads\[1\]: task_id must be a non-empty str"):
        runtime.submit_many([payload(0), payload(1)], task_ids=["fine", ""])
    assert created_counts(runtime) == (0, 0, 0)


# --- overload ------------------------------------------------------------------------------------


def test_a_batch_larger_than_max_in_flight_is_refused_as_never_admissible() -> None:
    with Runtime(RuntimeConfig(max_in_flight=4)) as runtime:
        with pytest.raises(InvalidPayload, match="batch of 5 payloads can never be admitted under max_in_flight=4"):
            runtime.submit_many([payload(i) for i in range(5)])
        assert created_counts(runtime) == (0, 0, 0)


def test_without_room_for_the_whole_batch_reject_refuses_it_and_creates_none() -> None:
    gate = Gate()
    config = RuntimeConfig(max_in_flight=4, overload="reject")
    with Runtime(config, services=ServiceSet(process=gate.process)) as runtime:
        held = runtime.submit_many([payload(i) for i in range(3)])
        with pytest.raises(Overloaded, match="a batch of 2 needs room for all of them"):
            runtime.submit_many([payload(10), payload(11)])
        assert created_counts(runtime) == (3, 3, 3)
        assert len(runtime.submit_many([payload(12)])) == 1  # room for one is room enough for one
        gate.opened.set()
        assert runtime.join(timeout=10)
        assert all(handle.result(timeout=1).state is S.COMPLETED for handle in held)


@pytest.mark.timeout(30)
def test_with_overload_wait_a_batch_waits_for_room_for_all_of_it_then_goes_in() -> None:
    gate = Gate()
    config = RuntimeConfig(max_in_flight=4, overload="wait", submit_timeout_s=0.2)
    with Runtime(config, services=ServiceSet(process=gate.process)) as runtime:
        runtime.submit_many([payload(i) for i in range(3)])
        with pytest.raises(Overloaded, match=r"waited 0.2s for room"):
            runtime.submit_many([payload(10), payload(11)])
        assert created_counts(runtime) == (3, 3, 3)
        gate.opened.set()
    gate = Gate()
    config = RuntimeConfig(max_in_flight=4, overload="wait", submit_timeout_s=20)
    with Runtime(config, services=ServiceSet(process=gate.process)) as runtime:
        runtime.submit_many([payload(i) for i in range(4)])
        done = threading.Event()
        later: list[Any] = []
        waiting = threading.Thread(
            target=lambda: (later.extend(runtime.submit_many([payload(8), payload(9)])), done.set())
        )
        waiting.start()
        gate.opened.set()  # the four finish; the batch gets its room
        assert done.wait(15)
        waiting.join(5)
        assert [handle.result(timeout=10).state for handle in later] == [S.COMPLETED, S.COMPLETED]


# --- faults --------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_row_sqlite_refuses_in_the_middle_of_the_batch_creates_none_and_raises_journal_error_naming_it(
    tmp_path: Path,
) -> None:
    Runtime(journaled(tmp_path)).close()  # make the journal, then have SQLite refuse one row of the batch
    with sqlite3.connect(tmp_path / "tasks.db") as connection:
        connection.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON tasks WHEN NEW.payload LIKE '%poison%' "
            "BEGIN SELECT RAISE(ABORT, 'row refused (injected)'); END"
        )
    connection.close()
    milestones = MilestoneLog()
    with Runtime(journaled(tmp_path), on_milestone=milestones) as runtime:
        before = runtime.submit(payload(0)).result(timeout=10)
        batch = [payload(i) for i in range(1, 9)]
        batch[5] = {"name": "poison", "data": 5}
        ids = [f"t-{i}" for i in range(1, 9)]
        # A refusal for this row's data, which no retry cures: the batch is split to name the task, and
        # refused whole (all or none); the journal is not at fault, and takes the next batch at once.
        with pytest.raises(JournalError, match=r"cannot store task 't-6'.*injected.*nothing of the batch was created"):
            runtime.submit_many(batch, task_ids=ids)
        assert milestones.count("journal.unstorable") == 1
        assert milestones.count("journal.retry_scheduled") == 0
        assert runtime.health()["status"] == "ok"
        assert created_counts(runtime) == (1, 1, 0)
    assert journal_task_ids(tmp_path) == [before.task_id]


@pytest.mark.timeout(20)
def test_submit_many_with_a_journal_inside_a_subscriber_raises_would_deadlock(tmp_path: Path) -> None:
    with Runtime(journaled(tmp_path)) as runtime:
        raised: list[BaseException] = []
        done = threading.Event()

        def on_event(event: TransitionEvent) -> None:
            if not done.is_set():
                try:
                    runtime.submit_many([payload(9)])
                except BaseException as exc:
                    raised.append(exc)
                done.set()

        runtime.subscribe(on_event)
        runtime.submit(payload(1)).result(timeout=10)
        assert done.wait(10)
        assert isinstance(raised[0], WouldDeadlock), raised
        assert "submit_many" in str(raised[0])
        assert runtime.submit_many([payload(2)])[0].result(timeout=10).state is S.COMPLETED


def test_submit_many_on_a_closed_runtime_raises_runtime_stopped() -> None:
    runtime = Runtime()
    runtime.close()
    with pytest.raises(RuntimeStopped):
        runtime.submit_many([payload(0)])


# --- group commit --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_many_threads_submitting_one_task_at_a_time_share_commits(
    tmp_path: Path, runtime_journals: list[Journal]
) -> None:
    threads, each = 16, 10
    with Runtime(journaled(tmp_path, max_in_flight=1000)) as runtime:
        transactions = Transactions(runtime_journals[-1])
        start = threading.Barrier(threads)
        errors: list[BaseException] = []

        def submit_mine(offset: int) -> None:
            try:
                start.wait(10)
                for index in range(each):
                    runtime.submit(payload(offset * each + index))
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=submit_mine, args=(offset,)) for offset in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        assert not errors, errors
        assert runtime.join(timeout=30)
        transactions.stop()
        assert 1 <= transactions.creating() < threads * each
    assert len(journal_task_ids(tmp_path)) == threads * each


# --- crash safety --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_minus_nine_leaves_every_acknowledged_batch_whole_and_no_batch_in_part(tmp_path: Path) -> None:
    journal, results = tmp_path / "tasks.db", tmp_path / "results.db"
    rng = random.Random(14)
    rounds, batches, batch = 10, 12, 16
    acked: list[list[str]] = []
    interrupted = 0  # tasks caught mid-flight by a kill, summed over the rounds
    for round_index in range(rounds):
        start = round_index * batches * batch
        kill_after = rng.randrange(1, batches)  # a random moment: after this many acknowledged batches
        acked += run_then_kill(
            [journal, results, start, batches * batch, batch], prefix="acked-batch ", kill_after=kill_after
        )
        with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as check:
            assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        check.close()
        with Journal.open_readonly(journal) as reader:
            records = reader.records()
        interrupted += sum(1 for record in records if record.state not in (S.COMPLETED, S.FAILED, S.CANCELLED))
        present = {record.task_id for record in records}
        for first in range(start, start + batches * batch, batch):  # every batch: all of it or none
            ids = {f"k-{index}" for index in range(first, first + batch)}
            assert ids <= present or not ids & present, sorted(ids & present)
        with Runtime(RuntimeConfig(journal_path=str(journal), result_store=str(results))) as runtime:
            assert runtime.join(timeout=60)
            known = {record.task_id: record.state for record in runtime.tasks()}
            assert all(task_id in known for ids in acked for task_id in ids)
            assert set(known.values()) == {S.COMPLETED}
    assert len(acked) >= rounds
    assert interrupted > 0, "no kill landed while tasks were in flight: the test proved nothing"


def test_a_refused_batch_counts_each_of_its_payloads_as_a_rejected_submission(runtime: Runtime) -> None:
    batch: list[Any] = [payload(i) for i in range(5)]
    batch[3] = "not a mapping"
    with pytest.raises(InvalidPayload, match=r"payloads\[3\]"):
        runtime.submit_many(batch)
    with pytest.raises(InvalidPayload, match="sequence of mappings"):
        runtime.submit_many("nope")  # type: ignore[arg-type]
    assert runtime.telemetry.rejected == 5 + 1
