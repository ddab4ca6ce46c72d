"""A timer thread: delivers callbacks at a time, so no actor ever sleeps in a handler.

pykka has no timers (its issue #53). Retries' backoff and stage deadlines are
scheduled here; the callback is a `tell`, which never blocks.

Most deadlines are cancelled (the call finished in time) long before they fall
due, so cancelled entries are pruned from the heap once they are more than half
of it: the heap stays within twice the live entries (plus `_PRUNE_AT`), however
many calls a long-running runtime makes.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Timer", "TimerHandle"]

_PRUNE_AT = 64
"""Cancelled entries the heap may hold before it is worth rebuilding (a rebuild is O(n))."""
_LONGEST_WAIT_S = 3600.0
"""The longest single wait of the thread: a due time further away is waited for in steps (no overflow)."""


class TimerHandle:
    """A scheduled callback; `cancel()` makes sure it does not run."""

    __slots__ = ("_timer", "cancelled")

    def __init__(self, timer: Timer | None = None) -> None:
        self.cancelled = False
        self._timer = timer
        """The timer whose heap holds this entry, uncounted as cancelled; None once popped or counted."""

    def cancel(self) -> None:
        """Do not run the callback (a no-op if it already ran)."""
        self.cancelled = True
        timer = self._timer
        if timer is not None:
            timer._forget(self)


class Timer:
    """One daemon thread running callbacks at their due time, in due order.

    Callbacks must be quick and must not raise (they should only `tell`);
    an exception is swallowed after being reported to `on_error`.
    """

    def __init__(
        self,
        *,
        name: str = "actorflow-timer",
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_error = on_error
        self._heap: list[tuple[float, int, TimerHandle, Callable[[], None]]] = []
        self._cancelled = 0
        """How many entries in the heap are cancelled (pruned once they are the majority)."""
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` on the timer thread after `delay_s` seconds."""
        handle = TimerHandle(self)
        with self._wakeup:
            entry = (self._clock() + max(0.0, delay_s), next(self._order), handle, callback)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wakeup.notify()
        return handle

    def wake(self) -> None:
        """Read the clock again now: for an injected clock that jumps (as a test's does)."""
        with self._wakeup:
            self._wakeup.notify()

    def __len__(self) -> int:
        """How many entries the heap holds, cancelled ones not yet pruned included."""
        return len(self._heap)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread; callbacks not yet due never run."""
        with self._wakeup:
            self._stopped = True
            for _, _, handle, _ in self._heap:
                handle._timer = None
            self._heap.clear()
            self._cancelled = 0
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                due = self._next_due()
            except Exception as exc:  # noqa: BLE001 - nothing may end the thread: every later deadline depends on it
                # Never expected (a clock that raises, say): report it, and try again after a pause that grows.
                failures += 1
                self._report(exc)
                with self._wakeup:
                    self._wakeup.wait(min(1.0, 0.01 * 2**failures))
                continue
            failures = 0
            if due is None:
                return
            handle, callback = due
            if handle.cancelled:
                continue
            try:
                callback()
            except BaseException as exc:  # noqa: BLE001 - the timer thread must survive any callback
                self._report(exc)

    def _next_due(self) -> tuple[TimerHandle, Callable[[], None]] | None:
        """Wait for the first entry to fall due and pop it; None once stopped."""
        with self._wakeup:
            while not self._stopped and (not self._heap or self._heap[0][0] > self._clock()):
                wait = None if not self._heap else self._heap[0][0] - self._clock()
                # A wait past TIMEOUT_MAX raises OverflowError; waking early only means waiting again.
                self._wakeup.wait(None if wait is None else min(wait, _LONGEST_WAIT_S))
            if self._stopped:
                return None
            _, _, handle, callback = heapq.heappop(self._heap)
            if handle._timer is None:
                self._cancelled -= 1  # it was counted when cancelled
            handle._timer = None
            return handle, callback

    def _report(self, exc: BaseException) -> None:
        if self._on_error is not None:
            with contextlib.suppress(Exception):  # a reporter that fails must not end the thread either
                self._on_error(exc)

    def _forget(self, handle: TimerHandle) -> None:
        """Count a cancelled entry; rebuild the heap without them once they are the majority."""
        with self._wakeup:
            if handle._timer is None:
                return  # already popped (or counted)
            handle._timer = None
            self._cancelled += 1
            if self._cancelled >= _PRUNE_AT and 2 * self._cancelled > len(self._heap):
                kept = []
                for entry in self._heap:
                    if entry[2].cancelled:
                        entry[2]._timer = None  # also one whose cancel() has not reached _forget yet
                    else:
                        kept.append(entry)
                heapq.heapify(kept)
                self._heap = kept
                self._cancelled = 0
