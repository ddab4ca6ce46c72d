"""The base of actorflow's actors: pykka threading actors with a faster mailbox.

pykka's default inbox is a `queue.Queue`, which takes and notifies two
Conditions on every put and get. actorflow's mailboxes are unbounded, so a
`queue.SimpleQueue` (C-implemented, lock-free for the caller) meets pykka's
`ActorInbox` protocol (`put`, `get`, `empty`) at a fraction of the cost. It
is the single largest saving on the hot path, where a task makes about ten
messages.
"""

from __future__ import annotations

import queue
from typing import Any, ClassVar

import pykka
from pykka._actor import ActorInbox  # the protocol pykka 4 declares for custom inboxes

from actorflow.actors.messages import MESSAGE_TYPES
from actorflow.actors.threads import ThreadBook, ThreadRole

__all__ = ["FastActor"]


class FastActor(pykka.ThreadingActor):
    """A daemon-threaded pykka actor whose mailbox is a SimpleQueue.

    Given a ThreadBook, it writes its thread down when it starts, so that the
    runtime can join it at close (pykka does not expose an actor's thread).
    """

    use_daemon_thread = True
    thread_role: ClassVar[ThreadRole] = "central"
    """What the actor's thread does, for the runtime's deadlock check: workers override it."""

    def __init__(self, *, threads: ThreadBook | None = None) -> None:
        super().__init__()
        self._threads = threads

    def on_start(self) -> None:
        """Note the actor's thread in the ThreadBook, if any."""
        if self._threads is not None:
            self._threads.record_current(self.thread_role)

    @staticmethod
    def _create_actor_inbox() -> ActorInbox:
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        return inbox

    def _handle_receive(self, message: Any) -> Any:
        # pykka tests every message against its four control types before on_receive; ours are
        # none of them, and a task sends about ten, so they go straight to on_receive.
        if type(message) in MESSAGE_TYPES:
            return self.on_receive(message)
        try:
            return super()._handle_receive(message)
        finally:
            # A proxy call (stats, counts, subscribe...) bypasses on_receive. If it was the last
            # message in the mailbox, whatever on_receive held back for batching must go now,
            # or it would wait for a message that may never come.
            if not self.actor_stopped.is_set():
                self.on_mailbox_idle()

    def on_mailbox_idle(self) -> None:
        """Called after a non-message (proxy call) is handled; flush batched work if the mailbox is empty."""
