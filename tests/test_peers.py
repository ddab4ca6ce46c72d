"""The benchmark's peers stay runnable: Celery on a real Redis, Dask distributed and Ray tasks each run the job.

The peers are measured only in the full benchmark run; this keeps their adapters
honest in CI, where `.ci/run` installs Debian's redis-server and the extras.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from benchmarks import peers
from benchmarks.pipeline import Pipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent

PeerCase = tuple[Callable[[int], AbstractContextManager[Any]], Callable[..., Pipeline]]
CASES: dict[str, PeerCase] = {
    "celery": (peers.celery_services, peers.CeleryPipeline),
    "dask": (peers.dask_client, peers.DaskPipeline),
    "ray": (peers.ray_session, peers.RayTasksPipeline),
}


def exercise(name: str, io: bool) -> None:
    """Run 40 items through the peer `name` in a closed loop of 8; assert each completed and was timed."""
    open_services, build = CASES[name]
    with open_services(4) as services:
        pipeline = build(services, 8, io=io)
        try:
            handles = [pipeline.submit({"name": "bench", "data": {"i": index}}) for index in range(40)]
            assert pipeline.join(120), f"{name}: items still in flight"
            assert [handle.result(timeout=1) for handle in handles] == ["COMPLETED"] * 40
            finished = pipeline.finished_at(handle.task_id for handle in handles)
            assert set(finished) == {handle.task_id for handle in handles}
        finally:
            pipeline.close()


@pytest.mark.parametrize("io", [False, True], ids=["no-op job", "I/O job"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_peer_runs_every_item_of_the_job_through_its_three_stages_in_a_closed_loop(name: str, io: bool) -> None:
    why = peers.missing_peers().get(name)
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the {name} peer must run in CI: {why}")
        pytest.skip(why)
    if name != "ray":
        exercise(name, io)
        return
    # A Ray started with address="local" and shut down leaves process-wide state behind that breaks the
    # next local Ray of the same process (the Ray backend's tests): the benchmark runs it last, this test
    # in a process of its own.
    code = f"from tests.test_peers import exercise; exercise('ray', {io})"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
