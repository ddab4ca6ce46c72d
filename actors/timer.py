"""A timer thread: delivers callbacks at a time, so no actor ever sleeps in a handler.

pykka has no timers (its issue #53). Retries' backoff and stage deadlines are
scheduled here; the callback is a `tell`, which never blocks.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Timer", "TimerHandle"]


class TimerHandle:
    """A scheduled callback; `cancel()` makes sure it does not run."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (a no-op if it already ran)."""
        self.cancelled = True


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
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` on the timer thread after `delay_s` seconds."""
        handle = TimerHandle()
        with self._wakeup:
            entry = (self._clock() + max(0.0, delay_s), next(self._order), handle, callback)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wakeup.notify()
        return handle

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread; callbacks not yet due never run."""
        with self._wakeup:
            self._stopped = True
            self._heap.clear()
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopped and (not self._heap or self._heap[0][0] > self._clock()):
                    wait = None if not self._heap else self._heap[0][0] - self._clock()
                    self._wakeup.wait(wait)
                if self._stopped:
                    return
                _, _, handle, callback = heapq.heappop(self._heap)
            if handle.cancelled:
                continue
            try:
                callback()
            except BaseException as exc:  # noqa: BLE001 - the timer thread must survive any callback
                if self._on_error is not None:
                    self._on_error(exc)
