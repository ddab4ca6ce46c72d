"""The SQLite journal: every task's current state and its append-only transition log.

One `Journal` owns a database file for writing; any number of `JournalReader`s
(`Journal.open_readonly`) may read it at the same time, from this process or
another, because the file is kept in WAL mode.

The schema (version `SCHEMA_VERSION`, kept in ``PRAGMA user_version``; the
file is marked as ours by ``PRAGMA application_id``)::

    tasks        one row per task: its pipeline, current state, payload, result,
                 the value its current stage was given, error, trace id, calls,
                 retries and times; ``id`` keeps insertion order. States and
                 pipeline names are plain text: pipelines are data, so no CHECK
                 pins a set of states (schema 1 did; it is migrated on open)
    transitions  the append-only log, primary key (task_id, seq), where seq is
                 the transition's index in the record's history, so that a
                 transition cannot be written twice; triggers refuse UPDATE
                 and DELETE
    idempotency_keys  the HTTP API's Idempotency-Keys: key, the task it created,
                 the payload's fingerprint, and when; written in the same
                 transaction as the task's creation (`Journal.stage_key`), kept
                 `KEY_RETENTION_S` and at most `MAX_KEYS` (additive: created
                 with IF NOT EXISTS in any journal opened for writing)

Durability. `Journal.write_batch` is one transaction: when it returns, the batch
is committed, and nothing of a failed batch is visible. WAL with
``synchronous=NORMAL`` ("normal") keeps every committed batch across a crash of
the process, but a power loss or OS crash may lose the last batches (never
corrupting the file); ``synchronous=FULL`` ("full") fsyncs the WAL on every
commit, so committed batches also survive power loss.

Ownership. Two runtimes writing one journal would interleave two views of the
same tasks, so a `Journal` owns its database *file* (not a path to it) for its
whole life. On Linux it holds an open-file-description (OFD) lock on one byte of
the database itself, far above the bytes SQLite locks (at 1 GiB): a symlink or a
hard link reaches the same file and is refused too; the lock conflicts between
processes and within one; and unlike SQLite's POSIX locks, it is not dropped
when some other descriptor of the file is closed. Nothing is left on disk by a
clean `close`. Where OFD locks are missing, a flock on a sidecar named after the
resolved path, ``<realpath>.lock``, opened with O_NOFOLLOW (a symlink there is
refused) and left in place when the journal closes.

The reverse matters too: closing *any* descriptor of the database drops every
POSIX lock this process holds on it, SQLite's own included. So the descriptors
this module opens on a database (the lock's, a header's) are closed only once no
SQLite connection of ours to the same file is open, and reused meanwhile
(`_OpenFiles`).

Permissions. A journal's files hold payloads and results: a missing database is
created owner-only (0o600, less the umask) before SQLite opens it, and SQLite
gives its ``-wal`` and ``-shm`` files the database's mode. An existing file keeps
its mode.

Refusals. `write_batch` raises `UnstorableValue` (a `JournalError`) when the batch
holds a change no retry can store: a value the encoder cannot encode or a JSON
column over SQLite's length limit (both found in Python, before SQLite is asked,
and named with their task), or what SQLite refuses for the data it is given (a
row too big, a broken constraint); `check_batch` runs a batch and rolls it back,
so that the state actor can find the task at fault by halving. Every other
SQLite error (I/O, full disk, locks) is a `JournalError` that may pass.

Reading. A row is checked as it is decoded: a column that does not hold what the
schema says (text that is not JSON, JSON nested deeper than `MAX_DEPTH`, a state
that is no state name, a NULL or a text where a number belongs, ...) raises
`JournalError` naming the task and the column, never a raw decoding error.

Bad files are never repaired or replaced: a file that is not SQLite, carries a
newer schema, belongs to another application, is locked, or is owned by a
running journal raises `JournalError` naming the path and the fault, and the
database file is left byte-for-byte as it was (it is first examined through a
read-only connection, which can neither write pages nor checkpoint on close).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, NoReturn, Self

from actorflow.core.config import TERMINAL_STATES
from actorflow.core.errors import JournalError, UnstorableValue
from actorflow.core.failures import bound_message
from actorflow.core.types import (
    _STATE_NAME,
    DEFAULT_PIPELINE,
    MAX_DEPTH,
    FrozenDict,
    TaskRecord,
    TaskState,
    Transition,
    _frozen_dict,
    encode_json,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "Durability", "Journal", "JournalReader"]

SCHEMA_VERSION: Final[int] = 2
"""The schema this code writes. A journal with a higher ``user_version`` is refused, never downgraded;
one with schema 1 is migrated in place (in one transaction) when it is opened for writing."""

APPLICATION_ID: Final[int] = 0x41464A31
"""``PRAGMA application_id`` of an actorflow journal ("AFJ1"), so a foreign SQLite file is never mistaken for one."""

Durability = Literal["normal", "full"]

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_HEADER_SIZE: Final = 100
_SYNCHRONOUS: Final[dict[str, str]] = {"normal": "NORMAL", "full": "FULL"}
_WAL_SIZE_LIMIT: Final = 32 * 1024 * 1024
"""A checkpoint truncates a WAL grown past this back to it, so one huge batch does not keep a huge file."""


_TERMINAL_SQL: Final = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))

_TASKS_TABLE: Final = """CREATE TABLE tasks (
        id         INTEGER PRIMARY KEY,
        task_id    TEXT    NOT NULL UNIQUE,
        pipeline   TEXT    NOT NULL,
        state      TEXT    NOT NULL,
        payload    TEXT    NOT NULL,
        result     TEXT,
        value      TEXT,
        error      TEXT,
        trace_id   TEXT    NOT NULL,
        span_id    TEXT    NOT NULL,
        parent_span_id TEXT,
        calls      INTEGER NOT NULL,
        retries    INTEGER NOT NULL,
        created_at REAL    NOT NULL,
        updated_at REAL    NOT NULL
    )"""
_TRANSITIONS_TABLE: Final = """CREATE TABLE transitions (
        task_id    TEXT    NOT NULL,
        seq        INTEGER NOT NULL CHECK (seq >= 0),
        from_state TEXT,
        to_state   TEXT    NOT NULL,
        at         REAL    NOT NULL,
        reason     TEXT,
        PRIMARY KEY (task_id, seq)
    ) WITHOUT ROWID"""
_INDEXES_AND_TRIGGERS: Final[tuple[str, ...]] = (
    "CREATE INDEX tasks_by_state ON tasks (state, created_at)",
    "CREATE INDEX tasks_by_creation ON tasks (created_at)",
    """CREATE TRIGGER transitions_refuse_update BEFORE UPDATE ON transitions
    BEGIN SELECT RAISE(ABORT, 'the transitions log is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER transitions_refuse_delete BEFORE DELETE ON transitions
    BEGIN SELECT RAISE(ABORT, 'the transitions log is append-only: DELETE refused'); END""",
)
_SCHEMA: Final[tuple[str, ...]] = (
    _TASKS_TABLE,
    _TRANSITIONS_TABLE,
    *_INDEXES_AND_TRIGGERS,
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
"""Run statement by statement inside one transaction (``executescript`` would commit first)."""


def _migrate_from_1(connection: sqlite3.Connection) -> list[str]:
    """The statements taking schema 1 (the first release: states pinned by CHECK, one pipeline) to 2.

    Run in the open transaction. SQLite cannot drop a CHECK constraint, so both tables are
    rebuilt without them; DROP TABLE's implicit delete fires no trigger, so the append-only log's
    triggers do not refuse it. Columns added to schema 1 later (`_ADDED_COLUMNS`) are carried over.
    """
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    added = [(column, kind) for column, kind in _ADDED_COLUMNS if column in present]
    table = _TASKS_TABLE.replace("CREATE TABLE tasks", "CREATE TABLE tasks_v2")
    if added:
        table = table.rstrip()[:-1].rstrip() + "".join(f",\n        {c} {k}" for c, k in added) + "\n    )"
    extra = "".join(f", {column}" for column, _ in added)
    return [
        table,
        f"""INSERT INTO tasks_v2 (id, task_id, pipeline, state, payload, result, value, error, trace_id, span_id,
            parent_span_id, calls, retries, created_at, updated_at{extra})
        SELECT id, task_id, '{DEFAULT_PIPELINE}', state, payload, result, NULL, error, trace_id, span_id,
            parent_span_id, attempts, 0, created_at, updated_at{extra} FROM tasks""",
        "DROP TABLE tasks",
        "ALTER TABLE tasks_v2 RENAME TO tasks",
        _TRANSITIONS_TABLE.replace("CREATE TABLE transitions", "CREATE TABLE transitions_v2"),
        "INSERT INTO transitions_v2 SELECT task_id, seq, from_state, to_state, at, reason FROM transitions",
        "DROP TABLE transitions",
        "ALTER TABLE transitions_v2 RENAME TO transitions",
        *_INDEXES_AND_TRIGGERS,
        f"PRAGMA user_version = {SCHEMA_VERSION}",
    ]


_TABLES: Final = frozenset({"tasks", "transitions"})

KEY_RETENTION_S: Final = 24 * 3600.0
"""An Idempotency-Key is remembered this long after the task it created (wall-clock time, across restarts)."""
MAX_KEYS: Final = 100_000
"""At most this many Idempotency-Keys are kept; the oldest are forgotten first."""
_KEY_PRUNE_EVERY: Final = 1024
"""Keys written between two prunings of the table to `MAX_KEYS` (a pruning scans the keys' index)."""

_KEYS_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key         TEXT NOT NULL PRIMARY KEY,
        task_id     TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        created_at  REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_by_age ON idempotency_keys (created_at)",
)
"""Additive to schema version 1: an older journal gains the table when next opened for writing."""
_INSERT_KEY: Final = (
    "INSERT OR REPLACE INTO idempotency_keys (key, task_id, fingerprint, created_at) VALUES (?, ?, ?, ?)"
)

_INSERT_TASK: Final = (
    "INSERT INTO tasks (task_id, pipeline, state, payload, result, value, error, trace_id, span_id, parent_span_id,"
    " calls, retries, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_TRANSITION: Final = (
    "INSERT INTO transitions (task_id, seq, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?, ?)"
)
_UPDATE_TASK: Final = (
    "UPDATE tasks SET state = ?, result = ?, value = ?, error = ?, calls = ?, retries = ?, updated_at = ?,"
    " traceback = ? WHERE task_id = ?"
)

_TASK_COLUMNS: Final = (
    "task_id, pipeline, state, payload, result, value, error, trace_id, span_id, parent_span_id, calls, retries,"
    " created_at, updated_at"
)
_TASK_COLUMNS_V1: Final = (
    f"task_id, '{DEFAULT_PIPELINE}', state, payload, result, NULL, error, trace_id, span_id, parent_span_id,"
    " attempts, 0, created_at, updated_at"
)
"""The same columns read from a schema-1 journal (a reader never migrates)."""
_ADDED_COLUMNS: Final[tuple[tuple[str, str], ...]] = (("traceback", "TEXT"),)
"""Nullable columns added to `tasks` after schema version 1 was fixed, by ``ALTER TABLE ... ADD COLUMN``
when a writer opens the journal (additive: older actorflow versions read such a journal unchanged)."""
_LOG_COLUMNS: Final = "task_id, seq, from_state, to_state, at, reason"
_ORDER: Final = "ORDER BY created_at, id"
_ORDER_NEWEST_FIRST: Final = "ORDER BY created_at DESC, id DESC"

# The canonical encoder: what `freeze` accepts is exactly what it can encode.
_encode_json = encode_json

_REFUSED_FOR_GOOD: Final = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
"""What SQLite raises for the data it is given (a string or row too big, a broken constraint, a value it cannot
bind), as opposed to the state of the file or the system (OperationalError: I/O, full disk, locks): retrying
the same batch cannot help."""

_TaskRow = tuple[str, str, str, str, str | None, str | None, str | None, str, str, str | None, int, int, float, float]
_LogRow = tuple[str, int, str | None, str, float, str | None]


class JournalReader:
    """Read-only access to a journal, safe while a runtime is writing it.

    Opened with ``mode=ro``: it never creates, writes or checkpoints the file.
    Each call reads one consistent snapshot. Thread-safe; use as a context
    manager or call `close`.

    It also leaves no file behind. A ``mode=ro`` connection to a WAL database
    creates ``-wal`` and ``-shm`` files that only a writer may delete. So when
    no runtime owns the journal (its ownership lock can be taken shared) and no
    WAL is left over, the reader holds that shared lock while it is open, which
    keeps any runtime from writing, and reads the file as immutable, which
    creates nothing. Otherwise the files it would create exist already.
    """

    path: str
    """The database file, as given."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 2.0) -> None:
        """Open `path` for reading.

        Raises:
            JournalError: the file is missing, is not SQLite, is not an actorflow
                journal, has a newer schema, or stays locked beyond `busy_timeout_s`.
        """
        self.path = os.fspath(path)
        _check_timeout(busy_timeout_s)
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        if _read_header(self.path) is None:
            raise JournalError(f"journal {self.path!r} cannot be read: no such file")
        self._quiet = _hold_quiet(self.path)
        self._file = _file_id(self.path)
        """The database file our connection reads (see `_OpenFiles`)."""
        _FILES.connected(self._file)
        try:
            connection = _connect_readonly(self.path, busy_timeout_s, immutable=self._quiet is not None)
            try:
                version = _classify(connection, self.path, busy_timeout_s)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            self._let_go()
            raise
        if version is None:
            connection.close()
            self._let_go()
            raise JournalError(f"journal {self.path!r} cannot be read: it is an empty database, not yet a journal")
        self._version = version
        self._connection = connection
        self._columns = _task_columns(connection, version)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord | None:
        """The record of `task_id`, history included, exactly as it was written; None if unknown."""
        with self._snapshot("get") as connection:
            row = connection.execute(f"SELECT {self._columns} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            log = connection.execute(
                f"SELECT {_LOG_COLUMNS} FROM transitions WHERE task_id = ? ORDER BY seq", (task_id,)
            ).fetchall()
        return _record_from_row(row, tuple(_transition_from_row(entry, self.path) for entry in log), self.path)

    def contains(self, task_id: str) -> bool:
        """True if the journal has a task with this id."""
        with self._snapshot("contains") as connection:
            return connection.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is not None

    def records(
        self,
        *,
        state: TaskState | None = None,
        terminal: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[TaskRecord]:
        """Records ordered by `created_at`, then insertion order.

        Args:
            state: only tasks in this state.
            terminal: True for only terminal tasks, False for only live ones, None for both.
            limit: at most this many records (None for all).
            offset: skip this many matching records first.
            newest_first: the reverse order (latest `created_at` first), so that
                ``limit=N`` gives the N newest without an OFFSET scan.
        """
        where, params = _filter(state, terminal)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        page = f"{where} {_ORDER_NEWEST_FIRST if newest_first else _ORDER} LIMIT ? OFFSET ?"
        return self._read_page("records", page, (*params, -1 if limit is None else limit, offset))

    def iter_records(self, *, terminal: bool | None = None, batch: int = 1000) -> Iterator[TaskRecord]:
        """Every (matching) record in `records` order, read `batch` records per query.

        Memory stays bounded by `batch`, and no lock or read transaction is held
        between batches, so the caller may write to the journal while iterating
        (the writes may or may not be seen, but each record is whole).
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        where, params = _filter(None, terminal)
        keyset = f"{where} {'AND' if where else 'WHERE'} (created_at, id) > (?, ?)"
        cursor: tuple[float, int] | None = None
        while True:
            if cursor is None:
                page = self._read_page("iter_records", f"{where} {_ORDER} LIMIT ?", (*params, batch), keep_ids=True)
            else:
                page = self._read_page(
                    "iter_records", f"{keyset} {_ORDER} LIMIT ?", (*params, *cursor, batch), keep_ids=True
                )
            for _, record in page:
                yield record
            if len(page) < batch:
                return
            last_id, last = page[-1]
            cursor = (last.created_at, last_id)

    def find_key(self, key: str) -> tuple[str, str] | None:
        """The task an Idempotency-Key created and its payload's fingerprint; None if unknown or expired."""
        try:
            with self._snapshot("find_key") as connection:
                row = connection.execute(
                    "SELECT task_id, fingerprint FROM idempotency_keys WHERE key = ? AND created_at >= ?",
                    (key, time.time() - KEY_RETENTION_S),
                ).fetchone()
        except JournalError as exc:
            if "no such table" in str(exc):  # a journal no writer has opened since keys were added
                return None
            raise
        return None if row is None else (row[0], row[1])

    def counts(self) -> dict[str, int]:
        """Tasks per state name, every state present (0 when none).

        Raises:
            JournalError: a task's state is not a state name (the journal is damaged); the message names it.
        """
        with self._snapshot("counts") as connection:
            rows = connection.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()
            bad = [name for name, _ in rows if not (type(name) is str and _STATE_NAME.fullmatch(name))]
            if bad:
                (task_id,) = connection.execute("SELECT task_id FROM tasks WHERE state IS ?", bad[:1]).fetchone()
                raise _damaged(self.path, task_id, "state", bad[0], "a task state name")
        counts = dict.fromkeys((state.value for state in TaskState), 0)
        counts.update(rows)
        return counts

    def states(self) -> list[str]:
        """Every state name the journal knows: the seed's, then any other a task ever reached (sorted)."""
        with self._snapshot("states") as connection:
            rows = connection.execute("SELECT DISTINCT to_state FROM transitions").fetchall()
            bad = [name for (name,) in rows if not (type(name) is str and _STATE_NAME.fullmatch(name))]
            if bad:
                (task_id,) = connection.execute(
                    "SELECT task_id FROM transitions WHERE to_state IS ?", bad[:1]
                ).fetchone()
                raise _damaged(self.path, task_id, "to_state", bad[0], "a task state name")
        seed = [state.value for state in TaskState]
        return seed + sorted({name for (name,) in rows} - set(seed))

    def pipelines(self) -> dict[str, int]:
        """Tasks per pipeline name."""
        column = f"'{DEFAULT_PIPELINE}'" if self._version == 1 else "pipeline"
        with self._snapshot("pipelines") as connection:
            rows = connection.execute(f"SELECT {column}, COUNT(*) FROM tasks GROUP BY 1 ORDER BY 1").fetchall()
        return dict(rows)

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()
                self._let_go()

    def _let_go(self) -> None:
        """After our connection is closed: untrack it, then release the quiet lock (in that order, see `_OpenFiles`)."""
        file, self._file = self._file, None
        _FILES.disconnected(file)
        quiet, self._quiet = self._quiet, None
        if quiet is not None:
            quiet.release()

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        return self._connection is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}{', closed' if self.closed else ''})"

    # --- internals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _snapshot(self, operation: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one read transaction, so that multi-query reads see one state."""
        with self._lock:
            connection = self._require_open()
            try:
                connection.execute("BEGIN")
                try:
                    yield connection
                finally:
                    if connection.in_transaction:
                        connection.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(
                    f"journal {self.path!r}: {operation} failed: {_fault(exc, self._busy_timeout_s)}"
                ) from exc

    def _read_page(self, operation: str, page: str, params: tuple[Any, ...], *, keep_ids: bool = False) -> list[Any]:
        """Records of one page query (a WHERE/ORDER/LIMIT tail), with their histories, in page order."""
        with self._snapshot(operation) as connection:
            rows = connection.execute(f"SELECT id, {self._columns} FROM tasks {page}", params).fetchall()
            if not rows:
                return []
            histories: dict[str, list[Transition]] = {}
            # The same page query again, as a subquery, in the same snapshot: no id list to bind.
            for entry in connection.execute(
                f"SELECT {_LOG_COLUMNS} FROM transitions WHERE task_id IN (SELECT task_id FROM tasks {page})"
                " ORDER BY task_id, seq",
                params,
            ):
                histories.setdefault(entry[0], []).append(_transition_from_row(entry, self.path))
        records = [(row[0], _record_from_row(row[1:], tuple(histories.get(row[1], ())), self.path)) for row in rows]
        return records if keep_ids else [record for _, record in records]

    def _require_open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise JournalError(f"journal {self.path!r} is closed")
        return self._connection


