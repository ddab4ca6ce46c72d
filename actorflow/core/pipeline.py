"""Pipelines as data: a `Pipeline` is a named sequence of `Stage`s, checked when it is built.

A stage function is ``fn(task, value)``. The first stage gets the payload as its
value; what a stage returns is the next stage's value, and None passes the value
on unchanged; the last value becomes the record's result. Raising
`TransientError` asks for a retry; any other exception fails the task.

Each stage runs while the task is in the stage's *state* (derived from its name:
stage ``"fetch"`` runs in state ``FETCH``, unless the stage names another). The
transition table is derived from the stages, so it is data the StateActor
enforces. For stages ``check, fetch, store``::

    CREATED ──► CHECK ──► FETCH ──► STORE ──► COMPLETED
       │          │         │         │
       └──────────┴─────────┴─────────┴────► FAILED, CANCELLED

A stage whose state is the previous one's (or ``CREATED`` for the first stage)
runs without a transition; a stage's ``done_state`` is recorded when it succeeds.
The seed pipeline (`actorflow.services.seed_pipeline`) is a pipeline like any
other, built from both: its lifecycle is
``CREATED ─validator─► VALIDATED ──► PROCESSING ─processor, persistence─► COMPLETED``.
COMPLETED, FAILED and CANCELLED (`core.types.TERMINAL_STATES`) are terminal in
every pipeline: nothing leaves them.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeAlias

from actorflow.core.errors import ConfigError, quote
from actorflow.core.types import DEFAULT_PIPELINE, TERMINAL_STATES, JSONInput, JSONValue, Task, TaskState

__all__ = [
    "BACKEND_NAME",
    "DEFAULT_PIPELINE",
    "MAX_SECONDS",
    "AsyncStageFunction",
    "Pipeline",
    "Stage",
    "StageFunction",
    "SyncStageFunction",
    "check_backend_name",
]


class SyncStageFunction(Protocol):
    """A stage function: ``fn(task, value) -> next value`` (None hands `value` on).

    `task` is the `Task` (its id, its payload, `Task.attempt`); `value` is the payload for the
    first stage, then what the stage before returned. Raise `TransientError` to be retried.
    """

    def __call__(self, task: Task, value: JSONValue, /) -> JSONInput: ...


class AsyncStageFunction(Protocol):
    """An ``async def`` stage function: ``await fn(task, value) -> next value``; it runs on an event loop."""

    def __call__(self, task: Task, value: JSONValue, /) -> Awaitable[JSONInput]: ...


StageFunction: TypeAlias = SyncStageFunction | AsyncStageFunction
"""What `Stage.fn` takes: a function called as ``fn(task, value)``, plain or ``async def``. Type
checkers use it to catch a function of another shape; `Stage` checks the arity when it is built."""

BACKEND_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a backend's name looks like. Which names exist is the runtime's registry's to say
(`actorflow.register_backend`): core cannot see it, so it checks only the form."""

MAX_SECONDS: Final = 365 * 24 * 3600.0
"""The longest duration any setting (of a `Stage` or of `RuntimeConfig`) may have: a year. Far beyond
any real timeout or backoff, and far below what a thread's wait accepts (`threading.TIMEOUT_MAX`, about
292 years on Linux), which a larger one would overflow."""
_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def check_backend_name(what: str, value: object) -> None:
    """Raise ConfigError unless `value` has the form of a backend's name (`what` names the setting)."""
    if not isinstance(value, str) or not BACKEND_NAME.fullmatch(value):
        raise ConfigError(
            f"{what} must be a backend's name (1 to 64 letters, digits, '_' or '-'), got {quote(value)}; "
            "the built-in backends are 'thread', 'process', 'ray' and 'async'"
        )


