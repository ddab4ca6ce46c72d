"""Read an actorflow JSON-lines log back and rebuild every task's path.

The runtime logs one JSON object per line (structlog's ``JSONRenderer``). This
module turns such a file back into one timeline per task and checks every
logged state change against the transition table of the task's pipeline: each
``runtime.started`` line carries the tables of the runtime's pipelines, and
each ``task.transition`` line its task's pipeline (the seed pipeline's table
serves logs that carry neither)::

    parse_lines / read_log        one LogEvent or BrokenLine per line, with its number
    build_trace / load_trace      a Trace: one TaskTimeline per task, in order of appearance
    check_transitions             every Violation: not in the table, not continuing from the
                                  previous state, or after a terminal state
    group_failures                FAILED tasks grouped by the stage and error type that failed them
    latency_summary               end-to-end latency percentiles, split into service and waiting time

A task is identified by ``(task_id, trace_id)``: a log that several runs appended
to may reuse a task id, and every submission gets a fresh trace id. An event
that carries no trace id goes to the most recent timeline of its task id.

The checks trust file order only for ``task.transition`` lines. That holds
because the single state actor logs every transition, one after another. Stage
events come from worker threads and may race the state actor's lines (a stage
can finish after the task was cancelled), so they are shown but not checked.

Broken lines (not JSON, not an object, no ``event``, or a task event missing
the fields the viewer needs) never stop the reading: they are collected with
their line number and reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from actorflow.core.types import TERMINAL_STATES, TaskState

__all__ = [
    "BrokenLine",
    "FailureGroup",
    "LatencySummary",
    "LogEvent",
    "ParsedLine",
    "RejectedTransition",
    "RetryScheduled",
    "StageRun",
    "Submitted",
    "Table",
    "TaskOutcome",
    "TaskTimeline",
    "TimelineEntry",
    "Trace",
    "TransitionEntry",
    "Violation",
    "ViolationKind",
    "build_trace",
    "check_timeline",
    "check_transitions",
    "group_failures",
    "latency_summary",
    "load_trace",
    "parse_lines",
    "read_log",
]

Table = Mapping[str, frozenset[str]]
"""A transition table by state names: each state -> the states it may move to."""

_SEED_TABLE: Table = MappingProxyType(
    {
        "CREATED": frozenset({"VALIDATED", "FAILED", "CANCELLED"}),
        "VALIDATED": frozenset({"PROCESSING", "FAILED", "CANCELLED"}),
        "PROCESSING": frozenset({"COMPLETED", "FAILED", "CANCELLED"}),
        "COMPLETED": frozenset(),
        "FAILED": frozenset(),
        "CANCELLED": frozenset(),
    }
)
"""The seed pipeline's table (`actorflow.services.seed_pipeline`), for a log that names no table: logs
written before pipelines were logged with their tables ran the seed. Written out, because `core` cannot
import `services`; tests/test_traceview.py checks that it is the seed pipeline's."""
_TERMINAL_NAMES: frozenset[str] = frozenset(state.value for state in TERMINAL_STATES)
_CREATED = TaskState.CREATED.value

