"""Dead letters: messages that reach a stopped actor, and late results. Logged and counted, never silent."""

from __future__ import annotations

import threading
from typing import Any

import pykka

from actorflow.core.errors import RuntimeStopped
from actorflow.core.events import DEAD_LETTER
from actorflow.core.tracing import get_event_logger

__all__ = ["DeadLetterOffice", "tell_or_dead_letter"]

_log = get_event_logger("runtime")


class DeadLetterOffice:
    """Counts dead letters and logs each as a ``dead_letter`` event. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @property
    def count(self) -> int:
        """How many dead letters so far."""
        return self._count

    def post(self, message: Any, *, to: str, why: str) -> None:
        """Record one dead letter addressed to `to`."""
        with self._lock:
            self._count += 1
        _log.warning(
            DEAD_LETTER,
            to=to,
            why=why,
            message=type(message).__name__,
            task_id=getattr(message, "task_id", None),
        )

    def drain(self, actor: pykka.Actor) -> None:
        """Empty a stopping actor's inbox into the office (call from `on_stop`).

        pykka would otherwise drop queued tells silently; asks get ActorDeadError as usual.
        """
        inbox = actor.actor_inbox
        while not inbox.empty():
            envelope = inbox.get()
            if isinstance(envelope.message, pykka.messages._ActorStop):
                if envelope.reply_to is not None:
                    envelope.reply_to.set(None)
                continue
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception(
                    exc_info=(pykka.ActorDeadError, pykka.ActorDeadError(f"{actor} stopped"), None)
                )
                continue
            reply = getattr(envelope.message, "reply", None)
            if isinstance(reply, pykka.Future):  # a request carrying its own reply future (CreateTask, CancelTask)
                stopped = RuntimeStopped(f"{actor} stopped before handling {type(envelope.message).__name__}")
                reply.set_exception(exc_info=(RuntimeStopped, stopped, None))
            self.post(envelope.message, to=str(actor), why="actor stopped before handling it")


def tell_or_dead_letter(ref: pykka.ActorRef[Any], message: Any, office: DeadLetterOffice) -> None:
    """Tell `message` to `ref` from any thread; if the actor is dead, post it as a dead letter."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        office.post(message, to=str(ref), why="actor is dead")
