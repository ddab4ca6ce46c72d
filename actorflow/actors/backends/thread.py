"""The thread backend: stage calls run on pykka actors in the runtime's process (the default backend).

Each worker is a `ServiceWorker` actor that runs one call at a time with
`toolkit.execute`. A batch of calls (`RunServices`) runs in order, and its
reports go back together, or sooner once the oldest has been held for
`HOLD_S` (a backend-wide sweeper thread sends them on).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import pykka

from actorflow.actors.backends.base import BackendDefaults, Deliver, OnDeath, StageFn, WorkerDefaults, WorkerHandle
from actorflow.actors.backends.toolkit import CallClaims, deliver_reports, execute
from actorflow.actors.base import FastActor
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import RunService, RunServices, ServiceDone
from actorflow.actors.threads import ThreadBook
from actorflow.core.tracing import get_event_logger

__all__ = ["HOLD_S", "ServiceWorker", "ThreadBackend"]


HOLD_S = 0.001
"""How long a thread worker may hold a finished result back while it runs more calls of a batch."""


class _HeldResults:
    """Results a thread worker has finished and not delivered yet; its backend's sweeper may deliver them too.

    Delivery happens under the lock, so results leave in the order they were
    made whichever thread sends them.
    """

    __slots__ = ("_deliver", "_dones", "_lock", "_since")

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._lock = threading.Lock()
        self._dones: list[ServiceDone] = []
        self._since = 0.0

    def add(self, done: ServiceDone) -> bool:
        """Hold a result. True if it is the only one held (the caller then has the sweeper watch)."""
        with self._lock:
            self._dones.append(done)
            if len(self._dones) == 1:
                self._since = time.perf_counter()
                return True
            return False

    def release(self, call_id: int) -> bool:
        """If `call_id`'s result is held here, deliver every held result now and return True."""
        with self._lock:
            if all(done.call_id != call_id for done in self._dones):
                return False
            dones, self._dones = self._dones, []
            deliver_reports(self._deliver, dones)
            return True

    def deliver(self, older_than: float | None = None) -> bool:
        """Deliver every held result (or only if the oldest was held `older_than` s or more). True if some are left."""
        with self._lock:
            dones = self._dones
            if not dones:
                return False
            if older_than is not None and time.perf_counter() - self._since < older_than:
                return True
            self._dones = []
            deliver_reports(self._deliver, dones)
            return False


class _ResultSweeper:
    """Delivers results that thread workers have held for `HOLD_S` while running the rest of a batch.

    A worker runs its calls one after the other, so a slow call would hold the
    results finished before it for its whole duration; this thread sends them
    on instead. It sleeps on an event while no worker holds anything, and starts
    with the first worker that does.
    """

    def __init__(self, threads: ThreadBook, hold_s: float = HOLD_S) -> None:
        self._threads = threads
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._watched: set[_HeldResults] = set()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, held: _HeldResults) -> None:
        """`held` has started holding results: deliver them if they are still there after `hold_s`."""
        with self._lock:
            self._watched.add(held)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="actorflow-result-sweeper", daemon=True)
                self._thread.start()
            if not self._wake.is_set():
                self._wake.set()

    def close(self) -> None:
        """Stop the sweeper's thread (workers still holding results deliver them at their batch's end)."""
        with self._lock:  # not between the sweeper's check of `_closed` and its clearing of `_wake`
            self._closed.set()
            self._wake.set()

    def _run(self) -> None:
        self._threads.record_current("worker")
        while self._wake.wait() and not self._closed.wait(self.hold_s):
            # Under the lock: a worker that starts holding again meanwhile is watched again after this.
            with self._lock:
                self._watched = {held for held in self._watched if held.deliver(older_than=self.hold_s)}
                if not self._watched and not self._closed.is_set():
                    self._wake.clear()


