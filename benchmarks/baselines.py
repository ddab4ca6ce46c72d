"""The baselines: what a user would write instead of actorflow, run on the same work.

Every baseline makes the same three calls (`validate(payload)`,
`process(Task)`, `persist(Task, result)`) with the same functions, and keeps
the same state book-keeping: one state per task, moved CREATED → VALIDATED →
PROCESSING → COMPLETED (or FAILED), each move checked against the seed
pipeline's table. None of them has a feature beyond that: no records,
history, tracing, retries, timeouts, supervision, backpressure or journal.

* `ThreadPoolPipeline` - a `concurrent.futures.ThreadPoolExecutor` running each
  task's three calls in a row, with a lock-protected dict of states: what a
  user writes by hand.
* `ProcessPoolPipeline` - the same, with `process` sent to a
  `ProcessPoolExecutor` (the hand-written answer to CPU-bound work).
* `NaivePykkaPipeline` - actors, but an orchestrator that blocks on `ask()` at
  each stage, so it runs one task at a time.
* `BarePykkaPipeline` - the runtime's architecture with nothing else: a state
  actor, an orchestrator and three pools of worker actors, tells only, one
  message per hop, pykka's default mailboxes. The floor for this architecture.

Every baseline admits at most `concurrency` tasks in flight (a semaphore
taken in `submit()` and released when the task turns terminal, the same
closed loop the Runtime gets from `max_in_flight`), and makes its handles'
Events lazily, as the Runtime does. The pykka baselines' messages are
NamedTuples, like pykka's own: the floor should be as lean as a careful
hand-written pipeline, not slowed by our choice of message type.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, NamedTuple

import pykka

from actorflow.core.types import TERMINAL_STATES, Task, TaskState
from actorflow.services import seed_pipeline
from benchmarks.pipeline import Completion, Handle, Pipeline, PipelineFactory, Work

__all__ = [
    "BarePykkaPipeline",
    "NaivePykkaPipeline",
    "ProcessPoolPipeline",
    "ThreadPoolPipeline",
    "baseline_factory",
]

_S = TaskState
_SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline, for its table: the moves every baseline checks, as the runtime's state actor does."""
_STOP_TIMEOUT_S = 30.0


class _StateTable:
    """The book-keeping every baseline shares: a dict of states, each move checked. Not thread-safe."""

    __slots__ = ("states",)

    def __init__(self) -> None:
        self.states: dict[str, TaskState] = {}

    def create(self, task_id: str) -> None:
        if task_id in self.states:
            raise ValueError(f"task_id {task_id!r} is already taken")
        self.states[task_id] = _S.CREATED

    def move(self, task_id: str, to_state: TaskState) -> None:
        current = self.states[task_id]
        if not _SEED.is_allowed(current, to_state):
            raise ValueError(f"task {task_id!r} cannot go from {current} to {to_state}")
        self.states[task_id] = to_state


