"""The SQLite journal against real files: round trips, schema, refusals, faults, and a model check."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from actorflow.core.errors import JournalError
from actorflow.core.journal import APPLICATION_ID, SCHEMA_VERSION, Journal, JournalReader
from actorflow.core.types import TERMINAL_STATES, FrozenDict, TaskRecord, TaskState, Transition, freeze
from actorflow.services import seed_pipeline

S = TaskState
SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline: the random histories below follow its table."""
REPO_ROOT = Path(__file__).resolve().parents[1]

# --- helpers -------------------------------------------------------------------------------------


def created(task_id: str, *, at: float = 1_700_000_000.0, payload: Any = None, reason: str | None = "submitted"):
    """A freshly created record, as the state actor makes it."""
    return TaskRecord(
        task_id=task_id,
        state=S.CREATED,
        payload=freeze(payload if payload is not None else {"n": 1}),
        history=(Transition(None, S.CREATED, at, reason),),
        created_at=at,
        updated_at=at,
        trace_id="0af7651916cd43dd8448eb211c80319c",
    )


def advance(
    record: TaskRecord, to_state: TaskState, *, at: float | None = None, reason: str | None = None, **changes: Any
) -> tuple[TaskRecord, Transition]:
    """The record after one accepted transition, and the transition: a `changed` entry."""
    when = (record.updated_at + 1.0) if at is None else at
    transition = Transition(record.state, to_state, when, reason)
    after = replace(record, state=to_state, history=(*record.history, transition), updated_at=when, **changes)
    return after, transition


