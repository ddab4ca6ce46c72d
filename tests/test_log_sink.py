"""actorflow's own JSON sink (`configure_logging(json=True)`): every event written, off the hot threads, in order.

The sink's thread renders and writes; the runtime's threads only queue. These
tests read the files back and count, name the threads that rendered, fill the
queue on purpose, take orjson away, and check that a host's own structlog
configuration is served exactly as before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import types
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from actorflow.actors import Runtime
from actorflow.cli import trace as trace_cli
from actorflow.core import RuntimeConfig, Task, TransientError, tracing
from actorflow.core.traceview import StageRun, load_trace
from actorflow.core.tracing import configure_logging, get_event_logger
from actorflow.services import ServiceSet
from tests.conftest import payload

ROOT = Path(__file__).resolve().parent.parent
SINK_THREAD = "actorflow-log-sink"


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run_tasks(count: int, services: ServiceSet | None = None) -> list[Any]:
    with Runtime(services=services) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(count)]
        return [handle.result(timeout=30) for handle in handles]


# --- every event, at INFO and at DEBUG -------------------------------------------------------------------

_PER_TASK = {
    "INFO": {"task.completed": 1},
    "DEBUG": {"task.submitted": 1, "task.transition": 4, "service.call": 3, "task.completed": 1},
}


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_the_json_file_holds_every_event_of_a_run_once_the_log_is_closed(tmp_path: Path, level: str) -> None:
    path = tmp_path / f"{level}.jsonl"
    log = configure_logging(json=True, level=level, file=path)
    try:
        records = _run_tasks(200)
    finally:
        log()
    events = _read(path)
    counts = Counter(e["event"] for e in events)
    tasks = {r.task_id for r in records}
    assert len(tasks) == 200
    expected = {name: per_task * 200 for name, per_task in _PER_TASK[level].items()}
    assert {name: counts[name] for name in expected} == expected
    assert counts["runtime.started"] == counts["runtime.stopped"] == 1
    assert sum(counts.values()) == sum(expected.values()) + 2  # nothing else: no drops, no render failures
    for name in expected:
        assert {e["task_id"] for e in events if e["event"] == name} == tasks
    assert log.dropped == 0


def test_the_json_file_holds_every_event_of_a_run_as_soon_as_the_runtime_has_stopped(tmp_path: Path) -> None:
    path = tmp_path / "stopped.jsonl"
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        _run_tasks(100)
        counts = Counter(e["event"] for e in _read(path))  # read before the log is closed
    finally:
        log()
    assert counts["service.call"] == 300
    assert counts["task.completed"] == 100
    assert counts["runtime.stopped"] == 1


def test_events_logged_before_a_flush_are_in_the_file_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "flush.jsonl"
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        emitter = get_event_logger("state")
        for index in range(500):
            emitter.debug("test.flushed", index=index)
        assert log.flush(timeout=10)
        assert [e["index"] for e in _read(path)] == list(range(500))  # in order, all of them
    finally:
        log()


_EXIT_WITHOUT_CLOSE = """
import sys
from actorflow import Runtime
from actorflow.core.tracing import configure_logging

configure_logging(json=True, level="DEBUG", file=sys.argv[1])  # never closed: exit writes what is pending
with Runtime() as runtime:
    for handle in [runtime.submit({"name": f"t{i}", "data": i}) for i in range(100)]:
        handle.result(timeout=30)
