"""The Ray service backend: each pool worker is a Ray actor, so service calls can run on a cluster.

The StateActor, the orchestrator, the journal and the result store stay in
this (the head) process; only the stateless service calls travel::

    orchestrator thread       waiter thread (the backend's Ray thread)          Ray actor (any node)
      pool ─ send(call) ──► queued ─► actor.run_many.remote([calls]) ───────► execute(fn, call) for each
                                  │     (at most two invocations out per actor)   │  same mapping as threads
                                  ▼                                               ▼
                          ref resolved ◄──── [ServiceDone, ...] (durations, node measured there)
                                  │
                                  ▼
                          log service.call / failed     ─► deliver(ServicesDone) ─► orchestrator

Nothing in a pool blocks, and nothing Ray-related runs on the orchestrator's
thread: `send`, `retire` and `start_worker` only note what is asked and hand
it to the backend's one Ray thread (the waiter), which submits the calls
(`.remote()`), kills the actor, promotes a spare, and turns resolved object
refs into `ServiceDone` messages. One thread for all of it keeps the order
the pool asked for: a worker's spare is promoted before its first call is
submitted, and its calls are submitted in the order they were sent.

**Batches.** A Ray round trip costs about 3 ms, far more than a small call.
So the waiter keeps up to two invocations in flight per actor (one running,
one on its way: the round trip is hidden) and, when more calls are queued for
an actor than that, sends them all in one invocation (`ServiceActor.run_many`),
whose reports come back together as one `ServicesDone`. It never waits to
fill a batch: whatever is queued when an invocation may go, goes. Calls are
batched only while most of the actor's recent calls were fast
(`RayBackend.fast_call_ms`): a slow call gains nothing from sharing a round
trip, and one call per invocation keeps crashes and hangs charged to the
call that caused them.

**Failures.** Retiring a worker (stage timeout, crash, shutdown) is
`ray.kill`: Ray cannot force-cancel a call running in an actor
(`ray.cancel(force=True)` refuses actor tasks), and killing the actor is what
interrupts a hung call. A worker whose actor dies mid-call (``os._exit``, OOM,
a lost node) reports the call it was running as ``crashed``, exactly as a
thread worker reports a `BaseException`: the pool replaces it, and the call
counts as an attempt, so a call that kills every worker it touches fails its
task after `max_attempts` instead of exhausting the pool's restart budget for
everyone. A call that raises a `BaseException` (``SystemExit``: the process
lives on) is ``crashed`` too, and its own: the actor's reports stop at it, and
the actor runs nothing more (a later invocation answers at once, with no
report); calls left without a report never ran, and the pool, replacing the
worker on the crash report, sends them to the new actor, once. Only a call
the actor held alone is surely the one that killed it: with several
unanswered (a batch, or a second invocation on its way), which one did is
unknown (their reports die with the process, even one that had returned but
whose reply was not yet sent), so none is charged: the worker is replaced,
all of them run again, and each of those *suspects* then runs alone, with
nothing else in flight on its actor, where a crash or a hang
is its own. A stage
timeout is the same: the worker does not vouch for its head call while that
call shares its invocation (`vouches_running`), so the timeout charges none
and the batch's calls become suspects. A lost node charges the oldest call it
held, as before: the node failed, not a call.

Ray is imported only when this backend is built; it is the optional extra
``actorflow[ray]``, never a core dependency.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import queue
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from actorflow.actors.backends.base import (
    BackendDefaults,
    Deliver,
    OnDeath,
    ServiceBackend,
    StageFn,
    WorkerDefaults,
    WorkerHandle,
)
from actorflow.actors.backends.toolkit import (
    AtHome,
    SilentLog,
    crashed,
    deliver_reports,
    execute,
    is_plain,
    log_done,
    ship_function,
    unsendable,
)
from actorflow.actors.messages import RunService, ServiceDone
from actorflow.core.errors import ConfigError
from actorflow.core.events import (
    RAY_BACKEND_STARTED,
    RAY_BACKEND_STOPPED,
    RAY_BATCH_LOST,
    RAY_INVOCATION_DONE,
    RAY_REPORT_FAILED,
    RAY_SPARES_REPLACED,
    RAY_WORK_FAILED,
    RAY_WORKERS_NOT_READY,
)
from actorflow.core.failures import describe_error
from actorflow.core.tracing import get_event_logger

__all__ = ["RayBackend", "ServiceActor", "describe_ray_error", "import_ray", "node_id_of"]

_INSTALL_HINT = "install the ray extra: pip install '.[ray]' in a clone of actorflow"

CONNECT_TIMEOUT_S = 30.0
"""The default bound on reaching a Ray cluster at an address (`RuntimeConfig.ray_connect_timeout_s`)."""

_session_lock = threading.Lock()
_session_users = 0
"""Backends using a Ray session that actorflow started; the last one to close shuts it down."""


def import_ray(wanted_by: str = "RuntimeConfig.service_backend='ray'") -> Any:
    """Import Ray, or raise ConfigError saying who wants it (`wanted_by`) and how to install it.

    Ray ships no complete type information, so it stays behind `Any`.
    """
    try:
        import ray  # noqa: PLC0415 - Ray is optional: imported only when the Ray backend is chosen
    except ImportError as exc:
        raise ConfigError(f"{wanted_by} needs Ray, which is not installed: {_INSTALL_HINT}") from exc
    return ray


# --- inside the Ray actor --------------------------------------------------------------------------


class ServiceActor:
    """The body of one Ray actor: runs a service function, one call at a time.

    It runs the thread backend's own `execute`, so the exception mapping is
    the same (TransientError: transient, Exception: permanent, BaseException:
    crashed) and the call's trace is bound in the worker's contextvars for the
    service's own logging. The ServiceDone it returns carries the duration
    measured here and ``node`` naming where the call ran: ``host/node:pid``,
    where ``node`` is the first 12 hex digits of the Ray node id. The node id
    is there because several Ray nodes can share one host (and one IP): the
    host alone cannot say which raylet, hence which node, ran the call.
    """

    def __init__(self, fn: StageFn) -> None:
        self._fn = fn
        node_id = _ray_node_id()
        self._node = f"{socket.gethostname()}/{node_id[:_NODE_ID_CHARS]}:{os.getpid()}"
        self._log = SilentLog("ray")
        self._invocations = 0
        self._poisoned = False
        """A call crashed here: the pool is replacing this actor, which runs nothing more."""

    def node(self) -> str:
        """Where this actor runs; answering also proves it has started (its function unpickled)."""
        return self._node

    def run(self, call: RunService, worker: str) -> ServiceDone:
        """Run one call as `worker`; never raises (a dying process is seen by the driver as an actor error)."""
        return _crossable(execute(self._fn, call, worker, log=self._log, node=self._node))

    def run_many(self, calls: Sequence[RunService], worker: str) -> tuple[list[ServiceDone], int]:
        """Run calls in order, each with its own report; and how many invocations this actor has had.

        A ``crashed`` call (a `BaseException` such as `SystemExit`) stops it, as
        it stops a thread worker: the reports end with that call's, and the
        actor is poisoned, so that every later invocation returns no report at
        once. The pool replaces the worker on the crash report and sends the
        calls left without one to the new actor; run here as well, they would
        run twice. The count is the actor's own, so that the driver can say
        how many round trips its calls really took.
        """
        self._invocations += 1
        dones: list[ServiceDone] = []
        if self._poisoned:
            return dones, self._invocations
        log, node, fn = self._log, self._node, self._fn
        for call in calls:
            done = _crossable(execute(fn, call, worker, log=log, node=node))
            dones.append(done)
            if done.status == "crashed":
                self._poisoned = True
                break
        return dones, self._invocations


def _crossable(done: ServiceDone) -> ServiceDone:
    """`done`, or a permanent failure of its call if its result cannot be sent to the driver.

    Ray pickles what an actor method returns after it has returned: a value
    that cannot be pickled would fail the whole invocation, which the driver
    cannot tell from the actor's death. So a result that is not made of plain
    builtins (`is_plain`, a cheap test) is pickled here first, to learn.
    """
    if done.result is None or is_plain(done.result):
        return done
    try:
        pickle.dumps(done.result, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - whatever pickling the user's value raises, it cannot cross
        return unsendable(done, exc, "from the Ray actor to the runtime")
    return done


_NODE_ID_CHARS = 12
"""Node id digits in a call's `node`: as many as a Ray node id needs to stay unique in a log (it has 56)."""


