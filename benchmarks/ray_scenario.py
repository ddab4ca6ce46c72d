"""The Ray scenario: the Ray backend beside plain Ray (`ray.util.ActorPool`, Ray tasks) and the thread backend.

All run the same functions, in the same run:

* ``thread``: actorflow with its default backend (pykka worker threads);
* ``ray``: actorflow with ``service_backend="ray"`` (each worker a Ray actor);
* ``actorpool``: plain Ray, an `ActorPool` of as many actors as the processor
  pool, each call running validate, process and persist in one go: the
  lower bound of what Ray costs, with no state machine, journal or trace;
* ``ray_stage``: actorflow with only the processor stage on Ray
  (``Stage(..., backend="ray")``), validation and persistence on threads in
  the head: what a CPU-bound pipeline would do;
* ``ray_tasks``: plain Ray tasks, one remote function call per task running
  the same three steps, as many at once as the processor pool
  (``num_cpus`` set so).

Three workloads, mixed through one processor function so that each backend
starts once: ``tiny`` (a sha256 of a small payload: pure overhead), ``io``
(a 20 ms sleep, standing in for a network call) and ``cpu`` (about 20 ms of
pure-Python arithmetic, which holds the GIL). For each: throughput (tasks/s
with every task submitted at once) and latency (one task at a time, submit to
terminal, p50 and p99). The setups take turns, and the full run keeps each
one's best of three rounds. For the Ray backend it also notes the driver's
CPU per task in the tiny throughput run (all its threads, Ray's own included)
and the calls per Ray invocation (the actors' own count).

Two places: a local Ray (``local``), and with ``--cluster`` also a three-node
`ray.cluster_utils.Cluster` on this machine (``cluster``: a head with no CPU
and two one-CPU worker nodes, each its own raylet, in a private RAY_TMPDIR),
which is how ``ray start`` nodes look to the runtime.

    python -m benchmarks.ray_scenario [--full] [--cluster]
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from actorflow import Pipeline, Stage
from actorflow.actors import Runtime
from actorflow.actors.backends.ray import RayBackend
from actorflow.core import RuntimeConfig, Task, TaskState
from actorflow.core.types import freeze
from actorflow.services import ServiceSet, validate
from actorflow.services import process as default_process

__all__ = ["run"]

VALIDATORS, PROCESSORS, PERSISTERS = 2, 4, 2
"""RuntimeConfig's defaults: the Ray run is the one-line config change."""
IO_MS = 20
CPU_MS = 20

Runner = tuple[Callable[[list[dict[str, Any]]], None], Callable[[dict[str, Any]], None]]
"""Run many tasks at once and wait for all; run one task and wait for it."""


# --- the functions every setup runs ---------------------------------------------------------------


def mixed_process(task: Task) -> Mapping[str, Any]:
    """The processor: the default digest, after a sleep or a CPU burn as the payload asks."""
    data = task.payload["data"]
    if data["kind"] == "io":
        time.sleep(IO_MS / 1000)
    elif data["kind"] == "cpu":
        _burn(data["spins"])
    return default_process(task)


def discard(task: Task, result: Mapping[str, Any]) -> None:
    """Persistence that keeps nothing, so that every stage can run on Ray (no head-bound SQLite)."""


def _burn(spins: int) -> int:
    total = 0
    for i in range(spins):
        total += i * i % 7
    return total


def stage_validate(task: Task, value: Any) -> None:
    """The validator as a pipeline stage (on the head's threads)."""
    validate(task.payload)


def stage_process(task: Task, value: Any) -> Mapping[str, Any]:
    """The processor as a pipeline stage (the one on Ray)."""
    return mixed_process(task)


def stage_discard(task: Task, value: Any) -> None:
    """Persistence that keeps nothing, as a pipeline stage."""


def _one_stage_on_ray() -> Pipeline:
    return Pipeline(
        "cpu_on_ray",
        [
            Stage("validate", stage_validate, workers=VALIDATORS),
            Stage("process", stage_process, workers=PROCESSORS, backend="ray"),
            Stage("persist", stage_discard, workers=PERSISTERS),
        ],
    )