def completed(task_id: str, *, at: float = 1_700_000_000.0) -> tuple[TaskRecord, list[tuple[TaskRecord, Transition]]]:
    """A created record and the three changes that take it to COMPLETED with a result."""
    record = created(task_id, at=at)
    changes = []
    for state in (S.VALIDATED, S.PROCESSING):
        record, transition = advance(record, state)
        changes.append((record, transition))
    record, transition = advance(record, S.COMPLETED, result=freeze({"total": 3.5}), calls=1)
    changes.append((record, transition))
    return created(task_id, at=at), changes


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_query(path: Path, sql: str) -> list[Any]:
    """Run one statement on a plain connection of our own, and close it."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with Journal(path) as opened:
        yield opened


# --- round trips ---------------------------------------------------------------------------------


def test_created_and_changed_records_round_trip_exactly_including_a_task_created_and_changed_in_one_batch(
    journal: Journal,
) -> None:
    payload = {"name": "zoë ✓ 日本", "ratio": 0.1 + 0.2, "big": 2**70, "nested": {"list": [1, [2, {"x": None}]]}}
    first = created("a", payload=payload)
    journal.write_batch([first], [])
    assert journal.get("a") == first

    validated, to_validated = advance(first, S.VALIDATED, reason="schema ok")
    fresh = created("b", at=1_700_000_001.0)
    fresh_failed, to_failed = advance(fresh, S.FAILED, error="ValidationError: 'amount' is missing", calls=1)
    journal.write_batch([fresh], [(validated, to_validated), (fresh_failed, to_failed)])

    assert journal.get("a") == validated
    assert journal.get("b") == fresh_failed
    stored = journal.get("a")
    assert stored.payload["nested"]["list"] == (1, (2, {"x": None}))  # lists come back as tuples
    assert isinstance(stored.payload["nested"]["list"][1][1], FrozenDict)  # and objects frozen, however deep
    with pytest.raises(TypeError, match="read-only"):
        stored.payload["nested"]["new"] = 1
    assert journal.records() == [validated, fresh_failed]


def test_a_journal_reopened_after_close_returns_every_record_as_written(path: Path) -> None:
    record, changes = completed("t-1")
    with Journal(path, durability="full") as journal:
        journal.write_batch([record], changes)
    with Journal(path) as journal:
        assert journal.get("t-1") == changes[-1][0]
        assert journal.get("t-1").path() == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]


def test_several_changes_of_one_task_in_one_batch_leave_its_last_record(journal: Journal) -> None:
    record, changes = completed("t-1")
    journal.write_batch([record], [])
    journal.write_batch([], changes)
    stored = journal.get("t-1")
    assert stored == changes[-1][0]
    assert stored.result == {"total": 3.5}
    assert [entry.to_state for entry in stored.history] == [S.CREATED, S.VALIDATED, S.PROCESSING, S.COMPLETED]


def test_a_change_may_be_given_with_the_final_record_of_its_task(journal: Journal) -> None:
    record, changes = completed("t-1")
    final = changes[-1][0]
    journal.write_batch([record], [(final, transition) for _, transition in changes])
    assert journal.get("t-1") == final


def test_get_and_contains_of_an_unknown_task_return_none_and_false(journal: Journal) -> None:
    assert journal.get("nope") is None
    assert not journal.contains("nope")
    journal.write_batch([created("yes")], [])
    assert journal.contains("yes")


def test_an_empty_batch_writes_nothing_and_succeeds(journal: Journal) -> None:
    journal.write_batch([], [])
    assert journal.records() == []


# --- listing -------------------------------------------------------------------------------------


@pytest.fixture
def populated(journal: Journal) -> dict[str, TaskRecord]:
    """Six tasks, one per state; c2 and c1 share a created_at (insertion order breaks the tie)."""
    records = {
        "c2": created("c2", at=20.0),
        "c1": created("c1", at=20.0),
        "early": created("early", at=10.0),
        "late": created("late", at=40.0),
        "mid": created("mid", at=30.0),
        "last": created("last", at=50.0),
    }
    journal.write_batch(list(records.values()), [])
    final: dict[str, TaskRecord] = dict(records)
    path = {
        "c1": [S.VALIDATED],
        "early": [S.VALIDATED, S.PROCESSING],
        "late": [S.VALIDATED, S.PROCESSING, S.COMPLETED],
        "mid": [S.FAILED],
        "last": [S.CANCELLED],
    }
    changes = []
    for task_id, states in path.items():
        for state in states:
            final[task_id], transition = advance(final[task_id], state)
            changes.append((final[task_id], transition))
    journal.write_batch([], changes)
    return final


def test_records_are_ordered_by_created_at_then_insertion_order(
    journal: Journal, populated: dict[str, TaskRecord]
) -> None:
    assert [record.task_id for record in journal.records()] == ["early", "c2", "c1", "mid", "late", "last"]
    assert journal.records() == [populated[name] for name in ("early", "c2", "c1", "mid", "late", "last")]


def test_records_filter_by_state_and_by_terminal(journal: Journal, populated: dict[str, TaskRecord]) -> None:
    assert journal.records(state=S.FAILED) == [populated["mid"]]
    assert journal.records(state=S.CREATED) == [populated["c2"]]
    assert [r.task_id for r in journal.records(terminal=True)] == ["mid", "late", "last"]
    assert [r.task_id for r in journal.records(terminal=False)] == ["early", "c2", "c1"]
    assert journal.records(state=S.FAILED, terminal=False) == []
    assert journal.records(state="DONE") == []  # type: ignore[arg-type]  # any pipeline's state name may be asked for
    with pytest.raises(ValueError, match="state must be a TaskState"):
        journal.records(state="not a state!")  # type: ignore[arg-type]


def test_records_pages_with_limit_and_offset(journal: Journal, populated: dict[str, TaskRecord]) -> None:
    everything = journal.records()
    assert journal.records(limit=2) == everything[:2]
    assert journal.records(limit=2, offset=2) == everything[2:4]
    assert journal.records(offset=4) == everything[4:]
    assert journal.records(limit=0) == []
    assert journal.records(limit=10, offset=99) == []
    assert journal.records(terminal=True, limit=1, offset=1) == [populated["late"]]
    with pytest.raises(ValueError, match="limit"):
        journal.records(limit=-1)
    with pytest.raises(ValueError, match="offset"):
        journal.records(offset=-1)


def test_records_newest_first_reverse_the_order_and_page_from_the_newest(
    journal: Journal, populated: dict[str, TaskRecord]
) -> None:
    everything = journal.records()
    assert journal.records(newest_first=True) == everything[::-1]
    assert journal.records(newest_first=True, limit=2) == [populated["last"], populated["late"]]
    assert journal.records(newest_first=True, limit=2, offset=3) == [populated["c1"], populated["c2"]]
    assert journal.records(terminal=True, newest_first=True, limit=2) == [populated["last"], populated["late"]]
    assert journal.records(state=S.VALIDATED, newest_first=True) == [populated["c1"]]


def test_iter_records_streams_every_record_in_order_across_batches(
    journal: Journal, populated: dict[str, TaskRecord]
) -> None:
    everything = journal.records()
    for batch in (1, 2, 5, 6, 1000):
        assert list(journal.iter_records(batch=batch)) == everything
    assert list(journal.iter_records(terminal=False, batch=2)) == journal.records(terminal=False)
    assert list(journal.iter_records(terminal=True, batch=2)) == journal.records(terminal=True)
    with pytest.raises(ValueError, match="batch"):
        next(journal.iter_records(batch=0))


def test_iter_records_lets_the_caller_write_between_batches(journal: Journal, populated: dict[str, TaskRecord]) -> None:
    seen = []
    for record in journal.iter_records(terminal=False, batch=1):
        seen.append(record.task_id)
        if record.state is S.CREATED:
            after, transition = advance(record, S.CANCELLED, reason="recovery")
            journal.write_batch([], [(after, transition)])
    assert seen == ["early", "c2", "c1"]
    assert journal.get("c2").state is S.CANCELLED


def test_counts_lists_every_state_with_zero_for_states_without_tasks(
    journal: Journal, populated: dict[str, TaskRecord]
) -> None:
    assert journal.counts() == {state.value: 1 for state in TaskState}
    journal.write_batch([created("another")], [])
    assert journal.counts()["CREATED"] == 2


def test_counts_of_an_empty_journal_are_all_zero(journal: Journal) -> None:
    assert journal.counts() == dict.fromkeys([state.value for state in TaskState], 0)


# --- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("durability", "synchronous"), [("normal", 1), ("full", 2)])
def test_the_database_is_wal_with_synchronous_matching_durability_and_our_schema_version(
    path: Path, durability: str, synchronous: int
) -> None:
    with Journal(path, durability=durability) as journal:  # type: ignore[arg-type]
        journal.write_batch([created("t")], [])
        assert journal._connection is not None
        assert journal._connection.execute("PRAGMA synchronous").fetchone() == (synchronous,)
        assert raw_query(path, "PRAGMA journal_mode") == [("wal",)]
        assert raw_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert raw_query(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
        assert raw_query(path, "PRAGMA integrity_check") == [("ok",)]
    assert raw_query(path, "PRAGMA integrity_check") == [("ok",)]
    assert raw_query(path, "PRAGMA journal_mode") == [("wal",)]  # WAL mode is kept in the file


def test_close_checkpoints_the_wal_into_the_database(path: Path) -> None:
    journal = Journal(path)
    journal.write_batch([created("t")], [])
    journal.close()
    journal.close()  # idempotent
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with pytest.raises(JournalError, match="is closed"):
        journal.get("t")


def test_the_state_and_pipeline_columns_are_plain_text_with_no_check_pinning_the_seed_states(
    journal: Journal, path: Path
) -> None:
    journal.write_batch([created("t")], [])
    schema = " ".join(row[0] for row in raw_query(path, "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL"))
    assert "VALIDATED" not in schema
    assert "pipeline   TEXT    NOT NULL" in schema
    raw_query(path, "UPDATE tasks SET state = 'FETCH', pipeline = 'ingest'")


# --- the append-only log -------------------------------------------------------------------------


def test_the_transition_log_refuses_update_and_delete(journal: Journal, path: Path) -> None:
    record, changes = completed("t")
    journal.write_batch([record], changes)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw_query(path, "UPDATE transitions SET reason = 'rewritten'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw_query(path, "DELETE FROM transitions")
    assert journal.get("t") == changes[-1][0]


def test_writing_a_transition_twice_raises_journal_error_and_rolls_back_the_whole_batch(journal: Journal) -> None:
    first = created("t")
    validated, to_validated = advance(first, S.VALIDATED)
    journal.write_batch([first], [(validated, to_validated)])

    bystander = created("bystander")
    processing, to_processing = advance(validated, S.PROCESSING)
    with pytest.raises(JournalError, match=r"journal\.db.*UNIQUE constraint failed: transitions") as caught:
        journal.write_batch([bystander], [(processing, to_processing), (validated, to_validated)])
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)

    assert journal.get("t") == validated  # neither the good transition nor the duplicate
    assert not journal.contains("bystander")
    assert len(journal.get("t").history) == 2

    journal.write_batch([bystander], [(processing, to_processing)])  # the journal is still usable
    assert journal.get("t") == processing
    assert journal.contains("bystander")


def test_creating_a_task_twice_raises_journal_error_and_changes_nothing(journal: Journal) -> None:
    journal.write_batch([created("t")], [])
    with pytest.raises(JournalError, match=r"UNIQUE constraint failed: tasks\.task_id"):
        journal.write_batch([created("other"), created("t", at=5.0)], [])
    assert journal.records() == [created("t")]


def test_a_change_of_a_task_never_created_raises_journal_error_and_rolls_back_the_batch(journal: Journal) -> None:
    ghost, to_validated = advance(created("ghost"), S.VALIDATED)
    with pytest.raises(JournalError, match=r"\['ghost'\] were never created"):
        journal.write_batch([created("real")], [(ghost, to_validated)])
    assert journal.records() == []


def test_a_transition_missing_from_its_records_history_raises_value_error_before_writing(journal: Journal) -> None:
    record = created("t")
    journal.write_batch([record], [])
    stray = Transition(S.CREATED, S.VALIDATED, 5.0, None)
    with pytest.raises(ValueError, match="not in the history"):
        journal.write_batch([created("u")], [(record, stray)])
    assert journal.records() == [record]


# --- text that SQLite cannot store -----------------------------------------------------------------


def test_an_error_message_with_a_lone_surrogate_is_stored_escaped_and_the_batch_succeeds(journal: Journal) -> None:
    record = created("t", payload={"file": "café"})  # payloads never hold surrogates: freeze() refuses them
    failed, to_failed = advance(record, S.FAILED, error="cannot open 'caf\udce9'", reason="io \udce9")
    journal.write_batch([record], [(failed, to_failed)])
    stored = journal.get("t")
    assert stored.payload == {"file": "café"}
    assert stored.error == "cannot open 'caf\\udce9'"
    assert stored.history[-1].reason == "io \\udce9"


def test_a_task_id_that_is_not_valid_unicode_raises_journal_error_and_writes_nothing(journal: Journal) -> None:
    with pytest.raises(JournalError, match="not valid UTF-8"):
        journal.write_batch([created("fine"), created("bad\ud800")], [])
    assert journal.records() == []
    journal.write_batch([created("fine")], [])


# --- injected SQLite faults ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_an_operational_error_in_the_middle_of_a_batch_raises_journal_error_and_leaves_nothing_partial(
    journal: Journal,
) -> None:
    record = created("t")
    journal.write_batch([record], [])
    connection = journal._connection
    assert connection is not None
    steps = 0

    def interrupt_after_a_while() -> int:
        nonlocal steps
        steps += 1
        return 1 if steps > 50 else 0  # well into the batch: after some rows were inserted

    validated, to_validated = advance(record, S.VALIDATED)
    news = [created(f"new-{i}") for i in range(200)]
    connection.set_progress_handler(interrupt_after_a_while, 10)
    try:
        with pytest.raises(JournalError, match=r"journal\.db.*interrupted") as caught:
            journal.write_batch(news, [(validated, to_validated)])
    finally:
        connection.set_progress_handler(None, 0)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert steps > 50
    assert journal.records() == [record]
    assert journal.counts()["CREATED"] == 1

    journal.write_batch(news, [(validated, to_validated)])  # a retry of the same batch succeeds
    assert journal.get("t") == validated
    assert len(journal.records()) == 201


def test_a_full_disk_raises_journal_error_and_the_batch_can_be_retried_once_there_is_room(journal: Journal) -> None:
    connection = journal._connection
    assert connection is not None
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    connection.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own way to simulate a full disk
    big = [created(f"t-{i}", payload={"blob": "x" * 2000}) for i in range(50)]
    with pytest.raises(JournalError, match="database or disk is full"):
        journal.write_batch(big, [])
    assert journal.records() == []
    connection.execute("PRAGMA max_page_count = 1073741823")
    journal.write_batch(big, [])
    assert len(journal.records()) == 50


def test_a_constraint_raised_by_a_trigger_rolls_back_the_batch_and_the_journal_stays_usable(
    journal: Journal, path: Path
) -> None:
    record = created("t")
    journal.write_batch([record], [])
    raw_query(
        path,
        "CREATE TRIGGER poison BEFORE UPDATE ON tasks WHEN NEW.error = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
    )
    poisoned, to_failed = advance(record, S.FAILED, error="poison")
    with pytest.raises(JournalError, match="injected fault"):
        journal.write_batch([created("other")], [(poisoned, to_failed)])
    assert journal.records() == [record]
    healthy, to_failed = advance(record, S.FAILED, error="a real error")
    journal.write_batch([created("other")], [(healthy, to_failed)])
    assert journal.get("t") == healthy


# --- files that are not (usable) journals --------------------------------------------------------


def _random_bytes() -> bytes:
    data = os.urandom(4096)
    return b"\x00" + data[1:]  # never the SQLite magic


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_random_bytes(), id="random-bytes"),
        pytest.param(b"task_id,state\nt-1,COMPLETED\n", id="text-file"),
        pytest.param(b"SQLite", id="truncated-header"),
    ],
)
def test_a_file_that_is_not_sqlite_raises_journal_error_and_is_left_untouched(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    for opener in (Journal, Journal.open_readonly):
        with pytest.raises(JournalError, match=r"journal\.db.*file is not a database"):
            opener(path)
        assert path.read_bytes() == content
    assert not Path(f"{path}-wal").exists()


def test_a_file_with_an_sqlite_header_and_garbage_pages_raises_journal_error_and_is_left_untouched(
    path: Path,
) -> None:
    content = b"SQLite format 3\x00" + _random_bytes()
    path.write_bytes(content)
    with pytest.raises(JournalError, match=r"journal\.db.*(not a database|malformed)"):
        Journal(path)
    assert path.read_bytes() == content


def test_a_journal_with_a_newer_schema_version_raises_journal_error_and_is_left_untouched(path: Path) -> None:
    with Journal(path) as journal:
        journal.write_batch([created("t")], [])
    raw_query(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = digest(path)
    for opener in (Journal, Journal.open_readonly):
        with pytest.raises(JournalError, match=rf"journal\.db.*schema version {SCHEMA_VERSION + 1} is newer"):
            opener(path)
        assert digest(path) == before


def test_an_sqlite_database_of_another_application_raises_journal_error_and_is_left_untouched(path: Path) -> None:
    raw_query(path, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    before = digest(path)
    for opener in (Journal, Journal.open_readonly):
        with pytest.raises(JournalError, match=r"journal\.db.*another application.*tables: users"):
            opener(path)
        assert digest(path) == before


def test_a_path_in_a_missing_directory_raises_journal_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "journal.db"
    with pytest.raises(JournalError, match=r"no-such-dir/journal\.db"):
        Journal(missing)
    assert not missing.parent.exists()


def test_a_directory_as_path_raises_journal_error(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match=re.escape(str(tmp_path))):
        Journal(tmp_path)


def test_bad_arguments_raise_value_error(path: Path) -> None:
    with pytest.raises(ValueError, match="durability must be 'normal' or 'full'"):
        Journal(path, durability="paranoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="busy_timeout_s"):
        Journal(path, busy_timeout_s=-1)
    assert not path.exists()


# --- locks and ownership -------------------------------------------------------------------------

_LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
connection.close()
"""

