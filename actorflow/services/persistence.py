"""The default persistence service: results upserted into a SQLite result store."""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from typing import Any

from actorflow.core.errors import ConfigError
from actorflow.core.types import Task, thaw

__all__ = ["ResultStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    task_id    TEXT PRIMARY KEY,
    result     TEXT NOT NULL,
    written_at REAL NOT NULL
)
"""
_memory_ids = itertools.count(1)


class ResultStore:
    """A callable `persist(task, result)` writing to SQLite, idempotent per task_id.

    With `path=None` the store is a shared-cache in-memory database private to
    this store object (and this process). Each worker thread gets its own
    connection; SQLite serializes the writes. The object holds no task data,
    only connections, so it is safe to share between worker actors. A thread's
    connection is closed once the thread has ended (when the next one connects),
    so replaced workers do not pile up connections.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        if path is None:
            self._uri = f"file:actorflow-results-{next(_memory_ids)}?mode=memory&cache=shared"
        else:
            self._uri = f"file:{path}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread | None, sqlite3.Connection]] = []
        """Every open connection, with the thread it serves (None for the anchor, kept to the end)."""
        try:
            # The first connection anchors an in-memory database for the store's lifetime.
            self._anchor = self._connect(owner=None)
            self._anchor.execute(_SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise ConfigError(f"RuntimeConfig.result_store {path!r} cannot be opened as SQLite: {exc}") from exc

    def _connect(self, owner: threading.Thread | None) -> sqlite3.Connection:
        connection = sqlite3.connect(self._uri, uri=True, check_same_thread=False, timeout=30, isolation_level=None)
        if self.path is not None:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            ended = [entry for entry in self._connections if entry[0] is not None and not entry[0].is_alive()]
            self._connections = [entry for entry in self._connections if entry not in ended]
            self._connections.append((owner, connection))
        for _, stale in ended:
            stale.close()  # its thread is gone: nothing can be using it
        return connection

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect(owner=threading.current_thread())
            self._local.connection = connection
        return connection

    @property
    def open_connections(self) -> int:
        """How many connections are open: the anchor, and one per thread that used the store lately."""
        with self._lock:
            return len(self._connections)

    def __call__(self, task: Task, result: Mapping[str, Any]) -> None:
        """Upsert `result` for `task.task_id`: a replayed stage never leaves two rows."""
        body = json.dumps(thaw(result), sort_keys=True, separators=(",", ":"))
        self._connection().execute(
            "INSERT INTO results (task_id, result, written_at) VALUES (?, ?, ?) "
            "ON CONFLICT(task_id) DO UPDATE SET result = excluded.result, written_at = excluded.written_at",
            (task.task_id, body, time.time()),
        )

    def get(self, task_id: str) -> Any:
        """The stored result of `task_id` as plain JSON data, or None."""
        row = self._connection().execute("SELECT result FROM results WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def count(self) -> int:
        """How many results are stored."""
        row = self._connection().execute("SELECT count(*) FROM results").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close every connection (an in-memory store is gone afterwards)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for _, connection in connections:
            connection.close()
        self._local = threading.local()

    def __reduce__(self) -> tuple[type[ResultStore], tuple[str | None]]:
        # Connections do not cross processes: a copy reconnects to the same file.
        return (ResultStore, (self.path,))