"""


def test_a_program_that_never_closes_the_log_still_finds_every_event_in_it_after_exit(tmp_path: Path) -> None:
    path = tmp_path / "exit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    counts = Counter(e["event"] for e in _read(path))
    assert counts["service.call"] == 300
    assert counts["task.completed"] == 100
    assert counts["runtime.stopped"] == 1


# --- one event per call, and the viewer -------------------------------------------------------------------


def test_a_call_is_one_service_call_event_and_the_viewer_shows_every_call_with_its_duration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    failed_once = threading.Event()

    def process(task: Task) -> Mapping[str, Any]:
        if not failed_once.is_set():
            failed_once.set()
            raise TransientError("downstream busy")
        return {"ok": True}

    path = tmp_path / "calls.jsonl"
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        config = RuntimeConfig(retry_backoff_s=0.001)
        with Runtime(config, services=ServiceSet(process=process)) as runtime:
            record = runtime.submit(payload()).result(timeout=30)
    finally:
        log()
    events = [e for e in _read(path) if e.get("task_id") == record.task_id]
    calls = [e for e in events if e["event"].startswith("service.")]
    names = [(e["event"], e["service"], e["status"]) for e in calls if e["event"] != "service.retry_scheduled"]
    assert names == [
        ("service.call", "validator", "ok"),
        ("service.failed", "processor", "transient"),
        ("service.call", "processor", "ok"),
        ("service.call", "persistence", "ok"),
    ]
    assert not any(e["event"] in {"service.started", "service.finished"} for e in events)

    (timeline,) = load_trace(path).find(record.task_id)
    stages = timeline.stages
    logged = [e for e in calls if e["event"] != "service.retry_scheduled"]
    assert [(s.service, s.status, s.attempt) for s in stages] == [
        ("validator", "ok", 1),
        ("processor", "failed", 1),
        ("processor", "ok", 2),
        ("persistence", "ok", 1),
    ]
    for stage, event in zip(stages, logged, strict=True):
        assert isinstance(stage, StageRun)
        assert stage.duration_ms == event["duration_ms"]
        assert stage.span_id == event["span_id"]
        assert stage.started_at is not None
        assert stage.started_at.endswith("Z")
        assert stage.started_at <= event["timestamp"]  # it started before it was logged as ended
        assert stage.ended_line is not None
        assert stage.started_line is None
    assert stages[1].transient is True
    assert stages[1].error_type == "TransientError"

    capsys.readouterr()
    assert trace_cli.main([str(path), "--task", record.task_id]) == 0
    out = capsys.readouterr().out
    for service, status in (("validator", "ok"), ("processor", "failed"), ("persistence", "ok")):
        assert any(service in line and status in line and "ms" in line for line in out.splitlines()), service
    assert "transient TransientError: downstream busy" in out


# --- off the hot threads ------------------------------------------------------------------------------


class _ThreadNamingStream:
    """A text stream that notes which thread writes to it."""

    def __init__(self) -> None:
        self.writers: set[str] = set()
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False


def test_events_of_the_state_actor_are_rendered_and_written_on_the_sinks_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orjson = pytest.importorskip("orjson")
    renderers: Counter[tuple[str, str]] = Counter()

    def spying_dumps(value: Any, **kwargs: Any) -> bytes:
        renderers[(threading.current_thread().name, value.get("actor", ""))] += 1
        return orjson.dumps(value, **kwargs)

    spy = types.SimpleNamespace(dumps=spying_dumps, JSONEncodeError=orjson.JSONEncodeError)
    monkeypatch.setitem(sys.modules, "orjson", spy)  # the renderer the sink picks up
    stream = _ThreadNamingStream()
    log = configure_logging(json=True, level="DEBUG", file=stream)  # type: ignore[arg-type]
    try:
        _run_tasks(20)
    finally:
        log()
    assert renderers[(SINK_THREAD, "state")] == 20 * 4  # every transition the StateActor logged
    assert renderers[(SINK_THREAD, "orchestrator")] == 20  # task.completed
    assert {thread for thread, _ in renderers} == {SINK_THREAD}
    assert stream.writers == {SINK_THREAD}
    assert "".join(stream.parts).count('"event":"task.transition"') == 80


# --- a full queue -------------------------------------------------------------------------------------


class _StuckStream(_ThreadNamingStream):
    """Its first write blocks until released, as a stuck disk would."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never released the stream"
        return super().write(text)


def _emit(log_events: Iterator[int]) -> None:
    emitter = get_event_logger("state")
    for index in log_events:
        emitter.info("test.event", index=index)


