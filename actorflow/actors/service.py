"""Service workers: where a service function actually runs, and the backend seam behind pools.

`execute` runs one call and turns whatever happens into a `ServiceDone`
(never raising, `BaseException` included: pykka would stop *every* actor on
one). `ServiceBackend` is the seam between a pool and where its calls run:
threads (pykka actors) here; processes and Ray implement the same protocol.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pykka
import structlog

from actorflow.actors.base import FastActor
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import RunService, RunServices, ServiceDone, ServicesDone, ServiceStatus
from actorflow.actors.threads import ThreadBook
from actorflow.core.errors import TransientError
from actorflow.core.failures import bound_message, describe_error, format_traceback
from actorflow.core.tracing import EventLogger, get_event_logger
from actorflow.core.types import DEFAULT_PIPELINE, FrozenDict, JSONValue, freeze
from actorflow.services import ResultStore
from actorflow.services.seed import unwrap

__all__ = [
    "CallClaims",
    "CallsInFlight",
    "Deliver",
    "OnDeath",
    "ServiceBackend",
    "ServiceWorker",
    "SilentLog",
    "ThreadBackend",
    "WorkerHandle",
    "call_fields",
    "crashed",
    "execute",
    "invoke",
    "is_plain",
    "log_done",
    "make_backend",
    "report",
    "report_failure",
    "runs_at_home",
    "stage_value",
    "status_of",
    "unsendable",
]

Deliver = Callable[[ServiceDone | ServicesDone], None]
"""Hands the orchestrator one report, or several at once (`ServicesDone`)."""


class OnDeath(Protocol):
    """Tells a pool's owner that a worker died unasked: its name, why, and whether it could not load its function.

    A worker that cannot load the stage's function (`cannot_load`) will never
    run a call: the calls it held fail at once, with `why`.
    """

    def __call__(self, worker: str, why: str, /, *, cannot_load: bool = False) -> None:
        """Report the death."""


def runs_at_home(fn: Callable[..., Any], *, same_machine: bool) -> bool:
    """True for a stage function that must run in the runtime's own process (the "at home" rule).

    Only the default persistence, a `ResultStore`, is bound to where the runtime
    lives: in memory it is private to this process, so it runs here for every
    backend; with a file path, workers on the same machine (`same_machine`, the
    process backend) open the same file, while workers on other nodes (Ray) would
    each write a file of their own, so it runs here too.
    """
    store = unwrap(fn)
    return isinstance(store, ResultStore) and (store.path is None or not same_machine)


def stage_value(call: RunService) -> JSONValue:
    """The value a call's stage gets: the one handed on, or the payload for the first stage."""
    return call.task.payload if call.value is None else call.value


def invoke(fn: Callable[..., Any], call: RunService) -> JSONValue:
    """Call a stage function, ``fn(task, value)``; freeze what it returns (None passes the value on).

    Raises `ValueTooLarge` for a value over the call's `max_value_bytes`: the size is measured here,
    in the worker, while the value is frozen, so that no backend sends a value on that would be refused.
    """
    returned = fn(call.task, stage_value(call))
    if returned is None:
        return None
    return freeze(returned, where=f"the value returned by stage {call.service!r}", max_bytes=call.max_value_bytes)


def execute(fn: Callable[..., Any], call: RunService, worker: str, *, log: EventLogger, node: str = "") -> ServiceDone:
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


def _execute(fn: Callable[..., Any], call: RunService, worker: str, log: EventLogger, node: str) -> ServiceDone:
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


