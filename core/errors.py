"""Every error actorflow raises, under one base class.

The tree::

    ActorflowError
    ├── ConfigError            a RuntimeConfig field or a ServiceSet entry is wrong
    ├── InvalidTransition      the transition table or `expected` forbids the change
    ├── TaskNotFound           no task has that id
    ├── UnknownPipeline        no pipeline of the runtime has that name
    ├── InvalidPayload         a submitted payload is not a JSON mapping, or its id is taken
    │   └── ValidationError    the validator service rejected the payload
    ├── RuntimeStopped         the runtime was closed
    ├── Overloaded             backpressure: too many tasks in flight
    ├── JournalError           the SQLite journal is unusable (not a database, newer
    │                          schema, locked, I/O failure)
    └── TransientError         raised by a service to ask for a retry

Every message names what was wrong, with the value, and what is allowed.
"""

from __future__ import annotations

__all__ = [
    "ActorflowError",
    "ConfigError",
    "InvalidPayload",
    "InvalidTransition",
    "JournalError",
    "Overloaded",
    "RuntimeStopped",
    "TaskNotFound",
    "TransientError",
    "UnknownPipeline",
    "ValidationError",
]


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


class UnknownPipeline(ActorflowError, LookupError):
    """A task was submitted to a pipeline the runtime does not define. The message names the known ones."""

    def __init__(self, name: object, known: list[str]) -> None:
        super().__init__(f"no pipeline {name!r} in this runtime; its pipelines: {', '.join(map(repr, known))}")
        self.name = name
        self.known = known


class InvalidPayload(ActorflowError, ValueError):
    """A submitted payload (or task id) cannot be accepted."""


class ValidationError(InvalidPayload):
    """The validator service rejected a payload. The message names the field."""


class RuntimeStopped(ActorflowError):
    """The runtime was closed; it accepts no more work."""


class Overloaded(ActorflowError):
    """Backpressure: the runtime is at `max_in_flight` and could not accept the task."""


class JournalError(ActorflowError):
    """The journal database cannot be used. The message names the path and the fault."""


class TransientError(ActorflowError):
    """Raised by a service to ask for the stage to be retried (with backoff)."""
