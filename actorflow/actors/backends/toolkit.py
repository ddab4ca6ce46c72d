"""What every backend does, written once: running a call, reporting it, and the rules all backends share.

* Running and reporting: `execute` runs one call and turns whatever happens
  into a `ServiceDone` (never raising, `BaseException` included: pykka would
  stop *every* actor on one); `report`, `report_failure` and `crashed` make the
  report of a call that ended some other way; `log_done` writes the call's one
  event; `deliver_reports` hands reports to the orchestrator, several in one
  message.
* "At home": the default persistence (`ResultStore`) is bound to the runtime's
  process (`runs_at_home`); `AtHome` sends such functions to thread workers
  there, whatever backend their stage names.
* Shipping: `ship_function` packs a stage function for workers elsewhere, or
  raises `ConfigError` naming it; `is_plain` and `unsendable` deal with results
  that cannot travel back.
* Blame: `CallsInFlight` knows which of a worker's calls was running when it
  died, so that it alone is charged; `CallClaims` settles the race between a
  worker starting a call and the pool taking it back.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog

from actorflow.actors.backends.base import Deliver, OnDeath, ServiceBackend, StageFn, WorkerHandle
from actorflow.actors.messages import RunService, ServiceDone, ServicesDone, ServiceStatus
from actorflow.core.errors import ConfigError, TransientError
from actorflow.core.events import SERVICE_CALL, SERVICE_FAILED
from actorflow.core.failures import bound_message, describe_error, format_traceback
from actorflow.core.tracing import EventLogger
from actorflow.core.types import DEFAULT_PIPELINE, FrozenDict, JSONValue, freeze
from actorflow.services import ResultStore
from actorflow.services.seed import describe_function, unwrap

__all__ = [
    "AtHome",
    "CallClaims",
    "CallsInFlight",
    "SilentLog",
    "call_fields",
    "crashed",
    "deliver_reports",
    "execute",
    "invoke",
    "is_plain",
    "log_done",
    "report",
    "report_failure",
    "runs_at_home",
    "ship_function",
    "stage_value",
    "status_of",
    "unsendable",
]

_Packed = TypeVar("_Packed")


# --- running a call ------------------------------------------------------------------------------


def stage_value(call: RunService) -> JSONValue:
    """The value a call's stage gets: the one handed on, or the payload for the first stage."""
    return call.task.payload if call.value is None else call.value


def invoke(fn: StageFn, call: RunService) -> JSONValue:
    """Call a stage function, ``fn(task, value)``; freeze what it returns (None passes the value on).

    Raises `ValueTooLarge` for a value over the call's `max_value_bytes`: the size is measured here,
    in the worker, while the value is frozen, so that no backend sends a value on that would be refused.
    """
    returned = fn(call.task, stage_value(call))
    if returned is None:
        return None
    return freeze(returned, where=f"the value returned by stage {call.service!r}", max_bytes=call.max_value_bytes)


def execute(fn: StageFn, call: RunService, worker: str, *, log: EventLogger, node: str = "") -> ServiceDone:
    """Run one call with its trace context bound, log it, and report how it went. Never raises."""
    context = contextvars.copy_context()  # what the call binds stays with this call
    return context.run(_execute, fn, call, worker, log, node)


def call_fields(call: RunService, worker: str, node: str = "") -> dict[str, Any]:
    """The fields every `service.*` event of a call carries (all backends use these)."""
    trace = call.trace
    fields: dict[str, Any] = {
        "task_id": call.task.task_id,
        "trace_id": trace.trace_id,
        "span_id": trace.span_id,
        "parent_span_id": trace.parent_span_id,
        "service": call.service,
        "worker": worker,
        "attempt": call.attempt,
    }
    if call.pipeline != DEFAULT_PIPELINE:  # the seed's events stay as they always were
        fields["pipeline"] = call.pipeline
    if node:
        fields["node"] = node
    return fields


class SilentLog(EventLogger):
    """Drops every event: for worker processes (and Ray actors), whose events the runtime's process logs."""

    __slots__ = ()

    def enabled(self, level: str) -> bool:
        """Never, so `execute` skips building its debug events."""
        return False

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        return