def _ray_node_id() -> str:
    """The id of the Ray node this actor runs on (`ray.get_runtime_context()`), "" outside Ray."""
    ray = import_ray()
    if not ray.is_initialized():
        return ""
    node_id: str = ray.get_runtime_context().get_node_id()
    return node_id


def node_id_of(node: str) -> str:
    """The Ray node id prefix in a call's `node` (``host/node:pid``); "" if it names none."""
    return node.rpartition(":")[0].partition("/")[2]


# --- in the driver ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spare:
    """A started actor not yet given to a pool, with the ref of its readiness probe (`ServiceActor.node`)."""

    actor: Any
    probe: Any
    """Resolves to the actor's `node` once it has started, or fails if it died: how a spare is known lost."""


@dataclass(frozen=True, slots=True)
class _Pending:
    worker: _RayWorker
    calls: tuple[RunService, ...]
    """The calls of one invocation, in the order the actor runs them."""


_IN_FLIGHT = 2
"""Invocations out per actor at most: one running, one on its way, so the actor never waits a round trip."""
_BATCH_MAX = 32
"""Calls per invocation at most (the pool queues at most `RayBackend.max_queue_depth` per worker anyway)."""
_BATCH_WINDOW = 16
"""Calls are batched only while most of an actor's last this many calls were fast (`RayBackend.fast_call_ms`)."""
_SUSPECTS_MAX = 4096
"""Suspect calls remembered at most (a suspect whose task was cancelled is never seen again)."""

