"""A record of the threads a runtime's actors run on, so that `close()` can join them.

pykka does not expose an actor's thread; each of our actors writes its own
down in `on_start`.
"""

from __future__ import annotations

import threading
import time

__all__ = ["ThreadBook"]


class ThreadBook:
    """Threads to join at shutdown. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def record_current(self) -> None:
        """Write down the calling thread (call from an actor's `on_start`)."""
        with self._lock:
            self._threads.append(threading.current_thread())

    def join(self, timeout: float) -> list[str]:
        """Join every recorded thread within `timeout` in total; returns the names still alive."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            return [t.name for t in self._threads]
