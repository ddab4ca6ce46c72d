"""The caller's side of a runtime: who is calling, whether it may wait, and how it waits for an actor.

A runtime answers calls from any thread, its own included: a subscriber runs on
the StateActor's thread, a stage on a worker's, an async stage on an event
loop's. A call that would wait there for an answer only that thread can give
would deadlock, so `Callers.refuse_blocking` refuses it, saying what to do
instead. A fork() child of the runtime's process has none of its actors
(`forked`), and a closing runtime takes no more work (`closed`).

`ask` and `answer` call an actor's method from a caller's thread and wait for
the answer with pykka's errors mapped to ours.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

import pykka
from pykka.messages import ProxyCall

from actorflow.actors.threads import ThreadBook
from actorflow.core.errors import RuntimeNotAnswering, RuntimeStopped, WouldDeadlock

__all__ = ["ASK_TIMEOUT_S", "FORKED", "Callers", "answer", "ask", "bounded_wait"]

ASK_TIMEOUT_S: Final = 30.0
"""Upper bound on any wait for an actor's answer outside the hot path (pykka's stop race)."""
_LIVENESS_CHECK_S = 0.5
"""While waiting for an actor's answer, how often to look whether the actor is still alive."""
_NEVER_WAITS = ("central", "loop")
"""Thread roles where `submit` must not wait (for a commit, or for room): nothing else would run meanwhile."""

FORKED: Final = (
    "this process is a fork() child of the one that started the runtime, and the runtime's actors "
    "live in the parent; create a new Runtime in the child, or start children with multiprocessing's "
    "'spawn' or 'forkserver' method"
)


def bounded_wait(timeout: float | None) -> float | None:
    """A wait's timeout as threads accept it: one past `threading.TIMEOUT_MAX` would raise OverflowError."""
    return None if timeout is None else min(timeout, threading.TIMEOUT_MAX)


class Callers:
    """Whether a caller of one runtime may be served now, and may wait: the checks every call makes first."""

    __slots__ = ("_threads", "closed", "forked")

    def __init__(self, threads: ThreadBook) -> None:
        self._threads = threads
        self.closed = threading.Event()
        """Set once `close()` has begun: no more work is taken."""
        self.forked = False
        """Set in a fork() child of the runtime's process (by the fork hook: a plain attribute, no lock)."""

    def check_not_forked(self) -> None:
        """Raise RuntimeStopped in a fork() child, where the runtime's actors are absent."""
        if self.forked:
            raise RuntimeStopped(FORKED)

    def must_not_wait(self) -> bool:
        """True on a thread that answers the runtime's requests or runs its async stages: it must never wait."""
        return self._threads.role_of_current() in _NEVER_WAITS

    def on_own_thread(self) -> bool:
        """True on any thread of the runtime's actors (central, worker or event loop)."""
        return self._threads.role_of_current() is not None

    def on_central_thread(self) -> bool:
        """True on the thread of a central actor, where subscribers run."""
        return self._threads.role_of_current() == "central"

    def refuse_blocking(self, call: str, *, waits_for_tasks: bool = False) -> None:
        """Raise if the calling thread is one that `call` would wait for: it would deadlock.

        Subscribers run on the state actor's thread, which answers every read: any
        wait there hangs. Services run on workers: a read there is answered by
        another thread and is fine, but waiting for tasks to finish is not, as
        they need the workers (the caller's own task included).

        Raises:
            RuntimeStopped: this is a fork() child of the runtime's process.
            WouldDeadlock: the call would wait for the calling thread itself.
        """
        self.check_not_forked()
        role = self._threads.role_of_current()
        if role is None or (role == "worker" and not waits_for_tasks):
            return
        thread = threading.current_thread().name
        if role == "loop":
            raise WouldDeadlock(_on_the_loop(call, thread, waits_for_tasks=waits_for_tasks))
        if role == "central":
            raise WouldDeadlock(
                f"{call} was called on the runtime's own thread {thread!r}, where subscriber callbacks run; "
                "it waits for an answer only that thread can give, so it would deadlock. Use what the "
                "callback receives (event.record), or hand the work to another thread (a queue.Queue "
                "read by a thread of yours, or loop.call_soon_threadsafe)"
            )
        raise WouldDeadlock(
            f"{call} was called inside a service, on worker thread {thread!r}; it waits for tasks to "
            "finish, and they need the workers (this task included), so it would deadlock. Return from "
            "the service and wait outside it, or submit follow-up tasks without waiting for them"
        )


def _on_the_loop(call: str, thread: str, *, waits_for_tasks: bool) -> str:
    """Why `call` is refused inside an async stage, on the async backend's event loop `thread`, and what to do."""
    if waits_for_tasks:
        return (
            f"{call} was called inside an async stage, on the event loop thread {thread!r} that runs the "
            "runtime's async stages; it waits for a task to finish, and tasks need those stages' slots (this "
            "call's included), so it would deadlock. Return from the stage and wait outside it, or submit "
            "follow-up tasks without waiting for them"
        )
    return (
        f"{call} was called inside an async stage, on the event loop thread {thread!r} that runs the "
        "runtime's async stages; it blocks until another thread answers, stalling every coroutine of that "
        "loop meanwhile. Use the async form where there is one (await runtime.submit_async(...)), or run the "
        "call in a thread: await asyncio.to_thread(...)"
    )


def ask(actor: pykka.ActorRef[Any], method: str, *args: Any, **kwargs: Any) -> pykka.Future[Any]:
    """Call `actor.method(*args, **kwargs)` on the actor's thread: pykka's proxy call, without building a proxy.

    A stopped actor answers with ActorDeadError (`answer` maps it to RuntimeStopped).
    """
    return actor.ask(ProxyCall(attr_path=(method,), args=args, kwargs=kwargs), block=False)


def answer(future: pykka.Future[Any], actor: pykka.ActorRef[Any] | None = None) -> Any:
    """An actor's answer to a request, with pykka's errors mapped to ours.

    A stopped actor is a closed runtime (RuntimeStopped); an actor that does
    not answer in time raises RuntimeNotAnswering (a TimeoutError), never a pykka type. Given the
    `actor` that should answer, a message that reached it as it stopped (pykka
    then leaves the future unresolved) is noticed within a second, not after
    the whole timeout.
    """
    deadline = time.monotonic() + ASK_TIMEOUT_S
    dead_seen = False
    while True:
        remaining = deadline - time.monotonic()
        wait = remaining if actor is None else min(remaining, _LIVENESS_CHECK_S)
        try:
            return future.get(timeout=max(0.0, wait))
        except pykka.ActorDeadError:
            raise RuntimeStopped("the runtime is closed") from None
        except pykka.Timeout:
            if remaining <= wait:
                raise RuntimeNotAnswering(f"the runtime did not answer within {ASK_TIMEOUT_S:g}s") from None
            if actor is not None and not actor.is_alive():
                if dead_seen:  # dead for a whole check interval and still no answer: none will come
                    raise RuntimeStopped("the runtime is closed") from None
                dead_seen = True
