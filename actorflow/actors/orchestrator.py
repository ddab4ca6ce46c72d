"""The OrchestratorActor: sequences every task through its pipeline, and never blocks.

It reads the pipeline as data (`core.pipeline`): for each stage, it moves the
task to the stage's state (unless it is there already), runs the stage, and
hands its value on; after the last stage, COMPLETED. For the seed pipeline::

    CREATED ─validate─► VALIDATED ─► PROCESSING ─process─► persist ─► COMPLETED
       any service error, or attempts used up ─────────────────────► FAILED

It sends a request and handles the answer as a message: service results come
back as `ServiceDone`, state changes as `TransitionsApplied`. It does not move
a task to its next stage until the StateActor has committed the current one.
Transition requests are batched: they leave when the mailbox runs dry. Service
calls are batched too, per worker: those one message makes leave together
(`ServicePool.flush`) when its handler ends, so a lone call is never held.

Liveness rules (every task it drives reaches a terminal state):

- Transitions the journal refused come back together (one `TransitionsApplied`
  per refused commit); they are *held* and sent again as one batch, in their
  original order, after a capped exponential backoff (`JournalRetryDue`, a
  message to itself, so nothing stale reaches the StateActor once this actor
  is gone). Any accepted outcome resets the backoff.
- A transition refused for a task still in flight fails that task with the
  reason (it is never silently dropped); a refusal because the task is
  already terminal (e.g. cancelled meanwhile) just finishes it.
- An exception inside a handler fails only the task it concerns, with the
  reason; the other items of a batch message are handled as usual.
- A cancelled task's calls that no worker has started are withdrawn
  (`ServicePool.withdraw`), so no persistence starts after CANCELLED is committed.
- If this actor stops without being asked, `on_exit` tells the runtime's
  supervisor, which starts a fresh one and resumes every non-terminal task
  from the StateActor's records, as recovery does after a restart.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pykka

from actorflow.actors.backends.base import OnDeath, ServiceBackend
from actorflow.actors.base import FastActor
from actorflow.actors.deadletters import DeadLetterOffice, tell_or_dead_letter
from actorflow.actors.health import Backoff, Health, Milestones
from actorflow.actors.messages import (
    CallDeadline,
    CancelTask,
    JournalRetryDue,
    PoolCoolDownOver,
    ResumeTasks,
    RetryDue,
    RunService,
    ServiceDone,
    ServicesDone,
    TasksCreated,
    TransitionBatch,
    TransitionOutcome,
    TransitionRequest,
    TransitionsApplied,
    WorkerDied,
)
from actorflow.actors.plan import PipelinePlan
from actorflow.actors.pool import PoolCannotStart, ServicePool
from actorflow.actors.telemetry import Telemetry
from actorflow.actors.threads import ThreadBook
from actorflow.actors.timer import Timer
from actorflow.core.errors import RuntimeStopped, TaskNotFound
from actorflow.core.events import (
    MILESTONE_CALL_QUEUED,
    MILESTONE_CALL_WITHDRAWN,
    MILESTONE_POOL_FAILING,
    MILESTONE_POOL_RECOVERED,
    MILESTONE_SERVICE_LATE_RESULT,
    MILESTONE_SERVICE_RETRY_SCHEDULED,
    MILESTONE_WORKER_RESTARTED,
    ORCHESTRATOR_ERROR,
    POOL_FAILING,
    POOL_RECOVERED,
    SERVICE_RETRY_SCHEDULED,
    SERVICE_TIMEOUT,
    TASK_CANCELLED,
    TASK_COMPLETED,
    TASK_FAIL_REFUSED,
    TASK_FAILED,
    TASK_RECOVERED,
    TASK_UNKNOWN_PIPELINE,
    WORKER_RESTARTED,
)
from actorflow.core.tracing import TraceContext, get_event_logger, new_span_id
from actorflow.core.types import TERMINAL_STATES, JSONValue, Task, TaskRecord, TaskState

__all__ = ["OrchestratorActor"]

_S = TaskState
_MAX_OUTBOX = 256


@dataclass(frozen=True, slots=True)
class _Route:
    """A pipeline as this orchestrator runs it: its plan, and the pool of each stage, in order."""

    plan: PipelinePlan
    pools: tuple[ServicePool, ...]


@dataclass(slots=True)
class _Flight:
    """The orchestrator's own book-keeping for one task in progress (never shared)."""

    task: Task
    trace: TraceContext
    started: float
    route: _Route
    state: TaskState
    """The state the task has once the transitions asked for so far are committed."""
    stage: int = 0
    """The index of the stage the task is at."""
    waiting_for: TaskState | None = None
    """Run `stage` once the task is committed in this state."""
    calls: int = 0
    """Stage calls made for this task so far, across stages."""
    retries: int = 0
    """Calls of those that were retries."""
    stage_attempt: int = 0
    call_id: int | None = None
    value: JSONValue = None
    """The value for the current stage; None for the payload."""
    cancelled: bool = False
    traceback: str | None = None
    """The last failed call's traceback, kept in the record."""


