"""Structured tracing: every step of a task is an event carrying its trace, and the library stays a library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from actorflow.actors import Runtime, StateActor
from actorflow.cli import demo as run_demo
from actorflow.cli import trace as trace_cli
from actorflow.core import InvalidPayload, InvalidTransition, Task, TaskState
from actorflow.core.tracing import configure_logging, parse_traceparent
from actorflow.services import ServiceSet, seed_pipeline
from tests.conftest import payload

SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline, for a StateActor started by hand."""

ROOT = Path(__file__).resolve().parent.parent


def _events_of(logs: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("task_id") == task_id]


def _step(event: dict[str, Any]) -> str:
    if event["event"] == "task.transition":
        return f"task.transition {event['to_state']}"
    if event["event"].startswith("service."):
        return f"{event['event']} {event['service']}"
    return str(event["event"])


def test_one_task_emits_the_exact_event_sequence_through_the_pipeline() -> None:
    with capture_logs() as logs, Runtime() as runtime:
        record = runtime.submit(payload()).result(timeout=10)
        runtime.join(10)
    assert [_step(e) for e in _events_of(logs, record.task_id)] == [
        "task.submitted",
        "task.transition CREATED",
        "service.call validator",
        "task.transition VALIDATED",
        "task.transition PROCESSING",
        "service.call processor",
        "service.call persistence",
        "task.transition COMPLETED",
        "task.completed",
    ]


def test_every_event_of_a_task_carries_its_trace_id_and_emitter_and_tasks_differ() -> None:
    with capture_logs() as logs, Runtime() as runtime:
        records = [runtime.submit(payload(i)).result(timeout=10) for i in range(3)]
    trace_ids = set()
    for record in records:
        events = _events_of(logs, record.task_id)
        assert {e["trace_id"] for e in events} == {record.trace_id}
        assert len(record.trace_id) == 32
        assert all(e["actor"] for e in events)
        trace_ids.add(record.trace_id)
        services = [e for e in events if e["event"].startswith("service.")]
        for event in services:
            assert event["worker"].startswith(event["service"] + "-")
            assert len(event["span_id"]) == 16
            assert event["parent_span_id"] == record.span_id
            assert event["attempt"] == 1
        calls = [e for e in services if e["event"] == "service.call"]
        assert len(calls) == len(services) == 3  # one event per call
        assert all(e["duration_ms"] >= 0 and e["status"] == "ok" for e in calls)
        assert all(record.created_at <= e["started_at"] <= record.updated_at for e in calls)
        assert len({e["span_id"] for e in calls}) == 3  # one span per service call
        transitions = [e for e in events if e["event"] == "task.transition"]
        assert [(e["from_state"], e["to_state"]) for e in transitions][:2] == [
            (None, "CREATED"),
            ("CREATED", "VALIDATED"),
        ]
    assert len(trace_ids) == 3


def test_a_failing_service_logs_service_failed_with_error_type_and_message_then_task_failed() -> None:
    with capture_logs() as logs, Runtime() as runtime:
        record = runtime.submit({"name": "", "data": 1}).result(timeout=10)
    events = _events_of(logs, record.task_id)
    failed = next(e for e in events if e["event"] == "service.failed")
    assert failed["error_type"] == "ValidationError"
    assert "'name'" in failed["error"]
    assert failed["transient"] is False
    assert events[-1]["event"] == "task.failed"
    assert "ValidationError" in events[-1]["error"]


def test_context_bound_inside_one_service_call_does_not_leak_into_the_next_on_the_same_worker() -> None:
    seen: list[dict[str, Any]] = []

    def process(task: Task) -> Mapping[str, Any]:
        if task.payload["data"]["index"] == 0:
            structlog.contextvars.bind_contextvars(secret="only-for-task-0")
        seen.append(structlog.contextvars.get_contextvars())
        return {}

    with Runtime(services=ServiceSet(process=process, workers={"processor": 1})) as runtime:
        first = runtime.submit(payload(0)).result(timeout=10)
        second = runtime.submit(payload(1)).result(timeout=10)
    assert seen[0]["secret"] == "only-for-task-0"
    assert seen[0]["task_id"] == first.task_id
    assert "secret" not in seen[1]
    assert seen[1]["task_id"] == second.task_id
    assert seen[1]["trace_id"] == second.trace_id


def test_service_code_logging_with_merge_contextvars_gets_the_tasks_trace() -> None:
    def process(task: Task) -> Mapping[str, Any]:
        structlog.get_logger("user").info("inside the processor")
        return {}

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        with Runtime(services=ServiceSet(process=process)) as runtime:
            record = runtime.submit(payload()).result(timeout=10)
    inside = next(e for e in logs if e["event"] == "inside the processor")
    assert (inside["task_id"], inside["trace_id"], inside["service"]) == (record.task_id, record.trace_id, "processor")


