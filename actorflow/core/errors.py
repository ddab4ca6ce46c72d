"""Every error actorflow raises, under one base class.

The tree::

    ActorflowError
    ├── ConfigError            a RuntimeConfig field, a Stage, a Pipeline or a ServiceSet entry is wrong
    ├── InvalidTransition      the transition table or `expected` forbids the change
    ├── TaskNotFound           no task has that id (also a KeyError)
    ├── SubmissionRefused      `submit` created nothing, because of the submission or the load:
    │   │                      the same runtime takes other work
    │   ├── InvalidPayload     a submitted payload is not a JSON mapping, or its id is taken
    │   │   │                  (also a ValueError)
    │   │   ├── ValidationError  the seed's validator rejected the payload (it fails its task)
    │   │   └── ValueTooLarge  a payload, or a value a stage returned, is over
    │   │                      `RuntimeConfig.max_value_bytes`
    │   ├── UnknownPipeline    no pipeline of the runtime has that name (also a LookupError)
    │   └── Overloaded         backpressure: too many tasks in flight
    ├── RuntimeUnavailable     the runtime cannot serve the call at all
    │   ├── RuntimeStopped     it was closed (or this process is a fork() child of its own)
    │   ├── RuntimeFailed      it lost what it cannot rebuild (its state actor without a
    │   │                      journal, or its journal file); it accepts no more work and
    │   │                      releases every waiter
    │   └── RuntimeNotAnswering  its actors did not answer a request in time (also a TimeoutError)
    ├── TaskTimeout            `handle.result(timeout=)` ran out before the task was terminal
    │                          (also a TimeoutError); the task goes on
    ├── WouldDeadlock          a blocking call on a thread it would wait for (a subscriber
    │                          callback, a service): raised at once instead of hanging
    ├── JournalError           the journal is unusable (not a database, newer schema,
    │   │                      locked, I/O failure); from `submit`, nothing was created
    │   └── UnstorableValue    the journal refuses one task's change for good (a value it
    │                          cannot encode or store): that task alone fails, or is not created
    └── TransientError         raised by a stage function: "retry me" (with backoff, up to
                               max_attempts); any other exception fails the task at once

The parents are additional base classes: ``except InvalidPayload`` and the
builtin ones (``except TimeoutError``, ``except KeyError``) catch what they
always caught. `JournalError` and `UnstorableValue` are not `SubmissionRefused`,
though `submit` may raise them: they are the store's verdict (a full disk, a
row it cannot hold), raised by reads and at start-up too, not a check of the
submission; catch them beside `SubmissionRefused` to handle every refusal.

Every message names what was wrong, with the value, and what is allowed. A value
that came from a user is quoted through `quote()`, which bounds its length: a
10 MB task id must not make a 10 MB message (nor log line, nor HTTP answer).
"""

from __future__ import annotations

import reprlib

__all__ = [
    "QUOTE_LIMIT",
    "ActorflowError",
    "ConfigError",
    "InvalidPayload",
    "InvalidTransition",
    "JournalError",
    "Overloaded",
    "RuntimeFailed",
    "RuntimeNotAnswering",
    "RuntimeStopped",
    "RuntimeUnavailable",
    "SubmissionRefused",
    "TaskNotFound",
    "TaskTimeout",
    "TransientError",
    "UnknownPipeline",
    "UnstorableValue",
    "ValidationError",
    "ValueTooLarge",
    "WouldDeadlock",
    "quote",
]

QUOTE_LIMIT = 80
"""How many characters of a user's value an error message quotes (`quote`)."""

_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel = 2
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 4
_REPR.maxstring = 32  # a str inside a container
_REPR.maxother = QUOTE_LIMIT


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as ``repr()`` shows it, cut to about `limit` characters, to quote a user's input in a message.

    A longer str or bytes keeps its first `limit` characters, then ``...`` and its length,
    e.g. ``'xxxx'... (10,000,000 chars)``; a container shows its first few items; a value
    whose ``repr()`` raises is named by its type. Never costs more than the part it shows.
    """
    if isinstance(value, str):
        return repr(str(value)) if len(value) <= limit else f"{str(value[:limit])!r}... ({len(value):,} chars)"
    if isinstance(value, (bytes, bytearray)):
        shown = bytes(value[:limit])
        return repr(bytes(value)) if len(value) <= limit else f"{shown!r}... ({len(value):,} bytes)"
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ (or an int too long for str()) must not break the message
        if isinstance(value, int):
            return f"<an int of {value.bit_length():,} bits>"
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit + 3 else f"{text[:limit]}... ({type(value).__name__})"


class ActorflowError(Exception):
    """Base class of every error raised by actorflow."""


class ConfigError(ActorflowError):
    """A configuration value is invalid. The message names the field."""


class InvalidTransition(ActorflowError):
    """A state change was refused; the task was left exactly as it was."""

    def __init__(self, message: str, *, task_id: str = "", from_state: str = "", to_state: str = "") -> None:
        super().__init__(message)
        self.task_id = task_id
        self.from_state = from_state
        self.to_state = to_state


class TaskNotFound(ActorflowError, KeyError):
    """No task with the given id exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SubmissionRefused(ActorflowError):
    """`submit` (or `submit_many`) created nothing, because of what was submitted or of the load.

    The parent of `InvalidPayload`, `UnknownPipeline` and `Overloaded`: the runtime is
    well and takes other work; this submission, as it is, was refused (an `Overloaded`
    one may be accepted later). The message says why.
    """