_SERVICE_EVENTS = frozenset({"service.call", "service.failed", "service.started", "service.finished"})
"""A call is one event (``service.call`` or ``service.failed``, carrying its ``started_at``); logs of
versions before it have a ``service.started`` line and a ``service.finished`` line per successful call."""
_OUTCOME_EVENTS = frozenset({"task.completed", "task.failed", "task.cancelled"})
_TASK_EVENTS = frozenset(
    {"task.submitted", "task.transition", "task.transition_rejected", "service.retry_scheduled"}
    | _SERVICE_EVENTS
    | _OUTCOME_EVENTS
)
_RUN_EVENTS = frozenset({"runtime.started", "runtime.stopped"})


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One well-formed line: a JSON object with an ``event`` string."""

    lineno: int
    """1-based line number in the file."""
    event: str
    """The ``event`` field, e.g. ``"task.transition"``."""
    fields: Mapping[str, Any] = field(repr=False)
    """Every field of the line, ``event`` included (read-only)."""
    raw: str = field(repr=False)
    """The line as written, without its line ending."""

    @property
    def timestamp(self) -> str | None:
        """The ISO 8601 ``timestamp`` field, if present."""
        return _opt_str(self.fields, "timestamp")

    @property
    def actor(self) -> str | None:
        """Who emitted the line: "runtime", "state", "orchestrator" or a worker name."""
        return _opt_str(self.fields, "actor")

    @property
    def task_id(self) -> str | None:
        """The ``task_id`` field, if present and a string."""
        return _opt_str(self.fields, "task_id")

    @property
    def trace_id(self) -> str | None:
        """The ``trace_id`` field, if present and a non-empty string."""
        return _opt_str(self.fields, "trace_id") or None


@dataclass(frozen=True, slots=True)
class BrokenLine:
    """A line the viewer could not use, and why."""

    lineno: int
    """1-based line number in the file."""
    raw: str = field(repr=False)
    """The line as written, without its line ending."""
    why: str
    """What is wrong with it, e.g. ``not valid JSON: Expecting ',' delimiter at column 40``."""


ParsedLine = LogEvent | BrokenLine
"""What `parse_lines` yields for every non-blank line."""


def parse_lines(lines: Iterable[str]) -> Iterator[ParsedLine]:
    """Parse JSON lines, yielding a `LogEvent` or a `BrokenLine` for each, numbered from 1.

    Lines may keep or lack their ``\\n``. Blank lines carry nothing and are
    skipped (their numbers still count). A broken last line without a newline is
    said to be cut off, which is what a crash in the middle of a write leaves.
    """
    iterator = iter(enumerate(lines, start=1))
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        lineno, line = current
        raw = line.rstrip("\r\n")
        if raw.strip():
            cut_off = following is None and not line.endswith("\n")
            yield _parse_line(lineno, raw, cut_off=cut_off)
        current = following


def _parse_line(lineno: int, raw: str, *, cut_off: bool) -> ParsedLine:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        hint = " (last line, no newline: cut off mid-write?)" if cut_off else ""
        return BrokenLine(lineno, raw, f"not valid JSON{hint}: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return BrokenLine(lineno, raw, "not valid JSON: nested too deeply")
    if not isinstance(value, dict):
        return BrokenLine(lineno, raw, f"a JSON {_json_kind(value)}, not an object")
    event = value.get("event")
    if not isinstance(event, str) or not event:
        return BrokenLine(lineno, raw, 'a JSON object without an "event" string')
    return LogEvent(lineno, event, MappingProxyType(value), raw)


def read_log(path: str | Path) -> Iterator[ParsedLine]:
    """Parse the JSON-lines file at `path` lazily; see `parse_lines`.

    Bytes that are not UTF-8 are replaced rather than fatal: they only make
    their line broken. Raises `OSError` if the file cannot be opened.
    """
    # newline="\n": only LF ends a line, so a stray CR inside garbage cannot renumber the rest
    with open(path, encoding="utf-8", errors="replace", newline="\n") as file:
        yield from parse_lines(file)


# --------------------------------------------------------------------------- timelines


@dataclass(frozen=True, slots=True)
class Submitted:
    """``task.submitted``: the runtime accepted the task."""

    lineno: int
    timestamp: str | None


@dataclass(frozen=True, slots=True)
class TransitionEntry:
    """``task.transition``: the state actor accepted a state change."""

    lineno: int
    timestamp: str | None
    from_state: str | None
    """None for the creation entry. Kept as logged, so unknown names survive to be reported."""
    to_state: str
    reason: str | None
    attempt: int | None
    raw: str = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RejectedTransition:
    """``task.transition_rejected``: the state actor refused a change (the task did not move)."""

    lineno: int
    from_state: str | None
    """The task's state when the change was asked for."""
    to_state: str | None
    """The state that was asked for."""
    expected: str | None
    why: str | None


