"""The Runtime: what an embedding program uses, a facade over the runtime's parts.

    with Runtime() as runtime:
        handle = runtime.submit({"name": "report", "data": {"rows": 3}})
        record = handle.result(timeout=5)

It starts the StateActor, the OrchestratorActor and its service pools, and
stops every one of them in `close()`. Each concern is a module of its own:

    assembly       the pipelines, their plans, the backends; starting the actors
    supervision    replacing a central actor that stopped unasked (or failing the runtime)
    submission     checking payloads and batches, and sending them as CreateTasks
    admission      the tasks in flight, and backpressure under max_in_flight
    handles        TaskHandle, and the waiter each task is settled through
    subscriptions  callbacks on committed transitions, kept across a restart
    callers        which thread calls, whether it may wait, how it waits for an actor
    hooks          the process's exit and fork hooks, and the runtimes' names
    parts          what they all share: the config, the books, where to report

Milestones (`on_milestone=`) report internal events (see `Milestone.name`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pykka

from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.health import Health, Milestone, Milestones
from actorflow.actors.messages import CancelTask
from actorflow.actors.runtime import hooks
from actorflow.actors.runtime.admission import Admission
from actorflow.actors.runtime.assembly import Assembly, check_pipelines
from actorflow.actors.runtime.callers import FORKED, Callers, ask
from actorflow.actors.runtime.handles import Handles, TaskHandle
from actorflow.actors.runtime.parts import RuntimeParts
from actorflow.actors.runtime.submission import IdempotencyKeys, Submitter, check_lookup, find_pipeline
from actorflow.actors.runtime.subscriptions import Subscriptions
from actorflow.actors.runtime.supervision import Supervisor
from actorflow.actors.telemetry import MetricsCollector, MetricsSource, Telemetry
from actorflow.actors.threads import ThreadBook
from actorflow.core.config import RuntimeConfig
from actorflow.core.errors import ConfigError, RuntimeFailed, RuntimeStopped
from actorflow.core.events import RUNTIME_STARTED, RUNTIME_STOPPED
from actorflow.core.pipeline import Pipeline
from actorflow.core.tracing import get_event_logger
from actorflow.core.types import TERMINAL_STATES, JSONInput, TaskRecord, TaskState, TransitionEvent
from actorflow.services import ResultStore, ServiceSet

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["Runtime"]


class Runtime:
    """An actorflow runtime: state actor, orchestrator, service pools. A context manager.

    Args:
        config: every knob; defaults to `RuntimeConfig()`.
        services: a convenience: adds the seed pipeline built from this `ServiceSet`
            (`actorflow.services.seed_pipeline`; missing functions use the defaults), first.
        pipelines: the pipelines to run. None runs the seed pipeline alone (built by
            `services`, or by the defaults); given, only these run, plus the seed's first if
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
            check_pipelines(pipelines, with_services=services is not None)
        self.config = config = config or RuntimeConfig()
        hooks.install()
        self.name = hooks.claim_name(name)
        """The ``runtime`` label of this runtime's metrics (see the `name` argument)."""
        self._close_lock = threading.Lock()
        self._close_finished = threading.Event()
        self._threads = threads = ThreadBook()
        self._callers = callers = Callers(threads)
        self._admission = admission = Admission(config.max_in_flight)
        self.telemetry = Telemetry(metrics=metrics, tracer_provider=tracer_provider, name=self.name)
        """Counters, histograms and spans (read them through `metrics_collector()`)."""
        self._health = Health()
        self._dead_letters = DeadLetterOffice()
        self._log = get_event_logger("runtime")
        parts = RuntimeParts(
            config=config,
            callers=callers,
            admission=admission,
            telemetry=self.telemetry,
            health=self._health,
            milestones=Milestones(on_milestone),
            dead_letters=self._dead_letters,
            threads=threads,
            log=self._log,
        )
        with_seed = pipelines is None or services is not None
        try:
            services = (services or ServiceSet()) if with_seed else None
            self._assembly = assembly = Assembly(parts, services=services, extra=tuple(pipelines or ()))
        except BaseException:
            hooks.release_name(self.name)
            raise
        self.pipelines: tuple[Pipeline, ...] = assembly.pipelines
        """The runtime's pipelines; the first is the one `submit` uses by default."""
        self._pipelines_by_name = {pipeline.name: pipeline for pipeline in assembly.pipelines}
        self.results: ResultStore | None = assembly.results
        """The default persistence's result store (None when a custom `persist` is plugged in)."""
        self._supervisor = supervisor = Supervisor(parts, assembly)
        self._subscriptions = Subscriptions(parts, supervisor)
        supervisor.on_state_restarted(self._subscriptions.resubscribe)
        self._handles = Handles(callers, self.cancel)
        self._submitter = Submitter(
            parts, pipelines=self._pipelines_by_name, supervisor=supervisor, assembly=assembly, handles=self._handles
        )
        self._keys = IdempotencyKeys(config.journal_path, callers)
        try:
            assembly.start_timer()
            recovered = supervisor.start()
            self._log.info(
                RUNTIME_STARTED,
                pools=assembly.pool_sizes(),
                backend=config.service_backend,
                journal=config.journal_path,
                durability=config.durability if config.journal_path else None,
                recovered=recovered,
                transitions={  # so that a log's reader can check each task against its own pipeline
                    p.name: {s.value: sorted(t.value for t in targets) for s, targets in p.transitions.items()}
                    for p in self.pipelines
                },
            )
        except BaseException:
            self._shutdown(drain=False)
            raise
        hooks.remember(self, callers)

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
        if self._callers.forked:
            return {"status": "stopped", "reason": FORKED}
        status: str
        status, reason = self._health.snapshot()
        if status != "failed" and self._callers.closed.is_set():
            status, reason = "stopped", "the runtime is closed"
        return {"status": status} if reason is None else {"status": status, "reason": reason}

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
        return self._submitter.submit(payload, task_id, traceparent, pipeline, idempotency_key)

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
        return self._submitter.submit_many(payloads, pipeline, task_ids, traceparent)

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
        self._callers.check_not_forked()
        if self._callers.closed.is_set():
            raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")
        return self._keys.find(key)

    @property
    def states(self) -> tuple[TaskState, ...]:
        """Every state of the runtime's pipelines, in lifecycle order (each once)."""
        return tuple(dict.fromkeys(state for pipeline in self.pipelines for state in pipeline.states))

    def pipeline(self, name: str | None = None) -> Pipeline:
        """The pipeline called `name` (the first one for None). Raises UnknownPipeline naming the known ones."""
        return find_pipeline(self._pipelines_by_name, name)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskRecord:
        """The task's current record. Raises TaskNotFound."""
        self._callers.refuse_blocking("Runtime.get()")
        check_lookup(task_id)
        record: TaskRecord = self._supervisor.ask("state", lambda state: ask(state, "get", task_id))
        return record

    def tasks(
        self, state: TaskState | str | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[TaskRecord]:
        """Records, oldest first; only those in `state` if given; paged by `limit` and `offset`."""
        self._callers.refuse_blocking("Runtime.tasks()")
        records: list[TaskRecord] = self._supervisor.ask(
            "state", lambda actor: ask(actor, "list", state, limit=limit, offset=offset)
        )
        return records

    def handle(self, task_id: str) -> TaskHandle:
        """A handle on any known task (one submitted earlier, or recovered). Raises TaskNotFound."""
        check_lookup(task_id)
        waiter = self._admission.waiter(task_id)
        if waiter is not None:
            return TaskHandle(self._handles, task_id, waiter)
        record = self.get(task_id)
        waiter = self._admission.waiter(task_id)  # it may have been recovered meanwhile
        if waiter is None and record.state not in TERMINAL_STATES:
            raise RuntimeStopped(f"task {task_id!r} is not terminal but not in flight either: the runtime is closed")
        return TaskHandle(self._handles, task_id, waiter, record)

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
        return MetricsCollector([MetricsSource(runtime.telemetry, runtime.stats) for runtime in runtimes])

    def stats(self) -> dict[str, Any]:
        """Counts per state, submitted, in_flight, and the fault counters (retries, timeouts, ...)."""
        self._callers.refuse_blocking("Runtime.stats()")
        supervisor = self._supervisor
        counts: dict[str, int] = supervisor.ask("state", lambda state: ask(state, "counts"))
        orchestrator: dict[str, Any] = supervisor.ask("orchestrator", lambda actor: ask(actor, "stats"))
        in_memory: int = supervisor.ask("state", lambda state: ask(state, "memory_size"))
        return {
            **counts,
            "submitted": self._admission.submitted,
            "in_flight": self._admission.in_flight,
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
        self._callers.refuse_blocking("Runtime.subscribe()")
        return self._subscriptions.subscribe(callback)

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
        self._callers.refuse_blocking("Runtime.cancel()")
        check_lookup(task_id)
        if self._callers.closed.is_set():
            raise self._admission.unavailable()

        def send(orchestrator: pykka.ActorRef[Any]) -> pykka.Future[bool]:
            reply: pykka.Future[bool] = pykka.ThreadingFuture()
            try:
                orchestrator.tell(CancelTask(task_id, reply))
            except pykka.ActorDeadError as exc:
                reply.set_exception(exc_info=(type(exc), exc, None))
            return reply

        return bool(self._supervisor.ask("orchestrator", send))

    @property
    def closed(self) -> bool:
        """True once `close()` has begun (or in a fork() child): `submit` raises RuntimeStopped."""
        return self._callers.forked or self._callers.closed.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no task is in flight. False if `timeout` elapsed first.

        Raises:
            RuntimeFailed: the runtime failed (see `health()`).
            WouldDeadlock: called inside a subscriber or a service (whose own task is in flight).
        """
        self._callers.refuse_blocking("Runtime.join()", waits_for_tasks=True)
        return self._admission.join(timeout)

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
        callers = self._callers
        if callers.forked:
            return  # the actors are the parent's; and no lock may be taken here (see hooks)
        with self._close_lock:
            first = not callers.closed.is_set()
            callers.closed.set()
        # On a thread the close would wait for (an actor's, or the supervisor's, where milestone
        # callbacks run), the close is handed to a thread of its own.
        on_our_thread = callers.on_own_thread() or self._supervisor.on_own_thread()
        if not first:
            if not on_our_thread:
                self._close_finished.wait()
            return
        hooks.forget(self)
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
            hooks.release_name(self.name)
            self._close_finished.set()

    def _stop_everything(self, *, drain: bool, timeout: float | None) -> None:
        self._callers.closed.set()
        drained = True
        if drain and self._assembly.orchestrator is not None:
            try:
                drained = self._admission.join(self.config.drain_timeout_s if timeout is None else timeout)
            except RuntimeFailed:
                drained = False
        self._keys.close()  # before the StateActor's journal: the writer, closed last, tidies the files
        self._supervisor.stop()
        abandoned = self._admission.close()
        self.telemetry.close()
        self._assembly.stop_timer()
        # Workers hung in a service call cannot be joined; they are daemons and do not block exit.
        still_running = self._threads.join(timeout=1.0)
        if self.results is not None:
            self.results.close()
        self._log.info(
            RUNTIME_STOPPED,
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
        if self._callers.forked:
            return
        if self._callers.on_own_thread():
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
