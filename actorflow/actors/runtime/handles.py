"""What a caller holds for a submitted task: a `TaskHandle`, settled through the task's `Waiter`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator
from typing import Any

from actorflow.actors.runtime.callers import Callers, bounded_wait
from actorflow.core.errors import RuntimeFailed, RuntimeStopped, TaskTimeout
from actorflow.core.types import TaskRecord

__all__ = ["Handles", "TaskHandle", "Waiter"]

_ABANDONED = (
    "the runtime closed before task {task_id!r} finished; with a journal it resumes when a runtime "
    "is opened on it again"
)


class Waiter:
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
        with Waiter._lock:
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
        """Call `callback` with the record (None if abandoned) once settled: at once if it is."""
        with Waiter._lock:
            if self.record is None and not self.abandoned:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
            record = self.record
        callback(record)

    def remove_callback(self, callback: Callable[[TaskRecord | None], None]) -> None:
        """Forget a callback whose waiter gave up (a timed-out `await`); nothing if it already ran."""
        with Waiter._lock:
            if self._callbacks is not None and callback in self._callbacks:
                self._callbacks.remove(callback)

    def wait(self, timeout: float | None) -> bool:
        """Block until settled; False if `timeout` seconds passed first."""
        with Waiter._lock:
            if self.record is not None or self.abandoned:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(bounded_wait(timeout))


class Handles:
    """What every handle of one runtime asks of it: the caller checks, and cancelling a task."""

    __slots__ = ("callers", "cancel")

    def __init__(self, callers: Callers, cancel: Callable[[str], bool]) -> None:
        self.callers = callers
        self.cancel = cancel
        """`Runtime.cancel`."""


class TaskHandle:
    """A submitted task: wait for it (`result()`, or `await handle`), or cancel it."""

    __slots__ = ("_handles", "_waiter", "task_id")

    def __init__(self, handles: Handles, task_id: str, waiter: Waiter | None, record: TaskRecord | None = None) -> None:
        self._handles = handles
        self.task_id = task_id
        if waiter is None:
            waiter = Waiter()
            if record is not None:
                waiter.set(record)
        self._waiter = waiter

    def done(self) -> bool:
        """True once the task is terminal (COMPLETED, FAILED or CANCELLED)."""
        return self._waiter.record is not None

    def result(self, timeout: float | None = None) -> TaskRecord:
        """Block until the task is terminal and return its record.

        Raises:
            TaskTimeout: `timeout` seconds passed first (also a `TimeoutError`); the task runs on.
            WouldDeadlock: called inside a subscriber or a service before the task is terminal;
                wait on another thread instead (or `await handle` in asyncio).
            RuntimeStopped: the runtime closed before the task finished.
            RuntimeFailed: the runtime failed before the task finished.
        """
        if self._waiter.record is None:
            self._handles.callers.refuse_blocking("TaskHandle.result()", waits_for_tasks=True)
        if not self._waiter.wait(timeout):
            raise TaskTimeout(
                f"task {self.task_id!r} is not terminal after {timeout}s; it runs on: call result() again to wait more",
                task_id=self.task_id,
                timeout=timeout,
            )
        if self._waiter.record is None:
            if self._waiter.failure is not None:
                raise self._waiter.failure
            raise RuntimeStopped(_ABANDONED.format(task_id=self.task_id))
        return self._waiter.record

    def cancel(self) -> bool:
        """Cancel the task at whatever stage it is; see `Runtime.cancel` (True once CANCELLED, idempotent)."""
        return self._handles.cancel(self.task_id)

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

        if self._waiter.record is None:  # inside an async stage
            self._handles.callers.refuse_blocking("await TaskHandle", waits_for_tasks=True)
        self._waiter.add_callback(on_done)
        try:
            return (yield from future.__await__())
        finally:  # cancelled (a timeout): the callback would otherwise stay until the task ends, one per wait
            self._waiter.remove_callback(on_done)

    def __repr__(self) -> str:
        state = self._waiter.record.state.value if self._waiter.record else "in flight"
        return f"<TaskHandle {self.task_id} {state}>"