@dataclass(frozen=True, slots=True)
class StageRun:
    """One service call: its ``service.call`` or ``service.failed`` line.

    Older logs have a ``service.started`` line as well, joined here with its
    ``service.finished`` or ``service.failed``.
    """

    service: str
    worker: str | None
    attempt: int | None
    span_id: str | None
    node: str | None
    started_line: int | None = None
    """The ``service.started`` line of an older log; None for a call logged as one event."""
    started_at: str | None = None
    """When the call started, in ISO 8601 like ``timestamp`` (the event's ``started_at``, or the start line's)."""
    ended_line: int | None = None
    """None while the call has no end in the log (still running, or the process died)."""
    status: Literal["ok", "failed", "unfinished"] = "unfinished"
    duration_ms: float | None = None
    """As logged by the end of the call, else the time between its start and end lines."""
    error_type: str | None = None
    error: str | None = None
    transient: bool | None = None
    traceback: str | None = None
    """A failed call's traceback, as logged with ``service.failed``."""

    @property
    def lineno(self) -> int:
        """The line the call is shown at: its start line if the log has one, else its one event's."""
        line = self.started_line if self.started_line is not None else self.ended_line
        assert line is not None  # a run is made from at least one of the two lines
        return line


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """``service.retry_scheduled``: a transient failure will be retried after a delay."""

    lineno: int
    service: str | None
    attempt: int | None
    delay_ms: float | None


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """``task.completed``, ``task.failed`` or ``task.cancelled``."""

    lineno: int
    event: str
    state: str | None
    error: str | None
    duration_ms: float | None


TimelineEntry = Submitted | TransitionEntry | RejectedTransition | StageRun | RetryScheduled | TaskOutcome
"""Anything a task's timeline holds, in file order (a stage run sits where it started)."""


@dataclass(frozen=True, slots=True)
class TaskTimeline:
    """Everything the log says about one task (one ``task_id`` under one ``trace_id``)."""

    task_id: str
    trace_id: str | None
    """None only if none of the task's lines carried one."""
    entries: tuple[TimelineEntry, ...]
    first_line: int
    last_line: int
    duration_ms: float | None
    """From the outcome event, else the time between the task's first and last lines."""
    pipeline: str | None = None
    """The task's pipeline, as its transition lines name it (None if they do not)."""
    table: Table | None = field(default=None, repr=False, compare=False)
    """The transition table of that pipeline, from the last ``runtime.started`` line before the task."""

    @property
    def transitions(self) -> tuple[TransitionEntry, ...]:
        """The task's accepted state changes, in file order."""
        return tuple(entry for entry in self.entries if isinstance(entry, TransitionEntry))

    @property
    def stages(self) -> tuple[StageRun, ...]:
        """The task's service calls, in order of start."""
        return tuple(entry for entry in self.entries if isinstance(entry, StageRun))

    @property
    def outcome(self) -> TaskOutcome | None:
        """The last ``task.completed`` / ``task.failed`` / ``task.cancelled`` entry, if any."""
        outcomes = [entry for entry in self.entries if isinstance(entry, TaskOutcome)]
        return outcomes[-1] if outcomes else None

    @property
    def final_state(self) -> str | None:
        """The last logged ``to_state`` (None if no transition was logged)."""
        transitions = self.transitions
        return transitions[-1].to_state if transitions else None

    @property
    def path(self) -> list[str]:
        """The states the task went through, in order (``["CREATED", "VALIDATED", ...]``)."""
        return [entry.to_state for entry in self.transitions]


@dataclass(frozen=True, slots=True)
class Trace:
    """A whole log file, read back."""

    source: str
    """The path read (or a label for in-memory input)."""
    tasks: tuple[TaskTimeline, ...]
    """One timeline per task, in order of first appearance."""
    broken: tuple[BrokenLine, ...]
    events_read: int
    """Well-formed lines used or counted (broken lines excluded)."""
    unknown_events: Mapping[str, int]
    """Events the viewer does not know (``dead_letter``, ``worker.restarted``...), by name."""
    runs: int
    """``runtime.started`` lines: how many runs appended to this file."""

    @property
    def lines_read(self) -> int:
        """Non-blank lines: events read plus broken lines."""
        return self.events_read + len(self.broken)

    def find(self, ident: str) -> tuple[TaskTimeline, ...]:
        """The timelines whose task id or trace id is `ident` (several if the id was reused)."""
        return tuple(task for task in self.tasks if ident in (task.task_id, task.trace_id))


