"""A pool of service workers, owned by the orchestrator and touched only from its thread.

The pool routes each call to the least-busy worker, keeps a few calls queued
at each worker (the rest wait in the pool, so a retired worker strands
little): how many adapts to how long calls take, since a worker whose
mailbox runs dry goes to sleep and every call to it then costs a thread
wake-up (measured: the largest cost of no-op tasks at a depth of 2). It
times the call running at the head of each worker, and replaces workers
that crash, die or hang, within a restart intensity limit as in Erlang/OTP
supervisors.

Past that limit (more than `max_restarts` restarts within `restart_window_s`)
the pool is *failing*: a circuit breaker opens. A worker that dies meanwhile is
not replaced, and calls the pool cannot give a live worker wait in it,
uncharged; once the window has passed again (the cool-down), the pool starts
workers in every empty slot and sends them what waited. Calls wait rather than
fail because every acknowledged task must reach an outcome of its own: a task
must never fail because *other* tasks crashed the workers. The calls that do
crash workers are charged an attempt each, like any failure, so a poisonous
task fails after its own `max_attempts`, alone.

One case fails calls at once instead: a worker that cannot load the stage's
function (a process worker whose function, or the main script it comes from,
fails to import). Its calls fail with the worker's own error, and while the
pool has no live worker and the last one could not load, so does every call
(`PoolCannotStart`): waiting for a function that cannot load would be a hang.

Calls routed to a worker are not sent at once: they collect per worker until
the owner calls `flush` (the orchestrator does at the end of every message it
handles), and then go as one `send_many`. The calls one message makes (the
outcomes of a committed batch, a `ServicesDone`) thus reach each worker in one
message, while a lone call still leaves as soon as its handler ends: nothing
ever waits for a batch to fill.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actorflow.actors.backends.base import (
    DEPTH_FAST,
    DEPTH_SLOW,
    Deliver,
    OnDeath,
    ServiceBackend,
    StageFn,
    WorkerHandle,
)
from actorflow.actors.messages import RunService
from actorflow.actors.timer import Timer, TimerHandle

__all__ = ["PoolCannotStart", "ServicePool"]


class PoolCannotStart(Exception):
    """The pool has no live worker and its last one could not load the stage's function; the message says why."""


@dataclass(slots=True)
class _Slot:
    worker: WorkerHandle
    calls: deque[int] = field(default_factory=deque)
    """Call ids sent to this worker, in the order it runs them; the head is running."""
    deadline: TimerHandle | None = None
    listed_idle: bool = False
    """On the pool's idle stack (it may have been given a call since: checked when popped)."""
    gone: bool = False
    """Removed from the pool (it turned failing, or closed)."""
    outgoing: list[RunService] = field(default_factory=list)
    """Calls routed here (already in `calls`) and not yet sent: `flush` sends them in one message."""


