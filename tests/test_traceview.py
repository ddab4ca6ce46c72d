"""The trace viewer: reading a runtime's JSON-lines log back into per-task timelines, and checking them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import assume, given
from hypothesis import strategies as st

from actorflow.cli.trace import main
from actorflow.cli.tracecheck import check_transitions
from actorflow.cli.traceview import (
    BrokenLine,
    LogEvent,
    StageRun,
    TaskTimeline,
    build_trace,
    load_trace,
    parse_lines,
)
from actorflow.core.types import TaskState
from actorflow.services import seed_pipeline

TRANSITIONS = seed_pipeline(persist=lambda task, result: None).transitions
"""The seed pipeline's table: what a log that names no table is checked against."""

# --------------------------------------------------------------------------- writing logs like the runtime does


def trace_id_of(name: str) -> str:
    """A stable 32-hex trace id per name, so that tests can assert on it."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]


class LogBuilder:
    """Builds log lines in the runtime's format; every emit returns the line's number."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._clock = datetime(2026, 11, 25, 19, 0, 0, tzinfo=UTC)
        self._spans = 0

    def emit(self, event: str, actor: str = "runtime", **fields: Any) -> int:
        self._clock += timedelta(milliseconds=1)
        timestamp = self._clock.isoformat().replace("+00:00", "Z")
        self.lines.append(
            json.dumps({"event": event, **fields, "timestamp": timestamp, "level": "info", "actor": actor})
        )
        return len(self.lines)

    def transition(
        self, task: str, from_state: str | None, to_state: str, reason: str | None = None, **extra: Any
    ) -> int:
        fields = {"task_id": task, "trace_id": trace_id_of(task), "from_state": from_state, "to_state": to_state}
        return self.emit("task.transition", "state", **fields, reason=reason, **extra)

    def start(self, task: str, service: str, worker: str, attempt: int = 1) -> dict[str, Any]:
        self._spans += 1
        span = {
            "task_id": task,
            "trace_id": trace_id_of(task),
            "span_id": f"{self._spans:016x}",
            "parent_span_id": None,
            "service": service,
            "worker": worker,
            "attempt": attempt,
        }
        self.emit("service.started", worker, **span)
        return span

    def finish(self, span: dict[str, Any], duration_ms: float) -> int:
        return self.emit("service.finished", span["worker"], **span, duration_ms=duration_ms)

    def fail(self, span: dict[str, Any], duration_ms: float, error_type: str, error: str, *, transient: bool) -> int:
        fields = {"error_type": error_type, "error": error, "transient": transient}
        return self.emit("service.failed", span["worker"], **span, duration_ms=duration_ms, **fields)

    def text(self, *, final_newline: bool = True) -> str:
        return "\n".join(self.lines) + ("\n" if final_newline else "")

    def write(self, path: Path, *, final_newline: bool = True) -> Path:
        path.write_text(self.text(final_newline=final_newline), encoding="utf-8")
        return path


def completed_task(log: LogBuilder, task: str, *, flaky_processor: bool = False) -> Iterator[None]:
    """Validate, process (failing once if flaky), persist, complete; yields between lines to interleave."""
    log.emit("task.submitted", "runtime", task_id=task, trace_id=trace_id_of(task))
    yield
    log.transition(task, None, "CREATED")
    yield
    span = log.start(task, "validator", "validator-1")
    yield
    log.finish(span, 1.25)
    log.transition(task, "CREATED", "VALIDATED", "validator passed")
    yield
    log.transition(task, "VALIDATED", "PROCESSING", "processor started")
    span = log.start(task, "processor", "processor-1")
    yield
    if flaky_processor:
        log.fail(span, 3.5, "TransientError", "downstream busy", transient=True)
        log.emit("service.retry_scheduled", "orchestrator", task_id=task, service="processor", attempt=2, delay_ms=10)
        yield
        span = log.start(task, "processor", "processor-2", attempt=2)
        yield
    log.finish(span, 7.0)
    span = log.start(task, "persistence", "persistence-1")
    yield
    log.finish(span, 0.5)
    log.transition(task, "PROCESSING", "COMPLETED", "persisted")
    log.emit(
        "task.completed", "orchestrator", task_id=task, trace_id=trace_id_of(task), state="COMPLETED", duration_ms=42.0
    )


