"""How one system is driven and timed: warm-up, light load, saturating load.

* Light load: one task at a time. The submitting thread times each task from
  its `submit()` call to the return of `handle.result()`.
* Saturating load: `submitters` threads keep `concurrency` tasks in flight
  (closed loop: a task's terminal notification frees room for the next one).
  A task's latency runs from its `submit()` call to the terminal notification,
  stamped by the system's `on_terminal` hook; throughput is tasks divided by
  the time from the first submit to the last terminal notification.

Task ids are 32 characters, the length of the runtime's own uuid4 hex ids,
so that what each system keeps per task is representative.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarks.pipeline import Pipeline, PipelineFactory

__all__ = ["Driver", "LoadRun", "Measurement", "Sizes", "measure", "task_id"]

Payloads = Callable[[int], Mapping[str, Any]]


def task_id(prefix: str, index: int) -> str:
    """A 32-character id: a one-letter phase prefix and 31 hex digits."""
    return f"{prefix}{index:031x}"


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
    """Tasks kept in flight at saturating load."""
    submitters: int = 4
    """Threads submitting at saturating load."""
    timeout_s: float = 600.0
    """Give up (and fail the scenario) if a phase takes longer than this."""


@dataclass(slots=True)
class LoadRun:
    """One saturating run."""

    tasks: int
    elapsed_s: float
    cpu_s: float = 0.0
    """CPU time the whole process used meanwhile (every thread), a figure less noisy than wall time."""
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Tasks per second."""
        return self.tasks / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_us_per_task(self) -> float:
        """Process CPU time per task, in microseconds."""
        return self.cpu_s / self.tasks * 1e6 if self.tasks else 0.0


@dataclass(slots=True)
class Measurement:
    """What one round of one system measured."""

    system: str
    load: LoadRun
    light_ms: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


class Driver:
    """The `on_terminal` hook a system is built with; each phase points it at its own recorder."""

    __slots__ = ("target",)

    def __init__(self) -> None:
        self.target: Callable[[str], None] = _ignore

    def __call__(self, task_id: str) -> None:
        self.target(task_id)

    def saturate(
        self,
        pipeline: Pipeline,
        payloads: Payloads,
        *,
        count: int,
        prefix: str,
        sizes: Sizes,
        record: bool = True,
    ) -> LoadRun:
        """Run `count` tasks with `sizes.concurrency` in flight; with `record`, keep each latency."""
        started = [0.0] * count if record else []
        finished = [0.0] * count if record else []
        room = threading.Semaphore(sizes.concurrency)
        all_done = threading.Event()
        remaining = [count]
        lock = threading.Lock()
        clock = time.perf_counter

        def on_terminal(task: str) -> None:
            if task[0] != prefix:
                return
            if record:
                finished[int(task[1:], 16)] = clock()
            room.release()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

        self.target = on_terminal
        errors: list[BaseException] = []
        first = [0.0]

        def submit_every(offset: int) -> None:
            try:
                for index in range(offset, count, sizes.submitters):
                    body = payloads(index)
                    room.acquire()
                    now = clock()
                    if record:
                        started[index] = now
                    pipeline.submit(task_id(prefix, index), body)
            except BaseException as exc:
                errors.append(exc)
                all_done.set()

        threads = [
            threading.Thread(target=submit_every, args=(offset,), name=f"bench-submit-{offset}")
            for offset in range(min(sizes.submitters, count))
        ]
        cpu_before = time.process_time()
        first[0] = clock()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(sizes.timeout_s)
        finished_in_time = all_done.wait(sizes.timeout_s)
        last = clock()
        cpu = time.process_time() - cpu_before
        self.target = _ignore
        if errors:
            raise errors[0]
        if not finished_in_time:
            raise TimeoutError(
                f"{pipeline.name}: {remaining[0]} of {count} tasks not terminal after {sizes.timeout_s}s"
            )
        if not record:
            return LoadRun(count, last - first[0], cpu)
        elapsed = max(finished) - min(started)
        return LoadRun(
            count, elapsed, cpu, [(end - begin) * 1000 for begin, end in zip(started, finished, strict=True)]
        )

    def one_at_a_time(self, pipeline: Pipeline, payloads: Payloads, *, count: int, timeout_s: float) -> list[float]:
        """Submit, wait for the terminal state, repeat; the submitting thread's view, in ms."""
        clock = time.perf_counter
        latencies = []
        for index in range(count):
            body = payloads(index)
            begin = clock()
            pipeline.submit(task_id("l", index), body).result(timeout_s)
            latencies.append((clock() - begin) * 1000)
        return latencies


def _ignore(task_id: str) -> None:
    return None


def measure(
    factory: PipelineFactory,
    payloads: Payloads,
    sizes: Sizes,
    *,
    after: Callable[[Pipeline], dict[str, Any]] | None = None,
) -> Measurement:
    """Build a system, warm it up, run the light then the saturating phase, close it.

    `after(pipeline)`, if given, runs before closing and returns extra figures.
    """
    driver = Driver()
    gc.collect()
    pipeline = factory(driver)
    try:
        if sizes.warmup:
            driver.saturate(pipeline, payloads, count=sizes.warmup, prefix="w", sizes=sizes, record=False)
        gc.collect()
        light = driver.one_at_a_time(pipeline, payloads, count=sizes.light, timeout_s=sizes.timeout_s)
        gc.collect()
        load = driver.saturate(pipeline, payloads, count=sizes.tasks, prefix="m", sizes=sizes)
        extra = after(pipeline) if after is not None else {}
    finally:
        pipeline.close()
    return Measurement(pipeline.name, load, light, extra)