def fused_pipeline(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """Plain Ray's version of one task: the three stages in one call."""
    task = Task(uuid.uuid4().hex, freeze(payload))
    validate(task.payload)
    result = mixed_process(task)
    discard(task, result)
    return result


class PipelineActor:
    """Plain Ray's `ActorPool` version: one actor call runs the three stages of one task."""

    def pipeline(self, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        return fused_pipeline(payload)


# --- measuring ------------------------------------------------------------------------------------


def _spins_for(ms: float) -> int:
    """How many `_burn` spins take `ms` milliseconds here (best of three, as load only slows a try down)."""
    spins = 200_000
    fastest = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        _burn(spins)
        fastest = min(fastest, time.perf_counter() - started)
    return int(spins / (fastest * 1000) * ms)


def _payloads(kind: str, count: int, spins: int) -> list[dict[str, Any]]:
    return [{"name": f"{kind}-{i}", "data": {"kind": kind, "index": i, "spins": spins}} for i in range(count)]


def _figures(count: int, elapsed_s: float, latencies_s: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "tasks_per_s": round(count / elapsed_s, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
    }


def _measure(
    submit_all: Callable[[list[dict[str, Any]]], None],
    one: Callable[[dict[str, Any]], None],
    payloads: list[dict[str, Any]],
    samples: int,
) -> dict[str, float]:
    for payload in payloads[:3]:  # warm every path once
        one(payload)
    started = time.perf_counter()
    submit_all(payloads)
    elapsed = time.perf_counter() - started
    latencies = []
    for payload in payloads[:samples]:
        t0 = time.perf_counter()
        one(payload)
        latencies.append(time.perf_counter() - t0)
    return _figures(len(payloads), elapsed, latencies)


def _runtime_runner(runtime: Runtime) -> Runner:
    def submit_all(payloads: list[dict[str, Any]]) -> None:
        handles = [runtime.submit(p) for p in payloads]
        for handle in handles:
            record = handle.result(timeout=600)
            assert record.state is TaskState.COMPLETED, record.error

    def one(payload: dict[str, Any]) -> None:
        record = runtime.submit(payload).result(timeout=600)
        assert record.state is TaskState.COMPLETED, record.error

    return submit_all, one


def _actorpool_runner(pool: Any) -> Runner:
    def call(actor: Any, payload: dict[str, Any]) -> Any:
        return actor.pipeline.remote(payload)

    def submit_all(payloads: list[dict[str, Any]]) -> None:
        for _ in pool.map_unordered(call, payloads):
            pass

    def one(payload: dict[str, Any]) -> None:
        pool.submit(call, payload)
        pool.get_next()

    return submit_all, one


def _ray_tasks_runner(ray: Any, cpus: float) -> Runner:
    # As many tasks at once as the processor pool has actors: each asks for a share of the CPUs.
    remote = ray.remote(num_cpus=cpus / PROCESSORS)(fused_pipeline)

    def submit_all(payloads: list[dict[str, Any]]) -> None:
        ray.get([remote.remote(payload) for payload in payloads])

    def one(payload: dict[str, Any]) -> None:
        ray.get(remote.remote(payload))

    return submit_all, one


def _config(backend: str) -> RuntimeConfig:
    return RuntimeConfig(
        service_backend=backend,  # type: ignore[arg-type]
    )


class _DriverMeter:
    """The driver's CPU time and the Ray backend's calls and invocations, around one measured run."""

    def __init__(self, backend: RayBackend) -> None:
        self._backend = backend
        self.figures: dict[str, float] = {}

    def _counts(self) -> tuple[int, int]:
        backend = self._backend
        return backend.calls_done, backend.invocations_done

    def metered(self, submit_all: Callable[[list[dict[str, Any]]], None]) -> Callable[[list[dict[str, Any]]], None]:
        """`submit_all`, noting the driver's CPU and the calls per invocation while it runs."""

        def run(payloads: list[dict[str, Any]]) -> None:
            calls, invocations = self._counts()
            cpu, wall = time.process_time(), time.perf_counter()
            submit_all(payloads)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            calls, invocations = self._counts()[0] - calls, self._counts()[1] - invocations
            self.figures = {
                "tasks_per_s": round(len(payloads) / wall, 1),
                "driver_cpu_ms_per_task": round(cpu / len(payloads) * 1000, 3),
                "driver_cores_busy": round(cpu / wall, 2),
                "calls_per_invocation": round(calls / invocations, 2) if invocations else float("nan"),
            }

        return run


# --- the scenario ---------------------------------------------------------------------------------


def _measure_here(ray: Any, quick: bool, cpus: float) -> dict[str, Any]:
    """Every setup and workload on the Ray session this process is connected to."""
    counts = {"tiny": 1000, "io": 200, "cpu": 100} if quick else {"tiny": 3000, "io": 600, "cpu": 200}
    samples = {"tiny": 30, "io": 20, "cpu": 10} if quick else {"tiny": 300, "io": 100, "cpu": 40}
    spins = _spins_for(CPU_MS)
    figures: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in counts}
    startup: dict[str, float] = {}
    driver: dict[str, float] = {}
    rounds = 1 if quick else 3
    services = ServiceSet(
        process=mixed_process,
        persist=discard,
        workers={"validator": VALIDATORS, "processor": PROCESSORS, "persistence": PERSISTERS},
    )
    with contextlib.ExitStack() as stack:
        runners: dict[str, Runner] = {}
        meter: _DriverMeter | None = None
        for backend in ("thread", "ray"):
            started = time.perf_counter()
            runtime = stack.enter_context(Runtime(_config(backend), services=services))
            startup[f"{backend}_runtime_s"] = round(time.perf_counter() - started, 2)
            runners[backend] = _runtime_runner(runtime)
            if backend == "ray":
                # The runtime keeps its backends to itself; the meter reads the one it just started.
                # (the open one: a closed runtime's backend may not be collected yet)
                meter = _DriverMeter(next(o for o in gc.get_objects() if isinstance(o, RayBackend) and not o._closed))
        started = time.perf_counter()
        runtime = stack.enter_context(Runtime(RuntimeConfig(), pipelines=[_one_stage_on_ray()]))
        startup["ray_stage_runtime_s"] = round(time.perf_counter() - started, 2)
        runners["ray_stage"] = _runtime_runner(runtime)
        started = time.perf_counter()
        pipeline_actor = ray.remote(PipelineActor)
        actors = [pipeline_actor.remote() for _ in range(PROCESSORS)]
        stack.callback(lambda: [ray.kill(actor) for actor in actors])
        ray.get([actor.__ray_ready__.remote() for actor in actors])
        startup["actorpool_s"] = round(time.perf_counter() - started, 2)
        runners["actorpool"] = _actorpool_runner(importlib.import_module("ray.util").ActorPool(actors))
        runners["ray_tasks"] = _ray_tasks_runner(ray, cpus)
        # The setups take turns, workload by workload and round by round, and each keeps its best
        # round: load from elsewhere on the machine only ever slows a round down.
        for round_ in range(rounds):
            order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
            for kind, count in counts.items():
                for setup in order:
                    submit_all, one = runners[setup]
                    metered = setup == "ray" and kind == "tiny" and meter is not None
                    if metered and meter is not None:
                        submit_all = meter.metered(submit_all)
                    measured = _measure(submit_all, one, _payloads(kind, count, spins), samples[kind])
                    if metered and meter is not None and measured["tasks_per_s"] >= driver.get("tasks_per_s", 0.0):
                        driver = meter.figures  # of the best round, as the figures kept
                    figures[kind][setup] = _best(figures[kind].get(setup), measured)

    ratios = {
        kind: {
            "ray_vs_thread_throughput": _ratio(setups["ray"]["tasks_per_s"], setups["thread"]["tasks_per_s"]),
            "ray_vs_actorpool_throughput": _ratio(setups["ray"]["tasks_per_s"], setups["actorpool"]["tasks_per_s"]),
            "ray_vs_ray_tasks_throughput": _ratio(setups["ray"]["tasks_per_s"], setups["ray_tasks"]["tasks_per_s"]),
            "ray_vs_actorpool_p50": _ratio(setups["ray"]["p50_ms"], setups["actorpool"]["p50_ms"]),
            "ray_stage_vs_actorpool_throughput": _ratio(
                setups["ray_stage"]["tasks_per_s"], setups["actorpool"]["tasks_per_s"]
            ),
        }
        for kind, setups in figures.items()
    }
    return {
        "tasks": counts,
        "rounds": rounds,
        "startup": startup,
        "figures": figures,
        "ratios": ratios,
        "driver_tiny": driver,
        "targets": {
            "tiny_vs_actorpool_ge_1": ratios["tiny"]["ray_vs_actorpool_throughput"] >= 1.0,
            "cpu_vs_actorpool_ge_1": ratios["cpu"]["ray_vs_actorpool_throughput"] >= 1.0,
            "cpu_one_stage_on_ray_vs_actorpool_ge_1": ratios["cpu"]["ray_stage_vs_actorpool_throughput"] >= 1.0,
        },
    }


@contextlib.contextmanager
def _three_nodes(ray: Any) -> Any:
    """A head with no CPU and two one-CPU worker nodes on this machine; the driver connected to it."""
    cluster_utils = importlib.import_module("ray.cluster_utils")
    root = str(Path(__file__).resolve().parent.parent)
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "PYTHONPATH")}
    # Short, under /tmp: raylet and plasma socket paths must fit a Unix socket's 107 characters. Private, so
    # that no other `ray.init()` on this machine finds this cluster (it records its address in the temp dir).
    with tempfile.TemporaryDirectory(prefix="afbench-", dir="/tmp") as tmp:
        os.environ["RAY_TMPDIR"] = tmp
        # Every node imports this actorflow, as "installed on every node" asks: the raylets inherit it.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, saved["PYTHONPATH"]]))
        cluster = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * _MB},
        )
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1, object_store_memory=100 * _MB)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            try:
                yield cluster
            finally:
                ray.shutdown()
        finally:
            cluster.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


