"""``actorflow trace PATH``: read a JSON-lines log back, show each task's timeline and check its transitions.

The reading is `actorflow.cli.traceview`'s, the checking and the summaries
`actorflow.cli.tracecheck`'s; this module only parses arguments and renders what
they return, as text or as JSON (``--json``) for scripts.

Exit status: 0 every checked transition is allowed, 1 a transition breaks the
lifecycle, 2 a usage error (bad arguments, unreadable file, unknown task).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from actorflow.cli.tracecheck import Violation, check_timeline, group_failures, latency_summary
from actorflow.cli.traceview import (
    RejectedTransition,
    RetryScheduled,
    StageRun,
    TaskTimeline,
    TimelineEntry,
    Trace,
    TransitionEntry,
    load_trace,
)
from actorflow.core.types import TERMINAL_STATES, TaskState

__all__ = ["main"]

_TERMINAL_NAMES: frozenset[str] = frozenset(state.value for state in TERMINAL_STATES)
_MAX_WARNINGS = 20
"""Broken-line warnings printed one by one; the rest are only counted, so garbage cannot flood the terminal."""
_MAX_RAW = 200
"""Characters of a broken line shown in its warning."""


# --------------------------------------------------------------------------- the command


class _UsageError(Exception):
    """A bad path or task id: reported as ``prog: error: ...`` with exit status 2."""


def main(argv: Sequence[str] | None = None, *, prog: str = "actorflow trace") -> int:
    """Run ``actorflow trace PATH [--task ID] [--state STATE] [--summary] [--json]``; return the exit status.

    Prints each task's timeline (or only the ``--task`` one), a summary, then
    the transition check. Returns 0 if every checked transition is allowed, 1
    if any is not, 2 on usage errors (bad arguments, unreadable file, unknown
    task). Broken lines are warned about on stderr but do not change the status.
    """
    parser = _build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits by itself on --help (0) and on bad arguments (2)
        return 0 if exc.code in (0, None) else 2
    try:
        return _run(
            Path(args.path),
            task=args.task,
            state=args.state,
            summary_only=args.summary,
            as_json=args.json,
            out=sys.stdout,
            err=sys.stderr,
        )
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Rebuild every task's path from an actorflow JSON-lines log and check its transitions.",
        epilog="Exit status: 0 all transitions allowed, 1 a transition breaks the lifecycle, 2 usage error.",
    )
    parser.add_argument("path", help="the JSON-lines log written by the runtime")
    parser.add_argument("--task", metavar="ID", help="show only this task (a task id, or a trace id)")
    parser.add_argument(
        "--state",
        type=_state_name,
        metavar="STATE",
        help="show only tasks whose last state is STATE (e.g. FAILED); one of "
        + ", ".join(state.value for state in TaskState),
    )
    parser.add_argument("--summary", action="store_true", help="print only the totals and the transition check")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (tasks, summary, violations) instead of text"
    )
    return parser


def _state_name(text: str) -> str:
    # States are a pipeline's own: the name is checked here, and against the log's states once it is read.
    try:
        return TaskState(text.strip().upper()).value
    except ValueError:
        allowed = ", ".join(state.value for state in TaskState)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a task state; allowed: {allowed}, or a state of one of the log's pipelines"
        ) from None


def _known_states(tasks: Sequence[TaskTimeline]) -> list[str]:
    """The seed's states, then every other state the log's pipelines define or its tasks reached."""
    known = dict.fromkeys(state.value for state in TaskState)
    for timeline in tasks:
        known.update(dict.fromkeys(timeline.table or ()))
        known.update(dict.fromkeys(timeline.path))
    return list(known)


def _run(
    path: Path,
    *,
    task: str | None,
    state: str | None = None,
    summary_only: bool,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    if not path.exists():
        raise _UsageError(f"no such file: {path}")
    if path.is_dir():
        raise _UsageError(f"{path} is a directory, not a log file")
    try:
        trace = load_trace(path)
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    shown = trace.tasks
    if task is not None:
        shown = trace.find(task)
        if not shown:
            examples = ", ".join(t.task_id for t in trace.tasks[:3]) or "none"
            raise _UsageError(f"no task {task!r} in {path} ({len(trace.tasks)} tasks; first ids: {examples})")
    if state is not None:
        known = _known_states(trace.tasks)
        if state not in known:
            raise _UsageError(f"{state!r} is not a task state; allowed: {', '.join(known)}")
        shown = tuple(timeline for timeline in shown if timeline.final_state == state)

    for broken in trace.broken[:_MAX_WARNINGS]:
        print(f"warning: line {broken.lineno}: {broken.why}; skipped: {_clip(broken.raw)}", file=err)
    if len(trace.broken) > _MAX_WARNINGS:
        print(f"warning: {len(trace.broken) - _MAX_WARNINGS} more broken lines not shown", file=err)

    violations = sorted((v for t in shown for v in check_timeline(t)), key=lambda v: v.lineno)
    if as_json:
        document = _json_document(trace, shown, violations, summary_only=summary_only)
        return _emit(json.dumps(document, ensure_ascii=False, indent=2), out, status=1 if violations else 0)

    lines: list[str] = []
    if not summary_only:
        worker_width = max((len(run.worker or "?") for t in shown for run in t.stages), default=1)
        for timeline in shown:
            lines.extend(_render_timeline(timeline, worker_width=worker_width))
        lines.append("")
    lines.extend(_render_summary(trace, shown))
    lines.append("")
    lines.extend(_render_check(shown, violations, selected=task is not None))
    return _emit("\n".join(lines), out, status=1 if violations else 0)


def _emit(text: str, out: TextIO, *, status: int) -> int:
    try:
        print(text, file=out)
        out.flush()
    except BrokenPipeError:
        # the reader went away (``| head``): not an error, but keep Python from complaining at exit
        _discard_output(out)
    return status


def _json_document(
    trace: Trace, shown: Sequence[TaskTimeline], violations: Sequence[Violation], *, summary_only: bool
) -> dict[str, Any]:
    """What the text output shows, as plain JSON values, for scripts."""
    states: Counter[str] = Counter(timeline.final_state or "no transitions" for timeline in shown)
    document: dict[str, Any] = {
        "source": trace.source,
        "summary": {
            "tasks": len(shown),
            "tasks_in_file": len(trace.tasks),
            "final_states": dict(states),
            "events_read": trace.events_read,
            "lines_read": trace.lines_read,
            "runs": trace.runs,
            "unknown_events": dict(trace.unknown_events),
            "broken_lines": [{"lineno": b.lineno, "why": b.why} for b in trace.broken],
            "transitions_checked": sum(len(t.transitions) for t in shown),
        },
        "failures": [_jsonable(dataclasses.asdict(group)) for group in group_failures(shown)],
        "latency_ms": _jsonable(dataclasses.asdict(latency)) if (latency := latency_summary(shown)) else None,
        "violations": [
            {"lineno": v.lineno, "task_id": v.task_id, "description": v.describe(), "raw": v.raw} for v in violations
        ],
    }
    if not summary_only:
        document["tasks"] = [_timeline_json(timeline) for timeline in shown]
    return document


def _timeline_json(timeline: TaskTimeline) -> dict[str, Any]:
    return {
        "task_id": timeline.task_id,
        "trace_id": timeline.trace_id,
        "final_state": timeline.final_state,
        "duration_ms": timeline.duration_ms,
        "first_line": timeline.first_line,
        "last_line": timeline.last_line,
        "entries": [{"kind": type(entry).__name__, **_plain(entry)} for entry in timeline.entries],
    }


def _plain(entry: TimelineEntry) -> dict[str, Any]:
    return {field.name: _jsonable(getattr(entry, field.name)) for field in dataclasses.fields(entry)}


def _jsonable(value: object) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _discard_output(out: TextIO) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
    except (OSError, ValueError):  # not a real file (e.g. captured in tests)
        pass


def _render_timeline(timeline: TaskTimeline, *, worker_width: int) -> list[str]:
    state = timeline.final_state or "no transitions"
    if timeline.final_state is not None and timeline.final_state not in _TERMINAL_NAMES:
        state += " (unfinished)"
    header = [f"task {timeline.task_id}", state]
    if timeline.duration_ms is not None:
        header.append(_fmt_ms(timeline.duration_ms))
    header.append(f"trace {timeline.trace_id or '?'}")
    header.append(f"lines {timeline.first_line}-{timeline.last_line}")
    outcome = timeline.outcome
    if outcome is not None:
        if outcome.state is not None and outcome.state != timeline.final_state:
            header.append(f"but {outcome.event} says {outcome.state}")
        if outcome.error:
            header.append(f"error: {outcome.error}")
    rows = ["  ".join(header)]
    for entry in timeline.entries:
        text = _render_entry(entry, worker_width=worker_width)
        if text is not None:
            rows.append(f"  {entry.lineno:>7}  {text}")
    return rows


def _render_entry(entry: TimelineEntry, *, worker_width: int) -> str | None:
    if isinstance(entry, TransitionEntry):
        reason = f"  ({entry.reason})" if entry.reason else ""
        return f"{entry.from_state} -> {entry.to_state}{reason}"
    if isinstance(entry, StageRun):
        attempt = f"attempt {entry.attempt if entry.attempt is not None else '?'}"
        duration = _fmt_ms(entry.duration_ms) if entry.duration_ms is not None else "-"
        worker = entry.worker or "?"
        text = f"{entry.service:<11}  {worker:<{worker_width}}  {attempt}  {entry.status:<10} {duration:>9}"
        if entry.node:
            text += f"  on {entry.node}"
        if entry.status == "failed":
            kind = {True: "transient", False: "permanent", None: "failure"}[entry.transient]
            detail = ": ".join(part for part in (entry.error_type, entry.error) if part)
            text += f"  {kind}" + (f" {detail}" if detail else "")
        return text.rstrip()
    if isinstance(entry, RetryScheduled):
        delay = f" in {_fmt_ms(entry.delay_ms)}" if entry.delay_ms is not None else ""
        return f"retry {entry.service or '?'} attempt {entry.attempt if entry.attempt is not None else '?'}{delay}"
    if isinstance(entry, RejectedTransition):
        expected = f", expected {entry.expected}" if entry.expected else ""
        why = f": {entry.why}" if entry.why else ""
        return f"rejected {entry.from_state} -> {entry.to_state}{expected}{why}"
    # submission and outcome are in the header already
    return None


def _render_summary(trace: Trace, shown: Sequence[TaskTimeline]) -> list[str]:
    states: Counter[str] = Counter()
    for timeline in shown:
        final = timeline.final_state or "no transitions"
        states[final if final in _TERMINAL_NAMES or final == "no transitions" else f"{final} (unfinished)"] += 1
    order = [s.value for s in TaskState if s in TERMINAL_STATES]
    counts = ", ".join(f"{name} {count}" for name, count in sorted(states.items(), key=lambda kv: _rank(kv[0], order)))
    of_all = "" if len(shown) == len(trace.tasks) else f" shown of {len(trace.tasks)}"
    rows = ["summary", f"  tasks         {len(shown)}{of_all}" + (f": {counts}" if counts else "")]
    rows.extend(_render_stage_totals(shown))
    rows.extend(_render_latency(shown))
    rows.extend(_render_failures(shown))
    rows.append(
        f"  events read   {trace.events_read} of {_count(trace.lines_read, 'line')}, {_count(trace.runs, 'run')}"
    )
    if trace.unknown_events:
        other = ", ".join(f"{name} {count}" for name, count in sorted(trace.unknown_events.items()))
        rows.append(f"  other events  {other} (not in timelines)")
    broken = f"  broken lines  {len(trace.broken)}"
    if trace.broken:
        numbers = ", ".join(str(b.lineno) for b in trace.broken[:10])
        broken += f" (line{'s' if len(trace.broken) > 1 else ''} {numbers}{', ...' if len(trace.broken) > 10 else ''})"
    rows.append(broken)
    return rows


def _render_stage_totals(shown: Sequence[TaskTimeline]) -> list[str]:
    runs_by_service: dict[str, list[StageRun]] = {}
    for timeline in shown:
        for run in timeline.stages:
            runs_by_service.setdefault(run.service, []).append(run)
    rows = []
    for service, runs in runs_by_service.items():
        failed = sum(run.status == "failed" for run in runs)
        retries = sum((run.attempt or 1) > 1 for run in runs)
        durations = sorted(run.duration_ms for run in runs if run.duration_ms is not None)
        text = f"  {service:<12}  {_count(len(runs), 'run')}, {failed} failed, {_count(retries, 'retry', 'retries')}"
        if durations:
            text += (
                f"; median {_fmt_ms(_quantile(durations, 0.5))}, p95 {_fmt_ms(_quantile(durations, 0.95))},"
                f" max {_fmt_ms(durations[-1])}"
            )
        rows.append(text)
    return rows


def _render_latency(shown: Sequence[TaskTimeline]) -> list[str]:
    latency = latency_summary(shown)
    if latency is None:
        return []
    rows = [f"  latency       of {_count(latency.tasks, 'finished task')} (p50 / p90 / p99 / max)"]
    for label, figures in (
        ("end to end", latency.end_to_end),
        ("in services", latency.service),
        ("waiting", latency.waiting),
    ):
        values = " / ".join(_fmt_ms(figures[name]) for name in ("p50", "p90", "p99", "max"))
        rows.append(f"    {label:<12}{values}")
    rows.append("    (waiting: queues in front of workers, retry backoff and hand-offs between actors)")
    return rows


def _render_failures(shown: Sequence[TaskTimeline]) -> list[str]:
    groups = group_failures(shown)
    if not groups:
        return []
    rows = [f"  failures      {_count(sum(g.count for g in groups), 'FAILED task')}, by stage and error type"]
    for group in groups:
        examples = ", ".join(group.task_ids) + (", ..." if group.count > len(group.task_ids) else "")
        rows.append(f"    {group.count:>5}  {group.stage}: {group.error_type}  e.g. {examples}")
        if group.example_error:
            rows.append(f"           {_clip(group.example_error.splitlines()[0] if group.example_error else '')}")
    return rows


def _render_check(shown: Sequence[TaskTimeline], violations: Sequence[Violation], *, selected: bool) -> list[str]:
    checked = sum(len(t.transitions) for t in shown)
    scope = " of the shown task" if selected else ""
    if not violations:
        rows = ["check", f"  {checked} transitions{scope} checked: all allowed"]
        if shown and not checked:
            # an INFO-level log keeps task outcomes but may drop the per-step events the check needs
            rows.append(
                "  note: no task.transition events, so nothing was checked; was the log written at DEBUG level?"
            )
        return rows
    rows = ["check", f"  {checked} transitions{scope} checked: {_count(len(violations), 'VIOLATION')}"]
    for violation in violations:
        rows.append(f"  VIOLATION {violation.describe()}")
        rows.append(f"    {violation.lineno}: {violation.raw}")
    return rows


# --------------------------------------------------------------------------- helpers


def _rank(name: str, order: list[str]) -> tuple[int, str]:
    return (order.index(name), name) if name in order else (len(order), name)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile; enough for an operator's summary, and exact for small counts."""
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _fmt_ms(ms: float) -> str:
    if ms < 10:
        return f"{ms:.2f} ms"
    return f"{ms:.1f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _clip(raw: str) -> str:
    return raw if len(raw) <= _MAX_RAW else raw[:_MAX_RAW] + f"... ({len(raw)} chars)"
