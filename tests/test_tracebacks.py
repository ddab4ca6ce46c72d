"""Tracebacks of failed calls: bounded; in `service.failed`, the record, the journal, inspect and the trace viewer."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from actorflow.actors import Runtime
from actorflow.cli import inspect as inspect_cli
from actorflow.cli import trace as trace_cli
from actorflow.core import RuntimeConfig, Task, TaskState, TransientError
from actorflow.core.failures import MAX_TRACEBACK_CHARS, format_traceback
from actorflow.core.journal import SCHEMA_VERSION, Journal, JournalReader
from actorflow.core.tracing import configure_logging
from actorflow.services import ServiceSet
from tests.conftest import payload


def look_up_missing_key(task: Task) -> Mapping[str, Any]:
    data = task.payload["data"]
    assert isinstance(data, Mapping)
    if data.get("fail"):
        return {"value": {"a": 1}["zzz"]}
    if data.get("flaky") and task.attempt == 1:
        raise TransientError("the upstream is busy")
    return {"ok": True}


def recurse(depth: int) -> None:
    if depth == 0:
        raise ValueError("the innermost frame")
    # Two call sites taking turns: Python folds only runs of one identical frame.
    if depth % 2:
        recurse(depth - 1)
    else:
        recurse(depth - 1)


def test_a_long_traceback_is_cut_to_the_bound_keeping_the_innermost_frames() -> None:
    with pytest.raises(ValueError, match="innermost") as caught:
        recurse(400)
    text = format_traceback(caught.value)
    assert len(text) <= MAX_TRACEBACK_CHARS
    assert text.startswith("Traceback (most recent call last):\n")
    assert "characters of outer frames omitted" in text
    assert text.endswith("ValueError: the innermost frame\n")
    assert 'raise ValueError("the innermost frame")' in text


def test_a_short_traceback_is_kept_whole_and_a_huge_message_keeps_its_end() -> None:
    with pytest.raises(KeyError) as short:
        raise KeyError("zzz")
    assert format_traceback(short.value).endswith("KeyError: 'zzz'\n")
    with pytest.raises(RuntimeError, match="the end") as huge:
        raise RuntimeError("x" * 20_000 + " the end")
    text = format_traceback(huge.value)
    assert len(text) <= MAX_TRACEBACK_CHARS
    assert text.endswith(" the end\n")


def test_a_failed_calls_traceback_is_in_its_event_its_record_the_journal_and_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "tasks.db"
    services = ServiceSet(process=look_up_missing_key)
    with capture_logs() as logs, Runtime(RuntimeConfig(journal_path=str(journal)), services=services) as runtime:
        failed = runtime.submit(payload(1, fail=True)).result(timeout=10)
        retried = runtime.submit(payload(2, flaky=True)).result(timeout=10)
        plain = runtime.submit(payload(3)).result(timeout=10)

    assert failed.state is TaskState.FAILED
    assert failed.error == "processor: KeyError: 'zzz'"
    assert failed.traceback is not None
    assert "in look_up_missing_key" in failed.traceback
    assert failed.traceback.endswith("KeyError: 'zzz'\n")
    assert retried.state is TaskState.COMPLETED
    assert retried.traceback is not None
    assert "TransientError: the upstream is busy" in retried.traceback  # the retried call's, for the record
    assert plain.traceback is None
    events = [e for e in logs if e["event"] == "service.failed"]
    assert {e["task_id"]: e["traceback"] for e in events} == {
        failed.task_id: failed.traceback,
        retried.task_id: retried.traceback,
    }
    with JournalReader(journal) as reader:
        stored = reader.get(failed.task_id)
        assert stored is not None
        assert stored.traceback == failed.traceback
        assert [r.traceback for r in reader.records(state=TaskState.COMPLETED)] == [retried.traceback, None]

    assert inspect_cli.main([str(journal), "--task", failed.task_id]) == 0
    shown = capsys.readouterr().out
    assert "traceback (last failed call)" in shown
    assert "    KeyError: 'zzz'" in shown
    assert inspect_cli.main([str(journal), "--task", failed.task_id, "--json"]) == 0
    assert "KeyError: 'zzz'" in json.loads(capsys.readouterr().out)["tasks"][0]["traceback"]


def test_a_journal_without_the_traceback_column_reads_as_none_and_gains_it_without_a_version_bump(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        task_id = runtime.submit(payload()).result(timeout=10).task_id
    with sqlite3.connect(path) as connection:  # as a journal written before the column existed
        connection.execute("ALTER TABLE tasks DROP COLUMN traceback")
    connection.close()

    with JournalReader(path) as reader:
        old = reader.get(task_id)
        assert old is not None
        assert old.traceback is None
        assert old.state is TaskState.COMPLETED
    Journal(path).close()
    with sqlite3.connect(path) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(tasks)")]
        (version,) = connection.execute("PRAGMA user_version").fetchone()
    connection.close()
    assert columns[-1] == "traceback"
    assert version == SCHEMA_VERSION  # no bump for an added nullable column


def test_the_trace_viewer_filters_failed_tasks_groups_their_errors_and_gives_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run.jsonl"
    close = configure_logging(json=True, level="DEBUG", file=str(log))
    try:
        with Runtime(services=ServiceSet(process=look_up_missing_key)) as runtime:
            handles = [runtime.submit(payload(i, fail=i % 3 == 0)) for i in range(9)]
            handles.append(runtime.submit({"name": "", "data": 1}))  # the validator refuses an empty name
            records = [h.result(timeout=10) for h in handles]
    finally:
        close()
    failed_ids = [r.task_id for r in records if r.state is TaskState.FAILED]
    assert len(failed_ids) == 4

    assert trace_cli.main([str(log), "--state", "FAILED", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "tasks         4 shown of 10: FAILED 4" in out
    assert "failures      4 FAILED tasks, by stage and error type" in out
    assert f"      3  processor: KeyError  e.g. {', '.join(failed_ids[:3])}" in out
    assert "      1  validator: ValidationError" in out
    assert "    end to end" in out
    assert "    waiting" in out

    assert trace_cli.main([str(log), "--state", "failed", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert {t["final_state"] for t in document["tasks"]} == {"FAILED"}
    groups = {(g["stage"], g["error_type"]): g for g in document["failures"]}
    assert groups[("processor", "KeyError")]["count"] == 3
    assert "KeyError: 'zzz'" in groups[("processor", "KeyError")]["example_traceback"]
    assert document["latency_ms"]["tasks"] == 4
    assert set(document["latency_ms"]["end_to_end"]) == {"p50", "p90", "p99", "max"}
    assert trace_cli.main([str(log), "--state", "DONE"]) == 2
    assert "'DONE' is not a task state" in capsys.readouterr().err