SuspectKey = tuple[str, str, int]
"""A call across re-runs: (task id, pool, attempt); a re-run of the same attempt gets a new call id."""


def _suspect_key(call: RunService) -> SuspectKey:
    return call.task.task_id, call.service, call.attempt


class _RayWorker(WorkerDefaults):
    """A pool's handle on one Ray actor.

    The pool calls `send`, `send_many`, `retire` and `join` from the
    orchestrator's thread; they touch no Ray API: the Ray work (`_promote`,
    `_pump`, `_kill`) runs on the backend's waiter thread, queued in the order
    it was asked for.
    """

    __slots__ = (
        "_actor",
        "_backend",
        "_pump_due",
        "dead",
        "deliver",
        "invocations",
        "log",
        "name",
        "node",
        "on_death",
        "probe",
        "queued",
        "recent",
        "retired",
        "settled",
        "unsettled",
    )

    def __init__(self, name: str, backend: RayBackend, deliver: Deliver, on_death: OnDeath) -> None:
        self.name = name
        self._actor: Any = None
        """Set on the waiter thread when a spare is promoted (before any call to this worker is submitted)."""
        self.probe: Any = None
        """The actor's readiness probe: says where it runs even if none of its calls ever comes back."""
        self._backend = backend
        self.deliver = deliver
        self.on_death = on_death
        self.log = get_event_logger(name)
        self.retired = False
        self.dead = False
        """Set by the waiter when the actor is seen dead; its later results are dropped."""
        self.node = ""
        """Where the actor runs, once one of its calls has come back."""
        self.queued: deque[RunService] = deque()
        """Calls sent by the pool, not yet submitted: appended on the orchestrator's thread, taken on the waiter's."""
        self._pump_due = False
        """A `_pump` is queued on the waiter, which will take whatever `queued` holds by then."""
        self.invocations: deque[tuple[RunService, ...]] = deque()
        """Invocations submitted and not yet answered, in order: the actor runs the first (waiter thread only)."""
        self.recent: deque[float] = deque(maxlen=_BATCH_WINDOW)
        """The durations (ms) of the actor's last calls, which decide whether its calls are batched."""
        self.settled = threading.Event()
        """Set once the worker is killed and every call it held has resolved (see `join`)."""
        self.unsettled = 0
        """Invocations of the killed actor not yet resolved; only the waiter thread counts them."""

    def send(self, call: RunService) -> bool:
        """Queue the call for submission to the actor and return at once.

        A dead actor is found out by the waiter (the call's ref fails), which
        reports the call it was running as crashed; so only a retired worker
        refuses here.
        """
        if self.retired:
            return False
        self.queued.append(call)
        self._wake()
        return True

    def send_many(self, calls: Sequence[RunService]) -> bool:
        """Queue several calls, in order: the waiter submits them in as few invocations as it may."""
        if self.retired:
            return False
        self.queued.extend(calls)
        self._wake()
        return True

    def _wake(self) -> None:
        # One `_pump` queued at a time: it clears the flag before it takes the calls, so a call
        # appended after that either is taken by it or queues the next one.
        if not self._pump_due:
            self._pump_due = True
            self._backend.waiter.run_soon(self._pump)

    def _pump(self) -> None:
        """On the waiter thread: submit what is queued, while fewer than `_IN_FLIGHT` invocations are out."""
        self._pump_due = False
        if self.retired or self.dead:
            self.queued.clear()  # the pool has taken (or will take) these calls back
            return
        queued, invocations, suspects = self.queued, self.invocations, self._backend.suspects
        while queued and len(invocations) < _IN_FLIGHT:
            if suspects:
                # A suspect runs with nothing else in flight: if the actor dies then, the call is known.
                last = invocations[-1] if invocations else None
                if last is not None and len(last) == 1 and _suspect_key(last[0]) in suspects:
                    return
                if _suspect_key(queued[0]) in suspects and invocations:
                    return
            self._submit(self._take_batch())

    def _take_batch(self) -> tuple[RunService, ...]:
        """The next calls for one invocation: one, unless the actor is fast; a suspect always alone."""
        queued, suspects = self.queued, self._backend.suspects
        first = queued.popleft()
        recent = self.recent
        # Most recent calls fast (the median): one slow call does not turn batching off.
        fast = len(recent) == _BATCH_WINDOW and sorted(recent)[_BATCH_WINDOW // 2] < self._backend.fast_call_ms
        if not fast or (suspects and _suspect_key(first) in suspects):
            return (first,)
        batch = [first]
        while queued and len(batch) < _BATCH_MAX:
            if suspects and _suspect_key(queued[0]) in suspects:
                break
            batch.append(queued.popleft())
        return tuple(batch)

    def _submit(self, calls: tuple[RunService, ...]) -> None:
        """On the waiter thread: `.remote()` one invocation; a failure to submit is the actor's death."""
        waiter = self._backend.waiter
        self.invocations.append(calls)  # before it can resolve, so that its report finds it
        try:
            if self._actor is None:
                raise RuntimeError("no Ray actor could be started for this worker")
            ref = self._actor.run_many.remote(calls, self.name)
        except Exception as exc:  # noqa: BLE001 - the actor or the cluster is gone: report it as a crash
            waiter.report_now(self, calls, exc)
            return
        waiter.watch(ref, self, calls)

    def withdraw(self, call_id: int) -> bool:
        """Always False: a call sent to a Ray actor cannot be taken back (the pool keeps its depth small)."""
        return False

    def vouches_running(self, call_id: int) -> bool:
        """False if `call_id` shares its invocation with other calls: which of them hangs is unknown.

        Read on the orchestrator's thread while the waiter changes `invocations`: a
        stale answer only errs on one side (a batch just answered is still taken
        as a batch), and the calls it spares are run again, not lost.
        """
        try:
            running = self.invocations[0]
        except IndexError:
            return True
        return len(running) == 1 or all(call.call_id != call_id for call in running)

    def retire(self) -> None:
        """Have the actor killed (interrupting a hung call); its results from now on are dropped."""
        if self.retired:
            return
        self.retired = True  # from now on `_report` drops this worker's results, whatever the waiter is doing
        self._backend.waiter.run_soon(self._kill)

    def _kill(self) -> None:
        """On the waiter thread: stop watching the actor's calls, and kill it.

        If it was running a batch (a stage timeout), which call hung is not
        known: its calls become suspects, each run alone from now on.
        """
        self.queued.clear()
        if self.invocations and len(self.invocations[0]) > 1 and not self.dead:
            self._backend.suspect(self.invocations[0])
        self.unsettled = self._backend.waiter.forget_worker(self)
        if self.unsettled == 0:
            self.settled.set()
        if self._actor is not None:
            with contextlib.suppress(Exception):  # already dead, or the cluster is gone: either way it is over
                self._backend.ray.kill(self._actor, no_restart=True)

    def join(self, timeout: float) -> bool:
        """Wait until the actor is killed and the calls it held have resolved (they fail fast once it is)."""
        return self.settled.wait(timeout)


class _RefWaiter:
    """One thread per backend: reports each submitted call as soon as its ref resolves.

    Each ref's `future()` callback (run on a Ray thread, so it only enqueues)
    wakes this thread, which reads the outcome, logs and delivers it. A loop
    on `ray.wait(refs, timeout=...)` was measured first: `ray.wait` cannot be
    woken for a ref submitted while it waits, so each stage hop paid up to the
    poll interval (p50 of one call 11.4 ms with a 10 ms poll, 4.0 ms with 2 ms,
    against 2.1 ms with callbacks and 1.9 ms for a bare `ray.get`).
    """

    def __init__(
        self, *, report: Callable[[_Pending, Any, BaseException | None], None], name: str = "actorflow-ray-waiter"
    ) -> None:
        self._report = report
        self._pending: dict[Any, _Pending] = {}
        self._forgotten: dict[Any, _RayWorker] = {}
        """Refs of killed workers, until they resolve: a worker is settled when all of its have."""
        self._lock = threading.Lock()
        self._ready: queue.SimpleQueue[tuple[Any, Future[Any]] | Callable[[], None] | None] = queue.SimpleQueue()
        self._log = get_event_logger("ray-waiter")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, ref: Any, worker: _RayWorker, calls: tuple[RunService, ...]) -> None:
        """Report `ref` when it resolves (as the outcome of the invocation of `calls` on `worker`)."""
        with self._lock:
            self._pending[ref] = _Pending(worker, calls)
        future: Future[Any] = ref.future()
        future.add_done_callback(lambda done: self._ready.put((ref, done)))

    def run_soon(self, work: Callable[[], None]) -> None:
        """Run `work` on this thread, after everything queued before it (any thread may call this)."""
        self._ready.put(work)

    def report_now(self, worker: _RayWorker, calls: tuple[RunService, ...], error: BaseException) -> None:
        """Report an invocation as failed by `error` without a ref (it could not even be submitted)."""
        self._report(_Pending(worker, calls), None, error)

    def forget_worker(self, worker: _RayWorker) -> int:
        """Stop watching a worker's refs (their outcomes will be dropped); returns how many are outstanding."""
        with self._lock:
            refs = [ref for ref, pending in self._pending.items() if pending.worker is worker]
            for ref in refs:
                del self._pending[ref]
                self._forgotten[ref] = worker
        return len(refs)

    def stop(self, timeout: float = 5.0) -> None:
        """Drop every outstanding ref and end the thread."""
        with self._lock:
            self._pending.clear()
        self._ready.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._lock:
            for worker in self._forgotten.values():
                worker.settled.set()  # nobody is left to see its calls resolve
            self._forgotten.clear()

    def _run(self) -> None:
        while (item := self._ready.get()) is not None:
            if callable(item):
                try:
                    item()
                except Exception as exc:  # noqa: BLE001 - a dead waiter would strand every call: log, go on
                    self._log.error(RAY_WORK_FAILED, error_type=type(exc).__name__, error=str(exc))
                continue
            ref, future = item
            with self._lock:
                pending = self._pending.pop(ref, None)
                killed = self._forgotten.pop(ref, None) if pending is None else None
            if pending is None:
                if killed is not None:  # a killed worker's call: `join` waits for the last one
                    killed.unsettled -= 1
                    if killed.unsettled == 0:
                        killed.settled.set()
                continue
            try:
                outcome, error = future.result(), None
            except Exception as exc:  # noqa: BLE001 - any Ray error means the call did not finish
                outcome, error = None, exc
            try:
                self._report(pending, outcome, error)
            except Exception as exc:  # noqa: BLE001 - a dead waiter would strand every call: log, go on
                self._log.error(RAY_REPORT_FAILED, error_type=type(exc).__name__, error=str(exc))


