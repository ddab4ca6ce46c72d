"""How the runtime is doing, and the internal milestones it reaches: shared by its actors.

Three small pieces, each thread-safe and cheap when nobody listens:

- `Milestone` / `Milestones`: an observable hook for internal events (a worker
  restarted, a retry scheduled, the journal degraded or recovered, a central
  actor restarted...). Tests and operators wait on these instead of polling
  `stats()`. Emitting with no listener costs one attribute test.
- `Health`: ``ok``, ``degraded`` (a journal fault or a failing pool the
  runtime rides out, each with its reason) or ``failed`` (something it cannot
  rebuild). Actors report into it; `Runtime.health()` and `/healthz` read it.
- `Backoff`: capped exponential delays, for every loop that retries a fault.
- `LogThrottle`: at most one log line per interval for a fault that repeats per
  request (a full disk refuses every submission), with the count of those left out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from actorflow.core.events import ON_MILESTONE_FAILED
from actorflow.core.failures import describe_error
from actorflow.core.tracing import get_event_logger

__all__ = ["Backoff", "Health", "HealthStatus", "LogThrottle", "Milestone", "Milestones"]

_log = get_event_logger("runtime")


@dataclass(frozen=True, slots=True)
class Milestone:
    """One internal event of a runtime.

    Attributes:
        name: what happened, one of `actorflow.core.events.MILESTONES` (e.g. ``"worker.restarted"``,
            ``"journal.degraded"``, ``"pool.failing"``); the ``MILESTONE_*`` constants there say when
            each is reached and with which fields.
        fields: details (task id, service, reason...), never payloads.
    """

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)


class Milestones:
    """Delivers milestones to one callback, on whichever actor thread reaches them.

    The callback must be quick and must not block (hand off with a queue or an
    Event); what it raises is logged and ignored, so it can never take an actor down.
    """

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[Milestone], None] | None = None) -> None:
        self._callback = callback

    @property
    def active(self) -> bool:
        """True if someone listens (check before building costly fields)."""
        return self._callback is not None

    def emit(self, name: str, **fields: Any) -> None:
        """Report a milestone to the callback, if there is one."""
        callback = self._callback
        if callback is None:
            return
        try:
            callback(Milestone(name, fields))
        except Exception as exc:  # noqa: BLE001 - a listener's bug must not break the runtime
            _log.error(ON_MILESTONE_FAILED, milestone=name, error_type=type(exc).__name__, error=describe_error(exc))


HealthStatus = Literal["ok", "degraded", "failed"]


class Health:
    """The runtime's health: ok, degraded (with a reason per source) or failed (for good, with a reason).

    `degraded` is an operating state, reported by a *source* and cleared by
    it alone: the journal (``"journal"``: it refuses writes, on a full or
    read-only disk; it clears when a write succeeds again) and each failing
    pool (``"pool 'name'"``: it restarted its workers too often and waits for
    its cool-down). Several sources can be degraded at once; the reason
    reported joins theirs, in the order they began. `failed` never clears.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._degraded: dict[str, str] = {}
        """Source -> its reason, in the order the sources degraded."""
        self._listeners: list[Callable[[str], None]] = []

    def snapshot(self) -> tuple[HealthStatus, str | None]:
        """The status and its reason (None when ok); a degraded one joins every source's reason."""
        with self._lock:
            if self._failed is not None:
                return "failed", self._failed
            if self._degraded:
                return "degraded", "; ".join(self._degraded.values())
            return "ok", None

    def degraded_sources(self) -> dict[str, str]:
        """Each degraded source with its reason (empty when none is)."""
        with self._lock:
            return dict(self._degraded)

    @property
    def failed(self) -> bool:
        """True once the runtime has failed for good."""
        return self._failed is not None

    def degrade(self, reason: str, *, source: str = "journal") -> None:
        """`source` enters (or stays in) the degraded state with `reason`; ignored once failed."""
        with self._lock:
            if self._failed is None:
                self._degraded[source] = reason

    def recover(self, *, source: str = "journal") -> None:
        """`source` is back to normal; the others stay as they are. Ignored once failed."""
        with self._lock:
            if self._failed is None:
                self._degraded.pop(source, None)

    def fail(self, reason: str) -> bool:
        """Fail for good and call every `on_fail` listener once. False if it had already failed."""
        with self._lock:
            if self._failed is not None:
                return False
            self._failed = reason
            self._degraded.clear()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(reason)
        return True

    def on_fail(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` when the runtime fails (from the thread that detects it)."""
        with self._lock:
            self._listeners.append(listener)


class Backoff:
    """Capped exponential delays: `initial_s`, doubling on each `failed()`, never above `cap_s`."""

    __slots__ = ("_cap", "_initial", "_next", "steps")

    def __init__(self, initial_s: float = 0.01, cap_s: float = 1.0) -> None:
        self._initial = initial_s
        self._cap = cap_s
        self._next = initial_s
        self.steps = 0
        """Consecutive failures since the last `reset()`."""

    def failed(self) -> float:
        """Record one more failure; returns the delay to wait before the next try."""
        delay = self._next
        self._next = min(self._cap, self._next * 2)
        self.steps += 1
        return delay

    def reset(self) -> None:
        """A try succeeded: the next failure starts from `initial_s` again."""
        self._next = self._initial
        self.steps = 0


class LogThrottle:
    """At most one line per `interval_s` for an event that can repeat per request. Thread-safe.

    `allow()` says whether to log now and, if so, how many lines were left out since
    the last one, for the line to carry (``suppressed=N``). As the journal's own
    lines are, a fault that refuses thousands of requests logs a line per interval.
    """

    __slots__ = ("_clock", "_interval", "_lock", "_next_at", "_suppressed")

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next_at = float("-inf")
        self._suppressed = 0

    def allow(self) -> int | None:
        """None: leave this line out (it is counted). Else log it, with the returned count of lines left out."""
        with self._lock:
            now = self._clock()
            if now < self._next_at:
                self._suppressed += 1
                return None
            self._next_at = now + self._interval
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed
