"""Structured events and trace context, the way a library should emit them.

actorflow never calls `structlog.configure()` and never touches the host's
logging setup. Each event goes out through one of two doors, chosen per event:

* the host (or `configure_logging`) has configured structlog: the event goes
  through `structlog.get_logger("actorflow")`, so it gets the host's processors,
  level filter and renderer;
* otherwise it goes to the stdlib logger ``actorflow`` (which carries a
  `NullHandler`, so an unconfigured host hears nothing), rendered as
  ``event key=value ...`` with the fields also attached as ``record.actorflow``.

Either way every field is passed explicitly, so events carry `task_id` and
`trace_id` even when the host's chain has no `merge_contextvars`.

Trace context travels *inside* messages (pykka threads do not share
contextvars). Ids are W3C/OpenTelemetry-shaped: a 32-hex trace id per task,
a 16-hex span id per service call.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import random
import re
import stat
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple, TextIO

import structlog
from structlog import _config as _structlog_config

from actorflow.core.errors import quote
from actorflow.core.events import LOG_EVENTS_DROPPED, LOG_RENDER_FAILED

__all__ = [
    "ConfiguredLogging",
    "EventLogger",
    "TraceContext",
    "configure_logging",
    "get_event_logger",
    "new_span_id",
    "new_task_id",
    "new_trace",
    "new_trace_id",
    "parse_traceparent",
]

_STDLIB_LOGGER = logging.getLogger("actorflow")
_STDLIB_LOGGER.addHandler(logging.NullHandler())  # the documented library convention: quiet unless the host opts in

# Ids need to be unique, not secret: a PRNG seeded from os.urandom is ~10x cheaper than a syscall per id.
_random = random.Random()

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_trace_id() -> str:
    """A random 32-hex W3C trace id (non-zero, as W3C requires)."""
    return f"{_random.getrandbits(128) | 1:032x}"


def new_task_id() -> str:
    """A random 32-hex task id (as unique as a uuid4, without a system call)."""
    return f"{_random.getrandbits(128):032x}"


def new_span_id() -> str:
    """A random 16-hex W3C span id (non-zero, as W3C requires)."""
    return f"{_random.getrandbits(64) | 1:016x}"


class TraceContext(NamedTuple):
    """The trace position a message carries: whose trace, and which span sent it."""

    trace_id: str
    span_id: str
    parent_span_id: str | None = None

    def child(self) -> TraceContext:
        """A new span under this one (one per service call)."""
        return TraceContext(self.trace_id, new_span_id(), self.span_id)

    def traceparent(self) -> str:
        """The W3C ``traceparent`` header value for this span."""
        return f"00-{self.trace_id}-{self.span_id}-01"


def new_trace() -> TraceContext:
    """A fresh trace: new trace id, new root span, no parent."""
    return TraceContext(new_trace_id(), new_span_id())


def parse_traceparent(value: str) -> TraceContext:
    """Adopt a caller's W3C traceparent: its trace id, with its span as our parent.

    Raises ValueError naming the value and the expected shape.
    """
    match = _TRACEPARENT.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None or match.group(1) == "ff" or set(match.group(2)) == {"0"} or set(match.group(3)) == {"0"}:
        raise ValueError(
            f"traceparent {quote(value)} is not a W3C traceparent; expected "
            "'00-<32 hex trace id>-<16 hex span id>-<2 hex flags>' with non-zero ids"
        )
    return TraceContext(trace_id=match.group(2), span_id=new_span_id(), parent_span_id=match.group(3))


class EventLogger:
    """Emits actorflow's structured events for one emitter (``actor``).

    The level is checked first: a disabled event costs a couple of attribute
    reads. With `configure_logging(json=True)` in effect, an enabled event is
    handed as it is (its keyword dict, never copied) to the JSON sink's own
    thread, which renders and writes it; otherwise it goes through the host's
    structlog chain, or the stdlib logger, on the calling thread.
    """

    __slots__ = ("actor",)

    def __init__(self, actor: str) -> None:
        self.actor = actor

    def debug(self, event: str, **fields: Any) -> None:
        """Emit at DEBUG (hot-path, per-step events)."""
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Emit at INFO (task outcomes, lifecycle)."""
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Emit at WARNING (rejections, failures, dead letters)."""
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Emit at ERROR (the runtime itself is in trouble)."""
        self._emit("error", event, fields)

    def enabled(self, level: str) -> bool:
        """Whether an event at `level` would go anywhere; use it to skip building costly fields."""
        sink = _sink_in_effect()
        if sink is not None:
            return _LEVELS[level] >= sink.min_level
        if structlog.is_configured():
            return _structlog_enabled(level)
        return _STDLIB_LOGGER.isEnabledFor(_LEVELS[level])

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event logged so far is written, if `configure_logging(json=True)` queues them.

        Other outputs write as they are logged. False if `timeout` passed first (a stuck disk).
        """
        sink = _sink_in_effect()
        return True if sink is None else sink.flush(timeout)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        sink = _sink_in_effect()
        if sink is not None:
            # `configure_logging`'s own JSON sink: no processor chain, no context merge (every field of
            # our events is passed explicitly), no copy: `fields` is this call's own keyword dict.
            if _LEVELS[level] >= sink.min_level:
                sink.put_event(time.time(), level, event, self.actor, fields)
            return
        fields.setdefault("actor", self.actor)
        if structlog.is_configured():
            if _structlog_enabled(level):
                getattr(_STRUCTLOG, level)(event, **fields)
            return
        if _STDLIB_LOGGER.isEnabledFor(_LEVELS[level]):
            text = " ".join(f"{key}={value}" for key, value in fields.items())
            _STDLIB_LOGGER.log(_LEVELS[level], "%s %s", event, text, extra={"actorflow": {"event": event, **fields}})


def get_event_logger(actor: str) -> EventLogger:
    """The event logger for one emitter, e.g. ``"state"`` or ``"processor-2"``."""
    return EventLogger(actor)


# --- structlog door -------------------------------------------------------------------------------

_STRUCTLOG = structlog.get_logger("actorflow")  # a lazy proxy: it follows the host's configuration
_STRUCTLOG_CONFIG: Any = getattr(_structlog_config, "_CONFIG", None)
if not all(
    hasattr(_STRUCTLOG_CONFIG, name) for name in ("default_processors", "default_wrapper_class", "logger_factory")
):
    _STRUCTLOG_CONFIG = None  # a structlog without these private names: use the public get_config()
_level_cache: dict[str, Any] = {"wrapper": None, "min_level": None}


def _sink_in_effect() -> _JsonSink | None:
    """`configure_logging`'s JSON sink, if structlog is still configured as it left it.

    A host may reconfigure structlog afterwards, or `capture_logs` may swap the
    processors inside the same list: then our events go through structlog as
    the host wants. Checked per event, so it reads the configuration directly.
    """
    sink = _own_sink
    if sink is None:
        return None
    processors = _configured_processors()
    if processors is not sink.processors or _configured_factory() is not sink.factory:
        return None
    # `capture_logs` clears the list and fills it again, maybe while another thread logs: never index an empty one
    return sink if processors and processors[-1] is sink.renderer else None


def _configured_processors() -> list[Any]:
    """The processor list structlog is configured with now.

    structlog's `get_config()` copies the whole configuration (~1 µs); its
    private `_CONFIG` holds the same list and is read in ~50 ns. Guarded by
    tests/test_log_sink.py, with the public call as the fallback.
    """
    if _STRUCTLOG_CONFIG is not None:
        processors: list[Any] = _STRUCTLOG_CONFIG.default_processors
        return processors
    configured: list[Any] = structlog.get_config()["processors"]
    return configured


def _configured_factory() -> Any:
    if _STRUCTLOG_CONFIG is not None:
        return _STRUCTLOG_CONFIG.logger_factory
    return structlog.get_config()["logger_factory"]


def _configured_wrapper() -> Any:
    if _STRUCTLOG_CONFIG is not None:
        return _STRUCTLOG_CONFIG.default_wrapper_class
    return structlog.get_config()["wrapper_class"]


def _structlog_enabled(level: str) -> bool:
    """Would the host's structlog configuration let an event at `level` through?

    Filtering loggers (`make_filtering_bound_logger`) know their level; the
    stdlib-backed BoundLogger defers to the stdlib logger; anything else is
    assumed to take every level.
    """
    wrapper = _configured_wrapper()
    if _level_cache["wrapper"] is not wrapper:
        min_level: int | None = 0
        if wrapper.__name__.startswith("BoundLoggerFiltering"):
            min_level = int(wrapper.get_effective_level(None))
        elif issubclass(wrapper, structlog.stdlib.BoundLogger):
            min_level = None
        _level_cache.update(wrapper=wrapper, min_level=min_level)
    min_level = _level_cache["min_level"]
    if min_level is None:
        return _STDLIB_LOGGER.isEnabledFor(_LEVELS[level])
    return _LEVELS[level] >= min_level


# --- the application's opt-in ---------------------------------------------------------------------

_MAX_PENDING = 65_536
"""Events that may wait for the JSON sink's thread before further events are dropped."""
_MAX_PENDING_BYTES = 64 << 20
"""Approximate bytes of events that may wait for the JSON sink's thread (see `_approx_size`)."""
_EVENT_BYTES = 512
"""What a queued event is taken to cost besides its text: the tuple, the dict, its keys and small values."""
_ITEM_BYTES = 64
"""What one element of a list, tuple or dict field is taken to cost."""
_BATCH = 1024
"""Events the sink's thread takes, renders and writes at once."""
_NEWLINE = ord("\n")
_FLUSH_TIMEOUT_S = 10.0
"""How long `close()` (and exit) wait for the sink's thread to write what is queued."""