class RayBackend(BackendDefaults):
    """Starts each pool worker as a Ray actor on the cluster at `address`.

    Actors are started warm: the constructor starts every pool's actors, plus
    `spares` per service, and waits (up to `ready_timeout_s`) until they have
    loaded their function. A worker that is replaced takes a warm spare, and a
    new spare starts in the background. So a stage timeout measures the call,
    not a Ray worker process booting (seconds on a small machine).

    Args:
        address: None starts a local Ray with the runtime (and shuts it down
            with it); "auto" or "ray://host:port" joins an existing cluster. If
            Ray is already initialised in this process (`ray.init` called by
            the program), that session is used as it is and left running.
        functions: the pipeline's functions by service, checked up front:
            each must pickle, and load on a Ray worker.
        pool_sizes: workers per service, to start them ahead.
        local: where functions bound to this process run, i.e. the default
            persistence's `ResultStore` (its SQLite database lives on the head).
        spares: warm actors kept ready per service for replacements.
        ready_timeout_s: how long to wait for the first actors; past it the
            runtime starts anyway (a cluster may still be scaling up) and logs
            `ray.workers_not_ready`.
        connect_timeout_s: how long a cluster at `address` (``host:port`` or
            ``ray://host:port``) may take to answer before `ConfigError`. It
            bounds the check made before `ray.init` (connect, then wait for
            the first bytes of the cluster's gRPC greeting), so that an
            unreachable or silent address fails fast instead of inside Ray's
            own minutes of retries; an endpoint that answers is left to Ray.
        wanted_by: who asked for this backend, for the error when Ray is not installed.
        ray_module: Ray itself, for tests; imported lazily by default.

    Raises:
        ConfigError: Ray is not installed, the cluster cannot be reached, or a
            service function cannot be sent to, or loaded on, Ray workers.
    """

    max_queue_depth = 16
    """Calls queued per worker at most, while its calls are fast (see ServicePool): what a batch can hold."""
    min_queue_depth = 2
    """Calls queued per worker at least, even slow ones: the second is on its way while the first runs."""
    fast_call_ms = 5.0
    """A call shorter than this is fast, next to a round trip of about 3 ms: such calls are queued deep and batched."""

    name = "ray"

    def __init__(
        self,
        address: str | None,
        *,
        functions: Mapping[str, StageFn],
        pool_sizes: Mapping[str, int],
        local: ServiceBackend,
        spares: int = 1,
        ready_timeout_s: float = 60.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        wanted_by: str = "RuntimeConfig.service_backend='ray'",
        ray_module: Any = None,
    ) -> None:
        self.ray: Any = ray_module if ray_module is not None else import_ray(wanted_by)
        self._connect_timeout_s = connect_timeout_s
        self._on_head = AtHome(lambda: local, same_machine=False)
        self._spares = spares
        self._log = get_event_logger("ray")
        self._stock: dict[str, deque[_Spare]] = {}
        """Started actors not yet given to a pool, per service."""
        self._stock_lock = threading.Lock()
        """The waiter thread promotes, replaces and kills spares; `close` kills any it left (it timed out)."""
        self._owns_session = self._join_session(address)
        self._closed = False
        self.suspects: dict[SuspectKey, None] = {}
        """Calls of a batch whose actor died or hung, each run alone from now on (waiter thread only)."""
        self.calls_done = 0
        """Calls answered by Ray actors."""
        self._invocations_done: dict[str, int] = {}
        """Per worker, the actor's own count of its invocations, as it last reported it."""
        try:
            self._remote_class = self.ray.remote(scheduling_strategy="SPREAD")(ServiceActor)
            self._shipped = self._ship(functions)
            self._nodes: list[str] = self._nodes_with_cpus() if self._shipped else []
            """Node ids over which new actors are dealt (changed under `_stock_lock`)."""
            self._dealt = {service: itertools.count() for service in self._shipped}
            for service in self._shipped:
                self._stock[service] = deque(self._new_spare(service) for _ in range(pool_sizes[service] + spares))
            nodes = self._await_ready(ready_timeout_s)
        except BaseException:
            self._kill_stock()
            self._leave_session()
            raise
        self.waiter = _RefWaiter(report=self._report)
        self._log.info(
            RAY_BACKEND_STARTED,
            address=address,
            started_ray=self._owns_session,
            on_ray=sorted(self._shipped),
            on_head=sorted(set(functions) - set(self._shipped)),
            nodes=sorted(nodes),
        )

    # --- session ---------------------------------------------------------------------------------

    def _join_session(self, address: str | None) -> bool:
        """Use the process's Ray session, or start/join one; True if actorflow owns it."""
        global _session_users
        with _session_lock:
            if self.ray.is_initialized():
                if _session_users == 0:
                    return False  # the program's own session: never ours to shut down
            else:
                if address is not None:
                    _check_reachable(address, self._connect_timeout_s)
                try:
                    # Local Ray without the dashboard: the runtime needs none, and it starts faster.
                    options: dict[str, Any] = {"include_dashboard": False} if address is None else {}
                    self.ray.init(address=address, **options)
                except Exception as exc:
                    where = "start a local Ray" if address is None else f"connect to Ray at {address!r}"
                    raise ConfigError(f"RuntimeConfig.ray_address={address!r}: cannot {where}: {exc}") from exc
            _session_users += 1
            return True

    def _leave_session(self) -> None:
        global _session_users
        if not self._owns_session:
            return
        with _session_lock:
            _session_users -= 1
            if _session_users == 0:
                self.ray.shutdown()

    def _ship(self, functions: Mapping[str, StageFn]) -> dict[str, Any]:
        """Put every function that can run on Ray into the object store, once; fail early if one cannot."""
        return {
            service: ship_function(
                service,
                fn,
                pack=self.ray.put,
                to="Ray workers",
                advice="use a module-level function from a module importable on every node",
            )
            for service, fn in self._on_head.away(functions).items()
        }

    def _new_spare(self, service: str) -> _Spare:
        """Start an actor for `service`, on the next node in turn (see `_nodes_with_cpus`)."""
        remote_class = self._remote_class
        if self._nodes:
            node_id = self._nodes[next(self._dealt[service]) % len(self._nodes)]
            strategy = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id, soft=True)
            remote_class = remote_class.options(scheduling_strategy=strategy)
        actor = remote_class.remote(self._shipped[service])
        return _Spare(actor, actor.node.remote())

    def _nodes_with_cpus(self) -> list[str]:
        """The alive nodes that can host actors (any CPU), in a stable order, over which each pool is dealt.

        Ray's own SPREAD is best effort: it skips a node whose CPUs are held
        at that moment, and an actor holds one while it starts, so on small
        nodes both actors of a pool often landed on one node. Dealing each
        service's actors round-robin over the nodes, with a *soft* node
        affinity (a node that is gone, full or unfit makes Ray place the
        actor elsewhere), puts a pool of N actors on min(N, nodes) nodes.
        A node with no CPU (a head started with ``--num-cpus=0``) gets none.
        """
        try:
            return _with_cpus(self.ray.nodes())
        except Exception:  # noqa: BLE001 - no node list (an old Ray, a client quirk): Ray's SPREAD decides
            return []

    def _await_ready(self, timeout: float) -> set[str]:
        """Wait for the started actors; a function that cannot load on a worker is a ConfigError."""
        probes = {spare.probe: service for service, spares in self._stock.items() for spare in spares}
        if not probes:
            return set()
        ready, not_ready = self.ray.wait(list(probes), num_returns=len(probes), timeout=timeout)
        nodes: set[str] = set()
        for ref in ready:
            try:
                nodes.add(self.ray.get(ref).rpartition(":")[0])
            except Exception as exc:
                service = probes[ref]
                raise ConfigError(
                    f"the {service} function cannot be loaded on a Ray worker ({describe_ray_error(exc)}); "
                    "it must come from a module importable on every node, with actorflow installed there"
                ) from exc
        if not_ready:
            self._log.warning(RAY_WORKERS_NOT_READY, waiting=len(not_ready), timeout_s=timeout)
        return nodes

    def _kill_stock(self) -> None:
        with self._stock_lock:
            for spares in self._stock.values():
                for spare in spares:
                    with contextlib.suppress(Exception):
                        self.ray.kill(spare.actor, no_restart=True)
                spares.clear()

    def _drop_spares_on_lost_nodes(self) -> set[str]:
        """Runs on the waiter thread when an actor has died: kill the spares that died with it.

        When a node is lost, the warm spares on it are gone too, but nothing
        says so until a call is sent to one. Promoted as they are, the call
        retried after the crash would crash again on the same lost node, and
        burn a second attempt. So each actor death asks the GCS which nodes
        are dead (`ray.nodes()`, one RPC: deaths are rare) and replaces the
        spares that were there, or that failed to start, with new ones, which
        Ray places on the surviving nodes. Returns the lost nodes (node id prefixes).
        """
        try:
            nodes = self.ray.nodes()
        except Exception:  # noqa: BLE001 - the GCS is unreachable: keep the spares, a dead one fails its call
            return set()
        lost = {node["NodeID"][:_NODE_ID_CHARS] for node in nodes if not node["Alive"]}
        dropped = 0
        with self._stock_lock:
            if self._closed:
                return lost
            if self._nodes:
                self._nodes = _with_cpus(nodes)  # deal new actors over the nodes alive now
            for service, spares in self._stock.items():
                alive: deque[_Spare] = deque()
                for spare in spares:
                    if not self._spare_lost(spare, lost):
                        alive.append(spare)
                        continue
                    dropped += 1
                    with contextlib.suppress(Exception):
                        self.ray.kill(spare.actor, no_restart=True)
                while len(alive) < len(spares):
                    alive.append(self._new_spare(service))
                self._stock[service] = alive
        if dropped:
            self._log.warning(RAY_SPARES_REPLACED, spares=dropped, lost_nodes=sorted(lost))
        return lost

    def _probed_node(self, probe: Any) -> str:
        """The `node` an actor's probe answered, or "" if it has not (yet) or failed; never waits."""
        try:
            ready, _ = self.ray.wait([probe], num_returns=1, timeout=0)
            node: str = self.ray.get(ready[0]) if ready else ""
        except Exception:  # noqa: BLE001 - the actor died before it started: where is unknown
            return ""
        return node

    def _spare_lost(self, spare: _Spare, lost: set[str]) -> bool:
        """True if the spare died, or runs on a lost node; a spare still starting is kept (Ray places it)."""
        ready, _ = self.ray.wait([spare.probe], num_returns=1, timeout=0)
        if not ready:
            return False
        try:
            node: str = self.ray.get(spare.probe)
        except Exception:  # noqa: BLE001 - any error from the probe means the actor is gone
            return True
        return node_id_of(node) in lost

    # --- ServiceBackend --------------------------------------------------------------------------

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        """Give the pool a warm Ray actor for `service` (a local thread worker for a head-bound function)."""
        if service not in self._stock or self._closed:
            return self._on_head.start_worker(name, service, fn, deliver, on_death)
        worker = _RayWorker(name, self, deliver, on_death)
        self.waiter.run_soon(lambda: self._promote(worker, service))
        return worker

    def _promote(self, worker: _RayWorker, service: str) -> None:
        """On the waiter thread: give `worker` a warm spare (or a new actor), and start a spare in its place."""
        with self._stock_lock:
            stock = self._stock[service]
            spare = stock.popleft() if stock else self._new_spare(service)
            worker._actor, worker.probe = spare.actor, spare.probe
            while len(stock) < self._spares:  # replenish in the background: `.remote()` does not wait
                stock.append(self._new_spare(service))

    def close(self) -> None:
        """Kill the spares, stop the waiter, and shut Ray down if this runtime started it."""
        if self._closed:
            return
        self._closed = True
        # Queued behind the kills and promotions the pools asked for, so that no spare starts after it.
        self.waiter.run_soon(self._kill_stock)
        self.waiter.stop()
        self._kill_stock()  # no-op, unless the waiter did not finish in time
        self._on_head.close()
        self._leave_session()
        self._log.info(
            RAY_BACKEND_STOPPED,
            stopped_ray=self._owns_session,
            calls=self.calls_done,
            invocations=self.invocations_done,
        )

    @property
    def invocations_done(self) -> int:
        """Remote invocations the actors ran, by their own count (`calls_done` over this is the batch size)."""
        return sum(self._invocations_done.values())

    def suspect(self, calls: Sequence[RunService]) -> None:
        """On the waiter thread: run each of these calls alone from now on (one of them killed or hung its actor)."""
        suspects = self.suspects
        for call in calls:
            suspects[_suspect_key(call)] = None
        while len(suspects) > _SUSPECTS_MAX:
            del suspects[next(iter(suspects))]

    # --- the waiter's reports --------------------------------------------------------------------

    def _report(self, pending: _Pending, outcome: Any, error: BaseException | None) -> None:
        """Runs on the waiter thread: log each call's end in this process and tell its pool, in one message."""
        worker = pending.worker
        if worker.retired or worker.dead:
            return  # late: the pool has taken its calls back
        if error is None:
            dones, invocations = outcome
            self._finished(worker, pending.calls, dones, invocations)
            if len(dones) == len(pending.calls):  # else the actor is poisoned: a crash report replaces it
                worker._pump()  # an invocation's slot is free: send what queued up meanwhile
            return
        # The actor is gone (or Ray could not run the call): blame the call it was running.
        worker.dead = True
        # Before the pool hears of it and promotes a spare: that spare must not be on a lost node.
        lost = self._drop_spares_on_lost_nodes()
        # Every call it held unanswered: the first was running, unless its answer died with the process
        # (a reply is sent after the call returns, and a call behind it that kills the process at once
        # can leave it unsent). So only a lone call is surely the one that killed it.
        held = [call for calls in worker.invocations for call in calls] or list(pending.calls)
        why = describe_ray_error(error)
        if not worker.node:  # it died in its first call (a lost node): its probe still says where it was
            worker.node = self._probed_node(worker.probe)
        if len(held) == 1 or node_id_of(worker.node) in lost:
            call = held[0]  # the oldest call it held: the one it was running, as far as the head can know
            worker.deliver(crashed(worker.log, call, worker.name, worker.node, type(error).__name__, why, 0.0))
        else:
            # Which of its calls killed it is unknown: none is charged, each runs alone next time.
            self.suspect(held)
            self._log.warning(
                RAY_BATCH_LOST,
                worker=worker.name,
                calls=len(held),
                task_ids=[call.task.task_id for call in held],
                node=worker.node,
                error=why,
            )
        # Replaces the worker and runs its other calls again (or is an idempotent safety net, after a crash report).
        worker.on_death(worker.name, f"Ray actor died: {why}")

    def _finished(
        self, worker: _RayWorker, calls: tuple[RunService, ...], dones: list[ServiceDone], invocations: int
    ) -> None:
        """One invocation answered: its calls' reports go to the pool in one message.

        Calls without a report (those behind a crashed call, or all of them
        once the actor is poisoned) never ran: nothing is said of them, and they
        stay with the pool, which re-sends them once it replaces the worker on
        the crash report. The crash report itself marks the worker dead, so that
        nothing more is sent to the actor, and what it answers later, or its
        death when it is killed, is dropped instead of blamed on calls it never ran.
        """
        with contextlib.suppress(ValueError):  # answered in order; `remove` in case a callback overtook another
            worker.invocations.remove(calls)
        self.calls_done += len(dones)
        self._invocations_done[worker.name] = invocations
        suspects, recent, log = self.suspects, worker.recent, worker.log
        for call, done in zip(calls[: len(dones)], dones, strict=True):
            if suspects:
                suspects.pop(_suspect_key(call), None)
            recent.append(done.duration_ms)
            log_done(log, call, done)
        if log.enabled("debug"):
            task_ids = [call.task.task_id for call in calls]
            not_run = {"not_run": task_ids[len(dones) :]} if len(dones) < len(calls) else {}
            log.debug(RAY_INVOCATION_DONE, invocation=invocations, task_ids=task_ids, **not_run)
        if not dones:
            return
        worker.node = dones[-1].node or worker.node
        if dones[-1].status == "crashed":
            worker.dead = True
        deliver_reports(worker.deliver, dones)


