"""The names of actorflow's structured events and of its milestones, declared once.

Two vocabularies, both part of the runtime's outer contract:

* **Log events**: the ``event`` field of every line the runtime logs through
  its `EventLogger` (see `actorflow.core.tracing`). Operators filter on them,
  and ``actorflow trace`` reads them back. Every event also carries ``actor``
  (who emitted it: ``runtime``, ``state``, ``orchestrator``, ``api``, a backend,
  or a worker such as ``processor-2``), and the logging door adds ``level`` and
  ``timestamp``. The fields listed for each event are the ones it carries
  besides those.
* **Milestones**: the ``name`` of each `Milestone` handed to
  ``Runtime(on_milestone=...)``. Tests and operators wait on them instead of
  polling `stats()`. They are delivered only to a listener; a milestone with
  the same name as a log event is reached at the same moment, with fewer fields.

The emitters and the trace viewer import these constants; nothing else in the
package spells a name out (a test checks it). The strings themselves never
change: they are what logs and listeners already see. Constants are plain
module globals, so naming an event costs nothing per event.

Log events are grouped below by their emitter; the milestones follow, then the
names only logs of earlier versions hold.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ASYNC_CALLS_ABANDONED",
    "ASYNC_CALL_ABANDONED",
    "ASYNC_LOOP_ERROR",
    "DEAD_LETTER",
    "EARLIER_EVENTS",
    "EVENTS_UNSUBSCRIBE_FAILED",
    "HTTP_UNHANDLED_ERROR",
    "JOURNAL_FAILED_IN_MEMORY_ONLY",
    "JOURNAL_LOST",
    "JOURNAL_RECOVERED",
    "JOURNAL_UNSTORABLE",
    "JOURNAL_WRITE_FAILED",
    "LOG_EVENTS",
    "LOG_EVENTS_DROPPED",
    "LOG_RENDER_FAILED",
    "MILESTONES",
    "MILESTONE_CALL_QUEUED",
    "MILESTONE_CALL_WITHDRAWN",
    "MILESTONE_JOURNAL_DEGRADED",
    "MILESTONE_JOURNAL_LOST",
    "MILESTONE_JOURNAL_RECOVERED",
    "MILESTONE_JOURNAL_RETRY_SCHEDULED",
    "MILESTONE_JOURNAL_UNSTORABLE",
    "MILESTONE_ORCHESTRATOR_DIED",
    "MILESTONE_ORCHESTRATOR_RESTARTED",
    "MILESTONE_POOL_FAILING",
    "MILESTONE_POOL_RECOVERED",
    "MILESTONE_RUNTIME_FAILED",
    "MILESTONE_SERVICE_LATE_RESULT",
    "MILESTONE_SERVICE_RETRY_SCHEDULED",
    "MILESTONE_STATE_DIED",
    "MILESTONE_STATE_RESTARTED",
    "MILESTONE_WORKER_RESTARTED",
    "ON_MILESTONE_FAILED",
    "ORCHESTRATOR_DIED",
    "ORCHESTRATOR_ERROR",
    "POOL_FAILING",
    "POOL_RECOVERED",
    "PROCESS_BACKEND_CLOSE_SLOW",
    "PROCESS_BACKEND_IN_PARENT",
    "RAY_BACKEND_STARTED",
    "RAY_BACKEND_STOPPED",
    "RAY_BATCH_LOST",
    "RAY_INVOCATION_DONE",
    "RAY_REPORT_FAILED",
    "RAY_SPARES_REPLACED",
    "RAY_WORKERS_NOT_READY",
    "RAY_WORK_FAILED",
    "RUNTIME_FAILED",
    "RUNTIME_STARTED",
    "RUNTIME_STOPPED",
    "SERVICE_CALL",
    "SERVICE_FAILED",
    "SERVICE_FINISHED",
    "SERVICE_RETRY_SCHEDULED",
    "SERVICE_STARTED",
    "SERVICE_TIMEOUT",
    "STATE_CREATE_FAILED",
    "STATE_DIED",
    "STATE_ERROR",
    "STATE_TRANSITION_FAILED",
    "SUBSCRIBER_FAILED",
    "TASKS_SUBMIT_REFUSED",
    "TASK_CANCELLED",
    "TASK_COMPLETED",
    "TASK_FAILED",
    "TASK_FAIL_REFUSED",
    "TASK_RECOVERED",
    "TASK_SUBMITTED",
    "TASK_SUBMIT_REFUSED",
    "TASK_TRANSITION",
    "TASK_TRANSITION_REJECTED",
    "TASK_UNKNOWN_PIPELINE",
    "TELEMETRY_SPANS_DROPPED",
    "TELEMETRY_SPAN_FAILED",
    "TERMINAL_HOOK_FAILED",
    "TIMER_CALLBACK_FAILED",
    "WORKER_FORWARDING_FAILED",
    "WORKER_KILLED",
    "WORKER_LOAD_FAILED",
    "WORKER_RESTARTED",
    "WORKER_UNKILLABLE",
]

# --- submission (actor "runtime", on the submitter's thread) ---------------------------------------

TASK_SUBMITTED: Final = "task.submitted"
"""DEBUG. `submit()` or `submit_many()` was called, before the task is committed.

