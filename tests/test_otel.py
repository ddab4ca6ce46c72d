"""OpenTelemetry spans: one per task and one per service call, parented and identified as the logs say.

Every test hands the runtime its own SDK TracerProvider (the global one can be
set only once per process), exporting to memory, or over OTLP/HTTP to a
receiver the test runs on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import queue
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from structlog.testing import capture_logs

from actorflow.actors import Runtime
from actorflow.api import create_app, serve_in_background
from actorflow.core import RuntimeConfig, Task, TaskRecord, TaskState
from actorflow.services import ServiceSet
from tests import process_services as ps
from tests.conftest import payload
from tests.faults import Gate

STAGES = ("validator", "processor", "persistence")


def fail_on_request(task: Task) -> Mapping[str, Any]:
    data = task.payload["data"]
    assert isinstance(data, Mapping)
    if data.get("fail"):
        raise KeyError("zzz")
    return {"ok": True}


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return otel_trace.format_trace_id(context.trace_id), otel_trace.format_span_id(context.span_id)


def spans_of(exporter: InMemorySpanExporter, record: TaskRecord) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The task's span and its call spans, by the record's trace id."""
    mine = [s for s in exporter.get_finished_spans() if hex_ids(s)[0] == record.trace_id]
    tasks = [s for s in mine if s.name == "actorflow.task"]
    assert len(tasks) == 1, [s.name for s in mine]
    return tasks[0], [s for s in mine if s.name != "actorflow.task"]