class Journal(JournalReader):
    """The writable journal of one runtime: group-committed task records and transitions.

    Owns the file for writing: a second `Journal` on the same path, in this or
    another process, raises `JournalError` until this one is closed. All
    methods are thread-safe (one internal lock); the state actor is expected to
    be the only caller on the hot path.
    """

    durability: Durability
    """"normal" (WAL, synchronous=NORMAL) or "full" (WAL, synchronous=FULL)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "normal",
        busy_timeout_s: float = 2.0,
        pipelines: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Open `path` for writing, creating the file and the schema if absent.

        A schema-1 journal (the first release's) is migrated in place, in one
        transaction: its tasks belong to the seed pipeline, ``"default"``.

        Args:
            path: the SQLite file.
            durability: "normal" survives process crashes, "full" also power loss.
            busy_timeout_s: how long to wait for a lock another connection holds.
            pipelines: the names of the pipelines the runtime defines; a journal
                holding unfinished tasks of any other pipeline is refused. Given as a
                mapping of each name to its states, an unfinished task in a state
                its pipeline no longer has (a stage renamed since) is refused too.
                None skips the check.

        Raises:
            JournalError: the file is not SQLite, is another application's
                database, has a newer schema, is in use by another runtime, is
                locked beyond `busy_timeout_s`, cannot be created, or holds
                unfinished tasks of a pipeline (or a state) not in `pipelines`. The file is
                left untouched.
            ValueError: `durability` or `busy_timeout_s` is not allowed.
        """
        if durability not in _SYNCHRONOUS:
            raise ValueError(f"durability must be 'normal' or 'full', got {durability!r}")
        _check_timeout(busy_timeout_s)
        self.path = os.fspath(path)
        self.durability = durability
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._connection = None
        self._owner: _Ownership | None = None
        self._quiet = None
        self._file = None
        self._version = SCHEMA_VERSION
        self._staged_keys: dict[str, tuple[str, str]] = {}
        self._keys_since_prune = 0

        header = _read_header(self.path)  # refuses a non-SQLite file before SQLite ever opens it
        owner = _Ownership.acquire(self.path)  # creates a missing file, owner-only, before SQLite does
        file = owner.file
        try:
            if header:  # an existing, non-empty file: judge it through a connection that cannot write
                _FILES.connected(file)
                try:
                    probe = _connect_readonly(self.path, busy_timeout_s)
                    try:
                        _classify(probe, self.path, busy_timeout_s)
                    finally:
                        probe.close()
                finally:
                    _FILES.disconnected(file)
            known: dict[str, frozenset[str] | None] | None = None
            if isinstance(pipelines, Mapping):
                known = {name: frozenset(states) for name, states in pipelines.items()}
            elif pipelines is not None:
                known = dict.fromkeys(pipelines)
            _FILES.connected(file)
            try:
                self._connection = _open_for_writing(self.path, durability, busy_timeout_s, known)
            except BaseException:
                _FILES.disconnected(file)
                raise
        except BaseException:
            owner.release()
            raise
        self._owner = owner
        self._file = file
        self._columns = _task_columns(self._connection, SCHEMA_VERSION)
        self.lost: str | None = None
        """Why the files this journal owns are gone (deleted or replaced while open); None while they are not."""

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], *, busy_timeout_s: float = 2.0) -> JournalReader:
        """A `JournalReader` on `path`: for inspection, also while a runtime writes it."""
        return JournalReader(path, busy_timeout_s=busy_timeout_s)

    def stage_key(self, key: str, task_id: str, fingerprint: str) -> None:
        """Write Idempotency-Key `key` in the same transaction as task `task_id`'s creation.

        Call it before submitting the task; `unstage_key` if the submission is refused.
        A retry after a crash then finds the key (`find_key`) if and only if the task exists.
        """
        with self._lock:
            self._staged_keys[task_id] = (key, fingerprint)

    def unstage_key(self, task_id: str) -> None:
        """Forget a key staged for a task that will not be created. No error if none is staged."""
        with self._lock:
            self._staged_keys.pop(task_id, None)

    def write_batch(self, created: Sequence[TaskRecord], changed: Sequence[tuple[TaskRecord, Transition]]) -> None:
        """Commit new tasks and accepted transitions in one transaction.

        For each record in `created`: its row, and its whole `history` (usually
        the single creation entry) into the log. Then for each
        ``(record_after, transition)`` in `changed`, in order: the transition
        into the log at its index in ``record_after.history``, and the task's
        row set from ``record_after``. A task may be created and changed in the
        same batch; pass it to `created` as it was when created.

        Raises:
            UnstorableValue: the batch holds a change no retry can store: a value
                that cannot be encoded as JSON or is over SQLite's length limit
                (both named with their task, `UnstorableValue.task_id`), a row SQLite
                refuses as too big, a constraint it breaks (a transition already
                logged, a task created twice, a changed task that was never created),
                a text that is not valid UTF-8. Nothing of the batch was written.
            JournalError: SQLite refused the batch for a reason that may pass (I/O
                error, full disk, lock held beyond the busy timeout, ...). Nothing
                of the batch was written, and the journal can be used again (e.g. to retry).
            ValueError: a transition is not in its record's history.
        """
        self._write(created, changed, commit=True)

    def check_batch(self, created: Sequence[TaskRecord], changed: Sequence[tuple[TaskRecord, Transition]]) -> None:
        """Whether `write_batch` would take this batch: the same statements, rolled back instead of committed.

        Raises what `write_batch` raises; writes nothing either way. The state actor uses it to find,
        by halving a batch, the task whose change the journal refuses for good.
        """
        self._write(created, changed, commit=False)

    def _write(
        self, created: Sequence[TaskRecord], changed: Sequence[tuple[TaskRecord, Transition]], *, commit: bool
    ) -> None:
        if not created and not changed:
            return
        with self._lock:
            limit = self._require_open().getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        # Everything that can fail in Python runs before the transaction opens, and names its task.
        tasks: list[_TaskRow] = [
            (
                record.task_id,
                record.pipeline,
                record.state.value,
                self._json_text(record, "payload", record.payload, limit),
                self._json_column(record, "result", record.result, limit),
                self._json_column(record, "value", record.value, limit),
                _storable(record.error),
                record.trace_id,
                record.span_id,
                record.parent_span_id,
                record.calls,
                record.retries,
                record.created_at,
                record.updated_at,
            )
            for record in created
        ]
        log: list[_LogRow] = [
            _log_row(record.task_id, seq, entry) for record in created for seq, entry in enumerate(record.history)
        ]
        latest: dict[str, TaskRecord] = {}
        for record, transition in changed:
            log.append(_log_row(record.task_id, _index_in_history(record, transition), transition))
            latest[record.task_id] = record  # several changes of one task in a batch: its last record wins
        updates = [
            (
                record.state.value,
                self._json_column(record, "result", record.result, limit),
                self._json_column(record, "value", record.value, limit),
                _storable(record.error),
                record.calls,
                record.retries,
                record.updated_at,
                _storable(record.traceback),
                task_id,
            )
            for task_id, record in latest.items()
        ]

        with self._lock:
            connection = self._require_open()
            self._check_identity()
            keys = [
                (*staged, record.task_id, record.created_at)
                for record in created
                if (staged := self._staged_keys.get(record.task_id)) is not None
            ]
            try:
                connection.execute("BEGIN IMMEDIATE")
                if tasks:
                    connection.executemany(_INSERT_TASK, tasks)
                if keys:
                    self._write_keys(connection, keys)
                if log:
                    connection.executemany(_INSERT_TRANSITION, log)
                # executemany sums rowcount: fewer rows than updates means a changed task has no row
                if updates and connection.executemany(_UPDATE_TASK, updates).rowcount != len(updates):
                    unknown = self._unknown(connection, latest)
                    raise UnstorableValue(
                        f"journal {self.path!r}: batch rolled back: changed task(s) {unknown!r} were never "
                        "created in the journal",
                        task_id=unknown[0] if unknown else None,
                        fault="the task has no row in the journal (was it deleted behind the runtime's back?)",
                    )
                if not commit:
                    connection.execute("ROLLBACK")
                    return
                connection.execute("COMMIT")
                for _, _, task_id, _ in keys:
                    del self._staged_keys[task_id]
            except _REFUSED_FOR_GOOD as exc:
                _rollback(connection)
                raise UnstorableValue(
                    f"journal {self.path!r}: batch of {len(tasks)} new task(s) and {len(log)} transition(s) "
                    f"rolled back: {exc}; the same batch would be refused again",
                    fault=str(exc),
                ) from exc
            except sqlite3.Error as exc:
                _rollback(connection)
                raise JournalError(
                    f"journal {self.path!r}: batch of {len(tasks)} new task(s) and {len(log)} transition(s) "
                    f"rolled back: {_fault(exc, self._busy_timeout_s)}"
                ) from exc
            except UnicodeEncodeError as exc:
                _rollback(connection)
                raise UnstorableValue(
                    f"journal {self.path!r}: batch rolled back: a task id or trace id is not valid UTF-8 text: {exc}",
                    fault=f"a task id or trace id is not valid UTF-8 text: {exc}",
                ) from exc
            except BaseException:
                _rollback(connection)
                raise

    def _json_column(self, record: TaskRecord, column: str, value: Any, limit: int) -> str | None:
        """`_json_text` of a nullable column."""
        return None if value is None else self._json_text(record, column, value, limit)

    def _json_text(self, record: TaskRecord, column: str, value: Any, limit: int) -> str:
        """`value` as the JSON text its column stores; UnstorableValue naming the task if it cannot be stored.

        Refused: a value that cannot be encoded (only one that bypassed `freeze`, which refuses those),
        and a text longer than SQLite's length limit (`limit`; the text is ASCII, so its length is its
        size), which SQLite would refuse with the whole batch. (A row whose columns are each within the
        limit but too long together is refused by SQLite: the state actor splits the batch.)
        """
        try:
            text = _encode_json(value)
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:
            fault = f"column {column!r} cannot be encoded as JSON: {type(exc).__name__}: {bound_message(str(exc))}"
            raise UnstorableValue(
                f"journal {self.path!r}: task {record.task_id!r}: {fault}; nothing of the batch was written",
                task_id=record.task_id,
                fault=fault,
            ) from None
        if len(text) > limit:
            fault = f"column {column!r} is {len(text)} bytes as JSON, over SQLite's limit of {limit} bytes per value"
            raise UnstorableValue(
                f"journal {self.path!r}: task {record.task_id!r}: {fault}; nothing of the batch was written",
                task_id=record.task_id,
                fault=fault,
            )
        return text

    def _write_keys(self, connection: sqlite3.Connection, keys: list[tuple[str, str, str, float]]) -> None:
        connection.executemany(_INSERT_KEY, [(key, task_id, fp, at) for key, fp, task_id, at in keys])
        connection.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (time.time() - KEY_RETENTION_S,))
        self._keys_since_prune += len(keys)
        if self._keys_since_prune >= _KEY_PRUNE_EVERY:
            self._keys_since_prune = 0
            connection.execute(
                "DELETE FROM idempotency_keys WHERE key IN "
                "(SELECT key FROM idempotency_keys ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (MAX_KEYS,),
            )

    def _check_identity(self) -> None:
        """Refuse to commit into a file that is no longer the one on disk (two stats per batch).

        SQLite keeps writing happily into a database file that was deleted or
        replaced (the open inode lives on), and a deleted sidecar lock file (the
        fallback where the database itself cannot be locked) lets a second
        runtime take the same path: either way, what is acknowledged would be
        lost. Checked on every commit, and sticky (`lost`).
        """
        if self.lost is None and self._owner is not None:
            try:
                found = os.stat(self.path)
            except OSError as exc:
                self.lost = f"journal file {self.path!r} is gone ({exc.strerror}); it was deleted while in use"
            else:
                if (found.st_dev, found.st_ino) != self._owner.file:
                    self.lost = f"journal file {self.path!r} was replaced by another file while in use"
            if self.lost is None:
                self.lost = self._owner.check(self.path)
        if self.lost is not None:
            raise JournalError(f"{self.lost}; nothing more is committed (restart on an intact journal)")

    @staticmethod
    def _unknown(connection: sqlite3.Connection, task_ids: Iterable[str]) -> list[str]:
        """The first few of `task_ids` that have no row (only called on the error path)."""
        query = "SELECT 1 FROM tasks WHERE task_id = ?"
        return [task_id for task_id in task_ids if connection.execute(query, (task_id,)).fetchone() is None][:5]

    def close(self) -> None:
        """Checkpoint the WAL into the database, close it, then give up ownership. Idempotent."""
        with self._lock:
            connection, self._connection = self._connection, None
            owner, self._owner = self._owner, None
            try:
                if connection is not None:
                    # Best effort: a reader still open may keep part of the WAL; it is replayed on next open.
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                    connection.close()
                    self._let_go()
            finally:
                # Only after SQLite has let go of the file may another runtime take it over.
                if owner is not None:
                    owner.release()


