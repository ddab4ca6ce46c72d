"""``run_demo.py inspect`` on real journals: what an operator sees, and how it fails."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from actorflow.cli.inspect import main
from actorflow.core.journal import Journal
from actorflow.core.types import TaskRecord, TaskState, Transition, freeze

S = TaskState
START = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def created(task_id: str, *, at: float = START, payload: Any = None) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        state=S.CREATED,
        payload=freeze(payload if payload is not None else {"order": task_id}),
        history=(Transition(None, S.CREATED, at, "submitted"),),
        created_at=at,
        updated_at=at,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )


def advance(record: TaskRecord, to_state: TaskState, reason: str | None = None, **changes: Any):
    at = record.updated_at + 0.25
    transition = Transition(record.state, to_state, at, reason)
    return replace(record, state=to_state, history=(*record.history, transition), updated_at=at, **changes), transition


def write_path(journal: Journal, record: TaskRecord, steps: list[tuple[TaskState, dict[str, Any]]]) -> TaskRecord:
    journal.write_batch([record], [])
    for state, changes in steps:
        record, transition = advance(record, state, **changes)
        journal.write_batch([], [(record, transition)])
    return record


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    """A journal, held open for writing while the tests inspect it, with one task per outcome."""
    with Journal(path) as opened:
        write_path(
            opened,
            created("order-1"),
            [
                (S.VALIDATED, {"reason": "schema ok"}),
                (S.PROCESSING, {}),
                (S.COMPLETED, {"result": freeze({"total": 42.5, "currency": "EUR"}), "calls": 1}),
            ],
        )
        write_path(
            opened,
            created("order-2", at=START + 10),
            [
                (S.VALIDATED, {}),
                (
                    S.FAILED,
                    {"reason": "processor gave up", "error": "TimeoutError: stock service\nline 2", "calls": 3},
                ),
            ],
        )
        write_path(opened, created("order-3", at=START + 20), [])
        yield opened


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_prints_counts_per_state_then_every_task_with_its_history(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, str(path))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"journal  {path}"
    counts = lines[lines.index("STATE       COUNT") : lines.index("STATE       COUNT") + 8]
    assert counts == [
        "STATE       COUNT",
        "CREATED         1",
        "VALIDATED       0",
        "PROCESSING      0",
        "COMPLETED       1",
        "FAILED          1",
        "CANCELLED       0",
        "total           3",
    ]
    assert "tasks: 3 of 3 shown, oldest first" in out
    assert out.index("task order-1") < out.index("task order-2") < out.index("task order-3")
    assert "  path     CREATED -> VALIDATED -> PROCESSING -> COMPLETED  (0.750s from creation to last change)" in out
    assert "  history  2023-11-14 22:13:20.000Z  +0.000s  (new)      -> CREATED     submitted" in out
    assert "           2023-11-14 22:13:20.250Z  +0.250s  CREATED    -> VALIDATED   schema ok" in out
    assert "           2023-11-14 22:13:20.750Z  +0.750s  PROCESSING -> COMPLETED" in out
    assert '  result   {"total": 42.5, "currency": "EUR"}' in out
    assert "  error    TimeoutError: stock service  [+1 more lines]" in out


def test_inspect_with_state_failed_shows_only_the_failed_tasks(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(path), "--state", "FAILED")
    assert code == 0
    assert "FAILED tasks: 1 of 1 shown, oldest first" in out
    assert "task order-2  FAILED  pipeline default  calls 3  retries 0  trace 4bf92f3577b34da6a3ce929d0e0e4736" in out
    assert "VALIDATED  -> FAILED      processor gave up" in out
    assert "order-1" not in out
    assert "order-3" not in out


def test_inspect_accepts_a_state_in_lower_case_and_says_when_no_task_is_in_it(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(path), "--state", "cancelled")
    assert code == 0
    assert out.endswith("\nno CANCELLED tasks\n")


def test_inspect_with_task_shows_that_task_alone(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(path), "--task", "order-1")
    assert code == 0
    assert out.startswith("task order-1  COMPLETED  pipeline default  calls 1  retries 0")
    assert "order-2" not in out
    assert "STATE" not in out


def test_inspect_of_an_unknown_task_exits_1_naming_it(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, str(path), "--task", "order-99")
    assert (code, out) == (1, "")
    assert "no task 'order-99'" in err
    assert str(path) in err


def test_inspect_with_limit_shows_the_most_recent_tasks_and_how_many_are_hidden(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(path), "--limit", "2")
    assert code == 0
    assert "tasks: 2 of 3 shown, oldest first" in out
    assert "task order-1" not in out
    assert out.index("task order-2") < out.index("task order-3")
    assert out.endswith("(1 older tasks not shown; use --limit N)\n")

    code, out, _ = run(capsys, str(path), "--limit", "0")
    assert code == 0
    assert out.endswith("total           3\n")


def test_inspect_sees_what_a_journal_held_open_for_writing_commits_between_two_runs(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, before, _ = run(capsys, str(path), "--state", "CANCELLED")
    assert "no CANCELLED tasks" in before
    record, transition = advance(journal.get("order-3"), S.CANCELLED, reason="operator")
    journal.write_batch([], [(record, transition)])
    _, after, _ = run(capsys, str(path), "--state", "CANCELLED")
    assert "task order-3  CANCELLED" in after
    journal.write_batch([created("order-4", at=START + 30)], [])  # the writer was not disturbed
    assert journal.counts()["CREATED"] == 1


def test_inspect_of_a_missing_path_exits_2_naming_the_path_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.db"
    code, out, err = run(capsys, str(missing))
    assert (code, out) == (2, "")
    assert str(missing) in err
    assert "no such file" in err
    assert not missing.exists()


def test_inspect_of_a_file_that_is_not_a_database_exits_2_naming_the_path_and_the_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a journal\n")
    before = hashlib.sha256(notes.read_bytes()).hexdigest()
    code, out, err = run(capsys, str(notes))
    assert (code, out) == (2, "")
    assert str(notes) in err
    assert "file is not a database" in err
    assert hashlib.sha256(notes.read_bytes()).hexdigest() == before


def test_inspect_with_an_unknown_state_exits_2_listing_the_allowed_states(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, str(path), "--state", "DONE")
    assert (code, out) == (2, "")
    assert "unknown state 'DONE'; allowed: CREATED, VALIDATED, PROCESSING, COMPLETED, FAILED, CANCELLED" in err


@pytest.mark.parametrize("argv", [["--limit", "-1"], ["--limit", "many"], ["--state", "FAILED", "--task", "x"], []])
def test_inspect_with_bad_arguments_exits_2_with_usage(
    journal: Journal, path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *([str(path)] if argv else []), *argv)
    assert (code, out) == (2, "")
    assert err.startswith("usage: actorflow inspect")


def test_inspect_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "Read-only" in out


def test_inspect_escapes_control_characters_and_lone_surrogates_from_task_data(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Journal(path) as journal:
        write_path(
            journal,
            created("evil\x1b[2J", payload={"name": "caf\x1b[2J"}),
            [(S.FAILED, {"error": "bad\tinput \x07 caf\udce9"})],
        )
    code, out, _ = run(capsys, str(path))
    assert code == 0
    assert "\x1b" not in out
    assert "task evil\\x1b[2J  FAILED" in out
    assert '{"name": "caf\\u001b[2J"}' in out
    assert "error    bad\\tinput \\x07 caf\\udce9" in out
