"""The Runtime facade: what an embedding program uses.

    with Runtime() as runtime:
        handle = runtime.submit({"name": "report", "data": {"rows": 3}})
        record = handle.result(timeout=5)

It starts the StateActor, the OrchestratorActor and its service pools, and
stops every one of them in `close()`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pykka

from actorflow.actors.backends import BackendRequest, make_backend
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import CancelTask, CreateTask, ResumeTasks
from actorflow.actors.orchestrator import OrchestratorActor, pool_name
from actorflow.actors.service import ServiceBackend, ThreadBackend
from actorflow.actors.state import StateActor
from actorflow.actors.threads import ThreadBook
from actorflow.actors.timer import Timer
from actorflow.core.config import TERMINAL_STATES, RuntimeConfig
from actorflow.core.errors import ConfigError, InvalidPayload, Overloaded, RuntimeStopped, UnknownPipeline
from actorflow.core.pipeline import Pipeline
from actorflow.core.tracing import get_event_logger, new_task_id, new_trace, parse_traceparent
from actorflow.core.types import JSONInput, TaskRecord, TaskState, TransitionEvent, freeze_payload
from actorflow.services import ResultStore, ServiceSet

if TYPE_CHECKING:
    from actorflow.core.journal import Journal

__all__ = ["Runtime", "TaskHandle"]

_ASK_TIMEOUT_S = 30.0
"""Upper bound on any wait for an actor's answer outside the hot path (pykka's stop race)."""

_open_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


@atexit.register
def _close_forgotten_runtimes() -> None:
    """Actor threads are daemons, so a forgotten runtime cannot hang exit; commit what it has, though."""
    for runtime in list(_open_runtimes):
        runtime.close(drain=False)


class _Waiter:
    """Completion of one task, settable once from the state actor's thread.

    Most handles are never waited on one by one (a flood of submissions ends
    in one `join()`), so the Event and the callback list are made only when
    someone waits: a threading.Event costs more to build than the rest of a submit.
    """

    __slots__ = ("_callbacks", "_event", "abandoned", "record")

    _lock = threading.Lock()
    """One lock for all waiters: it guards only the brief hand-over of `record`."""

    def __init__(self) -> None:
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[TaskRecord | None], None]] | None = None
        self.record: TaskRecord | None = None
        self.abandoned = False
        """The runtime closed before the task finished: waiting is over, with no record."""

    def set(self, record: TaskRecord | None) -> None:
        """Settle with the terminal record, or with None when the runtime closed first."""
        with _Waiter._lock:
            if self.record is not None or self.abandoned:
                return
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

    def wait(self, timeout: float | None) -> bool:
        with _Waiter._lock:
            if self.record is not None or self.abandoned:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


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
        self.submitted = 0

    @property
    def in_flight(self) -> int:
        return len(self._waiters) + self._reserved

    def reserve(self, *, wait: bool, timeout: float) -> None:
        """Claim room for one more task, or raise Overloaded."""
        with self._lock:
            limit = self._limit
            if (
                limit is not None
                and self.in_flight >= limit
                and (not wait or not self._room.wait_for(lambda: self.in_flight < limit, timeout))
            ):
                raise Overloaded(
                    f"{self.in_flight} tasks in flight, the max_in_flight limit of {limit}; "
                    + (f"waited {timeout:g}s for room" if wait else "overload='reject' refuses at once")
                )
            self._reserved += 1

    def track(self, task_id: str, *, reserved: bool) -> _Waiter:
        """Start tracking a task; `reserved` turns a `reserve()` claim into it (a new submission)."""
        with self._lock:
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

    def forget(self, task_id: str) -> None:
        """Stop tracking a submission whose creation failed."""
        with self._lock:
            self._waiters.pop(task_id, None)
            self.submitted -= 1
            self._freed()

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

    def _freed(self) -> None:
        """One slot was freed (call with the lock held)."""
        if self._limit is not None:
            self._room.notify()
        if not self._waiters and not self._reserved:
            self._idle.notify_all()

    def join(self, timeout: float | None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: not self._waiters and not self._reserved, timeout)

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


def _answer(future: pykka.Future[Any]) -> Any:
    """An actor's answer to a read, with pykka's errors mapped to ours.

    A stopped actor is a closed runtime (RuntimeStopped); an actor that does
    not answer in time is a builtin TimeoutError, never a pykka type.
    """
    try:
        return future.get(timeout=_ASK_TIMEOUT_S)
    except pykka.ActorDeadError:
        raise RuntimeStopped("the runtime is closed") from None
    except pykka.Timeout:
        raise TimeoutError(f"the runtime did not answer within {_ASK_TIMEOUT_S:g}s") from None


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
        """Block until the task is terminal and return its record; raise TimeoutError after `timeout` s."""
        if not self._waiter.wait(timeout):
            raise TimeoutError(f"task {self.task_id!r} is not terminal after {timeout}s")
        if self._waiter.record is None:
            raise RuntimeStopped(_ABANDONED.format(task_id=self.task_id))
        return self._waiter.record

    def cancel(self) -> bool:
        """Cancel the task at whatever stage it is; False if it was already terminal."""
        return self._runtime.cancel(self.task_id)

    def __await__(self) -> Generator[Any, None, TaskRecord]:
        """Wait in asyncio without blocking the loop (completion crosses via call_soon_threadsafe)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TaskRecord] = loop.create_future()

        def settle(record: TaskRecord | None) -> None:
            if future.done():
                return
            if record is None:
                future.set_exception(RuntimeStopped(_ABANDONED.format(task_id=self.task_id)))
            else:
                future.set_result(record)

        def on_done(record: TaskRecord | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, record)

        self._waiter.add_callback(on_done)
        return (yield from future.__await__())

    def __repr__(self) -> str:
        state = self._waiter.record.state.value if self._waiter.record else "in flight"
        return f"<TaskHandle {self.task_id} {state}>"


