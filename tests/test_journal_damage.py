"""A damaged or tampered journal is refused with a JournalError naming the task and the column, never
a traceback: by a reader, by `actorflow inspect` (which says so and exits 2), and by a runtime."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from actorflow.actors import Runtime
from actorflow.cli import main
from actorflow.core import JournalError, RuntimeConfig
from actorflow.core.journal import Journal
from actorflow.core.types import MAX_DEPTH


def _fill(path: Path) -> None:
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        for index in range(3):
            runtime.submit({"name": f"task-{index}", "data": {"i": index}}, task_id=f"t-{index}").result(timeout=10)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.db"


# --- damaged or tampered rows ---------------------------------------------------------------------


def _without_not_null(connection: sqlite3.Connection) -> None:
    """Rebuild `tasks` without its NOT NULL constraints (as a tamperer could)."""
    (sql,) = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks'").fetchone()
    connection.execute("ALTER TABLE tasks RENAME TO tasks_old")
    connection.execute(sql.replace("NOT NULL", ""))
    connection.execute("INSERT INTO tasks SELECT * FROM tasks_old")
    connection.execute("DROP TABLE tasks_old")


_DEEP = "[" * 100_000 + "]" * 100_000
_TAMPERINGS: dict[str, tuple[str, str, str]] = {
    # name: (statement, column, what the message says was found)
    "bad JSON": ("UPDATE tasks SET payload = '{\"name\": ' WHERE task_id = 't-1'", "payload", "not JSON"),
    "JSON 100,000 deep": (f"UPDATE tasks SET result = '{_DEEP}' WHERE task_id = 't-1'", "result", "nested more than"),
    "JSON just too deep": (
        f"UPDATE tasks SET result = '{'[' * (MAX_DEPTH + 2)}{']' * (MAX_DEPTH + 2)}' WHERE task_id = 't-1'",
        "result",
        "nested more than",
    ),
    "a payload that is no object": ("UPDATE tasks SET payload = '[1, 2]' WHERE task_id = 't-1'", "payload", "object"),
    "an invalid state name": ("UPDATE tasks SET state = 'no such state!' WHERE task_id = 't-1'", "state", "state"),
    "an invalid state in the log": (
        "INSERT INTO transitions VALUES ('t-1', 99, 'COMPLETED', 'not a state!', 1.0, NULL)",
        "to_state",
        "state",
    ),
    "a NULL payload": ("UPDATE tasks SET payload = NULL WHERE task_id = 't-1'", "payload", "NULL"),
    "a text timestamp": ("UPDATE tasks SET created_at = 'yesterday' WHERE task_id = 't-1'", "created_at", "yesterday"),
    "a text count of calls": ("UPDATE tasks SET calls = 'many' WHERE task_id = 't-1'", "calls", "many"),
    "a text time in the log": ("UPDATE transitions SET at = 'noon' WHERE task_id = 't-1'", "at", "noon"),
}


@pytest.fixture(params=list(_TAMPERINGS))
def tampered(request: pytest.FixtureRequest, path: Path) -> tuple[str, str]:
    _fill(path)
    statement, column, found = _TAMPERINGS[request.param]
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        _without_not_null(connection)
        connection.execute("DROP TRIGGER transitions_refuse_update")
        connection.execute(statement)
    finally:
        connection.close()
    return column, found


def test_a_tampered_row_read_through_a_reader_raises_journal_error_naming_the_task_and_the_column(
    path: Path, tampered: tuple[str, str]
) -> None:
    column, found = tampered
    with Journal.open_readonly(path) as reader:
        for read in (lambda: reader.get("t-1"), reader.records, lambda: list(reader.iter_records())):
            with pytest.raises(JournalError) as refused:
                read()
            message = str(refused.value)
            assert "task 't-1'" in message
            assert f"column {column!r}" in message
            assert found in message
            assert len(message) < 1000
        assert reader.get("t-0") is not None, "the other rows still read"


def test_a_tampered_journal_refuses_a_runtime_with_a_journal_error_and_stays_free(
    path: Path, tampered: tuple[str, str]
) -> None:
    with pytest.raises(JournalError, match=r"t-1|state"):
        Runtime(RuntimeConfig(journal_path=str(path)))
    Journal(path).close()  # the refused runtime let go of the file


@pytest.mark.parametrize("options", [[], ["--json"], ["--task", "t-1"]], ids=["listing", "json", "task"])
def test_inspect_on_a_tampered_journal_prints_the_error_and_exits_non_zero_without_a_traceback(
    path: Path, tampered: tuple[str, str], options: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    column, _ = tampered
    assert main(["inspect", str(path), *options]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "task 't-1'" in err
    assert f"column {column!r}" in err


def test_counts_of_a_journal_with_a_state_name_no_task_can_have_raise_journal_error_naming_it(path: Path) -> None:
    _fill(path)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("UPDATE tasks SET state = 'no state!' WHERE task_id = 't-2'")
    finally:
        connection.close()
    with (
        Journal.open_readonly(path) as reader,
        pytest.raises(JournalError, match=r"task 't-2': column 'state' holds 'no state!', expected a task state name"),
    ):
        reader.counts()
