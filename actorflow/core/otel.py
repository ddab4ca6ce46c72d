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

A task resumed from a journal (after a restart) gets a span of its own,
``actorflow.task`` with ``actorflow.resumed`` true, which *continues* its trace:
a child of the task's first span (the record's ``span_id``), in the same trace,
so that a trace viewer shows the task's whole life across restarts. Its call
spans from then on are children of the resumed span.

Threads. Ending a span runs the host's span processors (``on_end``), which may be
slow (an exporter, a lock). Task spans end when the StateActor commits a terminal
state, and call spans are made when the orchestrator hears of a call; neither
actor may wait for the host's code. So they only hand the work to the recorder's
own thread (``actorflow-spans``) through a bounded queue: when it is full, the
span is dropped and counted (`dropped`), never waited for. Every span ends
there; a task's span *starts* on the thread that submits it (or that resumes
it), and the spans of tasks left unfinished end on the closing thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry import trace as otel_trace
from opentelemetry.trace import (
    NonRecordingSpan,
    ProxyTracerProvider,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from actorflow.core.events import TELEMETRY_SPAN_FAILED, TELEMETRY_SPANS_DROPPED
from actorflow.core.tracing import TraceContext, get_event_logger
from actorflow.core.types import TaskRecord, TaskState
from actorflow.core.version import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["SPAN_QUEUE_SIZE", "SpanRecorder"]

_NOOP_PROVIDERS = (ProxyTracerProvider, otel_trace.NoOpTracerProvider)
_PROPAGATOR = TraceContextTextMapPropagator()
_log = get_event_logger("runtime")

SPAN_QUEUE_SIZE = 10_000
"""Span endings waiting for the recorder's thread; past this, spans are dropped (and counted)."""
_CLOSE_WAIT_S = 10.0
"""How long closing waits for the spans still queued to reach the host's processors."""
_DROP_LOG_INTERVAL_S = 5.0


class SpanRecorder:
    """Task and call spans of one runtime. Thread-safe (each span is touched by one thread at a time).

    Args:
        tracer_provider: the provider to use; None means the global one, as set by the host.
        queue_size: span endings that may wait for the recorder's thread before spans are dropped.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None, *, queue_size: int = SPAN_QUEUE_SIZE) -> None:
        self._explicit = tracer_provider
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._spans: dict[str, Span] = {}
        """Open task spans by task id: opened by a submitter (or at resume), handed to the thread to end."""
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        """Guards starting the thread, and `dropped` (producers are the two central actors)."""
        self._closed = False
        self.dropped = 0
        """Spans dropped because the recorder's thread was behind by `queue_size` (the host's processors are slow)."""
        self._dropped_logged = 0
        self._dropped_logged_at = float("-inf")

    def _current_tracer(self) -> Tracer | None:
        provider = self._explicit if self._explicit is not None else otel_trace.get_tracer_provider()
        if self._explicit is None and isinstance(provider, _NOOP_PROVIDERS):
            return None  # the host set no provider: record nothing, and spend nothing
        if provider is not self._provider:
            self._tracer = provider.get_tracer("actorflow", __version__)
            self._provider = provider
        return self._tracer

    # --- the recorder's thread -------------------------------------------------------------------

    def _defer(self, work: Callable[[], None]) -> None:
        """Hand `work` to the recorder's thread without ever waiting; drop it (counted) if the queue is full."""
        if self._thread is None:
            with self._lock:
                if self._closed:
                    return  # the runtime closed: its actors are stopped, nothing more is recorded
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="actorflow-spans", daemon=True)
                    self._thread.start()
        try:
            self._work.put_nowait(work)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - a processor's fault must not end the thread
                _log.error(TELEMETRY_SPAN_FAILED, error=repr(exc))
            if self.dropped != self._dropped_logged:
                self._log_dropped()

    def _log_dropped(self) -> None:
        now = time.monotonic()
        if now - self._dropped_logged_at < _DROP_LOG_INTERVAL_S:
            return
        dropped = self.dropped
        _log.warning(
            TELEMETRY_SPANS_DROPPED,
            dropped=dropped - self._dropped_logged,
            total=dropped,
            why=f"the host's span processors are slower than the runtime; {self._work.maxsize} span endings waited",
        )
        self._dropped_logged, self._dropped_logged_at = dropped, now

    # --- submitters ------------------------------------------------------------------------------

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

    def resume_task(self, record: TaskRecord) -> None:
        """Open the span of a task resumed from a journal: it continues the task's trace (see the module docstring)."""
        tracer = self._current_tracer()
        if tracer is None or record.task_id in self._spans:  # still open: the task resumes within this runtime
            return
        span = tracer.start_span(
            "actorflow.task",
            context=_continuing(record.trace_id, record.span_id),
            kind=SpanKind.INTERNAL,
            attributes={
                "actorflow.task_id": record.task_id,
                "actorflow.pipeline": record.pipeline,
                "actorflow.resumed": True,
                "actorflow.resumed_from": record.state.value,
            },
        )
        if span.get_span_context().is_valid:
            self._spans[record.task_id] = span

    # --- span endings: handed to the recorder's thread -------------------------------------------

    def refuse_task(self, task_id: str, error: BaseException) -> None:
        """The submission failed after its span was opened: end the span with the error."""
        span = self._spans.pop(task_id, None)
        if span is None:
            return
        end_ns = time.time_ns()
        description = f"{type(error).__name__}: {error}"

        def end() -> None:
            span.record_exception(error, timestamp=end_ns)
            span.set_status(Status(StatusCode.ERROR, description))
            span.end(end_time=end_ns)

        self._defer(end)

    def end_task(self, record: TaskRecord) -> None:
        """The task reached a terminal state: end its span, at the time of that transition, on the recorder's thread."""
        span = self._spans.pop(record.task_id, None)
        if span is None:
            return
        state, calls, retries, error = record.state, record.calls, record.retries, record.error
        end_ns = int(record.updated_at * 1e9)

        def end() -> None:
            span.set_attribute("actorflow.state", state.value)
            span.set_attribute("actorflow.calls", calls)
            span.set_attribute("actorflow.retries", retries)
            if state is TaskState.FAILED:
                span.set_status(Status(StatusCode.ERROR, error or "failed"))
            span.end(end_time=end_ns)

        self._defer(end)

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

        def record() -> None:
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

        self._defer(record)

    # --- closing ---------------------------------------------------------------------------------

    def abandon_all(self) -> None:
        """The runtime closed: let the queued spans reach the host (bounded), then end the spans of unfinished tasks.

        Those end as ``actorflow.state`` "unfinished" (they may resume elsewhere). Called
        once the central actors are stopped, on the closing thread.
        """
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            with contextlib.suppress(queue.Full):  # a stuck processor: stop waiting, the thread is a daemon
                self._work.put(None, timeout=_CLOSE_WAIT_S)
            thread.join(_CLOSE_WAIT_S)
        while self._spans:
            _, span = self._spans.popitem()
            span.set_attribute("actorflow.state", "unfinished")
            span.end()

    @property
    def open_spans(self) -> int:
        """Task spans not yet ended (nor handed to the recorder's thread to end)."""
        return len(self._spans)


def _continuing(trace_id: str, span_id: str) -> Context | None:
    """A context whose current span is the (ended, remote) span `span_id` of `trace_id`; None if they are malformed."""
    try:
        parent = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),  # it was recorded: the task's first span was
        )
    except (TypeError, ValueError):
        return None
    if not parent.is_valid:
        return None
    return otel_trace.set_span_in_context(NonRecordingSpan(parent))
