"""How every stage runs, resolved once: the plan that the orchestrator and the backend assembly both read.

A `Stage` may leave its settings None, to fall back on the runtime's
`RuntimeConfig`. `plan_pipelines` resolves each of them, for every stage of
every pipeline, into frozen `StagePlan`s, and checks what only a runtime can
check (a stage's backend against the registry, its workers against `max_workers`). The backends are made for the
plans' pools, and the orchestrator builds each pool from its plan: nothing is
resolved a second time, and nothing ties the two but the plan itself.

Each stage has a pool of its own, named after the stage (``pipeline.stage``
when the runtime runs several pipelines): the name its calls, its events'
``service`` field, its metrics and its `stats()` entry carry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from actorflow.actors.backends import stage_backend
from actorflow.core.config import RuntimeConfig
from actorflow.core.errors import ConfigError
from actorflow.core.pipeline import Pipeline, Stage

__all__ = ["PipelinePlan", "StagePlan", "plan_pipelines", "stage_plans"]


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage with every setting resolved (the stage's own, else the runtime's)."""

    stage: Stage
    pool: str
    """The name of the stage's pool: the stage's name, or ``pipeline.stage`` with several pipelines."""
    backend: str
    """Where its calls run, a registered backend's name: the stage's `backend`, "async" for an ``async def``
    function, else `RuntimeConfig.service_backend`."""
    workers: int
    max_attempts: int
    retry_backoff_s: float
    retry_backoff_max_s: float
    """Never below `retry_backoff_s`: a stage's first delay may exceed the runtime's default cap."""
    timeout_s: float | None
    """A call running longer is a transient failure; None for no limit."""
    max_restarts: int
    """Worker restarts within `restart_window_s` before the pool turns failing."""
    restart_window_s: float

    @property
    def fn(self) -> Callable[..., Any]:
        """The stage's function."""
        return self.stage.fn


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    """A pipeline and the plan of each of its stages, in order."""

    pipeline: Pipeline
    stages: tuple[StagePlan, ...]

    @property
    def name(self) -> str:
        """The pipeline's name."""
        return self.pipeline.name


def plan_pipelines(pipelines: Sequence[Pipeline], config: RuntimeConfig) -> tuple[PipelinePlan, ...]:
    """The plan of each pipeline, in order, with every stage's settings resolved against `config`.

    Raises:
        ConfigError: a stage's backend is not registered (`actorflow.register_backend`), or its
            `workers` exceeds `RuntimeConfig.max_workers` (`max_async_workers` for an async stage);
            the message names the stage and its pipeline.
    """
    several = len(pipelines) > 1
    return tuple(
        PipelinePlan(pipeline, tuple(_plan_stage(pipeline, s, config, several=several) for s in pipeline.stages))
        for pipeline in pipelines
    )


def stage_plans(plans: Sequence[PipelinePlan]) -> Iterator[StagePlan]:
    """Every stage's plan, pipeline after pipeline."""
    for plan in plans:
        yield from plan.stages


def _plan_stage(pipeline: Pipeline, stage: Stage, config: RuntimeConfig, *, several: bool) -> StagePlan:
    backend = stage_backend(stage, pipeline=pipeline.name, default=config.service_backend)
    if stage.workers is None:
        workers = config.stage_workers  # checked against max_workers by the config itself
    else:
        workers = stage.workers
        if stage.is_async or backend == "async":
            limit, field = config.max_async_workers, "max_async_workers"
        else:
            limit, field = config.max_workers, "max_workers"
        if workers > limit:
            raise ConfigError(
                f"Stage {stage.name!r} of pipeline {pipeline.name!r}: workers must be from 1 to {limit}, "
                f"got {workers}; the bound is RuntimeConfig.{field}, which protects the machine: "
                "raise it if it can take more"
            )
    backoff = stage.retry_backoff_s if stage.retry_backoff_s is not None else config.retry_backoff_s
    backoff_max = stage.retry_backoff_max_s if stage.retry_backoff_max_s is not None else config.retry_backoff_max_s
    return StagePlan(
        stage,
        pool=f"{pipeline.name}.{stage.name}" if several else stage.name,
        backend=backend,
        workers=workers,
        max_attempts=stage.max_attempts if stage.max_attempts is not None else config.max_attempts,
        retry_backoff_s=backoff,
        retry_backoff_max_s=max(backoff, backoff_max),
        timeout_s=stage.timeout_s if stage.timeout_s is not None else config.stage_timeout_s,
        max_restarts=config.max_restarts,
        restart_window_s=config.restart_window_s,
    )