def _is_coroutine_function(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _check_signature(where: str, fn: Callable[..., object]) -> None:
    """Raise ConfigError unless `fn` can be called as ``fn(task, value)``.

    A callable whose signature cannot be read (some builtins and extension types) is
    taken on trust: the check is there to catch the common mistake early, not to refuse
    what works.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise ConfigError(
            f"{where}: fn {name}{signature} cannot be called as fn(task, value) ({exc}); "
            "a stage function takes two positional arguments: the Task and the value"
        ) from None


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a pipeline: a function and where and how it runs.

    Settings left as None fall back to the runtime's `RuntimeConfig`.

    Args:
        name: 1-64 letters, digits, ``_`` or ``-``, unique in its pipeline.
        fn: ``fn(task, value)`` (a `StageFunction`); may be ``async def`` (then it runs on an event
            loop). Checked when the stage is built: one that cannot take two positional arguments
            raises ConfigError.
        workers: calls of this stage running at once (for "async", calls in flight); at most
            `RuntimeConfig.max_workers` (`max_async_workers` for "async"), checked by the Runtime.
        backend: the name of a registered backend: "thread", "process", "ray", "async" (for
            ``async def`` functions only) or one of the host's (`actorflow.register_backend`);
            None means "async" for an ``async def`` function and `RuntimeConfig.service_backend`
            otherwise. The Runtime checks that the name is registered.
        timeout_s: a call running longer is a transient failure (RuntimeConfig.stage_timeout_s).
        max_attempts: attempts before a transient failure fails the task (RuntimeConfig.max_attempts).
        retry_backoff_s: first retry delay (RuntimeConfig.retry_backoff_s).
        retry_backoff_max_s: upper bound of the retry delay (RuntimeConfig.retry_backoff_max_s).
        state: the state the task is in while this stage runs; derived from `name` if None.
        done_state: a state recorded when the stage succeeds, before the next stage's.

    Raises:
        ConfigError: a setting is out of range; the message names the stage and the field.
    """

    name: str
    fn: StageFunction
    workers: int | None = None
    backend: str | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    retry_backoff_s: float | None = None
    retry_backoff_max_s: float | None = None
    state: str | None = None
    done_state: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"Stage name {quote(self.name)} is not allowed: use 1 to 64 letters, digits, '_' or '-', "
                "starting with a letter"
            )
        where = f"Stage {self.name!r}"
        if not callable(self.fn):
            raise ConfigError(f"{where}: fn must be callable, got {quote(self.fn)}")
        _check_signature(where, self.fn)
        if self.workers is not None:
            _check_int(where, "workers", self.workers, minimum=1)
        if self.max_attempts is not None:
            _check_int(where, "max_attempts", self.max_attempts, minimum=1)
        if self.backend is not None:
            check_backend_name(f"{where}: backend", self.backend)
        is_async = _is_coroutine_function(self.fn)
        if self.backend == "async" and not is_async:
            raise ConfigError(f"{where}: backend 'async' needs an async def function, got {self.fn!r}")
        if is_async and self.backend not in (None, "async"):
            raise ConfigError(
                f"{where}: backend {self.backend!r} cannot run the async def function {self.fn!r}; "
                "leave backend None (or 'async') to run it on an event loop"
            )
        if self.timeout_s is not None:
            _check_seconds(where, "timeout_s", self.timeout_s, allow_zero=False)
        for name in ("retry_backoff_s", "retry_backoff_max_s"):
            value = getattr(self, name)
            if value is not None:
                _check_seconds(where, name, value, allow_zero=True)
        if (
            self.retry_backoff_s is not None
            and self.retry_backoff_max_s is not None
            and self.retry_backoff_max_s < self.retry_backoff_s
        ):
            raise ConfigError(
                f"{where}: retry_backoff_max_s ({self.retry_backoff_max_s}) must be >= "
                f"retry_backoff_s ({self.retry_backoff_s})"
            )
        for name in ("state", "done_state"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                state = TaskState(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {name} {exc}") from None
            if state in TERMINAL_STATES:
                raise ConfigError(f"{where}: {name} {value!r} is terminal; a stage's states must not be")
        if self.done_state == TaskState.CREATED:
            raise ConfigError(f"{where}: done_state must not be CREATED, the state every task starts in")

    @property
    def is_async(self) -> bool:
        """True if `fn` is an ``async def`` function (it runs on an event loop)."""
        return _is_coroutine_function(self.fn)

    @property
    def run_state(self) -> TaskState:
        """The state a task is in while this stage runs."""
        if self.state is not None:
            return TaskState(self.state)
        derived = re.sub(r"[^A-Za-z0-9]+", "_", self.name).strip("_").upper()
        return TaskState(derived)


@dataclass(frozen=True, slots=True, init=False)
class Pipeline:
    """A named, checked sequence of stages, and the transition table it derives.

    Args:
        name: 1-64 letters, digits, ``_`` or ``-``; unique in a runtime.
        stages: at least one `Stage`, with unique names and states.

    Raises:
        ConfigError: the pipeline is empty, a name or state repeats, or a stage's
            state is terminal; the message names the stage and the field.
    """

    name: str
    stages: tuple[Stage, ...]
    transitions: Mapping[TaskState, frozenset[TaskState]] = field(repr=False, compare=False)
    """For each of the pipeline's states, the states it may move to (terminal ones: none)."""
    states: tuple[TaskState, ...] = field(repr=False, compare=False)
    """Every state of the pipeline, in lifecycle order, the three terminal ones last."""
    _stage_at: Mapping[TaskState, int] = field(repr=False, compare=False)
    _done_at: Mapping[TaskState, int] = field(repr=False, compare=False)

    def __init__(self, name: str, stages: Iterable[Stage]) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"Pipeline name {quote(name)} is not allowed: use 1 to 64 letters, digits, '_' or '-', "
                "starting with a letter"
            )
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Iterable):
            raise ConfigError(f"Pipeline {name!r}: stages must be a list of Stage, got {type(stages).__name__}")
        stages = tuple(stages)
        if not stages:
            raise ConfigError(f"Pipeline {name!r}: stages is empty; a pipeline needs at least one Stage")
        for index, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise ConfigError(f"Pipeline {name!r}: stages[{index}] must be a Stage, got {quote(stage)}")
        seen_names: set[str] = set()
        for stage in stages:
            if stage.name in seen_names:
                raise ConfigError(f"Pipeline {name!r}: stage name {stage.name!r} is used twice; stage names are unique")
            seen_names.add(stage.name)
        table: dict[TaskState, set[TaskState]] = {TaskState.CREATED: set()}
        stage_at: dict[TaskState, int] = {}
        done_at: dict[TaskState, int] = {}
        current = TaskState.CREATED
        for index, stage in enumerate(stages):
            for field_name, name_or_none in (("state", stage.run_state), ("done_state", stage.done_state)):
                if name_or_none is None:
                    continue
                state = TaskState(name_or_none)
                if state in TERMINAL_STATES:
                    raise ConfigError(
                        f"Pipeline {name!r}: stage {stage.name!r} has the terminal state {state.value!r} "
                        f"(derived from its name); give the stage another state= name"
                    )
                if field_name == "state" and state is current:
                    stage_at.setdefault(state, index)  # runs in the state the previous step left
                    continue
                if state in table:
                    raise ConfigError(
                        f"Pipeline {name!r}: stage {stage.name!r} field {field_name} {state.value!r} is already "
                        "used by an earlier step; each state may appear once (consecutive stages may share one)"
                    )
                table[current].add(state)
                table[state] = set()
                current = state
                if field_name == "state":
                    stage_at[state] = index
                else:
                    done_at[state] = index
        table[current].add(TaskState.COMPLETED)
        for targets in table.values():
            targets.update((TaskState.FAILED, TaskState.CANCELLED))
        for terminal in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED):
            table[terminal] = set()
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(
            self, "transitions", MappingProxyType({state: frozenset(targets) for state, targets in table.items()})
        )
        object.__setattr__(self, "states", tuple(table))
        object.__setattr__(self, "_stage_at", MappingProxyType(stage_at))
        object.__setattr__(self, "_done_at", MappingProxyType(done_at))

    def is_allowed(self, from_state: TaskState, to_state: TaskState) -> bool:
        """True if this pipeline's table allows moving from `from_state` to `to_state`."""
        targets = self.transitions.get(from_state)
        return targets is not None and to_state in targets

    def stage(self, name: str) -> Stage:
        """The stage called `name`. Raises KeyError naming the stages there are."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"pipeline {self.name!r} has no stage {quote(name)}; its stages: {self.stage_names()}")

    def stage_names(self) -> list[str]:
        """The stages' names, in order."""
        return [stage.name for stage in self.stages]

    def stage_running_in(self, state: TaskState) -> int | None:
        """The index of the first stage that runs in `state`; None if none does."""
        return self._stage_at.get(state)

    def stage_done_in(self, state: TaskState) -> int | None:
        """The index of the stage whose `done_state` is `state`; None if none."""
        return self._done_at.get(state)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: name, stages (name, state, backend) and the transition table."""
        return {
            "name": self.name,
            "stages": [
                {
                    "name": s.name,
                    "state": s.run_state.value,
                    "done_state": None if s.done_state is None else str(s.done_state),
                    "backend": "async" if s.is_async else s.backend,
                }
                for s in self.stages
            ],
            "states": [state.value for state in self.states],
            "transitions": {
                state.value: sorted(t.value for t in targets) for state, targets in self.transitions.items()
            },
        }


def _check_int(where: str, name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {name} must be an int >= {minimum} or None, got {quote(value)}")


def _check_seconds(where: str, name: str, value: object, *, allow_zero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 or (allow_zero and value == 0)) and value <= MAX_SECONDS:  # type: ignore[operator]
        return
    low = ">= 0" if allow_zero else "> 0"
    raise ConfigError(
        f"{where}: {name} must be a finite number of seconds {low} and <= {MAX_SECONDS:.0f} (a year) or None, "
        f"got {quote(value)}"
    )