class Runtime:
    """An actorflow runtime: state actor, orchestrator, service pools. A context manager.

    Args:
        config: every knob; defaults to `RuntimeConfig()`.
        services: the seed pipeline's functions; missing ones use the defaults.
        pipelines: the pipelines to run. None runs the seed pipeline (built by
            `services`); given, only these run, plus the seed's first if
            `services` is given too. `submit` without ``pipeline=`` uses the first.
    """

    def __init__(
        self,
        config: RuntimeConfig | None = None,
        *,
        services: ServiceSet | None = None,
        pipelines: Sequence[Pipeline] | None = None,
    ) -> None:
        if config is not None and not isinstance(config, RuntimeConfig):
            raise ConfigError(f"config must be a RuntimeConfig, got {type(config).__name__}")
        if services is not None and not isinstance(services, ServiceSet):
            raise ConfigError(f"services must be a services.ServiceSet, got {type(services).__name__}")
        if pipelines is not None:
            if isinstance(pipelines, Pipeline) or not isinstance(pipelines, Sequence):
                raise ConfigError(f"pipelines must be a list of Pipeline, got {type(pipelines).__name__}")
            for index, pipeline in enumerate(pipelines):
                if not isinstance(pipeline, Pipeline):
                    raise ConfigError(f"pipelines[{index}] must be a Pipeline, got {type(pipeline).__name__}")
            if not pipelines and services is None:
                raise ConfigError("pipelines is empty; pass at least one Pipeline (or None for the seed pipeline)")
        self.config = config or RuntimeConfig()
        with_seed = pipelines is None or services is not None
        services = services or ServiceSet()
        self._log = get_event_logger("runtime")
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._dead_letters = DeadLetterOffice()
        self._threads = ThreadBook()
        self._tracker = _Tracker(self.config.max_in_flight)
        self._timer: Timer | None = None
        self._state: pykka.ActorRef[StateActor] | None = None
        self._orchestrator: pykka.ActorRef[OrchestratorActor] | None = None
        self.results: ResultStore | None = None
        self._journal: Journal | None = None  # for Idempotency-Keys; the StateActor owns its writes and closing
        """The default persistence's result store (None when a custom `persist` is plugged in)."""
        self.pipelines: tuple[Pipeline, ...] = ()
        """The runtime's pipelines; the first is the one `submit` uses by default."""
        self._pipelines_by_name: dict[str, Pipeline] = {}
        try:
            self._start(services if with_seed else None, tuple(pipelines or ()))
        except BaseException:
            self._shutdown(drain=False)
            raise
        _open_runtimes.add(self)

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
        journal = None
        if config.journal_path is not None:
            from actorflow.core.journal import Journal  # noqa: PLC0415 - SQLite journal only when asked for

            journal = Journal(config.journal_path, durability=config.durability, pipelines=self._pipelines_by_name)
            self._journal = journal
        self._timer = Timer(on_error=lambda exc: self._log.error("timer.callback_failed", error=repr(exc)))
        try:
            self._state = StateActor.start(
                journal=journal,
                retain_terminal=config.retain_terminal,
                dead_letters=self._dead_letters,
                threads=self._threads,
                on_terminal=self._tracker.on_terminal,
                pipelines=self.pipelines,
            )
        except BaseException:
            if journal is not None:
                journal.close()
            raise
        self._state_proxy = self._state.proxy()
        backends = self._make_backends()
        try:
            self._orchestrator = OrchestratorActor.start(
                state=self._state,
                pipelines=self.pipelines,
                config=config,
                backends=backends,
                timer=self._timer,
                dead_letters=self._dead_letters,
                threads=self._threads,
            )
        except BaseException:
            for backend in {id(b): b for b in backends.values()}.values():
                with contextlib.suppress(Exception):
                    backend.close()
            raise
        self._orchestrator_proxy = self._orchestrator.proxy()
        recovered = tuple(self._state_proxy.non_terminal().get(timeout=_ASK_TIMEOUT_S))
        for record in recovered:
            self._tracker.track(record.task_id, reserved=False)
        if recovered:
            self._orchestrator.tell(ResumeTasks(recovered))
        self._log.info(
            "runtime.started",
            pools={name: size for name, (_, _, size) in self._pool_plan().items()},
            backend=config.service_backend,
            journal=config.journal_path,
            durability=config.durability if config.journal_path else None,
            recovered=len(recovered),
            transitions={  # so that a log's reader can check each task against its own pipeline
                p.name: {s.value: sorted(t.value for t in targets) for s, targets in p.transitions.items()}
                for p in self.pipelines
            },
        )

    def _pool_plan(self) -> dict[str, tuple[str, Callable[..., Any], int]]:
        """Each stage's pool name -> (backend name, function, workers)."""
        config = self.config
        plan: dict[str, tuple[str, Callable[..., Any], int]] = {}
        for pipeline in self.pipelines:
            for stage in pipeline.stages:
                kind = stage.backend or ("async" if stage.is_async else config.service_backend)
                workers = stage.workers if stage.workers is not None else config.workers_for(stage.name)
                plan[pool_name(self.pipelines, pipeline, stage)] = (kind, stage.fn, workers)
        return plan

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
            if kind == "thread":
                made[kind] = local_backend()
                continue
            request = BackendRequest(
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
        """Create a task and start it through `pipeline` (default: the first); returns once its creation is committed.

        Args:
            payload: the task's input, a JSON-serializable mapping.
            task_id: the task's id; a new unique one if None.
            traceparent: a W3C trace context to continue.
            idempotency_key: (key, payload fingerprint): with a journal, committed in the same
                transaction as the task, so that `find_idempotency_key` finds it after a crash
                if and only if the task exists. Ignored without a journal.

        Raises:
            UnknownPipeline: the runtime has no pipeline of that name (nothing is created).
            InvalidPayload: the payload is not a JSON-serializable mapping, or `task_id` is taken.
            Overloaded: `max_in_flight` tasks are in flight (after waiting, with overload="wait").
            RuntimeStopped: the runtime is closed.
        """
        message = self._prepare(payload, task_id, traceparent, pipeline)
        config = self.config
        journal = self._journal if idempotency_key is not None else None
        if journal is not None and idempotency_key is not None:
            journal.stage_key(idempotency_key[0], message.task_id, idempotency_key[1])
        try:
            self._tracker.reserve(wait=config.overload == "wait", timeout=config.submit_timeout_s)
            return self._send_create(message)
        except BaseException:
            if journal is not None:
                journal.unstage_key(message.task_id)
            raise

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
        return await loop.run_in_executor(None, submit)

    def find_idempotency_key(self, key: str) -> tuple[str, str] | None:
        """(task id, payload fingerprint) of the task submitted with `key`, from the journal.

        None without a journal, or if the key is unknown or older than the journal's retention.

        Raises:
            RuntimeStopped: the runtime is closed.
        """
        if self._closed.is_set():
            raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")
        return None if self._journal is None else self._journal.find_key(key)

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
        self, payload: Mapping[str, JSONInput], task_id: str | None, traceparent: str | None, pipeline: str | None
    ) -> CreateTask:
        if self._closed.is_set():
            raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")
        pipeline_name = self.pipeline(pipeline).name
        if not isinstance(payload, Mapping):
            raise InvalidPayload(f"payload must be a mapping (a JSON object), got {type(payload).__name__}")
        try:
            frozen = freeze_payload(payload)
        except TypeError as exc:
            raise InvalidPayload(f"payload is not JSON-serializable: {exc}") from None
        # An acknowledgement costs a round trip to the state actor. It is needed when there is a commit
        # to wait for (a journal) or a caller-chosen id that may be taken; a fresh uuid in memory is neither.
        needs_ack = task_id is not None or self.config.journal_path is not None
        if task_id is None:
            task_id = new_task_id()
        elif not isinstance(task_id, str) or not task_id or len(task_id) > 200:
            raise InvalidPayload(f"task_id must be a non-empty str of at most 200 chars, got {task_id!r}")
        if traceparent is not None:
            try:
                trace = parse_traceparent(traceparent)
            except ValueError as exc:
                raise InvalidPayload(str(exc)) from None
        else:
            trace = new_trace()
        reply: pykka.Future[TaskRecord] | None = pykka.ThreadingFuture() if needs_ack else None
        return CreateTask(task_id, frozen, trace, reply=reply, notify=self._orchestrator, pipeline=pipeline_name)

    def _send_create(self, message: CreateTask) -> TaskHandle:
        assert self._state is not None
        waiter = self._tracker.track(message.task_id, reserved=True)
        trace = message.trace
        self._log.debug(
            "task.submitted",
            task_id=message.task_id,
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            parent_span_id=trace.parent_span_id,
            pipeline=message.pipeline,
        )
        try:
            self._state.tell(message)
            if message.reply is not None:
                _answer(message.reply)
        except pykka.ActorDeadError:
            self._tracker.forget(message.task_id)
            raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks") from None
        except BaseException as exc:
            self._tracker.forget(message.task_id)
            self._log.warning(
                "task.submit_refused",
                task_id=message.task_id,
                trace_id=trace.trace_id,
                error_type=type(exc).__name__,
                error=str(exc),
            )
            raise
        return TaskHandle(self, message.task_id, waiter)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The task's current record. Raises TaskNotFound."""
        record: TaskRecord = _answer(self._state_proxy.get(task_id))
        return record

    def tasks(
        self, state: TaskState | str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[TaskRecord]:
        """Records, oldest first; only those in `state` if given; paged by `limit` and `offset`."""
        records: list[TaskRecord] = _answer(self._state_proxy.list(state, limit=limit, offset=offset))
        return records

    def handle(self, task_id: str) -> TaskHandle:
        """A handle on any known task (one submitted earlier, or recovered). Raises TaskNotFound."""
        waiter = self._tracker.waiter(task_id)
        if waiter is not None:
            return TaskHandle(self, task_id, waiter)
        record = self.get(task_id)
        waiter = self._tracker.waiter(task_id)  # it may have been recovered meanwhile
        if waiter is None and record.state not in TERMINAL_STATES:
            raise RuntimeStopped(f"task {task_id!r} is not terminal but not in flight either: the runtime is closed")
        return TaskHandle(self, task_id, waiter, record)

    def stats(self) -> dict[str, Any]:
        """Counts per state, submitted, in_flight, and the fault counters (retries, timeouts, ...)."""
        counts: dict[str, int] = _answer(self._state_proxy.counts())
        orchestrator: dict[str, Any] = _answer(self._orchestrator_proxy.stats())
        in_memory: int = _answer(self._state_proxy.memory_size())
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
        Exceptions it raises are logged and ignored.
        """
        token: int = _answer(self._state_proxy.subscribe(callback))

        def unsubscribe() -> None:
            if self._state is not None and self._state.is_alive():
                with contextlib.suppress(RuntimeStopped):
                    _answer(self._state_proxy.unsubscribe(token))

        return unsubscribe

    def cancel(self, task_id: str) -> bool:
        """Cancel a task at any stage. False if it was already terminal; raises TaskNotFound."""
        if self._closed.is_set() or self._orchestrator is None:
            raise RuntimeStopped("the runtime is closed")
        reply: pykka.Future[bool] = pykka.ThreadingFuture()
        try:
            self._orchestrator.tell(CancelTask(task_id, reply))
        except pykka.ActorDeadError:
            raise RuntimeStopped("the runtime is closed") from None
        return bool(_answer(reply))

    @property
    def closed(self) -> bool:
        """True once `close()` has begun: `submit` raises RuntimeStopped."""
        return self._closed.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no task is in flight. False if `timeout` elapsed first."""
        return self._tracker.join(timeout)

    # --- stopping --------------------------------------------------------------------------------

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop every actor and join their threads. Idempotent.

        Args:
            drain: first let the tasks in flight finish (up to `timeout`,
                default `config.drain_timeout_s`). With False, stop at once:
                with a journal, unfinished tasks resume on the next start.
            timeout: the drain's bound in seconds.
        """
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        _open_runtimes.discard(self)
        self._shutdown(drain=drain, timeout=timeout)

    def _shutdown(self, *, drain: bool, timeout: float | None = None) -> None:
        self._closed.set()
        drained = True
        if drain and self._orchestrator is not None:
            drained = self._tracker.join(self.config.drain_timeout_s if timeout is None else timeout)
        for ref in (self._orchestrator, self._state):  # orchestrator first: it sends to the state actor
            if ref is not None:
                with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                    ref.stop(block=True, timeout=_ASK_TIMEOUT_S)
        abandoned = self._tracker.close()
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

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # After an exception (Ctrl-C included) stop promptly; otherwise finish what is in flight.
        self.close(drain=exc_type is None)
