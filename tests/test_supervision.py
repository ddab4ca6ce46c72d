"""Supervision of the central actors, seen from the facade: restarts, callbacks and reads that meet them.

Each test stops central actors for real (pykka's own `stop`, or `ActorRegistry.stop_all`)
and synchronizes on the runtime's milestones, never on time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pykka
import pytest

from actorflow.actors import Milestone, OrchestratorActor, Runtime, StateActor
from actorflow.core import RuntimeConfig, RuntimeFailed, TaskState, TransitionEvent
from actorflow.core.journal import Journal
from actorflow.services import ServiceSet
from tests.conftest import MilestoneLog, payload
from tests.faults import Gate

S = TaskState


def only(cls: type[pykka.Actor]) -> pykka.ActorRef[Any]:
    """The one running actor of `cls` (there is one runtime per test)."""
    refs = pykka.ActorRegistry.get_by_class(cls)
    assert len(refs) == 1, refs
    return refs[0]


# --- close() from a milestone callback ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("milestone", "journal", "victim"),
    [
        ("orchestrator.restarted", False, OrchestratorActor),
        ("state.restarted", True, StateActor),
        ("runtime.failed", False, StateActor),
    ],
)
def test_close_called_from_an_on_milestone_callback_at_a_restart_or_a_failure_returns_and_closes(
    tmp_path: Path, milestone: str, journal: bool, victim: type[pykka.Actor]
) -> None:
    runtimes: list[Runtime] = []
    closed_in_callback = threading.Event()

    def on_milestone(reached: Milestone) -> None:
        if reached.name == milestone:
            runtimes[0].close(drain=False)
            closed_in_callback.set()

    config = RuntimeConfig(journal_path=str(tmp_path / "t.db") if journal else None)
    runtime = Runtime(config, on_milestone=on_milestone)
    runtimes.append(runtime)
    runtime.submit(payload()).result(timeout=10)
    only(victim).stop()
    assert closed_in_callback.wait(10), "close() inside the milestone callback did not return"
    runtime.close()  # returns once the close the callback began has finished
    assert runtime.closed
    assert pykka.ActorRegistry.get_by_class(StateActor) == []
    assert pykka.ActorRegistry.get_by_class(OrchestratorActor) == []


# --- both central actors stopped --------------------------------------------------------------------


def _stop_state_then_orchestrator() -> None:
    state, orchestrator = only(StateActor), only(OrchestratorActor)
    state.stop(block=False)
    orchestrator.stop(block=False)


def _stop_orchestrator_then_state() -> None:
    state, orchestrator = only(StateActor), only(OrchestratorActor)
    orchestrator.stop(block=False)
    state.stop(block=False)


def _stop_every_actor() -> None:
    pykka.ActorRegistry.stop_all(block=False)  # the gated worker cannot stop until the gate opens


STOPS: list[Any] = [
    pytest.param(_stop_state_then_orchestrator, id="state-then-orchestrator"),
    pytest.param(_stop_orchestrator_then_state, id="orchestrator-then-state"),
    pytest.param(_stop_every_actor, id="ActorRegistry.stop_all"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", STOPS)
def test_both_central_actors_stopped_together_with_a_journal_are_restarted_and_every_task_completes(
    tmp_path: Path, stop: Callable[[], None]
) -> None:
    gate = Gate()
    milestones = MilestoneLog()
    seen: list[str] = []
    path = str(tmp_path / "t.db")
    with Runtime(
        RuntimeConfig(journal_path=path), services=ServiceSet(process=gate.process), on_milestone=milestones
    ) as runtime:
        try:
            runtime.subscribe(lambda event: seen.append(event.to_state.value))
            handles = [runtime.submit(payload(i)) for i in range(20)]
            assert gate.entered.wait(10)
            stop()
            assert milestones.wait_for("state.restarted"), [m.name for m in milestones.seen]
            later = [runtime.submit(payload(i)) for i in range(20, 30)]
        finally:
            gate.opened.set()
        assert runtime.join(30), runtime.stats()
        assert {h.result(timeout=0).state for h in handles + later} == {S.COMPLETED}
        assert runtime.health() == {"status": "ok"}
        assert milestones.count("runtime.failed") == 0
        assert seen.count("COMPLETED") >= 10  # the subscription moved to the new StateActor
    with Journal.open_readonly(path) as reader:
        assert reader.counts()["COMPLETED"] == 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", STOPS)
def test_both_central_actors_stopped_together_without_a_journal_fail_the_runtime_naming_the_lost_state(
    stop: Callable[[], None],
) -> None:
    gate = Gate()
    milestones = MilestoneLog()
    runtime = Runtime(services=ServiceSet(process=gate.process), on_milestone=milestones)
    try:
        handle = runtime.submit(payload())
        assert gate.entered.wait(10)
        stop()
        assert milestones.wait_for("runtime.failed")
        with pytest.raises(RuntimeFailed, match="without a journal its tasks cannot be rebuilt"):
            handle.result(timeout=10)
        assert runtime.health()["status"] == "failed"
    finally:
        gate.opened.set()
        runtime.close(drain=False)


# --- reads while a central actor is being replaced --------------------------------------------------


class HeldRestart:
    """An on_milestone callback that holds the supervisor at `<kind>.died` until released.

    It runs on the supervisor thread before the replacement starts, so that
    the test can call the runtime while the actor is gone and not yet replaced.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.log = MilestoneLog()
        self.died = threading.Event()
        self.release = threading.Event()

    def __call__(self, milestone: Milestone) -> None:
        self.log(milestone)
        if milestone.name == f"{self.kind}.died":
            self.died.set()
            self.release.wait(30)