# --- opening -------------------------------------------------------------------------------------


def _check_timeout(busy_timeout_s: float) -> None:
    if (
        isinstance(busy_timeout_s, bool)
        or not isinstance(busy_timeout_s, (int, float))
        or not math.isfinite(busy_timeout_s)
        or busy_timeout_s < 0
    ):
        raise ValueError(f"busy_timeout_s must be a finite number of seconds >= 0, got {busy_timeout_s!r}")


def _read_header(path: str) -> bytes | None:
    """The first 100 bytes of `path` (b"" for an empty file), None if it does not exist.

    Raises JournalError if the file cannot be read or does not start like SQLite.
    """
    try:
        handle = _FILES.open(path, writable=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"journal {path!r} cannot be read: {exc.strerror or exc}") from exc
    try:
        header = os.pread(handle.fd, _SQLITE_HEADER_SIZE, 0)
    except OSError as exc:
        raise JournalError(f"journal {path!r} cannot be read: {exc.strerror or exc}") from exc
    finally:
        _FILES.close(handle)
    if header and (len(header) < _SQLITE_HEADER_SIZE or not header.startswith(_SQLITE_MAGIC)):
        raise JournalError(
            f"journal {path!r} cannot be used: file is not a database (no SQLite header); "
            "it was left untouched: move it away or pass another path"
        )
    return header