def invalid_task(log: LogBuilder, task: str) -> Iterator[None]:
    """Rejected by the validator: CREATED -> FAILED."""
    log.emit("task.submitted", "runtime", task_id=task, trace_id=trace_id_of(task))
    log.transition(task, None, "CREATED")
    yield
    span = log.start(task, "validator", "validator-2")
    yield
    log.fail(span, 0.75, "ValidationError", "amount must be positive", transient=False)
    log.transition(task, "CREATED", "FAILED", "validation failed")
    yield
    log.emit(
        "task.failed",
        "orchestrator",
        task_id=task,
        trace_id=trace_id_of(task),
        state="FAILED",
        error="ValidationError: amount must be positive",
        duration_ms=5.0,
    )


def cancelled_task(log: LogBuilder, task: str) -> Iterator[None]:
    """Cancelled after validation, with a rejected late transition."""
    log.emit("task.submitted", "runtime", task_id=task, trace_id=trace_id_of(task))
    log.transition(task, None, "CREATED")
    yield
    span = log.start(task, "validator", "validator-1")
    yield
    log.finish(span, 2.0)
    log.transition(task, "CREATED", "VALIDATED", "validator passed")
    yield
    log.transition(task, "VALIDATED", "CANCELLED", "cancelled by client")
    log.emit("task.cancelled", "orchestrator", task_id=task, trace_id=trace_id_of(task), state="CANCELLED")
    yield
    log.emit(
        "task.transition_rejected",
        "state",
        task_id=task,
        from_state="CANCELLED",
        to_state="PROCESSING",
        expected="VALIDATED",
        why="CANCELLED is terminal",
    )


def interleave(*steps: Iterator[None]) -> None:
    """Run the task generators round-robin, so their lines interleave in the file."""
    done = object()
    running = list(steps)
    while running:
        for step in list(running):
            if next(step, done) is done:
                running.remove(step)


def clean_log() -> LogBuilder:
    log = LogBuilder()
    log.emit("runtime.started", pools={"validator": 2, "processor": 2, "persistence": 1})
    interleave(
        completed_task(log, "t-ok"),
        completed_task(log, "t-retry", flaky_processor=True),
        invalid_task(log, "t-invalid"),
        cancelled_task(log, "t-cancel"),
    )
    log.emit("dead_letter", "runtime", message="StageFinished")
    log.emit("worker.restarted", "runtime", worker="processor-1")
    log.emit("runtime.stopped")
    return log


def stage_summary(timeline: TaskTimeline) -> list[tuple[str, str | None, int | None, str, float | None]]:
    return [(run.service, run.worker, run.attempt, run.status, run.duration_ms) for run in timeline.stages]


def only(trace_tasks: tuple[TaskTimeline, ...]) -> TaskTimeline:
    assert len(trace_tasks) == 1, trace_tasks
    return trace_tasks[0]


# --------------------------------------------------------------------------- a clean log


