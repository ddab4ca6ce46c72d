"""What every system under test offers the load driver, and the adapter for actorflow's Runtime.

A system is built by a factory given the concurrency of the closed loop: its
`submit()` blocks while that many tasks are in flight. The Runtime does this
with its own backpressure (`RuntimeConfig(max_in_flight=...)`); the baselines
with a semaphore released when a task turns terminal. Nothing is hooked into
the Runtime: it runs exactly as an embedding program would run it.

Saturated latency is the time from the `submit()` call (wall clock, stamped
by the submitting thread) to the moment the task turned terminal: for the
Runtime, the `at` of the terminal entry in the record's history (stamped by
the state actor when it applied the change, just before the group commit that
publishes it); for the baselines, the moment their state book-keeping
recorded the terminal state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from actorflow.actors import Runtime, TaskHandle
from actorflow.core import RuntimeConfig
from actorflow.core import pipeline as stages
from actorflow.services import ServiceSet

__all__ = [
    "Completion",
    "Handle",
    "Pipeline",
    "PipelineFactory",
    "RuntimePipeline",
    "StagePipeline",
    "Work",
    "runtime_factory",
    "stage_factory",
]


class Handle(Protocol):
    """A submitted task; `result()` blocks until it is terminal."""

    task_id: str

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the terminal state; raise TimeoutError after `timeout` s."""


class Pipeline(Protocol):
    """A system under test."""

    name: str

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        """Create a task and start it through validate, process, persist (blocks while the loop is full)."""

    def join(self, timeout: float) -> bool:
        """Wait until no task is in flight; False on timeout."""

    def finished_at(self, task_ids: Iterable[str]) -> dict[str, float]:
        """When each of these tasks turned terminal (`time.time()` seconds)."""

    def close(self) -> None:
        """Finish and release everything."""


PipelineFactory = Callable[[int], Pipeline]
"""Builds a system whose closed loop admits this many tasks in flight."""


@dataclass(frozen=True, slots=True)
class Work:
    """The three functions every system runs, and the pool sizes they run with."""

    validate: Callable[..., Any]
    process: Callable[..., Any]
    persist: Callable[..., Any]
    validator_workers: int = 2
    processor_workers: int = 4
    persistence_workers: int = 2

    def with_processors(self, count: int) -> Work:
        """The same work with `count` processor workers."""
        return replace(self, processor_workers=count)


class Completion:
    """The baselines' handle. Like the Runtime's, it builds an Event only if someone waits on it."""

    __slots__ = ("_event", "state", "task_id")

    _lock = threading.Lock()

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.state: str | None = None
        self._event: threading.Event | None = None

    def set(self, state: str) -> None:
        """Record the terminal state and wake the waiter, if any."""
        with Completion._lock:
            self.state = state
            event = self._event
        if event is not None:
            event.set()

    def result(self, timeout: float | None = None) -> str | None:
        """Wait for the terminal state and return it."""
        with Completion._lock:
            if self.state is not None:
                return self.state
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise TimeoutError(f"task {self.task_id} not terminal after {timeout}s")
        return self.state


class RuntimePipeline:
    """actorflow's `Runtime`, configured from `Work`, the loop's concurrency and any other config fields."""

    def __init__(
        self, work: Work, concurrency: int, *, name: str = "runtime", metrics: bool = True, **config: Any
    ) -> None:
        self.name = name
        config.setdefault("max_in_flight", concurrency)
        config.setdefault("submit_timeout_s", 600.0)
        self.runtime = Runtime(
            RuntimeConfig(**config),
            services=ServiceSet(
                validate=work.validate,
                process=work.process,
                persist=work.persist,
                workers={
                    "validator": work.validator_workers,
                    "processor": work.processor_workers,
                    "persistence": work.persistence_workers,
                },
            ),
            metrics=metrics,
        )

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        """`Runtime.submit(payload)`, as an embedding program calls it (the runtime picks the id)."""
        return self.runtime.submit(payload)

    def submit_many(self, payloads: Sequence[Mapping[str, Any]]) -> list[TaskHandle]:
        """`Runtime.submit_many(payloads)`: one message, and with a journal one commit, for the batch."""
        return self.runtime.submit_many(payloads)

    def join(self, timeout: float) -> bool:
        """`Runtime.join`."""
        return self.runtime.join(timeout)

    def finished_at(self, task_ids: Iterable[str]) -> dict[str, float]:
        """The terminal history entry's time of each task, read back from the runtime's records."""
        wanted = set(task_ids)
        return {r.task_id: r.history[-1].at for r in self.runtime.tasks() if r.task_id in wanted}

    def close(self) -> None:
        """Drain and stop the runtime."""
        self.runtime.close()


class StagePipeline(RuntimePipeline):
    """A Runtime running one pipeline of the given stage(s) (async and CPU scenarios); counts the threads it started."""

    def __init__(
        self, stage: stages.Stage | Sequence[stages.Stage], concurrency: int, *, name: str, **config: Any
    ) -> None:
        self.name = name
        config.setdefault("max_in_flight", concurrency)
        config.setdefault("submit_timeout_s", 600.0)
        before = threading.active_count()
        steps = [stage] if isinstance(stage, stages.Stage) else list(stage)
        self.runtime = Runtime(RuntimeConfig(**config), pipelines=[stages.Pipeline("io", steps)])
        self.threads_started = threading.active_count() - before
        """Threads the runtime started: its actors, the timer, and the stage's workers (or event loop)."""


def stage_factory(
    stage: stages.Stage | Sequence[stages.Stage], *, name: str, threads: list[int], **config: Any
) -> PipelineFactory:
    """A factory of `StagePipeline`s; each one's thread count is appended to `threads`."""

    def build(concurrency: int) -> Pipeline:
        pipeline = StagePipeline(stage, concurrency, name=name, **config)
        threads.append(pipeline.threads_started)
        return pipeline

    return build


def runtime_factory(work: Work, *, name: str = "runtime", **config: Any) -> PipelineFactory:
    """A factory of `RuntimePipeline`s with fixed work and config."""

    def build(concurrency: int) -> Pipeline:
        return RuntimePipeline(work, concurrency, name=name, **config)

    return build
