"""Reading an SQLite journal: `JournalReader`, and what the writer shares with it.

A reader opens the file with ``mode=ro``: it never creates, writes or
checkpoints it, and may run while a runtime writes the same file, from this
process or another (the file is kept in WAL mode). Bad files are refused, never
repaired: a file that is not SQLite, carries a newer schema, or belongs to
another application raises `JournalError` naming the path and the fault.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

from actorflow.core.errors import JournalError
from actorflow.core.journal.codec import damaged, record_from_row, transition_from_row
from actorflow.core.journal.ownership import FILES, file_id, hold_quiet, read_header
from actorflow.core.journal.schema import (
    APPLICATION_ID,
    LOG_COLUMNS,
    ORDER,
    ORDER_NEWEST_FIRST,
    SCHEMA_VERSION,
    TABLES,
    TERMINAL_SQL,
    task_columns,
)
from actorflow.core.journal.store import KEY_RETENTION_S
from actorflow.core.types import _STATE_NAME, DEFAULT_PIPELINE, TaskRecord, TaskState, Transition

__all__ = ["JournalReader", "check_timeout", "classify", "connect_readonly", "fault", "read_transaction"]


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
        check_timeout(busy_timeout_s)
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        if read_header(self.path) is None:
            raise JournalError(f"journal {self.path!r} cannot be read: no such file")
        self._quiet = hold_quiet(self.path)
        self._file = file_id(self.path)
        """The database file our connection reads (see `OpenFiles`)."""
        FILES.connected(self._file)
        try:
            connection = connect_readonly(self.path, busy_timeout_s, immutable=self._quiet is not None)
            try:
                version = classify(connection, self.path, busy_timeout_s)
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
        self._columns = task_columns(connection, version)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord | None:
        """The record of `task_id`, history included, exactly as it was written; None if unknown."""
        with self._snapshot("get") as connection:
            row = connection.execute(f"SELECT {self._columns} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            log = connection.execute(
                f"SELECT {LOG_COLUMNS} FROM transitions WHERE task_id = ? ORDER BY seq", (task_id,)
            ).fetchall()
        return record_from_row(row, tuple(transition_from_row(entry, self.path) for entry in log), self.path)

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
        """Records ordered by `created_at`, then insertion order (arguments: `store.RecordSource.records`).

        ``newest_first`` with ``limit=N`` gives the N newest without an OFFSET scan.
        """
        where, params = filter_clause(state, terminal)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        page = f"{where} {ORDER_NEWEST_FIRST if newest_first else ORDER} LIMIT ? OFFSET ?"
        return self._read_page("records", page, (*params, -1 if limit is None else limit, offset))

    def iter_records(self, *, terminal: bool | None = None, batch: int = 1000) -> Iterator[TaskRecord]:
        """Every (matching) record in `records` order, read `batch` records per query.

        Memory stays bounded by `batch`, and no lock or read transaction is held
        between batches, so the caller may write to the journal while iterating
        (the writes may or may not be seen, but each record is whole).
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        where, params = filter_clause(None, terminal)
        keyset = f"{where} {'AND' if where else 'WHERE'} (created_at, id) > (?, ?)"
        cursor: tuple[float, int] | None = None
        while True:
            if cursor is None:
                page = self._read_page("iter_records", f"{where} {ORDER} LIMIT ?", (*params, batch), keep_ids=True)
            else:
                page = self._read_page(
                    "iter_records", f"{keyset} {ORDER} LIMIT ?", (*params, *cursor, batch), keep_ids=True
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
                raise damaged(self.path, task_id, "state", bad[0], "a task state name")
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
                raise damaged(self.path, task_id, "to_state", bad[0], "a task state name")
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
        """After our connection is closed: untrack it, then release the quiet lock (in that order, see `OpenFiles`)."""
        file, self._file = self._file, None
        FILES.disconnected(file)
        quiet, self._quiet = self._quiet, None
        if quiet is not None:
            quiet.release()

    @property
    def location(self) -> str:
        """The database file, as given (`path`)."""
        return self.path

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
        with self._lock, read_transaction(self._require_open(), self.path, operation, self._busy_timeout_s) as conn:
            yield conn

    def _read_page(self, operation: str, page: str, params: tuple[Any, ...], *, keep_ids: bool = False) -> list[Any]:
        """Records of one page query (a WHERE/ORDER/LIMIT tail), with their histories, in page order."""
        with self._snapshot(operation) as connection:
            rows = connection.execute(f"SELECT id, {self._columns} FROM tasks {page}", params).fetchall()
            if not rows:
                return []
            histories: dict[str, list[Transition]] = {}
            # The same page query again, as a subquery, in the same snapshot: no id list to bind.
            for entry in connection.execute(
                f"SELECT {LOG_COLUMNS} FROM transitions WHERE task_id IN (SELECT task_id FROM tasks {page})"
                " ORDER BY task_id, seq",
                params,
            ):
                histories.setdefault(entry[0], []).append(transition_from_row(entry, self.path))
        records = [(row[0], record_from_row(row[1:], tuple(histories.get(row[1], ())), self.path)) for row in rows]
        return records if keep_ids else [record for _, record in records]

    def _require_open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise JournalError(f"journal {self.path!r} is closed")
        return self._connection


# --- helpers the writer shares --------------------------------------------------------------------


@contextlib.contextmanager
def read_transaction(
    connection: sqlite3.Connection, path: str, operation: str, busy_timeout_s: float
) -> Iterator[sqlite3.Connection]:
    """One read transaction on `connection`; an SQLite error in it is a JournalError naming `operation`."""
    try:
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            if connection.in_transaction:
                connection.execute("COMMIT")
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path!r}: {operation} failed: {fault(exc, busy_timeout_s)}") from exc


