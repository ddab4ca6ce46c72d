"""The seed pipeline, validate → process → persist, as one `Pipeline` value.

The seed's three functions keep their own signatures (``validate(payload)``,
``process(task) -> Mapping``, ``persist(task, result)``); the adapters here give
each the stage signature ``fn(task, value)``. They are module-level classes, so
that they pickle (by reference to the function they hold) for the process and
Ray backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from actorflow.core.pipeline import DEFAULT_PIPELINE, Pipeline, seed_shape
from actorflow.core.types import JSONValue, Task

__all__ = [
    "SEED_STAGES",
    "PersistStage",
    "ProcessStage",
    "ValidateStage",
    "describe_function",
    "seed_pipeline",
    "unwrap",
]

SEED_STAGES = ("validator", "processor", "persistence")
"""The seed's stage names, in order. Its pools and config fields are named after them."""


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
    validate: Callable[..., Any],
    process: Callable[..., Any],
    persist: Callable[..., Any],
    *,
    name: str = DEFAULT_PIPELINE,
) -> Pipeline:
    """The seed's lifecycle, CREATED → VALIDATED → PROCESSING → COMPLETED, around the seed's three functions."""
    return seed_shape(ValidateStage(validate), ProcessStage(process), PersistStage(persist), name=name)