_HOLDER = """
import sys
from actorflow.core.journal import Journal
with Journal(sys.argv[1]) as journal:
    print("open", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def other_process() -> Iterator[Any]:
    """Start a Python child running a script; it signals readiness with one line and exits on a line of input."""
    children: list[subprocess.Popen[str]] = []

    def start(script: str, *args: str, ready: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        child = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        children.append(child)
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == ready, f"child did not get ready: {line!r}, stderr: {child.communicate(timeout=10)[1]}"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.communicate(input="\n", timeout=10)
        else:
            child.communicate(timeout=10)


def release(child: subprocess.Popen[str]) -> None:
    _, stderr = child.communicate(input="\n", timeout=10)
    assert child.returncode == 0, stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["existing-journal", "empty-database"])
def test_a_database_locked_by_another_process_raises_journal_error_after_the_busy_timeout_and_is_left_untouched(
    path: Path, other_process: Any, kind: str
) -> None:
    if kind == "existing-journal":
        with Journal(path) as journal:
            journal.write_batch([created("t")], [])
    locker = other_process(_LOCKER, str(path), ready="locked")
    before = digest(path)
    with pytest.raises(JournalError, match=r"journal\.db.*database is locked.*busy_timeout_s=0\.1"):
        Journal(path, busy_timeout_s=0.1)
    assert digest(path) == before
    release(locker)
    with Journal(path) as journal:
        assert journal.contains("t") == (kind == "existing-journal")


@pytest.mark.timeout(30)
def test_a_batch_blocked_by_another_processs_lock_raises_journal_error_and_succeeds_when_retried_later(
    path: Path, other_process: Any
) -> None:
    with Journal(path, busy_timeout_s=0.1) as journal:
        locker = other_process(_LOCKER, str(path), ready="locked")
        with pytest.raises(JournalError, match=r"journal\.db.*rolled back: database is locked"):
            journal.write_batch([created("t")], [])
        release(locker)
        journal.write_batch([created("t")], [])
        assert journal.get("t") == created("t")


_WRITE_THEN_WAIT = """
import sys
from actorflow.core.journal import Journal
from actorflow.core.types import FrozenDict, TaskRecord, TaskState, Transition, freeze
journal = Journal(sys.argv[1], durability=sys.argv[2])
record = TaskRecord("t", TaskState.CREATED, freeze({"n": 1}), history=(Transition(None, TaskState.CREATED, 5.0, "x"),),
                    created_at=5.0, updated_at=5.0)