def test_a_clean_interleaved_log_rebuilds_every_task_timeline(tmp_path: Path) -> None:
    trace = load_trace(clean_log().write(tmp_path / "run.jsonl"))

    assert [t.task_id for t in trace.tasks] == ["t-ok", "t-retry", "t-invalid", "t-cancel"]
    assert stage_summary(only(trace.find("t-ok"))) == [
        ("validator", "validator-1", 1, "ok", 1.25),
        ("processor", "processor-1", 1, "ok", 7.0),
        ("persistence", "persistence-1", 1, "ok", 0.5),
    ]
    retry = only(trace.find("t-retry"))
    assert stage_summary(retry) == [
        ("validator", "validator-1", 1, "ok", 1.25),
        ("processor", "processor-1", 1, "failed", 3.5),
        ("processor", "processor-2", 2, "ok", 7.0),
        ("persistence", "persistence-1", 1, "ok", 0.5),
    ]
    assert retry.stages[1].transient is True
    assert retry.stages[1].error_type == "TransientError"
    assert retry.path == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
    assert retry.duration_ms == 42.0
    assert retry.trace_id == trace_id_of("t-retry")

    invalid = only(trace.find("t-invalid"))
    assert stage_summary(invalid) == [("validator", "validator-2", 1, "failed", 0.75)]
    assert invalid.path == ["CREATED", "FAILED"]
    assert invalid.outcome is not None
    assert invalid.outcome.error == "ValidationError: amount must be positive"

    cancelled = only(trace.find("t-cancel"))
    assert cancelled.final_state == "CANCELLED"
    assert [t.final_state for t in trace.tasks] == ["COMPLETED", "COMPLETED", "FAILED", "CANCELLED"]


def test_a_clean_log_counts_runs_and_unknown_events_and_has_no_violations(tmp_path: Path) -> None:
    log = clean_log()
    trace = load_trace(log.write(tmp_path / "run.jsonl"))

    assert trace.runs == 1
    assert dict(trace.unknown_events) == {"dead_letter": 1, "worker.restarted": 1}
    assert trace.events_read == len(log.lines)
    assert trace.broken == ()
    assert check_transitions(trace) == []


def test_the_command_prints_each_task_with_its_stages_and_exits_zero_on_a_clean_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = clean_log().write(tmp_path / "run.jsonl")

    assert main([str(path)]) == 0

    out, err = capsys.readouterr()
    assert err == ""
    headers = [line for line in out.splitlines() if line.startswith("task ")]
    assert [h.split()[1:3] for h in headers] == [
        ["t-ok", "COMPLETED"],
        ["t-retry", "COMPLETED"],
        ["t-invalid", "FAILED"],
        ["t-cancel", "CANCELLED"],
    ]
    retry_block = out.split("task t-retry")[1].split("task t-invalid")[0]
    assert "processor    processor-1    attempt 1  failed" in retry_block
    assert "transient TransientError: downstream busy" in retry_block
    assert "processor    processor-2    attempt 2  ok" in retry_block
    assert "7.00 ms" in retry_block
    assert "retry processor attempt 2 in 10.0 ms" in retry_block
    assert "PROCESSING -> COMPLETED  (persisted)" in retry_block
    assert "error: ValidationError: amount must be positive" in out
    assert "rejected CANCELLED -> PROCESSING, expected VALIDATED: CANCELLED is terminal" in out
    assert "tasks         4: COMPLETED 2, FAILED 1, CANCELLED 1" in out
    assert "other events  dead_letter 1, worker.restarted 1" in out
    assert "broken lines  0" in out
    assert "checked: all allowed" in out


def test_the_summary_flag_prints_totals_and_the_check_but_no_timelines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = clean_log().write(tmp_path / "run.jsonl")

    assert main([str(path), "--summary"]) == 0

    out = capsys.readouterr().out
    assert "task t-ok" not in out
    assert "tasks         4" in out
    assert "processor     3 runs, 1 failed, 1 retry;" in out
    assert "all allowed" in out


