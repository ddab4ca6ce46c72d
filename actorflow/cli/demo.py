"""``actorflow demo``: create tasks, run them through the pipeline, and show their final states."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from actorflow.actors import Runtime
from actorflow.core import RuntimeConfig, TaskRecord
from actorflow.core.tracing import configure_logging

__all__ = ["main"]

_INVALID_PAYLOADS: list[dict[str, object]] = [
    {"name": "", "data": 1},  # empty name
    {"data": [1, 2, 3]},  # no name
    {"name": "x" * 201, "data": None},  # name too long
    {"name": "extra", "data": 1, "priority": "high"},  # unexpected field
]


def _payloads(count: int) -> list[dict[str, object]]:
    """`count` tasks, about one in eight of them invalid, so the demo shows both outcomes."""
    payloads: list[dict[str, object]] = []
    for index in range(count):
        if index % 8 == 7:
            payloads.append(_INVALID_PAYLOADS[(index // 8) % len(_INVALID_PAYLOADS)])
        else:
            payloads.append({"name": f"task-{index + 1:04d}", "data": {"index": index, "squares": [index, index**2]}})
    return payloads


def _describe(record: TaskRecord) -> str:
    if record.result is not None:
        return f"sha256 {str(record.result.get('sha256', ''))[:12]}…  {record.result.get('bytes')} bytes"
    return record.error or ""


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The demo's arguments."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create tasks (one in eight of them invalid), run them through validate -> process -> persist, "
        "and show every task's final state and path.",
    )
    parser.add_argument("--tasks", type=int, default=12, help="how many tasks to create (default 12)")
    parser.add_argument("--workers", type=int, default=4, help="processor pool size (default 4)")
    parser.add_argument("--log-file", help="write every event as JSON lines to this file (level DEBUG)")
    parser.add_argument("--journal", help="keep task state in this SQLite journal (resumes unfinished tasks)")
    parser.add_argument("--show", type=int, default=40, help="rows of the final table to print (default 40)")
    return parser


def main(argv: Sequence[str], *, prog: str = "actorflow demo") -> int:
    """Run the demo with `argv` (the arguments after ``demo``); return the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    if args.tasks < 0:
        parser.error("--tasks must be >= 0")
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    if args.log_file:
        close_log = configure_logging(json=True, level="DEBUG", file=args.log_file)
    else:
        close_log = configure_logging(json=False, level="INFO")
    try:
        config = RuntimeConfig(processor_workers=args.workers, journal_path=args.journal)
        started = time.perf_counter()
        with Runtime(config) as runtime:
            print(f"\n== 1. Task creation: {args.tasks} tasks ==")
            handles = [runtime.submit(payload) for payload in _payloads(args.tasks)]
            print(f"submitted {len(handles)} tasks ({sum(1 for i in range(args.tasks) if i % 8 == 7)} invalid)")

            print(f"\n== 2. Processing through the pipeline ({args.workers} processor workers) ==")
            runtime.join()
            elapsed = time.perf_counter() - started
            stats = runtime.stats()
            print(f"all terminal in {elapsed:.2f}s: {stats['COMPLETED']} COMPLETED, {stats['FAILED']} FAILED")

            print("\n== 3. Final state inspection ==")
            records = [handle.result(timeout=30) for handle in handles]
            print(f"{'task':<34} {'state':<10} {'result / error':<52} path")
            for record in records[: args.show]:
                path = " → ".join(record.path())
                print(f"{record.task_id:<34} {record.state.value:<10} {_describe(record)[:52]:<52} {path}")
            if len(records) > args.show:
                print(f"… and {len(records) - args.show} more (--show N prints more)")
    finally:
        close_log()
    if args.log_file:
        trace_prog = prog.rsplit(" ", 1)[0] + " trace" if prog.endswith(" demo") else f"{prog} trace"
        print(f"\nevents written to {args.log_file}; read them back with: {trace_prog} {args.log_file}")
    return 0