class _TaskBuilder:
    """A timeline while the file is read; frozen into a `TaskTimeline` at the end."""

    __slots__ = (
        "entries",
        "first_line",
        "first_ts",
        "last_line",
        "last_ts",
        "open_stages",
        "pipeline",
        "table",
        "task_id",
        "trace_id",
    )

    def __init__(self, task_id: str, trace_id: str | None, lineno: int) -> None:
        self.task_id = task_id
        self.trace_id = trace_id
        self.entries: list[TimelineEntry] = []
        self.open_stages: dict[str, int] = {}
        """Stage key (span id, else service#attempt) -> index of its run in `entries`."""
        self.first_line = self.last_line = lineno
        self.first_ts: str | None = None
        self.last_ts: str | None = None
        self.pipeline: str | None = None
        self.table: Table | None = None

    def touch(self, event: LogEvent) -> None:
        self.last_line = event.lineno
        timestamp = event.timestamp
        if timestamp is not None:
            self.first_ts = self.first_ts or timestamp
            self.last_ts = timestamp

    def freeze(self) -> TaskTimeline:
        outcome_ms = next(
            (e.duration_ms for e in reversed(self.entries) if isinstance(e, TaskOutcome) and e.duration_ms is not None),
            None,
        )
        return TaskTimeline(
            task_id=self.task_id,
            trace_id=self.trace_id,
            entries=tuple(self.entries),
            first_line=self.first_line,
            last_line=self.last_line,
            duration_ms=outcome_ms if outcome_ms is not None else _ms_between(self.first_ts, self.last_ts),
            pipeline=self.pipeline,
            table=self.table,
        )