def _execute(fn: StageFn, call: RunService, worker: str, log: EventLogger, node: str) -> ServiceDone:
    fields = call_fields(call, worker, node)
    # Bound for the service's own logging (a host with merge_contextvars sees the trace).
    structlog.contextvars.bind_contextvars(**fields)
    verbose = log.enabled("debug")  # checked once: the call's debug event costs nothing when off
    started_at = time.time()
    started = time.perf_counter()
    result: JSONValue = None
    error: BaseException | None = None
    try:
        result = invoke(fn, call)
    except BaseException as exc:  # noqa: BLE001 - classified by `status_of`; SystemExit & co. are contained here
        error = exc
    duration_ms = round((time.perf_counter() - started) * 1000, 3)
    return report(
        log, call, worker, node, result, error, duration_ms, started_at=started_at, fields=fields if verbose else None
    )


# --- reporting a call ----------------------------------------------------------------------------


def status_of(error: BaseException | None) -> ServiceStatus:
    """How a call ended: ok, transient (TransientError), permanent (any other Exception) or crashed (the rest)."""
    if error is None:
        return "ok"
    if isinstance(error, TransientError):
        return "transient"
    if isinstance(error, Exception):
        return "permanent"
    return "crashed"


def report(
    log: EventLogger,
    call: RunService,
    worker: str,
    node: str,
    result: JSONValue,
    error: BaseException | None,
    duration_ms: float,
    *,
    started_at: float = 0.0,
    fields: dict[str, Any] | None = None,
    status: ServiceStatus | None = None,
) -> ServiceDone:
    """Make the ServiceDone of a call that ran here (or on an event loop), and log how it ended. Never raises.

    `status` overrides how `error` is classified (`status_of`).

    A failed call's traceback is formatted (bounded) here, where the exception
    is. The exception is user code: its text is taken with `describe_error`,
    which never raises and always gives a plain `str`, so that a hostile
    ``__str__`` cannot kill the worker or stop its report crossing to the runtime.
    """
    if error is None:
        done = ServiceDone(
            call.call_id,
            call.service,
            call.task.task_id,
            worker,
            "ok",
            result,
            None,
            None,
            duration_ms,
            node,
            started_at,
        )
    else:
        done = ServiceDone(
            call.call_id,
            call.service,
            call.task.task_id,
            worker,
            status or status_of(error),
            None,
            type(error).__name__,
            bound_message(describe_error(error)),  # an exception's message may be of any length; what travels is not
            duration_ms,
            node,
            started_at,
            format_traceback(error),
        )
    return log_done(log, call, done, fields=fields)


def report_failure(
    log: EventLogger,
    call: RunService,
    worker: str,
    node: str,
    status: ServiceStatus,
    error_type: str,
    error: str,
    duration_ms: float,
) -> ServiceDone:
    """Make and log the ServiceDone of a call that failed without an exception object (e.g. was cancelled)."""
    done = ServiceDone(
        call.call_id, call.service, call.task.task_id, worker, status, None, error_type, error, duration_ms, node
    )
    return log_done(log, call, done)


def crashed(
    log: EventLogger, call: RunService, worker: str, node: str, error_type: str, error: str, duration_ms: float
) -> ServiceDone:
    """Make and log the report of a call whose worker died under it (a process exited, a Ray actor was lost)."""
    return report_failure(log, call, worker, node, "crashed", error_type, error, duration_ms)


def log_done(
    log: EventLogger, call: RunService, done: ServiceDone, *, fields: dict[str, Any] | None = None
) -> ServiceDone:
    """Log a call in the runtime's process, as every backend does, in one event; return `done`.

    One event per call, logged when it ends and carrying when it started
    (``started_at``, seconds since the epoch), how long it ran (``duration_ms``)
    and how it ended (``status``): ``service.call`` at debug for a call that
    succeeded; ``service.failed`` at warning (with ``transient`` false only for a
    permanent failure), or at info for a ``ValidationError``: a rejected payload
    is the task's outcome, not a fault to warn an operator about. Backends whose
    calls run elsewhere (a child process, a Ray actor) call this in the parent
    with the report they got back.
    """
    if done.status == "ok":
        if fields is not None or log.enabled("debug"):
            log.debug(
                SERVICE_CALL,
                **(fields or call_fields(call, done.worker, done.node)),
                status="ok",
                started_at=done.started_at or _started_at(done),
                duration_ms=done.duration_ms,
            )
        return done
    emit = log.info if done.error_type == "ValidationError" else log.warning
    emit(
        SERVICE_FAILED,
        **(fields or call_fields(call, done.worker, done.node)),
        status=done.status,
        started_at=done.started_at or _started_at(done),
        duration_ms=done.duration_ms,
        error_type=done.error_type,
        error=done.error,
        transient=done.status != "permanent",
        traceback=done.traceback,
    )
    return done