# --- the files of one database, in this process ---------------------------------------------------

_FileId = tuple[int, int]
"""A file's identity: (st_dev, st_ino). Every path to it (a symlink, a hard link) has the same."""


class _Handle:
    """A descriptor of ours on a database file, and which file it is."""

    __slots__ = ("fd", "file", "writable")

    def __init__(self, fd: int, file: _FileId, writable: bool) -> None:
        self.fd = fd
        self.file = file
        self.writable = writable


class _OpenFiles:
    """Descriptors this process opened on journal databases, and the SQLite connections of ours to each.

    Closing *any* descriptor of a file drops every POSIX (fcntl) lock this process holds on that
    file, and SQLite keeps its own locks on the database that way: a reader's SHARED lock, which
    tells another process's connection, when it closes, that the WAL is still in use. So a
    descriptor of ours (the ownership lock's, or one that read a header) is closed only once no
    connection of ours to the same file is open; until then it is kept, and the next one needed
    reuses it, so that they never pile up. (SQLite does the same with its own descriptors.)
    Connections to the file made by other code in this process are out of our sight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[_FileId, int] = {}
        self._kept: dict[tuple[_FileId, bool], list[int]] = {}

    def open(self, path: str, *, writable: bool, create: bool = False) -> _Handle:
        """A descriptor on `path`: one kept for the same file if there is one, else a new one.

        `create` makes a missing file, owner-only (0o600 less the umask): SQLite gives the
        ``-wal`` and ``-shm`` files it makes the mode of the database. Raises OSError.
        """
        try:
            found = os.stat(path)
        except FileNotFoundError:
            if not create:
                raise
        else:
            with self._lock:
                kept = self._kept.get(((found.st_dev, found.st_ino), writable))
                if kept:
                    return _Handle(kept.pop(), (found.st_dev, found.st_ino), writable)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        info = os.fstat(fd)
        return _Handle(fd, (info.st_dev, info.st_ino), writable)

    def close(self, handle: _Handle) -> None:
        """Close `handle`'s descriptor, or keep it while a connection of ours to its file is open."""
        with self._lock:
            if self._connections.get(handle.file, 0) > 0:
                self._kept.setdefault((handle.file, handle.writable), []).append(handle.fd)
                return
        os.close(handle.fd)

    def connected(self, file: _FileId | None) -> None:
        """A connection of ours to `file` was opened (None: a file that is gone, nothing to track)."""
        if file is not None:
            with self._lock:
                self._connections[file] = self._connections.get(file, 0) + 1

    def disconnected(self, file: _FileId | None) -> None:
        """A connection of ours to `file` was closed: if it was the last, close the descriptors kept for it."""
        if file is None:
            return
        with self._lock:
            left = self._connections.get(file, 0) - 1
            if left > 0:
                self._connections[file] = left
                return
            self._connections.pop(file, None)
            fds = [fd for writable in (False, True) for fd in self._kept.pop((file, writable), ())]
        for fd in fds:
            os.close(fd)


