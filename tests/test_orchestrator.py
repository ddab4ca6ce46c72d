"""The OrchestratorActor with a real StateActor and a backend whose calls the test answers by hand.

Each service call the orchestrator makes lands in a queue; the test answers it
with the `ServiceDone` it chooses, so every step of a task is explicit.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pykka
import pytest

from actorflow.actors import OrchestratorActor, StateActor
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import CreateTask, RunService, ServiceDone
from actorflow.actors.service import Deliver, OnDeath
from actorflow.actors.timer import Timer
from actorflow.core import RuntimeConfig, TaskRecord, TaskState, TransitionEvent
from actorflow.core.pipeline import seed_shape
from actorflow.core.tracing import new_trace

S = TaskState
WAIT_S = 10


class AnsweredWorker:
    """Puts each call it is sent on the backend's queue; the test answers it through `Sent.answer`."""

    def __init__(self, name: str, backend: HandAnsweredBackend, deliver: Deliver) -> None:
        self.name = name
        self._backend = backend
        self._deliver = deliver

    def send(self, call: RunService) -> bool:
        self._backend.messages.put([call.call_id])
        self._backend.sent.put(Sent(call, self.name, self._deliver))
        return True

    def send_many(self, calls: Sequence[RunService]) -> bool:
        self._backend.messages.put([call.call_id for call in calls])
        for call in calls:
            self._backend.sent.put(Sent(call, self.name, self._deliver))
        return True

    def withdraw(self, call_id: int) -> bool:
        return False

    def retire(self) -> None:
        """Nothing runs here."""

    def join(self, timeout: float) -> bool:
        return True


class Sent:
    """One call the orchestrator made, waiting for the test's answer."""

    def __init__(self, call: RunService, worker: str, deliver: Deliver) -> None:
        self.call = call
        self.worker = worker
        self._deliver = deliver

    def answer(self, status: str = "ok", result: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        self._deliver(
            ServiceDone(
                self.call.call_id,
                self.call.service,
                self.call.task.task_id,
                self.worker,
                status,  # type: ignore[arg-type]
                result,
                None if error is None else "ValueError",
                error,
            )
        )


class HandAnsweredBackend:
    name = "by-hand"

    def __init__(self) -> None:
        self.sent: queue.SimpleQueue[Sent] = queue.SimpleQueue()
        self.messages: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        """The call ids of each message a worker got (`send` or `send_many`)."""

    def start_worker(
        self, name: str, service: str, fn: Callable[..., Any], deliver: Deliver, on_death: OnDeath
    ) -> AnsweredWorker:
        return AnsweredWorker(name, self, deliver)

    def close(self) -> None:
        """Nothing to release."""

    def next_call(self, service: str) -> Sent:
        sent = self.sent.get(timeout=WAIT_S)
        assert sent.call.service == service, sent.call
        return sent


def _unused(*args: object) -> None:
    """Never called: the hand-answered backend runs nothing."""


class Rig:
    def __init__(self) -> None:
        self.backend = HandAnsweredBackend()
        self.timer = Timer()
        self.terminal: queue.SimpleQueue[TaskRecord] = queue.SimpleQueue()
        self.state = StateActor.start(on_terminal=self.terminal.put)
        seed = seed_shape(_unused, _unused, _unused)  # the seed's stages; the backend answers their calls
        self.orchestrator = OrchestratorActor.start(
            state=self.state,
            pipelines=(seed,),
            config=RuntimeConfig(validator_workers=1, processor_workers=1, persistence_workers=1),
            backends=dict.fromkeys(seed.stage_names(), self.backend),
            timer=self.timer,
            dead_letters=DeadLetterOffice(),
        )
        self.state.proxy().adopt(self.orchestrator).get(timeout=WAIT_S)

    def create(self, task_id: str) -> None:
        reply: pykka.Future[TaskRecord] = pykka.ThreadingFuture()
        self.state.tell(CreateTask(task_id, {"name": task_id, "data": {}}, new_trace(), reply=reply))
        reply.get(timeout=WAIT_S)

    def close(self) -> None:
        self.orchestrator.stop(block=True, timeout=WAIT_S)
        self.state.stop(block=True, timeout=WAIT_S)
        self.timer.stop()


@pytest.fixture
def rig() -> Iterator[Rig]:
    rig = Rig()
    yield rig
    rig.close()


def test_each_stage_starts_only_after_the_previous_one_is_committed(rig: Rig) -> None:
    events: queue.SimpleQueue[TransitionEvent] = queue.SimpleQueue()
    rig.state.proxy().subscribe(events.put).get(timeout=WAIT_S)
    rig.create("t1")
    rig.backend.next_call("validator").answer()
    assert [events.get(timeout=WAIT_S).to_state for _ in range(3)] == [S.CREATED, S.VALIDATED, S.PROCESSING]
    rig.backend.next_call("processor").answer(result={"rows": 3})
    persist = rig.backend.next_call("persistence")
    assert persist.call.value == {"rows": 3}
    persist.answer()
    record = rig.terminal.get(timeout=WAIT_S)
    assert record.state is S.COMPLETED
    assert record.result == {"rows": 3}


def test_a_permanent_service_error_fails_the_task_with_the_service_and_the_reason(rig: Rig) -> None:
    rig.create("t1")
    rig.backend.next_call("validator").answer("permanent", error="no name")
    record = rig.terminal.get(timeout=WAIT_S)
    assert record.state is S.FAILED
    assert record.error == "validator: ValueError: no name"


def test_a_transition_refused_while_the_task_is_in_flight_fails_the_task_instead_of_stranding_it(rig: Rig) -> None:
    rig.create("t1")
    validating = rig.backend.next_call("validator")
    rig.state.proxy().transition("t1", S.VALIDATED).get(timeout=WAIT_S)  # someone else moved it meanwhile
    validating.answer()  # the orchestrator's "VALIDATED, expected CREATED" is refused
    record = rig.terminal.get(timeout=WAIT_S)
    assert record.state is S.FAILED
    assert "transition to VALIDATED was refused" in (record.error or "")
    assert "not the expected CREATED" in (record.error or "")
