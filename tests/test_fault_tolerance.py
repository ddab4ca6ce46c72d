"""Fault tolerance: retries, supervision, timeouts, cancellation, backpressure, dead letters, shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest
from structlog.testing import capture_logs

from actorflow.actors import Runtime
from actorflow.actors.backends.thread import ServiceWorker
from actorflow.api import create_app, serve_in_background
from actorflow.core import Overloaded, RuntimeConfig, RuntimeStopped, Task, TaskNotFound, TaskState, TransientError
from actorflow.services import ServiceSet
from tests.conftest import MilestoneLog, payload
from tests.faults import CHAOS_MAX_VALUE_BYTES, ChaosProcessor, Gate, chaos_fault, expected_outcome

S = TaskState
ROOT = Path(__file__).resolve().parent.parent


class FlakyThenFine:
    """Raises `error` on the first `failures` calls of each task, then succeeds."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.attempts: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def __call__(self, task: Task) -> Mapping[str, Any]:
        with self.lock:
            self.attempts.setdefault(task.task_id, []).append(task.attempt)
            calls = len(self.attempts[task.task_id])
        if calls <= self.failures:
            raise self.error
        return {"attempt": task.attempt}


# --- retries ---------------------------------------------------------------------------------------


def test_a_transient_error_is_retried_with_the_attempt_recorded_until_it_succeeds() -> None:
    flaky = FlakyThenFine(2, TransientError("try again"))
    with capture_logs() as logs, Runtime(services=ServiceSet(process=flaky)) as runtime:
        record = runtime.submit(payload()).result(timeout=10)
        stats = runtime.stats()
    assert record.state is S.COMPLETED
    assert flaky.attempts[record.task_id] == [1, 2, 3]
    assert record.result == {"attempt": 3}
    assert (record.calls, record.retries) == (5, 2)  # validate + 3 processor attempts + persist; 2 were retries
    assert stats["retries"] == 2
    scheduled = [e for e in logs if e["event"] == "service.retry_scheduled"]
    assert [e["attempt"] for e in scheduled] == [2, 3]
    assert all(e["trace_id"] == record.trace_id for e in scheduled)
    failed = [e for e in logs if e["event"] == "service.failed" and e["task_id"] == record.task_id]
    assert [(e["attempt"], e["transient"]) for e in failed] == [(1, True), (2, True)]


def test_when_attempts_run_out_the_task_fails_with_the_last_error_and_the_count() -> None:
    flaky = FlakyThenFine(10, TransientError("still down"))
    config = RuntimeConfig(max_attempts=3)
    with Runtime(config, services=ServiceSet(process=flaky)) as runtime:
        record = runtime.submit(payload()).result(timeout=10)
    assert record.state is S.FAILED
    assert record.error == "processor: TransientError: still down (gave up after 3 attempts)"
    assert flaky.attempts[record.task_id] == [1, 2, 3]


def test_a_permanent_error_is_not_retried() -> None:
    flaky = FlakyThenFine(10, KeyError("missing"))
    with Runtime(services=ServiceSet(process=flaky)) as runtime:
        record = runtime.submit(payload()).result(timeout=10)
        assert runtime.stats()["retries"] == 0
    assert record.state is S.FAILED
    assert flaky.attempts[record.task_id] == [1]


def test_backoff_grows_exponentially_with_full_jitter_and_is_capped() -> None:
    flaky = FlakyThenFine(4, TransientError("x"))
    config = RuntimeConfig(max_attempts=5, retry_backoff_s=0.001, retry_backoff_max_s=0.004)
    with capture_logs() as logs, Runtime(config, services=ServiceSet(process=flaky)) as runtime:
        assert runtime.submit(payload()).result(timeout=10).state is S.COMPLETED
    delays = [e["delay_ms"] for e in logs if e["event"] == "service.retry_scheduled"]
    caps = [1.0, 2.0, 4.0, 4.0]
    assert len(delays) == 4
    assert all(0 <= delay <= cap for delay, cap in zip(delays, caps, strict=True))


# --- supervision -----------------------------------------------------------------------------------


