"""The OrchestratorActor with a real StateActor and a backend whose calls the test answers by hand.

Each service call the orchestrator makes lands in a queue; the test answers it
with the `ServiceDone` it chooses, so every step of a task is explicit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pykka
import pytest

from actorflow.actors import OrchestratorActor, StateActor
from actorflow.actors.backends.base import BackendDefaults, Deliver, OnDeath, WorkerDefaults
from actorflow.actors.backends.toolkit import CallClaims
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import CancelTask, CreateTask, RunService, ServiceDone, ServicesDone
from actorflow.actors.plan import plan_pipelines
from actorflow.actors.timer import Timer
from actorflow.core import RuntimeConfig, TaskRecord, TaskState, TransitionEvent
from actorflow.core.tracing import new_trace
from actorflow.services import seed_pipeline

S = TaskState
WAIT_S = 10


class AnsweredWorker(WorkerDefaults):
    """Puts each call it is sent on the backend's queue; the test answers it through `Sent.answer`."""

    def __init__(self, name: str, backend: HandAnsweredBackend, deliver: Deliver) -> None:
        self.name = name
        self._backend = backend
        self._deliver = deliver
        self.claims = CallClaims()
        self.retired = threading.Event()

    def send(self, call: RunService) -> bool:
        return self.send_many([call])

    def send_many(self, calls: Sequence[RunService]) -> bool:
        for call in calls:
            self.claims.sent(call.call_id)
        self._backend.messages.put(([call.call_id for call in calls], self.name))
        for call in calls:
            self._backend.sent.put(Sent(call, self, self._deliver))
        return True

    def withdraw(self, call_id: int) -> bool:
        return self.claims.take(call_id)

    def retire(self) -> None:
        self.retired.set()

    def join(self, timeout: float) -> bool:
        return True


