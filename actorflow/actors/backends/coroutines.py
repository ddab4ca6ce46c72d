"""The async backend ("async"): ``async def`` stages run as coroutines on one event-loop thread.

A thread per call would cost a stack and a context switch per call in flight;
an I/O-bound stage that awaits (HTTP, a database, a sleep) instead runs as many
coroutines as its `workers` allow on a single loop::

    pool ─ send_many(calls) ─ call_soon_threadsafe ─► loop thread: create_task(run(call)) per call
         ─► deliver(ServiceDone), or ServicesDone for the calls that finished in the same loop iteration

Each worker of a pool is a slot on the loop that runs one coroutine at a time,
so a stage's `workers` is the number of its calls in flight. The rules match
the thread workers':

* the call's trace fields are bound (structlog contextvars) in the context the
  coroutine's task is created in, so the coroutine's own logging sees them;
* a timeout retires the worker, which cancels its coroutine (`Task.cancel`);
* cancelling a task cancels its running coroutine (`cancel`), which then
  reports ``permanent`` with ``CancelledError`` (a report the orchestrator
  discards, but that frees the worker's slot);
* a coroutine that ignores its cancellation cannot be stopped: after
  `cancel_grace_s` it is abandoned (logged as ``async.call_abandoned``; it
  runs on, and whatever it returns is dropped). A cancelled task's call is
  then reported as cancelled, freeing its slot; a timed-out call was already
  retried. `close()` waits for such coroutines only `cancel_grace_s`;
* a coroutine raising `CancelledError` of its own (not cancelled by us:
  its task has no cancellation pending) fails its call ``permanent``, with
  its message, as an `Exception` would: it is the coroutine's failure, not a
  broken loop;
* a coroutine raising any other `BaseException` that is not an `Exception`
  is ``crashed``: the worker stops taking calls and the pool replaces it.

The loop's thread has a role of its own in the runtime's `ThreadBook`
(``"loop"``): a blocking call of the runtime made there would stall every
coroutine of the loop, and waiting there for a task (``handle.result()``,
``await handle``) would deadlock when that task needs the loop's stages, so
the runtime refuses them at once with `WouldDeadlock`, saying what to do instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import structlog

from actorflow.actors.backends.base import BackendDefaults, Deliver, OnDeath, StageFn, WorkerDefaults, WorkerHandle
from actorflow.actors.backends.toolkit import call_fields, deliver_reports, report, report_failure, stage_value
from actorflow.actors.messages import RunService, ServiceDone
from actorflow.actors.threads import ThreadBook
from actorflow.core.events import ASYNC_CALL_ABANDONED, ASYNC_CALLS_ABANDONED, ASYNC_LOOP_ERROR
from actorflow.core.failures import describe_error
from actorflow.core.tracing import get_event_logger
from actorflow.core.types import JSONValue, Task, freeze

__all__ = ["CANCEL_GRACE_S", "AsyncBackend"]

_numbers = itertools.count(1)

CANCEL_GRACE_S = 1.0
"""How long a cancelled coroutine may take to end before it is abandoned (and `close()` stops waiting for it)."""

CoroutineFn = Callable[[Task, JSONValue], Awaitable[object]]
"""An ``async def`` stage function: the only kind a `Stage` lets reach this backend."""


class AsyncBackend(BackendDefaults):
    """Workers are slots on one event loop, run by one daemon thread (``actorflow-loop-N``).

    Args:
        threads: the runtime's thread book; the loop's thread is written down in it, as a ``"loop"``.
        cancel_grace_s: how long a cancelled coroutine may take to end before it is abandoned.
    """

    name = "async"

    max_queue_depth = 1
    """One call per slot: `workers` slots are `workers` calls in flight."""

    def __init__(self, threads: ThreadBook | None = None, *, cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        self.cancel_grace_s = cancel_grace_s
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        started = threading.Event()
        self._threads = threads
        self._lock = threading.Lock()
        self._arrived: deque[tuple[_AsyncWorker, RunService]] = deque()
        """Calls sent since the loop last took them; one wake-up takes them all."""
        self._wake_scheduled = False
        self._finished: dict[Deliver, list[ServiceDone]] = {}
        """Reports of this loop iteration, per pool (only touched on the loop's thread)."""
        self._log = get_event_logger("async-backend")
        self.thread = threading.Thread(
            target=self._run, args=(started,), name=f"actorflow-loop-{next(_numbers)}", daemon=True
        )
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        if self._threads is not None:
            self._threads.record_current("loop")  # so that Runtime.close() joins it, and refuses to block it
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                # Bounded: a coroutine that ignores its cancellation must not hold the runtime's close forever.
                _, stuck = self.loop.run_until_complete(asyncio.wait(pending, timeout=self.cancel_grace_s))
                if stuck:
                    self._log.warning(ASYNC_CALLS_ABANDONED, calls=len(stuck), grace_s=self.cancel_grace_s)
            self.loop.close()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Our loop's errors go to our log, not to the host's ``asyncio`` logger (e.g. an abandoned task destroyed)."""
        error = context.get("exception")
        self._log.warning(
            ASYNC_LOOP_ERROR,
            message=context.get("message", ""),
            error_type=type(error).__name__ if error is not None else None,
            error=describe_error(error) if error is not None else None,
        )

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        """A slot on the loop: nothing starts until a call is sent."""
        # A Stage refuses "async" for a function that is not `async def`, so `fn` returns an awaitable.
        return _AsyncWorker(name, cast(CoroutineFn, fn), deliver, self)

    def schedule(self, worker: _AsyncWorker, calls: Sequence[RunService]) -> bool:
        """Hand calls to the loop (from any thread). One self-pipe write per burst, not per call."""
        with self._lock:
            self._arrived.extend((worker, call) for call in calls)
            if self._wake_scheduled:
                return True
            self._wake_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._take_arrived)
        except RuntimeError:  # the loop is closed: the runtime is stopping
            return False
        return True

    def _take_arrived(self) -> None:
        with self._lock:
            self._wake_scheduled = False
            arrived, self._arrived = self._arrived, deque()
        for worker, call in arrived:
            worker.start(call)

    def deliver_soon(self, deliver: Deliver, done: ServiceDone) -> None:
        """Deliver a report at the end of this loop iteration, with the others finished in it (on the loop's thread).

        Coroutines that finish in the same iteration (a burst of timers, a
        gather) report in one message per pool, one wake-up of the orchestrator;
        a lone report goes as itself, one iteration later: microseconds.
        """
        pending = self._finished.get(deliver)
        if pending is not None:
            pending.append(done)
            return
        if not self._finished:
            self.loop.call_soon(self._deliver_finished)
        self._finished[deliver] = [done]

    def _deliver_finished(self) -> None:
        finished, self._finished = self._finished, {}
        for deliver, dones in finished.items():
            deliver_reports(deliver, dones)

    def close(self) -> None:
        """Cancel what still runs and stop the loop's thread."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed meanwhile
            return
        self.thread.join(5.0)


class _AsyncWorker(WorkerDefaults):
    """One slot of a pool on the loop. `send`, `retire` and `cancel` are called from the orchestrator's thread.

    It holds no report back (`release_result`) and runs one call at a time (`vouches_running`).
    """

    __slots__ = ("_abandoned", "_backend", "_deliver", "_fn", "_log", "_loop", "_retired", "_running", "name")

    def __init__(self, name: str, fn: CoroutineFn, deliver: Deliver, backend: AsyncBackend) -> None:
        self.name = name
        self._fn = fn
        self._deliver = deliver
        self._backend = backend
        self._loop = backend.loop
        self._retired = False
        self._running: dict[int, tuple[asyncio.Task[None], RunService]] = {}
        """Each running call's task, and the call (only touched on the loop's thread)."""
        self._abandoned: set[int] = set()
        """Calls whose coroutine ignored its cancellation past the grace: it runs on, unreported (loop's thread)."""
        self._log = get_event_logger(name)

    def send(self, call: RunService) -> bool:
        if self._retired:
            return False
        return self._backend.schedule(self, (call,))

    def send_many(self, calls: Sequence[RunService]) -> bool:
        """Queue several calls, in order, with one wake-up of the loop."""
        if self._retired:
            return False
        return self._backend.schedule(self, calls)

    def retire(self) -> None:
        self._retired = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._cancel_all)

    def join(self, timeout: float) -> bool:
        return True  # a slot has no thread of its own

    def withdraw(self, call_id: int) -> bool:
        return False  # a call sent to a slot starts at once; a running one is cancelled instead (`cancel`)

    def cancel(self, call_id: int) -> bool:
        """Cancel the coroutine of `call_id` if it is running (it still reports, as a CancelledError). True."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._cancel, call_id)
        return True

    # --- on the loop's thread --------------------------------------------------------------------

    def start(self, call: RunService) -> None:
        """Start the call's coroutine (on the loop's thread)."""
        if self._retired:
            return  # the pool took this call back when it retired us
        fields = call_fields(call, self.name)
        context = contextvars.copy_context()
        # The trace reaches the coroutine: its task runs in this context, with the call's fields bound.
        context.run(structlog.contextvars.bind_contextvars, **fields)
        task = self._loop.create_task(self._run(call, fields), context=context)
        self._running[call.call_id] = (task, call)

    def _cancel(self, call_id: int) -> None:
        running = self._running.get(call_id)
        if running is not None:
            self._cancel_task(call_id, running[0])

    def _cancel_all(self) -> None:
        for call_id, (task, _) in list(self._running.items()):
            self._cancel_task(call_id, task)

    def _cancel_task(self, call_id: int, task: asyncio.Task[None]) -> None:
        task.cancel()
        self._loop.call_later(self._backend.cancel_grace_s, self._abandon, call_id, task)

    def _abandon(self, call_id: int, task: asyncio.Task[None]) -> None:
        """The grace after a cancel has passed: a coroutine still running ignored it, and is left to itself.

        Its slot is freed: a retired worker's pool has moved on already; a
        live worker reports the call as cancelled, so that its pool can give
        the slot another call. What the coroutine returns later is dropped.
        """
        running = self._running.get(call_id)
        if task.done() or running is None or running[0] is not task:
            return
        del self._running[call_id]
        self._abandoned.add(call_id)
        grace = self._backend.cancel_grace_s
        call = running[1]
        self._log.warning(ASYNC_CALL_ABANDONED, **call_fields(call, self.name), grace_s=grace, retired=self._retired)
        if self._retired:
            return
        why = f"the call was cancelled, and its coroutine ignored the cancellation for {grace:g}s: abandoned"
        done = report_failure(self._log, call, self.name, "", "permanent", "CancelledError", why, grace * 1000)
        self._backend.deliver_soon(self._deliver, done)

    async def _run(self, call: RunService, fields: dict[str, Any]) -> None:
        log = self._log
        verbose = log.enabled("debug")
        started_at = time.time()
        started = time.perf_counter()
        result: JSONValue = None
        error: BaseException | None = None
        cancelled = own_cancellation = False
        try:
            returned = await self._fn(call.task, stage_value(call))
            if returned is not None:
                result = freeze(
                    returned, where=f"the value returned by stage {call.service!r}", max_bytes=call.max_value_bytes
                )
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                cancelled = True  # ours: a timeout, a cancelled task, or the runtime stopping
            else:
                error, own_cancellation = exc, True  # the coroutine's own: a failure of its call, with its message
        except BaseException as exc:  # noqa: BLE001 - classified by `report`; SystemExit & co. are contained here
            error = exc
        finally:
            running = self._running.get(call.call_id)
            if running is not None and running[0] is asyncio.current_task():
                del self._running[call.call_id]
        if call.call_id in self._abandoned:
            self._abandoned.discard(call.call_id)
            return  # reported (or retried) when it was abandoned
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        if cancelled:
            done = report_failure(
                log, call, self.name, "", "permanent", "CancelledError", "the call was cancelled", duration_ms
            )
        else:
            done = report(
                log,
                call,
                self.name,
                "",
                result,
                error,
                duration_ms,
                started_at=started_at,
                fields=fields if verbose else None,
                status="permanent" if own_cancellation else None,
            )
        if done.status == "crashed":
            self._retired = True  # calls queued behind this one go back to the pool, as on a thread worker
        if self._retired and done.status != "crashed":
            return  # retired (timed out, or the runtime is stopping): the pool re-sent or forgot this call
        self._backend.deliver_soon(self._deliver, done)
