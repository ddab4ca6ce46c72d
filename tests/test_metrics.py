"""Prometheus metrics: the runtime's collector, `GET /metrics` over real HTTP, and its token rule."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actorflow.actors import Runtime
from actorflow.api import create_app, serve_in_background
from actorflow.core import ConfigError, InvalidPayload, RuntimeConfig, Task, TransientError
from actorflow.core.metrics import Histogram
from actorflow.services import SEED_WORKERS, ServiceSet
from tests.conftest import payload

TOKEN = "metrics-token"


def flaky_or_failing(task: Task) -> Mapping[str, Any]:
    """data.fail: a permanent KeyError; data.flaky: a transient failure on the first attempt."""
    data = task.payload["data"]
    assert isinstance(data, Mapping)
    if data.get("fail"):
        raise KeyError("zzz")
    if data.get("flaky") and task.attempt == 1:
        raise TransientError("try again")
    return {"index": data["index"]}


@pytest.fixture
def known_run() -> Iterator[Runtime]:
    """4 plain tasks, 1 that succeeds on its second attempt, 1 that fails, and 1 refused submission."""
    runtime = Runtime(RuntimeConfig(retry_backoff_s=0.001), services=ServiceSet(process=flaky_or_failing))
    try:
        handles = [runtime.submit(payload(i)) for i in range(4)]
        handles.append(runtime.submit(payload(4, flaky=True)))
        handles.append(runtime.submit(payload(5, fail=True)))
        with pytest.raises(InvalidPayload):
            runtime.submit(["not", "a", "mapping"])  # type: ignore[arg-type]
        for handle in handles:
            handle.result(timeout=10)
        yield runtime
    finally:
        runtime.close(drain=False)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, keyed by (sample name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def labels(**pairs: str) -> tuple[tuple[str, str], ...]:
    """A sample's labels: `pairs` and the runtime's name (the only runtime of these tests is "default")."""
    return tuple(sorted({"runtime": "default", **pairs}.items()))


def test_metrics_over_http_match_a_known_run_exactly(known_run: Runtime) -> None:
    with serve_in_background(create_app(known_run, token=TOKEN)) as server:
        response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)

    def transitions(from_state: str, to_state: str) -> float:
        key = labels(pipeline="default", from_state=from_state, to_state=to_state)
        return found[("actorflow_transitions_total", key)]

    assert transitions("", "CREATED") == 6
    assert transitions("CREATED", "VALIDATED") == 6
    assert transitions("VALIDATED", "PROCESSING") == 6
    assert transitions("PROCESSING", "COMPLETED") == 5
    assert transitions("PROCESSING", "FAILED") == 1
    calls = {"validator": 6, "processor": 7, "persistence": 5}  # the flaky task ran the processor twice
    for stage, count in calls.items():
        key = labels(pipeline="default", stage=stage)
        assert found[("actorflow_service_run_seconds_count", key)] == count
        infinite = labels(pipeline="default", stage=stage, le="+Inf")
        assert found[("actorflow_service_run_seconds_bucket", infinite)] == count
        assert found[("actorflow_queue_wait_seconds_count", key)] == count
        assert found[("actorflow_service_run_seconds_sum", key)] >= 0
    assert found[("actorflow_task_latency_seconds_count", labels(pipeline="default"))] == 6
    assert found[("actorflow_retries_total", labels())] == 1
    assert found[("actorflow_rejected_submissions_total", labels())] == 1
    assert found[("actorflow_timeouts_total", labels())] == 0
    assert found[("actorflow_restarts_total", labels())] == 0
    assert found[("actorflow_dead_letters_total", labels())] == 0
    assert found[("actorflow_tasks_in_flight", labels())] == 0
    assert found[("actorflow_spans_dropped_total", labels())] == 0
    for pool, size in (("validator", 2), ("processor", 4), ("persistence", 2)):
        assert found[("actorflow_pool_busy_workers", labels(pool=pool))] == 0
        assert found[("actorflow_pool_queued_calls", labels(pool=pool))] == 0
        assert found[("actorflow_pool_idle_workers", labels(pool=pool))] == SEED_WORKERS[pool] == size


def test_metrics_need_the_token_unless_they_are_made_public(known_run: Runtime) -> None:
    with serve_in_background(create_app(known_run, token=TOKEN)) as server:
        refused = httpx.get(f"{server.url}/metrics", timeout=10)
    with serve_in_background(create_app(known_run, token=TOKEN, metrics_public=True)) as server:
        opened = httpx.get(f"{server.url}/metrics", timeout=10)
        still_closed = httpx.get(f"{server.url}/stats", timeout=10)
    assert refused.status_code == 401
    assert opened.status_code == 200
    assert "actorflow_transitions_total" in opened.text
    assert still_closed.status_code == 401  # only /metrics is opened


def test_the_collector_goes_into_the_programs_own_registry_and_nothing_global(known_run: Runtime) -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    registry = CollectorRegistry()
    registry.register(known_run.metrics_collector())
    text = generate_latest(registry).decode()
    assert "actorflow_task_latency_seconds_bucket" in text
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before


def test_a_runtime_without_metrics_refuses_a_collector_and_its_api_answers_501() -> None:
    with Runtime(metrics=False) as runtime:
        runtime.submit(payload()).result(timeout=10)
        with pytest.raises(ConfigError, match="metrics=False"):
            runtime.metrics_collector()
        with serve_in_background(create_app(runtime)) as server:
            response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 501
    assert "metrics=False" in response.json()["error"]


def test_a_closed_runtimes_collector_still_yields_what_it_counted(known_run: Runtime) -> None:
    collector = known_run.metrics_collector()
    known_run.close()
    registry = CollectorRegistry()
    registry.register(collector)
    found = samples(generate_latest(registry).decode())
    assert found[("actorflow_task_latency_seconds_count", labels(pipeline="default"))] == 6
    assert ("actorflow_tasks_in_flight", labels()) not in found  # the actors' own counters left with them


def test_a_histogram_counts_a_value_on_a_bound_in_that_bound_s_bucket() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 2.0):
        histogram.observe(value)
    bounds, counts, total = histogram.snapshot()
    assert bounds == (0.1, 1.0)
    assert counts == [2, 2, 1]  # le=0.1 holds 0.05 and 0.1; +Inf holds 2.0
    assert total == pytest.approx(3.65)
    assert histogram.count == 5


@pytest.mark.parametrize("names", [(None, None), ("orders", "billing")], ids=["default-names", "given-names"])
def test_two_runtimes_in_one_registry_export_series_told_apart_by_their_runtime_label(
    names: tuple[str | None, str | None],
) -> None:
    with Runtime(name=names[0]) as first, Runtime(name=names[1]) as second:
        # As prometheus_client.REGISTRY does, this registry refuses a second collector of the same names:
        # several runtimes share one collector, whose samples their `runtime` label tells apart.
        registry = CollectorRegistry(auto_describe=True)
        registry.register(first.metrics_collector(second))
        for index in range(2):
            first.submit(payload(index)).result(timeout=10)
        second.submit(payload(9)).result(timeout=10)
        found = samples(generate_latest(registry).decode())
    assert (first.name, second.name) == (("default", "default-2") if names[0] is None else names)
    for runtime, count in ((first.name, 2), (second.name, 1)):
        key = (
            "actorflow_transitions_total",
            tuple(sorted({"runtime": runtime, "pipeline": "default", "from_state": "", "to_state": "CREATED"}.items())),
        )
        assert found[key] == count
        assert found[("actorflow_tasks_in_flight", (("runtime", runtime),))] == 0
    assert {dict(labels_)["runtime"] for (_, labels_) in found} == {first.name, second.name}


def test_a_runtime_name_taken_by_an_open_runtime_is_refused_and_free_again_once_it_closed() -> None:
    with Runtime(name="orders"):
        with pytest.raises(ConfigError, match="'orders' is taken by an open runtime"):
            Runtime(name="orders")
    with Runtime(name="orders") as again:
        assert again.name == "orders"
    with pytest.raises(ConfigError, match="is not allowed"):
        Runtime(name="no spaces")
