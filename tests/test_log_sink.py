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
import time
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
from actorflow.cli.traceview import StageRun, load_trace
from actorflow.core import RuntimeConfig, Task, TransientError, tracing
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


def test_a_sink_that_stays_stuck_costs_events_not_liveness_and_says_how_many_it_dropped() -> None:
    stream = _StuckStream()
    log = configure_logging(json=True, level="INFO", file=stream, max_pending=4)  # type: ignore[arg-type]
    try:
        _emit(iter([0]))
        assert stream.entered.wait(10)
        _emit(iter(range(1, 5)))  # the queue is full now
        _emit(iter(range(5, 105)))  # dropped at once: logging never waits for the disk
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


class _Fifo:
    """A named pipe as the log file: a real file descriptor whose writes block once the pipe is full.

    The sink's `os.write` of an event larger than the pipe's buffer (64 KiB)
    stays inside the system call, as on a stuck disk, until the test reads.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "log.fifo"
        os.mkfifo(self.path)
        # A reader first, so that the sink's open for writing does not wait for one; then reads that block.
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(self.fd, True)
        self.data = bytearray()
        self._reader: threading.Thread | None = None

    def read_one_byte(self) -> None:
        """Return once the sink's thread has started writing (and, for a large batch, is stuck in the write)."""
        self.data += os.read(self.fd, 1)

    def start_reading(self) -> None:
        """The disk recovers: read everything, until every writer has closed the pipe (once)."""
        if self._reader is not None:
            return

        def read() -> None:
            while chunk := os.read(self.fd, 1 << 16):
                self.data += chunk

        self._reader = threading.Thread(target=read, name="test-fifo-reader")
        self._reader.start()

    def events(self) -> list[dict[str, Any]]:
        """Every line read, once the writer has closed the pipe."""
        if self._reader is not None:
            self._reader.join(30)
            assert not self._reader.is_alive(), "the sink never closed the pipe"
        return [json.loads(line) for line in self.data.decode("utf-8").splitlines()]

    def reopen(self) -> None:
        """A new reader on the same pipe (after `close_reader`): writes succeed again."""
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(self.fd, True)

    def close_reader(self) -> None:
        os.close(self.fd)


_STUCK_PAD = "x" * 200_000
"""A field larger than a pipe holds: the sink's write of it blocks until the test reads."""


def _stick(fifo: _Fifo, emitter: tracing.EventLogger) -> threading.Thread:
    """Log one large event and return the sink's thread once it is stuck writing it."""
    before = set(threading.enumerate())
    emitter.info("test.stuck", pad=_STUCK_PAD)
    fifo.read_one_byte()
    (sink,) = [t for t in threading.enumerate() if t.name == SINK_THREAD and t not in before]
    return sink


def test_a_logging_thread_never_waits_for_a_stuck_disk_it_drops_at_once_and_the_count_is_written_later(
    tmp_path: Path,
) -> None:
    fifo = _Fifo(tmp_path)
    log = configure_logging(json=True, level="INFO", file=fifo.path, max_pending=4)
    emitter = get_event_logger("state")  # the StateActor's name: a wait here would delay every commit
    try:
        _stick(fifo, emitter)
        started = time.monotonic()
        _emit(iter(range(104)))  # 0-3 fill the queue; 4-103 find it full
        elapsed = time.monotonic() - started
        assert log.dropped == 100
        # Waiting for room held a logging thread a full second per stall; dropping at once takes microseconds.
        assert elapsed < 0.5, f"logging waited {elapsed:.2f}s for a stuck disk"
    finally:
        fifo.start_reading()
        assert log.close(timeout=30)
    events = fifo.events()
    assert [e["event"] for e in events] == ["test.stuck"] + ["test.event"] * 4 + ["log.events_dropped"]
    assert [e["index"] for e in events[1:5]] == [0, 1, 2, 3]
    assert events[-1]["count"] == 100
    assert events[-1]["level"] == "error"


def test_events_lost_to_a_failed_write_are_counted_and_reported_once_a_write_succeeds_again(tmp_path: Path) -> None:
    fifo = _Fifo(tmp_path)
    log = configure_logging(json=True, level="INFO", file=fifo.path)
    emitter = get_event_logger("state")
    try:
        emitter.info("test.before")
        assert log.flush(10)
        fifo.close_reader()  # nobody reads: the sink's writes fail (EPIPE), as on a disk that refuses them
        emitter.info("test.lost", index=0)
        assert log.flush(10)
        emitter.info("test.lost", index=1)
        assert log.flush(10)
        assert log.dropped == 2
        fifo.reopen()  # the disk is back
        fifo.start_reading()
        emitter.info("test.after")
    finally:
        assert log.close(timeout=30)
    events = fifo.events()
    # The pipe kept what was written before its reader left; what came while nobody read is lost, and said so.
    assert [e["event"] for e in events] == ["test.before", "test.after", "log.events_dropped"]
    assert events[-1]["count"] == 2
    assert log.dropped == 2


