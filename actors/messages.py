"""Messages between actorflow's actors. Every one is frozen data (no shared mutable state).

Flow of one task (→ is a tell; nothing blocks in a handler)::

    Runtime.submit ─CreateTask─► StateActor ─TasksCreated─► Orchestrator
    Orchestrator ─RunService─► worker ─ServiceDone─► Orchestrator
    Orchestrator ─TransitionBatch─► StateActor ─TransitionsApplied─► Orchestrator
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pykka

from core.tracing import TraceContext
from core.types import JSONValue, Task, TaskRecord, TaskState

__all__ = [
    "CallDeadline",
    "CancelTask",
    "CreateTask",
    "Outcome",
    "ResumeTasks",
    "RetryDue",
    "RunService",
    "ServiceDone",
    "TasksCreated",
    "TransitionBatch",
    "TransitionOutcome",
    "TransitionRequest",
    "TransitionsApplied",
    "WorkerDied",
]


# --- to the StateActor ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateTask:
    """Create a task. `reply` gets the committed record (or the error); `notify` gets TasksCreated."""

    task_id: str
    payload: Mapping[str, JSONValue]
    trace: TraceContext
    """The task's span: its trace id, its own span id, and the submitter's span as parent."""
    reply: pykka.Future[TaskRecord] | None = None
    notify: pykka.ActorRef[Any] | None = None


@dataclass(frozen=True, slots=True)
class TransitionRequest:
    """Move a task to `to_state`, if the table allows it and it is still in `expected`."""

    task_id: str
    to_state: TaskState
    reason: str | None = None
    expected: TaskState | None = None
    result: Mapping[str, JSONValue] | None = None
    error: str | None = None
    attempts: int | None = None


@dataclass(frozen=True, slots=True)
class TransitionBatch:
    """Several transition requests, applied in order and committed together."""

    requests: tuple[TransitionRequest, ...]
    reply_to: pykka.ActorRef[Any] | None = None


# --- from the StateActor -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TasksCreated:
    """These tasks are committed in state CREATED: start their pipelines."""

    records: tuple[TaskRecord, ...]


Outcome = Literal["accepted", "rejected", "journal_failed"]


@dataclass(frozen=True, slots=True)
class TransitionOutcome:
    """What became of one TransitionRequest, after the commit."""

    request: TransitionRequest
    outcome: Outcome
    record: TaskRecord | None
    why: str | None = None


@dataclass(frozen=True, slots=True)
class TransitionsApplied:
    """The outcomes of one or more TransitionBatches, in order."""

    outcomes: tuple[TransitionOutcome, ...]


# --- orchestrator and workers --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunService:
    """Run one service call. `call_id` is unique per call, retries included."""

    call_id: int
    service: str
    task: Task
    trace: TraceContext
    attempt: int
    result: Mapping[str, JSONValue] | None = None
    """The processor's result, for the persistence stage."""


ServiceStatus = Literal["ok", "permanent", "transient", "crashed"]


@dataclass(frozen=True, slots=True)
class ServiceDone:
    """A worker's report of one call. `crashed` means a BaseException: the worker must be replaced."""

    call_id: int
    service: str
    task_id: str
    worker: str
    status: ServiceStatus
    result: Mapping[str, JSONValue] | None = None
    error_type: str | None = None
    error: str | None = None
    duration_ms: float = 0.0
    node: str = ""


@dataclass(frozen=True, slots=True)
class WorkerDied:
    """A worker actor stopped without being asked to."""

    worker: str
    why: str


@dataclass(frozen=True, slots=True)
class RetryDue:
    """A retry's backoff has elapsed."""

    task_id: str
    call_id: int


@dataclass(frozen=True, slots=True)
class CallDeadline:
    """A service call's stage timeout has elapsed (if it is still running, it timed out)."""

    call_id: int


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Cancel a task; `reply` gets True if it was cancelled, False if already terminal."""

    task_id: str
    reply: pykka.Future[bool]


@dataclass(frozen=True, slots=True)
class ResumeTasks:
    """Recovered non-terminal tasks: continue each from its last committed state."""

    records: tuple[TaskRecord, ...]