class _TraceBuilder:
    def __init__(self) -> None:
        self.order: list[_TaskBuilder] = []
        self.by_key: dict[tuple[str, str], _TaskBuilder] = {}
        self.latest: dict[str, _TaskBuilder] = {}
        """Task id -> its most recently touched timeline, for events without a trace id."""
        self.broken: list[BrokenLine] = []
        self.events_read = 0
        self.unknown: Counter[str] = Counter()
        self.runs = 0
        self.tables: dict[str, Table] = {}
        """Pipeline name -> its transition table, as the latest ``runtime.started`` line gave it."""

    def task_for(self, event: LogEvent, task_id: str) -> _TaskBuilder:
        trace_id = event.trace_id
        latest = self.latest.get(task_id)
        if trace_id is None:
            builder = latest
        else:
            builder = self.by_key.get((task_id, trace_id))
            if builder is None and latest is not None and latest.trace_id is None:
                # the task's earlier lines lacked a trace id: this one names it
                builder = latest
                builder.trace_id = trace_id
                self.by_key[(task_id, trace_id)] = builder
        if builder is None:
            builder = _TaskBuilder(task_id, trace_id, event.lineno)
            self.order.append(builder)
            if trace_id is not None:
                self.by_key[(task_id, trace_id)] = builder
        self.latest[task_id] = builder
        builder.touch(event)
        return builder

    def add(self, parsed: ParsedLine) -> None:
        if isinstance(parsed, BrokenLine):
            self.broken.append(parsed)
            return
        event = parsed
        if event.event not in _TASK_EVENTS:
            self.events_read += 1
            if event.event == "runtime.started":
                self.runs += 1
                self.tables.update(_tables(event.fields.get("transitions")))
            elif event.event not in _RUN_EVENTS:
                self.unknown[event.event] += 1
            return
        problem = _missing_fields(event)
        if problem is not None:
            self.broken.append(BrokenLine(event.lineno, event.raw, problem))
            return
        self.events_read += 1
        task_id = event.task_id
        assert task_id is not None  # checked by _missing_fields
        self.record(self.task_for(event, task_id), event)

    def record(self, task: _TaskBuilder, event: LogEvent) -> None:
        f = event.fields
        name = event.event
        if name == "task.submitted":
            task.entries.append(Submitted(event.lineno, event.timestamp))
        elif name == "task.transition":
            to_state = _opt_str(f, "to_state")
            assert to_state is not None  # checked by _missing_fields
            pipeline = _opt_str(f, "pipeline")
            if pipeline is not None and task.pipeline is None:
                task.pipeline = pipeline
                task.table = self.tables.get(pipeline)
            task.entries.append(
                TransitionEntry(
                    lineno=event.lineno,
                    timestamp=event.timestamp,
                    from_state=_opt_str(f, "from_state"),
                    to_state=to_state,
                    reason=_opt_str(f, "reason"),
                    attempt=_opt_int(f, "attempt"),
                    raw=event.raw,
                )
            )
        elif name == "task.transition_rejected":
            task.entries.append(
                RejectedTransition(
                    lineno=event.lineno,
                    from_state=_opt_str(f, "from_state"),
                    to_state=_opt_str(f, "to_state"),
                    expected=_opt_str(f, "expected"),
                    why=_opt_str(f, "why"),
                )
            )
        elif name == "service.retry_scheduled":
            task.entries.append(
                RetryScheduled(event.lineno, _opt_str(f, "service"), _opt_int(f, "attempt"), _opt_float(f, "delay_ms"))
            )
        elif name in _SERVICE_EVENTS:
            self.record_stage(task, event)
        else:
            task.entries.append(
                TaskOutcome(
                    lineno=event.lineno,
                    event=name,
                    state=_opt_str(f, "state"),
                    error=_opt_str(f, "error"),
                    duration_ms=_opt_float(f, "duration_ms"),
                )
            )

    def record_stage(self, task: _TaskBuilder, event: LogEvent) -> None:
        f = event.fields
        service = _opt_str(f, "service")
        assert service is not None  # checked by _missing_fields
        attempt = _opt_int(f, "attempt")
        span_id = _opt_str(f, "span_id")
        # span ids pair a start with its end; without them, the service and attempt have to do
        key = span_id or f"{service}#{attempt}"
        if event.event == "service.started":
            task.open_stages[key] = len(task.entries)
            task.entries.append(
                StageRun(
                    service=service,
                    worker=_opt_str(f, "worker"),
                    attempt=attempt,
                    span_id=span_id,
                    node=_opt_str(f, "node"),
                    started_line=event.lineno,
                    started_at=event.timestamp,
                )
            )
            return
        index = task.open_stages.pop(key, None)
        if index is None:  # the call's one event (or an older log that holds only the end of the call)
            index = len(task.entries)
            task.entries.append(
                StageRun(
                    service=service,
                    worker=_opt_str(f, "worker"),
                    attempt=attempt,
                    span_id=span_id,
                    node=_opt_str(f, "node"),
                    started_at=_epoch_iso(f.get("started_at")),
                )
            )
        run = task.entries[index]
        assert isinstance(run, StageRun)
        failed = event.event == "service.failed"
        duration = _opt_float(f, "duration_ms")
        if duration is None:
            duration = _ms_between(run.started_at, event.timestamp)
        task.entries[index] = replace(
            run,
            node=run.node or _opt_str(f, "node"),  # Ray logs the node only when the call ends
            ended_line=event.lineno,
            status="failed" if failed else "ok",
            duration_ms=duration,
            error_type=_opt_str(f, "error_type") if failed else None,
            error=_opt_str(f, "error") if failed else None,
            transient=_opt_bool(f, "transient") if failed else None,
            traceback=_opt_str(f, "traceback") if failed else None,
        )

    def freeze(self, source: str) -> Trace:
        return Trace(
            source=source,
            tasks=tuple(builder.freeze() for builder in self.order),
            broken=tuple(self.broken),
            events_read=self.events_read,
            unknown_events=MappingProxyType(dict(self.unknown)),
            runs=self.runs,
        )


def build_trace(parsed: Iterable[ParsedLine], *, source: str = "<lines>") -> Trace:
    """Group parsed lines into one timeline per task; see the module docstring for task identity."""
    builder = _TraceBuilder()
    for line in parsed:
        builder.add(line)
    return builder.freeze(source)


def load_trace(path: str | Path) -> Trace:
    """Read the log at `path` into a `Trace`. Raises `OSError` if it cannot be read."""
    return build_trace(read_log(path), source=str(path))


def _missing_fields(event: LogEvent) -> str | None:
    """Why a task event is unusable, or None if it has what the viewer needs."""
    f = event.fields
    if not event.task_id:
        return f"{event.event} without a task_id string"
    if event.event == "task.transition":
        if _opt_str(f, "to_state") is None:
            return "task.transition without a to_state string"
        if f.get("from_state") is not None and _opt_str(f, "from_state") is None:
            return "task.transition whose from_state is neither a string nor null"
    if event.event in _SERVICE_EVENTS and not _opt_str(f, "service"):
        return f"{event.event} without a service name"
    return None