def _started_at(done: ServiceDone) -> float:
    """When a call whose report does not say (its worker died under it) started: now, less its duration."""
    return round(time.time() - done.duration_ms / 1000, 6)


def deliver_reports(deliver: Deliver, dones: Sequence[ServiceDone]) -> None:
    """Hand reports to the orchestrator in one message: a lone one as itself, several as one `ServicesDone`.

    A lone report goes as itself so that the light-load path (one call at a
    time) costs no wrapper; no report, no message.
    """
    if len(dones) == 1:
        deliver(dones[0])
    elif dones:
        deliver(ServicesDone(tuple(dones)))


# --- at home -------------------------------------------------------------------------------------


def runs_at_home(fn: StageFn, *, same_machine: bool) -> bool:
    """True for a stage function that must run in the runtime's own process (the "at home" rule).

    Only the default persistence, a `ResultStore`, is bound to where the runtime
    lives: in memory it is private to this process, so it runs here for every
    backend; with a file path, workers on the same machine (`same_machine`, the
    process backend) open the same file, while workers on other nodes (Ray) would
    each write a file of their own, so it runs here too.
    """
    store = unwrap(fn)
    return isinstance(store, ResultStore) and (store.path is None or not same_machine)


class AtHome:
    """Thread workers in the runtime's process, for the functions a backend running elsewhere must not take.

    A backend whose workers run away from the runtime (child processes, Ray
    actors) keeps one: `away` tells it which of its functions it runs itself,
    and `start_worker` starts the others on threads here. The thread backend
    is made only if a worker needs it, and closed with `close`.

    Args:
        local: makes (or gives) the thread backend, when the first worker at home starts.
        same_machine: the backend's workers share this machine's files (see `runs_at_home`).
    """

    __slots__ = ("_backend", "_local", "same_machine")

    def __init__(self, local: Callable[[], ServiceBackend], *, same_machine: bool) -> None:
        self._local = local
        self._backend: ServiceBackend | None = None
        self.same_machine = same_machine

    def runs_here(self, fn: StageFn) -> bool:
        """True if `fn` must run in the runtime's process (`runs_at_home`)."""
        return runs_at_home(fn, same_machine=self.same_machine)

    def away(self, functions: Mapping[str, StageFn]) -> dict[str, StageFn]:
        """The functions, by pool name, that may run away from home: all but those `runs_here`."""
        return {pool: fn for pool, fn in functions.items() if not self.runs_here(fn)}

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        """Start a thread worker in the runtime's process."""
        if self._backend is None:
            self._backend = self._local()
        return self._backend.start_worker(name, service, fn, deliver, on_death)

    def close(self) -> None:
        """Close the thread backend, if a worker made it."""
        if self._backend is not None:
            self._backend.close()


# --- shipping functions and results --------------------------------------------------------------


def ship_function(service: str, fn: StageFn, *, pack: Callable[[StageFn], _Packed], to: str, advice: str) -> _Packed:
    """Pack the function of pool `service` with `pack` for workers elsewhere, or raise ConfigError naming it.

    Args:
        service: the pool's name (``"fetch"``, or ``"ingest.fetch"`` in a pipeline other than the first).
        fn: the stage function.
        pack: how the backend sends functions (``pickle.dumps``, ``ray.put``); whatever it raises is the reason.
        to: where the function goes, for the message (``"worker processes"``).
        advice: what to do instead, for the message.
    """
    try:
        return pack(fn)
    except Exception as exc:  # pickle raises PicklingError, AttributeError, TypeError...
        raise ConfigError(
            f"{describe_function(service.rsplit('.', 1)[-1], fn)} cannot be sent to {to}: "
            f"{type(exc).__name__}: {describe_error(exc)}; {advice}"
        ) from exc


