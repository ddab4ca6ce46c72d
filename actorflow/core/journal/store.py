"""The store seam: what the StateActor and the journal's readers need of a journal, whatever holds it.

A store keeps every task's current record, its append-only transition log, and
the HTTP API's Idempotency-Keys. It has two sides:

- `WriterStore`, the one writer of a journal, owned by the StateActor: only its
  thread calls it, so it needs no lock (and has none). It commits batches, one
  transaction each (new tasks, accepted transitions, and the keys of the new
  tasks, so that a key exists if and only if its task does); tries a batch
  without committing it (the StateActor halves a refused batch this way to find
  the task at fault); reads records back (at recovery, and evicted terminal
  ones); and says when it is lost for good.
- `ReaderStore`, read-only access for inspection, the API's Idempotency-Keys and
  tests: any number of them, thread-safe, alongside the writer.

What a store raises (from `actorflow.core.errors`, re-exported here)::

    JournalError        the store cannot be used now: opening failed, or a batch was
                        refused for a reason that may pass (I/O, a full disk, a lock);
                        nothing of the batch was written
    └── UnstorableValue the batch holds a change no retry can store (a value that cannot
                        be encoded or is too big, a broken constraint); it names the
                        task when it can (`task_id`); nothing of the batch was written

and `ValueError` for a call that breaks its contract (a transition that is not in
its record's history, a key whose task is not created in the batch).

An implementation is one module: `sqlite.py` (with `reader.py`) today.
`actorflow.core.journal.open_store` and `open_reader` pick it by URL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Final, NamedTuple, Protocol, Self

from actorflow.core.config import Durability
from actorflow.core.errors import JournalError, UnstorableValue
from actorflow.core.types import TaskRecord, TaskState, Transition

__all__ = [
    "KEY_RETENTION_S",
    "MAX_KEYS",
    "Change",
    "Durability",
    "IdempotencyKey",
    "JournalError",
    "ReaderStore",
    "RecordSource",
    "UnstorableValue",
    "WriterStore",
]

KEY_RETENTION_S: Final = 24 * 3600.0
"""An Idempotency-Key is remembered this long after the task it created (wall-clock time, across restarts)."""
MAX_KEYS: Final = 100_000
"""At most this many Idempotency-Keys are kept; the oldest are forgotten first."""

Change = tuple[TaskRecord, Transition]
"""An accepted transition, with the task's record right after it."""


class IdempotencyKey(NamedTuple):
    """An HTTP Idempotency-Key, written in the same transaction as the task it created."""

    key: str
    task_id: str
    """The task the key created: it must be created in the same batch."""
    fingerprint: str
    """The fingerprint of the request's payload (a retry with another payload is refused)."""


class RecordSource(Protocol):
    """Reading task records: what the writer and the readers both offer."""

    def get(self, task_id: str) -> TaskRecord | None:
        """The record of `task_id`, history included, exactly as it was written; None if unknown."""
        ...

    def contains(self, task_id: str) -> bool:
        """True if the journal has a task with this id."""
        ...

    def records(
        self,
        *,
        state: TaskState | None = None,
        terminal: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[TaskRecord]:
        """Records ordered by `created_at`, then insertion order (`newest_first` reverses it).

        Args:
            state: only tasks in this state.
            terminal: True for only terminal tasks, False for only live ones, None for both.
            limit: at most this many records (None for all).
            offset: skip this many matching records first.
            newest_first: the reverse order, so that ``limit=N`` gives the N newest.

        Raises:
            ValueError: `state`, `limit` or `offset` is not allowed.
            JournalError: the journal cannot be read, or a row is damaged (the message names it).
        """
        ...

    def iter_records(self, *, terminal: bool | None = None, batch: int = 1000) -> Iterator[TaskRecord]:
        """Every (matching) record in `records` order, read `batch` at a time (memory stays bounded)."""
        ...

    def counts(self) -> dict[str, int]:
        """Tasks per state name, every state present (0 when none)."""
        ...

    def close(self) -> None:
        """Let go of the journal. Idempotent."""
        ...


class ReaderStore(RecordSource, Protocol):
    """Read-only access to a journal, safe while a runtime writes it; thread-safe; a context manager."""

    @property
    def location(self) -> str:
        """What this store reads, for messages: a file path, or a URL without its password."""
        ...

    @property
    def closed(self) -> bool:
        """True once `close` was called."""
        ...

    def states(self) -> list[str]:
        """Every state name the journal knows: the seed's, then any other a task ever reached (sorted)."""
        ...

    def pipelines(self) -> dict[str, int]:
        """Tasks per pipeline name."""
        ...

    def find_key(self, key: str) -> tuple[str, str] | None:
        """The task an Idempotency-Key created and its payload's fingerprint; None if unknown or expired."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


class WriterStore(RecordSource, Protocol):
    """The one writer of a journal, owned by the StateActor (only its thread calls it)."""

    @property
    def lost(self) -> str | None:
        """Why the journal can no longer be written, for good (its file deleted or replaced...); None while it can.

        Once set, every write raises `JournalError`: the runtime fails rather than acknowledge
        what it cannot keep.
        """
        ...

    def write_batch(
        self, created: Sequence[TaskRecord], changed: Sequence[Change], keys: Sequence[IdempotencyKey] = ()
    ) -> None:
        """Commit new tasks, accepted transitions and the new tasks' keys in one transaction.

        For each record in `created`: its row, and its whole `history` (usually the single
        creation entry). Then for each ``(record_after, transition)`` in `changed`, in order:
        the transition at its index in ``record_after.history``, and the task's row set from
        ``record_after``. A task may be created and changed in one batch; pass it to `created`
        as it was when created. Each of `keys` names a task of `created`.

        Raises:
            UnstorableValue: the batch holds a change no retry can store; nothing was written.
            JournalError: the batch was refused for a reason that may pass; nothing was
                written, and the store can be used again (e.g. to retry).
            ValueError: a transition is not in its record's history, or a key's task is not in `created`.
        """
        ...

    def check_batch(
        self, created: Sequence[TaskRecord], changed: Sequence[Change], keys: Sequence[IdempotencyKey] = ()
    ) -> None:
        """Whether `write_batch` would take this batch; writes nothing either way, raises what it raises."""
        ...