_FILES: Final = _OpenFiles()


def _file_id(path: str) -> _FileId | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


# --- ownership -----------------------------------------------------------------------------------

_OFD_LOCKS = sys.platform == "linux" and hasattr(fcntl, "F_OFD_SETLK") and struct.calcsize("l") == 8
"""Whether ownership is an open-file-description lock on the database itself (64-bit Linux: the
`struct flock` below is packed by hand for its layout); elsewhere, a flock on a sidecar file."""
_LOCK_BYTE: Final = 2**62
"""The byte of the database the ownership lock covers: far above every byte SQLite locks (at 1 GiB)."""
_FLOCK: Final = struct.Struct("hhxxxxqqixxxx")
"""``struct flock`` on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)."""


def _ofd_lock(fd: int, kind: int) -> None:
    """Take (F_WRLCK, F_RDLCK) or release (F_UNLCK) the lock byte, without waiting. Raises OSError."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, _LOCK_BYTE, 1, 0))


def _ofd_holder(fd: int) -> int | None:
    """The kind of lock another open file description holds on the lock byte (F_RDLCK, F_WRLCK), or None."""
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _LOCK_BYTE, 1, 0))
    except OSError:
        return None
    kind: int = _FLOCK.unpack(answer)[0]
    return None if kind == fcntl.F_UNLCK else kind


_BUSY: Final = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
"""What a lock someone else holds gives."""


class _Ownership:
    """How a `Journal` holds its database for writing, for its whole life.

    On Linux, an open-file-description (OFD) lock on one byte of the database file
    itself: it belongs to the file, not to a path, so a symlink or a hard link to an
    owned journal is refused too; it conflicts between processes and within one; and
    being a lock of an open file description, it is not dropped when some other
    descriptor of the file is closed (which drops POSIX locks, SQLite's own). Nothing is
    left on disk. Where OFD locks are missing, a flock on a sidecar named after the
    resolved path (``<realpath>.lock``, opened with O_NOFOLLOW, never deleted).
    """

    def __init__(self, handle: _Handle | None, sidecar: tuple[int, str] | None, file: _FileId) -> None:
        self._handle = handle
        self._sidecar = sidecar
        self.file = file
        """The identity of the database file owned."""
        self.sidecar_path = None if sidecar is None else sidecar[1]
        """The sidecar lock file, if ownership is held through one."""

    @classmethod
    def acquire(cls, path: str) -> _Ownership:
        """Own `path`'s database file, creating it (owner-only) if it is missing. Raises JournalError."""
        try:
            handle = _FILES.open(path, writable=True, create=True)
        except OSError as exc:
            raise JournalError(f"journal {path!r} cannot be opened for writing: {exc.strerror or exc}") from exc
        if _OFD_LOCKS:
            try:
                _ofd_lock(handle.fd, fcntl.F_WRLCK)
            except OSError as exc:
                if exc.errno in _BUSY:
                    holder = _ofd_holder(handle.fd)
                    _FILES.close(handle)
                    raise JournalError(_in_use(path, reader=holder == fcntl.F_RDLCK)) from exc
                # The file system cannot lock this way (some network file systems): the sidecar, then.
            else:
                return cls(handle, None, handle.file)
        file = handle.file
        _FILES.close(handle)
        return cls(None, _acquire_sidecar(path), file)

    def release(self) -> None:
        """Give up ownership. Unlocked explicitly: a child forked meanwhile shares the open file description."""
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                _ofd_lock(handle.fd, fcntl.F_UNLCK)
            finally:
                _FILES.close(handle)
        sidecar, self._sidecar = self._sidecar, None
        if sidecar is not None:
            _release_flock(sidecar[0])

    def check(self, path: str) -> str | None:
        """Why ownership may no longer hold (its sidecar was deleted or replaced), or None."""
        if self._sidecar is None:
            return None  # the lock is on the database file itself, which the caller checks
        fd, lock_path = self._sidecar
        try:
            found = os.lstat(lock_path)
        except OSError:
            found = None
        if found is None or (found.st_dev, found.st_ino) != _fd_id(fd):
            return (
                f"lock file {lock_path!r} of journal {path!r} was deleted or replaced while in use; "
                "another runtime could now open the same journal"
            )
        return None


def _fd_id(fd: int) -> _FileId:
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino)


