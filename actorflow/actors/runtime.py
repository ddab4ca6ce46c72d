"""The Runtime facade: what an embedding program uses.

    with Runtime() as runtime:
        handle = runtime.submit({"name": "report", "data": {"rows": 3}})
        record = handle.result(timeout=5)

It starts the StateActor, the OrchestratorActor and its service pools, and
stops every one of them in `close()`.

Supervision (pykka has none). Both central actors report when they stop
(`on_exit`); a stop the runtime did not ask for is handled on the runtime's
supervisor thread:

- the OrchestratorActor is replaced by a fresh one (new pools), which the
  StateActor `adopt`s and which resumes every non-terminal task, as recovery
  does after a restart;
- the StateActor, with a journal, is rebuilt from the journal, together with a
  fresh orchestrator (the old one is stopped first);
- the StateActor without a journal cannot be rebuilt: the runtime *fails*
  (`Health` "failed"), and every pending `result()` and `join()`, and any
  later `submit()`, raise `RuntimeFailed`. A journal lost while running fails
  the runtime the same way.

Milestones (`on_milestone=`) report these and other internal events.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import itertools
import os
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import pykka
from pykka.messages import ProxyCall

from actorflow.actors.backends import BackendRequest, ServiceBackend, make_backend, stage_backend
from actorflow.actors.backends.thread import ThreadBackend
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.health import Health, LogThrottle, Milestone, Milestones
from actorflow.actors.messages import CancelTask, CreateTask, CreateTasks, ResumeTasks
from actorflow.actors.orchestrator import OrchestratorActor, pool_name
from actorflow.actors.state import StateActor
from actorflow.actors.telemetry import MetricsCollector, Telemetry
from actorflow.actors.threads import ThreadBook
from actorflow.actors.timer import Timer
from actorflow.core.config import TERMINAL_STATES, RuntimeConfig
from actorflow.core.errors import (
    ConfigError,
    InvalidPayload,
    Overloaded,
    RuntimeFailed,
    RuntimeStopped,
    TaskNotFound,
    UnknownPipeline,
    WouldDeadlock,
    quote,
)
from actorflow.core.pipeline import Pipeline
from actorflow.core.tracing import get_event_logger, new_task_id, new_trace, parse_traceparent
from actorflow.core.types import JSONInput, TaskRecord, TaskState, TransitionEvent, freeze_payload
from actorflow.services import ResultStore, ServiceSet

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from actorflow.core.journal import ReaderStore

__all__ = ["Milestone", "Runtime", "TaskHandle"]

_ASK_TIMEOUT_S = 30.0
"""Upper bound on any wait for an actor's answer outside the hot path (pykka's stop race)."""
_RESTART_WAIT_S = 10.0
"""How long a call that met a central actor being restarted waits for the replacement."""
_REFUSAL_LOG_INTERVAL_S = 1.0
"""At most one ``task.submit_refused`` / ``tasks.submit_refused`` line per this many seconds."""

_open_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
_hooks_lock = threading.Lock()
_hooks_installed = False


def _install_process_hooks() -> None:
    """Register the exit and fork hooks, once, when the first Runtime is made (never at import:
    a program that only imports actorflow, or reads a journal, gets nothing added to its exit or its forks)."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        atexit.register(_close_forgotten_runtimes)
        if hasattr(os, "register_at_fork"):  # POSIX only
            os.register_at_fork(after_in_child=_forget_runtimes_in_forked_child)
        _hooks_installed = True


_names_in_use: set[str] = set()
"""The names of this process's open runtimes (the ``runtime`` label of their metrics)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _claim_name(name: object) -> str:
    """Reserve `name` for a new runtime, or pick "default" ("default-2", ... when taken). Raises ConfigError."""
    with _hooks_lock:
        if name is None:
            picked, number = "default", 1
            while picked in _names_in_use:
                number += 1
                picked = f"default-{number}"
            _names_in_use.add(picked)
            return picked
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"Runtime name {quote(name)} is not allowed: use 1 to 64 letters, digits, '_', '-' or '.', "
                "starting with a letter or a digit"
            )
        if name in _names_in_use:
            raise ConfigError(
                f"Runtime name {name!r} is taken by an open runtime of this process; its metrics could not be "
                "told apart: give each runtime its own name (or close the other first)"
            )
        _names_in_use.add(name)
        return name


def _release_name(name: str) -> None:
    with _hooks_lock:
        _names_in_use.discard(name)


def _close_forgotten_runtimes() -> None:
    """Actor threads are daemons, so a forgotten runtime cannot hang exit; commit what it has, though."""
    for runtime in list(_open_runtimes):
        runtime.close(drain=False)


def _forget_runtimes_in_forked_child() -> None:
    """In a fork() child, the runtimes' actor threads stayed in the parent: mark them unusable here.

    Only plain attributes are set: a lock another thread of the parent held at the
    fork stays held in the child forever, so nothing here (nor in `close()` after
    it) may take one. Exit is then immediate instead of waiting on absent threads.
    """
    global _hooks_lock
    for runtime in list(_open_runtimes):
        runtime._forked = True
    _hooks_lock = threading.Lock()  # a parent's thread may have held it at the fork: here it would stay held
    _open_runtimes.clear()
    _names_in_use.clear()  # the child's own runtimes may take them again


_NEVER_WAITS = ("central", "loop")
"""Thread roles where `submit` must not wait (for a commit, or for room): nothing else would run meanwhile."""


def _on_the_loop(call: str, thread: str, *, waits_for_tasks: bool) -> str:
    """Why `call` is refused inside an async stage, on the async backend's event loop `thread`, and what to do."""
    if waits_for_tasks:
        return (
            f"{call} was called inside an async stage, on the event loop thread {thread!r} that runs the "
            "runtime's async stages; it waits for a task to finish, and tasks need those stages' slots (this "
            "call's included), so it would deadlock. Return from the stage and wait outside it, or submit "
            "follow-up tasks without waiting for them"
        )
    return (
        f"{call} was called inside an async stage, on the event loop thread {thread!r} that runs the "
        "runtime's async stages; it blocks until another thread answers, stalling every coroutine of that "
        "loop meanwhile. Use the async form where there is one (await runtime.submit_async(...)), or run the "
        "call in a thread: await asyncio.to_thread(...)"
    )


_FORKED = (
    "this process is a fork() child of the one that started the runtime, and the runtime's actors "
    "live in the parent; create a new Runtime in the child, or start children with multiprocessing's "
    "'spawn' or 'forkserver' method"
)


def _bounded_wait(timeout: float | None) -> float | None:
    """A wait's timeout as threads accept it: one past `threading.TIMEOUT_MAX` would raise OverflowError."""
    return None if timeout is None else min(timeout, threading.TIMEOUT_MAX)


class _Waiter:
    """Completion of one task, settable once from the state actor's thread.

    Most handles are never waited on one by one (a flood of submissions ends
    in one `join()`), so the Event and the callback list are made only when
    someone waits: a threading.Event costs more to build than the rest of a submit.
    """

    __slots__ = ("_callbacks", "_event", "abandoned", "failure", "record")

    _lock = threading.Lock()
    """One lock for all waiters: it guards only the brief hand-over of `record`."""

    def __init__(self) -> None:
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[TaskRecord | None], None]] | None = None
        self.record: TaskRecord | None = None
        self.abandoned = False
        """The runtime closed before the task finished: waiting is over, with no record."""
        self.failure: RuntimeFailed | None = None
        """Set (with `abandoned`) when the runtime failed before the task finished."""

    def set(self, record: TaskRecord | None, failure: RuntimeFailed | None = None) -> None:
        """Settle with the terminal record, or with None when the runtime closed (or failed) first."""
        with _Waiter._lock:
            if self.record is not None or self.abandoned:
                return
            self.failure = failure
            self.record = record
            self.abandoned = record is None
            event, callbacks = self._event, self._callbacks
            self._callbacks = None
        if event is not None:
            event.set()
        for callback in callbacks or ():
            callback(record)

    def add_callback(self, callback: Callable[[TaskRecord | None], None]) -> None:
        with _Waiter._lock:
            if self.record is None and not self.abandoned:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
            record = self.record
        callback(record)

    def remove_callback(self, callback: Callable[[TaskRecord | None], None]) -> None:
        """Forget a callback whose waiter gave up (a timed-out `await`); nothing if it already ran."""
        with _Waiter._lock:
            if self._callbacks is not None and callback in self._callbacks:
                self._callbacks.remove(callback)

    def wait(self, timeout: float | None) -> bool:
        with _Waiter._lock:
            if self.record is not None or self.abandoned:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(_bounded_wait(timeout))