class OrchestratorActor(FastActor):
    """Drives each task: dispatch a service call, await its ServiceDone, request the transition, repeat.

    It builds one pool per stage from the `plans` (`actors.plan`), on the backend the stage's plan
    names (`backends`, by backend name), and sends each call with `max_value_bytes`, the cap on the
    value a stage may return.
    """

    def __init__(
        self,
        *,
        state: pykka.ActorRef[Any],
        plans: tuple[PipelinePlan, ...],
        backends: Mapping[str, ServiceBackend],
        max_value_bytes: int,
        timer: Timer,
        dead_letters: DeadLetterOffice,
        threads: ThreadBook | None = None,
        rng: random.Random | None = None,
        milestones: Milestones | None = None,
        on_exit: Callable[[str], None] | None = None,
        telemetry: Telemetry | None = None,
        health: Health | None = None,
    ) -> None:
        super().__init__(threads=threads)
        self._telemetry = telemetry
        self._milestones = milestones or Milestones()
        self._health = health or Health()
        """Where a failing pool is reported (degraded, with the pool and the reason) until it recovers."""
        self._on_exit = on_exit
        """Told why this actor stopped (requested or not): the runtime's supervisor decides what to do."""
        self._held: list[TransitionRequest] = []
        """Transitions the journal refused, waiting for the backoff to send them again."""
        self._journal_backoff = Backoff(0.01, 0.5)
        self._journal_retry_pending = False
        self._state = state
        self._max_value_bytes = max_value_bytes
        self._timer = timer
        self._dead_letters = dead_letters
        self._rng = rng or random.Random()
        self._log = get_event_logger("orchestrator")
        self._flights: dict[str, _Flight] = {}
        self._calls: dict[int, str] = {}
        """call id -> task id, for calls in a pool or waiting for a retry."""
        self._call_ids = itertools.count(1)
        self._outbox: list[TransitionRequest] = []
        self._retrying: dict[int, RunService] = {}
        """Placeholder call id -> the call to re-run when its backoff elapses."""
        self._cancels: dict[str, list[pykka.Future[bool]]] = {}
        """Task id -> the replies waiting for the outcome of the one CANCELLED request on its way for it."""
        self.counters = {"retries": 0, "timeouts": 0, "restarts": 0, "cancelled": 0, "late_results": 0}
        me, office = self.actor_ref, dead_letters
        self._handlers: dict[type, Callable[[Any], None]] = {
            ServiceDone: self._on_service_done,
            ServicesDone: self._on_services_done,
            TransitionsApplied: self._on_transitions_applied,
            TasksCreated: self._on_tasks_created,
            RetryDue: self._on_retry_due,
            CallDeadline: self._on_call_deadline,
            WorkerDied: self._on_worker_died,
            CancelTask: self._on_cancel,
            ResumeTasks: self._on_resume,
            JournalRetryDue: self._on_journal_retry_due,
            PoolCoolDownOver: self._on_pool_cool_down_over,
        }
        self._pools: dict[str, ServicePool] = {}
        """Pools by name (`StagePlan.pool`)."""
        self._routes: dict[str, _Route] = {}
        for plan in plans:
            pools = []
            for stage in plan.stages:
                pool = ServicePool(
                    stage.pool,
                    stage.workers,
                    backend=backends[stage.backend],
                    fn=stage.fn,
                    deliver=lambda done: tell_or_dead_letter(me, done, office),
                    on_death=_report_deaths(me, office),
                    timer=timer,
                    on_deadline=lambda call_id: tell_or_dead_letter(me, CallDeadline(call_id), office),
                    stage_timeout_s=stage.timeout_s,
                    max_restarts=stage.max_restarts,
                    restart_window_s=stage.restart_window_s,
                    on_cool_down=functools.partial(tell_or_dead_letter, me, PoolCoolDownOver(stage.pool), office),
                )
                self._pools[stage.pool] = pool
                # A pool of an orchestrator replaced starts afresh.
                self._health.recover(source=_pool_source(stage.pool))
                pools.append(pool)
            self._routes[plan.name] = _Route(plan, tuple(pools))
        self._pool_list = tuple(self._pools.values())

    # --- inspection (asks from the Runtime; off the hot path) ------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters, tasks in progress and each pool's health."""
        return {
            **self.counters,
            "orchestrating": len(self._flights),
            "pools": {name: pool.stats() for name, pool in self._pools.items()},
        }

    # --- message loop ----------------------------------------------------------------------------

    def on_receive(self, message: Any) -> None:
        """Dispatch on the message type; send the calls it made; flush transition requests when the mailbox is empty."""
        try:
            self._handle(message)
        except Exception as exc:  # noqa: BLE001 - an orchestrator that dies strands every task: fail the one
            self._on_handler_error(message, exc)
        # The calls this message made go now, one message per worker: a lone call never waits.
        for pool in self._pool_list:
            if pool.unsent:
                pool.flush()
        if self._outbox and (len(self._outbox) >= _MAX_OUTBOX or self.actor_inbox.empty()):
            self._flush()

    def on_mailbox_idle(self) -> None:
        """Send transition requests held back for batching once nothing else is waiting."""
        if self._outbox and self.actor_inbox.empty():
            self._flush()

    def _handle(self, message: Any) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:
            self._dead_letters.post(message, to="orchestrator", why="unknown message type")
            return
        handler(message)

    def _on_handler_error(self, message: Any, exc: Exception) -> None:
        """A handler raised: fail the task the message concerns (if any) with the reason; never go silent."""
        why = f"internal error handling {type(message).__name__}: {type(exc).__name__}: {exc}"
        self._log.error(
            ORCHESTRATOR_ERROR, error_type=type(exc).__name__, error=str(exc), message=type(message).__name__
        )
        reply = getattr(message, "reply", None)
        if isinstance(reply, pykka.Future):
            with contextlib.suppress(Exception):  # already answered before the handler raised
                reply.set_exception(exc_info=(type(exc), exc, None))
        task_id = getattr(message, "task_id", None)
        if isinstance(task_id, str):
            self._fail_task(task_id, why)

    def _fail_task(self, task_id: str, why: str) -> None:
        """Fail a task whatever its book-keeping says (the last resort of the handlers' guards)."""
        flight = self._flights.get(task_id)
        if flight is not None:
            self._fail(flight, why)
        else:
            self._request(task_id, _S.FAILED, reason=why, error=why)

    def _guarded(self, task_id: str, step: Callable[[Any], None], item: Any) -> None:
        """Run one item of a batch message; an exception fails only that item's task."""
        try:
            step(item)
        except Exception as exc:  # noqa: BLE001 - one broken item must not cost the batch the rest
            why = f"internal error: {type(exc).__name__}: {exc}"
            self._log.error(ORCHESTRATOR_ERROR, task_id=task_id, error_type=type(exc).__name__, error=str(exc))
            self._fail_task(task_id, why)

    def _on_transitions_applied(self, message: TransitionsApplied) -> None:
        refused: list[TransitionRequest] = []
        accepted = False
        for outcome in message.outcomes:
            if outcome.outcome == "journal_failed" and (
                outcome.request.task_id in self._flights or outcome.request.to_state is _S.CANCELLED
            ):
                refused.append(outcome.request)  # cancel replies stay pending until the retry's outcome
            else:
                accepted = accepted or outcome.outcome == "accepted"
                self._guarded(outcome.request.task_id, self._on_outcome, outcome)
        if accepted:
            self._journal_backoff.reset()
        if refused:
            # One batch, in the original order: VALIDATED and PROCESSING are then applied (and
            # committed) together again, so the second can never find the first missing.
            self._retry_after_journal_failure(tuple(refused))

    def _on_tasks_created(self, message: TasksCreated) -> None:
        for record in message.records:
            self._guarded(record.task_id, self._begin, record)

    def _on_call_deadline(self, message: CallDeadline) -> None:
        self._on_deadline(message.call_id)

    def _on_resume(self, message: ResumeTasks) -> None:
        for record in message.records:
            self._guarded(record.task_id, self._resume, record)

    def on_stop(self) -> None:
        """Send what is pending, answer pending cancels, retire every worker, then tell the supervisor."""
        try:
            self._retire_everything()
        finally:
            if self._on_exit is not None:
                self._on_exit("stopped")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        """Never expected (handlers catch everything): retire the workers and tell the supervisor."""
        try:
            for pool in self._pools.values():
                pool.close(timeout=0.5)
        finally:
            if self._on_exit is not None:
                self._on_exit(f"failed with {exception_type.__name__}: {exception_value}")

    def _retire_everything(self) -> None:
        self._dead_letters.drain(self)
        if self._outbox:  # an empty batch to a state actor that may be stopping would only be a dead letter
            self._flush()
        stopped = RuntimeStopped("the orchestrator stopped before the cancellation was settled")
        for reply in [reply for replies in self._cancels.values() for reply in replies]:
            reply.set_exception(exc_info=(RuntimeStopped, stopped, None))
        for pool in self._pools.values():
            pool.close(timeout=2.0)
        # The backends are the runtime's, which closes them once this actor has stopped: off this thread,
        # since closing one can take seconds (Ray shuts down), and a replacement may share their session.

    # --- the pipeline ----------------------------------------------------------------------------

    def _begin(self, record: TaskRecord) -> None:
        flight = self._flight_for(record)
        if flight is not None:
            self._enter(flight, 0)

    def _resume(self, record: TaskRecord) -> None:
        """Continue a recovered task from its last committed state (services run at least once)."""
        if record.task_id in self._flights or record.state in TERMINAL_STATES:
            return
        flight = self._flight_for(record)
        if flight is None:
            return
        flight.calls = record.calls
        flight.retries = record.retries
        flight.value = record.value
        self._log.info(
            TASK_RECOVERED,
            task_id=record.task_id,
            trace_id=record.trace_id,
            state=record.state.value,
            pipeline=record.pipeline,
        )
        pipeline = flight.route.plan.pipeline
        if record.state is _S.CREATED:
            # Committed, and no step of it since: it starts as a new task does (`_begin`). Its first
            # stage may run in a state of its own, which this task has not reached yet.
            self._enter(flight, 0)
            return
        running = pipeline.stage_running_in(record.state)
        if running is not None:
            flight.stage = running
            self._dispatch(flight)
            return
        done = pipeline.stage_done_in(record.state)
        if done is not None:
            flight.stage = done
            self._after_stage(flight)
            return
        self._fail(flight, f"state {record.state.value!r} is not a state of pipeline {pipeline.name!r}")

    def _flight_for(self, record: TaskRecord) -> _Flight | None:
        route = self._routes.get(record.pipeline)
        trace = TraceContext(record.trace_id, record.span_id or new_span_id(), record.parent_span_id)
        if route is None:  # the state actor and the journal refuse these first; never strand one anyway
            self._log.error(TASK_UNKNOWN_PIPELINE, task_id=record.task_id, pipeline=record.pipeline)
            why = f"pipeline {record.pipeline!r} is not defined in this runtime"
            self._outbox.append(TransitionRequest(record.task_id, _S.FAILED, why, None, None, why))
            return None
        flight = _Flight(Task(record.task_id, record.payload), trace, time.monotonic(), route, record.state)
        self._flights[record.task_id] = flight
        return flight

    def _enter(self, flight: _Flight, index: int) -> None:
        """Move the task to stage `index`: to its state first if it is not there, then run it."""
        flight.stage = index
        target = flight.route.plan.stages[index].stage.run_state
        if flight.state is target:
            self._dispatch(flight)
            return
        self._request(flight.task.task_id, target, expected=flight.state, value=flight.value)
        flight.state = target
        flight.waiting_for = target

    def _after_stage(self, flight: _Flight) -> None:
        """The current stage succeeded: record its done state, then on to the next stage or COMPLETED."""
        index = flight.stage
        stages = flight.route.plan.stages
        done_state = stages[index].stage.done_state
        task_id = flight.task.task_id
        if done_state is not None:
            target = TaskState(done_state)
            self._request(task_id, target, expected=flight.state, value=flight.value)
            flight.state = target
        if index + 1 < len(stages):
            self._enter(flight, index + 1)
            return
        result = flight.task.payload if flight.value is None else flight.value
        self._request(task_id, _S.COMPLETED, expected=flight.state, result=result)

    def _dispatch(self, flight: _Flight, *, attempt: int = 1) -> None:
        call_id = next(self._call_ids)
        flight.call_id = call_id
        flight.stage_attempt = attempt
        pool = flight.route.pools[flight.stage]
        task = flight.task if attempt == 1 else Task(flight.task.task_id, flight.task.payload, attempt)
        call = RunService(
            call_id,
            pool.service,
            task,
            flight.trace.child(),
            attempt,
            flight.value,
            flight.route.plan.pipeline.name,
            dispatched_at=time.time(),
            max_value_bytes=self._max_value_bytes,
        )
        self._calls[call_id] = task.task_id
        try:
            pool.dispatch(call)
        except PoolCannotStart as exc:
            del self._calls[call_id]
            self._fail(flight, f"{pool.service}: {exc}")  # never ran: not a call
            return
        flight.calls += 1
        if self._milestones.active and not pool.running(call_id):
            self._milestones.emit(MILESTONE_CALL_QUEUED, task_id=task.task_id, service=pool.service, call_id=call_id)

    def _on_service_done(self, done: ServiceDone) -> None:
        pool = self._pools[done.service]
        call = pool.finished(done.call_id, done.duration_ms)
        task_id = self._calls.pop(done.call_id, None)
        if call is None or task_id is None:
            self.counters["late_results"] += 1
            self._milestones.emit(MILESTONE_SERVICE_LATE_RESULT, task_id=done.task_id, service=done.service)
            self._dead_letters.post(done, to="orchestrator", why="late result of a call that was timed out or retired")
            return
        if self._telemetry is not None:
            self._telemetry.call_done(call, done)
        if done.status == "crashed":
            self._replace_worker(pool, done.worker, f"{done.error_type}: {done.error}")
        flight = self._flights.get(task_id)
        if flight is None or flight.cancelled or flight.call_id != done.call_id:
            return  # cancelled while running: the result is discarded, never persisted
        flight.call_id = None
        if done.traceback is not None:
            flight.traceback = done.traceback
        if done.status == "ok":
            if done.result is not None:
                flight.value = done.result
            self._after_stage(flight)
        elif done.status == "permanent":
            self._fail(flight, f"{done.service}: {done.error_type}: {done.error}")
        else:
            self._retry_or_fail(flight, call, f"{done.error_type}: {done.error}")

    def _on_services_done(self, message: ServicesDone) -> None:
        for done in message.dones:
            self._guarded(done.task_id, self._on_service_done, done)

    def _retry_or_fail(self, flight: _Flight, call: RunService, error: str) -> None:
        plan = flight.route.plan.stages[flight.stage]
        if flight.stage_attempt >= plan.max_attempts:
            self._fail(flight, f"{call.service}: {error} (gave up after {flight.stage_attempt} attempts)")
            return
        attempt = flight.stage_attempt + 1
        cap = min(plan.retry_backoff_max_s, plan.retry_backoff_s * 2 ** (attempt - 2))
        delay = self._rng.uniform(0, cap)  # "full jitter": retries of many tasks do not move in lockstep
        call_id = next(self._call_ids)
        flight.call_id = call_id
        flight.stage_attempt = attempt
        self._calls[call_id] = flight.task.task_id
        self._retrying[call_id] = call
        self.counters["retries"] += 1
        flight.retries += 1
        self._milestones.emit(MILESTONE_SERVICE_RETRY_SCHEDULED, task_id=flight.task.task_id, service=call.service)
        self._log.info(
            SERVICE_RETRY_SCHEDULED,
            task_id=flight.task.task_id,
            trace_id=flight.trace.trace_id,
            service=call.service,
            attempt=attempt,
            delay_ms=round(delay * 1000, 3),
            error=error,
        )
        me, office = self.actor_ref, self._dead_letters
        self._timer.call_later(delay, lambda: tell_or_dead_letter(me, RetryDue(flight.task.task_id, call_id), office))

    def _on_retry_due(self, message: RetryDue) -> None:
        call = self._retrying.pop(message.call_id, None)
        self._calls.pop(message.call_id, None)
        flight = self._flights.get(message.task_id)
        if call is None or flight is None or flight.cancelled or flight.call_id != message.call_id:
            return
        self._dispatch(flight, attempt=flight.stage_attempt)

    def _fail(self, flight: _Flight, error: str) -> None:
        flight.call_id = None
        self._request(flight.task.task_id, _S.FAILED, reason=error, error=error)

    def _request(
        self,
        task_id: str,
        to_state: TaskState,
        *,
        expected: TaskState | None = None,
        reason: str | None = None,
        result: JSONValue = None,
        error: str | None = None,
        value: JSONValue = None,
    ) -> None:
        flight = self._flights.get(task_id)
        calls = retries = None
        traceback = None
        if flight is not None:
            calls, retries, traceback = flight.calls, flight.retries, flight.traceback
        self._outbox.append(
            TransitionRequest(task_id, to_state, reason, expected, result, error, calls, retries, value, traceback)
        )

    def _flush(self) -> None:
        batch, self._outbox = tuple(self._outbox), []
        tell_or_dead_letter(self._state, TransitionBatch(batch, reply_to=self.actor_ref), self._dead_letters)

    # --- answers from the state actor ------------------------------------------------------------

    def _on_outcome(self, outcome: TransitionOutcome) -> None:
        request = outcome.request
        flight = self._flights.get(request.task_id)
        if request.to_state is _S.CANCELLED:
            self._on_cancel_outcome(outcome, flight)
            return
        if flight is None:
            return
        if outcome.outcome == "rejected":
            if outcome.record is not None and outcome.record.state in TERMINAL_STATES:
                self._finish(flight, outcome.record)  # e.g. cancelled meanwhile
            elif request.to_state is _S.FAILED:  # cannot happen by the table; never loop on it
                self._log.error(TASK_FAIL_REFUSED, task_id=request.task_id, why=outcome.why)
            else:  # refused while still in flight: nothing would ever move it on, so it fails
                self._fail(flight, f"transition to {request.to_state.value} was refused: {outcome.why}")
            return
        record = outcome.record
        assert record is not None
        if record.state in TERMINAL_STATES:
            self._finish(flight, record)
        elif record.state is flight.waiting_for and request.to_state is record.state and not flight.cancelled:
            flight.waiting_for = None
            self._dispatch(flight)

    def _retry_after_journal_failure(self, requests: tuple[TransitionRequest, ...]) -> None:
        """Nothing was committed: hold the requests and send them again after a capped backoff."""
        self._held.extend(requests)
        if self._journal_retry_pending:
            return
        self._journal_retry_pending = True
        delay = self._journal_backoff.failed()
        message = JournalRetryDue(self._journal_backoff.steps)
        me, office = self.actor_ref, self._dead_letters
        self._timer.call_later(delay, lambda: tell_or_dead_letter(me, message, office))

    def _on_journal_retry_due(self, message: JournalRetryDue) -> None:
        self._journal_retry_pending = False
        held, self._held = self._held, []
        # Ahead of anything requested since: the held ones are older.
        self._outbox[:0] = held

    def _finish(self, flight: _Flight, record: TaskRecord) -> None:
        self._flights.pop(record.task_id, None)
        if flight.call_id is not None:
            self._calls.pop(flight.call_id, None)
            self._retrying.pop(flight.call_id, None)
        duration_ms = round((time.monotonic() - flight.started) * 1000, 3)
        fields = {
            "task_id": record.task_id,
            "trace_id": record.trace_id,
            "state": record.state.value,
            "duration_ms": duration_ms,
            "calls": record.calls,
            "retries": record.retries,
            "pipeline": record.pipeline,
        }
        if record.state is _S.COMPLETED:
            self._log.info(TASK_COMPLETED, **fields)
        elif record.state is _S.FAILED:
            self._log.info(TASK_FAILED, error=record.error, **fields)
        else:
            self._log.info(TASK_CANCELLED, **fields)

    # --- cancellation ----------------------------------------------------------------------------

    def _on_cancel(self, message: CancelTask) -> None:
        """Cancel a task; its reply waits for the committed outcome.

        One CANCELLED request per task is on its way at a time: a cancel that comes
        while one is pending joins its replies instead of sending a second request.
        A second request would be refused at once (the first is applied, not yet
        committed), and answered before the first commits; joined, both are answered
        from the committed outcome. A request that finds the task already CANCELLED
        (committed) answers True too: cancelling is idempotent.
        """
        task_id = message.task_id
        flight = self._flights.get(task_id)
        if flight is not None and not flight.cancelled:
            flight.cancelled = True  # from now on its results are discarded
            if flight.call_id is not None:
                pool = flight.route.pools[flight.stage]
                if pool.withdraw(flight.call_id):  # no worker started it: it will never run
                    self._calls.pop(flight.call_id, None)
                    self._milestones.emit(MILESTONE_CALL_WITHDRAWN, task_id=task_id, service=pool.service)
                else:  # running: on an event loop its coroutine is cancelled (a thread cannot be)
                    pool.cancel_running(flight.call_id)
        waiting = self._cancels.get(task_id)
        if waiting is not None:
            waiting.append(message.reply)
            return
        self._cancels[task_id] = [message.reply]
        self._request(task_id, _S.CANCELLED, reason="cancelled by request")

    def _on_cancel_outcome(self, outcome: TransitionOutcome, flight: _Flight | None) -> None:
        task_id = outcome.request.task_id
        replies = self._cancels.pop(task_id, [])
        record = outcome.record
        accepted = outcome.outcome == "accepted"
        if accepted:
            self.counters["cancelled"] += 1
            if flight is not None:
                assert record is not None
                self._finish(flight, record)
        elif flight is not None:
            flight.cancelled = False  # refused (already terminal, or journal trouble): carry on as before
        # Refused because the task is terminal: it was committed so (this request waited for the one
        # before it); True if a cancellation put it there.
        cancelled = accepted or (record is not None and record.state is _S.CANCELLED)
        for reply in replies:
            if record is None and outcome.outcome == "rejected":
                error = TaskNotFound(f"no task with id {task_id!r}")
                reply.set_exception(exc_info=(TaskNotFound, error, None))
            else:
                reply.set(cancelled)

    # --- supervision -----------------------------------------------------------------------------

    def _on_deadline(self, call_id: int) -> None:
        task_id = self._calls.get(call_id)
        if task_id is None:
            return
        pool = next((p for p in self._pools.values() if p.running(call_id)), None)
        if pool is None or pool.answered(call_id):
            return  # answered: its report, held back with a batch's, is on its way (sent now)
        self.counters["timeouts"] += 1
        worker = pool.worker_of(call_id)
        # A call in a batch that hung may not be the one at fault: then none is charged, and all run again.
        charged = pool.surely_running(call_id)
        self._log.warning(
            SERVICE_TIMEOUT,
            task_id=task_id,
            call_id=call_id,
            service=pool.service,
            worker=worker,
            timeout_s=pool.timeout_s,
            **({} if charged else {"charged": False}),
        )
        why = f"stage timeout after {pool.timeout_s}s"
        self._replace_worker(pool, worker, why, timed_out=call_id if charged else None)

    def _on_worker_died(self, message: WorkerDied) -> None:
        pool = next((p for p in self._pools.values() if p.has_worker(message.worker)), None)
        if pool is not None:
            self._replace_worker(pool, message.worker, message.why, cannot_load=message.cannot_load)

    def _replace_worker(
        self, pool: ServicePool, worker: str, why: str, *, timed_out: int | None = None, cannot_load: bool = False
    ) -> None:
        """Retire `worker`, start a fresh one (unless the pool is failing), and re-run what it held.

        A timed-out call is a transient failure of its task; calls queued
        behind it were never started and are simply dispatched again (to wait
        in the pool, uncharged, if it is failing). (A call that crashed its
        worker was already reported, and is retried by the caller.) A worker
        that could not load its function (`cannot_load`) ran none of its
        calls, and no worker would: they fail at once, with `why`.
        """
        was_failing = pool.failing is not None
        stranded = pool.replace(worker, cannot_load=why if cannot_load else None)
        if stranded is None:
            return
        self.counters["restarts"] += 1
        self._milestones.emit(MILESTONE_WORKER_RESTARTED, worker=worker, service=pool.service, why=why)
        self._log.warning(
            WORKER_RESTARTED, worker=worker, service=pool.service, why=why, failing=pool.failing is not None
        )
        if pool.failing is not None and not was_failing:
            self._health.degrade(pool.failing, source=_pool_source(pool.service))
            self._milestones.emit(MILESTONE_POOL_FAILING, service=pool.service, reason=pool.failing)
            self._log.error(POOL_FAILING, service=pool.service, reason=pool.failing, cool_down_s=pool.window_s)
        for call in stranded:
            task_id = self._calls.pop(call.call_id, None)
            flight = self._flights.get(task_id) if task_id is not None else None
            if flight is None or flight.cancelled or flight.call_id != call.call_id:
                continue
            flight.call_id = None
            if call.call_id == timed_out:
                self._retry_or_fail(flight, call, why)
                continue
            flight.calls -= 1  # it never ran: not a call
            if cannot_load:
                self._fail(flight, f"{call.service}: {why}")
            else:
                self._dispatch(flight, attempt=flight.stage_attempt)

    def _on_pool_cool_down_over(self, message: PoolCoolDownOver) -> None:
        pool = self._pools.get(message.service)
        if pool is None or not pool.reopen():
            return
        self._health.recover(source=_pool_source(pool.service))
        self._milestones.emit(MILESTONE_POOL_RECOVERED, service=pool.service)
        self._log.info(POOL_RECOVERED, service=pool.service, workers=pool.stats()["workers"])


def _pool_source(service: str) -> str:
    """The name under which a pool reports into `Health`."""
    return f"pool {service!r}"


def _report_deaths(me: pykka.ActorRef[Any], office: DeadLetterOffice) -> OnDeath:
    """The `on_death` of a pool: each death becomes a `WorkerDied` message to the orchestrator."""

    def on_death(worker: str, why: str, /, *, cannot_load: bool = False) -> None:
        tell_or_dead_letter(me, WorkerDied(worker, why, cannot_load), office)

    return on_death
