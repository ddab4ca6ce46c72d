"""The Runtime end to end: submit, pipeline, final states, pools, and a clean close."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.core import (
    ConfigError,
    InvalidPayload,
    Pipeline,
    RuntimeConfig,
    RuntimeStopped,
    Task,
    TaskNotFound,
    TaskState,
    TransitionEvent,
    UnknownPipeline,
    ValidationError,
)
from actorflow.core.pipeline import Stage
from actorflow.services import ServiceSet
from tests.conftest import actor_threads, payload

S = TaskState


def test_a_valid_task_goes_created_validated_processing_completed_with_its_result(runtime: Runtime) -> None:
    record = runtime.submit(payload(1)).result(timeout=10)
    assert record.state is S.COMPLETED
    assert record.path() == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
    assert record.result is not None
    assert record.result["name"] == "task-1"
    assert record.error is None
    assert runtime.results is not None
    assert runtime.results.get(record.task_id) == dict(record.result)


@pytest.mark.parametrize(
    ("bad", "field"),
    [({"data": 1}, "'name'"), ({"name": "", "data": 1}, "'name'"), ({"name": "a", "data": 1, "x": 0}, "'x'")],
)
def test_an_invalid_payload_fails_at_validation_with_the_reason(
    runtime: Runtime, bad: dict[str, Any], field: str
) -> None:
    record = runtime.submit(bad).result(timeout=10)
    assert record.state is S.FAILED
    assert record.path() == ["CREATED", "FAILED"]
    assert record.error is not None
    assert "ValidationError" in record.error
    assert field in record.error


@pytest.mark.timeout(120)
def test_two_thousand_tasks_all_reach_the_right_terminal_state(runtime: Runtime) -> None:
    payloads = [payload(i) if i % 10 else {"name": "", "data": i} for i in range(2000)]
    handles = [runtime.submit(p) for p in payloads]
    records = [h.result(timeout=60) for h in handles]
    for index, record in enumerate(records):
        expected = S.COMPLETED if index % 10 else S.FAILED
        assert record.state is expected, (index, record)
    stats = runtime.stats()
    assert stats["COMPLETED"] == 1800
    assert stats["FAILED"] == 200
    assert stats["submitted"] == 2000
    assert stats["in_flight"] == 0
    assert runtime.results is not None
    assert runtime.results.count() == 1800


@pytest.mark.parametrize("workers", [2, 4])
def test_the_processor_pool_really_runs_its_workers_in_parallel(workers: int) -> None:
    # Each call waits at a barrier sized to the pool: it can only pass if `workers` calls run at once.
    barrier = threading.Barrier(workers, timeout=10)

    def process(task: Task) -> Mapping[str, Any]:
        barrier.wait()
        return {"ok": True}

    config = RuntimeConfig(max_attempts=1)
    with Runtime(config, services=ServiceSet(process=process, workers={"processor": workers})) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(workers * 3)]
        records = [h.result(timeout=30) for h in handles]
    assert all(r.state is S.COMPLETED for r in records), [r.error for r in records]


def test_a_non_mapping_or_non_json_payload_raises_and_creates_nothing(runtime: Runtime) -> None:
    for bad in (["a"], "text", {"name": "a", "data": {1, 2}}, {"name": "a", "data": float("nan")}, {3: "x"}):
        with pytest.raises(InvalidPayload):
            runtime.submit(bad)  # type: ignore[arg-type]
    assert runtime.tasks() == []
    assert runtime.stats()["submitted"] == 0


def test_a_duplicate_task_id_raises_invalid_payload_and_keeps_the_first(runtime: Runtime) -> None:
    first = runtime.submit(payload(1), task_id="job-1")
    with pytest.raises(InvalidPayload, match="already taken"):
        runtime.submit(payload(2), task_id="job-1")
    assert first.result(timeout=10).payload["name"] == "task-1"
    with pytest.raises(InvalidPayload, match="already taken"):
        runtime.submit(payload(3), task_id="job-1")  # also once terminal
    assert len(runtime.tasks()) == 1


def test_the_payload_is_frozen_so_the_caller_cannot_change_a_submitted_task(runtime: Runtime) -> None:
    mine = {"name": "a", "data": {"items": [1]}}
    handle = runtime.submit(mine)
    mine["data"]["items"].append(2)  # type: ignore[index]
    record = handle.result(timeout=10)
    assert record.payload["data"]["items"] == (1,)
    with pytest.raises(TypeError):
        record.payload["name"] = "b"  # type: ignore[index]


def test_result_raises_timeout_error_while_the_task_is_not_terminal() -> None:
    release = threading.Event()

    def process(task: Task) -> Mapping[str, Any]:
        release.wait(10)
        return {}

    with Runtime(services=ServiceSet(process=process)) as runtime:
        handle = runtime.submit(payload())
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.05)
        assert not handle.done()
        release.set()
        assert handle.result(timeout=10).state is S.COMPLETED
        assert handle.done()


def test_get_tasks_and_stats_report_the_current_state(runtime: Runtime) -> None:
    ok = runtime.submit(payload(1))
    bad = runtime.submit({"name": 5, "data": 0})
    ok.result(timeout=10)
    bad.result(timeout=10)
    assert runtime.get(ok.task_id).state is S.COMPLETED
    assert [r.task_id for r in runtime.tasks(S.FAILED)] == [bad.task_id]
    assert [r.task_id for r in runtime.tasks()] == [ok.task_id, bad.task_id]
    stats = runtime.stats()
    assert (stats["COMPLETED"], stats["FAILED"], stats["submitted"], stats["in_flight"]) == (1, 1, 2, 0)
    with pytest.raises(TaskNotFound):
        runtime.get("missing")


def test_subscribers_see_each_transition_and_can_unsubscribe(runtime: Runtime) -> None:
    seen: list[TransitionEvent] = []
    done = threading.Event()

    def on_event(event: TransitionEvent) -> None:
        seen.append(event)
        if event.to_state is S.COMPLETED:
            done.set()

    unsubscribe = runtime.subscribe(on_event)
    handle = runtime.submit(payload())
    assert done.wait(10)
    assert [e.to_state for e in seen if e.task_id == handle.task_id] == [
        S.CREATED,
        S.VALIDATED,
        S.PROCESSING,
        S.COMPLETED,
    ]
    unsubscribe()
    count = len(seen)
    runtime.submit(payload(2)).result(timeout=10)
    assert len(seen) == count


def test_join_waits_until_nothing_is_in_flight() -> None:
    release = threading.Event()

    def process(task: Task) -> Mapping[str, Any]:
        release.wait(10)
        return {}

    with Runtime(services=ServiceSet(process=process)) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(5)]
        assert runtime.join(timeout=0.05) is False
        release.set()
        assert runtime.join(timeout=10) is True
        assert all(h.done() for h in handles)


def test_after_close_submit_raises_runtime_stopped_and_no_thread_is_left_behind() -> None:
    before = set(actor_threads())
    runtime = Runtime()
    runtime.submit(payload()).result(timeout=10)
    assert set(actor_threads()) - before
    runtime.close()
    assert set(actor_threads()) - before == set()
    with pytest.raises(RuntimeStopped):
        runtime.submit(payload())
    runtime.close()  # idempotent


def test_an_exception_inside_the_with_block_still_stops_every_actor() -> None:
    before = set(actor_threads())

    class Boom(Exception):
        pass

    with pytest.raises(Boom), Runtime() as runtime:
        runtime.submit(payload())
        raise Boom
    assert set(actor_threads()) - before == set()


def test_a_custom_validator_rejection_becomes_the_task_error() -> None:
    def validate(p: Mapping[str, Any]) -> None:
        if p.get("data") == "forbidden":
            raise ValidationError("field 'data' may not be 'forbidden'")

    with Runtime(services=ServiceSet(validate=validate)) as runtime:
        record = runtime.submit({"anything": "goes", "data": "forbidden"}).result(timeout=10)
        good = runtime.submit({"anything": "goes"}).result(timeout=10)
    assert record.state is S.FAILED
    assert record.error == "validator: ValidationError: field 'data' may not be 'forbidden'"
    assert good.state is S.COMPLETED


def test_a_processor_that_raises_fails_the_task_with_type_and_message() -> None:
    def process(task: Task) -> Mapping[str, Any]:
        raise ValueError("cannot compute")

    with Runtime(services=ServiceSet(process=process)) as runtime:
        record = runtime.submit(payload()).result(timeout=10)
    assert record.state is S.FAILED
    assert record.error == "processor: ValueError: cannot compute"
    assert record.path() == ["CREATED", "VALIDATED", "PROCESSING", "FAILED"]


def test_reads_on_a_closed_runtime_raise_runtime_stopped_not_pykka_errors() -> None:
    runtime = Runtime()
    handle = runtime.submit(payload())
    handle.result(timeout=10)
    runtime.close()
    assert runtime.closed
    for read in (lambda: runtime.get(handle.task_id), runtime.tasks, runtime.stats, lambda: runtime.subscribe(print)):
        with pytest.raises(RuntimeStopped):
            read()
    with pytest.raises(RuntimeStopped):
        runtime.cancel(handle.task_id)


def test_a_payload_with_a_lone_surrogate_is_refused_as_invalid(runtime: Runtime) -> None:
    with pytest.raises(InvalidPayload, match="lone surrogate"):
        runtime.submit({"name": "\ud800", "data": 1})
    with pytest.raises(InvalidPayload, match="lone surrogate"):
        runtime.submit({"name": "a", "data": {"\udfff": 1}})


HUGE = "x" * 10_000_000


@pytest.mark.parametrize(
    ("call", "error"),
    [
        pytest.param(lambda rt: rt.submit(payload(), task_id=HUGE), InvalidPayload, id="submit-task_id"),
        pytest.param(lambda rt: rt.submit_many([payload()], task_ids=[HUGE]), InvalidPayload, id="submit_many"),
        pytest.param(lambda rt: rt.submit(payload(), traceparent=HUGE), InvalidPayload, id="traceparent"),
        pytest.param(lambda rt: rt.submit(payload(), pipeline=HUGE), UnknownPipeline, id="pipeline"),
        pytest.param(lambda rt: rt.get(HUGE), TaskNotFound, id="get"),
        pytest.param(lambda rt: rt.handle(HUGE), TaskNotFound, id="handle"),
        pytest.param(lambda rt: rt.cancel(HUGE), TaskNotFound, id="cancel"),
        pytest.param(lambda rt: Stage(HUGE, print), ConfigError, id="Stage"),
        pytest.param(lambda rt: Pipeline(HUGE, []), ConfigError, id="Pipeline"),
    ],
)
def test_an_error_quoting_a_huge_user_value_quotes_only_its_start_and_its_length(
    runtime: Runtime, call: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        call(runtime)
    message = str(caught.value)
    assert len(message) < 500, message[:600]
    assert "xxxxxxxx" in message
    assert "10,000,000 chars" in message