def _with_cpus(nodes: list[dict[str, Any]]) -> list[str]:
    """The ids of the alive nodes in `ray.nodes()` that have CPUs, sorted."""
    return sorted(node["NodeID"] for node in nodes if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0)


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""The client's HTTP/2 connection preface and an empty SETTINGS frame: a gRPC server answers it at once."""


def _check_reachable(address: str, timeout: float) -> None:
    """Raise ConfigError unless something at `address` answers within `timeout` seconds.

    ``ray.init`` retries an address that does not answer for minutes (a
    refused port, a dropped packet, a server that accepts and says nothing).
    A Ray cluster's GCS (and a Ray Client server) speaks gRPC, whose server
    answers a client's HTTP/2 preface at once: any answer will do (a TLS
    cluster answers with an alert), Ray then takes over. An address that is
    not ``host:port`` (``"auto"``) is Ray's to resolve.
    """
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit():
        return
    host = host.strip("[]") or "127.0.0.1"
    deadline = time.monotonic() + timeout
    where = f"RuntimeConfig.ray_address={address!r}: cannot connect to Ray at {address!r}"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(max(0.001, deadline - time.monotonic()))
            conn.sendall(_HTTP2_PREFACE)
            answer = conn.recv(1)
    except TimeoutError:
        raise ConfigError(
            f"{where}: no answer within {timeout:g}s (RuntimeConfig.ray_connect_timeout_s); is the cluster up "
            "and the address right?"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: {describe_error(exc)}; is the cluster up and the address right?") from exc
    if not answer:
        raise ConfigError(f"{where}: it closed the connection without answering; is this a Ray cluster's address?")


def describe_ray_error(error: BaseException) -> str:
    """Ray's errors run over many lines (ids, pid, traceback): keep the root cause, or else the first line.

    A creation task that failed ends with the worker's own exception
    (``ModuleNotFoundError: No module named 'app'``), which is what a user needs.
    """
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    causes = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if causes:
        return causes[-1]
    return lines[0] if lines else type(error).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")
