"""The SQLite journal's schema: its tables, its versions, and the migration of older ones.

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
                 transaction as the task's creation, kept `KEY_RETENTION_S` and
                 at most `MAX_KEYS` (additive: created with IF NOT EXISTS in any
                 journal opened for writing)

A writer brings a journal up to date in the transaction that opens it
(`upgrade`); a reader never changes it, and reads an older schema as it is
(`task_columns`).
"""

from __future__ import annotations

import sqlite3
from typing import Final

from actorflow.core.types import DEFAULT_PIPELINE, TERMINAL_STATES

__all__ = [
    "APPLICATION_ID",
    "INSERT_KEY",
    "INSERT_TASK",
    "INSERT_TRANSITION",
    "LOG_COLUMNS",
    "ORDER",
    "ORDER_NEWEST_FIRST",
    "SCHEMA_VERSION",
    "TABLES",
    "TERMINAL_SQL",
    "UPDATE_TASK",
    "task_columns",
    "upgrade",
]

SCHEMA_VERSION: Final[int] = 2
"""The schema this code writes. A journal with a higher ``user_version`` is refused, never downgraded;
one with schema 1 is migrated in place (in one transaction) when it is opened for writing."""

APPLICATION_ID: Final[int] = 0x41464A31
"""``PRAGMA application_id`` of an actorflow journal ("AFJ1"), so a foreign SQLite file is never mistaken for one."""

TERMINAL_SQL: Final = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))
"""The terminal states, as an SQL list (for ``state IN (...)``)."""

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

TABLES: Final = frozenset({"tasks", "transitions"})
"""The tables every version of the schema has."""

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

_ADDED_COLUMNS: Final[tuple[tuple[str, str], ...]] = (("traceback", "TEXT"),)
"""Nullable columns added to `tasks` after schema version 1 was fixed, by ``ALTER TABLE ... ADD COLUMN``
when a writer opens the journal (additive: older actorflow versions read such a journal unchanged)."""

# --- statements ------------------------------------------------------------------------------------

INSERT_KEY: Final = (
    "INSERT OR REPLACE INTO idempotency_keys (key, task_id, fingerprint, created_at) VALUES (?, ?, ?, ?)"
)
INSERT_TASK: Final = (
    "INSERT INTO tasks (task_id, pipeline, state, payload, result, value, error, trace_id, span_id, parent_span_id,"
    " calls, retries, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
"""Its parameters are `codec.TaskRow`."""
INSERT_TRANSITION: Final = (
    "INSERT INTO transitions (task_id, seq, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?, ?)"
)
"""Its parameters are `codec.LogRow`."""
UPDATE_TASK: Final = (
    "UPDATE tasks SET state = ?, result = ?, value = ?, error = ?, calls = ?, retries = ?, updated_at = ?,"
    " traceback = ? WHERE task_id = ?"
)
"""Its parameters are `codec.UpdateRow`."""

_TASK_COLUMNS: Final = (
    "task_id, pipeline, state, payload, result, value, error, trace_id, span_id, parent_span_id, calls, retries,"
    " created_at, updated_at"
)
_TASK_COLUMNS_V1: Final = (
    f"task_id, '{DEFAULT_PIPELINE}', state, payload, result, NULL, error, trace_id, span_id, parent_span_id,"
    " attempts, 0, created_at, updated_at"
)
"""The same columns read from a schema-1 journal (a reader never migrates)."""
LOG_COLUMNS: Final = "task_id, seq, from_state, to_state, at, reason"
"""The columns of a transition, as `codec.transition_from_row` takes them."""
ORDER: Final = "ORDER BY created_at, id"
ORDER_NEWEST_FIRST: Final = "ORDER BY created_at DESC, id DESC"


def task_columns(connection: sqlite3.Connection, version: int) -> str:
    """The columns to select from `tasks`, as schema 2 names them (`codec.record_from_row` takes them).

    A schema-1 journal (read, never migrated, by a reader) maps its own; an added column a
    journal lacks (read-only, older) reads as NULL.
    """
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    added = ", ".join(column if column in present else f"NULL AS {column}" for column, _ in _ADDED_COLUMNS)
    return f"{_TASK_COLUMNS_V1 if version == 1 else _TASK_COLUMNS}, {added}"


# --- creating and migrating ------------------------------------------------------------------------


def upgrade(connection: sqlite3.Connection, version: int | None) -> None:
    """Bring a journal to `SCHEMA_VERSION`, inside the writer's open transaction: all of it or nothing.

    `version` is the journal's (None for an empty database, which gets the whole schema).
    Then what is additive to every version: columns added since schema 1, the keys' table.
    """
    if version is None:
        for statement in _SCHEMA:
            connection.execute(statement)
    elif version == 1:
        for statement in _migrate_from_1(connection):
            connection.execute(statement)
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    for column, kind in _ADDED_COLUMNS:
        if column not in present:
            connection.execute(f"ALTER TABLE tasks ADD COLUMN {column} {kind}")
    for statement in _KEYS_SCHEMA:
        connection.execute(statement)


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
