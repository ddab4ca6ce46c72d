"""OpenTelemetry spans of tasks and service calls, through the host's tracer provider.

Needs `opentelemetry-api` only (the ``otel`` extra), and never configures the
SDK: the tracer comes from the provider the runtime was given, or else from
the global one the host set, looked up when a task is submitted. With no
provider set, nothing is recorded, and the runtime keeps its own ids.

One span per task, ``actorflow.task``, from submit to its terminal state, and
one child span per service call, ``actorflow.<stage>``, made in the runtime's
process from the call's measured start and duration (so process and Ray calls
get theirs too).

Ids. The OpenTelemetry API cannot be handed span ids, so the runtime adopts
OTel's instead: the task's trace id and span id in the record and in the logs
*are* the task span's. A service call's span id is OTel's own; the id the logs
give that call is in the span's ``actorflow.span_id`` attribute.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace as otel_trace
from opentelemetry.trace import ProxyTracerProvider, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from actorflow.core.tracing import TraceContext
from actorflow.core.types import TaskRecord, TaskState
from actorflow.core.version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["SpanRecorder"]

_NOOP_PROVIDERS = (ProxyTracerProvider, otel_trace.NoOpTracerProvider)
_PROPAGATOR = TraceContextTextMapPropagator()


class SpanRecorder:
    """Task and call spans of one runtime. Thread-safe (each span is touched by one thread at a time).

    Args:
        tracer_provider: the provider to use; None means the global one, as set by the host.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._explicit = tracer_provider
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._spans: dict[str, Span] = {}
        """Open task spans by task id: opened by a submitter, ended on the state actor's thread."""

    def _current_tracer(self) -> Tracer | None:
        provider = self._explicit if self._explicit is not None else otel_trace.get_tracer_provider()
        if self._explicit is None and isinstance(provider, _NOOP_PROVIDERS):
            return None  # the host set no provider: record nothing, and spend nothing
        if provider is not self._provider:
            self._tracer = provider.get_tracer("actorflow", __version__)
            self._provider = provider
        return self._tracer

    def start_task(self, task_id: str, pipeline: str, trace: TraceContext, traceparent: str | None) -> TraceContext:
        """Open the task's span; returns the trace context the task should carry (the span's ids).

        The parent is `traceparent` if given, else the caller's current OTel span, if any.
        Returns `trace` unchanged when nothing is recorded.
        """
        tracer = self._current_tracer()
        if tracer is None or task_id in self._spans:  # a duplicate id is refused anyway; its span is not ours
            return trace
        context = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent is not None else None
        span = tracer.start_span(
            "actorflow.task",
            context=context,
            kind=SpanKind.INTERNAL,
            attributes={"actorflow.task_id": task_id, "actorflow.pipeline": pipeline},
        )
        ids = span.get_span_context()
        if not ids.is_valid:
            return trace
        parent = otel_trace.get_current_span(context).get_span_context()
        self._spans[task_id] = span
        return TraceContext(
            otel_trace.format_trace_id(ids.trace_id),
            otel_trace.format_span_id(ids.span_id),
            otel_trace.format_span_id(parent.span_id) if parent.is_valid else None,
        )

    def refuse_task(self, task_id: str, error: BaseException) -> None:
        """The submission failed after its span was opened: end the span with the error."""
        span = self._spans.pop(task_id, None)
        if span is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.end()

    def end_task(self, record: TaskRecord) -> None:
        """The task reached a terminal state: end its span at the time of that transition."""
        span = self._spans.pop(record.task_id, None)
        if span is None:
            return
        span.set_attribute("actorflow.state", record.state.value)
        span.set_attribute("actorflow.attempts", record.attempts)
        if record.state is TaskState.FAILED:
            span.set_status(Status(StatusCode.ERROR, record.error or "failed"))
        span.end(end_time=int(record.updated_at * 1e9))

    def record_call(
        self,
        *,
        task_id: str,
        pipeline: str,
        stage: str,
        attempt: int,
        log_span_id: str,
        worker: str,
        started_at: float,
        duration_ms: float,
        error_type: str | None = None,
        error: str | None = None,
        traceback: str | None = None,
    ) -> None:
        """One finished service call, as a child span of its task's span (if that span is recorded)."""
        task_span = self._spans.get(task_id)
        tracer = self._tracer
        if task_span is None or tracer is None or not task_span.is_recording():
            return
        duration_ns = int(duration_ms * 1e6)
        start_ns = int(started_at * 1e9) if started_at > 0 else time.time_ns() - duration_ns
        span = tracer.start_span(
            f"actorflow.{stage}",
            context=otel_trace.set_span_in_context(task_span),
            start_time=start_ns,
            attributes={
                "actorflow.task_id": task_id,
                "actorflow.pipeline": pipeline,
                "actorflow.stage": stage,
                "actorflow.attempt": attempt,
                "actorflow.worker": worker,
                "actorflow.span_id": log_span_id,
            },
        )
        if error_type is not None:
            # What Span.record_exception writes, from the worker's report (the exception stayed there).
            span.add_event(
                "exception",
                {
                    "exception.type": error_type,
                    "exception.message": error or "",
                    "exception.stacktrace": traceback or "",
                },
                timestamp=start_ns + duration_ns,
            )
            span.set_status(Status(StatusCode.ERROR, f"{error_type}: {error}"))
        span.end(end_time=start_ns + duration_ns)

    def abandon_all(self) -> None:
        """The runtime closed: end the spans of tasks that did not finish here (they may resume elsewhere)."""
        while self._spans:
            _, span = self._spans.popitem()
            span.set_attribute("actorflow.state", "unfinished")
            span.end()

    @property
    def open_spans(self) -> int:
        """Task spans not yet ended."""
        return len(self._spans)
