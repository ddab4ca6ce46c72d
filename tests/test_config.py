"""RuntimeConfig refuses bad values; the seed pipeline's table is its diagram (plus cancellation); the seed's
deprecated worker fields still work, with a warning naming what replaces them."""

from __future__ import annotations

import warnings

import pytest

from actorflow import Runtime, ServiceSet
from actorflow.core import TERMINAL_STATES, ConfigError, RuntimeConfig, TaskState, is_terminal
from actorflow.core.config import MAX_SECONDS
from actorflow.core.pipeline import Pipeline, Stage
from actorflow.services import seed_pipeline

S = TaskState

SEED_EDGES = {
    (S.CREATED, S.VALIDATED),
    (S.VALIDATED, S.PROCESSING),
    (S.PROCESSING, S.COMPLETED),
    (S.CREATED, S.FAILED),
    (S.VALIDATED, S.FAILED),
    (S.PROCESSING, S.FAILED),
}
CANCEL_EDGES = {(state, S.CANCELLED) for state in (S.CREATED, S.VALIDATED, S.PROCESSING)}


def _seed() -> Pipeline:
    return seed_pipeline(persist=lambda task, result: None)


def test_the_seed_pipelines_table_holds_exactly_the_seed_edges_plus_cancellation() -> None:
    table = _seed().transitions
    edges = {(source, target) for source, targets in table.items() for target in targets}
    assert edges == SEED_EDGES | CANCEL_EDGES


def test_terminal_states_are_completed_failed_and_cancelled_and_the_seeds_other_states_are_not() -> None:
    assert {S.COMPLETED, S.FAILED, S.CANCELLED} == TERMINAL_STATES
    assert all(is_terminal(state) for state in TERMINAL_STATES)
    live = {state for state in _seed().states if not is_terminal(state)}
    assert live == {S.CREATED, S.VALIDATED, S.PROCESSING}


def test_a_pipelines_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        _seed().transitions[S.COMPLETED] = frozenset({S.CREATED})  # type: ignore[index]


def test_default_config_is_valid_and_frozen() -> None:
    config = RuntimeConfig()
    assert config.stage_workers >= 1
    with pytest.raises(AttributeError):
        config.stage_workers = 9  # type: ignore[misc]


# --- the seed's deprecated worker fields ---------------------------------------------------------


def test_a_config_that_sets_no_seed_worker_field_warns_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = RuntimeConfig(stage_workers=3, max_workers=10)
    assert (config.validator_workers, config.processor_workers, config.persistence_workers) == (None, None, None)
    assert config.seed_workers() == {}


@pytest.mark.parametrize("field", ["validator_workers", "processor_workers", "persistence_workers"])
def test_a_seed_worker_field_warns_that_it_is_deprecated_naming_the_replacement(field: str) -> None:
    stage = field.removesuffix("_workers")
    with pytest.warns(DeprecationWarning, match="deprecated") as caught:
        RuntimeConfig(**{field: 3})  # type: ignore[arg-type]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"RuntimeConfig.{field} is deprecated" in message
    assert f"ServiceSet(workers={{{stage!r}: 3}})" in message
    assert "Stage(workers=N)" in message
    assert caught[0].filename == __file__  # it points at the line that set the field


def test_the_deprecated_seed_worker_fields_still_size_the_seed_pipelines_stages() -> None:
    with pytest.warns(DeprecationWarning, match="validator_workers, RuntimeConfig.processor_workers are deprecated"):
        config = RuntimeConfig(validator_workers=1, processor_workers=3)
    assert config.seed_workers() == {"validator": 1, "processor": 3}
    with Runtime(config) as runtime:
        pools = runtime.stats()["pools"]
        record = runtime.submit({"name": "a", "data": 1}).result(timeout=10)
    assert {name: pool["size"] for name, pool in pools.items()} == {"validator": 1, "processor": 3, "persistence": 2}
    assert record.state is S.COMPLETED


def test_service_set_workers_size_the_seed_and_win_over_the_deprecated_fields() -> None:
    with pytest.warns(DeprecationWarning, match="processor_workers, RuntimeConfig.persistence_workers are deprecated"):
        config = RuntimeConfig(processor_workers=3, persistence_workers=1)
    services = ServiceSet(workers={"processor": 5})
    with Runtime(config, services=services) as runtime:
        pools = runtime.stats()["pools"]
    assert {name: pool["size"] for name, pool in pools.items()} == {"validator": 2, "processor": 5, "persistence": 1}