Fields: ``task_id``, ``trace_id``, ``span_id``, ``parent_span_id`` (the submitter's span, from a
traceparent), ``pipeline``."""

TASK_SUBMIT_REFUSED: Final = "task.submit_refused"
"""WARNING. A submitted task was not created: the StateActor stopped, or refused it (a journal refusing writes).

At most one line per interval: ``suppressed`` counts those left out since the last one.
Fields: ``task_id``, ``trace_id``, ``error_type``, ``error``, ``suppressed``."""

TASKS_SUBMIT_REFUSED: Final = "tasks.submit_refused"
"""WARNING. As `TASK_SUBMIT_REFUSED`, for a whole `submit_many()` batch.

Fields: ``tasks`` (how many), ``first_task_id``, ``error_type``, ``error``, ``suppressed``."""

# --- the StateActor (actor "state") --------------------------------------------------------------

TASK_TRANSITION: Final = "task.transition"
"""DEBUG. A state change was committed (creation included), in commit order.

Fields: ``task_id``, ``trace_id``, ``from_state`` (null at creation), ``to_state``, ``reason``,
``calls``, ``pipeline``. ``actorflow trace`` checks these lines against the pipeline's table."""

TASK_TRANSITION_REJECTED: Final = "task.transition_rejected"
"""WARNING. A state change was refused (not in the table, or the task had moved on); the task did not move.

Fields: ``task_id``, ``trace_id``, ``from_state`` (the task's state then), ``to_state`` (asked
for), ``expected``, ``why``."""

STATE_ERROR: Final = "state.error"
"""ERROR. Handling a message raised; the StateActor carries on.

Fields: ``error_type``, ``error``, ``message`` (its type)."""

STATE_CREATE_FAILED: Final = "state.create_failed"
"""ERROR. Creating a task (``task_id``) or a batch (``tasks``, how many) raised; the submitter gets the error.

Fields: ``task_id`` or ``tasks``, ``error``."""

STATE_TRANSITION_FAILED: Final = "state.transition_failed"
"""ERROR. Applying one transition request raised; it is refused, and its sender fails the task.

Fields: ``task_id``, ``error``."""

TERMINAL_HOOK_FAILED: Final = "terminal_hook.failed"
"""ERROR. The runtime's callback for a task reaching a terminal state raised.

Fields: ``task_id``, ``error``."""

SUBSCRIBER_FAILED: Final = "subscriber.failed"
"""ERROR. A transition subscriber (`Runtime.subscribe`) raised.

Fields: ``token``, ``error_type``, ``error``."""