def crashed(call: RunService, worker: str, node: str, error_type: str, error: str, duration_ms: float) -> ServiceDone:
    """The report of a call whose worker died under it (a process exited, a Ray actor was lost)."""
    return ServiceDone(
        call.call_id, call.service, call.task.task_id, worker, "crashed", None, error_type, error, duration_ms, node
    )


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
                "service.call",
                **(fields or call_fields(call, done.worker, done.node)),
                status="ok",
                started_at=done.started_at or _started_at(done),
                duration_ms=done.duration_ms,
            )
        return done
    emit = log.info if done.error_type == "ValidationError" else log.warning
    emit(
        "service.failed",
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


class CallsInFlight:
    """The calls one worker holds, in the order it runs them: the first is running, and since when.

    A backend whose worker queues calls (a child process's pipe, a Ray actor's queue) keeps one, so
    that a worker that dies is charged with the call it was running, and with no other. Thread-safe:
    calls are added on the orchestrator's thread and settled on the thread that reads the reports.
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

    def __len__(self) -> int:
        return len(self._calls)


class WorkerHandle(Protocol):
    """One worker of a pool, wherever it runs."""

    name: str

    def send(self, call: RunService) -> bool:
        """Queue a call on the worker without blocking. False if the worker is dead."""

    def send_many(self, calls: Sequence[RunService]) -> bool:
        """Queue several calls, in order, in as few messages as the backend can. False if the worker is dead."""

    def retire(self) -> None:
        """Stop the worker; calls it has not started are dropped (the pool re-sends them)."""

    def withdraw(self, call_id: int) -> bool:
        """Take back a sent call the worker has not started; True if it never will. May always say False."""

    def join(self, timeout: float) -> bool:
        """Wait for the worker to finish stopping. False if it is still busy (e.g. hung)."""


class ServiceBackend(Protocol):
    """Starts workers for pools: the seam for thread, process and Ray execution."""

    name: str

    def start_worker(
        self, name: str, service: str, fn: Callable[..., Any], deliver: Deliver, on_death: OnDeath
    ) -> WorkerHandle:
        """Start one worker that runs `fn` for each call and reports through `deliver`."""

    def close(self) -> None:
        """Release what the backend holds (called after every worker is retired)."""


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


HOLD_S = 0.001
"""How long a thread worker may hold a finished result back while it runs more calls of a batch."""


class _HeldResults:
    """Results a thread worker has finished and not delivered yet; its backend's sweeper may deliver them too.

    Delivery happens under the lock, so results leave in the order they were
    made whichever thread sends them.
    """

    __slots__ = ("_deliver", "_dones", "_lock", "_since")

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._lock = threading.Lock()
        self._dones: list[ServiceDone] = []
        self._since = 0.0

    def add(self, done: ServiceDone) -> bool:
        """Hold a result. True if it is the only one held (the caller then has the sweeper watch)."""
        with self._lock:
            self._dones.append(done)
            if len(self._dones) == 1:
                self._since = time.perf_counter()
                return True
            return False

    def release(self, call_id: int) -> bool:
        """If `call_id`'s result is held here, deliver every held result now and return True."""
        with self._lock:
            if all(done.call_id != call_id for done in self._dones):
                return False
            dones, self._dones = self._dones, []
            self._deliver(dones[0] if len(dones) == 1 else ServicesDone(tuple(dones)))
            return True

    def deliver(self, older_than: float | None = None) -> bool:
        """Deliver every held result (or only if the oldest was held `older_than` s or more). True if some are left."""
        with self._lock:
            dones = self._dones
            if not dones:
                return False
            if older_than is not None and time.perf_counter() - self._since < older_than:
                return True
            self._dones = []
            # A lone result goes as itself, so the light-load path is unchanged.
            self._deliver(dones[0] if len(dones) == 1 else ServicesDone(tuple(dones)))
            return False


class _ResultSweeper:
    """Delivers results that thread workers have held for `HOLD_S` while running the rest of a batch.

    A worker runs its calls one after the other, so a slow call would hold the
    results finished before it for its whole duration; this thread sends them
    on instead. It sleeps on an event while no worker holds anything, and starts
    with the first worker that does.
    """

    def __init__(self, threads: ThreadBook, hold_s: float = HOLD_S) -> None:
        self._threads = threads
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._watched: set[_HeldResults] = set()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, held: _HeldResults) -> None:
        """`held` has started holding results: deliver them if they are still there after `hold_s`."""
        with self._lock:
            self._watched.add(held)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="actorflow-result-sweeper", daemon=True)
                self._thread.start()
            if not self._wake.is_set():
                self._wake.set()

    def close(self) -> None:
        """Stop the sweeper's thread (workers still holding results deliver them at their batch's end)."""
        with self._lock:  # not between the sweeper's check of `_closed` and its clearing of `_wake`
            self._closed.set()
            self._wake.set()

    def _run(self) -> None:
        self._threads.record_current("worker")
        while self._wake.wait() and not self._closed.wait(self.hold_s):
            # Under the lock: a worker that starts holding again meanwhile is watched again after this.
            with self._lock:
                self._watched = {held for held in self._watched if held.deliver(older_than=self.hold_s)}
                if not self._watched and not self._closed.is_set():
                    self._wake.clear()


