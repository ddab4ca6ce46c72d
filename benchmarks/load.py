"""How one system is driven and timed: warm-up, light load, saturating load.

* Light load: one task at a time. The submitting thread times each task from
  its `submit()` call to the return of `handle.result()`.
* Saturating load: `submitters` threads submit as fast as the system admits;
  the system admits `concurrency` tasks in flight (a closed loop: a task that
  turns terminal frees room for the next). A task's latency runs from its
  `submit()` call to the moment it turned terminal (see `benchmarks.pipeline`);
  throughput is tasks divided by the time from the first submit to the return
  of `join()` once the last one is terminal.

Besides wall time, each run records the process's CPU time and context
switches (all threads, from `resource.getrusage`): per task, they are much
steadier than throughput on a shared machine, and they say *why* a system is
slow (a thread switch per message hop costs more than the Python around it).
"""

from __future__ import annotations

import gc
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks.pipeline import Pipeline, PipelineFactory, RuntimePipeline

__all__ = ["LoadRun", "Measurement", "Sizes", "measure", "one_at_a_time", "saturate"]

Payloads = Callable[[int], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work one system gets per round."""

    tasks: int
    """Tasks at saturating load."""
    light: int = 0
    """Tasks at light load (one at a time); 0 skips the light phase."""
    warmup: int = 200
    """Tasks run first and not measured."""
    concurrency: int = 256
    """Tasks admitted in flight at saturating load."""
    submitters: int = 2
    """Threads submitting at saturating load."""
    batch: int = 1
    """Tasks per `submit_many` call at saturating load (1: one `submit` per task)."""
    timeout_s: float = 600.0
    """Give up (and fail the scenario) if a phase takes longer than this."""


@dataclass(slots=True)
class LoadRun:
    """One saturating run."""

    tasks: int
    elapsed_s: float
    cpu_s: float = 0.0
    """CPU time the whole process used meanwhile (every thread)."""
    switches: int = 0
    """Context switches of the whole process meanwhile (voluntary and involuntary)."""
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Tasks per second."""
        return self.tasks / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_us_per_task(self) -> float:
        """Process CPU time per task, in microseconds."""
        return self.cpu_s / self.tasks * 1e6 if self.tasks else 0.0

    @property
    def switches_per_task(self) -> float:
        """Context switches per task."""
        return self.switches / self.tasks if self.tasks else 0.0


@dataclass(slots=True)
class Measurement:
    """What one round of one system measured."""

    system: str
    load: LoadRun
    light_ms: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


def saturate(pipeline: Pipeline, payloads: Payloads, *, count: int, sizes: Sizes, record: bool = True) -> LoadRun:
    """Run `count` tasks from `sizes.submitters` threads; with `record`, compute each task's latency."""
    submitted: list[list[tuple[str, float]]] = [[] for _ in range(sizes.submitters)]
    errors: list[BaseException] = []

    def submit_every(offset: int) -> None:
        mine = submitted[offset]
        wall = time.time
        try:
            if sizes.batch > 1:
                submit_batches(offset, mine)
                return
            for index in range(offset, count, sizes.submitters):
                body = payloads(index)
                began = wall()
                handle = pipeline.submit(body)
                if record:
                    mine.append((handle.task_id, began))
        except BaseException as exc:
            errors.append(exc)

    def submit_batches(offset: int, mine: list[tuple[str, float]]) -> None:
        if not isinstance(pipeline, RuntimePipeline):
            raise TypeError(f"{pipeline.name}: batches of {sizes.batch} need Runtime.submit_many")
        indexes = range(offset, count, sizes.submitters)
        for first in range(0, len(indexes), sizes.batch):
            bodies = [payloads(index) for index in indexes[first : first + sizes.batch]]
            began = time.time()
            handles = pipeline.submit_many(bodies)
            if record:
                mine.extend((handle.task_id, began) for handle in handles)

    threads = [
        threading.Thread(target=submit_every, args=(offset,), name=f"bench-submit-{offset}")
        for offset in range(min(sizes.submitters, count))
    ]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before, switches_before = usage.ru_utime + usage.ru_stime, usage.ru_nvcsw + usage.ru_nivcsw
    first = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(sizes.timeout_s)
    if errors:
        raise errors[0]
    if not pipeline.join(sizes.timeout_s):
        raise TimeoutError(f"{pipeline.name}: tasks still in flight after {sizes.timeout_s}s")
    last = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    run = LoadRun(
        count,
        last - first,
        usage.ru_utime + usage.ru_stime - cpu_before,
        usage.ru_nvcsw + usage.ru_nivcsw - switches_before,
    )
    if record:
        starts = dict(pair for mine in submitted for pair in mine)
        finished = pipeline.finished_at(starts)
        if len(finished) != count:
            raise RuntimeError(f"{pipeline.name}: {count - len(finished)} of {count} tasks have no terminal time")
        run.latencies_ms = [(finished[task_id] - began) * 1000 for task_id, began in starts.items()]
    return run


def one_at_a_time(pipeline: Pipeline, payloads: Payloads, *, count: int, timeout_s: float) -> list[float]:
    """Submit, wait for the terminal state, repeat; the submitting thread's view, in ms."""
    clock = time.perf_counter
    latencies = []
    for index in range(count):
        body = payloads(index)
        began = clock()
        pipeline.submit(body).result(timeout_s)
        latencies.append((clock() - began) * 1000)
    return latencies


def measure(factory: PipelineFactory, payloads: Payloads, sizes: Sizes) -> Measurement:
    """Build a system, warm it up, run the light then the saturating phase, close it."""
    gc.collect()
    pipeline = factory(sizes.concurrency)
    try:
        if sizes.warmup:
            saturate(pipeline, payloads, count=sizes.warmup, sizes=sizes, record=False)
        gc.collect()
        light = one_at_a_time(pipeline, payloads, count=sizes.light, timeout_s=sizes.timeout_s)
        gc.collect()
        load = saturate(pipeline, payloads, count=sizes.tasks, sizes=sizes)
    finally:
        pipeline.close()
    return Measurement(pipeline.name, load, light)