JOURNAL_WRITE_FAILED: Final = "journal.write_failed"
"""ERROR. The journal refused a batch for a reason that may pass (a full disk); writes are retried with backoff.

Fields: ``step`` (consecutive failures), ``retry_in_s``, ``error``."""

JOURNAL_RECOVERED: Final = "journal.recovered"
"""INFO. The journal accepts writes again after failing.

Fields: ``failed_steps``."""

JOURNAL_LOST: Final = "journal.lost"
"""ERROR. The journal is gone for good (its file replaced or removed): the runtime fails.

Fields: ``error``."""

JOURNAL_UNSTORABLE: Final = "journal.unstorable"
"""ERROR. The journal refused one task's change for good: the task fails, or its creation is refused.

Fields: ``task_id``, ``fault``."""

JOURNAL_FAILED_IN_MEMORY_ONLY: Final = "journal.failed_in_memory_only"
"""ERROR. Even the FAILED change made for an unstorable task was refused: it is FAILED in memory only.

Fields: ``task_id``, ``fault``."""

# --- the orchestrator (actor "orchestrator") -----------------------------------------------------

TASK_COMPLETED: Final = "task.completed"
"""INFO. A task reached COMPLETED.

Fields: ``task_id``, ``trace_id``, ``state``, ``duration_ms`` (from its start in this runtime),
``calls``, ``retries``, ``pipeline``."""

TASK_FAILED: Final = "task.failed"
"""INFO. A task reached FAILED.

Fields: those of `TASK_COMPLETED`, and ``error``."""

TASK_CANCELLED: Final = "task.cancelled"
"""INFO. A task reached CANCELLED.

Fields: those of `TASK_COMPLETED`."""

TASK_RECOVERED: Final = "task.recovered"
"""INFO. A task unfinished in the journal (or held by a replaced orchestrator) resumes.

Fields: ``task_id``, ``trace_id``, ``state``, ``pipeline``."""

TASK_UNKNOWN_PIPELINE: Final = "task.unknown_pipeline"
"""ERROR. A task to resume names a pipeline this runtime does not define: it fails.

Fields: ``task_id``, ``pipeline``."""

TASK_FAIL_REFUSED: Final = "task.fail_refused"
"""ERROR. The StateActor refused to fail a task (the table forbids it; never expected).

Fields: ``task_id``, ``why``."""

ORCHESTRATOR_ERROR: Final = "orchestrator.error"
"""ERROR. A handler raised; the task the message concerns fails.

Fields: ``error_type``, ``error``, and ``message`` (its type) or ``task_id`` (one item of a batch)."""

SERVICE_RETRY_SCHEDULED: Final = "service.retry_scheduled"
"""INFO. A call failed transiently and runs again after a backoff.

Fields: ``task_id``, ``trace_id``, ``service``, ``attempt`` (the next one), ``delay_ms``, ``error``."""

SERVICE_TIMEOUT: Final = "service.timeout"
"""WARNING. A call ran past its stage's timeout: its worker is replaced.

Fields: ``task_id``, ``call_id``, ``service``, ``worker``, ``timeout_s``; ``charged`` (false) when
the call was not surely the one at fault, so that its task is not charged a retry."""

WORKER_RESTARTED: Final = "worker.restarted"
"""WARNING. A worker was replaced (it timed out, crashed or died).

Fields: ``worker``, ``service``, ``why``, ``failing``."""

POOL_FAILING: Final = "pool.failing"
"""ERROR. A pool restarted its workers too often: its circuit breaker opens and it waits out a cool-down.

Fields: ``service``, ``reason``, ``cool_down_s``."""

POOL_RECOVERED: Final = "pool.recovered"
"""INFO. A failing pool's cool-down passed and its workers restarted.

Fields: ``service``, ``workers``."""

# --- service calls (every backend, in the runtime's process; actor: the worker) ------------------

