"""The transition table is the seed's diagram (plus cancellation), and RuntimeConfig refuses bad values."""

from __future__ import annotations

import pytest

from actorflow.core import TRANSITIONS, ConfigError, RuntimeConfig, TaskState, is_terminal
from actorflow.core.config import MAX_SECONDS, NON_TERMINAL_STATES, TERMINAL_STATES
from actorflow.core.pipeline import Stage

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


def test_the_table_holds_exactly_the_seed_edges_plus_cancellation() -> None:
    edges = {(source, target) for source, targets in TRANSITIONS.items() for target in targets}
    assert edges == SEED_EDGES | CANCEL_EDGES


def test_terminal_states_are_completed_failed_and_cancelled() -> None:
    assert {S.COMPLETED, S.FAILED, S.CANCELLED} == TERMINAL_STATES
    assert {S.CREATED, S.VALIDATED, S.PROCESSING} == NON_TERMINAL_STATES
    assert all(is_terminal(state) for state in TERMINAL_STATES)


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[S.COMPLETED] = frozenset({S.CREATED})  # type: ignore[index]


def test_default_config_is_valid_and_frozen() -> None:
    config = RuntimeConfig()
    assert config.processor_workers >= 1
    with pytest.raises(AttributeError):
        config.processor_workers = 9  # type: ignore[misc]


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
    assert getattr(RuntimeConfig(**{field: 2000, "max_workers": 2000}), field) == 2000  # type: ignore[arg-type]


def test_a_huge_value_is_quoted_cut_short_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        RuntimeConfig(journal_path=b"x" * 10_000_000)  # type: ignore[arg-type]
    message = str(caught.value)
    assert len(message) < 300
    assert "(10,000,000 bytes)" in message
