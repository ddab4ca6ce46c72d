"""``actorflow demo``: create tasks, run them through the pipeline, and show their final states.

The console shows warnings and errors only (``-v`` brings back one INFO line per
task), a progress bar while tasks run (on a terminal, when ``rich`` is
installed: it is part of the ``demo`` extra, not of the library), then a table
of the tasks and a summary: counts, throughput, and end-to-end and per-state
latency percentiles. On a reused journal, the summary keeps this run's tasks
apart from those of earlier runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

from actorflow.actors import Runtime
from actorflow.core import RuntimeConfig, TaskRecord, TaskState, TransitionEvent, is_terminal
from actorflow.core.tracing import configure_logging
from actorflow.core.types import JSONInput
from actorflow.services import ServiceSet

__all__ = ["build_parser", "clip", "main"]

_INVALID_PAYLOADS: list[dict[str, JSONInput]] = [
    {"name": "", "data": 1},  # empty name
    {"data": [1, 2, 3]},  # no name
    {"name": "x" * 201, "data": None},  # name too long
    {"name": "extra", "data": 1, "priority": "high"},  # unexpected field
]
_DETAIL_WIDTH = 52


def _payloads(count: int) -> list[dict[str, JSONInput]]:
    """`count` tasks, about one in eight of them invalid, so the demo shows both outcomes."""
    payloads: list[dict[str, JSONInput]] = []
    for index in range(count):
        if index % 8 == 7:
            payloads.append(_INVALID_PAYLOADS[(index // 8) % len(_INVALID_PAYLOADS)])
        else:
            payloads.append({"name": f"task-{index + 1:04d}", "data": {"index": index, "squares": [index, index**2]}})
    return payloads


def clip(text: str, width: int) -> str:
    """`text` on one line, at most `width` characters; cut at a word boundary and marked with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    if " " in cut and not text[width - 1].isspace():
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip() + "…"


def _describe(record: TaskRecord) -> str:
    result = record.result
    if isinstance(result, Mapping):  # the seed's processor returns a mapping
        return f"sha256 {str(result.get('sha256', ''))[:12]}  {result.get('bytes')} bytes"
    return record.error or ""


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The demo's arguments."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create tasks (one in eight of them invalid), run them through validate -> process -> persist, "
        "and show every task's final state and path, then a summary.",
    )
    parser.add_argument("--tasks", type=int, default=12, help="how many tasks to create (default 12)")
    parser.add_argument("--workers", type=int, default=4, help="processor pool size (default 4)")
    parser.add_argument("--log-file", help="write every event as JSON lines to this file (level DEBUG)")
    parser.add_argument("--journal", help="keep task state in this SQLite journal (resumes unfinished tasks)")
    parser.add_argument("--show", type=int, default=40, help="rows of the final table to print (default 40)")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log one line per task on the console (default: warnings only)"
    )
    return parser


