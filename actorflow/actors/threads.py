"""A record of the threads a runtime's actors run on, so that `close()` can join them.

pykka does not expose an actor's thread; each of our actors writes its own
down in `on_start`, with its role. The runtime also asks the book which role
the calling thread plays, to refuse a blocking call where it would deadlock.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

__all__ = ["ThreadBook", "ThreadRole"]

ThreadRole = Literal["central", "worker", "loop"]
"""central: a thread that answers the runtime's requests (state actor, orchestrator). worker: runs services.
loop: the event loop that runs every async stage's coroutines (a blocking call there stalls all of them)."""


class ThreadBook:
    """The live threads to join at shutdown, each with its role. Thread-safe.

    Threads that have ended are dropped whenever a new one is written down, so
    the book holds the live actors' threads (plus at most the ones that ended
    since), however many workers are replaced over a runtime's life.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[int, tuple[threading.Thread, ThreadRole]] = {}

    def record_current(self, role: ThreadRole = "central") -> None:
        """Write down the calling thread (call from an actor's `on_start`)."""
        thread = threading.current_thread()
        with self._lock:
            for ident in [ident for ident, (t, _) in self._threads.items() if not t.is_alive()]:
                del self._threads[ident]
            self._threads[threading.get_ident()] = (thread, role)

    def role_of_current(self) -> ThreadRole | None:
        """The calling thread's role, or None if it is not one of the book's threads."""
        entry = self._threads.get(threading.get_ident())  # a dict read is atomic: no lock on this path
        # An ended thread's id can be reused by a new thread that is not ours.
        if entry is None or entry[0] is not threading.current_thread():
            return None
        return entry[1]

    def __len__(self) -> int:
        """How many threads the book holds."""
        return len(self._threads)

    def join(self, timeout: float) -> list[str]:
        """Join every recorded thread within `timeout` in total; returns the names still alive."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = [thread for thread, _ in self._threads.values()]
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = {ident: entry for ident, entry in self._threads.items() if entry[0].is_alive()}
            return [thread.name for thread, _ in self._threads.values()]
