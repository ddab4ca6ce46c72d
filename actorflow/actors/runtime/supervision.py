"""Supervision: the central actors replaced when they stop unasked (pykka has no supervision of its own).

Both central actors report when they stop (`on_exit`); a stop the runtime did
not ask for is handled on the supervisor's thread:

- the OrchestratorActor is replaced by a fresh one (new pools), which the
  StateActor `adopt`s and which resumes every non-terminal task, as recovery
  does after a restart;
- the StateActor, with a journal, is rebuilt from the journal, together with a
  fresh orchestrator (the old one is stopped first);
- the StateActor without a journal cannot be rebuilt: the runtime *fails*
  (`Health` "failed"), and every pending `result()` and `join()`, and any
  later `submit()`, raise `RuntimeFailed`. A journal lost while running fails
  the runtime the same way.

Each start of a central actor is a *generation*: the exit of an older one
(replaced, or stopped on purpose) is expected and ignored. Milestones and the
failure are reported after the supervisor's lock is released, so that a
listener may call anything, `close()` included. A request that meets a central
actor being replaced waits for the replacement (bounded) and is sent again.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, Literal

import pykka

from actorflow.actors.health import Milestone
from actorflow.actors.runtime.assembly import Assembly, OnExit
from actorflow.actors.runtime.callers import ASK_TIMEOUT_S, answer
from actorflow.actors.runtime.parts import RuntimeParts
from actorflow.core.errors import RuntimeFailed, RuntimeStopped
from actorflow.core.events import (
    MILESTONE_ORCHESTRATOR_DIED,
    MILESTONE_ORCHESTRATOR_RESTARTED,
    MILESTONE_RUNTIME_FAILED,
    MILESTONE_STATE_DIED,
    MILESTONE_STATE_RESTARTED,
    ORCHESTRATOR_DIED,
    RUNTIME_FAILED,
    STATE_DIED,
)

__all__ = ["Central", "Supervisor"]

Central = Literal["state", "orchestrator"]
"""The kinds of central actor."""
_RESTART_WAIT_S = 10.0
"""How long a call that met a central actor being restarted waits for the replacement."""

_Reached = list[Milestone]
"""Milestones reached while the lock was held, to emit once it is released."""


class Supervisor:
    """Starts the central actors (through the `Assembly`), watches them, and replaces those that stop unasked."""

    def __init__(self, parts: RuntimeParts, assembly: Assembly) -> None:
        self._parts = parts
        self._assembly = assembly
        self._log = parts.log
        self._exits: queue.SimpleQueue[tuple[Central, int, str] | None] = queue.SimpleQueue()
        """(actor kind, its generation, why it stopped): reports for the supervisor thread."""
        self._generation: dict[Central, int] = {"state": 0, "orchestrator": 0}
        """Which start of each central actor is current; an exit of an older one is expected."""
        self._state_exited = threading.Event()
        """Set once the current StateActor's `on_stop` is done (its journal closed)."""
        self._lock = threading.Lock()
        """Held while central actors are replaced, and while close() stops them."""
        self._replaced = threading.Condition()
        self._thread: threading.Thread | None = None
        self._on_state_restarted: list[Callable[[], None]] = []
        parts.health.on_fail(self._on_failed)

    # --- starting and stopping -------------------------------------------------------------------

    def start(self) -> int:
        """Start the central actors, resume every unfinished task, and watch; returns the tasks resumed."""
        assembly = self._assembly
        assembly.start_state(self._watch("state"))
        assembly.start_orchestrator(self._watch("orchestrator"))
        resumed = assembly.resume()
        self._thread = threading.Thread(target=self._supervise, name="actorflow-supervisor", daemon=True)
        self._thread.start()
        return resumed

    def stop(self) -> None:
        """Stop the central actors (a replacement under way finishes first, none starts after), then the thread."""
        with self._lock:
            self._assembly.stop_actors()
        self._exits.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(ASK_TIMEOUT_S)

    def on_own_thread(self) -> bool:
        """True on the supervisor's thread, where milestone listeners run."""
        return self._thread is not None and threading.current_thread() is self._thread

    def on_state_restarted(self, listener: Callable[[], None]) -> None:
        """Call `listener` (under the lock) once a StateActor is rebuilt, before its fresh orchestrator starts."""
        self._on_state_restarted.append(listener)

    def _watch(self, kind: Central) -> OnExit:
        """A new generation of `kind`: the `on_exit` its actor reports with."""
        self._generation[kind] += 1
        exited = threading.Event()
        if kind == "state":
            self._state_exited = exited
        return functools.partial(self._report_exit, kind, self._generation[kind], exited)

    def _report_exit(self, kind: Central, generation: int, exited: threading.Event, why: str) -> None:
        """A central actor stopped (called on its thread, once its `on_stop` is done): tell the supervisor thread."""
        exited.set()
        self._exits.put((kind, generation, why))

    # --- the supervisor thread -------------------------------------------------------------------

    def _supervise(self) -> None:
        """The supervisor thread: replace central actors that stopped without being asked.

        Milestones, and the failure of the runtime, are reported with no lock held: a
        listener may call anything, `close()` included (which takes the lock).
        """
        while (report := self._exits.get()) is not None:
            kind, generation, why = report
            if self._is_current(kind, generation):
                self._parts.milestones.emit(
                    MILESTONE_STATE_DIED if kind == "state" else MILESTONE_ORCHESTRATOR_DIED, why=why
                )
                reached, failure = self._restart(kind, generation, why)
                for milestone in reached:
                    self._parts.milestones.emit(milestone.name, **milestone.fields)
                if failure is not None:
                    self._parts.health.fail(failure)
            with self._replaced:
                self._replaced.notify_all()

    @property
    def ending(self) -> bool:
        """True once the runtime is closing or has failed: nothing is replaced any more."""
        return self._parts.callers.closed.is_set() or self._parts.health.failed

    def _is_current(self, kind: Central, generation: int) -> bool:
        """False if the runtime is closing or failed, or the report is of an actor replaced since.

        Read without the lock to decide on the ``died`` milestone; `_restart` reads it again under it.
        """
        return not (self.ending or generation != self._generation[kind])

    def _restart(self, kind: Central, generation: int, why: str) -> tuple[_Reached, str | None]:
        """Replace the actor that stopped; returns the milestones reached and the failure, if any, to report.

        An orchestrator is replaced alone while the StateActor lives. A StateActor
        that stopped (alone, or found stopped when the orchestrator is replaced, as
        when both are stopped together) is rebuilt from the journal, then a fresh
        orchestrator on it, in that order; without a journal, the runtime fails.
        """
        with self._lock:
            if not self._is_current(kind, generation):
                return [], None  # closed, failed or replaced while the milestone was delivered
            try:
                if kind == "orchestrator" and self._state_alive():
                    try:
                        resumed = self._replace_orchestrator(why)
                    except RuntimeStopped:
                        if self._state_alive():
                            raise
                        # The StateActor stopped meanwhile: rebuild it below, with another fresh orchestrator.
                    else:
                        return [Milestone(MILESTONE_ORCHESTRATOR_RESTARTED, {"why": why, "resumed": resumed})], None
                    why = f"stopped while the orchestrator was replaced (the orchestrator {why})"
                elif kind == "orchestrator":
                    why = f"stopped with the orchestrator (the orchestrator {why})"
                if self._parts.config.journal_path is None:
                    return [], f"the StateActor {why}; without a journal its tasks cannot be rebuilt"
                resumed = self._replace_state(why)
                return [Milestone(MILESTONE_STATE_RESTARTED, {"why": why, "resumed": resumed})], None
            except Exception as exc:  # noqa: BLE001 - a restart that fails is a failed runtime, loudly
                return [], f"the {kind} actor {why} and could not be restarted: {exc!r}"

    def _state_alive(self) -> bool:
        state = self._assembly.state
        return state is not None and state.is_alive()

    def _replace_orchestrator(self, why: str) -> int:
        """Start a fresh orchestrator on the current StateActor and resume every task; returns how many."""
        self._log.error(ORCHESTRATOR_DIED, why=why)
        self._assembly.start_orchestrator(self._watch("orchestrator"))
        return self._assembly.resume()

    def _replace_state(self, why: str) -> int:
        """Rebuild the StateActor from the journal, then a fresh orchestrator on it; returns the tasks resumed."""
        self._log.error(STATE_DIED, why=why)
        self._generation["orchestrator"] += 1  # the old one's exit, asked for here, is not a death
        self._assembly.stop_orchestrator()
        # pykka calls an actor dead before its on_stop has run: the old StateActor may still be closing
        # the journal (and holding its lock), as when it is found dead while the orchestrator is replaced.
        if not self._state_exited.wait(ASK_TIMEOUT_S):
            raise RuntimeError(f"the stopped StateActor did not release the journal within {ASK_TIMEOUT_S:g}s")
        # A fault the old actor was riding out is forgotten with it; the new one degrades anew on its first refusal.
        self._parts.health.recover()
        self._assembly.start_state(self._watch("state"))
        for listener in self._on_state_restarted:
            listener()
        self._assembly.start_orchestrator(self._watch("orchestrator"))
        return self._assembly.resume()

    def _on_failed(self, reason: str) -> None:
        """The runtime failed for good: release every waiter with RuntimeFailed."""
        self._log.error(RUNTIME_FAILED, reason=reason)
        self._parts.milestones.emit(MILESTONE_RUNTIME_FAILED, reason=reason)
        self._parts.admission.fail(RuntimeFailed(f"the runtime failed: {reason}"))

    # --- requests to the central actors ----------------------------------------------------------

    def current(self, kind: Central) -> pykka.ActorRef[Any] | None:
        """The current `kind` actor (None before the first start)."""
        return self._assembly.state if kind == "state" else self._assembly.orchestrator

    def await_replacement(self, kind: Central, ref: pykka.ActorRef[Any] | None) -> bool:
        """Wait (bounded) until the `kind` actor `ref` was replaced; False if the runtime closed or failed instead."""
        with self._replaced:
            self._replaced.wait_for(lambda: self.current(kind) is not ref or self.ending, _RESTART_WAIT_S)
        return self.current(kind) is not ref and not self.ending

    def ask(self, kind: Central, send: Callable[[pykka.ActorRef[Any]], pykka.Future[Any]]) -> Any:
        """`send` a request to the current `kind` actor and return its answer.

        One that is being replaced (it stopped, or stopped before answering) is waited
        for, bounded, and asked again: a restart is not reported as a closed runtime.
        """
        for _ in range(3):  # a replacement that itself stops is rare; a third is not worth waiting for
            ref = self.current(kind)
            if ref is None:
                raise self._parts.admission.unavailable()
            try:
                return answer(send(ref), ref)
            except RuntimeStopped:
                if self.ending:
                    raise self._parts.admission.unavailable() from None
                if not self.await_replacement(kind, ref):
                    if self.ending:
                        raise self._parts.admission.unavailable() from None
                    raise RuntimeStopped(
                        f"the runtime's {kind} actor stopped and was not replaced within {_RESTART_WAIT_S:g}s"
                    ) from None
        raise RuntimeStopped(f"the runtime's {kind} actor stopped again each time it was replaced")
