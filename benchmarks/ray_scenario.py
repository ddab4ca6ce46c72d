"""The Ray scenario: the Ray backend beside Ray's own `ray.util.ActorPool` and beside the thread backend.

All three run the same functions, in the same run, on this one machine:

* ``thread``: actorflow with its default backend (pykka worker threads);
* ``ray``: actorflow with ``service_backend="ray"`` (each worker a Ray actor);
* ``actorpool``: plain Ray, an `ActorPool` of as many actors as the processor
  pool, each call running validate, process and persist in one go: the
  lower bound of what Ray costs, with no state machine, journal or trace.

Three workloads, mixed through one processor function so that each backend
starts once: ``tiny`` (a sha256 of a small payload: pure overhead), ``io``
(a 20 ms sleep, standing in for a network call) and ``cpu`` (about 20 ms of
pure-Python arithmetic, which holds the GIL). For each: throughput (tasks/s
with every task submitted at once) and latency (one task at a time, submit to
terminal, p50 and p99). The three setups take turns, and the full run keeps
each one's best of three rounds.

    python -c "from benchmarks.ray_scenario import run; print(run(quick=True))"
"""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from actorflow.actors import Runtime
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


class PipelineActor:
    """Plain Ray's version: one actor call runs the three stages of one task."""

    def pipeline(self, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        task = Task(uuid.uuid4().hex, freeze(payload))
        validate(task.payload)
        result = mixed_process(task)
        discard(task, result)
        return result


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


def _config(backend: str) -> RuntimeConfig:
    return RuntimeConfig(
        service_backend=backend,  # type: ignore[arg-type]
        validator_workers=VALIDATORS,
        processor_workers=PROCESSORS,
        persistence_workers=PERSISTERS,
    )


# --- the scenario ---------------------------------------------------------------------------------


def run(quick: bool) -> dict[str, Any]:
    """Run the scenario; returns figures per workload and setup, and the ratios that matter.

    Without Ray installed it returns ``{"skipped": why}``. It starts a local
    Ray of its own (with token auth off: a throwaway local cluster) unless
    this process already has a session, and shuts it down afterwards.
    """
    try:
        # Optional, and typed as Any (Ray's own types are partial): the other scenarios run without it.
        ray: Any = importlib.import_module("ray")
        actor_pool: Any = importlib.import_module("ray.util").ActorPool
    except ImportError:
        return {"skipped": "Ray is not installed: pip install '.[ray]'"}

    load_before = round(os.getloadavg()[0], 2)  # the figures mean little on a machine busy with other work
    counts = {"tiny": 200, "io": 100, "cpu": 40} if quick else {"tiny": 2000, "io": 600, "cpu": 200}
    samples = {"tiny": 30, "io": 20, "cpu": 10} if quick else {"tiny": 300, "io": 100, "cpu": 40}
    spins = _spins_for(CPU_MS)
    figures: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in counts}
    startup: dict[str, float] = {}

    rounds = 1 if quick else 3
    owns_ray = not ray.is_initialized()
    if owns_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        started = time.perf_counter()
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        startup["ray_init_s"] = round(time.perf_counter() - started, 2)
    # This module is shipped by value: the workers need not find `benchmarks` on their path.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    services = ServiceSet(process=mixed_process, persist=discard)
    try:
        with contextlib.ExitStack() as stack:
            runners: dict[str, Runner] = {}
            for backend in ("thread", "ray"):
                started = time.perf_counter()
                runtime = stack.enter_context(Runtime(_config(backend), services=services))
                startup[f"{backend}_runtime_s"] = round(time.perf_counter() - started, 2)
                runners[backend] = _runtime_runner(runtime)
            started = time.perf_counter()
            pipeline_actor = ray.remote(PipelineActor)
            actors = [pipeline_actor.remote() for _ in range(PROCESSORS)]
            stack.callback(lambda: [ray.kill(actor) for actor in actors])
            ray.get([actor.__ray_ready__.remote() for actor in actors])
            startup["actorpool_s"] = round(time.perf_counter() - started, 2)
            runners["actorpool"] = _actorpool_runner(actor_pool(actors))
            # The setups take turns, workload by workload and round by round, and each keeps its best
            # round: load from elsewhere on the machine only ever slows a round down.
            for round_ in range(rounds):
                order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
                for kind, count in counts.items():
                    for setup in order:
                        submit_all, one = runners[setup]
                        measured = _measure(submit_all, one, _payloads(kind, count, spins), samples[kind])
                        figures[kind][setup] = _best(figures[kind].get(setup), measured)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if owns_ray:
            ray.shutdown()

    ratios = {
        kind: {
            "ray_vs_thread_throughput": _ratio(setups["ray"]["tasks_per_s"], setups["thread"]["tasks_per_s"]),
            "ray_vs_actorpool_throughput": _ratio(setups["ray"]["tasks_per_s"], setups["actorpool"]["tasks_per_s"]),
            "ray_vs_thread_p50": _ratio(setups["ray"]["p50_ms"], setups["thread"]["p50_ms"]),
            "ray_vs_actorpool_p50": _ratio(setups["ray"]["p50_ms"], setups["actorpool"]["p50_ms"]),
        }
        for kind, setups in figures.items()
    }
    return {
        "scenario": "ray",
        "quick": quick,
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
        "ray_version": ray.__version__,
        "pools": {"validator": VALIDATORS, "processor": PROCESSORS, "persistence": PERSISTERS},
        "tasks": counts,
        "rounds": rounds,
        "work_ms": {"io": IO_MS, "cpu": CPU_MS},
        "startup": startup,
        "figures": figures,
        "ratios": ratios,
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

    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