class UnknownPipeline(SubmissionRefused, LookupError):
    """A task was submitted to a pipeline the runtime does not define. The message names the known ones."""

    def __init__(self, name: object, known: list[str]) -> None:
        super().__init__(f"no pipeline {quote(name)} in this runtime; its pipelines: {', '.join(map(repr, known))}")
        self.name = name
        self.known = known


class InvalidPayload(SubmissionRefused, ValueError):
    """A submitted payload (or task id) cannot be accepted."""


class ValidationError(InvalidPayload):
    """The seed pipeline's validator rejected a payload (its task fails). The message names the field."""


class ValueTooLarge(InvalidPayload):
    """A value is larger, encoded as JSON, than a task may store (`RuntimeConfig.max_value_bytes`).

    Raised by `submit` for a payload (nothing is created); a stage that returns such a value
    fails its task with this error's name and message (charged once: a retry would return it again).
    """


class Overloaded(SubmissionRefused):
    """Backpressure: the runtime is at `max_in_flight` and could not accept the task."""


class RuntimeUnavailable(ActorflowError):
    """The runtime cannot serve the call: it is closed, it failed, or its actors do not answer.

    The parent of `RuntimeStopped`, `RuntimeFailed` and `RuntimeNotAnswering`: whatever the
    call was, nothing of it happened (a submission created nothing).
    """


class RuntimeStopped(RuntimeUnavailable):
    """The runtime was closed; it accepts no more work."""


class RuntimeFailed(RuntimeUnavailable):
    """The runtime failed for good: pending `result()`/`join()` raise it, and so does `submit()`.

    Raised when a central actor dies and cannot be rebuilt (the StateActor of a
    runtime without a journal), or when the journal file is deleted or replaced
    while the runtime runs. The message names what was lost.
    """


class RuntimeNotAnswering(RuntimeUnavailable, TimeoutError):
    """The runtime's actors did not answer a request (a read, a cancel) in time.

    Also a `TimeoutError`. The runtime may be overwhelmed rather than gone: the call
    may be made again.
    """


class TaskTimeout(ActorflowError, TimeoutError):
    """`TaskHandle.result(timeout=)` ran out of time before the task was terminal.

    Also a `TimeoutError`. Only the wait ended: the task runs on, and `result()`
    may be called again. `task_id` and `timeout` say which wait it was.
    """

    def __init__(self, message: str, *, task_id: str = "", timeout: float | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.timeout = timeout


class WouldDeadlock(ActorflowError):
    """A blocking call was made on a thread it would have to wait for, so it raised at once.

    Subscriber callbacks run on the state actor's thread, and services on worker
    threads: a call that waits for an answer only that thread can give, or for
    tasks that need it, would hang there. The message says what to do instead.
    """


class JournalError(ActorflowError):
    """The journal database cannot be used. The message names the path and the fault."""


class UnstorableValue(JournalError):
    """The journal refused a change for a reason in its data, which no retry can cure.

    A value that cannot be encoded, a row over SQLite's length limit, a broken
    constraint: unlike a full disk or a lock, the same batch would be refused
    again. The state actor finds the task at fault (`task_id`, when the journal
    could name it), fails it alone, and commits the rest of the batch; a
    creation at fault is refused to its submitter with this error.
    """

    def __init__(self, message: str, *, task_id: str | None = None, fault: str = "") -> None:
        super().__init__(message)
        self.task_id = task_id
        """The task whose change was refused, when the journal could tell (else None: the batch is split)."""
        self.fault = fault or message
        """What was wrong, without the path: fit for a task's error."""


class TransientError(ActorflowError):
    """Raise it from a stage function to say "retry me": the failure may pass (a busy upstream, a timeout).

    The stage is called again, with `Task.attempt` one higher, after a backoff
    (`retry_backoff_s`, doubled per attempt with full jitter, capped at
    `retry_backoff_max_s`), up to `max_attempts` calls; then the task fails with
    this error. Any other exception fails the task at once. A call that runs past
    its stage's `timeout_s` is retried the same way.
    """