journal.write_batch([record], [])
print("written", flush=True)
sys.stdin.readline()
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_a_batch_acknowledged_before_the_process_is_killed_is_in_the_journal_and_the_lock_is_free(
    path: Path, other_process: Any, durability: str
) -> None:
    writer = other_process(_WRITE_THEN_WAIT, str(path), durability, ready="written")
    writer.kill()  # SIGKILL: no close(), no checkpoint, no unlock
    writer.communicate(timeout=10)
    assert Path(f"{path}-wal").stat().st_size > 0  # the batch lives only in the WAL
    with Journal(path) as journal:
        expected = TaskRecord(
            "t",
            S.CREATED,
            freeze({"n": 1}),
            history=(Transition(None, S.CREATED, 5.0, "x"),),
            created_at=5.0,
            updated_at=5.0,
        )
        assert journal.get("t") == expected
    assert raw_query(path, "PRAGMA integrity_check") == [("ok",)]


def test_a_second_journal_on_the_same_path_in_this_process_raises_journal_error(journal: Journal, path: Path) -> None:
    journal.write_batch([created("t")], [])
    before = digest(path)
    with pytest.raises(JournalError, match=r"journal\.db.*is in use by another runtime"):
        Journal(path)
    assert digest(path) == before
    journal.write_batch([created("u")], [])  # the refused opener took nothing from the owner
    assert journal.contains("u")


