"""``actorflow inspect``: a read-only look into a journal, for operators.

Prints the number of tasks in each state, then the matching tasks, each with
its path through the states, the time and reason of every transition, and a
summary of its result or error. It opens the journal read-only
(`core.journal.open_reader`), so it never writes, leaves no file behind, and
may run while a runtime is writing the same file. ``--json`` prints the same as
one JSON document, for scripts.

Exit codes: 0 done, 1 the ``--task`` is not in the journal, 2 a bad argument or
a journal that cannot be read (the message on stderr names the path and the
fault).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from actorflow.core.errors import ConfigError, JournalError
from actorflow.core.journal import ReaderStore, open_reader
from actorflow.core.types import DEFAULT_PIPELINE, TaskRecord, TaskState, thaw

__all__ = ["main"]

DEFAULT_LIMIT = 20
_SUMMARY_WIDTH = 160
_STATE_WIDTH = max(len(state.value) for state in TaskState)


def main(argv: Sequence[str], *, prog: str = "actorflow inspect") -> int:
    """Run the inspection CLI on `argv` (the arguments after ``inspect``); return the exit code."""
    parser = _parser(prog)
    try:
        options = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed its message; hand back its code instead of exiting
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with open_reader(options.path) as journal:
            if options.state is not None and options.state.value not in (known := journal.states()):
                # States are the journal's pipelines' own, so they are checked against what it holds.
                allowed = ", ".join(known)
                print(f"{prog}: error: unknown state {options.state.value!r}; allowed: {allowed}", file=sys.stderr)
                return 2
            if options.json:
                return _print_json(journal, options.state, options.task, options.limit, prog=prog)
            if options.task is not None:
                return _show_task(journal, options.task, prog=prog)
            _show_listing(journal, options.state, options.limit)
            sys.stdout.flush()
    except (JournalError, ConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly. Point stdout at devnull so
        # that the interpreter's final flush does not raise again (the recipe of the
        # `signal` module's documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Show what a journal holds: tasks per state, then tasks with their transition history. "
        "Read-only; safe while a runtime is writing the journal.",
    )
    parser.add_argument("path", metavar="PATH", help="the journal's SQLite file (or sqlite:///PATH)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--state",
        type=_state,
        metavar="STATE",
        help=f"only tasks in this state ({', '.join(state.value for state in TaskState)})",
    )
    which.add_argument("--task", metavar="ID", help="only the task with this id")
    parser.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"show the N most recently created matching tasks (default {DEFAULT_LIMIT}; 0 for counts only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text, for scripts")
    return parser


def _state(text: str) -> TaskState:
    try:
        return TaskState(text.strip().upper())
    except ValueError:
        allowed = ", ".join(state.value for state in TaskState)
        raise argparse.ArgumentTypeError(
            f"unknown state {text!r}; allowed: {allowed}, or a state of one of the journal's pipelines"
        ) from None


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--limit must be an integer >= 0, got {text!r}")
    return value


# --- output --------------------------------------------------------------------------------------


def _show_listing(journal: ReaderStore, state: TaskState | None, limit: int) -> None:
    counts = journal.counts()
    total = sum(counts.values())
    print(f"journal  {journal.location}")
    print()
    width = max(len(str(total)), len("COUNT"))
    print(f"{'STATE':<{_STATE_WIDTH}}  {'COUNT':>{width}}")
    for name, count in counts.items():
        print(f"{name:<{_STATE_WIDTH}}  {count:>{width}}")
    print(f"{'total':<{_STATE_WIDTH}}  {total:>{width}}")
    pipelines = journal.pipelines()
    if set(pipelines) - {DEFAULT_PIPELINE}:
        print()
        print("pipelines  " + ", ".join(f"{name} ({count})" for name, count in pipelines.items()))
    if limit == 0:
        return

    matching = total if state is None else counts.get(state.value, 0)
    what = "tasks" if state is None else f"{state.value} tasks"
    print()
    if matching == 0:
        print(f"no {what}")
        return
    # The most recent `limit` tasks, printed oldest first like a log.
    records = journal.records(state=state, limit=limit, newest_first=True)[::-1]
    print(f"{what}: {len(records)} of {matching} shown, oldest first")
    for record in records:
        print()
        _print_record(record)
    if len(records) < matching:
        print()
        print(f"({matching - len(records)} older {what} not shown; use --limit N)")


def _print_json(journal: ReaderStore, state: TaskState | None, task_id: str | None, limit: int, *, prog: str) -> int:
    """The counts and the matching records (each as `TaskRecord.to_dict`), as one JSON document."""
    if task_id is not None:
        record = journal.get(task_id)
        if record is None:
            print(f"{prog}: no task {_clean(task_id)!r} in journal {journal.location!r}", file=sys.stderr)
            return 1
        records = [record]
    else:
        records = journal.records(state=state, limit=limit, newest_first=True)[::-1] if limit else []
    document = {
        "journal": journal.location,
        "counts": journal.counts(),
        "pipelines": journal.pipelines(),
        "tasks": [r.to_dict() for r in records],
    }
    print(json.dumps(document, ensure_ascii=False, indent=2))
    sys.stdout.flush()
    return 0


def _show_task(journal: ReaderStore, task_id: str, *, prog: str) -> int:
    record = journal.get(task_id)
    if record is None:
        print(f"{prog}: no task {_clean(task_id)!r} in journal {journal.location!r}", file=sys.stderr)
        return 1
    _print_record(record)
    return 0


def _print_record(record: TaskRecord) -> None:
    print(
        f"task {_clean(record.task_id)}  {record.state.value}  pipeline {_clean(record.pipeline)}  "
        f"calls {record.calls}  retries {record.retries}  trace {_clean(record.trace_id) or '-'}"
    )
    took = record.updated_at - record.created_at
    print(f"  path     {' -> '.join(record.path())}  ({_seconds(took)} from creation to last change)")
    if record.history:
        start = record.history[0].at
        elapsed = [f"+{_seconds(entry.at - start)}" for entry in record.history]
        elapsed_width = max(map(len, elapsed))
        for index, (entry, offset) in enumerate(zip(record.history, elapsed, strict=True)):
            label = "history" if index == 0 else ""
            origin = entry.from_state.value if entry.from_state is not None else "(new)"
            move = f"{origin:<{_STATE_WIDTH}} -> {entry.to_state.value:<{_STATE_WIDTH}}"
            reason = f"  {_one_line(entry.reason)}" if entry.reason else ""
            print(f"  {label:<7}  {_timestamp(entry.at)}  {offset:>{elapsed_width}}  {move}{reason}".rstrip())
    print(f"  payload  {_json_summary(record.payload)}")
    if record.result is not None:
        print(f"  result   {_json_summary(record.result)}")
    if record.error is not None:
        print(f"  error    {_one_line(record.error)}")
    if record.traceback is not None:
        print("  traceback (last failed call)")
        for line in record.traceback.rstrip("\n").splitlines():
            # Escaped, never shortened: a traceback is read whole (it is bounded when it is made).
            shown = line if line.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
            print(f"    {shown}")


def _timestamp(at: float) -> str:
    try:
        return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):
        return f"{at!r} (epoch s)"


def _seconds(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _json_summary(value: object) -> str:
    return _clean(json.dumps(thaw(value), ensure_ascii=False, separators=(", ", ": ")))


def _one_line(text: str) -> str:
    lines = text.strip().splitlines() or [""]
    more = f"  [+{len(lines) - 1} more lines]" if len(lines) > 1 else ""
    return _clean(lines[0]) + more


def _clean(text: str) -> str:
    """`text` shortened, with control characters and lone surrogates escaped.

    Payloads, errors and ids come from users: a stray escape sequence must not
    drive the operator's terminal, and a lone surrogate must not crash `print`.
    """
    if not text.isprintable():
        text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return text if len(text) <= _SUMMARY_WIDTH else text[: _SUMMARY_WIDTH - 3] + "..."
