"""The benchmark's peers stay runnable: Celery on a real Redis, Dask distributed and Ray tasks each run the job.

The peers are measured only in the full benchmark run; this keeps their adapters
honest in CI, where `.ci/run` installs Debian's redis-server and the extras.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest

from benchmarks import peers
from benchmarks.pipeline import Pipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PeerCase = tuple[Callable[[int], AbstractContextManager[Any]], Callable[..., Pipeline]]
CASES: dict[str, PeerCase] = {
    "celery": (peers.celery_services, peers.CeleryPipeline),
    "dask": (peers.dask_client, peers.DaskPipeline),
    "ray": (peers.ray_session, peers.RayTasksPipeline),
}


@pytest.fixture(params=sorted(CASES))
def peer(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, Callable[..., Pipeline]]]:
    name: str = request.param
    why = peers.missing_peers().get(name)
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the {name} peer must run in CI: {why}")
        pytest.skip(why)
    open_services, pipeline = CASES[name]
    with open_services(4) as services:
        yield name, services, pipeline


@pytest.mark.parametrize("io", [False, True], ids=["no-op job", "I/O job"])
def test_each_peer_runs_every_item_of_the_job_through_its_three_stages_in_a_closed_loop(
    peer: tuple[str, Any, Callable[..., Pipeline]], io: bool
) -> None:
    name, services, build = peer
    pipeline = build(services, 8, io=io)
    try:
        handles = [pipeline.submit({"name": "bench", "data": {"i": index}}) for index in range(40)]
        assert pipeline.join(120), f"{name}: items still in flight"
        assert [handle.result(timeout=1) for handle in handles] == ["COMPLETED"] * 40
        finished = pipeline.finished_at(handle.task_id for handle in handles)
        assert set(finished) == {handle.task_id for handle in handles}
    finally:
        pipeline.close()