class _Loop:
    """The closed loop and completion book-keeping every baseline shares. Thread-safe.

    With `record`, it keeps each task's terminal time for the latency figures
    (left off in the memory probe, where it would count as the baseline's own memory).
    """

    def __init__(self, concurrency: int, *, record: bool = True) -> None:
        self._room = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Event()
        self._idle.set()
        self._ids = itertools.count()
        self._record = record
        self.finished: dict[str, float] = {}

    def admit(self) -> Completion:
        """Wait for room, then count a new task in flight and give it an id and a handle."""
        self._room.acquire()
        with self._lock:
            self._in_flight += 1
            self._idle.clear()
        return Completion(f"{next(self._ids):032x}")

    def finish(self, done: Completion, state: TaskState) -> None:
        """The task is terminal: stamp it, settle its handle, free its room."""
        if self._record:
            self.finished[done.task_id] = time.time()
        done.set(state.value)
        with self._lock:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        self._room.release()

    def join(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def finished_at(self, task_ids: Iterable[str]) -> dict[str, float]:
        finished = self.finished
        return {task_id: finished[task_id] for task_id in task_ids if task_id in finished}


class _LoopMixin:
    _loop: _Loop

    def join(self, timeout: float) -> bool:
        """Wait until no task is in flight."""
        return self._loop.join(timeout)

    def finished_at(self, task_ids: Iterable[str]) -> dict[str, float]:
        """When each task turned terminal."""
        return self._loop.finished_at(task_ids)


# --- ThreadPoolExecutor --------------------------------------------------------------------------


class ThreadPoolPipeline(_LoopMixin):
    """Each task's three calls in a row on a thread pool of `processor_workers` threads."""

    def __init__(self, work: Work, concurrency: int, *, name: str = "threadpool", record: bool = True) -> None:
        self.name = name
        self._work = work
        self._loop = _Loop(concurrency, record=record)
        self._lock = threading.Lock()
        self._table = _StateTable()
        self._executor = ThreadPoolExecutor(max_workers=work.processor_workers, thread_name_prefix="bench-pool")

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        """Record CREATED under the lock, then queue the task's run."""
        done = self._loop.admit()
        with self._lock:
            self._table.create(done.task_id)
        self._executor.submit(self._run, done, payload)
        return done

    def _move(self, task_id: str, to_state: TaskState) -> None:
        with self._lock:
            self._table.move(task_id, to_state)

    def _process(self, task: Task) -> Any:
        return self._work.process(task)

    def _run(self, done: Completion, payload: Mapping[str, Any]) -> None:
        work, task_id = self._work, done.task_id
        try:
            work.validate(payload)
            self._move(task_id, _S.VALIDATED)
            self._move(task_id, _S.PROCESSING)
            task = Task(task_id, payload)
            result = self._process(task)
            work.persist(task, result)
            final = _S.COMPLETED
        except Exception:
            final = _S.FAILED
        self._move(task_id, final)
        self._loop.finish(done, final)

    def close(self) -> None:
        """Finish queued tasks and join the threads."""
        self._executor.shutdown(wait=True)


def _ready() -> bool:
    return True


class ProcessPoolPipeline(ThreadPoolPipeline):
    """`ThreadPoolPipeline` with `process` run in a `ProcessPoolExecutor` of `processor_workers` processes.

    The thread pool has twice as many threads as there are processes, so that a
    process never waits while its thread does the cheap validate and persist.
    Processes are spawned (not forked: this process runs threads) and started
    before the pipeline is handed over, so start-up is not measured.
    """

    def __init__(self, work: Work, concurrency: int, *, name: str = "processpool", record: bool = True) -> None:
        super().__init__(work.with_processors(2 * work.processor_workers), concurrency, name=name, record=record)
        self._work = work
        self._processes = ProcessPoolExecutor(
            max_workers=work.processor_workers, mp_context=multiprocessing.get_context("spawn")
        )
        for future in [self._processes.submit(_ready) for _ in range(4 * work.processor_workers)]:
            future.result(timeout=60)

    def _process(self, task: Task) -> Any:
        return self._processes.submit(self._work.process, task).result()

    def close(self) -> None:
        """Finish, then stop the worker processes."""
        super().close()
        self._processes.shutdown(wait=True)


# --- messages of the pykka baselines ---------------------------------------------------------------


class _Create(NamedTuple):
    done: Completion
    payload: Mapping[str, Any]
    notify: pykka.ActorRef[Any] | None = None


class _Move(NamedTuple):
    task_id: str
    to_state: TaskState


class _Moved(NamedTuple):
    task_id: str
    to_state: TaskState


class _Created(NamedTuple):
    task_id: str
    payload: Mapping[str, Any]


class _Call(NamedTuple):
    """One service call; `reply_to` gets a `_Done` (bare), or the ask's future gets the result (naive)."""

    service: str
    task: Task
    result: Any = None
    reply_to: pykka.ActorRef[Any] | None = None


class _Done(NamedTuple):
    service: str
    task_id: str
    ok: bool
    result: Any = None


class _Start(NamedTuple):
    task_id: str
    payload: Mapping[str, Any]


def _invoke(fn: Callable[..., Any], call: _Call) -> Any:
    if call.service == "validator":
        return fn(call.task.payload)
    if call.service == "processor":
        return fn(call.task)
    return fn(call.task, call.result)


class _StateActor(pykka.ThreadingActor):
    """Owns the states; acknowledges each move to `notify` (bare) or answers the ask (naive)."""

    use_daemon_thread = True

    def __init__(self, loop: _Loop) -> None:
        super().__init__()
        self._loop = loop
        self._table = _StateTable()
        self._done: dict[str, Completion] = {}
        self._notify: pykka.ActorRef[Any] | None = None

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Move):
            self._table.move(message.task_id, message.to_state)
            if message.to_state in TERMINAL_STATES:
                self._loop.finish(self._done.pop(message.task_id), message.to_state)
            if self._notify is not None:
                # The driver may close the pipeline as soon as the last task is terminal.
                with contextlib.suppress(pykka.ActorDeadError):
                    self._notify.tell(_Moved(message.task_id, message.to_state))
            return None
        if isinstance(message, _Create):
            task_id = message.done.task_id
            self._table.create(task_id)
            self._done[task_id] = message.done
            if message.notify is not None:
                self._notify = message.notify
                message.notify.tell(_Created(task_id, message.payload))
            return None
        raise TypeError(f"unexpected message {message!r}")


