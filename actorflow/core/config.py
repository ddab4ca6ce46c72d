"""Configuration as data: the seed's transition table and the validated `RuntimeConfig`.

Transition tables are derived from pipelines (`core.pipeline`); `TRANSITIONS` is
the seed pipeline's, its lifecycle diagram plus cancellation::

    CREATED ──► VALIDATED ──► PROCESSING ──► COMPLETED
       │            │              │
       ├────────────┴──────────────┴──────► FAILED
       └────────────┴──────────────┴──────► CANCELLED

COMPLETED, FAILED and CANCELLED are terminal: nothing leaves them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from actorflow.core.errors import ConfigError, quote
from actorflow.core.pipeline import MAX_SECONDS, check_backend_name, seed_shape
from actorflow.core.types import TaskState

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_SECONDS",
    "MAX_VALUE_BYTES",
    "MIN_VALUE_BYTES",
    "NON_TERMINAL_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "RuntimeConfig",
    "is_allowed",
    "is_terminal",
]


def _no_stage(*args: object) -> None:
    """A placeholder: only the seed pipeline's shape is needed here, not its functions."""


TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = seed_shape(_no_stage, _no_stage, _no_stage).transitions
"""For each state, the states it may move to. A state with no way out is terminal."""

TERMINAL_STATES: frozenset[TaskState] = frozenset(state for state, targets in TRANSITIONS.items() if not targets)
NON_TERMINAL_STATES: frozenset[TaskState] = frozenset(TRANSITIONS) - TERMINAL_STATES


def is_allowed(from_state: TaskState, to_state: TaskState) -> bool:
    """True if the seed's table allows moving from `from_state` to `to_state` (see `Pipeline.is_allowed`)."""
    return to_state in TRANSITIONS.get(from_state, frozenset())


def is_terminal(state: TaskState) -> bool:
    """True for COMPLETED, FAILED and CANCELLED (terminal in every pipeline)."""
    return state in TERMINAL_STATES


DEFAULT_MAX_VALUE_BYTES = 64 * 1024 * 1024
"""`RuntimeConfig.max_value_bytes` by default: 64 MiB per value, as JSON."""
MIN_VALUE_BYTES = 1024
"""The least `RuntimeConfig.max_value_bytes` allowed: room for any ordinary payload."""
MAX_VALUE_BYTES = 256 * 1024 * 1024
"""The most `RuntimeConfig.max_value_bytes` allowed: a row with a payload and a value of this size each
stays well below SQLite's limit of 1e9 bytes per row."""

