"""The SQLite journal's writer: `Journal`, which owns a database file and commits batches into it.

One `Journal` owns a database file for writing (`ownership`); any number of
`JournalReader`s (`Journal.open_readonly`) may read it at the same time, from
this process or another, because the file is kept in WAL mode. A `Journal` has
one caller, the StateActor's thread (`store.WriterStore`), so it has no lock.

Durability. `Journal.write_batch` is one transaction: when it returns, the batch
is committed, and nothing of a failed batch is visible. WAL with
``synchronous=NORMAL`` ("normal") keeps every committed batch across a crash of
the process, but a power loss or OS crash may lose the last batches (never
corrupting the file); ``synchronous=FULL`` ("full") fsyncs the WAL on every
commit, so committed batches also survive power loss.

Refusals. `write_batch` raises `UnstorableValue` (a `JournalError`) when the batch
holds a change no retry can store: a value the encoder cannot encode or a JSON
column over SQLite's length limit (both found in Python, before SQLite is asked,
and named with their task: `codec`), or what SQLite refuses for the data it is
given (a row too big, a broken constraint); `check_batch` runs a batch and rolls
it back, so that the state actor can find the task at fault by halving. Every
other SQLite error (I/O, full disk, locks) is a `JournalError` that may pass.

Bad files are never repaired or replaced: a file that is not SQLite, carries a
newer schema, belongs to another application, is locked, or is owned by a
running journal raises `JournalError` naming the path and the fault, and the
database file is left byte-for-byte as it was (it is first examined through a
read-only connection, which can neither write pages nor checkpoint on close).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from actorflow.core.errors import JournalError, UnstorableValue
from actorflow.core.journal.codec import (
    KeyRow,
    LogRow,
    TaskRow,
    index_in_history,
    key_rows,
    log_row,
    task_row,
    update_row,
)
from actorflow.core.journal.ownership import FILES, Ownership, read_header
from actorflow.core.journal.reader import (
    JournalReader,
    check_timeout,
    classify,
    connect_readonly,
    fault,
    read_transaction,
)
from actorflow.core.journal.schema import (
    INSERT_KEY,
    INSERT_TASK,
    INSERT_TRANSITION,
    SCHEMA_VERSION,
    TERMINAL_SQL,
    UPDATE_TASK,
    task_columns,
    upgrade,
)
from actorflow.core.journal.store import KEY_RETENTION_S, MAX_KEYS, Change, Durability, IdempotencyKey
from actorflow.core.types import DEFAULT_PIPELINE, TaskRecord

__all__ = ["Journal"]

_SYNCHRONOUS: Final[dict[str, str]] = {"normal": "NORMAL", "full": "FULL"}
_WAL_SIZE_LIMIT: Final = 32 * 1024 * 1024
"""A checkpoint truncates a WAL grown past this back to it, so one huge batch does not keep a huge file."""
_KEY_PRUNE_EVERY: Final = 1024
"""Keys written between two prunings of the table to `MAX_KEYS` (a pruning scans the keys' index)."""

_REFUSED_FOR_GOOD: Final = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
"""What SQLite raises for the data it is given (a string or row too big, a broken constraint, a value it cannot
bind), as opposed to the state of the file or the system (OperationalError: I/O, full disk, locks): retrying
the same batch cannot help."""


class Journal(JournalReader):
    """The writable journal of one runtime: group-committed task records, transitions and keys.

    Owns the file for writing: a second `Journal` on the same path, in this or
    another process, raises `JournalError` until this one is closed. It has one
    caller (the StateActor's thread) and no lock: other threads read the journal
    through a `JournalReader` of their own. Its reads (`get`, `records`, ...) are
    for that caller too.
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
        check_timeout(busy_timeout_s)
        self.path = os.fspath(path)
        self.durability = durability
        self._busy_timeout_s = busy_timeout_s
        self._connection = None
        self._owner: Ownership | None = None
        self._quiet = None
        self._file = None
        self._version = SCHEMA_VERSION
        self._keys_since_prune = 0

        header = read_header(self.path)  # refuses a non-SQLite file before SQLite ever opens it
        owner = Ownership.acquire(self.path)  # creates a missing file, owner-only, before SQLite does
        file = owner.file
        try:
            if header:  # an existing, non-empty file: judge it through a connection that cannot write
                FILES.connected(file)
                try:
                    probe = connect_readonly(self.path, busy_timeout_s)
                    try:
                        classify(probe, self.path, busy_timeout_s)
                    finally:
                        probe.close()
                finally:
                    FILES.disconnected(file)
            known: dict[str, frozenset[str] | None] | None = None
            if isinstance(pipelines, Mapping):
                known = {name: frozenset(states) for name, states in pipelines.items()}
            elif pipelines is not None:
                known = dict.fromkeys(pipelines)
            FILES.connected(file)
            try:
                self._connection = _open_for_writing(self.path, durability, busy_timeout_s, known)
            except BaseException:
                FILES.disconnected(file)
                raise
        except BaseException:
            owner.release()
            raise
        self._owner = owner
        self._file = file
        self._columns = task_columns(self._connection, SCHEMA_VERSION)
        self.lost: str | None = None
        """Why the files this journal owns are gone (deleted or replaced while open); None while they are not."""

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], *, busy_timeout_s: float = 2.0) -> JournalReader:
        """A `JournalReader` on `path`: for inspection, also while a runtime writes it."""
        return JournalReader(path, busy_timeout_s=busy_timeout_s)

    def write_batch(
        self, created: Sequence[TaskRecord], changed: Sequence[Change], keys: Sequence[IdempotencyKey] = ()
    ) -> None:
        """Commit new tasks, accepted transitions and the new tasks' Idempotency-Keys in one transaction.

        For each record in `created`: its row, and its whole `history` (usually
        the single creation entry) into the log. Then for each
        ``(record_after, transition)`` in `changed`, in order: the transition
        into the log at its index in ``record_after.history``, and the task's
        row set from ``record_after``. A task may be created and changed in the
        same batch; pass it to `created` as it was when created. Each of `keys`
        names a task of `created`, whose creation time dates it: a retry after a
        crash finds the key (`find_key`) if and only if its task exists.

        Raises:
            UnstorableValue: the batch holds a change no retry can store: a value
                that cannot be encoded as JSON or is over SQLite's length limit, a
                key that is not valid UTF-8 text (each named with their task,
                `UnstorableValue.task_id`), a row SQLite refuses as too big, a
                constraint it breaks (a transition already logged, a task created
                twice, a changed task that was never created), a task id that is
                not valid UTF-8. Nothing of the batch was written.
            JournalError: SQLite refused the batch for a reason that may pass (I/O
                error, full disk, lock held beyond the busy timeout, ...). Nothing
                of the batch was written, and the journal can be used again (e.g. to retry).
            ValueError: a transition is not in its record's history, or a key's task is not in `created`.
        """
        self._write(created, changed, keys, commit=True)

    def check_batch(
        self, created: Sequence[TaskRecord], changed: Sequence[Change], keys: Sequence[IdempotencyKey] = ()
    ) -> None:
        """Whether `write_batch` would take this batch: the same statements, rolled back instead of committed.

        Raises what `write_batch` raises; writes nothing either way. The state actor uses it to find,
        by halving a batch, the task whose change the journal refuses for good.
        """
        self._write(created, changed, keys, commit=False)

    def _write(
        self,
        created: Sequence[TaskRecord],
        changed: Sequence[Change],
        keys: Sequence[IdempotencyKey],
        *,
        commit: bool,
    ) -> None:
        if not (created or changed or keys):
            return
        connection = self._require_open()
        limit = connection.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        # Everything that can fail in Python runs before the transaction opens, and names its task.
        path = self.path
        tasks: list[TaskRow] = [task_row(record, limit, path) for record in created]
        log: list[LogRow] = [
            log_row(record.task_id, seq, entry) for record in created for seq, entry in enumerate(record.history)
        ]
        latest: dict[str, TaskRecord] = {}
        for record, transition in changed:
            log.append(log_row(record.task_id, index_in_history(record, transition), transition))
            latest[record.task_id] = record  # several changes of one task in a batch: its last record wins
        updates = [update_row(record, limit, path) for record in latest.values()]
        stored_keys = key_rows(keys, created, limit, path)

        self._check_identity()
        try:
            connection.execute("BEGIN IMMEDIATE")
            if tasks:
                connection.executemany(INSERT_TASK, tasks)
            if stored_keys:
                self._write_keys(connection, stored_keys)
            if log:
                connection.executemany(INSERT_TRANSITION, log)
            # executemany sums rowcount: fewer rows than updates means a changed task has no row
            if updates and connection.executemany(UPDATE_TASK, updates).rowcount != len(updates):
                unknown = _unknown(connection, latest)
                raise UnstorableValue(
                    f"journal {path!r}: batch rolled back: changed task(s) {unknown!r} were never "
                    "created in the journal",
                    task_id=unknown[0] if unknown else None,
                    fault="the task has no row in the journal (was it deleted behind the runtime's back?)",
                )
            connection.execute("COMMIT" if commit else "ROLLBACK")
        except _REFUSED_FOR_GOOD as exc:
            _rollback(connection)
            raise UnstorableValue(
                f"journal {path!r}: batch of {len(tasks)} new task(s) and {len(log)} transition(s) "
                f"rolled back: {exc}; the same batch would be refused again",
                fault=str(exc),
            ) from exc
        except sqlite3.Error as exc:
            _rollback(connection)
            raise JournalError(
                f"journal {path!r}: batch of {len(tasks)} new task(s) and {len(log)} transition(s) "
                f"rolled back: {fault(exc, self._busy_timeout_s)}"
            ) from exc
        except UnicodeEncodeError as exc:
            _rollback(connection)
            raise UnstorableValue(
                f"journal {path!r}: batch rolled back: a task id or trace id is not valid UTF-8 text: {exc}",
                fault=f"a task id or trace id is not valid UTF-8 text: {exc}",
            ) from exc
        except BaseException:
            _rollback(connection)
            raise

    def _write_keys(self, connection: sqlite3.Connection, keys: list[KeyRow]) -> None:
        """Write the batch's keys, forget expired ones, and now and then cut the table to `MAX_KEYS`."""
        connection.executemany(INSERT_KEY, keys)
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

    def close(self) -> None:
        """Checkpoint the WAL into the database, close it, then give up ownership. Idempotent."""
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

    @contextlib.contextmanager
    def _snapshot(self, operation: str) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that multi-query reads see one state (no lock: one caller)."""
        with read_transaction(self._require_open(), self.path, operation, self._busy_timeout_s) as connection:
            yield connection


# --- opening -------------------------------------------------------------------------------------


def _open_for_writing(
    path: str, durability: Durability, busy_timeout_s: float, pipelines: Mapping[str, frozenset[str] | None] | None
) -> sqlite3.Connection:
    """The writer's connection: WAL, `durability`, the schema brought up to date; JournalError if refused."""
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
        version = classify(connection, path, busy_timeout_s)
        if version is not None and pipelines is not None:
            _check_pipelines(connection, path, version, pipelines)
        upgrade(connection, version)  # inside the open transaction: all of it or nothing
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(connection)
        connection.close()
        raise JournalError(
            f"journal {path!r} cannot be opened for writing: {fault(exc, busy_timeout_s)}; it was left untouched"
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
        f"SELECT {column}, state, COUNT(*) FROM tasks WHERE state NOT IN ({TERMINAL_SQL}) GROUP BY 1, 2 ORDER BY 1, 2"
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


def _unknown(connection: sqlite3.Connection, task_ids: Iterable[str]) -> list[str]:
    """The first few of `task_ids` that have no row (only called on the error path)."""
    query = "SELECT 1 FROM tasks WHERE task_id = ?"
    return [task_id for task_id in task_ids if connection.execute(query, (task_id,)).fetchone() is None][:5]


def _rollback(connection: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite already did after some errors, e.g. a full disk)."""
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
