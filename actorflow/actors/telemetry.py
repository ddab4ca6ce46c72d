"""The runtime's telemetry: metrics counted where they arise, and OpenTelemetry spans.

One `Telemetry` per runtime. Its hooks run on the threads that already own the
values, each structure written by one thread only, so updates take no lock:

    state actor      `on_transition` (every committed transition), `on_terminal` (latency, task span end)
    orchestrator     `call_done` (run time, queue wait, call span)
    submitters       `task_submitted` (task span start), `submit_refused` (the one locked counter)
    runtime          `task_resumed` (the span of a task resumed from a journal)

Spans are only handed over on the central actors' threads: the host's span
processors run on the recorder's own thread (see `core.otel`), so a slow
exporter never holds up a commit or a read.

`MetricsCollector` turns them, and the runtime's fault counters and pool
gauges, into Prometheus metric families when scraped. The library never
registers it anywhere: the embedding program adds it to its own registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from actorflow.actors.messages import RunService, ServiceDone
from actorflow.core.errors import InvalidPayload, Overloaded, RuntimeUnavailable
from actorflow.core.events import TELEMETRY_SPAN_FAILED
from actorflow.core.metrics import Histogram, HistogramSnapshot
from actorflow.core.tracing import TraceContext, get_event_logger
from actorflow.core.types import DEFAULT_PIPELINE, TaskRecord, TaskState, Transition

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from prometheus_client.metrics_core import Metric

    from actorflow.core.otel import SpanRecorder

__all__ = ["DEFAULT_PIPELINE", "MetricsCollector", "MetricsSource", "Telemetry", "pipeline_of"]

_log = get_event_logger("runtime")


def pipeline_of(item: object) -> str:
    """The `pipeline` label of a task record or a service call: the name of its pipeline."""
    name = getattr(item, "pipeline", None)
    return name if isinstance(name, str) and name else DEFAULT_PIPELINE


_TransitionKey = tuple[str, TaskState | None, TaskState]


class Telemetry:
    """Counters, histograms and spans of one runtime.

    Args:
        metrics: count metrics (a few float and int updates per task).
        tracer_provider: OpenTelemetry provider for spans; None for the host's global one.
        name: the runtime's name, the ``runtime`` label of every metric.
    """

    def __init__(
        self, *, metrics: bool = True, tracer_provider: TracerProvider | None = None, name: str = "default"
    ) -> None:
        self.metrics = metrics
        self.name = name
        self.transitions: dict[_TransitionKey, int] = {}
        """(pipeline, from, to) -> count; written by the state actor only."""
        self.stages: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
        """(pipeline, stage) -> (run time, queue wait) in seconds; written by the orchestrator only."""
        self.latencies: dict[str, Histogram] = {}
        """pipeline -> submit-to-terminal seconds; written by the state actor only."""
        self._rejected_lock = threading.Lock()
        self.rejected = 0
        """Submissions refused (bad payload or id, overload)."""
        self.spans: SpanRecorder | None = _span_recorder(tracer_provider)

    # --- submitters ------------------------------------------------------------------------------

    def task_submitted(self, task_id: str, trace: TraceContext, traceparent: str | None) -> TraceContext:
        """A submission is about to be sent: open its span. Returns the trace context the task carries."""
        if self.spans is None:
            return trace
        try:
            return self.spans.start_task(task_id, DEFAULT_PIPELINE, trace, traceparent)
        except Exception as exc:  # noqa: BLE001 - tracing trouble must not refuse a task
            _log.error(TELEMETRY_SPAN_FAILED, task_id=task_id, error=repr(exc))
            return trace

    def task_resumed(self, record: TaskRecord) -> None:
        """A task was resumed from a journal: open its span (it continues the task's trace)."""
        if self.spans is None:
            return
        try:
            self.spans.resume_task(record)
        except Exception as exc:  # noqa: BLE001 - tracing trouble must not stop a task from resuming
            _log.error(TELEMETRY_SPAN_FAILED, task_id=record.task_id, error=repr(exc))

    @property
    def spans_dropped(self) -> int:
        """Spans dropped because the host's span processors fell behind (see `core.otel`)."""
        return 0 if self.spans is None else self.spans.dropped

    def submit_refused(self, task_id: str | None, error: BaseException) -> None:
        """A submission failed: count it (if the caller's fault or overload) and end its span."""
        if isinstance(error, (InvalidPayload, Overloaded)):
            with self._rejected_lock:  # submitters are many threads
                self.rejected += 1
        if self.spans is not None and task_id is not None:
            self.spans.refuse_task(task_id, error)

    # --- the state actor's thread ----------------------------------------------------------------

    def on_transition(self, record: TaskRecord, transition: Transition) -> None:
        """A transition was committed."""
        key = (pipeline_of(record), transition.from_state, transition.to_state)
        transitions = self.transitions
        transitions[key] = transitions.get(key, 0) + 1

    def on_terminal(self, record: TaskRecord) -> None:
        """A task reached a terminal state: its end-to-end latency, and the end of its span."""
        if self.metrics:
            pipeline = pipeline_of(record)
            histogram = self.latencies.get(pipeline)
            if histogram is None:
                histogram = self.latencies[pipeline] = Histogram()
            histogram.observe(max(0.0, record.updated_at - record.created_at))
        if self.spans is not None:
            try:
                self.spans.end_task(record)
            except Exception as exc:  # noqa: BLE001 - the host's exporter must never cost a task its outcome
                _log.error(TELEMETRY_SPAN_FAILED, task_id=record.task_id, error=repr(exc))

    def close(self) -> None:
        """The runtime stopped: end the spans of unfinished tasks, so that the host's exporter gets them."""
        if self.spans is not None:
            try:
                self.spans.abandon_all()
            except Exception as exc:  # noqa: BLE001 - closing must finish whatever the SDK does
                _log.error(TELEMETRY_SPAN_FAILED, error=repr(exc))

    # --- the orchestrator's thread ---------------------------------------------------------------

    def call_done(self, call: RunService, done: ServiceDone) -> None:
        """A service call's report arrived (for a call the pool still knew)."""
        pipeline = pipeline_of(call)
        if self.metrics:
            key = (pipeline, done.service)
            pair = self.stages.get(key)
            if pair is None:
                pair = self.stages[key] = (Histogram(), Histogram())
            pair[0].observe(done.duration_ms / 1000)
            if done.started_at > 0 and call.dispatched_at > 0:
                # Wall clocks of two processes (or nodes): never let skew make a wait negative.
                pair[1].observe(max(0.0, done.started_at - call.dispatched_at))
        if self.spans is not None:
            try:
                self._record_call_span(call, done, pipeline)
            except Exception as exc:  # noqa: BLE001 - the orchestrator's handler must go on whatever the SDK does
                _log.error(TELEMETRY_SPAN_FAILED, task_id=done.task_id, error=repr(exc))

    def _record_call_span(self, call: RunService, done: ServiceDone, pipeline: str) -> None:
        assert self.spans is not None
        failed = done.status != "ok"
        self.spans.record_call(
            task_id=done.task_id,
            pipeline=pipeline,
            stage=done.service,
            attempt=call.attempt,
            log_span_id=call.trace.span_id,
            worker=done.worker,
            started_at=done.started_at,
            duration_ms=done.duration_ms,
            error_type=(done.error_type or "Error") if failed else None,
            error=done.error if failed else None,
            traceback=done.traceback if failed else None,
        )


def _span_recorder(tracer_provider: TracerProvider | None) -> SpanRecorder | None:
    try:
        from actorflow.core.otel import SpanRecorder  # noqa: PLC0415 - opentelemetry-api is optional
    except ImportError:
        return None  # quiet without the `otel` extra, as a library should be
    return SpanRecorder(tracer_provider)


class MetricsSource(NamedTuple):
    """What a collector reads of one runtime: its telemetry, and its `stats()` (fault counters, pools)."""

    telemetry: Telemetry
    stats: Callable[[], Mapping[str, Any]]
    """Raises RuntimeUnavailable (RuntimeStopped, RuntimeFailed, RuntimeNotAnswering) once the runtime's
    actors are gone or do not answer."""


class MetricsCollector:
    """A Prometheus collector of the metrics of one runtime, or of several (needs `prometheus-client`).

    Register it in a registry of your own, e.g. ``REGISTRY.register(runtime.metrics_collector())``.
    Each scrape reads the runtimes' counters; a closed runtime yields only what it counted itself.
    Every sample has a ``runtime`` label, the runtime's name. A registry takes one collector per
    metric name (prometheus_client's default registry refuses a second with DuplicatedTimeseries),
    so several runtimes of one process share one collector: ``first.metrics_collector(second)``.
    """

    def __init__(self, sources: Sequence[MetricsSource]) -> None:
        self._sources = tuple(sources)

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from copies of each runtime's counters, one sample set per runtime."""
        from prometheus_client.core import (  # noqa: PLC0415 - prometheus-client is optional
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def counter(name: str, help_text: str, *labels: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"actorflow_{name}", help_text, labels=["runtime", *labels])

        def gauge(name: str, help_text: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"actorflow_{name}", help_text, labels=["runtime", *labels])

        def histogram(name: str, help_text: str, *labels: str) -> HistogramMetricFamily:
            return HistogramMetricFamily(f"actorflow_{name}", help_text, labels=["runtime", *labels])

        transitions = counter("transitions", "Committed task state transitions.", "pipeline", "from_state", "to_state")
        run_time = histogram("service_run_seconds", "Run time of service calls.", "pipeline", "stage")
        queue_wait = histogram(
            "queue_wait_seconds", "From a service call's dispatch to its start on a worker.", "pipeline", "stage"
        )
        latency = histogram("task_latency_seconds", "From submit to a terminal state.", "pipeline")
        rejected = counter("rejected_submissions", "Submissions refused (bad input, overload).")
        dropped = counter("spans_dropped", "Spans dropped because the host's span processors fell behind.")
        faults = {
            name: counter(name, help_text)
            for name, help_text in (
                ("retries", "Service calls retried after a transient failure."),
                ("timeouts", "Service calls that exceeded the stage timeout."),
                ("restarts", "Workers replaced after a crash, a death or a timeout."),
                ("dead_letters", "Messages to stopped actors, and late results."),
            )
        }
        in_flight = gauge("tasks_in_flight", "Tasks submitted and not yet terminal.")
        busy = gauge("pool_busy_workers", "Workers running a call.", "pool")
        idle = gauge("pool_idle_workers", "Workers with nothing to run.", "pool")
        queued = gauge("pool_queued_calls", "Calls waiting for a worker, or behind another call.", "pool")

        for telemetry, read_stats in self._sources:
            name = telemetry.name
            for (pipeline, from_state, to_state), count in list(telemetry.transitions.items()):
                transitions.add_metric([name, pipeline, from_state.value if from_state else "", to_state.value], count)
            for (pipeline, stage), (runs, waits) in list(telemetry.stages.items()):
                run_time.add_metric([name, pipeline, stage], *_buckets(runs.snapshot()))
                queue_wait.add_metric([name, pipeline, stage], *_buckets(waits.snapshot()))
            for pipeline, latencies in list(telemetry.latencies.items()):
                latency.add_metric([name, pipeline], *_buckets(latencies.snapshot()))
            rejected.add_metric([name], telemetry.rejected)
            dropped.add_metric([name], telemetry.spans_dropped)
            try:
                stats = read_stats()
            except RuntimeUnavailable:
                continue  # the actors are gone: their counters with them
            for fault, family in faults.items():
                family.add_metric([name], stats.get(fault, 0))
            in_flight.add_metric([name], stats["in_flight"])
            for pool, figures in stats.get("pools", {}).items():
                busy.add_metric([name, pool], figures["busy"])
                idle.add_metric([name, pool], max(0, figures["workers"] - figures["busy"]))
                queued.add_metric([name, pool], figures["queued"])

        yield from (transitions, run_time, queue_wait, latency, rejected, dropped)
        for read in (*faults.values(), in_flight, busy, idle, queued):
            if read.samples:  # read from the actors: none when every runtime is closed (absent, not a zero)
                yield read


def _buckets(snapshot: HistogramSnapshot) -> tuple[list[tuple[str, float]], float]:
    """Prometheus' cumulative (le, count) pairs, +Inf last, and the sum."""
    bounds, counts, total = snapshot
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        cumulative.append((repr(float(bound)), running))
    running += counts[-1]
    cumulative.append(("+Inf", running))
    return cumulative, total