def unsendable(done: ServiceDone, error: BaseException, where: str) -> ServiceDone:
    """The report of a call whose result cannot be sent `where` (`error` says why): a permanent failure of its own.

    Retrying would make the same value again, and the worker is not at fault:
    the call fails once, with a reason naming the stage, and the worker lives on.
    """
    why = f"the value returned by stage {done.service!r} cannot be sent {where}: {describe_error(error)}"
    return done._replace(status="permanent", result=None, error_type=type(error).__name__, error=why, traceback=None)


def is_plain(value: object) -> bool:
    """True if `value` is made of plain JSON builtins only (no subclass), which any pickler can send.

    A cheap test (one look per node, none per byte) before pickling a value
    to learn whether it crosses: only a value that fails it is pickled.
    """
    kind = type(value)
    if kind in _PLAIN_LEAVES:
        return True
    if kind is tuple or kind is list:
        return all(is_plain(item) for item in value)  # type: ignore[attr-defined]
    if kind is FrozenDict or kind is dict:
        return all(type(key) is str and is_plain(item) for key, item in value.items())  # type: ignore[attr-defined]
    return False


_PLAIN_LEAVES: frozenset[type] = frozenset({str, int, float, bool, type(None)})


# --- blame and claims ----------------------------------------------------------------------------


class CallsInFlight:
    """The calls one worker holds, in the order it runs them: the first is running, and since when.

    A backend whose worker queues calls (a child process's pipe) keeps one, so
    that a worker that dies is charged with the call it was running, and with
    no other (`blame_head`). Thread-safe: calls are added on the orchestrator's
    thread and settled on the thread that reads the reports.
    """

    __slots__ = ("_calls", "_lock", "head_started")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, RunService] = {}
        """By call id, in the order sent (dicts keep insertion order)."""
        self.head_started = 0.0
        """`time.perf_counter()` when the head call started."""

    def add(self, call: RunService) -> bool:
        """Note a call sent to the worker. True if it is the head now (it starts at once)."""
        with self._lock:
            self._calls[call.call_id] = call
            if len(self._calls) == 1:
                self.head_started = time.perf_counter()
                return True
            return False

    def head(self) -> RunService | None:
        """The call the worker is running (the oldest it holds), or None."""
        with self._lock:
            return next(iter(self._calls.values()), None)

    def settle(self, call_id: int) -> bool:
        """The worker answered `call_id`: forget it. True if another call is now the head (it starts now)."""
        with self._lock:
            was_head = next(iter(self._calls), None) == call_id
            if self._calls.pop(call_id, None) is None or not was_head or not self._calls:
                return False
            self.head_started = time.perf_counter()
            return True

    def running_ms(self) -> float:
        """How long the head call has been running, in milliseconds."""
        return round((time.perf_counter() - self.head_started) * 1000, 3)

    def blame_head(self, log: EventLogger, worker: str, node: str, error_type: str, error: str) -> ServiceDone:
        """The worker died running its head call: settle it, and make and log its `crashed` report.

        The calls behind it never started; they stay, for the pool to send again.
        """
        call = self.head()
        assert call is not None, "a death during a call with no call in the worker"
        duration_ms = self.running_ms()
        self.settle(call.call_id)
        return crashed(log, call, worker, node, error_type, error, duration_ms)

    def __len__(self) -> int:
        return len(self._calls)


class CallClaims:
    """Calls sent to a worker and not started yet. The worker and the pool race for each; one wins.

    `sent` notes a call before it is told to the worker; the worker `take`s
    it just before running it, the pool takes it back with `withdraw`. Both
    are one `dict.pop`, atomic under the GIL, so no lock is needed and no call
    is both run and withdrawn.
    """

    __slots__ = ("_unclaimed",)

    def __init__(self) -> None:
        self._unclaimed: dict[int, None] = {}

    def sent(self, call_id: int) -> None:
        """Note a call as sent and not started."""
        self._unclaimed[call_id] = None

    def take(self, call_id: int) -> bool:
        """Claim a call (to run it, or to withdraw it). False if the other side got it first."""
        return call_id in self._unclaimed and self._unclaimed.pop(call_id, False) is None