SERVICE_CALL: Final = "service.call"
"""DEBUG. A call succeeded: one event per call, logged when it ends.

Fields: ``task_id``, ``trace_id``, ``span_id``, ``parent_span_id``, ``service``, ``worker``,
``attempt``, ``pipeline`` (for pipelines other than the seed's), ``node`` (processes and Ray),
``status`` (``ok``), ``started_at`` (seconds since the epoch, where the call ran), ``duration_ms``."""

SERVICE_FAILED: Final = "service.failed"
"""WARNING (INFO for a ``ValidationError``: a rejected payload is an outcome, not a fault). A call failed.

Fields: those of `SERVICE_CALL`, with ``status`` ``transient``, ``permanent`` or ``crashed``, and
``error_type``, ``error``, ``transient``, ``traceback``."""

# --- the async backend (actor "async-backend", or the worker) ------------------------------------

ASYNC_LOOP_ERROR: Final = "async.loop_error"
"""WARNING. The backend's event loop reported an error (e.g. an abandoned task destroyed).

Fields: ``message``, ``error_type``, ``error``."""

ASYNC_CALL_ABANDONED: Final = "async.call_abandoned"
"""WARNING. A cancelled call's coroutine ignored its cancellation for the grace time: it is abandoned.

Fields: those of `SERVICE_CALL` that name the call, ``grace_s``, ``retired``."""

ASYNC_CALLS_ABANDONED: Final = "async.calls_abandoned"
"""WARNING. At close, coroutines ignored their cancellation for the grace time.

Fields: ``calls``, ``grace_s``."""

# --- the process backend (actor "process-backend", or the worker) --------------------------------

PROCESS_BACKEND_IN_PARENT: Final = "process_backend.in_parent"
"""INFO. Some stages run in the runtime's own process (the in-memory result store).

Fields: ``services``, ``why``."""

PROCESS_BACKEND_CLOSE_SLOW: Final = "process_backend.close_slow"
"""WARNING. Worker processes were still running when close's time was up.

Fields: ``workers``, ``timeout_s``."""

WORKER_FORWARDING_FAILED: Final = "worker.forwarding_failed"
"""ERROR. A worker's forwarding thread failed; the pool replaces the worker.

Fields: ``worker``, ``error_type``, ``error``."""

WORKER_LOAD_FAILED: Final = "worker.load_failed"
"""ERROR. A worker process cannot load its stage function: its calls fail.

Fields: ``worker``, ``node``, ``error``."""

WORKER_UNKILLABLE: Final = "worker.unkillable"
"""ERROR. A worker process survived terminate and kill.

Fields: ``worker``, ``node``."""

WORKER_KILLED: Final = "worker.killed"
"""INFO. A retired worker process had to be stopped (it exited non-zero).

Fields: ``worker``, ``node``, ``exit_code``."""

# --- the Ray backend (actors "ray" and "ray-waiter", or the worker) ------------------------------

RAY_BACKEND_STARTED: Final = "ray.backend_started"
"""INFO. The Ray backend is ready.

Fields: ``address``, ``started_ray``, ``on_ray``, ``on_head``, ``nodes``."""

RAY_BACKEND_STOPPED: Final = "ray.backend_stopped"
"""INFO. The Ray backend closed.

Fields: ``stopped_ray``, ``calls``, ``invocations``."""

RAY_WORKERS_NOT_READY: Final = "ray.workers_not_ready"
"""WARNING. Ray actors were not ready when the start's time was up.

Fields: ``waiting``, ``timeout_s``."""

RAY_SPARES_REPLACED: Final = "ray.spares_replaced"
"""WARNING. Warm spares on lost nodes were replaced.

Fields: ``spares``, ``lost_nodes``."""

RAY_BATCH_LOST: Final = "ray.batch_lost"
"""WARNING. An actor died holding several calls; none is charged, each runs alone next time.

Fields: ``worker``, ``calls``, ``task_ids``, ``node``, ``error``."""