class ServiceWorker(FastActor):
    """A pykka actor that runs service calls one at a time.

    A `RunServices` batch runs in order, each call as a lone `RunService`
    would: its claim is taken first (a withdrawn call is skipped), and a crash
    stops the batch, so calls queued behind it never run here (the pool re-sends
    them). The batch's results are delivered together (`ServicesDone`) when it
    ends, or sooner once the oldest has been held for `HOLD_S`.

    Its thread is a daemon, so a call that hangs forever cannot stop the
    interpreter from exiting once the pool has retired the worker.
    """

    thread_role = "worker"

    def __init__(
        self,
        name: str,
        fn: StageFn,
        deliver: Deliver,
        on_death: OnDeath,
        retired: threading.Event,
        dead_letters: DeadLetterOffice,
        threads: ThreadBook,
        claims: CallClaims | None = None,
        sweeper: _ResultSweeper | None = None,
        held: _HeldResults | None = None,
    ) -> None:
        super().__init__(threads=threads)
        self._claims = claims
        self._held = held or _HeldResults(deliver)
        self._sweeper = sweeper or _ResultSweeper(threads)
        self._name = name
        self._fn = fn
        self._deliver = deliver
        self._on_death = on_death
        self._retired = retired
        self._dead_letters = dead_letters
        self._log = get_event_logger(name)

    def on_receive(self, message: Any) -> None:
        """Run a RunService call and deliver its ServiceDone, or the calls of a RunServices batch."""
        if type(message) is RunServices:
            self._run_batch(message.calls)
            return
        if not isinstance(message, RunService):
            self._dead_letters.post(message, to=self._name, why="unknown message type")
            return
        if self._retired.is_set():
            return  # the pool took this call back when it retired us
        if self._claims is not None and not self._claims.take(message.call_id):
            return  # withdrawn (its task was cancelled) before it started
        done = execute(self._fn, message, self._name, log=self._log)
        if done.status == "crashed":
            # Stop here: calls queued behind this one must not run on a worker that is being
            # replaced (the pool re-sends them, and would otherwise run them twice).
            self._retired.set()
        self._deliver(done)

    def _run_batch(self, calls: tuple[RunService, ...]) -> None:
        held, claims, retired, hold_s = self._held, self._claims, self._retired, self._sweeper.hold_s
        last = len(calls) - 1
        for index, call in enumerate(calls):
            if retired.is_set():
                break  # retired (the pool took the rest back), or a call below crashed
            if claims is not None and not claims.take(call.call_id):
                continue  # withdrawn before it started
            held.deliver(older_than=hold_s)
            done = execute(self._fn, call, self._name, log=self._log)
            if done.status == "crashed":
                retired.set()  # as for a lone call: nothing queued behind it runs here
            if held.add(done) and index < last:
                self._sweeper.watch(held)
        held.deliver()

    def on_stop(self) -> None:
        """Report an unrequested stop to the pool's owner."""
        if not self._retired.is_set():
            self._on_death(self._name, "stopped")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        """Report a death by exception (our own bug: `execute` catches the service's)."""
        self._on_death(self._name, f"failed with {exception_type.__name__}: {exception_value}")


class _ThreadWorker(WorkerDefaults):
    """A pool's handle on one `ServiceWorker`; it cannot cancel a running call (a thread cannot be interrupted)."""

    __slots__ = ("_claims", "_held", "_ref", "_retired", "name")

    def __init__(
        self,
        name: str,
        ref: pykka.ActorRef[ServiceWorker],
        retired: threading.Event,
        claims: CallClaims,
        held: _HeldResults,
    ) -> None:
        self.name = name
        self._ref = ref
        self._retired = retired
        self._claims = claims
        self._held = held

    def release_result(self, call_id: int) -> bool:
        """True if `call_id` has finished and its report was held with a batch's: it is sent now."""
        return self._held.release(call_id)

    def withdraw(self, call_id: int) -> bool:
        return self._claims.take(call_id)

    def send(self, call: RunService) -> bool:
        self._claims.sent(call.call_id)
        try:
            self._ref.tell(call)
        except pykka.ActorDeadError:
            return False
        return True

    def send_many(self, calls: Sequence[RunService]) -> bool:
        claims = self._claims
        for call in calls:
            claims.sent(call.call_id)
        try:
            self._ref.tell(RunServices(tuple(calls)))
        except pykka.ActorDeadError:
            return False
        return True

    def retire(self) -> None:
        self._retired.set()
        with contextlib.suppress(pykka.ActorDeadError):
            self._ref.stop(block=False)

    def join(self, timeout: float) -> bool:
        return self._ref.actor_stopped.wait(timeout)


class ThreadBackend(BackendDefaults):
    """Workers are pykka actors in this process (the default backend)."""

    name = "thread"

    def __init__(self, dead_letters: DeadLetterOffice, threads: ThreadBook, *, hold_s: float = HOLD_S) -> None:
        """`hold_s`: how long a worker may hold a finished result while it runs the rest of a batch."""
        self._dead_letters = dead_letters
        self._threads = threads
        self._sweeper = _ResultSweeper(threads, hold_s)

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        retired = threading.Event()
        claims = CallClaims()
        held = _HeldResults(deliver)
        ref = ServiceWorker.start(
            name, fn, deliver, on_death, retired, self._dead_letters, self._threads, claims, self._sweeper, held
        )
        return _ThreadWorker(name, ref, retired, claims, held)

    def close(self) -> None:
        """Stop the thread that delivers results held back by workers (the workers are retired by now)."""
        self._sweeper.close()
