"""The work every system under test does: the same three functions, called the same way.

Each is a module-level function so that it pickles by reference and a process
backend can run it. The per-task parameters (how long to sleep, how much to
compute) travel inside the payload, never in a closure, for the same reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from actorflow.core.types import Task

__all__ = [
    "AWAIT_S",
    "CPU_TARGET_S",
    "SLEEP_S",
    "await_stage",
    "calibrate_cpu",
    "cpu_process",
    "cpu_stage",
    "noop_persist",
    "noop_process",
    "noop_validate",
    "payload",
    "persist_stage",
    "sleep_process",
    "sleep_stage",
    "spin",
    "time_cpu",
    "validate_stage",
]

SLEEP_S = 0.005
"""The I/O-bound processor's sleep per task (5 ms)."""
AWAIT_S = 0.020
"""The I/O stage's wait per task in the async scenario (20 ms)."""
CPU_TARGET_S = 0.005
"""The CPU-bound processor's pure-Python work per task, when run alone (about 5 ms)."""

_RESULT = {"ok": True}


def payload(index: int, **data: Any) -> dict[str, Any]:
    """A small payload that the default validator would accept too."""
    return {"name": "bench", "data": {"i": index, **data}}


def noop_validate(payload: Mapping[str, Any]) -> None:
    """Accept everything."""


def noop_process(task: Task) -> Mapping[str, Any]:
    """Return a constant result."""
    return _RESULT


def noop_persist(task: Task, result: Mapping[str, Any]) -> None:
    """Store nothing."""


def sleep_process(task: Task) -> Mapping[str, Any]:
    """Stand in for I/O: sleep `SLEEP_S` (the GIL is released while sleeping)."""
    time.sleep(SLEEP_S)
    return _RESULT


async def await_stage(task: Task, value: Any) -> None:
    """An async stage standing in for I/O: awaits `AWAIT_S` (the event loop runs other calls meanwhile)."""
    await asyncio.sleep(AWAIT_S)


def sleep_stage(task: Task, value: Any) -> None:
    """The same wait on a thread: sleeps `AWAIT_S` (one thread per call in flight)."""
    time.sleep(AWAIT_S)


def spin(iterations: int) -> int:
    """Pure-Python integer work that holds the GIL throughout."""
    total = 0
    for value in range(iterations):
        total = (total + value * value) % 1_000_003
    return total


def cpu_process(task: Task) -> Mapping[str, Any]:
    """About `CPU_TARGET_S` of pure-Python work; the loop count is in ``payload["data"]["spin"]``."""
    return {"spin": spin(int(task.payload["data"]["spin"]))}


def validate_stage(task: Task, value: Any) -> None:
    """`noop_validate` as a pipeline stage, ``fn(task, value)``."""


def cpu_stage(task: Task, value: Any) -> Mapping[str, Any]:
    """`cpu_process` as a pipeline stage, ``fn(task, value)``."""
    return cpu_process(task)


def persist_stage(task: Task, value: Any) -> None:
    """`noop_persist` as a pipeline stage, ``fn(task, value)``."""


def calibrate_cpu(target_s: float = CPU_TARGET_S) -> int:
    """The `spin` loop count that takes about `target_s` of CPU time on this machine.

    Timed with `time.thread_time()` (this thread's CPU time), so that other
    processes taking the CPU away meanwhile do not skew the calibration.
    """
    clock = time.thread_time
    iterations = 10_000
    while True:
        started = clock()
        spin(iterations)
        elapsed = clock() - started
        if elapsed >= 0.02:
            break
        iterations *= 2
    samples = []
    for _ in range(5):  # the fastest of a few: the run least disturbed (caches, frequency)
        started = clock()
        spin(iterations)
        samples.append(clock() - started)
    return max(1, round(iterations * target_s / min(samples)))


def time_cpu(iterations: int) -> tuple[float, float]:
    """One `spin(iterations)`: (CPU seconds, wall seconds), to report what the calibration gave."""
    cpu, wall = time.thread_time(), time.perf_counter()
    spin(iterations)
    return time.thread_time() - cpu, time.perf_counter() - wall