# --------------------------------------------------------------------------- checks

ViolationKind = Literal["not_allowed", "discontinuous", "after_terminal", "unknown_state"]
"""Why a transition line is wrong:

- ``not_allowed``: the table has no such move (creation must be None -> CREATED).
- ``discontinuous``: its from_state is not the task's previous to_state.
- ``after_terminal``: the task had already reached COMPLETED, FAILED or CANCELLED.
- ``unknown_state``: a state name that is not a `TaskState`.
"""


@dataclass(frozen=True, slots=True)
class Violation:
    """A ``task.transition`` line that breaks the lifecycle."""

    lineno: int
    task_id: str
    trace_id: str | None
    from_state: str | None
    to_state: str
    kind: ViolationKind
    """The first problem found; `why` lists them all."""
    why: str
    raw: str = field(repr=False)
    """The offending line, as written."""

    def describe(self) -> str:
        """One line for an operator: where, which task, which move, and why it is wrong."""
        return f"line {self.lineno}: task {self.task_id}: {self.from_state} -> {self.to_state}: {self.why}"


def check_timeline(timeline: TaskTimeline, *, table: Table | None = None) -> list[Violation]:
    """Check one task's transitions in file order; see `check_transitions`.

    `table` overrides the timeline's own (its pipeline's, else the seed's).
    """
    violations: list[Violation] = []
    previous: TransitionEntry | None = None
    chosen = table or timeline.table or _SEED_TABLE
    for entry in timeline.transitions:
        problems = _judge(previous, entry, chosen)
        if problems:
            violations.append(
                Violation(
                    lineno=entry.lineno,
                    task_id=timeline.task_id,
                    trace_id=timeline.trace_id,
                    from_state=entry.from_state,
                    to_state=entry.to_state,
                    kind=problems[0][0],
                    why="; ".join(why for _, why in problems),
                    raw=entry.raw,
                )
            )
        # carry on from what the log says happened, so one bad line yields one violation
        previous = entry
    return violations


def check_transitions(trace: Trace) -> list[Violation]:
    """Every ``task.transition`` that breaks the lifecycle, in file order.

    A transition must be in its task's pipeline's table (the seed pipeline's when
    the log does not say; creation is None -> CREATED),
    must start from the state the task's previous transition reached (None
    before the first), and must not follow a terminal state.
    """
    violations = [violation for task in trace.tasks for violation in check_timeline(task)]
    violations.sort(key=lambda violation: violation.lineno)
    return violations


def _judge(previous: TransitionEntry | None, entry: TransitionEntry, table: Table) -> list[tuple[ViolationKind, str]]:
    unknown = [state for state in (entry.from_state, entry.to_state) if state is not None and state not in table]
    if unknown:
        known = ", ".join(table)
        return [("unknown_state", f"{' and '.join(unknown)} is not a task state (known: {known})")]
    prev_state = previous.to_state if previous else None
    if previous is not None and prev_state in _TERMINAL_NAMES:
        return [
            (
                "after_terminal",
                f"the task was already {prev_state} at line {previous.lineno}; nothing may follow a terminal state",
            )
        ]
    problems: list[tuple[ViolationKind, str]] = []
    if entry.from_state != prev_state:
        if previous is None:
            why = "it is the task's first transition in the log, so it must be the creation None -> CREATED"
        else:
            why = f"the task was in {prev_state} (line {previous.lineno}), not {entry.from_state}"
        problems.append(("discontinuous", f"does not continue from the previous state: {why}"))
    if entry.from_state is None:
        if entry.to_state != _CREATED:
            problems.append(("not_allowed", f"a task is created in {_CREATED}, not {entry.to_state}"))
    elif entry.to_state not in table[entry.from_state]:
        targets = sorted(table[entry.from_state])
        allowed = f"only to {', '.join(targets)}" if targets else f"nowhere ({entry.from_state} is terminal)"
        problems.append(("not_allowed", f"not in the transition table: {entry.from_state} may move {allowed}"))
    return problems