def test_a_log_written_by_structlog_json_renderer_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "structlog.jsonl"
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.JSONRenderer(),
    ]
    with path.open("w", encoding="utf-8") as file:
        log = structlog.wrap_logger(structlog.WriteLogger(file), processors=processors)
        ids = {"task_id": "t-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
        log.info("task.transition", actor="state", **ids, from_state=None, to_state="CREATED", reason=None)
        span = {"span_id": "00f067aa0ba902b7", "parent_span_id": None, "service": "validator", "attempt": 1}
        log.info("service.started", actor="validator-1", **ids, **span, worker="validator-1")
        log.info("service.finished", actor="validator-1", **ids, **span, worker="validator-1", duration_ms=0.8)
        log.info("task.transition", actor="state", **ids, from_state="CREATED", to_state="VALIDATED", reason="ok")

    timeline = only(load_trace(path).tasks)

    assert timeline.path == ["CREATED", "VALIDATED"]
    assert stage_summary(timeline) == [("validator", "validator-1", 1, "ok", 0.8)]
    assert timeline.duration_ms is not None  # from the ISO timestamps, as no outcome event was logged


# --------------------------------------------------------------------------- violations


def test_a_transition_after_a_terminal_state_exits_one_and_prints_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = clean_log()
    bad = log.transition("t-ok", "COMPLETED", "PROCESSING", "doctored")
    path = log.write(tmp_path / "doctored.jsonl")

    assert main([str(path)]) == 1

    out = capsys.readouterr().out
    assert f"VIOLATION line {bad}: task t-ok: COMPLETED -> PROCESSING" in out
    assert "nothing may follow a terminal state" in out
    assert f"    {bad}: {log.lines[bad - 1]}" in out
    [violation] = check_transitions(load_trace(path))
    assert (violation.lineno, violation.kind) == (bad, "after_terminal")


def test_a_transition_missing_from_the_table_is_a_violation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = clean_log()
    log.transition("t-skip", None, "CREATED")
    bad = log.transition("t-skip", "CREATED", "COMPLETED", "skipped the stages")
    path = log.write(tmp_path / "doctored.jsonl")

    assert main([str(path)]) == 1

    out = capsys.readouterr().out
    assert f"VIOLATION line {bad}: task t-skip: CREATED -> COMPLETED: not in the transition table" in out
    [violation] = check_transitions(load_trace(path))
    assert violation.kind == "not_allowed"
    assert violation.raw == log.lines[bad - 1]


def test_a_transition_that_does_not_continue_from_the_previous_state_is_flagged(tmp_path: Path) -> None:
    log = LogBuilder()
    log.transition("t-1", None, "CREATED")
    log.transition("t-1", "CREATED", "VALIDATED")
    bad = log.transition("t-1", "PROCESSING", "COMPLETED")  # allowed by the table, but the task was VALIDATED

    [violation] = check_transitions(load_trace(log.write(tmp_path / "gap.jsonl")))

    assert (violation.lineno, violation.task_id, violation.kind) == (bad, "t-1", "discontinuous")
    assert "the task was in VALIDATED (line 2), not PROCESSING" in violation.why


def test_a_task_whose_first_logged_transition_is_not_its_creation_is_flagged(tmp_path: Path) -> None:
    log = LogBuilder()
    log.transition("t-1", "CREATED", "VALIDATED")

    [violation] = check_transitions(load_trace(log.write(tmp_path / "gap.jsonl")))

    assert violation.kind == "discontinuous"
    assert "must be the creation None -> CREATED" in violation.why


def test_an_unknown_state_name_is_a_violation(tmp_path: Path) -> None:
    log = LogBuilder()
    log.transition("t-1", None, "CREATED")
    log.transition("t-1", "CREATED", "PAUSED")

    [violation] = check_transitions(load_trace(log.write(tmp_path / "odd.jsonl")))

    assert violation.kind == "unknown_state"
    assert "PAUSED is not a task state" in violation.why


def test_a_log_without_transition_events_says_nothing_was_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = LogBuilder()
    log.emit("task.completed", "orchestrator", task_id="t-1", trace_id=trace_id_of("t-1"), state="COMPLETED")
    path = log.write(tmp_path / "info-only.jsonl")

    assert main([str(path)]) == 0

    assert "note: no task.transition events, so nothing was checked" in capsys.readouterr().out


# --------------------------------------------------------------------------- broken lines


def test_a_truncated_last_line_and_garbage_are_reported_by_number_and_the_rest_is_parsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = clean_log()
    whole = len(log.lines)
    log.lines.insert(4, "garbage \x00 not json")
    log.lines.insert(6, "[1, 2, 3]")
    log.lines.insert(8, '{"level": "info", "msg": "no event here"}')
    log.lines.append(log.lines[-1][:25])  # a crash in the middle of the last write
    path = log.write(tmp_path / "broken.jsonl", final_newline=False)

    trace = load_trace(path)

    assert [(b.lineno, b.why.split(":")[0]) for b in trace.broken] == [
        (5, "not valid JSON"),
        (7, "a JSON array, not an object"),
        (9, 'a JSON object without an "event" string'),
        (whole + 4, "not valid JSON (last line, no newline"),
    ]
    assert trace.events_read == whole
    assert [t.final_state for t in trace.tasks] == ["COMPLETED", "COMPLETED", "FAILED", "CANCELLED"]

    assert main([str(path)]) == 0
    out, err = capsys.readouterr()
    for lineno in (5, 7, 9, whole + 4):
        assert f"warning: line {lineno}: " in err
    assert f"broken lines  4 (lines 5, 7, 9, {whole + 4})" in out


def test_a_task_event_missing_the_fields_the_viewer_needs_is_a_broken_line() -> None:
    lines = [
        json.dumps({"event": "task.transition", "task_id": "t-1", "from_state": None}),
        json.dumps({"event": "service.started", "task_id": "t-1"}),
        json.dumps({"event": "task.submitted", "trace_id": "ab" * 16}),
    ]

    trace = build_trace(parse_lines(lines))

    assert [b.why for b in trace.broken] == [
        "task.transition without a to_state string",
        "service.started without a service name",
        "task.submitted without a task_id string",
    ]
    assert trace.tasks == ()


def test_the_parser_yields_one_result_per_non_blank_line_with_its_number() -> None:
    parsed = list(parse_lines(['{"event": "a"}\n', "\n", "42\n", '{"event": "b"}']))

    assert [(type(p).__name__, p.lineno) for p in parsed] == [("LogEvent", 1), ("BrokenLine", 3), ("LogEvent", 4)]
    assert isinstance(parsed[0], LogEvent)
    assert parsed[0].event == "a"
    assert isinstance(parsed[1], BrokenLine)
    assert parsed[1].why == "a JSON number, not an object"


# --------------------------------------------------------------------------- task identity


def test_a_task_id_reused_by_a_later_run_gets_its_own_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = LogBuilder()
    for run in ("first", "second"):
        log.emit("runtime.started", pools={})
        trace_id = trace_id_of(run)
        ids = {"task_id": "t-1", "trace_id": trace_id}
        log.emit("task.transition", "state", **ids, from_state=None, to_state="CREATED", reason=None)
        log.emit("service.retry_scheduled", "orchestrator", task_id="t-1", service="validator", attempt=2, delay_ms=1)
        log.emit("task.transition", "state", **ids, from_state="CREATED", to_state="CANCELLED", reason=run)
        log.emit("runtime.stopped")
    path = log.write(tmp_path / "two-runs.jsonl")

    trace = load_trace(path)

    first, second = trace.find("t-1")
    assert (first.trace_id, second.trace_id) == (trace_id_of("first"), trace_id_of("second"))
    assert first.path == second.path == ["CREATED", "CANCELLED"]
    assert [len(t.entries) for t in (first, second)] == [3, 3]  # the trace-less retry went to its own run's task
    assert trace.runs == 2
    assert check_transitions(trace) == []
    assert main([str(path), "--task", trace_id_of("second")]) == 0
    assert capsys.readouterr().out.count("task t-1 ") == 1


def test_a_service_end_without_its_start_still_makes_a_stage_run() -> None:
    end = {"task_id": "t-1", "trace_id": "ab" * 16, "service": "processor", "worker": "processor-1", "attempt": 1}
    trace = build_trace(parse_lines([json.dumps({"event": "service.finished", **end, "duration_ms": 3})]))

    [run] = only(trace.tasks).stages

    assert run == StageRun("processor", "processor-1", 1, None, None, ended_line=1, status="ok", duration_ms=3.0)


# --------------------------------------------------------------------------- the command's usage errors


def test_the_task_option_prints_only_that_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = clean_log().write(tmp_path / "run.jsonl")

    assert main([str(path), "--task", "t-invalid"]) == 0

    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("task ")] == ["t-invalid"]
    assert "tasks         1 shown of 4: FAILED 1" in out
    assert "2 transitions of the shown task checked" in out