def main(argv: Sequence[str], *, prog: str = "actorflow demo") -> int:
    """Run the demo with `argv` (the arguments after ``demo``); return the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    if args.tasks < 0:
        parser.error("--tasks must be >= 0")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.show < 0:
        parser.error("--show must be >= 0")

    if args.log_file:
        close_log = configure_logging(json=True, level="DEBUG", file=args.log_file)
    else:
        close_log = configure_logging(json=False, level="INFO" if args.verbose else "WARNING")
    try:
        config = RuntimeConfig(journal_path=args.journal)
        with Runtime(config, services=ServiceSet(workers={"processor": args.workers})) as runtime:
            before = runtime.stats()
            earlier = sum(before[state.value] for state in TaskState)
            print(f"\n== 1. Task creation: {args.tasks} tasks ==")
            finished = _FinishCounter()
            unsubscribe = runtime.subscribe(finished.on_transition)
            started = time.perf_counter()
            handles = [runtime.submit(payload) for payload in _payloads(args.tasks)]
            invalid = sum(1 for i in range(args.tasks) if i % 8 == 7)
            print(f"submitted {len(handles)} tasks ({invalid} of them invalid, to show failures)")

            print(f"\n== 2. Processing through the pipeline ({args.workers} processor workers) ==")
            mine = {handle.task_id for handle in handles}
            with _progress(len(handles)) as advance:
                finished.watch(mine, advance)
                runtime.join()
            elapsed = time.perf_counter() - started
            unsubscribe()
            records = [handle.result(timeout=30) for handle in handles]
            print(f"all terminal in {elapsed:.2f} s")

            print("\n== 3. Final state inspection ==")
            _print_table(records, args.show)
            print("\n== Summary ==")
            for line in summarize(records, elapsed=elapsed, stats=runtime.stats(), earlier=earlier):
                print(line)
    finally:
        close_log()
    if args.log_file:
        trace_prog = prog.rsplit(" ", 1)[0] + " trace" if prog.endswith(" demo") else f"{prog} trace"
        print(f"\nevents written to {args.log_file}; read them back with: {trace_prog} {args.log_file}")
    return 0


_TERMINALS = ("COMPLETED", "FAILED", "CANCELLED")


class _FinishCounter:
    """Counts this run's tasks as they reach a terminal state; called on the state actor's thread, so it is quick."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mine: frozenset[str] | None = None
        self._early: set[str] = set()
        self._advance: _Advance | None = None

    def watch(self, mine: set[str], advance: _Advance) -> None:
        with self._lock:
            self._mine, self._advance = frozenset(mine), advance
            early, self._early = len(self._early & mine), set()
        advance(early)

    def on_transition(self, event: TransitionEvent) -> None:
        if not is_terminal(event.to_state):
            return
        with self._lock:
            if self._mine is None:  # submitted, not yet handed over: count it when watching starts
                self._early.add(event.task_id)
                return
            if event.task_id not in self._mine or self._advance is None:
                return
            advance = self._advance
        advance(1)


class _Advance:
    def __call__(self, count: int) -> None: ...


@contextlib.contextmanager
def _progress(total: int) -> Iterator[_Advance]:
    """A progress bar on a terminal when `rich` is installed; otherwise nothing."""
    if not sys.stdout.isatty() or total == 0:
        yield _Advance()
        return
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn  # noqa: PLC0415
    except ModuleNotFoundError:  # rich is the demo extra's; without it, no bar
        yield _Advance()
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as progress:
        bar = progress.add_task("tasks finished", total=total)

        class _Bar(_Advance):
            def __call__(self, count: int) -> None:
                progress.advance(bar, count)

        yield _Bar()


def _print_table(records: Sequence[TaskRecord], show: int) -> None:
    print(f"{'task':<34} {'state':<10} {'result / error':<{_DETAIL_WIDTH}} path")
    for record in records[:show]:
        path = " → ".join(record.path())
        detail = clip(_describe(record), _DETAIL_WIDTH)
        print(f"{record.task_id:<34} {record.state.value:<10} {detail:<{_DETAIL_WIDTH}} {path}")
    if len(records) > show:
        print(f"… and {len(records) - show} more (--show N prints more)")


def summarize(records: Sequence[TaskRecord], *, elapsed: float, stats: dict[str, object], earlier: int) -> list[str]:
    """The end summary: counts, throughput, end-to-end and per-state latency percentiles."""
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        counts[record.state.value] += 1
    this_run = ", ".join(f"{counts[state]} {state}" for state in _TERMINALS if counts[state])
    lines = [f"this run      {len(records)} tasks: {this_run or 'none'}"]
    if earlier:
        totals = ", ".join(f"{stats[state]} {state}" for state in _TERMINALS if stats.get(state))
        lines.append(f"journal       {earlier} tasks from earlier runs; all runs together: {totals}")
    if elapsed > 0 and records:
        lines.append(f"throughput    {len(records) / elapsed:,.0f} tasks/s ({elapsed:.2f} s)")
    end_to_end = sorted((record.updated_at - record.created_at) * 1000 for record in records)
    if end_to_end:
        lines.append(f"end to end    {_percentiles(end_to_end)}")
    per_state: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for before, after in zip(record.history, record.history[1:], strict=False):
            per_state[before.to_state.value].append((after.at - before.at) * 1000)
    for state, durations in per_state.items():
        lines.append(f"in {state:<10} {_percentiles(sorted(durations))}")
    return lines


def _percentiles(sorted_ms: Sequence[float]) -> str:
    def at(q: float) -> float:
        return sorted_ms[min(len(sorted_ms) - 1, round(q * (len(sorted_ms) - 1)))]

    return f"p50 {at(0.5):.2f} ms, p99 {at(0.99):.2f} ms, max {sorted_ms[-1]:.2f} ms"