def test_an_invalid_transition_request_is_logged_as_rejected_with_what_was_asked_and_why() -> None:
    ref = StateActor.start(pipelines=[SEED])
    state = ref.proxy()
    with capture_logs() as logs:
        state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
        with pytest.raises(InvalidTransition):
            state.transition("t1", TaskState.COMPLETED).get(timeout=5)
    ref.stop()
    rejected = [e for e in logs if e["event"] == "task.transition_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["task_id"] == "t1"
    assert (rejected[0]["from_state"], rejected[0]["to_state"]) == ("CREATED", "COMPLETED")
    assert "cannot go from CREATED to COMPLETED" in rejected[0]["why"]
    assert rejected[0]["log_level"] == "warning"


def test_submit_adopts_a_w3c_traceparent_so_the_callers_trace_continues() -> None:
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with capture_logs() as logs, Runtime() as runtime:
        record = runtime.submit(payload(), traceparent=f"00-{trace_id}-{caller_span}-01").result(timeout=10)
    assert record.trace_id == trace_id
    assert record.parent_span_id == caller_span
    events = _events_of(logs, record.task_id)
    assert {e["trace_id"] for e in events} == {trace_id}
    assert next(e for e in events if e["event"] == "task.submitted")["parent_span_id"] == caller_span


@pytest.mark.parametrize(
    "bad",
    ["", "00-xyz-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01", "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"],
)
def test_a_malformed_traceparent_is_refused_with_the_expected_shape(bad: str) -> None:
    with pytest.raises(ValueError, match="W3C traceparent"):
        parse_traceparent(bad)
    with Runtime() as runtime, pytest.raises(InvalidPayload, match="traceparent"):
        runtime.submit(payload(), traceparent=bad)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False
    )


_RUN_ONE_TASK = """
from actorflow.actors import Runtime
from actorflow.services import ServiceSet

def process(task):
    if task.payload["data"] == 2:
        raise KeyError("zzz")
    return {"ok": True}

with Runtime(services=ServiceSet(process=process)) as rt:
    rt.submit({"name": "a", "data": 1}).result(timeout=10)
    rt.submit({"name": "", "data": 1}).result(timeout=10)
    rt.submit({"name": "b", "data": 2}).result(timeout=10)
"""


def test_an_unconfigured_host_hears_nothing_and_keeps_its_logging_untouched() -> None:
    code = (
        "import logging, structlog\n"
        + _RUN_ONE_TASK
        + "assert not structlog.is_configured()\nassert logging.getLogger().handlers == []\nprint('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
    assert result.stderr == ""


def test_a_host_with_stdlib_logging_gets_the_events_in_its_own_format() -> None:
    code = (
        "import logging\nlogging.basicConfig(level=logging.DEBUG, format='HOST|%(name)s|%(levelname)s|%(message)s')\n"
    )
    result = _run_python(code + _RUN_ONE_TASK)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("HOST|actorflow|INFO|task.completed ") and "trace_id=" in line for line in lines)
    assert any(line.startswith("HOST|actorflow|DEBUG|task.transition ") for line in lines)
    # A fault warns; a payload the validator rejects is the task's outcome, logged at INFO.
    assert any(line.startswith("HOST|actorflow|WARNING|service.failed ") and "KeyError" in line for line in lines)
    assert any(line.startswith("HOST|actorflow|INFO|service.failed ") and "ValidationError" in line for line in lines)
    assert not any("WARNING|service.failed" in line and "ValidationError" in line for line in lines)


def test_a_host_with_its_own_structlog_configuration_gets_the_events_through_it() -> None:
    code = (
        "import structlog, sys\n"
        "structlog.configure(processors=[structlog.processors.KeyValueRenderer(key_order=['event'])],"
        " logger_factory=structlog.PrintLoggerFactory(sys.stdout),"
        " wrapper_class=structlog.make_filtering_bound_logger(20))\n" + _RUN_ONE_TASK
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("event='task.completed'") for line in lines)
    assert not any("task.transition" in line for line in lines)  # DEBUG events filtered by the host's level


def test_the_demo_log_file_is_json_lines_that_the_viewer_checks_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run.jsonl"
    assert run_demo.main(["--tasks", "40", "--log-file", str(log)]) == 0
    lines = log.read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert all({"event", "timestamp", "level"} <= set(e) for e in events)
    assert all(e["timestamp"].endswith("Z") and "T" in e["timestamp"] for e in events)
    names = {e["event"] for e in events}
    assert {
        "runtime.started",
        "task.submitted",
        "task.transition",
        "service.call",
        "service.failed",
        "task.completed",
        "task.failed",
        "runtime.stopped",
    } <= names
    task_events = [e for e in events if e["event"].startswith(("task.", "service."))]
    assert all(e.get("task_id") and e.get("trace_id") and e.get("actor") for e in task_events)
    capsys.readouterr()
    assert trace_cli.main([str(log)]) == 0
    out = capsys.readouterr().out
    assert "VIOLATION" not in out

    doctored = tmp_path / "doctored.jsonl"
    victim = next(i for i, e in enumerate(events) if e["event"] == "task.transition" and e["to_state"] == "COMPLETED")
    bad = dict(events[victim], from_state="CREATED")
    doctored.write_text("\n".join([*lines[:victim], json.dumps(bad), *lines[victim + 1 :]]) + "\n")
    assert trace_cli.main([str(doctored)]) == 1
    assert f"line {victim + 1}" in capsys.readouterr().out


def test_configure_logging_refuses_an_unknown_level() -> None:
    with pytest.raises(ValueError, match="DEBUG, INFO, WARNING, ERROR"):
        configure_logging(level="LOUD")


def test_disabled_events_are_skipped_before_any_formatting() -> None:
    # With structlog configured at WARNING, DEBUG events never reach a processor.
    calls = threading.Event()

    def spy(logger: object, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if event_dict["event"] == "task.transition":
            calls.set()
        return event_dict

    structlog.configure(
        processors=[spy, structlog.testing.LogCapture()], wrapper_class=structlog.make_filtering_bound_logger(30)
    )
    with Runtime() as runtime:
        runtime.submit(payload()).result(timeout=10)
    assert not calls.is_set()