RAY_INVOCATION_DONE: Final = "ray.invocation_done"
"""DEBUG. A remote invocation answered.

Fields: ``invocation``, ``task_ids``; ``not_run`` when some calls did not run."""

RAY_WORK_FAILED: Final = "ray.work_failed"
"""ERROR. Work queued on the waiter thread raised; the waiter carries on.

Fields: ``error_type``, ``error``."""

RAY_REPORT_FAILED: Final = "ray.report_failed"
"""ERROR. Reporting a finished invocation raised; the waiter carries on.

Fields: ``error_type``, ``error``."""

# --- the runtime (actor "runtime"): lifecycle, supervision, dead letters, hooks, telemetry -------

RUNTIME_STARTED: Final = "runtime.started"
"""INFO. A runtime started.

Fields: ``pools`` (pool -> workers), ``backend``, ``journal``, ``durability``, ``recovered``
(tasks resumed), ``transitions`` (pipeline -> state -> states it may move to: what ``actorflow
trace`` checks each task against)."""

RUNTIME_STOPPED: Final = "runtime.stopped"
"""INFO. A runtime closed.

Fields: ``drained``, ``unfinished``, ``dead_letters``, ``threads_left``."""

RUNTIME_FAILED: Final = "runtime.failed"
"""ERROR. The runtime failed for good (a StateActor lost without a journal, a journal lost).

Fields: ``reason``."""

ORCHESTRATOR_DIED: Final = "orchestrator.died"
"""ERROR. The orchestrator stopped unasked while the StateActor lives: a fresh one replaces it.

Fields: ``why``."""

STATE_DIED: Final = "state.died"
"""ERROR. The StateActor stopped unasked (or was found stopped with the orchestrator): rebuilt from the journal.

Without a journal it cannot be rebuilt: `RUNTIME_FAILED` is logged instead.

Fields: ``why``."""

DEAD_LETTER: Final = "dead_letter"
"""WARNING. A message reached a stopped actor, or a result came late.

Fields: ``to``, ``why``, ``message``, ``task_id``."""

TIMER_CALLBACK_FAILED: Final = "timer.callback_failed"
"""ERROR. Something scheduled on the runtime's timer raised; the timer carries on.

Fields: ``error``."""

ON_MILESTONE_FAILED: Final = "milestone_hook.failed"
"""ERROR. The ``on_milestone`` callback raised; it is ignored. A log event about milestones, not a milestone.

Fields: ``milestone`` (its name), ``error_type``, ``error``."""

TELEMETRY_SPAN_FAILED: Final = "telemetry.span_failed"
"""ERROR. The host's OpenTelemetry SDK raised while a span was recorded.

Fields: ``task_id`` (when known), ``error``."""

TELEMETRY_SPANS_DROPPED: Final = "telemetry.spans_dropped"
"""WARNING. Span endings were dropped: the host's span processors fell behind.

Fields: ``dropped``, ``total``, ``why``."""

# --- the HTTP API (actor "api") ------------------------------------------------------------------

HTTP_UNHANDLED_ERROR: Final = "http.unhandled_error"
"""ERROR. A request raised unexpectedly (answered 500).

Fields: ``method``, ``path``, ``error_type``, ``error``, ``traceback``."""

EVENTS_UNSUBSCRIBE_FAILED: Final = "events.unsubscribe_failed"
"""DEBUG. The HTTP event stream's unsubscribing from its runtime raised (the runtime may be closed already).

Fields: ``error_type``, ``error``."""

# --- the JSON log sink of configure_logging(json=True) (actor "log-sink", written by the sink) ---

LOG_EVENTS_DROPPED: Final = "log.events_dropped"
"""ERROR. The sink's queue was full (a stuck disk): events were dropped.

Fields: ``count``."""

LOG_RENDER_FAILED: Final = "log.render_failed"
"""ERROR. An event could not be rendered as JSON; this line replaces it.

Fields: ``original_event``, ``error``."""

