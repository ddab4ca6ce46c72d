"""Check a trace's timelines against the task lifecycle, and summarise them.

Works on what `actorflow.cli.traceview` reads back from a log::

    check_transitions             every Violation: not in the table, not continuing from the
                                  previous state, or after a terminal state
    group_failures                FAILED tasks grouped by the stage and error type that failed them
    latency_summary               end-to-end latency percentiles, split into service and waiting time

Every logged state change is checked against the transition table of its
task's pipeline, as the log's ``runtime.started`` line gave it (the seed's
table, built by `actorflow.services.seed_pipeline`, serves logs that carry none).

The checks trust file order only for ``task.transition`` lines. That holds
because the single state actor logs every transition, one after another. Stage
events come from worker threads and may race the state actor's lines (a stage
can finish after the task was cancelled), so they are shown but not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from actorflow.cli.traceview import Table, TaskTimeline, Trace, TransitionEntry
from actorflow.core.types import TERMINAL_STATES, Task, TaskState
from actorflow.services import seed_pipeline

__all__ = [
    "FailureGroup",
    "LatencySummary",
    "Violation",
    "ViolationKind",
    "check_timeline",
    "check_transitions",
    "group_failures",
    "latency_summary",
]


def _never_persist(task: Task, result: Mapping[str, Any]) -> None:
    """Only the seed pipeline's shape is read here, never run."""


_SEED_TABLE: Table = MappingProxyType(
    {
        state.value: frozenset(target.value for target in targets)
        for state, targets in seed_pipeline(persist=_never_persist).transitions.items()
    }
)
_TERMINAL_NAMES: frozenset[str] = frozenset(state.value for state in TERMINAL_STATES)
_CREATED = TaskState.CREATED.value


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

    A transition must be in its task's pipeline's table (the seed pipeline's
    for the seed, or when the log does not say; creation is None -> CREATED),
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
