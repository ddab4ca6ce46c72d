"""The backend seam: what a pool asks of a backend and of its workers, as Protocols mypy checks.

A `ServiceBackend` starts workers for pools; a `WorkerHandle` is one worker,
wherever it runs (a thread, an event-loop slot, a child process, a Ray actor).
Every capability the pool uses is declared here, a capability a backend lacks
included: such a worker answers that it cannot (`withdraw`, `cancel` and
`release_result` say False, `vouches_running` says True), so the pool never
looks for a method that may not be there. `WorkerDefaults` and
`BackendDefaults` give those answers, so that a backend written by a host can
be a few lines (see `actorflow.register_backend`).

A backend is built from a `BackendRequest`: the functions and sizes of the
pools that will run on it, and the runtime's parts it may need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import RunService, ServiceDone, ServicesDone
from actorflow.actors.threads import ThreadBook
from actorflow.core.config import RuntimeConfig
from actorflow.core.types import JSONValue, Task

__all__ = [
    "DEPTH_FAST",
    "DEPTH_SLOW",
    "FAST_CALL_MS",
    "BackendDefaults",
    "BackendRequest",
    "Deliver",
    "OnDeath",
    "ServiceBackend",
    "StageFn",
    "WorkerDefaults",
    "WorkerHandle",
]

StageFn = Callable[[Task, JSONValue], object]
"""A stage function as a backend runs it: ``fn(task, value)``; an ``async def`` one returns a coroutine."""

Deliver = Callable[[ServiceDone | ServicesDone], None]
"""Hands the orchestrator one report, or several at once (`ServicesDone`)."""

DEPTH_FAST: Final = 32
"""Calls a pool queues per worker while its calls are uniformly fast, unless the backend caps it
(`max_queue_depth`): keeps workers awake (1.7x no-op throughput on threads)."""
DEPTH_SLOW: Final = 1
"""Calls a pool queues per worker otherwise, unless the backend raises it (`min_queue_depth`): a call is
only ever sent to an idle worker, so no call waits behind a slow one while another worker idles (the
pool's load figures lag by a message, and with even two per worker two calls that must run together
could land on the same worker)."""
FAST_CALL_MS: Final = 0.2
"""A call shorter than this is fast, unless the backend says otherwise (`fast_call_ms`)."""


class OnDeath(Protocol):
    """Tells a pool's owner that a worker died unasked: its name, why, and whether it could not load its function.

    A worker that cannot load the stage's function (`cannot_load`) will never
    run a call: the calls it held fail at once, with `why`.
    """

    def __call__(self, worker: str, why: str, /, *, cannot_load: bool = False) -> None:
        """Report the death."""


class WorkerHandle(Protocol):
    """One worker of a pool, wherever it runs. The pool calls it from the orchestrator's thread only.

    A worker reports every call it runs through the `Deliver` it was started
    with, exactly once (a call it never started is not reported: the pool
    takes it back when it retires the worker).
    """

    name: str

    def send(self, call: RunService) -> bool:
        """Queue a call on the worker without blocking. False if the worker is dead."""

    def send_many(self, calls: Sequence[RunService]) -> bool:
        """Queue several calls, in order, in as few messages as the backend can. False if the worker is dead."""

    def retire(self) -> None:
        """Stop the worker; calls it has not started are dropped (the pool re-sends them)."""

    def join(self, timeout: float) -> bool:
        """Wait for the worker to finish stopping. False if it is still busy (e.g. hung)."""

    def withdraw(self, call_id: int) -> bool:
        """Take back a sent call the worker has not started; True if it never will. May always say False."""

    def cancel(self, call_id: int) -> bool:
        """Ask the worker to cancel `call_id` while it runs; False if it cannot (a thread cannot be interrupted).

        A cancelled call is still reported, so that its slot is freed as for any other call.
        """

    def release_result(self, call_id: int) -> bool:
        """True if `call_id` has finished and its report was held back with others: it is sent now.

        Only a worker that holds reports back to send several at once can say True.
        """

    def vouches_running(self, call_id: int) -> bool:
        """False if the worker cannot tell `call_id` apart from calls it runs together with it.

        A stage deadline charges a hung call only if its worker vouches that it is the one running.
        """


class ServiceBackend(Protocol):
    """Starts workers for pools: the seam for thread, async, process, Ray and a host's own execution."""

    name: str

    @property
    def max_queue_depth(self) -> int:
        """The most calls a pool queues at one worker (`DEPTH_FAST` for a backend that sets no cap)."""

    @property
    def min_queue_depth(self) -> int:
        """The fewest calls a pool lets one worker hold when it has them (`DEPTH_SLOW` by default)."""

    @property
    def fast_call_ms(self) -> float:
        """Calls shorter than this are fast, and are queued deep (`FAST_CALL_MS` by default)."""

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        """Start one worker that runs `fn` for each call and reports through `deliver`; return at once."""

    def close(self) -> None:
        """Release what the backend holds (called after every worker is retired)."""


class WorkerDefaults:
    """The answers of a worker that has none of the optional capabilities; subclass it and override what you can.

    A subclass writes `send`, `retire` and (if it has something to wait for)
    `join`; `send_many` sends the calls one by one.
    """

    __slots__ = ()

    def send(self, call: RunService) -> bool:
        """Queue a call on the worker; a subclass must say how."""
        raise NotImplementedError(f"{type(self).__name__} must define send()")

    def send_many(self, calls: Sequence[RunService]) -> bool:
        """Send the calls one by one, in order; False as soon as one is refused."""
        return all(self.send(call) for call in calls)

    def join(self, timeout: float) -> bool:
        """Nothing of its own to wait for: True."""
        return True

    def withdraw(self, call_id: int) -> bool:
        """Cannot take a call back: False."""
        return False

    def cancel(self, call_id: int) -> bool:
        """Cannot cancel a running call: False."""
        return False

    def release_result(self, call_id: int) -> bool:
        """Holds no report back: False."""
        return False

    def vouches_running(self, call_id: int) -> bool:
        """Runs one call at a time, so the head is the call running: True."""
        return True


class BackendDefaults:
    """The figures of a backend whose workers wake as cheaply as a thread, and a `close` with nothing to release."""

    max_queue_depth: int = DEPTH_FAST
    min_queue_depth: int = DEPTH_SLOW
    fast_call_ms: float = FAST_CALL_MS

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """Everything a backend may need to start: its pools' functions and sizes, and the runtime's parts.

    A factory given to `register_backend` receives one and returns the backend.
    """

    name: str
    """The name the backend was asked for by (a factory may be registered under several)."""
    functions: Mapping[str, StageFn]
    """The function of each pool that will run on this backend, by pool name."""
    sizes: Mapping[str, int]
    """The number of workers of each of those pools."""
    config: RuntimeConfig
    dead_letters: DeadLetterOffice
    threads: ThreadBook
    """The runtime's thread book: a backend writes its threads down in it, so that `Runtime.close()` joins them."""
    local: Callable[[], ServiceBackend]
    """The thread backend, for functions that must run in this process (see `toolkit.runs_at_home`)."""