class _Tracker:
    """Tasks in flight (submitted or recovered, not yet terminal), with backpressure.

    Two conditions on one lock: `_room` wakes one submitter per freed slot,
    `_idle` wakes `join()` only when nothing is left, so a finishing task
    never wakes threads that cannot proceed.
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._waiters: dict[str, _Waiter] = {}
        self._reserved = 0
        self._batches_waiting = 0
        """Batches waiting for room for several tasks: while any waits, a freed slot wakes every waiter."""
        self.submitted = 0
        self.failure: RuntimeFailed | None = None

    @property
    def in_flight(self) -> int:
        return len(self._waiters) + self._reserved

    def reserve(self, *, wait: bool, timeout: float, count: int = 1) -> None:
        """Claim room for `count` more tasks (all of it, or none), or raise Overloaded."""
        with self._lock:
            limit = self._limit
            if limit is not None and self.in_flight + count > limit:
                if count > 1:
                    self._batches_waiting += 1
                try:
                    room = wait and self._room.wait_for(lambda: self.in_flight + count <= limit, timeout)
                finally:
                    if count > 1:
                        self._batches_waiting -= 1
                if not room:
                    wanted = "" if count == 1 else f" (a batch of {count} needs room for all of them)"
                    raise Overloaded(
                        f"{self.in_flight} tasks in flight, the max_in_flight limit of {limit}{wanted}; "
                        + (f"waited {timeout:g}s for room" if wait else "overload='reject' refuses at once")
                    )
            self._reserved += count

    def track(self, task_id: str, *, reserved: bool) -> _Waiter:
        """Start tracking a task; `reserved` turns a `reserve()` claim into it (a new submission)."""
        with self._lock:
            if self.failure is not None:
                if reserved:
                    self._reserved -= 1
                raise self.failure
            waiter = self._waiters.get(task_id)
            if reserved:
                self._reserved -= 1
                if waiter is not None:
                    self._freed()
                    raise InvalidPayload(f"task_id {task_id!r} is already taken; task ids must be unique")
                self.submitted += 1
            if waiter is None:
                waiter = self._waiters[task_id] = _Waiter()
            return waiter

    def track_many(self, task_ids: Sequence[str]) -> list[_Waiter]:
        """Turn a `reserve(count=len(task_ids))` claim into tracked tasks: all of them, or none.

        Raises InvalidPayload naming the first id already in flight, by its index; the claim is released.
        """
        with self._lock:
            self._reserved -= len(task_ids)
            if self.failure is not None:
                self._freed(len(task_ids))
                raise self.failure
            waiters = self._waiters
            for index, task_id in enumerate(task_ids):
                if task_id in waiters:
                    self._freed(len(task_ids))
                    raise InvalidPayload(
                        f"payloads[{index}]: task_id {task_id!r} is already taken; task ids must be unique; "
                        "nothing was created"
                    )
            made = [_Waiter() for _ in task_ids]
            waiters.update(zip(task_ids, made, strict=True))
            self.submitted += len(task_ids)
            return made

    def forget(self, task_id: str) -> None:
        """Stop tracking a submission whose creation failed."""
        self.forget_many((task_id,))

    def forget_many(self, task_ids: Sequence[str]) -> None:
        """Stop tracking submissions whose creation failed."""
        with self._lock:
            for task_id in task_ids:
                self._waiters.pop(task_id, None)
            self.submitted -= len(task_ids)
            self._freed(len(task_ids))

    def waiter(self, task_id: str) -> _Waiter | None:
        with self._lock:
            return self._waiters.get(task_id)

    def on_terminal(self, record: TaskRecord) -> None:
        """The state actor's terminal hook: settle the task's waiter and free its slot."""
        with self._lock:
            waiter = self._waiters.pop(record.task_id, None)
            self._freed()
        if waiter is not None:
            waiter.set(record)

    def _freed(self, count: int = 1) -> None:
        """`count` slots were freed (call with the lock held)."""
        if self._limit is not None:
            # One waiter per slot, unless a batch waits: it may need more than was freed, and a
            # wake-up it consumes without proceeding must not leave a single submitter asleep.
            if self._batches_waiting:
                self._room.notify_all()
            else:
                self._room.notify(count)
        if not self._waiters and not self._reserved:
            self._idle.notify_all()

    def join(self, timeout: float | None) -> bool:
        """Wait until nothing is in flight; raises RuntimeFailed if the runtime fails first."""
        with self._lock:
            idle = self._idle.wait_for(
                lambda: self.failure is not None or (not self._waiters and not self._reserved), _bounded_wait(timeout)
            )
            if self.failure is not None:
                raise self.failure
            return idle

    def fail(self, failure: RuntimeFailed) -> None:
        """The runtime failed for good: release every waiter and `join()` with `failure`."""
        with self._lock:
            self.failure = failure
            waiters = list(self._waiters.values())
            self._waiters.clear()
            self._room.notify_all()
            self._idle.notify_all()
        for waiter in waiters:
            waiter.set(None, failure)

    def close(self) -> int:
        """The runtime stopped: release every waiter (their tasks will not finish here). Returns how many."""
        with self._lock:
            waiters = list(self._waiters.values())
            self._waiters.clear()
            self._reserved = 0
            self._room.notify_all()
            self._idle.notify_all()
        for waiter in waiters:
            waiter.set(None)
        return len(waiters)


_LIVENESS_CHECK_S = 0.5
"""While waiting for an actor's answer, how often to look whether the actor is still alive."""


def _answer(future: pykka.Future[Any], actor: pykka.ActorRef[Any] | None = None) -> Any:
    """An actor's answer to a read, with pykka's errors mapped to ours.

    A stopped actor is a closed runtime (RuntimeStopped); an actor that does
    not answer in time is a builtin TimeoutError, never a pykka type. Given the
    `actor` that should answer, a message that reached it as it stopped (pykka
    then leaves the future unresolved) is noticed within a second, not after
    the whole timeout.
    """
    deadline = time.monotonic() + _ASK_TIMEOUT_S
    dead_seen = False
    while True:
        remaining = deadline - time.monotonic()
        wait = remaining if actor is None else min(remaining, _LIVENESS_CHECK_S)
        try:
            return future.get(timeout=max(0.0, wait))
        except pykka.ActorDeadError:
            raise RuntimeStopped("the runtime is closed") from None
        except pykka.Timeout:
            if remaining <= wait:
                raise TimeoutError(f"the runtime did not answer within {_ASK_TIMEOUT_S:g}s") from None
            if actor is not None and not actor.is_alive():
                if dead_seen:  # dead for a whole check interval and still no answer: none will come
                    raise RuntimeStopped("the runtime is closed") from None
                dead_seen = True


_MAX_TASK_ID = 200
"""The longest task id `submit` accepts."""


def _check_lookup(task_id: object) -> None:
    """Raise TaskNotFound for an id no task can have, quoting it bounded (the actor would quote it whole)."""
    if not isinstance(task_id, str) or len(task_id) > _MAX_TASK_ID:
        raise TaskNotFound(f"no task with id {quote(task_id)}; task ids are str of at most {_MAX_TASK_ID} chars")


def _checked_key(idempotency_key: object) -> tuple[str, str]:
    """`idempotency_key` if it is a (key, payload fingerprint) pair of str, else InvalidPayload naming it."""
    if (
        isinstance(idempotency_key, tuple)
        and len(idempotency_key) == 2
        and isinstance(idempotency_key[0], str)
        and isinstance(idempotency_key[1], str)
    ):
        return (idempotency_key[0], idempotency_key[1])
    raise InvalidPayload(
        f"idempotency_key must be a (key, payload fingerprint) pair of str, got {quote(idempotency_key)}"
    )


def _ask(actor: pykka.ActorRef[Any], method: str, *args: Any, **kwargs: Any) -> pykka.Future[Any]:
    """Call `actor.method(*args, **kwargs)` on the actor's thread: pykka's proxy call, without building a proxy.

    A stopped actor answers with ActorDeadError (`_answer` maps it to RuntimeStopped).
    """
    return actor.ask(ProxyCall(attr_path=(method,), args=args, kwargs=kwargs), block=False)


class _Subscription(NamedTuple):
    """A `subscribe()` callback and its token at the StateActor it is subscribed on."""

    callback: Callable[[TransitionEvent], None]
    state: pykka.ActorRef[Any]
    token: int


_ABANDONED = (
    "the runtime closed before task {task_id!r} finished; with a journal it resumes when a runtime "
    "is opened on it again"
)