class _Worker(pykka.ThreadingActor):
    """Runs one service function: replies to `reply_to` (bare) or returns the result to the ask (naive)."""

    use_daemon_thread = True

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self._fn = fn

    def on_receive(self, message: Any) -> Any:
        call: _Call = message
        if call.reply_to is None:
            return _invoke(self._fn, call)  # naive: an exception goes back to the asker
        try:
            result = _invoke(self._fn, call)
        except Exception:
            call.reply_to.tell(_Done(call.service, call.task.task_id, ok=False))
            return None
        call.reply_to.tell(_Done(call.service, call.task.task_id, ok=True, result=result))
        return None


def _start_pools(work: Work) -> dict[str, list[pykka.ActorRef[Any]]]:
    return {
        "validator": [_Worker.start(work.validate) for _ in range(work.validator_workers)],
        "processor": [_Worker.start(work.process) for _ in range(work.processor_workers)],
        "persistence": [_Worker.start(work.persist) for _ in range(work.persistence_workers)],
    }


def _stop(refs: list[pykka.ActorRef[Any]]) -> None:
    for ref in refs:
        ref.stop(block=True, timeout=_STOP_TIMEOUT_S)


# --- naive pykka: an orchestrator that blocks on ask() ------------------------------------------


class _NaiveOrchestrator(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self, state: pykka.ActorRef[Any], pools: dict[str, list[pykka.ActorRef[Any]]]) -> None:
        super().__init__()
        self._state = state
        self._next = {name: itertools.cycle(refs) for name, refs in pools.items()}

    def on_receive(self, message: Any) -> None:
        start: _Start = message
        task = Task(start.task_id, start.payload)
        state, nxt = self._state, self._next
        try:
            next(nxt["validator"]).ask(_Call("validator", task))
            state.ask(_Move(task.task_id, _S.VALIDATED))
            state.ask(_Move(task.task_id, _S.PROCESSING))
            result = next(nxt["processor"]).ask(_Call("processor", task))
            next(nxt["persistence"]).ask(_Call("persistence", task, result))
            final = _S.COMPLETED
        except Exception:
            final = _S.FAILED
        state.ask(_Move(task.task_id, final))