class ServicePool:
    """N workers of one service. Not thread-safe: only the orchestrator's thread uses it."""

    def __init__(
        self,
        service: str,
        size: int,
        *,
        backend: ServiceBackend,
        fn: StageFn,
        deliver: Deliver,
        on_death: OnDeath,
        timer: Timer,
        on_deadline: Callable[[int], None],
        stage_timeout_s: float | None,
        max_restarts: int,
        restart_window_s: float,
        on_cool_down: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start `size` workers on `backend`.

        `on_cool_down` is told (on the timer's thread) when a failing pool's
        cool-down has passed; its owner then calls `reopen` on its own thread.
        """
        self.service = service
        self.size = size
        self._backend = backend
        self._fn = fn
        self._deliver = deliver
        self._on_death = on_death
        self._timer = timer
        self._on_deadline = on_deadline
        self.timeout_s = stage_timeout_s
        """The stage timeout of this pool's calls (None for no limit)."""
        self._max_restarts = max_restarts
        self.window_s = restart_window_s
        """The restart window, which is also a failing pool's cool-down."""
        self._on_cool_down = on_cool_down
        self._cool_down: TimerHandle | None = None
        self._max_depth = backend.max_queue_depth
        """Process and Ray workers cap it: their pipes and object stores should not hold many calls."""
        self._min_depth = backend.min_queue_depth
        """Process and Ray workers raise it: a worker whose next call is already on its way never idles for a
        round trip."""
        self._capacity = self._min_depth
        self._fast_ms = backend.fast_call_ms
        """Calls shorter than this are fast: Ray's is its round trip's order, far above a thread's wake-up."""
        self._recent: deque[bool] = deque(maxlen=_DEPTH_WINDOW)
        """Whether each of the last calls was slow (took `_fast_ms` or more): they set the depth per worker."""
        self._slow_recent = 0
        """How many of `_recent` are slow (kept as they come and go, not counted per call)."""
        self._clock = clock
        self._generation = 0
        self._slots: list[_Slot] = []
        self._by_name: dict[str, _Slot] = {}
        self._calls: dict[int, RunService] = {}
        self._where: dict[int, _Slot] = {}
        self._waiting: deque[RunService] = deque()
        self._restart_times: deque[float] = deque()
        self._idle: list[_Slot] = []
        """Slots with no call, so that routing need not scan every slot (a pool of 1000 async slots)."""
        self._unsent: list[_Slot] = []
        """Slots with calls in `outgoing`, in the order they got their first."""
        self.restarts = 0
        self.failing: str | None = None
        """Why the pool's circuit breaker is open (it restarted workers too often), until its cool-down ends."""
        self.cannot_load: str | None = None
        """Why the last worker retired could not load the function (None if it could, or a call was answered since)."""
        self._closed = False
        for _ in range(size):
            slot = _Slot(self._start_worker())
            self._slots.append(slot)
            self._by_name[slot.worker.name] = slot
        for slot in reversed(self._slots):
            self._mark_idle(slot)

    # --- routing ---------------------------------------------------------------------------------

    def dispatch(self, call: RunService) -> None:
        """Send a call to the least-busy worker, or hold it until one has room (or the pool has a worker again).

        Raises:
            PoolCannotStart: no worker is live and the last one could not load the function.
        """
        if not self._slots and self.cannot_load is not None:
            raise PoolCannotStart(self.cannot_load)
        self._calls[call.call_id] = call
        slot = self._idle_slot() or min(self._slots, key=_load, default=None)
        if slot is None or len(slot.calls) >= self._capacity:
            self._waiting.append(call)
            return
        self._send(slot, call)

    def finished(self, call_id: int, duration_ms: float = 0.0) -> RunService | None:
        """A worker reported `call_id`: forget it and start the next. None if the call is not ours (late)."""
        slot = self._where.pop(call_id, None)
        call = self._calls.pop(call_id, None)
        if slot is None or call is None:
            return None
        self._learn(duration_ms)  # only calls that really ran here teach the depth
        self.cannot_load = None  # a worker answered: the function loads
        self._release(slot, call_id)
        return call

    def _release(self, slot: _Slot, call_id: int) -> None:
        """`call_id` left `slot` (answered or withdrawn): start the slot's next call and refill from the wait."""
        was_head = bool(slot.calls) and slot.calls[0] == call_id
        slot.calls.remove(call_id)
        if not slot.calls:
            self._mark_idle(slot)
        if was_head:
            self._start_head(slot)
        self._feed()

    def _learn(self, duration_ms: float) -> None:
        # Deep queues only while every recent call was fast: a call queued behind a slow one waits
        # even if another worker is idle (head-of-line blocking), so one slow call turns it off.
        recent = self._recent
        slow = duration_ms >= self._fast_ms
        if len(recent) == _DEPTH_WINDOW and recent[0]:
            self._slow_recent -= 1  # the oldest leaves the window
        recent.append(slow)
        self._slow_recent += slow
        uniform_fast = len(recent) == _DEPTH_WINDOW and not self._slow_recent
        self._capacity = max(self._min_depth, min(DEPTH_FAST if uniform_fast else DEPTH_SLOW, self._max_depth))

    def running(self, call_id: int) -> bool:
        """True if `call_id` is the call its worker is running now."""
        slot = self._where.get(call_id)
        return slot is not None and bool(slot.calls) and slot.calls[0] == call_id

    def answered(self, call_id: int) -> bool:
        """True if the worker has finished `call_id` and held its report back with a batch's (it is sent now).

        A stage deadline that fires then is no timeout: the report is on its way, and the next
        call's deadline is armed when it arrives. Only thread workers hold reports this way.
        """
        slot = self._where.get(call_id)
        return slot is not None and slot.worker.release_result(call_id)

    def surely_running(self, call_id: int) -> bool:
        """True if `call_id` is running and its worker can tell it apart from the calls queued with it.

        A Ray worker running a batch cannot: its calls' reports come back
        together, so a hang in the batch is not known to be the head's.
        """
        return self.running(call_id) and self._where[call_id].worker.vouches_running(call_id)

    def withdraw(self, call_id: int) -> bool:
        """Take back a call no worker has started. True if it will never run.

        A call still waiting in the pool is simply dropped. A call already sent
        to a worker is taken back if the worker has not started it: the worker
        and this method race for it through `WorkerHandle.withdraw`, and
        exactly one wins. A call that is running (or a worker that cannot take
        calls back: processes, Ray) gives False.
        """
        for index, call in enumerate(self._waiting):
            if call.call_id == call_id:
                del self._waiting[index]
                self._calls.pop(call_id, None)
                return True
        slot = self._where.get(call_id)
        if slot is None or not (_take_unsent(slot, call_id) or slot.worker.withdraw(call_id)):
            return False
        del self._where[call_id]
        self._calls.pop(call_id, None)
        self._release(slot, call_id)
        return True

    def cancel_running(self, call_id: int) -> bool:
        """Ask the worker running `call_id` to cancel it, if its backend can (an event loop can; a thread cannot).

        The worker still reports the call, so its slot is freed as for any other call.
        """
        slot = self._where.get(call_id)
        return slot is not None and slot.worker.cancel(call_id)

    def worker_of(self, call_id: int) -> str:
        """The name of the worker holding `call_id` ("" if none)."""
        slot = self._where.get(call_id)
        return slot.worker.name if slot is not None else ""

    def has_worker(self, name: str) -> bool:
        """True if `name` is one of this pool's current workers."""
        return name in self._by_name

    # --- supervision -----------------------------------------------------------------------------

    def replace(self, worker_name: str, *, cannot_load: str | None = None) -> list[RunService] | None:
        """Retire a worker and start a fresh one in its place (unless the pool is failing).

        Returns the calls the old worker held, head (the one it was running)
        first, for the caller to re-run; None if the worker is not (or no
        longer) in this pool. `cannot_load` says the worker could not load
        the function, and why: then, once no worker is left, the calls
        waiting in the pool are returned too (nothing here can run them).

        When the restart intensity is exceeded the pool turns failing: its
        circuit breaker opens, the slot stays empty, and so does every slot
        whose worker dies until the cool-down (`restart_window_s`) has passed
        and the owner calls `reopen`.
        """
        slot = self._by_name.pop(worker_name, None)
        if slot is None:
            return None
        slot.worker.retire()
        if slot.deadline is not None:
            slot.deadline.cancel()
            slot.deadline = None
        stranded = [self._calls.pop(call_id) for call_id in slot.calls if call_id in self._calls]
        for call_id in slot.calls:
            self._where.pop(call_id, None)
        slot.calls.clear()
        slot.outgoing.clear()  # never sent to the old worker: they are among the stranded
        self.restarts += 1
        self.cannot_load = cannot_load  # the latest death says whether the function loads
        if self.failing is None:
            now = self._clock()
            self._restart_times.append(now)
            while self._restart_times and now - self._restart_times[0] > self.window_s:
                self._restart_times.popleft()
            if len(self._restart_times) > self._max_restarts:
                self._open_breaker()
        if self.failing is not None:
            self._slots.remove(slot)
            slot.gone = True
            if not self._slots and self.cannot_load is not None:
                stranded.extend(self.drain_waiting())
            return stranded
        slot.worker = self._start_worker()
        self._by_name[slot.worker.name] = slot
        self._mark_idle(slot)
        self._feed()
        return stranded

    def _open_breaker(self) -> None:
        self.failing = (
            f"pool {self.service!r} is failing: {len(self._restart_times)} worker restarts within "
            f"{self.window_s:g}s (max_restarts={self._max_restarts}); its calls wait for the cool-down of "
            f"{self.window_s:g}s"
        )
        if self.cannot_load is not None:
            self.failing += f"; the last worker could not start: {self.cannot_load}"
        if self._on_cool_down is not None:
            self._cool_down = self._timer.call_later(self.window_s, self._on_cool_down)

    def reopen(self) -> bool:
        """End a failing pool's cool-down: start a worker in every empty slot and send them what waited.

        False if the pool was not failing (or is closed). Restarts before the
        cool-down no longer count against `max_restarts`.
        """
        self._cool_down = None
        if self.failing is None or self._closed:
            return False
        self.failing = None
        self._restart_times.clear()
        while len(self._slots) < self.size:
            slot = _Slot(self._start_worker())
            self._slots.append(slot)
            self._by_name[slot.worker.name] = slot
            self._mark_idle(slot)
        self._feed()
        return True

    def drain_waiting(self) -> list[RunService]:
        """Take back every call not yet sent to a worker (when no worker is left that could run them)."""
        calls = list(self._waiting)
        self._waiting.clear()
        for call in calls:
            self._calls.pop(call.call_id, None)
        return calls

    def close(self, timeout: float) -> list[str]:
        """Retire every worker; wait up to `timeout` for the idle ones. Returns the names left busy.

        A worker still inside a service call cannot be stopped (threads cannot
        be killed); it is abandoned as a daemon and its result, if any, becomes
        a dead letter.
        """
        self._closed = True
        if self._cool_down is not None:
            self._cool_down.cancel()
            self._cool_down = None
        for slot in self._slots:
            slot.worker.retire()
            if slot.deadline is not None:
                slot.deadline.cancel()
        deadline = self._clock() + timeout
        busy = [slot.worker.name for slot in self._slots if slot.calls]
        for slot in self._slots:
            if not slot.calls:
                slot.worker.join(max(0.0, deadline - self._clock()))
        for slot in self._slots:
            slot.gone = True
            slot.outgoing.clear()
        self._unsent.clear()
        self._slots.clear()
        self._by_name.clear()
        self._idle.clear()
        return busy

    def stats(self) -> dict[str, Any]:
        """Size, live workers, calls running or queued, restarts, and why the pool is failing (None if it is not)."""
        return {
            "size": self.size,
            "workers": len(self._slots),
            "busy": sum(1 for slot in self._slots if slot.calls),
            "queued": len(self._waiting) + sum(max(0, len(slot.calls) - 1) for slot in self._slots),
            "restarts": self.restarts,
            "failing": self.failing,
            "depth": self._capacity,
        }

    # --- internals -------------------------------------------------------------------------------

    def _start_worker(self) -> WorkerHandle:
        self._generation += 1  # a replacement gets a new name, so late reports from the old one stay apart
        name = f"{self.service}-{self._generation}"
        return self._backend.start_worker(name, self.service, self._fn, self._deliver, self._on_death)

    @property
    def unsent(self) -> bool:
        """True if calls are waiting for `flush`."""
        return bool(self._unsent)

    def flush(self) -> None:
        """Send each worker the calls routed to it since the last flush, in one message per worker."""
        unsent, self._unsent = self._unsent, []
        for slot in unsent:
            calls, slot.outgoing = slot.outgoing, []
            if not calls or slot.gone:
                continue
            why = "dead when sent a call"
            try:
                sent = slot.worker.send(calls[0]) if len(calls) == 1 else slot.worker.send_many(calls)
            except Exception as exc:  # noqa: BLE001 - the calls are the pool's: replacing the worker re-sends them
                sent, why = False, f"failed to take calls: {type(exc).__name__}: {exc}"
            if not sent:
                self._on_death(slot.worker.name, why)

    def _send(self, slot: _Slot, call: RunService) -> None:
        slot.calls.append(call.call_id)
        self._where[call.call_id] = slot
        if len(slot.calls) == 1:
            self._start_head(slot)
        if not slot.outgoing:
            self._unsent.append(slot)
        slot.outgoing.append(call)

    def _start_head(self, slot: _Slot) -> None:
        """The head call of a worker starts now: arm its stage deadline."""
        if slot.deadline is not None:
            slot.deadline.cancel()
            slot.deadline = None
        if self.timeout_s is None or not slot.calls:
            return
        call_id = slot.calls[0]
        slot.deadline = self._timer.call_later(self.timeout_s, lambda: self._on_deadline(call_id))

    def _mark_idle(self, slot: _Slot) -> None:
        if not slot.listed_idle and not slot.gone:
            slot.listed_idle = True
            self._idle.append(slot)

    def _idle_slot(self) -> _Slot | None:
        """A slot with no call (the least busy there can be), or None; stale entries are dropped."""
        idle = self._idle
        while idle:
            slot = idle.pop()
            slot.listed_idle = False
            if not slot.calls and not slot.gone:
                return slot
        return None

    def _feed(self) -> None:
        while self._waiting:
            slot = self._idle_slot() or min(self._slots, key=_load, default=None)
            if slot is None or len(slot.calls) >= self._capacity:
                return
            self._send(slot, self._waiting.popleft())


_DEPTH_WINDOW = 32
"""How many recent calls decide whether a pool's calls are uniformly fast (`DEPTH_FAST`) or not (`DEPTH_SLOW`)."""


def _take_unsent(slot: _Slot, call_id: int) -> bool:
    """Take a call back from the slot's unsent calls. True if it was there (the worker never saw it)."""
    for index, call in enumerate(slot.outgoing):
        if call.call_id == call_id:
            del slot.outgoing[index]
            return True
    return False


def _load(slot: _Slot) -> int:
    return len(slot.calls)