class TaskHandle:
    """A submitted task: wait for it (`result()`, or `await handle`), or cancel it."""

    __slots__ = ("_runtime", "_waiter", "task_id")

    def __init__(
        self, runtime: Runtime, task_id: str, waiter: _Waiter | None, record: TaskRecord | None = None
    ) -> None:
        self._runtime = runtime
        self.task_id = task_id
        if waiter is None:
            waiter = _Waiter()
            if record is not None:
                waiter.set(record)
        self._waiter = waiter

    def done(self) -> bool:
        """True once the task is terminal (COMPLETED, FAILED or CANCELLED)."""
        return self._waiter.record is not None

    def result(self, timeout: float | None = None) -> TaskRecord:
        """Block until the task is terminal and return its record; raise TimeoutError after `timeout` s.

        Raises:
            WouldDeadlock: called inside a subscriber or a service before the task is terminal;
                wait on another thread instead (or `await handle` in asyncio).
            RuntimeStopped: the runtime closed before the task finished.
        """
        if self._waiter.record is None:
            self._runtime._refuse_blocking("TaskHandle.result()", waits_for_tasks=True)
        if not self._waiter.wait(timeout):
            raise TimeoutError(f"task {self.task_id!r} is not terminal after {timeout}s")
        if self._waiter.record is None:
            if self._waiter.failure is not None:
                raise self._waiter.failure
            raise RuntimeStopped(_ABANDONED.format(task_id=self.task_id))
        return self._waiter.record

    def cancel(self) -> bool:
        """Cancel the task at whatever stage it is; see `Runtime.cancel` (True once CANCELLED, idempotent)."""
        return self._runtime.cancel(self.task_id)

    def __await__(self) -> Generator[Any, None, TaskRecord]:
        """Wait in asyncio without blocking the loop (completion crosses via call_soon_threadsafe)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TaskRecord] = loop.create_future()

        def settle(record: TaskRecord | None) -> None:
            if future.done():
                return
            if record is None:
                failure = self._waiter.failure
                future.set_exception(failure or RuntimeStopped(_ABANDONED.format(task_id=self.task_id)))
            else:
                future.set_result(record)

        def on_done(record: TaskRecord | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, record)

        if self._waiter.record is None:
            self._runtime._refuse_blocking("await TaskHandle", waits_for_tasks=True)  # inside an async stage
        self._waiter.add_callback(on_done)
        try:
            return (yield from future.__await__())
        finally:  # cancelled (a timeout): the callback would otherwise stay until the task ends, one per wait
            self._waiter.remove_callback(on_done)

    def __repr__(self) -> str:
        state = self._waiter.record.state.value if self._waiter.record else "in flight"
        return f"<TaskHandle {self.task_id} {state}>"


def _check_pipelines(pipelines: object, *, with_services: bool) -> None:
    if isinstance(pipelines, Pipeline) or not isinstance(pipelines, Sequence):
        raise ConfigError(f"pipelines must be a list of Pipeline, got {type(pipelines).__name__}")
    for index, pipeline in enumerate(pipelines):
        if not isinstance(pipeline, Pipeline):
            raise ConfigError(f"pipelines[{index}] must be a Pipeline, got {type(pipeline).__name__}")
    if not pipelines and not with_services:
        raise ConfigError("pipelines is empty; pass at least one Pipeline (or None for the seed pipeline)")


class Runtime:
    """An actorflow runtime: state actor, orchestrator, service pools. A context manager.

    Args:
        config: every knob; defaults to `RuntimeConfig()`.
        services: the seed pipeline's functions; missing ones use the defaults.
        pipelines: the pipelines to run. None runs the seed pipeline (built by
            `services`); given, only these run, plus the seed's first if
            `services` is given too. `submit` (one task) and `submit_many` (a batch, in one
            commit, all or nothing) without ``pipeline=`` use the first.
        metrics: count the metrics that `metrics_collector()` exports (a few cheap updates per task).
        tracer_provider: the OpenTelemetry tracer provider for task and call spans; None means the
            host's global one (nothing is recorded while the host has set none).
        on_milestone: called with a `Milestone` at each internal event (a worker
            restarted, a retry scheduled, the journal degraded or recovered, a
            central actor restarted, the runtime failed...; see `Milestone.name`).
            It runs on actor threads: keep it quick and never block in it (set
            an Event, put on a queue). What it raises is logged and ignored. It is
            never called with a lock of the runtime held, so it may call `close()`.
        name: the runtime's name, the ``runtime`` label of its metrics, so that several runtimes
            of one process export series that can be told apart. 1 to 64 letters, digits,
            ``_``, ``-`` or ``.``, unique among the process's open runtimes. None picks
            ``"default"``, or ``"default-2"``, ``"default-3"``... when that is taken by an open
            runtime: a program that runs one runtime at a time always exports ``"default"``.

    Raises:
        ConfigError: an argument is malformed, the name is taken by an open runtime, or a
            stage's `workers` exceeds `RuntimeConfig.max_workers` (`max_async_workers` for
            an async stage).
    """

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        *,
        services: ServiceSet | None = None,
        pipelines: Sequence[Pipeline] | None = None,
        metrics: bool = True,
        tracer_provider: TracerProvider | None = None,
        on_milestone: Callable[[Milestone], None] | None = None,
        name: str | None = None,
    ) -> None:
        if config is not None and not isinstance(config, RuntimeConfig):
            raise ConfigError(f"config must be a RuntimeConfig, got {type(config).__name__}")
        if services is not None and not isinstance(services, ServiceSet):
            raise ConfigError(f"services must be a services.ServiceSet, got {type(services).__name__}")
        if pipelines is not None:
            _check_pipelines(pipelines, with_services=services is not None)
        self.config = config or RuntimeConfig()
        _install_process_hooks()
        self.name = _claim_name(name)
        """The ``runtime`` label of this runtime's metrics (see the `name` argument)."""
        with_seed = pipelines is None or services is not None
        services = services or ServiceSet()
        self._log = get_event_logger("runtime")
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._close_finished = threading.Event()
        self._forked = False
        """Set in a fork() child (see `_forget_runtimes_in_forked_child`): nothing here works there."""
        self._dead_letters = DeadLetterOffice()
        self._threads = ThreadBook()
        self._tracker = _Tracker(self.config.max_in_flight)
        self.telemetry = Telemetry(metrics=metrics, tracer_provider=tracer_provider, name=self.name)
        """Counters, histograms and spans (read them through `metrics_collector()`)."""
        self._timer: Timer | None = None
        self._state: pykka.ActorRef[StateActor] | None = None
        self._orchestrator: pykka.ActorRef[OrchestratorActor] | None = None
        self._backends: list[ServiceBackend] = []
        """The current orchestrator's backends: made here, so closed here (off the central threads)."""
        self.results: ResultStore | None = None
        """The default persistence's result store (None when a custom `persist` is plugged in)."""
        self._key_reader: ReaderStore | None = None
        """The journal's reader side, opened at the first `find_idempotency_key` (the StateActor owns the writer)."""
        self._key_reader_lock = threading.Lock()
        self._milestones = Milestones(on_milestone)
        self._health = Health()
        self._health.on_fail(self._on_failed)
        self.pipelines: tuple[Pipeline, ...] = ()
        """The runtime's pipelines; the first is the one `submit` uses by default."""
        self._pipelines_by_name: dict[str, Pipeline] = {}
        self._init_supervision()
        self._init_callers()
        try:
            self._start(services if with_seed else None, tuple(pipelines or ()))
        except BaseException:
            self._shutdown(drain=False)
            raise
        _open_runtimes.add(self)

    def _init_supervision(self) -> None:
        """What the supervisor keeps: exit reports, the generation of each central actor, its lock."""
        self._exits: queue.SimpleQueue[tuple[str, int, str] | None] = queue.SimpleQueue()
        """(actor kind, its generation, why it stopped): reports for the supervisor thread."""
        self._generation = {"state": 0, "orchestrator": 0}
        """Which start of each central actor is current; an exit of an older one is expected."""
        self._supervise_lock = threading.Lock()
        """Held while central actors are replaced, and while close() stops them."""
        self._replaced = threading.Condition()
        self._supervisor: threading.Thread | None = None

    def _init_callers(self) -> None:
        """What the facade keeps about its callers: their subscriptions, and the refusals it logged."""
        self._refusals = LogThrottle(_REFUSAL_LOG_INTERVAL_S)
        """One ``task.submit_refused`` line per interval, with how many were left out (a full disk refuses many)."""
        self._subscriptions: dict[int, _Subscription] = {}
        """Runtime key -> the callback and its token at the StateActor it is subscribed on."""
        self._subscriptions_lock = threading.Lock()
        """Guards `_subscriptions` (dict operations only: never held while waiting for an actor)."""
        self._subscribing = threading.Lock()
        """Serializes `subscribe()` with the re-subscription of a restart, so that none is lost or doubled."""
        self._subscription_keys = itertools.count(1)

    def _start(self, services: ServiceSet | None, extra: tuple[Pipeline, ...]) -> None:
        config = self.config
        pipelines: list[Pipeline] = []
        if services is not None:
            if services.persist is None:
                self.results = ResultStore(config.result_store)
            pipelines.append(services.pipeline(result_store=self.results))
        pipelines.extend(extra)
        for pipeline in pipelines:
            if pipeline.name in self._pipelines_by_name:
                raise ConfigError(
                    f"two pipelines are called {pipeline.name!r}; pipeline names are unique in a runtime"
                    + (" (the seed pipeline, from services=, is called 'default')" if services is not None else "")
                )
            self._pipelines_by_name[pipeline.name] = pipeline
        self.pipelines = tuple(pipelines)
        self._pool_plan()  # checks each stage's backend against the registry, before anything starts
        self._check_workers()
        self._timer = Timer(on_error=lambda exc: self._log.error("timer.callback_failed", error=repr(exc)))
        self._start_state()
        self._start_orchestrator()
        recovered = self._resume()
        self._supervisor = threading.Thread(target=self._supervise, name="actorflow-supervisor", daemon=True)
        self._supervisor.start()
        self._log.info(
            "runtime.started",
            pools={name: size for name, (_, _, size) in self._pool_plan().items()},
            backend=config.service_backend,
            journal=config.journal_path,
            durability=config.durability if config.journal_path else None,
            recovered=recovered,
            transitions={  # so that a log's reader can check each task against its own pipeline
                p.name: {s.value: sorted(t.value for t in targets) for s, targets in p.transitions.items()}
                for p in self.pipelines
            },
        )

    def _on_terminal(self, record: TaskRecord) -> None:
        """The state actor's terminal hook: the task's latency and span, then settle its waiter.

        In that order, so that a caller woken by `result()` or `join()` finds them counted.
        """
        try:
            self.telemetry.on_terminal(record)
        finally:  # whatever telemetry does, the waiter is settled
            self._tracker.on_terminal(record)

    def _start_state(self) -> None:
        """Start a StateActor (loading the journal, if any) and make it current."""
        journal = None
        if self.config.journal_path is not None:
            from actorflow.core.journal import open_store  # noqa: PLC0415 - the journal only when asked for

            journal = open_store(
                self.config.journal_path,
                durability=self.config.durability,
                pipelines={name: [state.value for state in p.states] for name, p in self._pipelines_by_name.items()},
            )
        self._generation["state"] += 1
        exited = self._state_exited = threading.Event()
        try:
            self._state = StateActor.start(
                journal=journal,
                retain_terminal=self.config.retain_terminal,
                dead_letters=self._dead_letters,
                threads=self._threads,
                on_terminal=self._on_terminal,
                on_transition=self.telemetry.on_transition if self.telemetry.metrics else None,
                pipelines=self.pipelines,
                health=self._health,
                milestones=self._milestones,
                on_exit=functools.partial(self._report_exit, "state", self._generation["state"], exited),
            )
        except BaseException:
            if journal is not None:
                journal.close()
            raise

    def _start_orchestrator(self) -> None:
        """Start an OrchestratorActor with fresh pools on the current StateActor, and make it current."""
        assert self._state is not None
        assert self._timer is not None
        self._generation["orchestrator"] += 1
        backends = self._make_backends()
        old, self._backends = self._backends, list({id(b): b for b in backends.values()}.values())
        try:
            self._orchestrator = OrchestratorActor.start(
                state=self._state,
                pipelines=self.pipelines,
                config=self.config,
                backends=backends,
                timer=self._timer,
                dead_letters=self._dead_letters,
                threads=self._threads,
                milestones=self._milestones,
                on_exit=functools.partial(
                    self._report_exit, "orchestrator", self._generation["orchestrator"], threading.Event()
                ),
                telemetry=self.telemetry,
                health=self._health,
            )
        except BaseException:
            self._close_backends()
            raise
        finally:
            # A replaced orchestrator's backends are closed here, after the new ones exist: a Ray session
            # they share stays up. Closing can take seconds (Ray), so it never runs on a central thread.
            for backend in old:
                with contextlib.suppress(Exception):
                    backend.close()

    def _close_backends(self) -> None:
        backends, self._backends = self._backends, []
        for backend in backends:
            with contextlib.suppress(Exception):
                backend.close()

    def _resume(self) -> int:
        """Hand the current orchestrator every non-terminal task (one message: no creation falls between)."""
        assert self._orchestrator is not None
        assert self._state is not None
        records = tuple(_answer(_ask(self._state, "adopt", self._orchestrator), self._state))
        for record in records:
            self._tracker.track(record.task_id, reserved=False)
            self.telemetry.task_resumed(record)
        if records:
            self._orchestrator.tell(ResumeTasks(records))
        return len(records)

    # --- supervision -----------------------------------------------------------------------------

    def _report_exit(self, kind: str, generation: int, exited: threading.Event, why: str) -> None:
        """A central actor stopped (called on its thread, once its `on_stop` is done): tell the supervisor thread."""
        exited.set()
        self._exits.put((kind, generation, why))

    def _supervise(self) -> None:
        """The supervisor thread: replace central actors that stopped without being asked.

        Milestones, and the failure of the runtime, are reported with no lock held: a
        listener may call anything, `close()` included (which takes `_supervise_lock`).
        """
        while (report := self._exits.get()) is not None:
            kind, generation, why = report
            if self._is_current(kind, generation):
                self._milestones.emit(f"{kind}.died", why=why)
                reached, failure = self._restart(kind, generation, why)
                for name, fields in reached:
                    self._milestones.emit(name, **fields)
                if failure is not None:
                    self._health.fail(failure)
            with self._replaced:
                self._replaced.notify_all()

    def _is_current(self, kind: str, generation: int) -> bool:
        """False if the runtime is closing or failed, or the report is of an actor replaced since.

        Read without `_supervise_lock` to decide on the ``died`` milestone; `_restart` reads it again under it.
        """
        return not (self._closed.is_set() or self._health.failed or generation != self._generation[kind])

    def _restart(self, kind: str, generation: int, why: str) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """Replace the actor that stopped; returns the milestones reached and the failure, if any, to report.

        An orchestrator is replaced alone while the StateActor lives. A StateActor
        that stopped (alone, or found stopped when the orchestrator is replaced, as
        when both are stopped together) is rebuilt from the journal, then a fresh
        orchestrator on it, in that order; without a journal, the runtime fails.
        """
        with self._supervise_lock:
            if not self._is_current(kind, generation):
                return [], None  # closed, failed or replaced while the milestone was delivered
            try:
                if kind == "orchestrator" and self._state_alive():
                    try:
                        resumed = self._replace_orchestrator(why)
                    except RuntimeStopped:
                        if self._state_alive():
                            raise
                        # The StateActor stopped meanwhile: rebuild it below, with another fresh orchestrator.
                    else:
                        return [("orchestrator.restarted", {"why": why, "resumed": resumed})], None
                    why = f"stopped while the orchestrator was replaced (the orchestrator {why})"
                elif kind == "orchestrator":
                    why = f"stopped with the orchestrator (the orchestrator {why})"
                if self.config.journal_path is None:
                    return [], f"the StateActor {why}; without a journal its tasks cannot be rebuilt"
                resumed = self._replace_state(why)
                return [("state.restarted", {"why": why, "resumed": resumed})], None
            except Exception as exc:  # noqa: BLE001 - a restart that fails is a failed runtime, loudly
                return [], f"the {kind} actor {why} and could not be restarted: {exc!r}"

    def _state_alive(self) -> bool:
        return self._state is not None and self._state.is_alive()

    def _replace_orchestrator(self, why: str) -> int:
        """Start a fresh orchestrator on the current StateActor and resume every task; returns how many."""
        self._log.error("orchestrator.died", why=why)
        self._start_orchestrator()
        return self._resume()

    def _replace_state(self, why: str) -> int:
        """Rebuild the StateActor from the journal, then a fresh orchestrator on it; returns the tasks resumed."""
        self._log.error("state.died", why=why)
        old = self._orchestrator
        self._generation["orchestrator"] += 1  # its exit, asked for here, is not a death
        if old is not None:
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                old.stop(block=True, timeout=_ASK_TIMEOUT_S)
        # pykka calls an actor dead before its on_stop has run: the old StateActor may still be closing
        # the journal (and holding its lock), as when it is found dead while the orchestrator is replaced.
        if not self._state_exited.wait(_ASK_TIMEOUT_S):
            raise RuntimeError(f"the stopped StateActor did not release the journal within {_ASK_TIMEOUT_S:g}s")
        # A fault the old actor was riding out is forgotten with it; the new one degrades anew on its first refusal.
        self._health.recover()
        self._start_state()
        self._resubscribe()
        self._start_orchestrator()
        return self._resume()

    def _resubscribe(self) -> None:
        """Subscribe every callback to the current StateActor (after a restart), each exactly once."""
        state = self._state
        assert state is not None
        with self._subscribing:  # no subscribe() is half-way meanwhile
            with self._subscriptions_lock:
                entries = [(key, sub) for key, sub in self._subscriptions.items() if sub.state is not state]
            for key, sub in entries:
                token = _answer(_ask(state, "subscribe", sub.callback), state)
                with self._subscriptions_lock:
                    kept = key in self._subscriptions
                    if kept:
                        self._subscriptions[key] = _Subscription(sub.callback, state, token)
                if not kept:  # unsubscribed meanwhile
                    _ask(state, "unsubscribe", token)

    def _on_failed(self, reason: str) -> None:
        """The runtime failed for good: release every waiter with RuntimeFailed."""
        self._log.error("runtime.failed", reason=reason)
        self._milestones.emit("runtime.failed", reason=reason)
        self._tracker.fail(RuntimeFailed(f"the runtime failed: {reason}"))

    def _central(self, kind: str) -> pykka.ActorRef[Any] | None:
        return self._state if kind == "state" else self._orchestrator

    def _await_replacement(self, kind: str, ref: pykka.ActorRef[Any] | None) -> bool:
        """Wait (bounded) until the `kind` actor `ref` was replaced; False if the runtime closed or failed instead."""
        with self._replaced:
            self._replaced.wait_for(
                lambda: self._central(kind) is not ref or self._closed.is_set() or self._health.failed,
                _RESTART_WAIT_S,
            )
        return self._central(kind) is not ref and not self._closed.is_set() and not self._health.failed

    def _ask_central(self, kind: str, send: Callable[[pykka.ActorRef[Any]], pykka.Future[Any]]) -> Any:
        """`send` a request to the current `kind` actor and return its answer.

        One that is being replaced (it stopped, or stopped before answering) is waited
        for, bounded, and asked again: a restart is not reported as a closed runtime.
        """
        for _ in range(3):  # a replacement that itself stops is rare; a third is not worth waiting for
            ref = self._central(kind)
            if ref is None:
                raise self._unavailable()
            try:
                return _answer(send(ref), ref)
            except RuntimeStopped:
                if self._closed.is_set() or self._health.failed:
                    raise self._unavailable() from None
                if not self._await_replacement(kind, ref):
                    if self._closed.is_set() or self._health.failed:
                        raise self._unavailable() from None
                    raise RuntimeStopped(
                        f"the runtime's {kind} actor stopped and was not replaced within {_RESTART_WAIT_S:g}s"
                    ) from None
        raise RuntimeStopped(f"the runtime's {kind} actor stopped again each time it was replaced")

    def _unavailable(self) -> RuntimeFailed | RuntimeStopped:
        failure = self._tracker.failure
        if failure is not None:
            return failure
        return RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")

    def health(self) -> dict[str, str]:
        """``{"status": ...}`` with "ok", "degraded", "failed" or "stopped", and a "reason" unless ok.

        "degraded": the journal refuses writes (full or read-only disk);
        submissions raise JournalError meanwhile, and acknowledged tasks
        complete once writes succeed again, with no restart. Or a stage's pool
        is failing (it restarted its workers more than `max_restarts` times
        within `restart_window_s`): its calls wait for the pool's cool-down,
        then run. The reason names each cause. "failed": see
        `RuntimeFailed`. "stopped": `close()` has begun, or this is a fork() child of the
        process that made the runtime (whose actors stayed in the parent: nothing works here).
        """
        if self._forked:
            return {"status": "stopped", "reason": _FORKED}
        status: str
        status, reason = self._health.snapshot()
        if status != "failed" and self._closed.is_set():
            status, reason = "stopped", "the runtime is closed"
        return {"status": status} if reason is None else {"status": status, "reason": reason}

    def _pool_plan(self) -> dict[str, tuple[str, Callable[..., Any], int]]:
        """Each stage's pool name -> (backend name, function, workers)."""
        config = self.config
        plan: dict[str, tuple[str, Callable[..., Any], int]] = {}
        for pipeline in self.pipelines:
            for stage in pipeline.stages:
                kind = stage_backend(stage, pipeline=pipeline.name, default=config.service_backend)
                workers = stage.workers if stage.workers is not None else config.workers_for(stage.name)
                plan[pool_name(self.pipelines, pipeline, stage)] = (kind, stage.fn, workers)
        return plan

    def _check_workers(self) -> None:
        """Refuse a stage with more workers than `max_workers` (`max_async_workers` for async) allows."""
        config = self.config
        for pipeline in self.pipelines:
            for stage in pipeline.stages:
                if stage.workers is None:
                    continue  # from the config's own fields, which it checked against max_workers
                if stage.is_async or stage.backend == "async":
                    limit, field = config.max_async_workers, "max_async_workers"
                else:
                    limit, field = config.max_workers, "max_workers"
                if stage.workers > limit:
                    raise ConfigError(
                        f"Stage {stage.name!r} of pipeline {pipeline.name!r}: workers must be from 1 to {limit}, "
                        f"got {stage.workers}; the bound is RuntimeConfig.{field}, which protects the machine: "
                        "raise it if it can take more"
                    )

    def _make_backends(self) -> dict[str, ServiceBackend]:
        """One backend of each kind the stages use (from the registry), by pool name."""
        plan = self._pool_plan()
        local: list[ServiceBackend] = []

        def local_backend() -> ServiceBackend:
            if not local:
                local.append(ThreadBackend(self._dead_letters, self._threads))
            return local[0]

        made: dict[str, ServiceBackend] = {}
        for kind in dict.fromkeys(kind for kind, _, _ in plan.values()):
            request = BackendRequest(
                name=kind,
                functions={name: fn for name, (k, fn, _) in plan.items() if k == kind},
                sizes={name: size for name, (k, _, size) in plan.items() if k == kind},
                config=self.config,
                dead_letters=self._dead_letters,
                threads=self._threads,
                local=local_backend,
            )
            try:
                made[kind] = make_backend(kind, request)
            except BaseException:
                for backend in made.values():
                    with contextlib.suppress(Exception):
                        backend.close()
                raise
        return {name: made[kind] for name, (kind, _, _) in plan.items()}

    # --- submitting ------------------------------------------------------------------------------

    def submit(
        self,
        payload: Mapping[str, JSONInput],
        *,
        task_id: str | None = None,
        traceparent: str | None = None,
        pipeline: str | None = None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> TaskHandle:
        """Create a task and start it through `pipeline`; returns once its creation is committed.

        Args:
            payload: the task's input, a JSON-serializable mapping.
            task_id: the task's id; a new unique one if None.
            traceparent: a W3C trace context to continue.
            pipeline: the name of the pipeline to run; the runtime's first one if None.
            idempotency_key: (key, payload fingerprint), carried with the task to the StateActor:
                with a journal, committed in the same transaction as the task, so that
                `find_idempotency_key` finds it after a crash if and only if the task exists.
                Ignored without a journal.

        Raises:
            UnknownPipeline: the runtime has no pipeline of that name (nothing is created).
            InvalidPayload: the payload is not a JSON-serializable mapping, `task_id` is taken,
                or `idempotency_key` is not a pair of str.
            Overloaded: `max_in_flight` tasks are in flight (after waiting, with overload="wait").
            JournalError: the journal refuses writes (see `health()`); nothing was created.
            RuntimeStopped: the runtime is closed (or this is a fork() child of its process).
            RuntimeFailed: the runtime has failed (see `health()`).
            WouldDeadlock: called inside a subscriber where it would wait (for the commit, with a
                journal or a task_id; or for room); submit from another thread instead.
        """
        message: CreateTask | None = None
        try:
            message = self._prepare(payload, task_id, traceparent, pipeline)
            if idempotency_key is not None:
                message = message._replace(idempotency_key=_checked_key(idempotency_key))
            return self._reserve_and_send(message)
        except BaseException as exc:
            self.telemetry.submit_refused(None if message is None else message.task_id, exc)
            raise

    def _reserve_and_send(self, message: CreateTask) -> TaskHandle:
        config = self.config
        central = self._threads.role_of_current() in _NEVER_WAITS
        if central and message.reply is not None:
            self._refuse_blocking("Runtime.submit() with a journal or a task_id (it waits for the commit)")
        try:
            self._tracker.reserve(wait=config.overload == "wait" and not central, timeout=config.submit_timeout_s)
        except Overloaded as exc:
            if central and config.overload == "wait":
                self._refuse_blocking("Runtime.submit() at max_in_flight (it waits for room)")
            raise exc from None
        return self._send_create(message)

    def submit_many(
        self,
        payloads: Iterable[Mapping[str, JSONInput]],
        *,
        pipeline: str | None = None,
        task_ids: Sequence[str] | None = None,
        traceparent: str | None = None,
    ) -> list[TaskHandle]:
        """Create several tasks at once, all or none, in one message and (with a journal) one commit.

        The cheap way to submit many tasks: with a journal, `submit` waits for a commit per call,
        while this waits for one commit for the whole batch. Each payload is checked as `submit`
        checks it, before anything is sent; one bad payload refuses the whole batch.

        Args:
            payloads: the tasks' inputs, each a JSON-serializable mapping.
            pipeline: the name of the pipeline every task runs through; the runtime's first if None.
            task_ids: the tasks' ids, one per payload, in order; new unique ones if None.
            traceparent: a W3C trace context every task continues (each gets a span of its own).

        Returns:
            One handle per payload, in order (an empty list for no payloads).

        Raises:
            UnknownPipeline: the runtime has no pipeline of that name (nothing is created).
            InvalidPayload: a payload is not a JSON-serializable mapping, or a task id is malformed, repeated
                in the batch or taken; the message names it by its index (``payloads[i]``). Also raised for a
                batch larger than `max_in_flight`, which could never be admitted. Nothing is created.
            Overloaded: there is no room for the whole batch under `max_in_flight` (after waiting,
                with overload="wait"); nothing is created.
            JournalError: the journal refuses writes (see `health()`); nothing was created.
            RuntimeStopped: the runtime is closed (or this is a fork() child of its process).
            RuntimeFailed: the runtime has failed (see `health()`).
            WouldDeadlock: called inside a subscriber where it would wait (for the commit, with a
                journal or task_ids; or for room); submit from another thread instead.
        """
        batch: list[Mapping[str, JSONInput]] = []
        messages: list[CreateTask] = []
        try:
            batch = self._check_batch(payloads, pipeline, task_ids, traceparent)
            self._prepare_many(batch, self.pipeline(pipeline).name, task_ids, traceparent, into=messages)
            return self._reserve_and_send_many(messages, explicit_ids=task_ids is not None)
        except BaseException as exc:
            # Every payload of the batch was refused: end the spans opened, and count each one.
            for message in messages:
                self.telemetry.submit_refused(message.task_id, exc)
            for _ in range(max(1, len(batch)) - len(messages)):
                self.telemetry.submit_refused(None, exc)
            raise

    def _check_batch(
        self,
        payloads: Iterable[Mapping[str, JSONInput]],
        pipeline: str | None,
        task_ids: Sequence[str] | None,
        traceparent: str | None,
    ) -> list[Mapping[str, JSONInput]]:
        """The batch as a list, once what concerns it as a whole (not one payload) is judged."""
        if self._forked:
            raise RuntimeStopped(_FORKED)
        if self._closed.is_set() or self._tracker.failure is not None:
            raise self._unavailable()
        if isinstance(payloads, (Mapping, str, bytes)) or not isinstance(payloads, Iterable):
            raise InvalidPayload(
                f"payloads must be a sequence of mappings (JSON objects), got {type(payloads).__name__}; "
                "to submit one payload, call submit()"
            )
        batch = list(payloads)
        if task_ids is not None:
            if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Sequence):
                raise InvalidPayload(f"task_ids must be a sequence of str, got {type(task_ids).__name__}")
            if len(task_ids) != len(batch):
                raise InvalidPayload(
                    f"task_ids has {len(task_ids)} id(s) for {len(batch)} payload(s); give one id per payload"
                )
        limit = self.config.max_in_flight
        if limit is not None and len(batch) > limit:
            raise InvalidPayload(
                f"a batch of {len(batch)} payloads can never be admitted under max_in_flight={limit}; "
                f"submit batches of at most {limit}"
            )
        self.pipeline(pipeline)  # UnknownPipeline concerns the batch, not one payload
        if traceparent is not None:  # shared by the batch: judged once, not as some payload's fault
            try:
                parse_traceparent(traceparent)
            except ValueError as exc:
                raise InvalidPayload(f"{exc}; nothing was created") from None
        return batch

    def _prepare_many(
        self,
        batch: list[Mapping[str, JSONInput]],
        pipeline: str,
        task_ids: Sequence[str] | None,
        traceparent: str | None,
        *,
        into: list[CreateTask],
    ) -> None:
        """Prepare each payload as `submit` does, appending to `into`; InvalidPayload names the first bad one."""
        first_index: dict[str, int] = {}
        for index, payload in enumerate(batch):
            task_id = None if task_ids is None else task_ids[index]
            try:
                message = self._prepare(payload, task_id, traceparent, pipeline, single=False)
            except InvalidPayload as exc:
                raise InvalidPayload(f"payloads[{index}]: {exc}; nothing was created") from None
            into.append(message)
            if task_ids is not None:
                earlier = first_index.setdefault(message.task_id, index)
                if earlier != index:
                    raise InvalidPayload(
                        f"payloads[{index}]: task_id {message.task_id!r} is also the id of payloads[{earlier}]; "
                        "task ids must be unique; nothing was created"
                    )

    def _reserve_and_send_many(self, messages: list[CreateTask], *, explicit_ids: bool) -> list[TaskHandle]:
        if not messages:
            return []
        config = self.config
        central = self._threads.role_of_current() in _NEVER_WAITS
        reply: pykka.Future[tuple[TaskRecord, ...]] | None = None
        # As for submit: wait for an answer when there is a commit to wait for, or ids that may be taken.
        if config.journal_path is not None or explicit_ids:
            if central:
                self._refuse_blocking("Runtime.submit_many() with a journal or task_ids (it waits for the commit)")
            reply = pykka.ThreadingFuture()
        count = len(messages)
        try:
            self._tracker.reserve(
                wait=config.overload == "wait" and not central, timeout=config.submit_timeout_s, count=count
            )
        except Overloaded as exc:
            if central and config.overload == "wait":
                self._refuse_blocking("Runtime.submit_many() at max_in_flight (it waits for room)")
            raise exc from None
        task_ids = [message.task_id for message in messages]
        waiters = self._tracker.track_many(task_ids)
        if self._log.enabled("debug"):
            for message in messages:
                self._log_submitted(message)
        try:
            self._deliver_create(CreateTasks(tuple(messages), reply))
        except BaseException as exc:
            self._tracker.forget_many(task_ids)
            suppressed = self._refusals.allow()
            if suppressed is not None:
                self._log.warning(
                    "tasks.submit_refused",
                    tasks=count,
                    first_task_id=task_ids[0],
                    error_type=type(exc).__name__,
                    error=str(exc),
                    suppressed=suppressed,
                )
            raise
        return [TaskHandle(self, task_id, waiter) for task_id, waiter in zip(task_ids, waiters, strict=True)]

    async def submit_async(
        self,
        payload: Mapping[str, JSONInput],
        *,
        task_id: str | None = None,
        traceparent: str | None = None,
        pipeline: str | None = None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> TaskHandle:
        """`submit` for asyncio: waiting for room or for the commit happens off the event loop.

        Same arguments, result and errors as `submit`; `await handle` then waits for the task.
        """
        loop = asyncio.get_running_loop()
        submit = functools.partial(
            self.submit,
            payload,
            task_id=task_id,
            traceparent=traceparent,
            pipeline=pipeline,
            idempotency_key=idempotency_key,
        )
        # The executor thread runs it in our context, so that the caller's current OTel span is the parent.
        return await loop.run_in_executor(None, contextvars.copy_context().run, submit)

    def find_idempotency_key(self, key: str) -> tuple[str, str] | None:
        """(task id, payload fingerprint) of the task submitted with `key`, from the journal.

        None without a journal, or if the key is unknown or older than the journal's retention.
        Read through the journal's reader side (a connection of its own, opened at the first
        call), never through the StateActor's writer: it sees committed tasks and keys only.

        Raises:
            RuntimeStopped: the runtime is closed (or this is a fork() child of its process).
            JournalError: the journal cannot be read.
        """
        if self._forked:
            raise RuntimeStopped(_FORKED)
        if self._closed.is_set():
            raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")
        if self.config.journal_path is None:
            return None
        with self._key_reader_lock:  # opened once, by the first caller; closed by close()
            if self._closed.is_set():
                raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")
            if self._key_reader is None:
                from actorflow.core.journal import open_reader  # noqa: PLC0415 - the journal only when asked for

                self._key_reader = open_reader(self.config.journal_path)
            reader = self._key_reader
        return reader.find_key(key)

    @property
    def states(self) -> tuple[TaskState, ...]:
        """Every state of the runtime's pipelines, in lifecycle order (each once)."""
        return tuple(dict.fromkeys(state for pipeline in self.pipelines for state in pipeline.states))

    def pipeline(self, name: str | None = None) -> Pipeline:
        """The pipeline called `name` (the first one for None). Raises UnknownPipeline naming the known ones."""
        if name is None:
            return self.pipelines[0]
        found = self._pipelines_by_name.get(name) if isinstance(name, str) else None
        if found is None:
            raise UnknownPipeline(name, list(self._pipelines_by_name))
        return found

    def _prepare(
        self,
        payload: Mapping[str, JSONInput],
        task_id: str | None,
        traceparent: str | None,
        pipeline: str | None,
        *,
        single: bool = True,
    ) -> CreateTask:
        if self._forked:
            raise RuntimeStopped(_FORKED)
        if self._closed.is_set() or self._tracker.failure is not None:
            raise self._unavailable()
        pipeline_name = self.pipeline(pipeline).name
        if not isinstance(payload, Mapping):
            raise InvalidPayload(f"payload must be a mapping (a JSON object), got {type(payload).__name__}")
        try:
            frozen = freeze_payload(payload, max_bytes=self.config.max_value_bytes)
        except TypeError as exc:
            raise InvalidPayload(f"payload is not JSON-serializable: {exc}") from None
        # An acknowledgement costs a round trip to the state actor. It is needed when there is a commit
        # to wait for (a journal) or a caller-chosen id that may be taken; a fresh uuid in memory is neither.
        needs_ack = task_id is not None or self.config.journal_path is not None
        if task_id is None:
            task_id = new_task_id()
        elif not isinstance(task_id, str) or not task_id or len(task_id) > _MAX_TASK_ID:
            raise InvalidPayload(
                f"task_id must be a non-empty str of at most {_MAX_TASK_ID} chars, got {quote(task_id)}"
            )
        elif not task_id.isascii():
            try:
                task_id.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidPayload(
                    f"task_id {task_id!r} holds a lone surrogate {task_id[exc.start]!r}; "
                    "a task id must be valid Unicode text"
                ) from None
        if traceparent is not None:
            try:
                trace = parse_traceparent(traceparent)
            except ValueError as exc:
                raise InvalidPayload(str(exc)) from None
        else:
            trace = new_trace()
        trace = self.telemetry.task_submitted(task_id, trace, traceparent)
        # A batch (not `single`) is acknowledged as a whole, by its CreateTasks message.
        reply: pykka.Future[TaskRecord] | None = pykka.ThreadingFuture() if needs_ack and single else None
        # No `notify`: the StateActor announces the task to whichever orchestrator it has adopted then.
        return CreateTask(task_id, frozen, trace, reply=reply, pipeline=pipeline_name)

    def _log_submitted(self, message: CreateTask) -> None:
        """The task's ``task.submitted`` event (debug): when `submit()` was called, before the commit."""
        trace = message.trace
        self._log.debug(
            "task.submitted",
            task_id=message.task_id,
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            parent_span_id=trace.parent_span_id,
            pipeline=message.pipeline,
        )

    def _send_create(self, message: CreateTask) -> TaskHandle:
        assert self._state is not None
        waiter = self._tracker.track(message.task_id, reserved=True)
        self._log_submitted(message)
        try:
            self._deliver_create(message)
        except BaseException as exc:
            self._tracker.forget(message.task_id)
            suppressed = self._refusals.allow()
            if suppressed is not None:
                self._log.warning(
                    "task.submit_refused",
                    task_id=message.task_id,
                    trace_id=message.trace.trace_id,
                    error_type=type(exc).__name__,
                    error=str(exc),
                    suppressed=suppressed,
                )
            raise
        return TaskHandle(self, message.task_id, waiter)

    def _deliver_create(self, message: CreateTask | CreateTasks) -> None:
        """Tell the StateActor a creation or a batch; if it stopped before taking it, wait for its replacement once."""
        for attempt in (1, 2):
            state = self._state
            assert state is not None
            try:
                state.tell(message)
                if message.reply is not None:
                    _answer(message.reply, state)
                return
            except (pykka.ActorDeadError, RuntimeStopped):
                # Never handled (an actor's leftover asks get RuntimeStopped): nothing was created.
                if attempt == 2 or not self._await_replacement("state", state):
                    raise self._unavailable() from None
                if message.reply is not None:
                    message = message._replace(reply=pykka.ThreadingFuture())

    # --- reading ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The task's current record. Raises TaskNotFound."""
        self._refuse_blocking("Runtime.get()")
        _check_lookup(task_id)
        record: TaskRecord = self._ask_central("state", lambda state: _ask(state, "get", task_id))
        return record

    def tasks(
        self, state: TaskState | str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[TaskRecord]:
        """Records, oldest first; only those in `state` if given; paged by `limit` and `offset`."""
        self._refuse_blocking("Runtime.tasks()")
        records: list[TaskRecord] = self._ask_central(
            "state", lambda actor: _ask(actor, "list", state, limit=limit, offset=offset)
        )
        return records

    def handle(self, task_id: str) -> TaskHandle:
        """A handle on any known task (one submitted earlier, or recovered). Raises TaskNotFound."""
        _check_lookup(task_id)
        waiter = self._tracker.waiter(task_id)
        if waiter is not None:
            return TaskHandle(self, task_id, waiter)
        record = self.get(task_id)
        waiter = self._tracker.waiter(task_id)  # it may have been recovered meanwhile
        if waiter is None and record.state not in TERMINAL_STATES:
            raise RuntimeStopped(f"task {task_id!r} is not terminal but not in flight either: the runtime is closed")
        return TaskHandle(self, task_id, waiter, record)

    def metrics_collector(self, *others: Runtime) -> MetricsCollector:
        """A Prometheus collector of this runtime's metrics, for the program to register in its registry.

        Needs `prometheus-client` (the ``metrics`` extra) when scraped. For example::

            from prometheus_client import REGISTRY
            REGISTRY.register(runtime.metrics_collector())

        Every sample carries a ``runtime`` label, the runtime's `name`. A registry takes one
        collector per metric name, so several runtimes of one process share one collector:
        ``REGISTRY.register(first.metrics_collector(second))``.

        Args:
            others: more runtimes whose metrics the same collector exports.

        Raises:
            ConfigError: a runtime was made with ``metrics=False``, or one is given twice.
        """
        runtimes = (self, *others)
        for runtime in runtimes:
            if not isinstance(runtime, Runtime):
                raise ConfigError(f"metrics_collector() takes Runtime objects, got {type(runtime).__name__}")
            if not runtime.telemetry.metrics:
                raise ConfigError(f"runtime {runtime.name!r} counts no metrics (it was made with metrics=False)")
        if len({id(runtime) for runtime in runtimes}) != len(runtimes):
            raise ConfigError("metrics_collector() was given the same runtime twice; its series would be doubled")
        return MetricsCollector(runtimes)

    def stats(self) -> dict[str, Any]:
        """Counts per state, submitted, in_flight, and the fault counters (retries, timeouts, ...)."""
        self._refuse_blocking("Runtime.stats()")
        counts: dict[str, int] = self._ask_central("state", lambda state: _ask(state, "counts"))
        orchestrator: dict[str, Any] = self._ask_central("orchestrator", lambda actor: _ask(actor, "stats"))
        in_memory: int = self._ask_central("state", lambda state: _ask(state, "memory_size"))
        return {
            **counts,
            "submitted": self._tracker.submitted,
            "in_flight": self._tracker.in_flight,
            "dead_letters": self._dead_letters.count,
            "records_in_memory": in_memory,
            **orchestrator,
        }

    def subscribe(self, callback: Callable[[TransitionEvent], None]) -> Callable[[], None]:
        """Call `callback(event)` after every committed transition; returns the unsubscribe function.

        The callback runs on the state actor's thread: keep it quick and never
        block in it (hand off with a queue or `loop.call_soon_threadsafe`).
        Exceptions it raises are logged and ignored. Blocking calls on the runtime raise
        WouldDeadlock inside it; the returned unsubscribe function may be called there.
        """
        self._refuse_blocking("Runtime.subscribe()")
        key = next(self._subscription_keys)  # atomic under the GIL: every call gets its own key
        while True:
            with self._subscribing:  # a restart's re-subscription waits, so it neither misses nor doubles this one
                state = self._state
                if state is None:
                    raise self._unavailable()
                try:
                    token = _answer(_ask(state, "subscribe", callback), state)
                except RuntimeStopped:
                    pass  # the StateActor is being replaced: subscribe on its replacement
                else:
                    with self._subscriptions_lock:
                        self._subscriptions[key] = _Subscription(callback, state, token)
                    break
            if self._closed.is_set() or self._health.failed:
                raise self._unavailable()
            if not self._await_replacement("state", state):
                raise self._unavailable()

        def unsubscribe() -> None:
            with self._subscriptions_lock:
                entry = self._subscriptions.pop(key, None)
            if entry is None or self._forked or not entry.state.is_alive():
                return  # already unsubscribed, or its StateActor is gone (a replacement is subscribed anew)
            answer = _ask(entry.state, "unsubscribe", entry.token)
            if self._threads.role_of_current() == "central":
                return  # inside a callback: queued ahead of any later event; waiting would deadlock
            with contextlib.suppress(RuntimeStopped):
                _answer(answer, entry.state)

        return unsubscribe

    def cancel(self, task_id: str) -> bool:
        """Cancel a task at any stage; True once it is CANCELLED, False if it ended otherwise first.

        Cancelling is idempotent: True whenever the task ends CANCELLED, whether this call
        cancelled it or another one did (concurrent or earlier: the second of two DELETEs,
        say); the answer comes from the committed outcome, never before the commit. False
        if the task was COMPLETED or FAILED before the cancellation could be applied.

        Raises:
            TaskNotFound: no task has that id.
            RuntimeStopped: the runtime is closed.
        """
        self._refuse_blocking("Runtime.cancel()")
        _check_lookup(task_id)
        if self._closed.is_set():
            raise self._unavailable()

        def send(orchestrator: pykka.ActorRef[Any]) -> pykka.Future[bool]:
            reply: pykka.Future[bool] = pykka.ThreadingFuture()
            try:
                orchestrator.tell(CancelTask(task_id, reply))
            except pykka.ActorDeadError as exc:
                reply.set_exception(exc_info=(type(exc), exc, None))
            return reply

        return bool(self._ask_central("orchestrator", send))

    @property
    def closed(self) -> bool:
        """True once `close()` has begun (or in a fork() child): `submit` raises RuntimeStopped."""
        return self._forked or self._closed.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no task is in flight. False if `timeout` elapsed first.

        Raises:
            RuntimeFailed: the runtime failed (see `health()`).
            WouldDeadlock: called inside a subscriber or a service (whose own task is in flight).
        """
        self._refuse_blocking("Runtime.join()", waits_for_tasks=True)
        return self._tracker.join(timeout)

    def _refuse_blocking(self, call: str, *, waits_for_tasks: bool = False) -> None:
        """Raise if the calling thread is one that `call` would wait for: it would deadlock.

        Subscribers run on the state actor's thread, which answers every read: any
        wait there hangs. Services run on workers: a read there is answered by
        another thread and is fine, but waiting for tasks to finish is not, as
        they need the workers (the caller's own task included).
        """
        if self._forked:
            raise RuntimeStopped(_FORKED)
        role = self._threads.role_of_current()
        if role is None or (role == "worker" and not waits_for_tasks):
            return
        thread = threading.current_thread().name
        if role == "loop":
            raise WouldDeadlock(_on_the_loop(call, thread, waits_for_tasks=waits_for_tasks))
        if role == "central":
            raise WouldDeadlock(
                f"{call} was called on the runtime's own thread {thread!r}, where subscriber callbacks run; "
                "it waits for an answer only that thread can give, so it would deadlock. Use what the "
                "callback receives (event.record), or hand the work to another thread (a queue.Queue "
                "read by a thread of yours, or loop.call_soon_threadsafe)"
            )
        raise WouldDeadlock(
            f"{call} was called inside a service, on worker thread {thread!r}; it waits for tasks to "
            "finish, and they need the workers (this task included), so it would deadlock. Return from "
            "the service and wait outside it, or submit follow-up tasks without waiting for them"
        )

    # --- stopping --------------------------------------------------------------------------------

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop every actor and join their threads. Idempotent.

        A second call returns only once the first has finished (so the journal
        can be reopened right after). Inside a subscriber or a service, where
        waiting would deadlock, the close is handed to a thread of its own and
        this returns at once; `submit` raises RuntimeStopped from then on.

        Args:
            drain: first let the tasks in flight finish (up to `timeout`,
                default `config.drain_timeout_s`). With False, stop at once:
                with a journal, unfinished tasks resume on the next start.
            timeout: the drain's bound in seconds.
        """
        if self._forked:
            return  # the actors are the parent's; and no lock may be taken here (see _forget_runtimes...)
        with self._close_lock:
            first = not self._closed.is_set()
            self._closed.set()
        # On a thread the close would wait for (an actor's, or the supervisor's, where milestone
        # callbacks run), the close is handed to a thread of its own.
        on_our_thread = self._threads.role_of_current() is not None or threading.current_thread() is self._supervisor
        if not first:
            if not on_our_thread:
                self._close_finished.wait()
            return
        _open_runtimes.discard(self)
        if on_our_thread:
            closer = threading.Thread(
                target=self._shutdown,
                kwargs={"drain": drain, "timeout": timeout},
                name="actorflow-close",
                daemon=False,  # the interpreter's exit waits for the drain, as it would for a close in main
            )
            closer.start()
            return
        self._shutdown(drain=drain, timeout=timeout)

    def _shutdown(self, *, drain: bool, timeout: float | None = None) -> None:
        try:
            self._stop_everything(drain=drain, timeout=timeout)
        finally:
            _release_name(self.name)
            self._close_finished.set()

    def _stop_everything(self, *, drain: bool, timeout: float | None) -> None:
        self._closed.set()
        drained = True
        if drain and self._orchestrator is not None:
            try:
                drained = self._tracker.join(self.config.drain_timeout_s if timeout is None else timeout)
            except RuntimeFailed:
                drained = False
        with self._key_reader_lock:  # before the StateActor's journal: the writer, closed last, tidies the files
            reader, self._key_reader = self._key_reader, None
        if reader is not None:
            reader.close()
        with self._supervise_lock:  # a replacement under way finishes first; none starts after this
            for ref in (self._orchestrator, self._state):  # orchestrator first: it sends to the state actor
                if ref is not None:
                    with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                        ref.stop(block=True, timeout=_ASK_TIMEOUT_S)
            self._close_backends()  # its workers are retired: release what the backends hold (Ray: shut down)
        self._exits.put(None)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(_ASK_TIMEOUT_S)
        abandoned = self._tracker.close()
        self.telemetry.close()
        if self._timer is not None:
            self._timer.stop()
        # Workers hung in a service call cannot be joined; they are daemons and do not block exit.
        still_running = self._threads.join(timeout=1.0)
        if self.results is not None:
            self.results.close()
        self._log.info(
            "runtime.stopped",
            drained=drained,
            unfinished=abandoned,
            dead_letters=self._dead_letters.count,
            threads_left=still_running,
        )
        self._log.flush()  # configure_logging's JSON file holds every event of the run once close returns

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # After an exception (Ctrl-C included) stop promptly; otherwise finish what is in flight.
        self.close(drain=exc_type is None)

    async def aclose(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """`close()` for asyncio: the drain and the joins run on a worker thread, never on the event loop.

        Same arguments and behaviour as `close()`. Cancelling the awaiting task does not
        stop the close half-way: it goes on, and a later `close()` or `aclose()` waits for it.
        """
        if self._forked:
            return
        if self._threads.role_of_current() is not None:
            # In an async stage, whose loop runs on one of our threads: close() hands the
            # close to a thread of its own and returns at once; waiting here would deadlock.
            self.close(drain=drain, timeout=timeout)
            return
        loop = asyncio.get_running_loop()
        closing = loop.run_in_executor(None, functools.partial(self.close, drain=drain, timeout=timeout))
        await asyncio.shield(closing)

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # As __exit__, off the event loop.
        await self.aclose(drain=exc_type is None)