@pytest.mark.timeout(30)
def test_a_journal_held_by_another_process_raises_journal_error_until_that_process_closes_it(
    path: Path, other_process: Any
) -> None:
    with Journal(path) as journal:
        journal.write_batch([created("t")], [])
    holder = other_process(_HOLDER, str(path), ready="open")
    before = digest(path)
    with pytest.raises(JournalError, match=r"journal\.db.*is in use by another runtime"):
        Journal(path)
    assert digest(path) == before
    with Journal.open_readonly(path) as reader:  # reading is still allowed
        assert reader.contains("t")
    release(holder)
    with Journal(path) as journal:
        assert journal.contains("t")


def test_a_closed_journal_can_be_opened_again_at_once(path: Path) -> None:
    for _ in range(3):
        with Journal(path) as journal:
            journal.write_batch([created(f"t-{len(journal.records())}")], [])
    with Journal(path) as journal:
        assert len(journal.records()) == 3


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_that_inherited_the_lock_does_not_keep_the_journal_owned_after_close(path: Path) -> None:
    journal = Journal(path)
    child_may_exit, child_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only waits; it never touches the journal
        try:
            os.close(child_end)
            os.read(child_may_exit, 1)
        finally:
            os._exit(0)
    os.close(child_may_exit)
    try:
        journal.close()
        with Journal(path) as again:
            assert again.records() == []
    finally:
        os.close(child_end)
        os.waitpid(pid, 0)