def test_a_full_queue_holds_the_logging_thread_until_the_sink_makes_room_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "_FULL_WAIT_S", 30.0)
    stream = _StuckStream()
    log = configure_logging(json=True, level="INFO", file=stream, max_pending=4)  # type: ignore[arg-type]
    try:
        _emit(iter([0]))
        assert stream.entered.wait(10)  # the sink's thread holds event 0 and is stuck writing it
        done = threading.Event()
        producer = threading.Thread(target=lambda: (_emit(iter(range(1, 9))), done.set()))
        producer.start()
        # Events 1-4 fill the queue; event 5 must wait for room while the disk is stuck.
        assert not done.wait(0.3)
        stream.release.set()
        producer.join(10)
        assert done.is_set()
    finally:
        stream.release.set()
        log()
    indexes = [json.loads(line)["index"] for line in "".join(stream.parts).splitlines()]
    assert indexes == list(range(9))
    assert log.dropped == 0


def test_a_sink_that_stays_stuck_costs_events_not_liveness_and_says_how_many_it_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "_FULL_WAIT_S", 0.05)
    stream = _StuckStream()
    log = configure_logging(json=True, level="INFO", file=stream, max_pending=4)  # type: ignore[arg-type]
    try:
        _emit(iter([0]))
        assert stream.entered.wait(10)
        _emit(iter(range(1, 5)))  # the queue is full now
        _emit(iter(range(5, 105)))  # the first waits 50 ms for room, then it and the rest are dropped at once
        assert log.dropped == 100
        stream.release.set()
        assert log.flush(10)
    finally:
        stream.release.set()
        log()
    events = [json.loads(line) for line in "".join(stream.parts).splitlines()]
    assert [e["index"] for e in events if e["event"] == "test.event"] == list(range(5))
    (dropped,) = [e for e in events if e["event"] == "log.events_dropped"]
    assert dropped["count"] == 100
    assert dropped["level"] == "error"


def test_events_logged_after_close_are_counted_as_dropped_and_raise_nothing(tmp_path: Path) -> None:
    path = tmp_path / "closed.jsonl"
    log = configure_logging(json=True, level="INFO", file=path)
    get_event_logger("state").info("test.before")
    log()
    structlog.get_logger("actorflow").info("test.after")  # structlog still points at the closed sink
    assert [e["event"] for e in _read(path)] == ["test.before"]
    assert log.dropped == 1


# --- the renderer: orjson or the standard library, one format ---------------------------------------------

_ODD_FIELDS: dict[str, Any] = {
    "task_id": "t-1",
    "text": "déjà vu ✓",
    "ratio": 0.1,
    "none": None,
    "flag": True,
    "nested": {"a": [1, 2.5, "x"]},
    "path": Path("/tmp/x"),
}


def _write_odd_event(path: Path) -> dict[str, Any]:
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        get_event_logger("state").debug("test.odd", **_ODD_FIELDS)
    finally:
        log()
    (event,) = _read(path)
    return event


def test_without_orjson_the_sink_renders_with_the_standard_library_in_the_same_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_orjson = _write_odd_event(tmp_path / "orjson.jsonl")
    monkeypatch.setitem(sys.modules, "orjson", None)  # `import orjson` raises ImportError
    assert tracing._json_renderer() is tracing._std_json_line
    without = _write_odd_event(tmp_path / "json.jsonl")
    assert list(without) == list(with_orjson)  # same keys, same order
    assert {**without, "timestamp": None} == {**with_orjson, "timestamp": None}
    assert without["path"] == "/tmp/x"
    assert without["text"] == "déjà vu ✓"
    assert list(without)[-4:] == ["actor", "event", "level", "timestamp"]


def test_values_orjson_refuses_are_written_by_the_standard_library_instead(tmp_path: Path) -> None:
    pytest.importorskip("orjson")
    path = tmp_path / "refused.jsonl"
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        emitter = get_event_logger("state")
        emitter.debug("test.big", big=2**70)  # past 64 bits
        emitter.debug("test.keys", by_number={1: "one"})  # a key that is not a str
        emitter.debug("test.plain", ok=True)
    finally:
        log()
    big, keys, plain = _read(path)
    assert big["big"] == 2**70
    assert keys["by_number"] == {"1": "one"}
    assert plain["ok"] is True
    assert log.dropped == 0


def test_timestamps_are_written_as_datetime_isoformat_writes_them() -> None:
    seconds = [0.0, 1.0, 0.5, 59.999_999_5, 1_764_490_000.0, 1_764_490_000.000_000_4, 1_764_490_000.999_999_6]
    seconds += [1_764_490_000 + k / 7 for k in range(2000)]
    for at in seconds:
        assert tracing._iso_utc(at) == datetime.fromtimestamp(at, tz=UTC).isoformat().replace("+00:00", "Z"), at


