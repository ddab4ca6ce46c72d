"""Configuration as data: `RuntimeConfig`, every knob of a runtime, checked when it is built.

The transition tables are not here: each pipeline derives its own (`core.pipeline`),
and the states terminal in every pipeline are `core.types.TERMINAL_STATES`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

from actorflow.core.errors import ConfigError, quote
from actorflow.core.pipeline import MAX_SECONDS, check_backend_name

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_SECONDS",
    "MAX_VALUE_BYTES",
    "MIN_VALUE_BYTES",
    "RuntimeConfig",
]

_SEED_WORKER_FIELDS = ("validator_workers", "processor_workers", "persistence_workers")
"""The deprecated fields that size the seed pipeline's stages, named ``<stage>_workers``."""


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
    """Workers of a pipeline stage that sets none (1 to `max_workers`). The seed pipeline's stages set
    their own (2, 4 and 2: see `actorflow.services.seed_pipeline`)."""
    validator_workers: int | None = None
    """Deprecated: the seed pipeline's validator stage's workers; use ``ServiceSet(workers={"validator": N})``
    (the seed pipeline's `workers=`), or `Stage(workers=)` in a pipeline of your own. None: the seed's 2."""
    processor_workers: int | None = None
    """Deprecated: the seed pipeline's processor stage's workers; use ``ServiceSet(workers={"processor": N})``.
    None: the seed's 4."""
    persistence_workers: int | None = None
    """Deprecated: the seed pipeline's persistence stage's workers; use
    ``ServiceSet(workers={"persistence": N})``. None: the seed's 2."""
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
        _check_int("stage_workers", self.stage_workers, minimum=1, maximum=self.max_workers, bound="max_workers")
        deprecated = [name for name in _SEED_WORKER_FIELDS if getattr(self, name) is not None]
        for name in deprecated:
            _check_int(name, getattr(self, name), minimum=1, maximum=self.max_workers, bound="max_workers")
        if deprecated:
            sizes = ", ".join(f"{name.removesuffix('_workers')!r}: {getattr(self, name)}" for name in deprecated)
            warnings.warn(
                f"RuntimeConfig.{', RuntimeConfig.'.join(deprecated)} "
                f"{'is deprecated: it sizes' if len(deprecated) == 1 else 'are deprecated: they size'} the seed "
                f"pipeline's stages only; use ServiceSet(workers={{{sizes}}}) "
                "(the seed pipeline's workers=, see actorflow.services.seed_pipeline), or Stage(workers=N) "
                "in a pipeline of your own",
                DeprecationWarning,
                stacklevel=3,  # __post_init__, the dataclass's __init__, then the caller
            )
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

    def seed_workers(self) -> dict[str, int]:
        """The seed stages' workers set through the deprecated ``<stage>_workers`` fields, by stage name
        (only the fields set: ``{"processor": 8}``). The runtime applies them to the seed pipeline."""
        sizes = {name.removesuffix("_workers"): getattr(self, name) for name in _SEED_WORKER_FIELDS}
        return {stage: size for stage, size in sizes.items() if size is not None}


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