def _in_use(path: str, *, reader: bool) -> str:
    if reader:
        return (
            f"journal {path!r} is in use by a reader that keeps it unchanged while it reads "
            "(Journal.open_readonly, actorflow inspect); open it again once that reader is closed"
        )
    return (
        f"journal {path!r} is in use by another runtime (through this path or another to the same file); "
        "close that runtime first, or read the journal with Journal.open_readonly()"
    )


def _sidecar_path(path: str) -> str:
    """The sidecar lock of the fallback: named after the resolved path, so a symlink finds the same one."""
    return f"{os.path.realpath(path)}.lock"


def _open_sidecar(path: str, lock_path: str, flags: int) -> int:
    try:
        return os.open(lock_path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JournalError(
                f"journal {path!r} cannot be locked: lock file {lock_path!r} is a symbolic link, which is never "
                "followed; remove it"
            ) from exc
        raise


def _acquire_sidecar(path: str) -> tuple[int, str]:
    """Take the exclusive, non-blocking flock on the sidecar lock file; its descriptor and path."""
    lock_path = _sidecar_path(path)
    try:
        fd = _open_sidecar(path, lock_path, os.O_RDWR | os.O_CREAT)
    except PermissionError:
        try:  # flock works on a read-only descriptor too, e.g. a lock file another user created
            fd = _open_sidecar(path, lock_path, os.O_RDONLY)
        except OSError as exc:
            raise JournalError(f"journal {path!r} cannot be opened: lock file {lock_path!r}: {exc.strerror}") from exc
    except OSError as exc:
        raise JournalError(f"journal {path!r} cannot be opened: lock file {lock_path!r}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            raise JournalError(_in_use(path, reader=False)) from exc
        raise JournalError(f"journal {path!r} cannot be locked ({lock_path!r}): {exc.strerror}") from exc
    return fd, lock_path


def _release_flock(fd: int) -> None:
    # Unlock explicitly before closing: a child forked meanwhile shares this open file
    # description, and closing our descriptor alone would leave the lock held by the child.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class _Quiet:
    """A reader's shared lock while no runtime owns the journal: no `Journal` can take it meanwhile."""

    def __init__(self, handle: _Handle | None, sidecar_fd: int | None) -> None:
        self._handle = handle
        self._sidecar_fd = sidecar_fd

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                _ofd_lock(handle.fd, fcntl.F_UNLCK)
            finally:
                _FILES.close(handle)
        fd, self._sidecar_fd = self._sidecar_fd, None
        if fd is not None:
            _release_flock(fd)


def _hold_quiet(path: str) -> _Quiet | None:
    """A shared lock on the journal if no runtime owns `path` and no WAL is left over; else None.

    While it is held, no `Journal` can take its exclusive lock, so the file cannot change and may be
    read as immutable. Nothing is created here: with the sidecar fallback, a reader without a lock
    file falls back to ``mode=ro``.
    """
    real = os.path.realpath(path)
    if os.path.exists(f"{real}-wal") or os.path.exists(f"{real}-shm"):
        return None
    quiet = _quiet_ofd(path) if _OFD_LOCKS else None
    if quiet is None and not _OFD_LOCKS:
        quiet = _quiet_sidecar(path)
    if quiet is not None and os.path.exists(f"{real}-wal"):  # a runtime opened it between the check and the lock
        quiet.release()
        return None
    return quiet


def _quiet_ofd(path: str) -> _Quiet | None:
    try:
        handle = _FILES.open(path, writable=False)
    except OSError:
        return None
    try:
        _ofd_lock(handle.fd, fcntl.F_RDLCK)
    except OSError:
        _FILES.close(handle)
        return None
    return _Quiet(handle, None)


def _quiet_sidecar(path: str) -> _Quiet | None:
    try:
        fd = os.open(_sidecar_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return _Quiet(None, fd)


def _connect_readonly(path: str, busy_timeout_s: float, *, immutable: bool = False) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path!r} cannot be opened for reading: {exc}") from exc


def _classify(connection: sqlite3.Connection, path: str, busy_timeout_s: float) -> int | None:
    """The schema version of an actorflow journal, None for an empty database; JournalError for anything else."""
    try:
        application_id, version, objects = _describe(connection)
    except sqlite3.Error as exc:
        raise JournalError(
            f"journal {path!r} cannot be used: {_fault(exc, busy_timeout_s)}; it was left untouched"
        ) from exc
    tables = sorted(name for kind, name in objects if kind == "table")
    if application_id == 0 and version == 0 and not objects:
        return None
    if application_id != APPLICATION_ID:
        shown = ", ".join(tables[:8]) + (", ..." if len(tables) > 8 else "")
        raise JournalError(
            f"journal {path!r} cannot be used: it is an SQLite database of another application, not an actorflow "
            f"journal (application_id {application_id:#x}, user_version {version}, tables: {shown or 'none'}); "
            "it was left untouched"
        )
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"journal {path!r} cannot be used: its schema version {version} is newer than this actorflow supports "
            f"({SCHEMA_VERSION}); upgrade actorflow, it was left untouched"
        )
    if version < 1 or not set(tables) >= _TABLES:
        raise JournalError(
            f"journal {path!r} cannot be used: schema version {version} with tables {tables!r}, expected "
            f"{sorted(_TABLES)!r}: the journal is damaged; it was left untouched"
        )
    return version


def _describe(connection: sqlite3.Connection) -> tuple[int, int, list[tuple[str, str]]]:
    began = not connection.in_transaction
    if began:
        connection.execute("BEGIN")  # one snapshot for the three reads
    try:
        (application_id,) = connection.execute("PRAGMA application_id").fetchone()
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        objects = connection.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
    finally:
        if began and connection.in_transaction:
            connection.execute("COMMIT")
    return application_id, version, objects


def _open_for_writing(
    path: str, durability: Durability, busy_timeout_s: float, pipelines: Mapping[str, frozenset[str] | None] | None
) -> sqlite3.Connection:
    try:
        connection = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path!r} cannot be opened: {exc}") from exc
    try:
        (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {path!r} cannot be used: SQLite refused WAL mode (journal_mode is {mode!r})")
        connection.execute(f"PRAGMA synchronous={_SYNCHRONOUS[durability]}")
        connection.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        # Take the write lock now: a journal that cannot be written is refused at open, not at the first batch.
        connection.execute("BEGIN IMMEDIATE")
        version = _classify(connection, path, busy_timeout_s)
        if version is None:
            for statement in _SCHEMA:  # inside the open transaction: all of it or nothing
                connection.execute(statement)
        else:
            if pipelines is not None:
                _check_pipelines(connection, path, version, pipelines)
            if version == 1:
                for statement in _migrate_from_1(connection):  # inside the open transaction: all or nothing
                    connection.execute(statement)
        present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in present:
                connection.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
        for statement in _KEYS_SCHEMA:
            connection.execute(statement)
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(connection)
        connection.close()
        raise JournalError(
            f"journal {path!r} cannot be opened for writing: {_fault(exc, busy_timeout_s)}; it was left untouched"
        ) from exc
    except BaseException:
        _rollback(connection)
        connection.close()
        raise
    return connection


def _check_pipelines(
    connection: sqlite3.Connection, path: str, version: int, known: Mapping[str, frozenset[str] | None]
) -> None:
    """Refuse a journal with unfinished tasks of a pipeline (or in a state) the runtime does not define.

    Checked before any write: resuming such a task could only fail it, and a crash must never fail a task.
    """
    column = f"'{DEFAULT_PIPELINE}'" if version == 1 else "pipeline"
    rows = connection.execute(
        f"SELECT {column}, state, COUNT(*) FROM tasks WHERE state NOT IN ({_TERMINAL_SQL}) GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    missing: dict[str, int] = {}
    for name, _, count in rows:
        if name not in known:
            missing[name] = missing.get(name, 0) + count
    if missing:
        shown = ", ".join(
            f"{name!r} ({count} unfinished task{'s' if count != 1 else ''})" for name, count in missing.items()
        )
        raise JournalError(
            f"journal {path!r} holds unfinished tasks of pipeline(s) this runtime does not define: {shown}; "
            f"the runtime defines {sorted(known)!r}. Pass those pipelines to Runtime(pipelines=[...]) to resume "
            "them; the journal was left untouched"
        )
    strays = [
        (name, state, count)
        for name, state, count in rows
        if (states := known.get(name)) is not None and state not in states
    ]
    if strays:
        shown = ", ".join(
            f"{count} in {state!r} (pipeline {name!r}, whose states are {', '.join(sorted(known[name] or ()))})"
            for name, state, count in strays
        )
        raise JournalError(
            f"journal {path!r} holds unfinished tasks in states their pipelines no longer have: {shown}. "
            "A stage was renamed or removed since they were committed: restore it to resume them, or finish "
            "them with the version of the pipeline that made them; the journal was left untouched"
        )


# --- rows ----------------------------------------------------------------------------------------


def _fault(exc: sqlite3.Error, busy_timeout_s: float) -> str:
    """SQLite's message, with the likely cause when it is a lock someone else holds."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"{exc} (another connection held a lock for longer than busy_timeout_s={busy_timeout_s:g})"
    return str(exc)


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite already did after some errors, e.g. a full disk)."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _filter(state: TaskState | str | None, terminal: bool | None) -> tuple[str, tuple[str, ...]]:
    clauses: list[str] = []
    params: tuple[str, ...] = ()
    if state is not None:
        try:
            state = TaskState(state)
        except ValueError as exc:
            raise ValueError(f"state must be a TaskState, such as {', '.join(TaskState)}: {exc}") from None
        clauses.append("state = ?")
        params = (state.value,)
    if terminal is not None:
        clauses.append(f"state {'IN' if terminal else 'NOT IN'} ({_TERMINAL_SQL})")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _index_in_history(record: TaskRecord, transition: Transition) -> int:
    """The transition's position in the record's history: its seq in the log (normally the last entry)."""
    history = record.history
    for index in range(len(history) - 1, -1, -1):
        if history[index] is transition or history[index] == transition:
            return index
    raise ValueError(
        f"task {record.task_id!r}: transition {transition!r} is not in the history of the record given with it; "
        "pass the record as it was right after the transition"
    )


def _log_row(task_id: str, seq: int, entry: Transition) -> _LogRow:
    from_state = None if entry.from_state is None else entry.from_state.value
    return (task_id, seq, from_state, entry.to_state.value, entry.at, _storable(entry.reason))


def _storable(text: str | None) -> str | None:
    """`text`, with lone surrogates (e.g. from an undecodable file name in an error) escaped.

    SQLite stores UTF-8 only; a reason or error message must never make a batch unwritable.
    """
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _frozen_object(pairs: list[tuple[str, Any]]) -> FrozenDict:
    # json calls this innermost first, so nested objects arrive frozen; only lists need converting.
    # Trusted (not frozen again): what JSON gives is plain str, int, float, bool and None.
    items = {key: _frozen_array(value) if type(value) is list else value for key, value in pairs}
    return _frozen_dict(items, -1)  # its size is not counted: a freeze that meets it copies it once


def _frozen_array(items: list[Any]) -> tuple[Any, ...]:
    return tuple(_frozen_array(item) if type(item) is list else item for item in items)


def _not_json_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


_parse_json = json.JSONDecoder(object_pairs_hook=_frozen_object, parse_constant=_not_json_constant).decode
_JSON_STRINGS: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS: Final = re.compile(r"[^\[\]{}]+")
_INNERMOST: Final = re.compile(r"\[\]|\{\}")


def _nested_too_deep(text: str) -> bool:
    """True if JSON `text` nests more than `MAX_DEPTH` arrays and objects (or its brackets do not pair up).

    Without recursion, and without a loop per character: strings and everything but brackets are
    removed (regular expressions, in C), then the innermost pairs, one level per pass.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    brackets = _NOT_BRACKETS.sub("", _JSON_STRINGS.sub("", text))
    for _ in range(MAX_DEPTH):
        if not brackets:
            return False
        brackets = _INNERMOST.sub("", brackets)
    return bool(brackets)


def _decode_json(text: object, column: str, task_id: object, path: str) -> Any:
    """What ``freeze(json.loads(text))`` gives, 2.5x faster (measured): recovery decodes every live record.

    Raises JournalError naming the task and the column for anything but JSON nested at most `MAX_DEPTH` deep.
    """
    if type(text) is not str:
        raise _damaged(path, task_id, column, text, "JSON text")
    if _nested_too_deep(text):
        raise _damaged(path, task_id, column, f"JSON nested more than {MAX_DEPTH} levels deep", "JSON text", raw=True)
    try:
        value = _parse_json(text)
    except (ValueError, RecursionError) as exc:
        found = f"text that is not JSON ({bound_message(str(exc), limit=120)})"
        raise _damaged(path, task_id, column, found, "JSON text", raw=True) from None
    return _frozen_array(value) if type(value) is list else value


def _damaged(
    path: str, task_id: object, column: str, found: object, expected: str, *, raw: bool = False
) -> JournalError:
    """The error for a row a reader cannot take: what was found where, and what was expected."""
    shown = found if raw else ("NULL" if found is None else _shown(found))
    return JournalError(
        f"journal {path!r}: task {_shown(task_id)}: column {column!r} holds {shown}, expected {expected}; "
        "the journal is damaged (or was changed by hand), so it was not used"
    )


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


_STATE_BY_NAME: dict[str, TaskState] = {state.value: state for state in TaskState}
"""A dict lookup is 10x faster than ``TaskState(name)`` (measured), and reads make one per transition."""


def _task_columns(connection: sqlite3.Connection, version: int) -> str:
    """The columns to select from `tasks`, as schema 2 names them: a schema-1 journal (read, never migrated,
    by a reader) maps its own; an added column a journal lacks (read-only, older) reads as NULL."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    added = ", ".join(column if column in present else f"NULL AS {column}" for column, _ in _ADDED_COLUMNS)
    return f"{_TASK_COLUMNS_V1 if version == 1 else _TASK_COLUMNS}, {added}"


def _state(name: object, column: str, task_id: object, path: str) -> TaskState:
    state = _STATE_BY_NAME.get(name) if type(name) is str else None
    if state is None:
        try:
            state = TaskState(name)  # type: ignore[arg-type]  # checked there, with the reason
        except ValueError:
            raise _damaged(path, task_id, column, name, "a task state name") from None
        _STATE_BY_NAME[state.value] = state
    return state


def _text(value: object, column: str, task_id: object, path: str, *, null: bool = True) -> Any:
    if type(value) is str or (null and value is None):
        return value
    raise _damaged(path, task_id, column, value, "text" + (" or NULL" if null else ""))


def _count(value: object, column: str, task_id: object, path: str) -> Any:
    if type(value) is int and value >= 0:
        return value
    raise _damaged(path, task_id, column, value, "an int >= 0")


def _time(value: object, column: str, task_id: object, path: str) -> Any:
    if (type(value) is float or type(value) is int) and math.isfinite(value):
        return value
    raise _damaged(path, task_id, column, value, "a time in seconds since the epoch")


def _record_from_row(row: tuple[Any, ...], history: tuple[Transition, ...], path: str) -> TaskRecord:
    """A record from its row; JournalError naming the task and the column for a value that cannot be one."""
    (
        task_id,
        pipeline,
        state,
        payload,
        result,
        value,
        error,
        trace_id,
        span_id,
        parent_span_id,
        calls,
        retries,
        created_at,
        updated_at,
        traceback,
    ) = row
    _text(task_id, "task_id", task_id, path, null=False)
    decoded = _decode_json(payload, "payload", task_id, path)
    if type(decoded) is not FrozenDict:
        kind = "an array" if type(decoded) is tuple else "a scalar"
        raise _damaged(path, task_id, "payload", f"JSON {kind}", "a JSON object", raw=True)
    return TaskRecord(
        task_id=task_id,
        state=_state(state, "state", task_id, path),
        payload=decoded,
        result=None if result is None else _decode_json(result, "result", task_id, path),
        value=None if value is None else _decode_json(value, "value", task_id, path),
        pipeline=_text(pipeline, "pipeline", task_id, path, null=False),
        calls=_count(calls, "calls", task_id, path),
        retries=_count(retries, "retries", task_id, path),
        error=_text(error, "error", task_id, path),
        history=history,
        created_at=_time(created_at, "created_at", task_id, path),
        updated_at=_time(updated_at, "updated_at", task_id, path),
        trace_id=_text(trace_id, "trace_id", task_id, path, null=False),
        span_id=_text(span_id, "span_id", task_id, path, null=False),
        parent_span_id=_text(parent_span_id, "parent_span_id", task_id, path),
        traceback=_text(traceback, "traceback", task_id, path),
    )


def _transition_from_row(row: tuple[Any, ...], path: str) -> Transition:
    """A transition from its log row; JournalError naming the task and the column, as `_record_from_row`."""
    task_id, _, from_state, to_state, at, reason = row
    return Transition(
        from_state=None if from_state is None else _state(from_state, "from_state", task_id, path),
        to_state=_state(to_state, "to_state", task_id, path),
        at=_time(at, "at", task_id, path),
        reason=_text(reason, "reason", task_id, path),
    )
