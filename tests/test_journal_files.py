"""The journal's files: one owner per database file, whatever path reaches it, and owner-only permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.core import JournalError, RuntimeConfig, TaskState
from actorflow.core.journal import Journal, ownership

S = TaskState
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.db"


@pytest.fixture(params=["ofd", "sidecar"])
def locking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each ownership test runs with the lock on the database file itself (Linux), and with the fallback
    that systems without open-file-description locks use: a sidecar named after the resolved path."""
    if request.param == "ofd" and not ownership._OFD_LOCKS:
        pytest.skip("no open-file-description locks here")
    if request.param == "sidecar":
        monkeypatch.setattr(ownership, "_OFD_LOCKS", False)
    return str(request.param)


def _fill(path: Path) -> None:
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        for index in range(3):
            runtime.submit({"name": f"task-{index}", "data": {"i": index}}, task_id=f"t-{index}").result(timeout=10)


# --- one owner per file ---------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_second_journal_through_a_symlink_or_a_hard_link_to_an_open_journal_is_refused(
    path: Path, link: str, locking: str
) -> None:
    if link == "hard link" and locking == "sidecar":
        pytest.skip("the sidecar fallback is named after the resolved path: a hard link has another")
    other = path.with_name("other-name.db")
    with Journal(path) as owner:
        if link == "symlink":
            other.symlink_to(path)
        else:
            os.link(path, other)
        with pytest.raises(JournalError, match=r"other-name\.db.* is in use by another runtime"):
            Journal(other)
        with pytest.raises(JournalError, match="in use by another runtime"):
            Runtime(RuntimeConfig(journal_path=str(other)))
        owner.write_batch([], [])  # the owner is untouched by the refused openers
    with Journal(other) as again:  # once the owner is gone, any path to the file may own it
        assert again.records() == []


_OWNER = """
import sys
from actorflow.core.journal import Journal
with Journal(sys.argv[1]):
    print("open", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.timeout(30)
def test_a_journal_owned_by_another_process_is_refused_through_a_hard_link(path: Path) -> None:
    Journal(path).close()
    other = path.with_name("linked.db")
    os.link(path, other)
    child = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "open", child.stderr
        with pytest.raises(JournalError, match="in use by another runtime"):
            Journal(other)
    finally:
        child.communicate(input="\n", timeout=10)
    assert child.returncode == 0
    Journal(other).close()


def test_a_reader_reads_while_a_runtime_writes_and_a_clean_close_leaves_only_the_database(
    path: Path, locking: str
) -> None:
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        runtime.submit({"name": "one", "data": 1}, task_id="one").result(timeout=10)
        with Journal.open_readonly(path) as reader:
            assert reader.contains("one")
            runtime.submit({"name": "two", "data": 2}, task_id="two").result(timeout=10)
            assert reader.contains("two")
    expected = ["tasks.db"] if locking == "ofd" else ["tasks.db", "tasks.db.lock"]
    assert sorted(os.listdir(path.parent)) == expected
    with Journal.open_readonly(path) as reader:  # quiet: no runtime owns the file
        assert reader.contains("two")
        with pytest.raises(JournalError, match="in use"):
            Journal(path)
    assert sorted(os.listdir(path.parent)) == expected


_EXCLUSIVE = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
try:
    connection.execute("PRAGMA locking_mode=EXCLUSIVE")
    connection.execute("BEGIN EXCLUSIVE")
    print("exclusive")
except sqlite3.OperationalError as exc:
    print(exc)
"""


def _another_process_gets_the_database_exclusively(path: Path) -> bool:
    command = [sys.executable, "-c", _EXCLUSIVE, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "exclusive"


@pytest.mark.timeout(60)
def test_a_journal_closed_in_this_process_leaves_sqlites_locks_of_a_reader_of_the_same_file_in_place(
    path: Path,
) -> None:
    """Closing any descriptor of a file drops every POSIX lock this process holds on it, SQLite's included
    (a reader's SHARED lock, which tells other processes the WAL is in use): the journal's own descriptor
    of the database is closed only once no reader of ours on the file is open here."""
    _fill(path)
    journal = Journal(path)
    reader = Journal.open_readonly(path)
    try:
        assert reader.contains("t-0")
        journal.close()
        assert not _another_process_gets_the_database_exclusively(path), "the reader's lock was dropped"
        assert reader.contains("t-1")
    finally:
        reader.close()
    assert _another_process_gets_the_database_exclusively(path)
    Journal(path).close()


def test_a_sidecar_lock_that_is_a_symlink_is_never_followed(path: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(ownership, "_OFD_LOCKS", False)
    target = tmp_path / "elsewhere"
    (tmp_path / "tasks.db.lock").symlink_to(target)
    with pytest.raises(JournalError, match=r"lock file .*tasks\.db\.lock.* is a symbolic link"):
        Journal(path)
    assert not target.exists()


# --- permissions ----------------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[Any]:
    previous = os.umask(0o022)

    def set_umask(value: int) -> None:
        os.umask(value)

    try:
        yield set_umask
    finally:
        os.umask(previous)


def _modes(path: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir() if p.name.startswith(path.name)}


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o177])
def test_the_database_wal_and_shm_are_created_owner_only_whatever_the_umask(
    path: Path, umask: Any, mask: int, locking: str
) -> None:
    umask(mask)
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        runtime.submit({"name": "x", "data": 1}).result(timeout=10)
        modes = _modes(path)
    expected = {"tasks.db", "tasks.db-wal", "tasks.db-shm"} | ({"tasks.db.lock"} if locking == "sidecar" else set())
    assert set(modes) == expected
    assert modes == dict.fromkeys(expected, 0o600)


def test_an_existing_journal_keeps_its_mode(path: Path, umask: Any) -> None:
    Journal(path).close()
    path.chmod(0o640)
    with Journal(path) as journal:
        journal.write_batch([], [])
        assert _modes(path)["tasks.db"] == 0o640
        assert _modes(path)["tasks.db-wal"] == 0o640  # SQLite gives its files the database's mode
