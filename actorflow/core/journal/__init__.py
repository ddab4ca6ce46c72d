"""The journal: every task's current state, its append-only transition log, and the HTTP API's keys.

The StateActor writes a journal through a `WriterStore`; inspection, the API's
Idempotency-Keys and tests read it through a `ReaderStore` (`store`). Open them
with `open_store` and `open_reader`, which pick the store by URL. Today's one
store is an SQLite file::

    store.py       the Protocols both sides use, and the errors they raise
    schema.py      the SQLite schema, its version, and the migrations from schema 1
    ownership.py   one writer per database file (a lock on the file), and its descriptors
    codec.py       records to rows and back, with the checks on damaged rows
    reader.py      JournalReader, read-only, alongside a writer
    sqlite.py      Journal, the writer: group commit in WAL mode

A second store is one module beside them, plus its URL scheme in `open_store`
and `open_reader`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Final

from actorflow.core.errors import ConfigError, JournalError, UnstorableValue
from actorflow.core.journal.reader import JournalReader
from actorflow.core.journal.schema import APPLICATION_ID, SCHEMA_VERSION
from actorflow.core.journal.sqlite import Journal
from actorflow.core.journal.store import (
    KEY_RETENTION_S,
    MAX_KEYS,
    Change,
    Durability,
    IdempotencyKey,
    ReaderStore,
    RecordSource,
    WriterStore,
)

__all__ = [
    "APPLICATION_ID",
    "KEY_RETENTION_S",
    "MAX_KEYS",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMES",
    "Change",
    "Durability",
    "IdempotencyKey",
    "Journal",
    "JournalError",
    "JournalReader",
    "ReaderStore",
    "RecordSource",
    "UnstorableValue",
    "WriterStore",
    "open_reader",
    "open_store",
]

SUPPORTED_SCHEMES: Final = ("sqlite",)
"""The URL schemes `open_store` and `open_reader` take (besides a plain file path)."""

_URL: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://(.*)", re.DOTALL)
_SQLITE_PREFIX: Final = "sqlite:///"


def open_store(
    target: str | os.PathLike[str],
    *,
    durability: Durability = "normal",
    busy_timeout_s: float = 2.0,
    pipelines: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> WriterStore:
    """Open the journal at `target` for writing: the store a StateActor owns.

    Args:
        target: a file path, or a URL: ``sqlite:///PATH`` (everything after the
            three slashes is the path: ``sqlite:///tasks.db`` is relative to the
            current folder, ``sqlite:////var/lib/app/tasks.db`` absolute).
        durability: "normal" survives process crashes, "full" also power loss.
        busy_timeout_s: how long to wait for a lock another connection holds.
        pipelines: the pipelines the runtime defines (see `Journal`); a journal
            holding unfinished tasks of others is refused. None skips the check.

    Raises:
        ConfigError: `target` is a URL of a scheme no store supports, or a malformed one.
        JournalError: the journal cannot be opened for writing (see `Journal`).
        ValueError: `durability` or `busy_timeout_s` is not allowed.
    """
    return Journal(_sqlite_path(target), durability=durability, busy_timeout_s=busy_timeout_s, pipelines=pipelines)


def open_reader(target: str | os.PathLike[str], *, busy_timeout_s: float = 2.0) -> ReaderStore:
    """Open the journal at `target` read-only (`target` as for `open_store`); safe while a runtime writes it.

    Raises:
        ConfigError: `target` is a URL of a scheme no store supports, or a malformed one.
        JournalError: the journal cannot be read (missing, not a journal, a newer schema, ...).
    """
    return JournalReader(_sqlite_path(target), busy_timeout_s=busy_timeout_s)


def _sqlite_path(target: str | os.PathLike[str]) -> str:
    """The SQLite file `target` names; ConfigError for any other URL."""
    if not isinstance(target, str):
        return os.fspath(target)  # a path object is a path, whatever it holds
    path = target
    match = _URL.fullmatch(path)
    if match is None:
        return path
    scheme = match.group(1).lower()
    supported = ", ".join(f"{name}:///PATH" for name in SUPPORTED_SCHEMES)
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"journal URL {_redacted(path)!r}: no journal store for the scheme {scheme!r}; "
            f"supported: a file path, or {supported}"
        )
    rest = match.group(2)
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"journal URL {_redacted(path)!r} names no file: write {_SQLITE_PREFIX}PATH (three slashes, then the "
            f"path: {_SQLITE_PREFIX}tasks.db relative to the current folder, {_SQLITE_PREFIX}/abs/tasks.db absolute)"
        )
    return rest[1:]


def _redacted(url: str) -> str:
    """`url` without the password of its user info, if it has one (``scheme://user:***@host``)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)