def test_our_events_and_the_hosts_own_events_share_one_format_and_one_file_in_order(tmp_path: Path) -> None:
    path = tmp_path / "both.jsonl"
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        get_event_logger("state").debug("test.ours", task_id="t-1", calls=2)
        structlog.get_logger("host").debug("test.ours", task_id="t-1", calls=2, actor="state")
        get_event_logger("state").debug("test.last")
    finally:
        log()
    ours, hosts, last = _read(path)
    assert last["event"] == "test.last"
    assert list(ours) == list(hosts)
    assert {**ours, "timestamp": None} == {**hosts, "timestamp": None}
    iso_utc = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"
    assert re.fullmatch(iso_utc, ours["timestamp"])
    assert re.fullmatch(iso_utc, hosts["timestamp"])


# --- hosts that configured logging themselves --------------------------------------------------------------


def test_a_host_with_its_own_structlog_chain_gets_every_event_synchronously_through_its_processors() -> None:
    seen: list[tuple[str, str]] = []

    def record(logger: object, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        seen.append((event_dict["event"], threading.current_thread().name))
        return event_dict

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, record, structlog.testing.LogCapture()],
        wrapper_class=structlog.make_filtering_bound_logger(10),
    )
    records = _run_tasks(30)
    counts = Counter(event for event, _ in seen)
    for name, per_task in _PER_TASK["DEBUG"].items():
        assert counts[name] == per_task * len(records), name
    assert SINK_THREAD not in {thread for _, thread in seen}
    transitions = {thread for event, thread in seen if event == "task.transition"}
    assert len(transitions) == 1
    assert transitions.pop().startswith("StateActor")


def test_a_host_that_reconfigures_structlog_after_configure_logging_gets_the_events_not_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "replaced.jsonl"
    log = configure_logging(json=True, level="DEBUG", file=path)
    try:
        with capture_logs() as logs:
            (record,) = _run_tasks(1)
    finally:
        log()
    assert sum(1 for e in logs if e.get("task_id") == record.task_id) == 9
    assert not any(e.get("task_id") == record.task_id for e in _read(path))


def test_the_private_structlog_configuration_the_level_check_reads_is_there() -> None:
    # core/tracing.py reads structlog's private _CONFIG for speed (falling back to get_config()).
    assert tracing._STRUCTLOG_CONFIG is not None
    structlog.configure(processors=[structlog.testing.LogCapture()])
    assert tracing._configured_processors() is structlog.get_config()["processors"]
    assert tracing._configured_factory() is structlog.get_config()["logger_factory"]
    assert tracing._configured_wrapper() is structlog.get_config()["wrapper_class"]


# --- fork -------------------------------------------------------------------------------------------------

_FORK = """
import json, os, sys, threading
from actorflow.core.tracing import configure_logging, get_event_logger

path = sys.argv[1]
log = configure_logging(json=True, level="INFO", file=path)
emitter = get_event_logger("parent")
emitter.info("parent.before")  # starts the sink's thread
assert log.flush(10)
for index in range(1000):  # some of these are still queued when the process forks
    emitter.info("parent.queued", index=index)
pid = os.fork()
if pid == 0:
    get_event_logger("child").info("child.event")
    flushed = log.flush(10)
    with open(path) as file:
        written = [json.loads(line)["event"] for line in file]
    names = [thread.name for thread in threading.enumerate()]
    log()
    ok = flushed and "child.event" in written and names.count("actorflow-log-sink") == 1
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
emitter.info("parent.after")
log()
print(status)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_child_writes_with_a_sink_thread_of_its_own_and_never_rewrites_the_parents_queue(tmp_path: Path) -> None:
    path = tmp_path / "fork.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _FORK, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"  # the child's own sink thread wrote its event before it closed the log
    events = _read(path)
    counts = Counter(e["event"] for e in events)
    assert counts == {"parent.before": 1, "parent.queued": 1000, "child.event": 1, "parent.after": 1}
    assert [e["index"] for e in events if e["event"] == "parent.queued"] == list(range(1000))  # none twice