class NaivePykkaPipeline(_LoopMixin):
    """Actors with an orchestrator that blocks on `ask()` at every stage: one task at a time."""

    def __init__(self, work: Work, concurrency: int, *, name: str = "naive-pykka", record: bool = True) -> None:
        self.name = name
        self._loop = _Loop(concurrency, record=record)
        self._state = _StateActor.start(self._loop)
        self._pools = _start_pools(work)
        self._orchestrator = _NaiveOrchestrator.start(self._state, self._pools)

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        """Ask the state actor to create the task, then tell the orchestrator to run it."""
        done = self._loop.admit()
        self._state.ask(_Create(done, payload))
        self._orchestrator.tell(_Start(done.task_id, payload))
        return done

    def close(self) -> None:
        """Stop the orchestrator (after what it has queued), then the rest."""
        _stop([self._orchestrator])
        _stop([ref for refs in self._pools.values() for ref in refs])
        _stop([self._state])


# --- bare pykka: tells only, the same hops as the runtime ----------------------------------------


class _BareOrchestrator(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self, state: pykka.ActorRef[Any], pools: dict[str, list[pykka.ActorRef[Any]]]) -> None:
        super().__init__()
        self._state = state
        self._next = {name: itertools.cycle(refs) for name, refs in pools.items()}
        self._tasks: dict[str, Task] = {}
        self._results: dict[str, Any] = {}

    def _call(self, service: str, task: Task, result: Any = None) -> None:
        next(self._next[service]).tell(_Call(service, task, result, reply_to=self.actor_ref))

    def on_receive(self, message: Any) -> None:
        if isinstance(message, _Done):
            task_id = message.task_id
            if not message.ok:
                self._state.tell(_Move(task_id, _S.FAILED))
            elif message.service == "validator":
                self._state.tell(_Move(task_id, _S.VALIDATED))
                self._state.tell(_Move(task_id, _S.PROCESSING))
            elif message.service == "processor":
                self._results[task_id] = message.result
                self._call("persistence", self._tasks[task_id], message.result)
            else:
                self._state.tell(_Move(task_id, _S.COMPLETED))
        elif isinstance(message, _Moved):
            if message.to_state is _S.PROCESSING:
                self._call("processor", self._tasks[message.task_id])
            elif message.to_state in TERMINAL_STATES:
                self._tasks.pop(message.task_id, None)
                self._results.pop(message.task_id, None)
        elif isinstance(message, _Created):
            task = self._tasks[message.task_id] = Task(message.task_id, message.payload)
            self._call("validator", task)


class BarePykkaPipeline(_LoopMixin):
    """State actor, orchestrator, three worker pools; tells only, one message per hop, no features."""

    def __init__(self, work: Work, concurrency: int, *, name: str = "bare-pykka", record: bool = True) -> None:
        self.name = name
        self._loop = _Loop(concurrency, record=record)
        self._state = _StateActor.start(self._loop)
        self._pools = _start_pools(work)
        self._orchestrator = _BareOrchestrator.start(self._state, self._pools)

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        """Tell the state actor to create the task (no reply: as `Runtime.submit` in memory)."""
        done = self._loop.admit()
        self._state.tell(_Create(done, payload, notify=self._orchestrator))
        return done

    def close(self) -> None:
        """Stop every actor (the driver has already waited for every task)."""
        _stop([self._orchestrator])
        _stop([ref for refs in self._pools.values() for ref in refs])
        _stop([self._state])


_BASELINES: dict[str, type[ThreadPoolPipeline] | type[NaivePykkaPipeline] | type[BarePykkaPipeline]] = {
    "threadpool": ThreadPoolPipeline,
    "processpool": ProcessPoolPipeline,
    "naive-pykka": NaivePykkaPipeline,
    "bare-pykka": BarePykkaPipeline,
}


def baseline_factory(kind: str, work: Work, *, record: bool = True) -> PipelineFactory:
    """A factory of the baseline named `kind` ("threadpool", "processpool", "naive-pykka", "bare-pykka")."""
    cls = _BASELINES[kind]

    def build(concurrency: int) -> Pipeline:
        return cls(work, concurrency, name=kind, record=record)

    return build