READS: list[Any] = [
    pytest.param("state", lambda rt, task_id: rt.get(task_id).task_id == task_id, id="get-state"),
    pytest.param("state", lambda rt, task_id: rt.stats()["COMPLETED"] == 1, id="stats-state"),
    pytest.param("state", lambda rt, task_id: rt.handle(task_id).done(), id="handle-state"),
    pytest.param("state", lambda rt, task_id: len(rt.tasks()) == 1, id="tasks-state"),
    pytest.param("orchestrator", lambda rt, task_id: rt.stats()["COMPLETED"] == 1, id="stats-orchestrator"),
    pytest.param("orchestrator", lambda rt, task_id: rt.cancel(task_id) is False, id="cancel-orchestrator"),
    pytest.param("state", lambda rt, task_id: callable(rt.subscribe(lambda event: None)), id="subscribe-state"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "read"), READS)
def test_a_read_that_meets_a_central_actor_being_replaced_waits_for_the_replacement_and_answers(
    tmp_path: Path, kind: str, read: Callable[[Runtime, str], bool]
) -> None:
    held = HeldRestart(kind)
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"))
    with Runtime(config, on_milestone=held) as runtime:
        task_id = runtime.submit(payload()).result(timeout=10).task_id
        only(StateActor if kind == "state" else OrchestratorActor).stop()
        assert held.died.wait(10)
        outcome: list[object] = []
        calling = threading.Event()

        def call() -> None:
            calling.set()
            try:
                outcome.append(read(runtime, task_id))
            except Exception as exc:
                outcome.append(exc)

        reader = threading.Thread(target=call)
        reader.start()
        assert calling.wait(10)
        held.release.set()  # the replacement starts only now
        reader.join(20)
        assert outcome == [True]
        assert held.log.wait_for(f"{kind}.restarted")


# --- subscribe() from many threads -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_subscribes_are_each_kept_each_called_and_each_unsubscribed(runtime: Runtime) -> None:
    count = 32
    barrier = threading.Barrier(count)
    calls = [0] * count
    lock = threading.Lock()
    unsubscribes: list[Callable[[], None]] = []

    def subscribe(index: int) -> None:
        def callback(event: TransitionEvent) -> None:
            with lock:
                calls[index] += 1

        barrier.wait(10)
        unsubscribe = runtime.subscribe(callback)
        with lock:
            unsubscribes.append(unsubscribe)

    threads = [threading.Thread(target=subscribe, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(unsubscribes) == count
    task_id = runtime.submit(payload(1)).result(timeout=10).task_id
    runtime.get(task_id)  # answered by the state actor after it has published every earlier event
    with lock:
        assert calls == [4] * count  # CREATED, VALIDATED, PROCESSING, COMPLETED: each callback once each
    for unsubscribe in unsubscribes:
        unsubscribe()
    runtime.get(runtime.submit(payload(2)).result(timeout=10).task_id)
    with lock:
        assert calls == [4] * count  # none is called any more