def check_timeout(busy_timeout_s: float) -> None:
    """Refuse a busy timeout that is not a finite number of seconds >= 0 (ValueError)."""
    if (
        isinstance(busy_timeout_s, bool)
        or not isinstance(busy_timeout_s, (int, float))
        or not math.isfinite(busy_timeout_s)
        or busy_timeout_s < 0
    ):
        raise ValueError(f"busy_timeout_s must be a finite number of seconds >= 0, got {busy_timeout_s!r}")


def connect_readonly(path: str, busy_timeout_s: float, *, immutable: bool = False) -> sqlite3.Connection:
    """A ``mode=ro`` connection to `path` (``immutable`` too, while a quiet lock keeps every writer out)."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path!r} cannot be opened for reading: {exc}") from exc


def classify(connection: sqlite3.Connection, path: str, busy_timeout_s: float) -> int | None:
    """The schema version of an actorflow journal, None for an empty database; JournalError for anything else."""
    try:
        application_id, version, objects = _describe(connection)
    except sqlite3.Error as exc:
        raise JournalError(
            f"journal {path!r} cannot be used: {fault(exc, busy_timeout_s)}; it was left untouched"
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
    if version < 1 or not set(tables) >= TABLES:
        raise JournalError(
            f"journal {path!r} cannot be used: schema version {version} with tables {tables!r}, expected "
            f"{sorted(TABLES)!r}: the journal is damaged; it was left untouched"
        )
    return version


def _describe(connection: sqlite3.Connection) -> tuple[int, int, list[tuple[str, str]]]:
    """The file's application id, schema version, and objects (type, name), read in one snapshot."""
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


def fault(exc: sqlite3.Error, busy_timeout_s: float) -> str:
    """SQLite's message, with the likely cause when it is a lock someone else holds."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"{exc} (another connection held a lock for longer than busy_timeout_s={busy_timeout_s:g})"
    return str(exc)


def filter_clause(state: TaskState | str | None, terminal: bool | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause (or "") and its parameters selecting tasks in `state`, or (not) terminal."""
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
        clauses.append(f"state {'IN' if terminal else 'NOT IN'} ({TERMINAL_SQL})")
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