_FULL_DISK = r"""
import os, resource, signal, sys
from actorflow.core.tracing import configure_logging, get_event_logger

path = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
log = configure_logging(json=True, level="INFO", file=path)
emitter = get_event_logger("state")
emitter.info("test.before")
assert log.flush(10)
# The disk fills up 40 bytes into the next line: the write stops there, torn, and the next one fails.
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 40, hard))
emitter.info("test.torn", padding="x" * 200)
assert log.flush(10)
assert log.dropped == 1
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # the disk frees
emitter.info("test.after")
assert log.close(timeout=10)
"""


def test_after_a_full_disk_tears_a_line_the_next_event_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "full.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        check=False,
    )
    assert child.returncode == 0, child.stderr

    lines = path.read_bytes().split(b"\n")
    torn = [line for line in lines if line and not line.endswith(b"}")]
    events = [json.loads(line) for line in lines if line.endswith(b"}")]
    assert [len(line) for line in torn] == [40]  # the 40 bytes the full disk took, alone on their line
    assert torn[0].startswith(b"{")
    assert [e["event"] for e in events] == ["test.before", "test.after", "log.events_dropped"]
    assert events[-1]["count"] == 1


def test_a_log_file_left_with_a_torn_last_line_gets_its_next_event_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "torn.jsonl"
    path.write_bytes(b'{"event":"earlier"}\n{"event":"cut sh')  # a previous run that died on a full disk
    log = configure_logging(json=True, level="INFO", file=path)
    try:
        get_event_logger("state").info("test.after")
    finally:
        assert log.close(timeout=10)

    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == [b'{"event":"earlier"}', b'{"event":"cut sh']
    assert json.loads(lines[2])["event"] == "test.after"


def test_a_close_that_times_out_on_a_stuck_disk_leaves_the_file_to_the_sink_which_never_writes_into_another_file(
    tmp_path: Path,
) -> None:
    fifo = _Fifo(tmp_path)
    log = configure_logging(json=True, level="INFO", file=fifo.path)
    emitter = get_event_logger("state")
    victims: list[int] = []
    try:
        sink = _stick(fifo, emitter)
        _emit(iter(range(10)))
        assert log.close(timeout=0.2) is False  # the disk is stuck: close gives up waiting
        # Files opened after the close: one would get the log's descriptor number, had close freed it.
        victims = [os.open(tmp_path / f"victim-{n}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) for n in range(8)]
        fifo.start_reading()  # the disk recovers: the sink writes what it holds, then closes its file
        events = fifo.events()
        sink.join(10)
        assert not sink.is_alive()
    finally:
        fifo.start_reading()
        for fd in victims:
            os.close(fd)
    assert [(tmp_path / f"victim-{n}").read_bytes() for n in range(8)] == [b""] * 8
    assert [e["event"] for e in events] == ["test.stuck"] + ["test.event"] * 10
    assert log.dropped == 0


def test_the_queue_is_bounded_by_bytes_too_so_large_events_cannot_pile_up_behind_a_stuck_disk(tmp_path: Path) -> None:
    fifo = _Fifo(tmp_path)
    log = configure_logging(json=True, level="INFO", file=fifo.path, max_pending_bytes=100_000)
    emitter = get_event_logger("processor-1")
    traceback = "T" * 8192  # a failed call's traceback is cut to 8 KiB
    try:
        _stick(fifo, emitter)  # 200 KB, more than the bound: an event is still taken into an empty queue
        for index in range(100):
            emitter.warning("service.failed", index=index, traceback=traceback)
        kept = 100 - log.dropped
        assert kept >= 1
        assert kept * len(traceback) <= 100_000
    finally:
        fifo.start_reading()
        assert log.close(timeout=30)
    events = fifo.events()
    assert events[0]["event"] == "test.stuck"
    assert [e["index"] for e in events if e["event"] == "service.failed"] == list(range(kept))
    assert events[-1]["event"] == "log.events_dropped"
    assert events[-1]["count"] == 100 - kept


def test_configure_logging_refuses_a_byte_bound_below_one() -> None:
    with pytest.raises(ValueError, match="max_pending_bytes must be at least 1, not 0"):
        configure_logging(json=True, max_pending_bytes=0)


_HOOKS = """
import atexit, json, os, sys

registered = []
real_atexit, real_fork = atexit.register, os.register_at_fork


def spy_atexit(fn, *args, **kwargs):
    registered.append(["atexit", fn.__module__])
    return real_atexit(fn, *args, **kwargs)


def spy_fork(**hooks):
    registered.extend(["fork", hook.__module__] for hook in hooks.values())
    return real_fork(**hooks)


atexit.register, os.register_at_fork = spy_atexit, spy_fork
import actorflow
from actorflow.core.tracing import configure_logging

ours = lambda: [entry for entry in registered if entry[1] == "actorflow.core.tracing"]
at_import = ours()
configure_logging(json=True, file=sys.argv[1])()
configure_logging(json=True, file=sys.argv[1])()
print(json.dumps({"import": at_import, "configured": ours()}))
"""


def test_importing_actorflow_registers_no_exit_or_fork_hook_of_the_log_sink_until_a_sink_is_made(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _HOOKS, str(tmp_path / "hooks.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    hooks = json.loads(result.stdout)
    assert hooks["import"] == []
    # Once per process, however many sinks are made.
    assert sorted(hooks["configured"]) == [["atexit", "actorflow.core.tracing"], ["fork", "actorflow.core.tracing"]]


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
