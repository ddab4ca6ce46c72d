"""Messages between actorflow's actors. Every one is frozen data (no shared mutable state).

They are NamedTuples, as pykka's own messages are: as immutable as a frozen dataclass and about eight
times cheaper to build (a frozen dataclass's __init__ pays an object.__setattr__ per field), which
matters on the hot path where a task makes a dozen of them.

Flow of one task (→ is a tell; nothing blocks in a handler)::

    Runtime.submit ─CreateTask─► StateActor ─TasksCreated─► Orchestrator
    Orchestrator ─RunService─► worker ─ServiceDone─► Orchestrator
        (or several at once: ─RunServices─► worker ─ServicesDone─►)
    Orchestrator ─TransitionBatch─► StateActor ─TransitionsApplied─► Orchestrator
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import pykka

from actorflow.core.tracing import TraceContext
from actorflow.core.types import DEFAULT_PIPELINE, JSONValue, Task, TaskRecord, TaskState

__all__ = [
    "MESSAGE_TYPES",
    "CallDeadline",
    "CancelTask",
    "CreateTask",
    "CreateTasks",
    "JournalRetryDue",
    "Outcome",
    "PoolCoolDownOver",
    "ResumeTasks",
    "RetryDue",
    "RunService",
    "RunServices",
    "ServiceDone",
    "ServicesDone",
    "TasksCreated",
    "TransitionBatch",
    "TransitionOutcome",
    "TransitionRequest",
    "TransitionsApplied",
    "WorkerDied",
]


# --- to the StateActor ---------------------------------------------------------------------------


class CreateTask(NamedTuple):
    """Create a task. `reply` gets the committed record (or the error); `notify` gets TasksCreated."""

    task_id: str
    payload: Mapping[str, JSONValue]
    trace: TraceContext
    """The task's span: its trace id, its own span id, and the submitter's span as parent."""
    reply: pykka.Future[TaskRecord] | None = None
    notify: pykka.ActorRef[Any] | None = None
    pipeline: str = DEFAULT_PIPELINE
    """The name of the pipeline the task runs through (the state actor checks it knows it)."""
    idempotency_key: tuple[str, str] | None = None
    """(key, payload fingerprint) of the request that created the task: with a journal, the state actor
    writes it in the same transaction as the task, so that it exists if and only if the task does."""


class CreateTasks(NamedTuple):
    """Create several tasks, all or none, committed in one transaction (`Runtime.submit_many`).

    `reply` gets their committed records, in order, or the error naming the first refused one by
    its index in `tasks` (nothing is created then). The tasks' own `reply` fields are unused.
    """

    tasks: tuple[CreateTask, ...]
    reply: pykka.Future[tuple[TaskRecord, ...]] | None = None


class TransitionRequest(NamedTuple):
    """Move a task to `to_state`, if the table allows it and it is still in `expected`."""

    task_id: str
    to_state: TaskState
    reason: str | None = None
    expected: TaskState | None = None
    result: JSONValue = None
    error: str | None = None
    calls: int | None = None
    retries: int | None = None
    value: JSONValue = None
    """The value the stage entered with this state gets, if not the payload (kept for resuming)."""
    traceback: str | None = None
    """The last failed service call's formatted traceback, kept in the record."""


class TransitionBatch(NamedTuple):
    """Several transition requests, applied in order and committed together."""

    requests: tuple[TransitionRequest, ...]
    reply_to: pykka.ActorRef[Any] | None = None


# --- from the StateActor -------------------------------------------------------------------------


class TasksCreated(NamedTuple):
    """These tasks are committed in state CREATED: start their pipelines."""

    records: tuple[TaskRecord, ...]


Outcome = Literal["accepted", "rejected", "journal_failed"]


class TransitionOutcome(NamedTuple):
    """What became of one TransitionRequest, after the commit."""

    request: TransitionRequest
    outcome: Outcome
    record: TaskRecord | None
    why: str | None = None


