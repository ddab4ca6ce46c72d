"""The seed pipeline, validate → process → persist: a `Pipeline` like any other, built by `seed_pipeline`.

Its lifecycle::

    CREATED ─validator─► VALIDATED ──► PROCESSING ─processor, persistence─► COMPLETED
       │                    │              │
       └────────────────────┴──────────────┴──────► FAILED, CANCELLED

The seed's three functions keep their own signatures (``validate(payload)``,
``process(task) -> Mapping``, ``persist(task, result)``); the adapters here give
each the stage signature ``fn(task, value)``. They are module-level classes, so
that they pickle (by reference to the function they hold) for the process and
Ray backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from actorflow.core.errors import ConfigError, quote
from actorflow.core.pipeline import DEFAULT_PIPELINE, Pipeline, Stage
from actorflow.core.types import JSONValue, Task, TaskState
from actorflow.services.persistence import ResultStore
from actorflow.services.processor import process as default_process
from actorflow.services.validator import validate as default_validate

__all__ = [
    "SEED_STAGES",
    "SEED_WORKERS",
    "PersistStage",
    "ProcessStage",
    "ValidateStage",
    "describe_function",
    "seed_pipeline",
    "unwrap",
]

SEED_STAGES: Final = ("validator", "processor", "persistence")
"""The seed's stage names, in order; its pools are named after them."""

SEED_WORKERS: Final[Mapping[str, int]] = MappingProxyType({"validator": 2, "processor": 4, "persistence": 2})
"""The seed stages' workers when `seed_pipeline` is given none."""


class _Adapter:
    __slots__ = ("fn",)
    field = ""
    """The `ServiceSet` field the function came from."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __repr__(self) -> str:
        return repr(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Adapter) and type(other) is type(self) and other.fn == self.fn

    def __hash__(self) -> int:
        return hash((type(self), self.fn))

    def __reduce__(self) -> tuple[type[_Adapter], tuple[Callable[..., Any]]]:
        return (type(self), (self.fn,))


class ValidateStage(_Adapter):
    """``validate(payload)``: raises to reject; the value passes on."""

    __slots__ = ()
    field = "validate"

    def __call__(self, task: Task, value: JSONValue) -> None:
        self.fn(task.payload)


class ProcessStage(_Adapter):
    """``process(task) -> Mapping``: its result is the next value (and, in the end, the record's result)."""

    __slots__ = ()
    field = "process"

    def __call__(self, task: Task, value: JSONValue) -> Mapping[str, Any]:
        result = self.fn(task)
        if not isinstance(result, Mapping):
            raise TypeError(f"the processor must return a mapping, got {type(result).__name__}")
        return result


class PersistStage(_Adapter):
    """``persist(task, result)``: stores the processor's result; the value passes on."""

    __slots__ = ()
    field = "persist"

    def __call__(self, task: Task, value: JSONValue) -> None:
        assert value is not None, "persistence needs the processor's result"
        self.fn(task, value)


def describe_function(stage: str, fn: Callable[..., Any]) -> str:
    """How errors name a stage's function: ``ServiceSet.process <fn>`` for the seed's, else by stage."""
    if isinstance(fn, _Adapter):
        return f"ServiceSet.{fn.field} {fn.fn!r}"
    return f"the function of stage {stage!r}, {fn!r},"


def unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The user's function inside a seed adapter (the function itself otherwise)."""
    return fn.fn if isinstance(fn, _Adapter) else fn


def seed_pipeline(
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    process: Callable[[Task], Mapping[str, Any]] | None = None,
    persist: Callable[[Task, Mapping[str, Any]], None] | None = None,
    *,
    workers: Mapping[str, int] | None = None,
    result_store: ResultStore | None = None,
    name: str = DEFAULT_PIPELINE,
) -> Pipeline:
    """The seed pipeline, CREATED → VALIDATED → PROCESSING → COMPLETED, around the seed's three functions.

    The validator runs in CREATED and records VALIDATED when it succeeds; the
    processor and the persistence both run in PROCESSING. The processor's
    mapping is the task's result.

    Args:
        validate: ``validate(payload) -> None``, raising to reject; None for the default
            (`services.validator.validate`: ``{"name": str, "data": any}`` only).
        process: ``process(task) -> Mapping``, the result; None for the default (a sha256 digest).
        persist: ``persist(task, result) -> None``; None to upsert results into `result_store`.
        workers: workers per stage, by stage name (``{"processor": 8}``); a stage left out
            keeps its size in `SEED_WORKERS` (2, 4, 2).
        result_store: where the default persistence writes; needed only when `persist` is None.
        name: the pipeline's name.

    Raises:
        ConfigError: a function is not callable, `workers` names a stage the seed has not or
            a size that is not an int >= 1, or `persist` and `result_store` are both None.
    """
    functions = {"validate": validate, "process": process, "persist": persist}
    for field, fn in functions.items():
        if fn is not None and not callable(fn):
            raise ConfigError(f"the seed pipeline's {field} must be callable or None, got {quote(fn)}")
    sizes = dict(SEED_WORKERS)
    if workers is not None:
        if not isinstance(workers, Mapping):
            raise ConfigError(
                f"the seed pipeline's workers must be a mapping of stage name to int, got {quote(workers)}"
            )
        for stage, size in workers.items():
            if stage not in SEED_WORKERS:
                known = ", ".join(map(repr, SEED_STAGES))
                raise ConfigError(f"the seed pipeline has no stage {quote(stage)} to size; its stages: {known}")
            sizes[stage] = size  # checked by the Stage, which names it
    store: Callable[..., Any] | None = persist or result_store
    if store is None:
        raise ConfigError("the seed pipeline needs persist= or a result_store= for the default persistence")
    return Pipeline(
        name,
        [
            Stage(
                "validator",
                ValidateStage(validate or default_validate),
                workers=sizes["validator"],
                state=TaskState.CREATED,
                done_state=TaskState.VALIDATED,
            ),
            Stage(
                "processor",
                ProcessStage(process or default_process),
                workers=sizes["processor"],
                state=TaskState.PROCESSING,
            ),
            Stage("persistence", PersistStage(store), workers=sizes["persistence"], state=TaskState.PROCESSING),
        ],
    )