LOG_EVENTS: Final[frozenset[str]] = frozenset(
    {
        TASK_SUBMITTED,
        TASK_SUBMIT_REFUSED,
        TASKS_SUBMIT_REFUSED,
        TASK_TRANSITION,
        TASK_TRANSITION_REJECTED,
        STATE_ERROR,
        STATE_CREATE_FAILED,
        STATE_TRANSITION_FAILED,
        TERMINAL_HOOK_FAILED,
        SUBSCRIBER_FAILED,
        JOURNAL_WRITE_FAILED,
        JOURNAL_RECOVERED,
        JOURNAL_LOST,
        JOURNAL_UNSTORABLE,
        JOURNAL_FAILED_IN_MEMORY_ONLY,
        TASK_COMPLETED,
        TASK_FAILED,
        TASK_CANCELLED,
        TASK_RECOVERED,
        TASK_UNKNOWN_PIPELINE,
        TASK_FAIL_REFUSED,
        ORCHESTRATOR_ERROR,
        SERVICE_RETRY_SCHEDULED,
        SERVICE_TIMEOUT,
        WORKER_RESTARTED,
        POOL_FAILING,
        POOL_RECOVERED,
        SERVICE_CALL,
        SERVICE_FAILED,
        ASYNC_LOOP_ERROR,
        ASYNC_CALL_ABANDONED,
        ASYNC_CALLS_ABANDONED,
        PROCESS_BACKEND_IN_PARENT,
        PROCESS_BACKEND_CLOSE_SLOW,
        WORKER_FORWARDING_FAILED,
        WORKER_LOAD_FAILED,
        WORKER_UNKILLABLE,
        WORKER_KILLED,
        RAY_BACKEND_STARTED,
        RAY_BACKEND_STOPPED,
        RAY_WORKERS_NOT_READY,
        RAY_SPARES_REPLACED,
        RAY_BATCH_LOST,
        RAY_INVOCATION_DONE,
        RAY_WORK_FAILED,
        RAY_REPORT_FAILED,
        RUNTIME_STARTED,
        RUNTIME_STOPPED,
        RUNTIME_FAILED,
        ORCHESTRATOR_DIED,
        STATE_DIED,
        DEAD_LETTER,
        TIMER_CALLBACK_FAILED,
        ON_MILESTONE_FAILED,
        TELEMETRY_SPAN_FAILED,
        TELEMETRY_SPANS_DROPPED,
        HTTP_UNHANDLED_ERROR,
        EVENTS_UNSUBSCRIBE_FAILED,
        LOG_EVENTS_DROPPED,
        LOG_RENDER_FAILED,
    }
)
"""Every log event the package emits."""

# --- milestones (Milestone.name, delivered to Runtime(on_milestone=...)) -------------------------

MILESTONE_CALL_QUEUED: Final = "call.queued"
"""A call was dispatched and no worker started it at once: it waits behind others.

Reached only while someone listens. Fields: ``task_id``, ``service``, ``call_id``."""

MILESTONE_CALL_WITHDRAWN: Final = "call.withdrawn"
"""A cancelled task's call was taken back before any worker started it.

Fields: ``task_id``, ``service``."""

MILESTONE_SERVICE_LATE_RESULT: Final = "service.late_result"
"""A result came for a call already timed out or retired (it is a dead letter too).

Fields: ``task_id``, ``service``."""

MILESTONE_SERVICE_RETRY_SCHEDULED: Final = "service.retry_scheduled"
"""With `SERVICE_RETRY_SCHEDULED`: a call will run again after a backoff.

Fields: ``task_id``, ``service``."""

MILESTONE_WORKER_RESTARTED: Final = "worker.restarted"
"""With `WORKER_RESTARTED`: a worker was replaced.

Fields: ``worker``, ``service``, ``why``."""

MILESTONE_POOL_FAILING: Final = "pool.failing"
"""With `POOL_FAILING`: a pool's circuit breaker opened (health: degraded).

Fields: ``service``, ``reason``."""