class TransitionsApplied(NamedTuple):
    """The outcomes of one or more TransitionBatches, in order."""

    outcomes: tuple[TransitionOutcome, ...]


# --- orchestrator and workers --------------------------------------------------------------------


class RunService(NamedTuple):
    """Run one service call. `call_id` is unique per call, retries included."""

    call_id: int
    service: str
    task: Task
    trace: TraceContext
    attempt: int
    value: JSONValue = None
    """The value handed to the stage; None means the payload (the first stage's value)."""
    pipeline: str = DEFAULT_PIPELINE
    """The task's pipeline (`service` names the stage's pool)."""
    dispatched_at: float = 0.0
    """Wall-clock time the orchestrator dispatched the call (for queue-wait metrics; stays in this process)."""
    max_value_bytes: int | None = None
    """The most the stage's value may take as JSON (`RuntimeConfig.max_value_bytes`); None for no limit.

    It travels with the call, so that the worker, wherever it runs, refuses a larger value where it is
    made: such a value never crosses a pipe or Ray's object store, and fails its task as any exception
    of the stage would (permanently, charged once)."""


class RunServices(NamedTuple):
    """Several calls for one thread worker in one message, run in order (each as a `RunService` would be)."""

    calls: tuple[RunService, ...]


ServiceStatus = Literal["ok", "permanent", "transient", "crashed"]


class ServiceDone(NamedTuple):
    """A worker's report of one call. `crashed` means a BaseException: the worker must be replaced."""

    call_id: int
    service: str
    task_id: str
    worker: str
    status: ServiceStatus
    result: JSONValue = None
    """What the stage returned: the next stage's value; None passes the value on."""
    error_type: str | None = None
    error: str | None = None
    duration_ms: float = 0.0
    node: str = ""
    started_at: float = 0.0
    """Wall-clock time (seconds since the epoch) the call started; 0.0 if unknown."""
    traceback: str | None = None
    """A failed call's formatted traceback (bounded: `core.failures.MAX_TRACEBACK_CHARS`)."""


class ServicesDone(NamedTuple):
    """Several reports in one message: a worker that had more than one result ready sends them together."""

    dones: tuple[ServiceDone, ...]


class WorkerDied(NamedTuple):
    """A worker stopped without being asked to."""

    worker: str
    why: str
    cannot_load: bool = False
    """It could not load the stage's function (`why` says why): its calls fail at once, with `why`."""


class RetryDue(NamedTuple):
    """A retry's backoff has elapsed."""

    task_id: str
    call_id: int


class JournalRetryDue(NamedTuple):
    """The orchestrator's backoff after a journal refusal has elapsed: send the held transitions again."""

    step: int


class PoolCoolDownOver(NamedTuple):
    """A failing pool's cool-down has passed: it may start workers again."""

    service: str


class CallDeadline(NamedTuple):
    """A service call's stage timeout has elapsed (if it is still running, it timed out)."""

    call_id: int


class CancelTask(NamedTuple):
    """Cancel a task; `reply` gets True once it is CANCELLED (by this request or another), else False."""

    task_id: str
    reply: pykka.Future[bool]


class ResumeTasks(NamedTuple):
    """Recovered non-terminal tasks: continue each from its last committed state."""

    records: tuple[TaskRecord, ...]


MESSAGE_TYPES: frozenset[type] = frozenset(
    {
        CreateTask,
        CreateTasks,
        TransitionRequest,
        TransitionBatch,
        TasksCreated,
        TransitionOutcome,
        TransitionsApplied,
        RunService,
        RunServices,
        ServiceDone,
        ServicesDone,
        WorkerDied,
        RetryDue,
        JournalRetryDue,
        CallDeadline,
        PoolCoolDownOver,
        CancelTask,
        ResumeTasks,
    }
)
"""Every message type above: actors hand these straight to on_receive."""