class ServiceWorker(FastActor):
    """A pykka actor that runs service calls one at a time.

    A `RunServices` batch runs in order, each call as a lone `RunService`
    would: its claim is taken first (a withdrawn call is skipped), and a crash
    stops the batch, so calls queued behind it never run here (the pool re-sends
    them). The batch's results are delivered together (`ServicesDone`) when it
    ends, or sooner once the oldest has been held for `HOLD_S`.

    Its thread is a daemon, so a call that hangs forever cannot stop the
    interpreter from exiting once the pool has retired the worker.
    """

    thread_role = "worker"

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        deliver: Deliver,
        on_death: OnDeath,
        retired: threading.Event,
        dead_letters: DeadLetterOffice,
        threads: ThreadBook,
        claims: CallClaims | None = None,
        sweeper: _ResultSweeper | None = None,
        held: _HeldResults | None = None,
    ) -> None:
        super().__init__(threads=threads)
        self._claims = claims
        self._held = held or _HeldResults(deliver)
        self._sweeper = sweeper or _ResultSweeper(threads)
        self._name = name
        self._fn = fn
        self._deliver = deliver
        self._on_death = on_death
        self._retired = retired
        self._dead_letters = dead_letters
        self._log = get_event_logger(name)

    def on_receive(self, message: Any) -> None:
        """Run a RunService call and deliver its ServiceDone, or the calls of a RunServices batch."""
        if type(message) is RunServices:
            self._run_batch(message.calls)
            return
        if not isinstance(message, RunService):
            self._dead_letters.post(message, to=self._name, why="unknown message type")
            return
        if self._retired.is_set():
            return  # the pool took this call back when it retired us
        if self._claims is not None and not self._claims.take(message.call_id):
            return  # withdrawn (its task was cancelled) before it started
        done = execute(self._fn, message, self._name, log=self._log)
        if done.status == "crashed":
            # Stop here: calls queued behind this one must not run on a worker that is being
            # replaced (the pool re-sends them, and would otherwise run them twice).
            self._retired.set()
        self._deliver(done)

    def _run_batch(self, calls: tuple[RunService, ...]) -> None:
        held, claims, retired, hold_s = self._held, self._claims, self._retired, self._sweeper.hold_s
        last = len(calls) - 1
        for index, call in enumerate(calls):
            if retired.is_set():
                break  # retired (the pool took the rest back), or a call below crashed
            if claims is not None and not claims.take(call.call_id):
                continue  # withdrawn before it started
            held.deliver(older_than=hold_s)
            done = execute(self._fn, call, self._name, log=self._log)
            if done.status == "crashed":
                retired.set()  # as for a lone call: nothing queued behind it runs here
            if held.add(done) and index < last:
                self._sweeper.watch(held)
        held.deliver()

    def on_stop(self) -> None:
        """Report an unrequested stop to the pool's owner."""
        if not self._retired.is_set():
            self._on_death(self._name, "stopped")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        """Report a death by exception (our own bug: `execute` catches the service's)."""
        self._on_death(self._name, f"failed with {exception_type.__name__}: {exception_value}")


class _ThreadWorker:
    __slots__ = ("_claims", "_held", "_ref", "_retired", "name")

    def __init__(
        self,
        name: str,
        ref: pykka.ActorRef[ServiceWorker],
        retired: threading.Event,
        claims: CallClaims,
        held: _HeldResults,
    ) -> None:
        self.name = name
        self._ref = ref
        self._retired = retired
        self._claims = claims
        self._held = held

    def release_result(self, call_id: int) -> bool:
        """True if `call_id` has finished and its report was held with a batch's: it is sent now."""
        return self._held.release(call_id)

    def withdraw(self, call_id: int) -> bool:
        return self._claims.take(call_id)

    def send(self, call: RunService) -> bool:
        self._claims.sent(call.call_id)
        try:
            self._ref.tell(call)
        except pykka.ActorDeadError:
            return False
        return True

    def send_many(self, calls: Sequence[RunService]) -> bool:
        claims = self._claims
        for call in calls:
            claims.sent(call.call_id)
        try:
            self._ref.tell(RunServices(tuple(calls)))
        except pykka.ActorDeadError:
            return False
        return True

    def retire(self) -> None:
        self._retired.set()
        with contextlib.suppress(pykka.ActorDeadError):
            self._ref.stop(block=False)

    def join(self, timeout: float) -> bool:
        return self._ref.actor_stopped.wait(timeout)


class ThreadBackend:
    """Workers are pykka actors in this process (the default backend)."""

    name = "thread"

    def __init__(self, dead_letters: DeadLetterOffice, threads: ThreadBook, *, hold_s: float = HOLD_S) -> None:
        """`hold_s`: how long a worker may hold a finished result while it runs the rest of a batch."""
        self._dead_letters = dead_letters
        self._threads = threads
        self._sweeper = _ResultSweeper(threads, hold_s)

    def start_worker(
        self, name: str, service: str, fn: Callable[..., Any], deliver: Deliver, on_death: OnDeath
    ) -> WorkerHandle:
        retired = threading.Event()
        claims = CallClaims()
        held = _HeldResults(deliver)
        ref = ServiceWorker.start(
            name, fn, deliver, on_death, retired, self._dead_letters, self._threads, claims, self._sweeper, held
        )
        return _ThreadWorker(name, ref, retired, claims, held)

    def close(self) -> None:
        """Stop the thread that delivers results held back by workers (the workers are retired by now)."""
        self._sweeper.close()


def make_backend(request: Any) -> ThreadBackend:
    """The thread backend, for the registry (`actors.backends`)."""
    return ThreadBackend(request.dead_letters, request.threads)
