"""Subscriptions to a runtime's committed transitions, kept across a restart of its StateActor.

Each callback is subscribed on the current StateActor, which calls it after
every commit. When the supervisor rebuilds the StateActor, every callback is
subscribed on the new one, exactly once: none is lost, none doubled, even when
`subscribe()` or an unsubscribe runs meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import pykka

from actorflow.actors.runtime.callers import answer, ask
from actorflow.actors.runtime.parts import RuntimeParts
from actorflow.actors.runtime.supervision import Supervisor
from actorflow.core.errors import RuntimeStopped
from actorflow.core.types import TransitionEvent

__all__ = ["Subscriptions"]


class _Subscription(NamedTuple):
    """A `subscribe()` callback and its token at the StateActor it is subscribed on."""

    callback: Callable[[TransitionEvent], None]
    state: pykka.ActorRef[Any]
    token: int


class Subscriptions:
    """The callbacks subscribed to a runtime, each with where it is subscribed now."""

    def __init__(self, parts: RuntimeParts, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._callers = parts.callers
        self._admission = parts.admission
        self._entries: dict[int, _Subscription] = {}
        """Runtime key -> the callback and its token at the StateActor it is subscribed on."""
        self._entries_lock = threading.Lock()
        """Guards `_entries` (dict operations only: never held while waiting for an actor)."""
        self._subscribing = threading.Lock()
        """Serializes `subscribe()` with the re-subscription of a restart, so that none is lost or doubled."""
        self._keys = itertools.count(1)

    def subscribe(self, callback: Callable[[TransitionEvent], None]) -> Callable[[], None]:
        """Subscribe `callback` on the current StateActor (its replacement, if it is being replaced).

        Returns the unsubscribe function. Raises RuntimeStopped or RuntimeFailed if the runtime is gone.
        """
        key = next(self._keys)  # atomic under the GIL: every call gets its own key
        supervisor = self._supervisor
        while True:
            with self._subscribing:  # a restart's re-subscription waits, so it neither misses nor doubles this one
                state = supervisor.current("state")
                if state is None:
                    raise self._admission.unavailable()
                try:
                    token = answer(ask(state, "subscribe", callback), state)
                except RuntimeStopped:
                    pass  # the StateActor is being replaced: subscribe on its replacement
                else:
                    with self._entries_lock:
                        self._entries[key] = _Subscription(callback, state, token)
                    break
            if supervisor.ending or not supervisor.await_replacement("state", state):
                raise self._admission.unavailable()

        def unsubscribe() -> None:
            self._unsubscribe(key)

        return unsubscribe

    def _unsubscribe(self, key: int) -> None:
        """Forget the subscription `key`; nothing if it is gone already. Waits for the StateActor unless on it."""
        with self._entries_lock:
            entry = self._entries.pop(key, None)
        if entry is None or self._callers.forked or not entry.state.is_alive():
            return  # already unsubscribed, or its StateActor is gone (a replacement is subscribed anew)
        reply = ask(entry.state, "unsubscribe", entry.token)
        if self._callers.on_central_thread():
            return  # inside a callback: queued ahead of any later event; waiting would deadlock
        with contextlib.suppress(RuntimeStopped):
            answer(reply, entry.state)

    def resubscribe(self) -> None:
        """Subscribe every callback on the current StateActor (after a restart), each exactly once."""
        state = self._supervisor.current("state")
        assert state is not None
        with self._subscribing:  # no subscribe() is half-way meanwhile
            with self._entries_lock:
                entries = [(key, sub) for key, sub in self._entries.items() if sub.state is not state]
            for key, sub in entries:
                token = answer(ask(state, "subscribe", sub.callback), state)
                with self._entries_lock:
                    kept = key in self._entries
                    if kept:
                        self._entries[key] = _Subscription(sub.callback, state, token)
                if not kept:  # unsubscribed meanwhile
                    ask(state, "unsubscribe", token)