def test_the_deprecated_seed_worker_fields_do_not_size_a_stage_of_another_pipeline_with_the_same_name() -> None:
    with pytest.warns(DeprecationWarning, match="processor_workers is deprecated"):
        config = RuntimeConfig(processor_workers=7, stage_workers=3)
    own = Pipeline("own", [Stage("processor", lambda task, value: value)])
    with Runtime(config, pipelines=[own]) as runtime:
        pools = runtime.stats()["pools"]
    assert {name: pool["size"] for name, pool in pools.items()} == {"processor": 3}


def test_a_service_set_refuses_workers_for_a_stage_the_seed_has_not_or_a_size_below_one() -> None:
    with pytest.raises(ConfigError, match=r"ServiceSet\.workers names 'fetch', which is not a stage of the seed"):
        ServiceSet(workers={"fetch": 2})
    with pytest.raises(ConfigError, match=r"ServiceSet\.workers\['processor'\] must be an int >= 1, got 0"):
        ServiceSet(workers={"processor": 0})


def test_a_service_set_keeps_its_own_copy_of_its_workers_and_stays_hashable() -> None:
    sizes = {"processor": 8}
    services = ServiceSet(workers=sizes)
    sizes["processor"] = 1
    assert services.workers == {"processor": 8}
    assert hash(services) == hash(ServiceSet(workers={"processor": 8}))


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("processor_workers", 0, ">= 1"),
        ("validator_workers", -1, ">= 1"),
        ("persistence_workers", 1.5, ">= 1"),
        ("processor_workers", True, ">= 1"),
        ("max_attempts", 0, ">= 1"),
        ("durability", "sometimes", "'normal', 'full'"),
        ("overload", "drop", "'wait', 'reject'"),
        ("service_backend", "gpu!", "1 to 64 letters, digits, '_' or '-'"),
        ("stage_timeout_s", 0, "> 0"),
        ("stage_timeout_s", float("nan"), "> 0"),
        ("retry_backoff_s", -1, ">= 0"),
        ("max_in_flight", 0, ">= 1"),
        ("journal_path", "", "non-empty str"),
        ("restart_window_s", 0, "> 0"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_field_and_what_is_allowed(
    field: str, value: object, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig(**{field: value})  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"RuntimeConfig.{field}" in message
    assert allowed in message
    assert repr(value) in message


def test_retain_terminal_without_a_journal_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="journal_path"):
        RuntimeConfig(retain_terminal=10)


def test_backoff_cap_below_the_first_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match="retry_backoff_max_s"):
        RuntimeConfig(retry_backoff_s=2.0, retry_backoff_max_s=1.0)


DURATIONS = ["retry_backoff_s", "retry_backoff_max_s", "stage_timeout_s", "restart_window_s", "submit_timeout_s"]
DURATIONS += ["drain_timeout_s"]


@pytest.mark.parametrize("field", DURATIONS)
@pytest.mark.parametrize("value", [1e10, 1e300])
def test_a_duration_longer_than_a_year_is_refused_naming_the_field_the_value_and_the_range(
    field: str, value: float
) -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig(**{field: value})  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"RuntimeConfig.{field}" in message
    assert repr(value) in message
    assert "<= 31536000 (a year)" in message


@pytest.mark.parametrize("field", ["timeout_s", "retry_backoff_s", "retry_backoff_max_s"])
def test_a_stage_duration_longer_than_a_year_is_refused_naming_the_stage_the_field_and_the_range(field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Stage("work", lambda task, value: value, **{field: 1e10})  # type: ignore[arg-type]
    message = str(caught.value)
    assert "Stage 'work'" in message
    assert field in message
    assert repr(1e10) in message
    assert "<= 31536000 (a year)" in message


def test_a_year_is_accepted_as_a_duration() -> None:
    assert RuntimeConfig(stage_timeout_s=MAX_SECONDS, submit_timeout_s=MAX_SECONDS).stage_timeout_s == MAX_SECONDS


@pytest.mark.parametrize("field", ["stage_workers", "validator_workers", "processor_workers", "persistence_workers"])
def test_a_pool_larger_than_max_workers_is_refused_and_max_workers_raises_the_bound(field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig(**{field: 2000})  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"RuntimeConfig.{field}" in message
    assert "2000" in message
    assert "<= 256" in message
    assert "RuntimeConfig.max_workers" in message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the seed's fields: their warning is tested above
        assert getattr(RuntimeConfig(**{field: 2000, "max_workers": 2000}), field) == 2000  # type: ignore[arg-type]


def test_a_huge_value_is_quoted_cut_short_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig(journal_path=b"x" * 10_000_000)  # type: ignore[arg-type]
    message = str(caught.value)
    assert len(message) < 300
    assert "(10,000,000 bytes)" in message
