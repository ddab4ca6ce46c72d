"""pykka's private names that actorflow relies on for speed: this fails loudly the day they change.

actors/base.py overrides `Actor._create_actor_inbox` (a SimpleQueue mailbox) and
`Actor._handle_receive` (our messages skip pykka's control-message checks), and
imports the `ActorInbox` protocol from `pykka._actor`; actors/deadletters.py
recognises `pykka.messages._ActorStop` when it drains a stopping actor. pyproject
pins pykka to its minor version; before widening the pin, run this file.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import queue
import threading
from typing import Any

import pykka
import pykka.messages
from pykka import _actor

from actorflow.actors.base import FastActor
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import WorkerDied


def test_the_installed_pykka_is_the_minor_version_the_private_names_were_checked_against() -> None:
    version = importlib.metadata.version("pykka")
    assert version.startswith("4.5."), f"pykka {version}: re-check the private names below, then move the pin"


def test_the_private_names_exist_with_the_signatures_actorflow_overrides() -> None:
    assert inspect.signature(pykka.ThreadingActor._create_actor_inbox).parameters == {}
    assert list(inspect.signature(pykka.ThreadingActor._handle_receive).parameters) == ["self", "message"]
    assert hasattr(_actor, "ActorInbox")
    assert isinstance(pykka.messages._ActorStop, type)


class _Echo(FastActor):
    def __init__(self, seen: list[Any], done: threading.Event) -> None:
        super().__init__()
        self.seen = seen
        self.done = done

    def on_receive(self, message: Any) -> None:
        self.seen.append(message)
        self.done.set()


def test_a_fast_actor_gets_its_simple_queue_mailbox_and_its_messages_through_the_override() -> None:
    seen: list[Any] = []
    done = threading.Event()
    ref = _Echo.start(seen, done)
    try:
        assert type(ref.actor_inbox) is queue.SimpleQueue
        ref.tell(WorkerDied("w-1", "test"))
        assert done.wait(5)
        assert seen == [WorkerDied("w-1", "test")]
    finally:
        ref.stop()


def test_a_stop_request_is_the_private_actor_stop_message_that_the_dead_letter_drain_recognises() -> None:
    class Idle(pykka.ThreadingActor):
        pass

    actor = Idle()  # not started: its inbox only fills
    stopped = pykka.ThreadingFuture[Any]()
    actor.actor_inbox.put(pykka._envelope.Envelope(pykka.messages._ActorStop(), reply_to=stopped))
    DeadLetterOffice().drain(actor)
    assert stopped.get(timeout=1) is None