Durability = Literal["normal", "full"]
OverloadPolicy = Literal["wait", "reject"]


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Every knob of a `Runtime`, checked when it is built.

    A bad value raises `ConfigError` naming the field, the value and what is allowed.
    """

    stage_workers: int = 4
    """Workers of a pipeline stage that sets none (1 to `max_workers`); the seed's stages use the three below."""
    validator_workers: int = 2
    """Worker actors in the validator pool (1 to `max_workers`)."""
    processor_workers: int = 4
    """Worker actors in the processor pool (1 to `max_workers`)."""
    persistence_workers: int = 2
    """Worker actors in the persistence pool (1 to `max_workers`)."""
    max_workers: int = 256
    """The most workers one stage may have on the thread, process and Ray backends (each is a
    thread, a process or a Ray actor): the pool sizes above and `Stage(workers=)` are checked
    against it, so that a typo cannot start thousands. Raise it if the machine can take more."""
    max_async_workers: int = 100_000
    """The most calls one async stage may have in flight (`Stage(workers=)` of an ``async def``
    stage): coroutines are cheap, so this is generous (10,000 cost about 50 MB)."""
    result_store: str | None = None
    """SQLite file the default persistence service writes results to; None keeps them in memory."""
    journal_path: str | None = None
    """SQLite journal of every task and transition; None keeps state in memory only."""
    durability: Durability = "normal"
    """"normal" survives process crashes; "full" also survives power loss (fsync per commit)."""
    retain_terminal: int | None = None
    """Keep at most this many terminal records in memory (needs a journal); None keeps all."""
    max_attempts: int = 3
    """Attempts per stage before a transient failure becomes permanent (at least 1)."""
    retry_backoff_s: float = 0.01
    """First retry delay; doubled on every further attempt, with full jitter."""
    retry_backoff_max_s: float = 1.0
    """Upper bound of the retry delay."""
    stage_timeout_s: float | None = None
    """A service call running longer than this is a transient failure; None for no limit."""
    max_restarts: int = 10
    """More worker restarts than this within `restart_window_s` turn a pool failing: dead workers are not
    replaced and its calls wait (uncharged) until the window has passed again, when it restarts them."""
    restart_window_s: float = 10.0
    """The window of `max_restarts`, and a failing pool's cool-down."""
    max_in_flight: int | None = None
    """Bound on non-terminal tasks; None for no bound."""
    submit_timeout_s: float = 5.0
    """How long `submit()` waits for room when `max_in_flight` is reached (overload="wait")."""
    overload: OverloadPolicy = "wait"
    """At `max_in_flight`: "wait" up to `submit_timeout_s`, or "reject" at once."""
    service_backend: str = "thread"
    """Where the calls of a stage that names no backend run: "thread" (default), "process", "ray", or a backend
    the host registered (`actorflow.register_backend`); ``async def`` stages run on "async" whatever this says.
    The Runtime checks that the name is registered."""
    ray_address: str | None = None
    """Ray cluster address with service_backend="ray"; None starts a local Ray."""
    ray_connect_timeout_s: float = 30.0
    """How long the Ray cluster at `ray_address` may take to answer before `Runtime()` raises ConfigError."""
    drain_timeout_s: float = 30.0
    """How long `close(drain=True)` waits for tasks in flight."""
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    """The most a task may store per value, as JSON: its payload (a larger one is refused by `submit`
    with `ValueTooLarge`, an `InvalidPayload`) and each value a stage returns (a larger one fails the
    task, charged once: the value handed to the next stage, and the result, are such values). At most
    `MAX_VALUE_BYTES`: a journal row holds a payload and a value, and SQLite refuses rows of 1e9 bytes."""

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_workers", "max_async_workers"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("stage_workers", "validator_workers", "processor_workers", "persistence_workers"):
            _check_int(name, getattr(self, name), minimum=1, maximum=self.max_workers, bound="max_workers")
        _check_int("max_restarts", self.max_restarts, minimum=0)
        value_bytes = self.max_value_bytes
        if (
            isinstance(value_bytes, bool)
            or not isinstance(value_bytes, int)
            or not MIN_VALUE_BYTES <= value_bytes <= MAX_VALUE_BYTES
        ):
            raise ConfigError(
                f"RuntimeConfig.max_value_bytes must be an int from {MIN_VALUE_BYTES} to {MAX_VALUE_BYTES} "
                f"(256 MiB: a journal row holds a payload and a value, and SQLite refuses a row of 1e9 bytes), "
                f"got {value_bytes!r}"
            )
        for name in ("result_store", "journal_path", "ray_address"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"RuntimeConfig.{name} must be a non-empty str path or None, got {quote(value)}")
        _check_choice("durability", self.durability, ("normal", "full"))
        _check_choice("overload", self.overload, ("wait", "reject"))
        check_backend_name("RuntimeConfig.service_backend", self.service_backend)
        if self.retain_terminal is not None:
            _check_int("retain_terminal", self.retain_terminal, minimum=0)
            if self.journal_path is None:
                raise ConfigError(
                    "RuntimeConfig.retain_terminal needs journal_path: evicted records are read back from the journal"
                )
        if self.max_in_flight is not None:
            _check_int("max_in_flight", self.max_in_flight, minimum=1)
        for name in ("retry_backoff_s", "retry_backoff_max_s", "submit_timeout_s", "drain_timeout_s"):
            _check_seconds(name, getattr(self, name), allow_zero=True)
        _check_seconds("restart_window_s", self.restart_window_s, allow_zero=False)
        _check_seconds("ray_connect_timeout_s", self.ray_connect_timeout_s, allow_zero=False)
        if self.stage_timeout_s is not None:
            _check_seconds("stage_timeout_s", self.stage_timeout_s, allow_zero=False)
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ConfigError(
                f"RuntimeConfig.retry_backoff_max_s ({self.retry_backoff_max_s}) must be >= "
                f"retry_backoff_s ({self.retry_backoff_s})"
            )

    def workers_for(self, service: str) -> int:
        """Pool size of a stage that sets no `workers`: "validator", "processor" and "persistence"
        have their own fields, any other stage gets `stage_workers`."""
        if service in ("validator", "processor", "persistence"):
            value = getattr(self, f"{service}_workers")
            assert isinstance(value, int)
            return value
        return self.stage_workers


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None, bound: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f">= {minimum}" if maximum is None else f">= {minimum} and <= {maximum} (RuntimeConfig.{bound})"
        raise ConfigError(f"RuntimeConfig.{name} must be an int {allowed}, got {quote(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(
            f"RuntimeConfig.{name} must be an int >= {minimum} and <= {maximum}, got {value}; the bound is "
            f"RuntimeConfig.{bound}, which protects the machine: raise it if the machine can take more"
        )


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 or (allow_zero and value == 0)) and value <= MAX_SECONDS:  # type: ignore[operator]
        return
    low = ">= 0" if allow_zero else "> 0"
    raise ConfigError(
        f"RuntimeConfig.{name} must be a finite number of seconds {low} and <= {MAX_SECONDS:.0f} (a year), "
        f"got {quote(value)}"
    )


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"RuntimeConfig.{name} must be one of {', '.join(map(repr, allowed))}, got {quote(value)}")