def test_a_service_raising_system_exit_is_contained_its_worker_replaced_and_the_task_retried() -> None:
    flaky = FlakyThenFine(1, SystemExit("bye"))
    with Runtime(services=ServiceSet(process=flaky, workers={"processor": 2})) as runtime:
        record = runtime.submit(payload()).result(timeout=10)
        others = [runtime.submit(payload(i)).result(timeout=10) for i in range(1, 4)]
        pool = runtime.stats()["pools"]["processor"]
    assert record.state is S.COMPLETED
    assert flaky.attempts[record.task_id] == [1, 2]
    assert all(r.state is S.COMPLETED for r in others)  # no other actor was stopped
    assert (pool["workers"], pool["size"], pool["restarts"], pool["failing"]) == (2, 2, 4, None)  # one per task


def test_a_worker_actor_that_dies_is_replaced_and_the_pool_keeps_its_size() -> None:
    milestones = MilestoneLog()
    with Runtime(on_milestone=milestones) as runtime:
        runtime.submit(payload()).result(timeout=10)
        victim = next(ref for ref in pykka.ActorRegistry.get_by_class(ServiceWorker))
        victim.stop(block=True, timeout=5)
        assert milestones.wait_for("worker.restarted")
        stats = runtime.stats()
        assert runtime.submit(payload(2)).result(timeout=10).state is S.COMPLETED
    assert stats["restarts"] == 1
    assert all(p["workers"] == p["size"] for p in stats["pools"].values())


def test_a_task_that_crashes_every_worker_it_touches_fails_after_its_own_attempts_through_the_pools_cool_downs() -> (
    None
):
    def always_exits(task: Task) -> Mapping[str, Any]:
        raise SystemExit("crash loop")

    milestones = MilestoneLog()
    config = RuntimeConfig(max_restarts=2, restart_window_s=0.2, max_attempts=5, retry_backoff_s=0.0)
    services = ServiceSet(process=always_exits, workers={"processor": 1})
    with Runtime(config, services=services, on_milestone=milestones) as runtime:
        record = runtime.submit(payload()).result(timeout=30)
        stats = runtime.stats()
    assert record.state is S.FAILED
    assert record.error == "processor: SystemExit: crash loop (gave up after 5 attempts)"
    assert (record.calls, record.retries) == (6, 4)  # validate, then five processor calls: each crash charged
    assert milestones.count("pool.failing") >= 1  # past max_restarts, its retries waited for a cool-down
    assert stats["restarts"] == 5


# --- timeouts --------------------------------------------------------------------------------------


def test_a_call_overrunning_the_stage_timeout_is_retried_on_a_fresh_worker_and_its_late_result_is_a_dead_letter() -> (
    None
):
    release = threading.Event()
    hung_once: set[str] = set()
    lock = threading.Lock()
    late = threading.Event()

    def process(task: Task) -> Mapping[str, Any]:
        with lock:
            first = task.task_id not in hung_once
            hung_once.add(task.task_id)
        if first:
            release.wait(30)
            late.set()
            return {"late": True}
        return {"attempt": task.attempt}

    config = RuntimeConfig(stage_timeout_s=0.2)
    milestones = MilestoneLog()
    services = ServiceSet(process=process, workers={"processor": 1})
    with Runtime(config, services=services, on_milestone=milestones) as runtime:
        record = runtime.submit(payload()).result(timeout=10)
        assert record.state is S.COMPLETED
        assert record.result == {"attempt": 2}
        release.set()
        assert late.wait(10)
        assert milestones.wait_for("service.late_result")
        stats = runtime.stats()
    assert stats["timeouts"] == 1
    assert stats["late_results"] == 1
    assert stats["dead_letters"] >= 1
    assert stats["pools"]["processor"]["workers"] == 1


# --- cancellation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["validate", "process", "persist"])
def test_a_task_can_be_cancelled_at_each_stage_and_its_late_result_is_discarded(stage: str) -> None:
    gate = Gate()
    services = ServiceSet(**{stage: getattr(gate, stage)})  # type: ignore[arg-type]
    with Runtime(services=services) as runtime:
        handle = runtime.submit(payload())
        assert gate.entered.wait(10)
        assert handle.cancel() is True
        record = handle.result(timeout=10)
        assert record.state is S.CANCELLED
        gate.opened.set()
        runtime.submit(payload(2)).result(timeout=10)  # the pipeline moved on past the late result
        final = runtime.get(handle.task_id)
        stats = runtime.stats()
        stored = runtime.results.count() if runtime.results is not None else 0
    assert final.state is S.CANCELLED
    assert final.path()[-1] == "CANCELLED"
    assert stats["cancelled"] == 1
    if stage != "persist":
        assert stored == 1  # only the second task's result: the cancelled one was never persisted


def test_cancelling_a_terminal_task_returns_false_and_an_unknown_one_raises(runtime: Runtime) -> None:
    handle = runtime.submit(payload())
    handle.result(timeout=10)
    assert handle.cancel() is False
    assert runtime.get(handle.task_id).state is S.COMPLETED
    with pytest.raises(TaskNotFound):
        runtime.cancel("nope")


@pytest.mark.timeout(60)
def test_two_threads_cancelling_the_same_task_both_get_true_from_the_committed_cancellation() -> None:
    gate = Gate()
    with Runtime(services=ServiceSet(process=gate.process)) as runtime:
        try:
            handles = [runtime.submit(payload(i)) for i in range(300)]
            answers: dict[str, list[bool]] = {handle.task_id: [] for handle in handles}
            barrier = threading.Barrier(2)

            def cancel_each() -> None:
                for handle in handles:
                    barrier.wait(10)  # both threads cancel the same task at the same moment
                    answers[handle.task_id].append(runtime.cancel(handle.task_id))

            threads = [threading.Thread(target=cancel_each) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        finally:
            gate.opened.set()
        assert runtime.join(20)
        assert {h.result(timeout=0).state for h in handles} == {S.CANCELLED}
        assert {task_id: pair for task_id, pair in answers.items() if pair != [True, True]} == {}
        assert runtime.cancel(handles[0].task_id) is True  # idempotent: it is CANCELLED
        assert runtime.stats()["cancelled"] == 300


@pytest.mark.timeout(60)
def test_two_concurrent_http_deletes_of_the_same_task_both_answer_200_with_the_cancelled_record() -> None:
    gate = Gate()
    with (
        Runtime(services=ServiceSet(process=gate.process)) as runtime,
        serve_in_background(create_app(runtime)) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        try:
            task_ids = [runtime.submit(payload(i)).task_id for i in range(30)]
            statuses: dict[str, list[int]] = {task_id: [] for task_id in task_ids}
            barrier = threading.Barrier(2)

            def delete_each() -> None:
                for task_id in task_ids:
                    barrier.wait(10)
                    statuses[task_id].append(client.delete(f"/tasks/{task_id}").status_code)

            threads = [threading.Thread(target=delete_each) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        finally:
            gate.opened.set()
        assert {task_id: pair for task_id, pair in statuses.items() if pair != [200, 200]} == {}


def test_a_task_waiting_for_a_retry_can_be_cancelled() -> None:
    flaky = FlakyThenFine(100, TransientError("down"))
    config = RuntimeConfig(retry_backoff_s=5, retry_backoff_max_s=5, max_attempts=5)
    milestones = MilestoneLog()
    with Runtime(config, services=ServiceSet(process=flaky), on_milestone=milestones) as runtime:
        handle = runtime.submit(payload())
        assert milestones.wait_for("service.retry_scheduled")
        assert handle.cancel() is True
        assert handle.result(timeout=5).state is S.CANCELLED


# --- backpressure ----------------------------------------------------------------------------------


@pytest.fixture
def full_runtime() -> Iterator[tuple[Runtime, Gate]]:
    gate = Gate()
    config = RuntimeConfig(max_in_flight=2, overload="reject")
    runtime = Runtime(config, services=ServiceSet(process=gate.process))
    try:
        yield runtime, gate
    finally:
        gate.opened.set()
        runtime.close()


def test_at_max_in_flight_submit_raises_overloaded_at_once_and_nothing_is_half_created(
    full_runtime: tuple[Runtime, Gate],
) -> None:
    runtime, gate = full_runtime
    first, second = runtime.submit(payload(1)), runtime.submit(payload(2))
    with pytest.raises(Overloaded, match="max_in_flight limit of 2"):
        runtime.submit(payload(3), task_id="third")
    with pytest.raises(TaskNotFound):
        runtime.get("third")
    assert runtime.stats()["submitted"] == 2
    gate.opened.set()
    first.result(timeout=10)
    second.result(timeout=10)
    assert runtime.submit(payload(3), task_id="third").result(timeout=10).state is S.COMPLETED


def test_in_wait_mode_submit_waits_for_room_then_gives_up_with_overloaded() -> None:
    gate = Gate()
    config = RuntimeConfig(max_in_flight=1, overload="wait", submit_timeout_s=0.1)
    with Runtime(config, services=ServiceSet(process=gate.process)) as runtime:
        first = runtime.submit(payload(1))
        with pytest.raises(Overloaded, match=r"waited 0\.1s"):
            runtime.submit(payload(2))
        submitted = threading.Event()
        results: list[TaskState] = []

        def submitter() -> None:
            handle = runtime.submit(payload(3))  # waits for room
            submitted.set()
            results.append(handle.result(timeout=10).state)

        waiting = threading.Thread(target=submitter)
        gate.opened.set()
        first.result(timeout=10)
        waiting.start()
        assert submitted.wait(10)
        waiting.join(10)
    assert results == [S.COMPLETED]


def test_a_flood_of_submissions_stays_bounded_by_max_in_flight() -> None:
    peak = 0
    lock = threading.Lock()
    in_flight = 0

    def process(task: Task) -> Mapping[str, Any]:
        return {}

    config = RuntimeConfig(max_in_flight=50, overload="wait", submit_timeout_s=30)
    with Runtime(config, services=ServiceSet(process=process)) as runtime:

        def on_event(event: Any) -> None:
            nonlocal in_flight, peak
            with lock:
                if event.to_state is S.CREATED:
                    in_flight += 1
                elif event.to_state in (S.COMPLETED, S.FAILED, S.CANCELLED):
                    in_flight -= 1
                peak = max(peak, in_flight)

        runtime.subscribe(on_event)
        handles = [runtime.submit(payload(i)) for i in range(2000)]
        assert runtime.join(60)
    assert all(h.done() for h in handles)
    assert peak <= 50


# --- shutdown and dead letters ----------------------------------------------------------------------


def test_close_with_drain_finishes_the_tasks_in_flight() -> None:
    gate = Gate()
    runtime = Runtime(services=ServiceSet(process=gate.process))
    handles = [runtime.submit(payload(i)) for i in range(5)]
    assert gate.entered.wait(10)
    opener = threading.Timer(0.05, gate.opened.set)
    opener.start()
    runtime.close(drain=True, timeout=10)
    opener.join()
    assert all(h.result(timeout=0).state is S.COMPLETED for h in handles)


def test_close_without_drain_stops_at_once_leaving_tasks_unfinished() -> None:
    gate = Gate()
    runtime = Runtime(services=ServiceSet(process=gate.process))
    handle = runtime.submit(payload())
    assert gate.entered.wait(10)
    runtime.close(drain=False)
    gate.opened.set()
    assert not handle.done()


def test_messages_left_in_a_stopping_workers_mailbox_become_counted_dead_letters() -> None:
    gate = Gate()
    runtime = Runtime(services=ServiceSet(process=gate.process, workers={"processor": 1}))
    for index in range(3):
        runtime.submit(payload(index))
    assert gate.entered.wait(10)
    with capture_logs() as logs:
        stopper = threading.Thread(target=runtime.close, kwargs={"drain": False})
        stopper.start()
        gate.opened.set()
        stopper.join(20)
    letters = [e for e in logs if e["event"] == "dead_letter"]
    assert letters, "queued calls dropped by a stopping worker must be logged"
    assert all(e["why"] for e in letters)


def test_a_process_with_a_forever_hung_service_still_exits_promptly() -> None:
    code = (
        "import threading\n"
        "from actorflow.actors import Runtime\n"
        "from actorflow.core import RuntimeConfig\n"
        "from actorflow.services import ServiceSet\n"
        "hang = threading.Event()\n"
        "def process(task):\n"
        "    hang.wait()\n"
        "rt = Runtime(RuntimeConfig(stage_timeout_s=0.1, max_attempts=1), services=ServiceSet(process=process))\n"
        "print(rt.submit({'name': 'a', 'data': 1}).result(timeout=10).state.value, flush=True)\n"
        "rt.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "FAILED"


# --- chaos -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_chaos_five_thousand_tasks_through_a_misbehaving_processor_all_end_right() -> None:
    """Transient and permanent errors, worker crashes, hangs, oversized results and unprintable exceptions.

    Crashes and hangs restart workers more often than `max_restarts` allows within the restart window,
    so the pool's circuit breaker opens and closes again during the run: no task may fail for it.
    """
    seed, count = 20261125, 5000
    chaos = ChaosProcessor(seed)
    milestones = MilestoneLog()
    config = RuntimeConfig(
        stage_timeout_s=1.5,  # far above a healthy call even on a loaded machine, so no healthy call times out
        max_attempts=3,
        retry_backoff_s=0.001,
        retry_backoff_max_s=0.01,
        max_restarts=2,
        restart_window_s=1.0,
        max_value_bytes=CHAOS_MAX_VALUE_BYTES,
    )
    finals: dict[str, int] = {}
    lock = threading.Lock()

    def count_terminal(event: Any) -> None:
        if event.to_state in (S.COMPLETED, S.FAILED, S.CANCELLED):
            with lock:
                finals[event.task_id] = finals.get(event.task_id, 0) + 1

    runtime = Runtime(config, services=ServiceSet(process=chaos), on_milestone=milestones)
    try:
        runtime.subscribe(count_terminal)
        handles = [runtime.submit(payload(i)) for i in range(count)]
        assert runtime.join(100), runtime.stats()
        records = [h.result(timeout=0) for h in handles]
        # The breaker may still be open after the last crash: every opening is followed by a recovery.
        assert milestones.wait_for("pool.recovered", milestones.count("pool.failing"), timeout=10)
        stats = runtime.stats()
        health = runtime.health()
    finally:
        chaos.release.set()
        runtime.close()
    assert len(records) == count
    assert all(r.state in (S.COMPLETED, S.FAILED) for r in records)  # every task terminal
    assert len(finals) == count
    assert set(finals.values()) == {1}
    for index, record in enumerate(records):
        assert record.state.value == expected_outcome(seed, index, 3), (index, record.error)
        fault = chaos_fault(seed, index, 1)
        if fault == "oversized":
            assert "max_value_bytes" in (record.error or ""), record
        if fault == "broken":
            assert "Unprintable" in (record.error or ""), record
    assert milestones.count("pool.failing") >= 1, "the circuit breaker never opened: the test proved nothing"
    pool = stats["pools"]["processor"]
    assert (pool["workers"], pool["failing"]) == (4, None)  # back at full size
    assert health == {"status": "ok"}
    assert stats["timeouts"] > 0
    assert stats["restarts"] >= stats["timeouts"]
    assert stats["retries"] > 0


def test_a_call_queued_behind_one_that_crashes_its_worker_runs_exactly_once() -> None:
    release = threading.Event()
    runs: dict[int, int] = {}
    crashed: list[int] = []
    lock = threading.Lock()

    def process(task: Task) -> Mapping[str, Any]:
        index = task.payload["data"]["index"]
        with lock:
            runs[index] = runs.get(index, 0) + 1
            first_call = not crashed
            if first_call:
                crashed.append(index)
        if first_call:  # whichever task gets here first holds the worker, then crashes it
            release.wait(10)
            raise SystemExit("crash with a call queued behind")
        return {}

    milestones = MilestoneLog()
    services = ServiceSet(process=process, workers={"processor": 1})
    with Runtime(services=services, on_milestone=milestones) as runtime:
        handles = [runtime.submit(payload(0)), runtime.submit(payload(1))]
        assert milestones.wait_for("call.queued")  # the second call waits behind the first
        release.set()
        assert [h.result(timeout=10).state for h in handles] == [S.COMPLETED, S.COMPLETED]
    other = 1 - crashed[0]
    assert runs == {crashed[0]: 2, other: 1}  # the queued call ran once, not on the crashing worker too


def test_closing_without_drain_releases_every_waiter_with_runtime_stopped() -> None:
    gate = Gate()
    runtime = Runtime(services=ServiceSet(process=gate.process))
    handle = runtime.submit(payload())
    assert gate.entered.wait(10)
    outcome: list[BaseException] = []

    def wait_for_result() -> None:
        with pytest.raises(RuntimeStopped) as caught:
            handle.result()
        outcome.append(caught.value)

    waiter = threading.Thread(target=wait_for_result)
    waiter.start()
    runtime.close(drain=False)
    waiter.join(10)
    gate.opened.set()
    assert outcome, "result() must not wait forever once the runtime is closed"
    assert "closed before task" in str(outcome[0])
    assert runtime.join(timeout=1) is True


def test_a_runtime_that_closes_cleanly_posts_no_dead_letters() -> None:
    with capture_logs() as logs:
        with Runtime(RuntimeConfig()) as rt:
            assert rt.submit({"name": "a", "data": 1}).result(timeout=10).state is TaskState.COMPLETED
    dead = [entry for entry in logs if entry["event"] == "dead_letter"]
    assert dead == []  # e.g. no empty TransitionBatch sent to a stopped state actor at shutdown
