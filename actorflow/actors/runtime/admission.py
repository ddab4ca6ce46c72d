"""Admission: the tasks in flight (submitted or recovered, not yet terminal), and backpressure on them."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from actorflow.actors.runtime.callers import bounded_wait
from actorflow.actors.runtime.handles import Waiter
from actorflow.core.errors import InvalidPayload, Overloaded, RuntimeFailed, RuntimeStopped
from actorflow.core.types import TaskRecord

__all__ = ["Admission"]


class Admission:
    """Tasks in flight, each with its waiter, under an optional bound (`RuntimeConfig.max_in_flight`).

    Two conditions on one lock: `_room` wakes one submitter per freed slot,
    `_idle` wakes `join()` only when nothing is left, so a finishing task
    never wakes threads that cannot proceed.
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._waiters: dict[str, Waiter] = {}
        self._reserved = 0
        self._batches_waiting = 0
        """Batches waiting for room for several tasks: while any waits, a freed slot wakes every waiter."""
        self.submitted = 0
        """Tasks submitted (recovered ones are not)."""
        self.failure: RuntimeFailed | None = None
        """Set when the runtime failed for good: what every waiter, `join()` and later submission get."""

    @property
    def in_flight(self) -> int:
        """Tasks tracked, and room claimed by submissions on their way."""
        return len(self._waiters) + self._reserved

    def unavailable(self) -> RuntimeFailed | RuntimeStopped:
        """What a caller of a runtime that takes no more work is told: its failure, or that it is closed."""
        if self.failure is not None:
            return self.failure
        return RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")

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

    def track(self, task_id: str, *, reserved: bool) -> Waiter:
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
                waiter = self._waiters[task_id] = Waiter()
            return waiter

    def track_many(self, task_ids: Sequence[str]) -> list[Waiter]:
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
            made = [Waiter() for _ in task_ids]
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

    def waiter(self, task_id: str) -> Waiter | None:
        """The waiter of a task in flight; None if it is not."""
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
                lambda: self.failure is not None or (not self._waiters and not self._reserved), bounded_wait(timeout)
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