def test_a_task_span_has_one_child_per_call_and_carries_the_records_and_the_logs_ids(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    with capture_logs() as logs, Runtime(tracer_provider=provider) as runtime:
        record = runtime.submit(payload(1)).result(timeout=10)
    task, calls = spans_of(exporter, record)

    assert hex_ids(task) == (record.trace_id, record.span_id)
    assert task.parent is None
    assert record.parent_span_id is None
    assert task.attributes is not None
    assert task.attributes["actorflow.task_id"] == record.task_id
    assert task.attributes["actorflow.pipeline"] == "default"
    assert task.attributes["actorflow.state"] == "COMPLETED"
    assert [c.name for c in sorted(calls, key=lambda c: c.start_time or 0)] == [f"actorflow.{s}" for s in STAGES]
    for call in calls:
        assert call.parent is not None
        assert call.parent.span_id == task.get_span_context().span_id
        assert call.attributes is not None
        assert call.attributes["actorflow.task_id"] == record.task_id
        assert call.attributes["actorflow.stage"] == call.name.removeprefix("actorflow.")
        assert call.attributes["actorflow.attempt"] == 1
        assert call.status.status_code is StatusCode.UNSET
        assert task.start_time is not None
        assert call.start_time is not None
        assert call.end_time is not None
        assert task.end_time is not None
        assert task.start_time <= call.start_time <= call.end_time <= task.end_time
    completed = [e for e in logs if e["event"] == "task.completed"]
    assert [e["trace_id"] for e in completed] == [record.trace_id]


def test_a_failed_call_records_the_exception_and_marks_both_spans_as_errors(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    with capture_logs() as logs, Runtime(tracer_provider=provider, services=ServiceSet(process=fail_on_request)) as rt:
        record = rt.submit(payload(1, fail=True)).result(timeout=10)
    assert record.state is TaskState.FAILED
    task, calls = spans_of(exporter, record)
    (failed,) = [c for c in calls if c.name == "actorflow.processor"]

    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "KeyError: 'zzz'"
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "KeyError"
    assert "in fail_on_request" in str(event.attributes["exception.stacktrace"])
    assert task.status.status_code is StatusCode.ERROR
    (logged,) = [e for e in logs if e["event"] == "service.failed"]
    assert logged["trace_id"] == record.trace_id == hex_ids(failed)[0]
    assert failed.attributes is not None
    assert logged["span_id"] == failed.attributes["actorflow.span_id"]  # the call's id in the logs


def test_a_traceparent_given_at_submit_becomes_the_task_spans_parent(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with Runtime(tracer_provider=provider) as runtime:
        record = runtime.submit(payload(), traceparent=f"00-{trace_id}-{parent}-01").result(timeout=10)
    task, calls = spans_of(exporter, record)

    assert record.trace_id == trace_id
    assert record.parent_span_id == parent
    assert task.parent is not None
    assert task.parent.is_remote
    assert otel_trace.format_span_id(task.parent.span_id) == parent
    assert len(calls) == 3


def test_the_callers_current_span_becomes_the_task_spans_parent_in_submit_and_submit_async(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("the-host")
    with Runtime(tracer_provider=provider) as runtime:
        with tracer.start_as_current_span("request") as caller:
            record = runtime.submit(payload(1)).result(timeout=10)

        async def submit_in_a_span() -> TaskRecord:
            with tracer.start_as_current_span("async request"):
                handle = await runtime.submit_async(payload(2))
                return await handle

        async_record = asyncio.run(submit_in_a_span())
    task, _ = spans_of(exporter, record)
    assert record.trace_id == otel_trace.format_trace_id(caller.get_span_context().trace_id)
    assert task.parent is not None
    assert task.parent.span_id == caller.get_span_context().span_id
    async_task, _ = spans_of(exporter, async_record)
    (async_caller,) = [s for s in exporter.get_finished_spans() if s.name == "async request"]
    assert async_task.parent is not None
    assert async_task.parent.span_id == async_caller.get_span_context().span_id


def test_the_http_api_adopts_the_traceparent_header_of_a_submission(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with Runtime(tracer_provider=provider) as runtime, serve_in_background(create_app(runtime)) as server:
        answer = httpx.post(
            f"{server.url}/tasks",
            json=payload(),
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
            timeout=10,
        )
        assert answer.status_code == 201
        record = runtime.handle(answer.json()["task_id"]).result(timeout=10)
    task, _ = spans_of(exporter, record)
    assert record.trace_id == trace_id
    assert task.parent is not None
    assert otel_trace.format_span_id(task.parent.span_id) == parent


def test_with_no_provider_set_nothing_is_recorded_and_the_runtimes_own_ids_stay() -> None:
    assert isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)  # nobody set one
    with Runtime() as runtime:
        record = runtime.submit(payload()).result(timeout=10)
        assert runtime.telemetry.spans is not None
        assert runtime.telemetry.spans.open_spans == 0
    assert len(record.trace_id) == 32
    assert len(record.span_id) == 16


def test_a_refused_submission_ends_its_span_as_an_error(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = spans
    with Runtime(tracer_provider=provider) as runtime:
        runtime.submit(payload(), task_id="same").result(timeout=10)
        with pytest.raises(Exception, match="already taken"):
            runtime.submit(payload(), task_id="same")
        assert runtime.telemetry.spans is not None
        assert runtime.telemetry.spans.open_spans == 0
    first, refused = [s for s in exporter.get_finished_spans() if s.name == "actorflow.task"]
    assert first.status.status_code is StatusCode.UNSET
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.events[0].name == "exception"
    assert hex_ids(first)[0] != hex_ids(refused)[0]


@pytest.mark.timeout(90)
def test_calls_run_in_worker_processes_get_their_spans_with_the_childs_traceback(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    config = RuntimeConfig(service_backend="process")
    services = ServiceSet(process=ps.fail_permanently, workers={"validator": 1, "processor": 1, "persistence": 1})
    with Runtime(config, services=services, tracer_provider=provider) as runtime:
        record = runtime.submit(payload()).result(timeout=60)
    task, calls = spans_of(exporter, record)
    assert sorted(c.name for c in calls) == ["actorflow.processor", "actorflow.validator"]
    (failed,) = [c for c in calls if c.name == "actorflow.processor"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.events[0].attributes is not None
    assert "in fail_permanently" in str(failed.events[0].attributes["exception.stacktrace"])
    assert record.traceback is not None
    assert "ValueError: cannot compute" in record.traceback
    assert all(c.parent is not None and c.parent.span_id == task.get_span_context().span_id for c in calls)


class _Receiver(http.server.BaseHTTPRequestHandler):
    """A minimal OTLP/HTTP trace receiver: queues each decoded export request."""

    received: queue.Queue[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.put(request)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        return


def test_spans_exported_over_otlp_http_reach_a_receiver_with_the_records_ids() -> None:
    received: queue.Queue[ExportTraceServiceRequest] = queue.Queue()
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    provider = TracerProvider()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=10)))
    try:
        with Runtime(tracer_provider=provider) as runtime:
            record = runtime.submit(payload()).result(timeout=10)
        provider.shutdown()
        exported = []
        while len(exported) < 4:
            request = received.get(timeout=10)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    assert scope_spans.scope.name == "actorflow"
                    exported.extend(scope_spans.spans)
    finally:
        server.shutdown()
        server.server_close()
    by_name = {span.name: span for span in exported}
    assert sorted(by_name) == ["actorflow.persistence", "actorflow.processor", "actorflow.task", "actorflow.validator"]
    assert {span.trace_id for span in exported} == {bytes.fromhex(record.trace_id)}
    task = by_name["actorflow.task"]
    assert task.span_id == bytes.fromhex(record.span_id)
    assert all(by_name[f"actorflow.{s}"].parent_span_id == task.span_id for s in STAGES)
    attributes = {a.key: a.value.string_value for a in task.attributes}
    assert attributes["actorflow.task_id"] == record.task_id


def test_the_span_of_a_task_left_unfinished_at_close_is_ended_as_unfinished(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    release = threading.Event()

    def hold(task: Task) -> Mapping[str, Any]:
        release.wait(10)
        return {"ok": True}

    runtime = Runtime(tracer_provider=provider, services=ServiceSet(process=hold))
    try:
        handle = runtime.submit(payload())
    finally:
        runtime.close(drain=False)
        release.set()
    (task,) = [s for s in exporter.get_finished_spans() if s.name == "actorflow.task"]
    assert task.attributes is not None
    assert task.attributes["actorflow.task_id"] == handle.task_id
    assert task.attributes["actorflow.state"] == "unfinished"


class HeldProcessor(SpanProcessor):
    """A span processor whose `on_end` waits for `release`, as a stalled exporter does; it keeps what it got."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ending = threading.Event()
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ending.set()
        self.release.wait(60)
        self.ended.append(span)


@pytest.mark.timeout(60)
def test_a_span_processor_that_stalls_holds_up_neither_commits_nor_stats_and_gets_every_span_at_close() -> None:
    held = HeldProcessor()
    provider = TracerProvider()
    provider.add_span_processor(held)
    try:
        with Runtime(tracer_provider=provider) as runtime:
            handles = [runtime.submit(payload(i)) for i in range(50)]
            assert held.ending.wait(10)  # a span's end is stuck in the host's processor from now on
            assert runtime.join(10), runtime.stats()  # every task committed meanwhile
            assert runtime.stats()["COMPLETED"] == 50
            assert {h.result(timeout=0).state for h in handles} == {TaskState.COMPLETED}
            held.release.set()
        names = [span.name for span in held.ended]
        assert names.count("actorflow.task") == 50
        assert len(names) == 50 * 4  # each task's span and its three call spans, delivered by close()
        assert runtime.telemetry.spans_dropped == 0
    finally:
        held.release.set()
        provider.shutdown()


@pytest.mark.timeout(90)
def test_spans_a_stalled_processor_cannot_take_are_dropped_and_counted_never_waited_for() -> None:
    held = HeldProcessor()
    provider = TracerProvider()
    provider.add_span_processor(held)
    count = 3000  # four span endings each: more than the 10,000 the recorder holds while the processor stalls
    try:
        with capture_logs() as logs, Runtime(tracer_provider=provider) as runtime:
            for start in range(0, count, 500):
                runtime.submit_many([payload(i) for i in range(start, start + 500)])
            assert runtime.join(30), runtime.stats()
            dropped = runtime.telemetry.spans_dropped
            assert dropped > 0
            held.release.set()
        assert len(held.ended) + runtime.telemetry.spans_dropped == 4 * count
        assert runtime.telemetry.spans_dropped == dropped  # nothing was dropped once the processor caught up
        warnings = [e for e in logs if e["event"] == "telemetry.spans_dropped"]
        assert warnings
        assert sum(e["dropped"] for e in warnings) <= dropped
    finally:
        held.release.set()
        provider.shutdown()


@pytest.mark.timeout(60)
def test_a_task_resumed_from_the_journal_gets_a_span_continuing_its_trace(
    tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    journal = str(tmp_path / "t.db")
    gate = Gate()
    config = RuntimeConfig(journal_path=journal)
    first = Runtime(config, tracer_provider=provider, services=ServiceSet(process=gate.process))
    try:
        task_id = first.submit(payload()).task_id
        assert gate.entered.wait(10)
    finally:
        first.close(drain=False)  # the task is left in PROCESSING; its first span ends "unfinished"
        gate.opened.set()
    with Runtime(config, tracer_provider=provider) as second:
        record = second.handle(task_id).result(timeout=10)
    assert record.state is TaskState.COMPLETED
    tasks = [s for s in exporter.get_finished_spans() if s.name == "actorflow.task"]
    unfinished, resumed = sorted(tasks, key=lambda s: s.start_time or 0)
    assert unfinished.attributes is not None
    assert unfinished.attributes["actorflow.state"] == "unfinished"
    assert resumed.attributes is not None
    assert resumed.attributes["actorflow.resumed"] is True
    assert resumed.attributes["actorflow.task_id"] == task_id
    assert resumed.attributes["actorflow.state"] == "COMPLETED"
    assert hex_ids(resumed)[0] == hex_ids(unfinished)[0] == record.trace_id  # the same trace
    assert resumed.parent is not None
    assert otel_trace.format_span_id(resumed.parent.span_id) == record.span_id == hex_ids(unfinished)[1]
    calls = [s for s in exporter.get_finished_spans() if s.name.startswith("actorflow.") and s not in tasks]
    after = [c for c in calls if c.parent is not None and c.parent.span_id == resumed.get_span_context().span_id]
    assert [c.name for c in after] == ["actorflow.processor", "actorflow.persistence"]