def _tables(value: object) -> dict[str, Table]:
    """The ``transitions`` field of a ``runtime.started`` line: pipeline -> state -> [states]; bad parts are skipped."""
    tables: dict[str, Table] = {}
    if not isinstance(value, Mapping):
        return tables
    for name, table in value.items():
        if isinstance(name, str) and isinstance(table, Mapping):
            tables[name] = MappingProxyType(
                {
                    str(state): frozenset(str(target) for target in targets)
                    for state, targets in table.items()
                    if isinstance(targets, list)
                }
            )
    return tables


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array"


def _ms_between(start: str | None, end: str | None) -> float | None:
    if start is None or end is None:
        return None
    try:
        delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    except (ValueError, TypeError):  # TypeError: one aware and one naive timestamp
        return None
    return delta.total_seconds() * 1000


def _epoch_iso(value: object) -> str | None:
    """Seconds since the epoch as an ISO 8601 UTC timestamp, shaped like the ``timestamp`` field."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # far outside the dates a log can hold
        return None


def _opt_str(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


def _opt_int(fields: Mapping[str, Any], key: str) -> int | None:
    value = fields.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_float(fields: Mapping[str, Any], key: str) -> float | None:
    value = fields.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _opt_bool(fields: Mapping[str, Any], key: str) -> bool | None:
    value = fields.get(key)
    return value if isinstance(value, bool) else None


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """FAILED tasks that failed in the same stage with the same error type."""

    stage: str
    """The service whose call failed the task ("?" when the log does not say)."""
    error_type: str
    count: int
    task_ids: tuple[str, ...]
    """The first few tasks of the group, as examples."""
    example_error: str | None
    example_traceback: str | None


def group_failures(timelines: Iterable[TaskTimeline], *, examples: int = 3) -> list[FailureGroup]:
    """Every FAILED task, grouped by (stage, error type), the largest group first."""
    groups: dict[tuple[str, str], list[tuple[str, str | None, str | None]]] = {}
    for timeline in timelines:
        if timeline.final_state != TaskState.FAILED.value:
            continue
        failed = [run for run in timeline.stages if run.status == "failed"]
        outcome = timeline.outcome
        if failed:
            run = failed[-1]
            key = (run.service, run.error_type or "?")
            error, traceback = run.error, run.traceback
        else:  # no service.failed line (a failing pool, or an INFO log without it): read the outcome's error
            error = outcome.error if outcome is not None else None
            stage, _, rest = (error or "").partition(": ")
            error_type = rest.partition(": ")[0] if rest else ""
            key = (stage or "?", error_type if error_type.isidentifier() else "?")
            traceback = None
        groups.setdefault(key, []).append((timeline.task_id, error, traceback))
    result = [
        FailureGroup(
            stage=stage,
            error_type=error_type,
            count=len(members),
            task_ids=tuple(task_id for task_id, _, _ in members[:examples]),
            example_error=members[0][1],
            example_traceback=members[0][2],
        )
        for (stage, error_type), members in groups.items()
    ]
    return sorted(result, key=lambda group: (-group.count, group.stage, group.error_type))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles (ms) of finished tasks' end-to-end latency, and of its two parts.

    ``service`` is the time inside service calls; ``waiting`` is the rest: queues
    in front of workers, retry backoff, and the hand-offs between actors.
    """

    tasks: int
    end_to_end: dict[str, float]
    service: dict[str, float]
    waiting: dict[str, float]


_PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))


def latency_summary(timelines: Iterable[TaskTimeline]) -> LatencySummary | None:
    """Latency percentiles over the terminal tasks whose duration the log gives; None if there are none."""
    totals: list[float] = []
    in_service: list[float] = []
    waiting: list[float] = []
    for timeline in timelines:
        if timeline.final_state not in _TERMINAL_NAMES or timeline.duration_ms is None:
            continue
        service = sum(run.duration_ms or 0.0 for run in timeline.stages)
        totals.append(timeline.duration_ms)
        in_service.append(service)
        waiting.append(max(0.0, timeline.duration_ms - service))
    if not totals:
        return None
    return LatencySummary(
        tasks=len(totals),
        end_to_end=_percentiles(totals),
        service=_percentiles(in_service),
        waiting=_percentiles(waiting),
    )


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    last = len(ordered) - 1
    # Nearest rank: exact for small counts, and enough for an operator's summary.
    return {name: ordered[min(last, max(0, round(q * last)))] for name, q in _PERCENTILES}