# --- reading while a runtime writes --------------------------------------------------------------


def test_a_reader_sees_what_an_open_journal_has_committed(journal: Journal, path: Path) -> None:
    record, changes = completed("t")
    journal.write_batch([record], changes[:1])
    with Journal.open_readonly(path) as reader:
        assert isinstance(reader, JournalReader)
        assert reader.get("t") == changes[0][0]
        journal.write_batch([], changes[1:])
        assert reader.get("t") == changes[-1][0]
        assert reader.counts()["COMPLETED"] == 1
        assert reader.records(terminal=True) == [changes[-1][0]]
        assert list(reader.iter_records()) == [changes[-1][0]]


def test_a_path_with_uri_special_characters_works_for_writer_and_reader(tmp_path: Path) -> None:
    odd = tmp_path / "dir with space#hash?query%percent" / "journal ü.db"
    odd.parent.mkdir()
    with Journal(odd) as journal:
        journal.write_batch([created("t")], [])
        with Journal.open_readonly(odd) as reader:
            assert reader.get("t") == created("t")
    assert sorted(p.name for p in odd.parent.iterdir()) == ["journal ü.db"]  # the lock is on the database itself


def test_a_reader_on_a_missing_file_raises_journal_error_and_creates_nothing(path: Path) -> None:
    with pytest.raises(JournalError, match=r"journal\.db.*no such file"):
        Journal.open_readonly(path)
    assert not path.exists()