class _Flush:
    """A marker in the sink's queue: `done` is set once every event before it is written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Stop(_Flush):
    """The last item of the sink's queue: write what came before, flush, and end the thread."""

    __slots__ = ()


_Event = tuple[float, str, str, str, dict[str, Any], int]
"""An event of ours as queued: (time.time(), level, event, actor, fields, approximate size in bytes)."""
_Item = _Event | str | _Flush
"""What the sink's queue holds: our events, lines structlog already rendered (the host's own events), markers."""


class _JsonSink:
    """actorflow's own JSON-lines sink: logging threads queue events, one thread renders and writes them.

    The StateActor and the orchestrator log from their hot loops; here they
    only append a tuple to a queue (about a microsecond). The sink's thread (a
    daemon named ``actorflow-log-sink``, started on the first event, so a fork
    child starts its own) takes what is queued in batches, renders each event
    with `render` and writes the batch with one write and one flush.

    Logging never waits for the sink, on any thread: the runtime's central
    threads (the StateActor, whose stall would delay every commit, the
    orchestrator, the async loop, the Ray waiter) and its workers (whose reports
    would be late) must not, and a host's own thread gains nothing from a wait
    that a slow disk can repeat for every write. The queue holds at most
    `max_pending` events and about `max_pending_bytes` (`_approx_size`; an
    event larger than that is still taken into an empty queue); an event that
    finds it full is dropped at once and counted, and so is one logged after
    `close`. The count is `dropped`, and is written as a ``log.events_dropped``
    event once a write succeeds again (events lost to a failed write are counted
    and reported the same way). Lines that structlog rendered (the host's own
    events, through `configure_logging`'s chain) go through the same queue, so
    the file keeps the order in which events were logged.

    A file the sink opened (`owned`) is closed by whoever writes last: the
    sink's thread once it reaches the stop marker `close` queued, or `close`
    itself when no thread runs. If the disk is stuck past `close`'s timeout the
    thread keeps the file open until it has written what it holds: closing the
    descriptor under it would let its later writes land in whatever file is
    opened next with the same number.
    """

    def __init__(
        self,
        stream: IO[str] | None,
        *,
        fd: int | None,
        owned: bool,
        min_level: int,
        processors: list[Any],
        max_pending: int,
        max_pending_bytes: int = _MAX_PENDING_BYTES,
        torn: bool = False,
    ) -> None:
        _register_process_hooks()
        self.min_level = min_level
        self.processors = processors
        """The processor list `configure_logging` gave structlog: while it is current, the sink is in effect."""
        self.renderer = processors[-1]
        """The last processor of that list (a host's `capture_logs` swaps the list's contents, not the list)."""
        self.factory: Callable[..., Any] | None = None
        """The logger factory `configure_logging` gave structlog."""
        self.dropped = 0
        """Events dropped because the queue was full, arrived after `close`, or were lost to a failed write."""
        self._text = stream
        self._fd = fd
        """A file `configure_logging` opened for appending: written with `os.write`, no buffer of Python's."""
        self._owned = owned
        self._max_pending = max_pending
        self._max_bytes = max_pending_bytes
        self._render = _json_renderer()
        self._closed = False
        self._torn = torn
        """The file may end in a line cut short (a failed write, here or before): the next write starts a fresh line."""
        self._reset()

    def _reset(self) -> None:
        """Fresh queue, locks and no thread: at start, and in a fork child (its parent's thread is not there)."""
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        """Guards the counts below and `_closed`, and orders every queued event before the stop marker."""
        self._pending = 0
        self._pending_bytes = 0
        self._unreported = 0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # --- logging threads ---------------------------------------------------------------------------

    def put_event(self, at: float, level: str, event: str, actor: str, fields: dict[str, Any]) -> None:
        """Queue one of our events for the sink's thread, or drop and count it if the queue is full. Never waits."""
        self._put((at, level, event, actor, fields, _approx_size(fields)))

    def msg(self, message: str) -> None:
        """The structlog logger interface: a line the host's chain rendered (queued in order with ours)."""
        self._put(message)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg

    def _put(self, item: _Event | str) -> None:
        size = item[5] if isinstance(item, tuple) else _line_size(item)
        with self._lock:
            if (
                self._closed
                or self._pending >= self._max_pending
                or (self._pending and self._pending_bytes + size > self._max_bytes)
            ):
                # Full (a slow or stuck disk) or closed: drop at once rather than hold up the thread that logs.
                self.dropped += 1
                if not self._closed:
                    self._unreported += 1
                return
            self._pending += 1
            self._pending_bytes += size
            self._queue.put(item)  # under the lock: nothing gets behind the stop marker `close` queues
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._run, name="actorflow-log-sink", daemon=True)
                thread.start()
                self._thread = thread

    def flush(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        """Wait until every event queued before this call is written and flushed. False on timeout."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True  # nothing was ever queued here (or the thread ended at close, having written all)
        marker = _Flush()
        with self._lock:
            closed = self._closed
            if not closed:
                self._queue.put(marker)
        if closed:  # the stop marker is queued and nothing after it is served: wait for the thread to end
            thread.join(timeout)
            return not thread.is_alive()
        return marker.done.wait(timeout)

    def close(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        """Write everything queued, stop the thread, close the file if it was opened here. Idempotent.

        Returns False if `timeout` passed first (a stuck disk): the thread then
        writes the rest, and closes the file, if the disk recovers.
        """
        with self._lock:
            if self._closed:
                return True
            self._closed = True  # from now on events are dropped and counted: the file is going away
        with self._start_lock:
            thread = self._thread  # and no thread can start from now on
        if thread is not None and thread.is_alive():
            stop = _Stop()
            self._queue.put(stop)
            if not stop.done.wait(timeout):
                return False  # the disk is stuck: the file stays the thread's, which closes it after the stop
            thread.join(timeout)
            return True
        # Never started, or gone with a fork: nobody else writes, so write what is queued and close here.
        self._write(self._drain_now())
        self._close_file()
        return True

    def _drain_now(self) -> list[_Item]:
        items: list[_Item] = []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._queue.get_nowait())
        self._taken(items)
        return items

    def _taken(self, batch: list[_Item]) -> None:
        """Free the room `batch`'s events held in the queue."""
        count = size = 0
        for item in batch:
            if isinstance(item, tuple):
                count += 1
                size += item[5]
            elif isinstance(item, str):
                count += 1
                size += _line_size(item)
        if count:
            with self._lock:
                self._pending -= count
                self._pending_bytes -= size

    def _close_file(self) -> None:
        if not self._owned:
            return
        if self._fd is not None:
            os.close(self._fd)
        if self._text is not None:
            self._text.close()

    # --- the sink's thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch = [get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < _BATCH:
                    batch.append(get_nowait())
            self._taken(batch)
            if self._write(batch):
                return

    def _write(self, batch: list[_Item]) -> bool:
        """Render and write one batch; True if it held the stop marker (the file is closed then). Never raises."""
        lines: list[bytes] = []
        markers: list[_Flush] = []
        stop = False
        render = self._render
        for item in batch:
            if isinstance(item, tuple):
                at, level, event, actor, fields, _ = item
                fields.setdefault("actor", actor)
                fields["event"] = event
                fields["level"] = level
                fields["timestamp"] = _iso_utc(at)
                try:
                    lines.append(render(fields))
                except Exception as exc:  # noqa: BLE001 - e.g. a value whose str() raises: say what was lost
                    lines.append(_std_json_line(_render_failure(fields, exc)))
            elif isinstance(item, str):
                lines.append(item.encode("utf-8", "backslashreplace"))
            else:
                markers.append(item)
                stop = stop or isinstance(item, _Stop)
        events = len(lines)
        unreported = 0
        if self._unreported:
            with self._lock:
                unreported, self._unreported = self._unreported, 0
            lines.append(render(_dropped_event(unreported)))
        if lines and not self._write_lines(lines):
            # Lost to a failed write, the drop report too: report them all once a write succeeds.
            with self._lock:
                self.dropped += events
                self._unreported += unreported + events
        if stop:
            self._close_file()  # before the marker is set: when `close` returns, the file is closed
        for marker in markers:
            marker.done.set()
        return stop

    def _write_lines(self, lines: list[bytes]) -> bool:
        """Write the lines with one write; False if they could not be (a full disk, a closed stream).

        A write that fails part way (the disk filled up mid-line) leaves a torn
        line at the end of the file: the next write then starts with a newline,
        so that its first event is not glued onto the torn one.
        """
        lines.append(b"")
        data = b"\n".join(lines)
        if self._torn:
            data = b"\n" + data
        sent = 0
        try:
            if self._fd is not None:
                # One write per batch, appended whole (O_APPEND); no buffer a fork child could inherit half-full.
                view = memoryview(data)
                while sent < len(data):
                    written = os.write(self._fd, view[sent:])
                    if written <= 0:
                        raise OSError(f"the log file took none of {len(data) - sent} bytes")
                    sent += written
            elif self._text is not None:
                self._text.write(data.decode("utf-8"))
                self._text.flush()
        except (OSError, ValueError):  # keep the thread: the disk may come back
            if self._fd is None:
                self._torn = True  # how much a text stream took is unknown: a blank line costs less than a glued one
            elif sent:
                self._torn = data[sent - 1] != _NEWLINE
            return False
        self._torn = False
        return True


def _ends_mid_line(path: object) -> bool:
    """True if `path` names a regular file whose last byte is not a newline (a line left torn, by a full disk say)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # a pipe or a device: nothing to read back (and opening a FIFO to read would block)
        with open(path, "rb") as existing:
            if existing.seek(0, os.SEEK_END) == 0:
                return False
            existing.seek(-1, os.SEEK_END)
            return existing.read(1) != b"\n"
    except OSError:
        return False


def _approx_size(fields: dict[str, Any]) -> int:
    """What an event holds in memory, roughly: a fixed cost, its text fields, and a fixed cost per container element.

    Cheap enough for the logging thread (a pass over the values, no rendering);
    it sees the large fields that matter, such as a failed call's traceback.
    """
    size = _EVENT_BYTES
    for value in fields.values():
        kind = type(value)
        if kind is str:
            size += len(value)
        elif kind is list or kind is tuple or kind is dict:
            size += _ITEM_BYTES * len(value)
    return size


def _line_size(line: str) -> int:
    return len(line) + _ITEM_BYTES


def _dropped_event(count: int) -> dict[str, Any]:
    return {
        "count": count,
        "actor": "log-sink",
        "event": LOG_EVENTS_DROPPED,
        "level": "error",
        "timestamp": _iso_utc(time.time()),
    }


_second: list[Any] = [None, ""]
"""The last whole second `_iso_utc` formatted, and its text (only the sink's thread uses it)."""


def _iso_utc(at: float) -> str:
    """`at` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it (``datetime.isoformat``).

    The date and time of day are formatted once per second: formatting a
    `datetime` for every event was a third of the sink's time. Microseconds are
    rounded half to even and omitted when zero, as `datetime.fromtimestamp` and
    `isoformat` do.
    """
    fraction, whole = math.modf(at)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:  # before 1970
        whole -= 1.0
        micros += 1_000_000
    second = int(whole)
    cached = _second
    if cached[0] != second:
        cached[1] = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        cached[0] = second
    return f"{cached[1]}.{micros:06d}Z" if micros else f"{cached[1]}Z"


def _json_renderer() -> Callable[[dict[str, Any]], bytes]:
    """One event dict -> one JSON line (bytes): `orjson` when it is installed, else the standard library."""
    try:
        import orjson  # noqa: PLC0415 - optional, looked up when a sink is made (tests take it away)
    except ImportError:
        return _std_json_line
    dumps, failed = orjson.dumps, orjson.JSONEncodeError

    def render(fields: dict[str, Any]) -> bytes:
        try:
            line: bytes = dumps(fields, default=str)
        except failed:  # an int past 64 bits, a key that is not a str (OPT_NON_STR_KEYS costs every event 50%)
            return _std_json_line(fields)
        return line

    return render


def _std_json_line(fields: dict[str, Any]) -> bytes:
    return _dumps(fields).encode("utf-8")


def _render_failure(fields: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """The line written instead of an event that could not be rendered."""
    return {
        "actor": "log-sink",
        "event": LOG_RENDER_FAILED,
        "original_event": str(fields.get("event")),
        "error": f"{type(exc).__name__}: {exc}"[:500],
        "level": "error",
        "timestamp": fields.get("timestamp"),
    }


class _LinesFile:
    """A structlog logger that appends lines to a stream under a lock (the console format).

    Lines are buffered and flushed at close: structlog's WriteLogger flushes
    after every line (~11 µs each).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._stream.write(message + "\n")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()


_own_sink: _JsonSink | None = None
"""The JSON sink of the latest `configure_logging(json=True)`, while not closed."""


def _after_fork_in_child() -> None:
    sink = _own_sink
    if sink is not None:
        sink._reset()


def _flush_at_exit() -> None:
    sink = _own_sink
    if sink is not None:
        sink.flush()


_hooks_registered = False
_hooks_lock = threading.Lock()


def _register_process_hooks() -> None:
    """Flush at exit, and forget the parent's sink thread in a fork child: once per process, at the first sink.

    Not at import: a host that never asks for our sink gets nothing registered.
    """
    global _hooks_registered
    with _hooks_lock:
        if _hooks_registered:
            return
        _hooks_registered = True
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
    atexit.register(_flush_at_exit)


def configure_logging(
    *,
    json: bool = False,
    level: str = "INFO",
    file: str | os.PathLike[str] | TextIO | None = None,
    colors: bool | None = None,
    max_pending: int = _MAX_PENDING,
    max_pending_bytes: int = _MAX_PENDING_BYTES,
) -> ConfiguredLogging:
    """The application's one-call opt-in: configure structlog for actorflow's events.

    Args:
        json: one JSON object per line (``event``, ``timestamp`` in ISO 8601
            UTC, ``level`` and the event's fields); otherwise readable console lines.
        level: the lowest level written: "DEBUG" (every step of every task),
            "INFO" (task outcomes and lifecycle), "WARNING" or "ERROR".
        file: a path to append to, or an open text stream; defaults to stderr.
        colors: colour console output; defaults to whether the stream is a tty.
        max_pending: with `json`, how many events may wait to be written
            before further events are dropped (see below).
        max_pending_bytes: with `json`, about how many bytes of events may
            wait to be written before further events are dropped: an event is
            taken to cost 512 bytes plus the length of its text fields (a
            failed call's traceback is up to 8 KiB) plus 64 bytes per element
            of a list, tuple or dict field.

    Returns:
        A `ConfiguredLogging`: call it (or its `close`) at exit to write what
        is pending, flush, and close what this call opened (what is pending
        is also written at interpreter exit).

    With `json`, actorflow's own events skip structlog's processor chain: the
    thread that logs one (the StateActor's, the orchestrator's...) only queues
    it, and the sink's own thread renders it (with `orjson` when it is
    installed, else the standard `json`) and writes it, in batches. Logging
    never waits for the disk: if `max_pending` events, or `max_pending_bytes`,
    are waiting (the disk is slow or stuck), an event is dropped at once, on
    whichever thread logs it, and counted (`dropped`); the number dropped is
    written as a ``log.events_dropped`` event once a write succeeds again.
    Other structlog events (the host's own) still go through the processors
    below, and are written in order with ours.

    This configures structlog globally, which is the application's right, not
    a library's: actorflow itself never calls it.
    """
    global _own_sink
    name = level.lower()
    if name not in _LEVELS:
        raise ValueError(f"level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    if max_pending < 1:
        raise ValueError(f"max_pending must be at least 1, not {max_pending!r}")
    if max_pending_bytes < 1:
        raise ValueError(f"max_pending_bytes must be at least 1, not {max_pending_bytes!r}")
    stream: IO[str] | None = None
    fd: int | None = None
    owned = False
    if file is None:
        stream = sys.stderr
    elif isinstance(file, (str, os.PathLike)):
        if json:  # bytes, as orjson renders them, appended by the sink's thread with one write per batch
            fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        else:
            stream = open(file, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115 - closed by the returned function
        owned = True
    else:
        stream = file
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [
            # show_locals=False: local variables would carry payloads into the logs
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        sink: _JsonSink | _LinesFile = _JsonSink(
            stream,
            fd=fd,
            owned=owned,
            min_level=_LEVELS[name],
            processors=processors,
            max_pending=max_pending,
            max_pending_bytes=max_pending_bytes,
            torn=fd is not None and _ends_mid_line(file),
        )
    else:
        assert stream is not None  # a path is opened as text when not `json`
        use_colors = stream.isatty() if colors is None else colors
        processors.append(structlog.dev.ConsoleRenderer(colors=use_colors))
        sink = _LinesFile(stream)
    previous = _own_sink
    if previous is not None:
        previous.close()  # its events are written; a new configuration replaces it
    _own_sink = sink if isinstance(sink, _JsonSink) else None

    def factory(*args: Any) -> _JsonSink | _LinesFile:
        return sink

    if isinstance(sink, _JsonSink):
        sink.factory = factory
    wrapper = structlog.make_filtering_bound_logger(_LEVELS[name])
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _level_cache["wrapper"] = None

    def close(timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        global _own_sink
        if isinstance(sink, _JsonSink):
            written = sink.close(timeout)
            if _own_sink is sink:
                _own_sink = None
            return written
        sink.flush()
        if owned and stream is not None:
            stream.close()
        return True

    return ConfiguredLogging(close, sink if isinstance(sink, _JsonSink) else None)


class ConfiguredLogging:
    """What `configure_logging` returns: call it (or `close`) at exit.

    Calling it twice is harmless.
    """

    __slots__ = ("_close", "_sink")

    def __init__(self, close: Callable[[float], bool], sink: _JsonSink | None) -> None:
        self._close = close
        self._sink = sink

    def __call__(self) -> None:
        """Write what is pending, flush, and close what `configure_logging` opened."""
        self._close(_FLUSH_TIMEOUT_S)

    def close(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        """The same as calling it, waiting at most `timeout` seconds for what is pending to be written.

        Returns:
            False if `timeout` passed first (a stuck disk): the sink's thread
            then writes the rest, and closes the file, if the disk recovers.
        """
        return self._close(timeout)

    def flush(self, timeout: float = _FLUSH_TIMEOUT_S) -> bool:
        """Wait until every event logged before this call is written; False if `timeout` passed first."""
        if self._sink is None:
            return True  # console lines are written as they are logged
        return self._sink.flush(timeout)

    @property
    def dropped(self) -> int:
        """JSON events dropped: the sink's queue was full (see `configure_logging`), a write failed, or after close."""
        return 0 if self._sink is None else self._sink.dropped


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
