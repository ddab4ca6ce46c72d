"""Stateless services: the seed pipeline's functions, its builder, and `ServiceSet`, its friendly front.

Services import only `core`. They know nothing about actors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from actorflow.core.errors import ConfigError, quote
from actorflow.core.pipeline import DEFAULT_PIPELINE, Pipeline
from actorflow.core.types import FrozenDict, Task
from actorflow.services.persistence import ResultStore
from actorflow.services.processor import process
from actorflow.services.seed import SEED_STAGES, SEED_WORKERS, seed_pipeline, unwrap
from actorflow.services.validator import validate

__all__ = [
    "SEED_WORKERS",
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
"""The seed pipeline's stages, in order. Its pools are named after them."""


@dataclass(frozen=True, slots=True)
class ServiceSet:
    """The seed pipeline's three functions, and its stages' workers: the friendly front of `seed_pipeline`.

    Any function left as None uses the default. `Runtime(services=...)` runs the
    seed pipeline built from it (as `Runtime()` does with every default).

    Signatures: ``validate(payload) -> None`` (raise to reject),
    ``process(task) -> Mapping`` (the result) and ``persist(task, result) -> None``.
    Raise `core.TransientError` to ask for a retry; any other exception fails the task.

    `workers` sizes the seed's stages by name (``{"processor": 8}``); a stage left
    out keeps its default (`SEED_WORKERS`: 2, 4 and 2).
    """

    validate: ValidateFn | None = None
    process: ProcessFn | None = None
    persist: PersistFn | None = None
    workers: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("validate", "process", "persist"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise ConfigError(f"ServiceSet.{name} must be callable or None, got {fn!r}")
        if not isinstance(self.workers, Mapping):
            raise ConfigError(f"ServiceSet.workers must be a mapping of stage name to int, got {quote(self.workers)}")
        for stage, size in self.workers.items():
            if stage not in SEED_STAGES:
                raise ConfigError(
                    f"ServiceSet.workers names {quote(stage)}, which is not a stage of the seed pipeline; "
                    f"its stages: {', '.join(map(repr, SEED_STAGES))}"
                )
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigError(f"ServiceSet.workers[{stage!r}] must be an int >= 1, got {quote(size)}")
        # a read-only copy the caller cannot change, hashable as the rest of the set is
        object.__setattr__(self, "workers", FrozenDict(self.workers))

    def pipeline(
        self,
        *,
        result_store: ResultStore | None,
        name: str = DEFAULT_PIPELINE,
        workers: Mapping[str, int] | None = None,
    ) -> Pipeline:
        """The seed pipeline, CREATED → VALIDATED → PROCESSING → COMPLETED, around these functions.

        `result_store` backs the default persistence; it is required only when `persist`
        is left out. `workers` are sizes that this set's own `workers` override (the
        runtime passes those of `RuntimeConfig`'s deprecated ``<stage>_workers`` fields).
        """
        return seed_pipeline(
            self.validate,
            self.process,
            self.persist,
            workers={**(workers or {}), **self.workers},
            result_store=result_store,
            name=name,
        )

    def functions(self, *, result_store: ResultStore | None) -> dict[str, Callable[..., Any]]:
        """The function per stage name, defaults filled in (`result_store` as in `pipeline`)."""
        return {stage.name: unwrap(stage.fn) for stage in self.pipeline(result_store=result_store).stages}
