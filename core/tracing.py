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

import json
import logging
import os
import random
import re
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, NamedTuple, TextIO

import structlog

__all__ = [
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
            f"traceparent {value!r} is not a W3C traceparent; expected "
            "'00-<32 hex trace id>-<16 hex span id>-<2 hex flags>' with non-zero ids"
        )
    return TraceContext(trace_id=match.group(2), span_id=new_span_id(), parent_span_id=match.group(3))


class EventLogger:
    """Emits actorflow's structured events for one emitter (``actor``).

    Disabled levels cost one attribute check and one `isEnabledFor` call, so
    hot-path events are cheap when nobody listens.
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
        if structlog.is_configured():
            return _structlog_enabled(level)
        return _STDLIB_LOGGER.isEnabledFor(_LEVELS[level])

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
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
_level_cache: dict[str, Any] = {"wrapper": None, "min_level": None}


def _structlog_enabled(level: str) -> bool:
    """Would the host's structlog configuration let an event at `level` through?

    Filtering loggers (`make_filtering_bound_logger`) know their level; the
    stdlib-backed BoundLogger defers to the stdlib logger; anything else is
    assumed to take every level.
    """
    wrapper = structlog.get_config()["wrapper_class"]
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


class _JsonLinesFile:
    """A structlog logger that appends lines to a buffered file under a lock.

    structlog's WriteLogger flushes after every line (~11 µs each); buffering
    and flushing at close or when the buffer fills is what keeps JSON tracing
    cheap on the hot path.
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


_opened_files: list[IO[str]] = []


def configure_logging(
    *,
    json: bool = False,
    level: str = "INFO",
    file: str | os.PathLike[str] | TextIO | None = None,
    colors: bool | None = None,
) -> Callable[[], None]:
    """The application's one-call opt-in: configure structlog for actorflow's events.

    Args:
        json: one JSON object per line (``event``, ``timestamp`` in ISO 8601
            UTC, ``level`` and the event's fields); otherwise readable console lines.
        level: the lowest level written: "DEBUG" (every step of every task),
            "INFO" (task outcomes and lifecycle), "WARNING" or "ERROR".
        file: a path to append to, or an open text stream; defaults to stderr.
        colors: colour console output; defaults to whether the stream is a tty.

    Returns:
        A function that flushes and closes what this call opened; call it at exit.

    This configures structlog globally, which is the application's right, not
    a library's: actorflow itself never calls it.
    """
    name = level.lower()
    if name not in _LEVELS:
        raise ValueError(f"level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    stream: IO[str]
    owned = False
    if file is None:
        stream = sys.stderr
    elif isinstance(file, (str, os.PathLike)):
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
    else:
        use_colors = stream.isatty() if colors is None else colors
        processors.append(structlog.dev.ConsoleRenderer(colors=use_colors))
    sink = _JsonLinesFile(stream)
    wrapper = structlog.make_filtering_bound_logger(_LEVELS[name])
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    _level_cache["wrapper"] = None

    def close() -> None:
        sink.flush()
        if owned:
            stream.close()

    return close


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
