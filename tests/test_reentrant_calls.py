"""A blocking call made where it would deadlock raises at once; close() from a callback is scheduled.

Subscriber callbacks run on the StateActor's thread and services on worker
threads. A call that waits for an answer only that thread can give (a read
from a subscriber), or for tasks that need that thread (`result()` or
`join()` from a service), raises WouldDeadlock instead of hanging. `close()`
there hands the close to another thread and returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from actorflow import WouldDeadlock
from actorflow.actors import Runtime
from actorflow.core import JournalError, RuntimeConfig, RuntimeStopped, Task, TaskState, TransitionEvent
from actorflow.core.journal import Journal
from actorflow.services import ServiceSet
from tests.conftest import payload
from tests.faults import Gate

S = TaskState


def _call_in_first_subscriber_event(runtime: Runtime, call: Callable[[TransitionEvent], object]) -> BaseException:
    """Run `call(event)` inside the subscriber for the first event, and return what it raised."""
    raised: list[BaseException] = []
    done = threading.Event()

    def on_event(event: TransitionEvent) -> None:
        if done.is_set():
            return
        try:
            call(event)
        except BaseException as exc:
            raised.append(exc)
        done.set()

    runtime.subscribe(on_event)
    runtime.submit(payload(0))
    assert done.wait(10)
    assert raised, "the call returned instead of raising"
    return raised[0]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda rt, event: rt.handle(event.task_id).result(), id="handle.result()"),
        pytest.param(lambda rt, event: rt.join(), id="join()"),
        pytest.param(lambda rt, event: rt.get(event.task_id), id="get()"),
        pytest.param(lambda rt, event: rt.tasks(), id="tasks()"),
        pytest.param(lambda rt, event: rt.stats(), id="stats()"),
        pytest.param(lambda rt, event: rt.cancel(event.task_id), id="cancel()"),
        pytest.param(lambda rt, event: rt.subscribe(print), id="subscribe()"),
    ],
)
def test_a_blocking_call_inside_a_subscriber_raises_at_once_and_the_runtime_keeps_working(
    runtime: Runtime, call: Callable[[Runtime, TransitionEvent], object]
) -> None:
    started = time.monotonic()
    error = _call_in_first_subscriber_event(runtime, lambda event: call(runtime, event))
    assert isinstance(error, WouldDeadlock), repr(error)
    assert time.monotonic() - started < 5
    assert "subscriber" in str(error)
    assert "another thread" in str(error)
    assert runtime.submit(payload(1)).result(timeout=10).state is S.COMPLETED


@pytest.mark.timeout(20)
def test_submit_with_a_journal_inside_a_subscriber_raises_at_once(tmp_path: Path) -> None:
    with Runtime(RuntimeConfig(journal_path=str(tmp_path / "tasks.db"))) as runtime:
        error = _call_in_first_subscriber_event(runtime, lambda event: runtime.submit(payload(9)))
        assert isinstance(error, WouldDeadlock), repr(error)
        assert runtime.submit(payload(1)).result(timeout=10).state is S.COMPLETED


@pytest.mark.timeout(20)
def test_submit_in_memory_and_unsubscribe_inside_a_subscriber_work(runtime: Runtime) -> None:
    follow_ups: list[str] = []
    seen: list[str] = []
    unsubscribe: Callable[[], None] | None = None
    follow_up_submitted = threading.Event()

    def on_event(event: TransitionEvent) -> None:
        seen.append(event.task_id)
        if event.to_state is S.COMPLETED and not follow_ups:
            assert unsubscribe is not None
            unsubscribe()  # queued ahead of the follow-up's creation: it sees none of its events
            follow_ups.append(runtime.submit(payload(2)).task_id)
            follow_up_submitted.set()

    unsubscribe = runtime.subscribe(on_event)
    runtime.submit(payload(1)).result(timeout=10)
    assert follow_up_submitted.wait(10)
    assert runtime.handle(follow_ups[0]).result(timeout=10).state is S.COMPLETED
    assert follow_ups[0] not in seen
    assert runtime.join(10)


def _service_calling(call: Callable[[Task], object], raised: list[BaseException]) -> Callable[[Task], Any]:
    def process(task: Task) -> Mapping[str, Any]:
        if task.payload["name"] == "caller":
            try:
                call(task)
            except BaseException as exc:
                raised.append(exc)
                raise
        return {"ok": True}

    return process


@pytest.mark.timeout(20)
@pytest.mark.parametrize("what", ["result", "join"])
def test_waiting_for_tasks_inside_a_service_raises_at_once_and_fails_only_that_task(what: str) -> None:
    raised: list[BaseException] = []
    holder: dict[str, Runtime] = {}

    def call(task: Task) -> object:
        runtime = holder["runtime"]
        return runtime.handle(task.task_id).result() if what == "result" else runtime.join()

    with Runtime(services=ServiceSet(process=_service_calling(call, raised))) as runtime:
        holder["runtime"] = runtime
        record = runtime.submit({"name": "caller", "data": {}}).result(timeout=10)
        assert record.state is S.FAILED
        assert isinstance(raised[0], WouldDeadlock)
        assert "service" in str(raised[0])
        assert runtime.submit(payload(1)).result(timeout=10).state is S.COMPLETED


@pytest.mark.timeout(20)
def test_reading_a_record_inside_a_service_works() -> None:
    seen: list[TaskState] = []
    holder: dict[str, Runtime] = {}

    def process(task: Task) -> Mapping[str, Any]:
        seen.append(holder["runtime"].get(task.task_id).state)
        return {"ok": True}

    with Runtime(services=ServiceSet(process=process)) as runtime:
        holder["runtime"] = runtime
        assert runtime.submit(payload(0)).result(timeout=10).state is S.COMPLETED
    assert seen == [S.PROCESSING]


# --- close() from a callback -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_close_inside_a_subscriber_returns_at_once_and_still_drains_every_task() -> None:
    gate = Gate()
    runtime = Runtime(services=ServiceSet(process=gate.process))
    closing = threading.Event()
    close_took: list[float] = []

    def on_event(event: TransitionEvent) -> None:
        if event.to_state is S.PROCESSING and not closing.is_set():
            closing.set()
            started = time.monotonic()
            runtime.close()  # drain=True
            close_took.append(time.monotonic() - started)

    runtime.subscribe(on_event)
    handles = [runtime.submit(payload(i)) for i in range(5)]
    assert closing.wait(10)
    gate.opened.set()
    runtime.close()  # a second close: returns once the first has finished
    assert close_took
    assert close_took[0] < 2
    assert [h.result(timeout=0).state for h in handles] == [S.COMPLETED] * 5
    with pytest.raises(RuntimeStopped):
        runtime.submit(payload(9))


@pytest.mark.timeout(30)
def test_close_inside_a_service_returns_at_once_and_its_own_task_completes(tmp_path: Path) -> None:
    holder: dict[str, Runtime] = {}
    close_took: list[float] = []

    def process(task: Task) -> Mapping[str, Any]:
        started = time.monotonic()
        holder["runtime"].close()
        close_took.append(time.monotonic() - started)
        return {"ok": True}

    config = RuntimeConfig(journal_path=str(tmp_path / "tasks.db"))
    runtime = Runtime(config, services=ServiceSet(process=process))
    holder["runtime"] = runtime
    handle = runtime.submit(payload(0))
    runtime.join(20)
    runtime.close()
    assert close_took
    assert close_took[0] < 2
    assert handle.result(timeout=0).state is S.COMPLETED
    with Runtime(config) as reopened:  # the first close has finished: the journal is free
        assert reopened.get(handle.task_id).state is S.COMPLETED


@pytest.mark.timeout(30)
def test_a_second_close_returns_only_once_the_first_has_finished_so_the_journal_can_be_reopened(
    tmp_path: Path,
) -> None:
    gate = Gate()
    path = str(tmp_path / "tasks.db")
    runtime = Runtime(RuntimeConfig(journal_path=path), services=ServiceSet(process=gate.process))
    runtime.submit(payload(0))
    assert gate.entered.wait(10)  # the drain now lasts its whole 1 s timeout
    reopen_errors: list[JournalError] = []
    one_at_a_time = threading.Lock()

    def close_then_reopen() -> None:
        runtime.close(timeout=1.0)
        with one_at_a_time:
            try:
                Journal(path).close()
            except JournalError as exc:
                reopen_errors.append(exc)

    closers = [threading.Thread(target=close_then_reopen) for _ in range(2)]
    for thread in closers:
        thread.start()
    for thread in closers:
        thread.join(20)
    gate.opened.set()
    assert reopen_errors == []