class Sent:
    """One call the orchestrator made, waiting for the test's answer."""

    def __init__(self, call: RunService, worker: AnsweredWorker, deliver: Deliver) -> None:
        self.call = call
        self.worker = worker.name
        self.sent_to = worker
        self._deliver = deliver

    def start(self) -> bool:
        """Claim the call as a worker does before running it. False if it was withdrawn."""
        return self.sent_to.claims.take(self.call.call_id)

    def done(
        self, status: str = "ok", result: Mapping[str, Any] | None = None, error: str | None = None
    ) -> ServiceDone:
        """The report of this call (for the test to deliver, alone or with others)."""
        return ServiceDone(
            self.call.call_id,
            self.call.service,
            self.call.task.task_id,
            self.worker,
            status,  # type: ignore[arg-type]
            result,
            None if error is None else "ValueError",
            error,
        )

    def answer(self, status: str = "ok", result: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        self._deliver(self.done(status, result, error))

    def deliver(self, report: ServiceDone | ServicesDone) -> None:
        """Deliver a report (e.g. several calls' `ServicesDone`) through this call's pool."""
        self._deliver(report)


class HandAnsweredBackend(BackendDefaults):
    name = "by-hand"

    def __init__(self) -> None:
        self.sent: queue.SimpleQueue[Sent] = queue.SimpleQueue()
        self.messages: queue.SimpleQueue[tuple[list[int], str]] = queue.SimpleQueue()
        """The call ids of each message a worker got (`send` or `send_many`), and the worker's name."""

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
        # the seed's stages, one worker each; the backend answers their calls
        seed = seed_pipeline(_unused, _unused, _unused, workers={"validator": 1, "processor": 1, "persistence": 1})
        self.state = StateActor.start(pipelines=[seed], on_terminal=self.terminal.put)
        config = RuntimeConfig()
        self.orchestrator = OrchestratorActor.start(
            state=self.state,
            plans=plan_pipelines([seed], config),
            backends={"thread": self.backend},
            max_value_bytes=config.max_value_bytes,
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


# --- batching: the calls one message makes reach a worker in one message ------------------------------


def _teach_fast_calls(rig: Rig) -> None:
    """Run enough fast tasks one by one for every pool to queue several calls per worker."""
    for number in range(32):
        rig.create(f"warm-{number}")
        for service in ("validator", "processor", "persistence"):
            rig.backend.next_call(service).answer()
        assert rig.terminal.get(timeout=WAIT_S).state is S.COMPLETED
    while not rig.backend.messages.empty():
        rig.backend.messages.get()


def _three_processor_calls_in_one_message(rig: Rig) -> list[Sent]:
    """Create three tasks and answer their validations in one ServicesDone; return the processor calls."""
    validations = []
    for task_id in ("t1", "t2", "t3"):
        rig.create(task_id)
        validations.append(rig.backend.next_call("validator"))
        # Each creation is its own message: its lone call is sent at once, in a message of its own.
        assert rig.backend.messages.get(timeout=WAIT_S)[0] == [validations[-1].call.call_id]
    validations[0].deliver(ServicesDone(tuple(sent.done() for sent in validations)))
    processing = [rig.backend.next_call("processor") for _ in range(3)]
    ids, _ = rig.backend.messages.get(timeout=WAIT_S)
    assert ids == [sent.call.call_id for sent in processing]  # one send_many: one message to the worker
    return processing


def test_the_calls_one_message_makes_reach_a_worker_in_one_send_many_and_a_lone_call_goes_at_once(
    rig: Rig,
) -> None:
    _teach_fast_calls(rig)
    processing = _three_processor_calls_in_one_message(rig)
    assert [sent.call.task.task_id for sent in processing] == ["t1", "t2", "t3"]
    for sent in processing:
        assert sent.start()
        sent.answer()
    for _ in range(3):
        rig.backend.next_call("persistence").answer()
    assert sorted(rig.terminal.get(timeout=WAIT_S).task_id for _ in range(3)) == ["t1", "t2", "t3"]


def test_cancelling_a_task_whose_call_waits_in_a_sent_batch_withdraws_that_call_and_no_other(rig: Rig) -> None:
    _teach_fast_calls(rig)
    first, second, third = _three_processor_calls_in_one_message(rig)
    assert first.start()  # the worker is running the batch's head
    reply: pykka.Future[bool] = pykka.ThreadingFuture()
    rig.orchestrator.tell(CancelTask("t2", reply))
    assert reply.get(timeout=WAIT_S) is True
    assert second.start() is False  # withdrawn: the worker skips it
    assert third.start()
    first.deliver(ServicesDone((first.done(), third.done())))
    for _ in range(2):
        rig.backend.next_call("persistence").answer()
    records = {record.task_id: record for record in (rig.terminal.get(timeout=WAIT_S) for _ in range(3))}
    assert records["t2"].state is S.CANCELLED
    assert records["t1"].state is records["t3"].state is S.COMPLETED
    assert rig.backend.sent.empty()  # nothing of t2 ran after its cancellation


def test_a_crash_in_the_middle_of_a_batch_replaces_the_worker_and_re_sends_only_the_calls_behind_it(
    rig: Rig,
) -> None:
    _teach_fast_calls(rig)
    first, second, third = _three_processor_calls_in_one_message(rig)
    assert first.start()
    assert second.start()
    # The worker ran the head, crashed on the second, and never started the third.
    first.deliver(ServicesDone((first.done(), second.done("crashed", error="SystemExit"))))
    assert second.sent_to.retired.wait(WAIT_S)
    calls = []
    while sum(sent.call.service == "persistence" for sent in calls) < 3:
        sent = rig.backend.sent.get(timeout=WAIT_S)
        calls.append(sent)
        sent.answer()
    reruns = sorted(
        (sent.call.task.task_id, sent.call.attempt, sent.worker) for sent in calls if sent.call.service == "processor"
    )
    # The third, never started, is sent again (not a retry) to the fresh worker; the crashed call is retried.
    assert reruns == [("t2", 2, "processor-2"), ("t3", 1, "processor-2")]
    assert third.worker == "processor-1"
    assert all(rig.terminal.get(timeout=WAIT_S).state is S.COMPLETED for _ in range(3))
    assert rig.backend.sent.empty()  # each call ran once: nothing more was sent