def test_an_unknown_task_id_exits_two_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = clean_log().write(tmp_path / "run.jsonl")

    assert main([str(path), "--task", "nope"]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert f"actorflow trace: error: no task 'nope' in {path} (4 tasks; first ids: t-ok, t-retry, t-invalid)" in err


def test_a_missing_file_exits_two_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such.jsonl"

    assert main([str(missing)]) == 2

    assert capsys.readouterr().err == f"actorflow trace: error: no such file: {missing}\n"


def test_missing_arguments_exit_two_with_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2

    assert "usage: actorflow trace" in capsys.readouterr().err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0

    assert "--task ID" in capsys.readouterr().out


# --------------------------------------------------------------------------- properties of the check

Step = tuple[str | None, str]


@st.composite
def legal_paths(draw: st.DrawFn) -> list[Step]:
    """A creation, then random allowed moves, stopping anywhere (or at a terminal state)."""
    steps: list[Step] = [(None, TaskState.CREATED.value)]
    state = TaskState.CREATED
    while TRANSITIONS[state]:
        if not draw(st.booleans()):
            break
        following = draw(st.sampled_from(sorted(TRANSITIONS[state])))
        steps.append((state.value, following.value))
        state = following
    return steps


def transition_line(task: str, step: Step) -> str:
    ids = {"task_id": task, "trace_id": trace_id_of(task)}
    return json.dumps({"event": "task.transition", **ids, "from_state": step[0], "to_state": step[1], "reason": None})


@given(st.data(), st.lists(legal_paths(), min_size=1, max_size=5))
def test_random_legal_paths_interleaved_never_produce_violations(data: st.DataObject, paths: list[list[Step]]) -> None:
    # each task's steps stay in order; the tasks interleave in a random order
    turns = data.draw(st.permutations([index for index, path in enumerate(paths) for _ in path]))
    remaining = [iter(path) for path in paths]
    lines = [transition_line(f"t-{index}", next(remaining[index])) for index in turns]

    trace = build_trace(parse_lines(lines))

    assert check_transitions(trace) == []
    assert [t.path for t in sorted(trace.tasks, key=lambda t: t.task_id)] == [[to for _, to in p] for p in paths]


STATE_NAMES = [state.value for state in TaskState]


@given(
    legal_paths(),
    st.data(),
    st.one_of(st.none(), st.sampled_from(STATE_NAMES)),
    st.sampled_from([*STATE_NAMES, "PAUSED"]),
)
def test_one_illegal_step_inserted_in_a_legal_path_is_always_flagged_at_its_line(
    path: list[Step], data: st.DataObject, from_state: str | None, to_state: str
) -> None:
    position = data.draw(st.integers(0, len(path)), label="position")
    previous = path[position - 1][1] if position else None
    legal_here = from_state == previous and (
        (previous is None and to_state == "CREATED")
        or (previous is not None and to_state in {s.value for s in TRANSITIONS[TaskState(previous)]})
    )
    assume(not legal_here)
    steps = [*path[:position], (from_state, to_state), *path[position:]]

    violations = check_transitions(build_trace(parse_lines([transition_line("t-1", s) for s in steps])))

    assert position + 1 in [v.lineno for v in violations]