_MB = 1024 * 1024


def run(quick: bool, cluster: bool = False) -> dict[str, Any]:
    """Run the scenario; returns figures per place, workload and setup, and the ratios that matter.

    Without Ray installed it returns ``{"skipped": why}``. It starts a local
    Ray of its own (with token auth off: a throwaway local cluster), and with
    `cluster` then a three-node one, and shuts each down afterwards.
    """
    try:
        # Optional, and typed as Any (Ray's own types are partial): the other scenarios run without it.
        ray: Any = importlib.import_module("ray")
    except ImportError:
        return {"skipped": "Ray is not installed: pip install '.[ray]'"}
    if ray.is_initialized():
        return {"skipped": "this process already has a Ray session: run the scenario in a process of its own"}

    load_before = round(os.getloadavg()[0], 2)  # the figures mean little on a machine busy with other work
    places: dict[str, Any] = {}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # This module is shipped by value: the workers need not find `benchmarks` on their path.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        cpus = float(os.cpu_count() or 1)
        started = time.perf_counter()
        ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
        try:
            places["local"] = {"ray_init_s": round(time.perf_counter() - started, 2), **_measure_here(ray, quick, cpus)}
        finally:
            ray.shutdown()
        if cluster:
            started = time.perf_counter()
            with _three_nodes(ray):
                places["cluster"] = {
                    "nodes": "head (0 CPU) + 2 worker nodes (1 CPU each), one machine",
                    "ray_init_s": round(time.perf_counter() - started, 2),
                    **_measure_here(ray, quick, 2.0),
                }
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    return {
        "scenario": "ray",
        "quick": quick,
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        "ray_version": ray.__version__,
        "pools": {"validator": VALIDATORS, "processor": PROCESSORS, "persistence": PERSISTERS},
        "work_ms": {"io": IO_MS, "cpu": CPU_MS},
        "places": places,
    }


def _best(kept: dict[str, float] | None, new: dict[str, float]) -> dict[str, float]:
    if kept is None:
        return new
    return {
        "tasks_per_s": max(kept["tasks_per_s"], new["tasks_per_s"]),
        "p50_ms": min(kept["p50_ms"], new["p50_ms"]),
        "p99_ms": min(kept["p99_ms"], new["p99_ms"]),
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--full" not in sys.argv, cluster="--cluster" in sys.argv), indent=2))
