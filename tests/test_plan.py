"""Stage plans: every setting of every stage resolved once, and the one plan both the pools and the backends read."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from actorflow.actors import Runtime
from actorflow.actors.plan import PipelinePlan, StagePlan, plan_pipelines, stage_plans
from actorflow.core import RuntimeConfig
from actorflow.core.errors import ConfigError
from actorflow.core.pipeline import Pipeline, Stage
from actorflow.core.types import Task
from actorflow.services import seed_pipeline


def _keep(task: Task, value: Any) -> None:
    """Hands the value on unchanged."""


async def _keep_async(task: Task, value: Any) -> None:
    """Hands the value on unchanged, on an event loop."""


def only(plans: tuple[PipelinePlan, ...]) -> StagePlan:
    (plan,) = list(stage_plans(plans))
    return plan


def test_a_stage_without_settings_takes_every_one_from_the_config() -> None:
    config = RuntimeConfig(
        stage_workers=3,
        max_attempts=5,
        retry_backoff_s=0.2,
        retry_backoff_max_s=2.0,
        stage_timeout_s=7.0,
        max_restarts=4,
        restart_window_s=9.0,
    )
    plan = only(plan_pipelines([Pipeline("p", [Stage("work", _keep)])], config))
    assert (plan.pool, plan.backend, plan.workers, plan.max_attempts) == ("work", "thread", 3, 5)
    assert (plan.retry_backoff_s, plan.retry_backoff_max_s, plan.timeout_s) == (0.2, 2.0, 7.0)
    assert (plan.max_restarts, plan.restart_window_s) == (4, 9.0)
    assert plan.fn is _keep


def test_a_stages_own_settings_win_over_the_configs() -> None:
    stage = Stage("work", _keep, workers=6, backend="thread", timeout_s=1.5, max_attempts=2)
    stage = dataclasses.replace(stage, retry_backoff_s=0.5, retry_backoff_max_s=0.75)
    plan = only(plan_pipelines([Pipeline("p", [stage])], RuntimeConfig(service_backend="process")))
    assert (plan.backend, plan.workers, plan.timeout_s, plan.max_attempts) == ("thread", 6, 1.5, 2)
    assert (plan.retry_backoff_s, plan.retry_backoff_max_s) == (0.5, 0.75)
    assert plan.stage is stage


def test_a_stages_first_retry_delay_above_the_runtimes_cap_raises_the_cap_to_it() -> None:
    stage = Stage("work", _keep, retry_backoff_s=3.0)
    plan = only(plan_pipelines([Pipeline("p", [stage])], RuntimeConfig(retry_backoff_max_s=1.0)))
    assert (plan.retry_backoff_s, plan.retry_backoff_max_s) == (3.0, 3.0)


def test_the_backend_is_the_stages_then_async_for_a_coroutine_then_the_runtimes() -> None:
    pipeline = Pipeline("p", [Stage("a", _keep), Stage("b", _keep_async), Stage("c", _keep, backend="thread")])
    plans = plan_pipelines([pipeline], RuntimeConfig(service_backend="process"))
    assert [plan.backend for plan in stage_plans(plans)] == ["process", "async", "thread"]


def test_a_stage_on_a_backend_nobody_registered_is_refused_naming_the_stage_and_its_pipeline() -> None:
    with pytest.raises(ConfigError, match=r"^Stage 'work' of pipeline 'p': its backend 'nowhere' is not a registered"):
        plan_pipelines([Pipeline("p", [Stage("work", _keep, backend="nowhere")])], RuntimeConfig())


def test_a_stage_without_workers_takes_stage_workers_whatever_its_name() -> None:
    config = RuntimeConfig(stage_workers=4)
    pipeline = Pipeline("p", [Stage(name, _keep) for name in ("validator", "processor", "persistence", "other")])
    assert [plan.workers for plan in stage_plans(plan_pipelines([pipeline], config))] == [4, 4, 4, 4]


def test_the_seed_pipelines_stages_carry_their_own_workers_into_the_plan() -> None:
    seed = seed_pipeline(persist=_keep, workers={"persistence": 3})
    assert [plan.workers for plan in stage_plans(plan_pipelines([seed], RuntimeConfig(stage_workers=7)))] == [2, 4, 3]


def test_a_pool_is_named_after_its_stage_alone_and_after_its_pipeline_too_when_there_are_several() -> None:
    first, second = Pipeline("first", [Stage("work", _keep)]), Pipeline("second", [Stage("work", _keep)])
    assert only(plan_pipelines([first], RuntimeConfig())).pool == "work"
    plans = plan_pipelines([first, second], RuntimeConfig())
    assert [plan.name for plan in plans] == ["first", "second"]
    assert [plan.pool for plan in stage_plans(plans)] == ["first.work", "second.work"]


@pytest.mark.parametrize(
    ("stage", "bound"),
    [(Stage("work", _keep, workers=9), "max_workers"), (Stage("work", _keep_async, workers=9), "max_async_workers")],
)
def test_a_stage_with_more_workers_than_its_bound_is_refused_naming_the_stage_the_pipeline_and_the_bound(
    stage: Stage, bound: str
) -> None:
    config = RuntimeConfig(max_workers=8, max_async_workers=8, stage_workers=2)
    with pytest.raises(ConfigError) as refused:
        plan_pipelines([Pipeline("p", [stage])], config)
    assert str(refused.value).startswith("Stage 'work' of pipeline 'p': workers must be from 1 to 8, got 9")
    assert f"RuntimeConfig.{bound}" in str(refused.value)


def test_a_plan_is_frozen() -> None:
    plan = only(plan_pipelines([Pipeline("p", [Stage("work", _keep)])], RuntimeConfig()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.workers = 2  # type: ignore[misc]


def test_each_pool_of_a_running_runtime_has_the_name_and_the_workers_of_its_stages_plan() -> None:
    pipelines = [
        Pipeline("first", [Stage("work", _keep, workers=3), Stage("more", _keep)]),
        Pipeline("second", [Stage("work", _keep_async, workers=5)]),
    ]
    config = RuntimeConfig(stage_workers=2)
    with Runtime(config, pipelines=pipelines) as runtime:
        handle = runtime.submit({"x": 1}, pipeline="second")
        assert handle.result(timeout=10).result == {"x": 1}
        pools = runtime.stats()["pools"]
    planned = {plan.pool: plan.workers for plan in stage_plans(plan_pipelines(pipelines, config))}
    assert planned == {"first.work": 3, "first.more": 2, "second.work": 5}
    assert {name: pool["size"] for name, pool in pools.items()} == planned
