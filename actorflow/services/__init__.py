"""Stateless services: pure functions the runtime calls, and the set that names them.

Services import only `core`. They know nothing about actors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from actorflow.core.errors import ConfigError
from actorflow.core.pipeline import DEFAULT_PIPELINE, Pipeline
from actorflow.core.types import Task
from actorflow.services.persistence import ResultStore
from actorflow.services.processor import process
from actorflow.services.seed import SEED_STAGES, seed_pipeline
from actorflow.services.validator import validate

__all__ = [
    "SERVICE_NAMES",
    "PersistFn",
    "ProcessFn",
    "ResultStore",
    "ServiceSet",
    "ValidateFn",
    "process",
    "seed_pipeline",
    "validate",
]

ValidateFn = Callable[[Mapping[str, Any]], None]
ProcessFn = Callable[[Task], Mapping[str, Any]]
PersistFn = Callable[[Task, Mapping[str, Any]], None]

SERVICE_NAMES = SEED_STAGES
"""The seed pipeline's stages, in order. Its pools and config fields are named after them."""


@dataclass(frozen=True, slots=True)
class ServiceSet:
    """The three functions of the seed pipeline. Any left as None uses the default.

    `pipeline` builds the seed `Pipeline` from them (a `Runtime` given no
    pipelines runs it).

    Signatures: ``validate(payload) -> None`` (raise to reject),
    ``process(task) -> Mapping`` (the result) and ``persist(task, result) -> None``.
    Raise `core.TransientError` to ask for a retry; any other exception fails the task.
    """

    validate: ValidateFn | None = None
    process: ProcessFn | None = None
    persist: PersistFn | None = None

    def __post_init__(self) -> None:
        for name in ("validate", "process", "persist"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ConfigError(f"ServiceSet.{name} must be callable or None, got {fn!r}")

    def functions(self, *, result_store: ResultStore | None) -> dict[str, Callable[..., Any]]:
        """The function per service name, defaults filled in.

        `result_store` backs the default persistence; it is required only when
        `persist` is left out.
        """
        persist: Callable[..., Any] | None = self.persist or result_store
        if persist is None:
            raise ConfigError("ServiceSet.persist is None and no result store was given for the default")
        return {
            "validator": self.validate or validate,
            "processor": self.process or process,
            "persistence": persist,
        }

    def pipeline(self, *, result_store: ResultStore | None, name: str = DEFAULT_PIPELINE) -> Pipeline:
        """The seed pipeline, CREATED → VALIDATED → PROCESSING → COMPLETED, around these functions.

        `result_store` backs the default persistence, as in `functions`.
        """
        functions = self.functions(result_store=result_store)
        return seed_pipeline(functions["validator"], functions["processor"], functions["persistence"], name=name)