def test_a_reader_never_writes_the_database(path: Path) -> None:
    with Journal(path) as journal:
        record, changes = completed("t")
        journal.write_batch([record], changes)
    before = digest(path)
    with Journal.open_readonly(path) as reader:
        reader.records()
        reader.counts()
        with pytest.raises(AttributeError):
            reader.write_batch  # type: ignore[attr-defined]  # noqa: B018
    assert digest(path) == before


def test_a_reader_on_an_empty_database_raises_journal_error(path: Path) -> None:
    path.touch()
    with pytest.raises(JournalError, match="empty database"):
        Journal.open_readonly(path)


def test_a_journal_opened_in_one_thread_is_usable_from_another(path: Path) -> None:
    journal = Journal(path)  # a pykka actor's __init__ runs in the caller's thread, its handlers in its own
    failures: list[BaseException] = []

    def use() -> None:
        try:
            journal.write_batch([created("t")], [])
            assert journal.contains("t")
        except BaseException as exc:  # handed to the test thread
            failures.append(exc)

    worker = threading.Thread(target=use)
    worker.start()
    worker.join(timeout=10)
    journal.close()
    assert not worker.is_alive()
    assert failures == []


# --- a model check -------------------------------------------------------------------------------

_json_leaves = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
)
_json = st.recursive(
    _json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
_payloads = st.dictionaries(st.text(max_size=5), _json, max_size=4)
_times = st.sampled_from([0.0, 1.5, 1_700_000_000.123456]) | st.floats(0, 4e9, allow_nan=False)
_texts = st.none() | st.text(max_size=8)


class JournalMachine(RuleBasedStateMachine):
    """Random batches of creates and table-allowed transitions; the journal must always equal the model."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.directory.name, "journal.db")
        self.journal = Journal(self.path)
        self.model: dict[str, TaskRecord] = {}  # insertion order = creation order
        self.made = 0

    @rule(data=st.data())
    def write_a_batch(self, data: st.DataObject) -> None:
        news = []
        for _ in range(data.draw(st.integers(0, 3), label="new tasks")):
            self.made += 1
            task_id = f"{self.made}-{data.draw(st.text(max_size=5), label='id suffix')}"
            at = data.draw(_times, label="created_at")
            record = TaskRecord(
                task_id=task_id,
                state=S.CREATED,
                payload=freeze(data.draw(_payloads, label="payload")),
                history=(Transition(None, S.CREATED, at, data.draw(_texts, label="reason")),),
                created_at=at,
                updated_at=at,
                trace_id=data.draw(st.text(max_size=4), label="trace id"),
            )
            news.append(record)
        current = {**self.model, **{record.task_id: record for record in news}}
        changes = []
        for _ in range(data.draw(st.integers(0, 6), label="transitions")):
            live = [task_id for task_id, record in current.items() if record.state not in TERMINAL_STATES]
            if not live:
                break
            task_id = data.draw(st.sampled_from(live), label="task")
            record = current[task_id]
            to_state = data.draw(st.sampled_from(sorted(SEED.transitions[record.state])), label="to")
            after, transition = advance(
                record,
                to_state,
                at=data.draw(_times, label="at"),
                reason=data.draw(_texts, label="reason"),
                result=None if to_state is not S.COMPLETED else freeze(data.draw(_payloads, label="result")),
                error=data.draw(_texts, label="error") if to_state is S.FAILED else None,
                calls=record.calls + data.draw(st.integers(0, 2), label="calls"),
            )
            current[task_id] = after
            changes.append((after, transition))
        self.journal.write_batch(news, changes)
        self.model = current

    @rule(durability=st.sampled_from(["normal", "full"]))
    def reopen(self, durability: str) -> None:
        self.journal.close()
        self.journal = Journal(self.path, durability=durability)  # type: ignore[arg-type]

    @invariant()
    def journal_equals_model(self) -> None:
        for task_id, record in self.model.items():
            assert self.journal.get(task_id) == record
        in_order = sorted(self.model.values(), key=lambda record: record.created_at)  # stable: ties keep creation order
        assert self.journal.records() == in_order
        assert self.journal.records(newest_first=True) == in_order[::-1]
        assert list(self.journal.iter_records(batch=2)) == in_order
        assert self.journal.records(terminal=False) == [r for r in in_order if r.state not in TERMINAL_STATES]
        expected = dict.fromkeys([state.value for state in TaskState], 0)
        for record in self.model.values():
            expected[record.state.value] += 1
        assert self.journal.counts() == expected

    def teardown(self) -> None:
        self.journal.close()
        self.directory.cleanup()


def test_random_batches_of_creates_and_transitions_round_trip_exactly() -> None:
    run_state_machine_as_test(
        JournalMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