MILESTONE_POOL_RECOVERED: Final = "pool.recovered"
"""With `POOL_RECOVERED`: a pool's cool-down passed and its workers restarted.

Fields: ``service``."""

MILESTONE_JOURNAL_DEGRADED: Final = "journal.degraded"
"""The journal began refusing writes (health: degraded); reached once per fault.

Fields: ``reason``."""

MILESTONE_JOURNAL_RETRY_SCHEDULED: Final = "journal.retry_scheduled"
"""With `JOURNAL_WRITE_FAILED`: one per failed commit.

Fields: ``step`` (its backoff step), ``delay_s``."""

MILESTONE_JOURNAL_RECOVERED: Final = "journal.recovered"
"""With `JOURNAL_RECOVERED`: the journal accepts writes again.

No fields."""

MILESTONE_JOURNAL_LOST: Final = "journal.lost"
"""With `JOURNAL_LOST`: the journal is gone for good; the runtime fails.

Fields: ``reason``."""

MILESTONE_JOURNAL_UNSTORABLE: Final = "journal.unstorable"
"""With `JOURNAL_UNSTORABLE`: the journal refused one task's change for good (the task failed, or its creation
was refused).

Fields: ``task_id``."""

MILESTONE_ORCHESTRATOR_DIED: Final = "orchestrator.died"
"""The orchestrator stopped unasked; its replacement starts once the callback returns.

Fields: ``why``."""

MILESTONE_STATE_DIED: Final = "state.died"
"""The StateActor stopped unasked; its replacement starts once the callback returns.

Fields: ``why``."""

MILESTONE_ORCHESTRATOR_RESTARTED: Final = "orchestrator.restarted"
"""A fresh orchestrator replaced one that stopped.

Fields: ``why``, ``resumed`` (tasks it resumed)."""

MILESTONE_STATE_RESTARTED: Final = "state.restarted"
"""The StateActor was rebuilt from the journal, with a fresh orchestrator.

Fields: ``why``, ``resumed``."""

MILESTONE_RUNTIME_FAILED: Final = "runtime.failed"
"""With `RUNTIME_FAILED`: the runtime failed for good.

Fields: ``reason``."""

MILESTONES: Final[frozenset[str]] = frozenset(
    {
        MILESTONE_CALL_QUEUED,
        MILESTONE_CALL_WITHDRAWN,
        MILESTONE_SERVICE_LATE_RESULT,
        MILESTONE_SERVICE_RETRY_SCHEDULED,
        MILESTONE_WORKER_RESTARTED,
        MILESTONE_POOL_FAILING,
        MILESTONE_POOL_RECOVERED,
        MILESTONE_JOURNAL_DEGRADED,
        MILESTONE_JOURNAL_RETRY_SCHEDULED,
        MILESTONE_JOURNAL_RECOVERED,
        MILESTONE_JOURNAL_LOST,
        MILESTONE_JOURNAL_UNSTORABLE,
        MILESTONE_ORCHESTRATOR_DIED,
        MILESTONE_STATE_DIED,
        MILESTONE_ORCHESTRATOR_RESTARTED,
        MILESTONE_STATE_RESTARTED,
        MILESTONE_RUNTIME_FAILED,
    }
)
"""Every milestone name a runtime reaches."""

# --- earlier versions (read by ``actorflow trace`` in old logs; no longer emitted) --------------

SERVICE_STARTED: Final = "service.started"
"""DEBUG, before `SERVICE_CALL` existed: a call started (its end was a `SERVICE_FINISHED` or a `SERVICE_FAILED`)."""

SERVICE_FINISHED: Final = "service.finished"
"""DEBUG, before `SERVICE_CALL` existed: a call that had a `SERVICE_STARTED` line succeeded."""

EARLIER_EVENTS: Final[frozenset[str]] = frozenset({SERVICE_STARTED, SERVICE_FINISHED})
"""Log events of earlier versions that the trace viewer still reads."""
