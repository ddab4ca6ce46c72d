"""What every system under test offers the load driver, and the adapter for actorflow's Runtime.

A system is built by a factory that takes an `on_terminal(task_id)` hook; the
system calls the hook from whichever thread sees the task turn terminal (for
the Runtime: a `runtime.subscribe` callback on the state actor's thread). The
driver stamps the time there, so saturated latency is measured from the
`submit()` call to the terminal notification, the same way for every system.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from actors import Runtime
from core import TERMINAL_STATES, RuntimeConfig, TransitionEvent
from services import ServiceSet

__all__ = [
    "Completion",
    "Handle",
    "OnTerminal",
    "Pipeline",
    "PipelineFactory",
    "RuntimePipeline",
    "Work",
    "runtime_factory",
]

OnTerminal = Callable[[str], None]


class Handle(Protocol):
    """A submitted task; `result()` blocks until it is terminal."""

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the terminal state; raise TimeoutError after `timeout` s."""


class Pipeline(Protocol):
    """A system under test: submit tasks, then close."""

    name: str

    def submit(self, task_id: str, payload: Mapping[str, Any]) -> Handle:
        """Create the task (returning once it exists) and start it through validate, process, persist."""

    def close(self) -> None:
        """Finish and release everything."""


PipelineFactory = Callable[[OnTerminal], Pipeline]


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
    """The baselines' handle: an event set once, from the thread that finishes the task."""

    __slots__ = ("_event", "state")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.state: str | None = None

    def set(self, state: str) -> None:
        """Record the terminal state and wake the waiters."""
        self.state = state
        self._event.set()

    def result(self, timeout: float | None = None) -> str | None:
        """Wait for the terminal state and return it."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"task not terminal after {timeout}s")
        return self.state


class RuntimePipeline:
    """actorflow's `Runtime`, configured from `Work` plus any other `RuntimeConfig` fields."""

    def __init__(self, work: Work, on_terminal: OnTerminal, *, name: str = "runtime", **config: Any) -> None:
        self.name = name
        self.runtime = Runtime(
            RuntimeConfig(
                validator_workers=work.validator_workers,
                processor_workers=work.processor_workers,
                persistence_workers=work.persistence_workers,
                **config,
            ),
            services=ServiceSet(validate=work.validate, process=work.process, persist=work.persist),
        )

        def notify(event: TransitionEvent) -> None:
            if event.to_state in TERMINAL_STATES:
                on_terminal(event.task_id)

        self._unsubscribe = self.runtime.subscribe(notify)

    def submit(self, task_id: str, payload: Mapping[str, Any]) -> Handle:
        """`Runtime.submit`, with the driver's task id (so the hook can match it even before submit returns)."""
        return self.runtime.submit(payload, task_id=task_id)

    def close(self) -> None:
        """Drain and stop the runtime."""
        self.runtime.close()


def runtime_factory(work: Work, *, name: str = "runtime", **config: Any) -> PipelineFactory:
    """A factory of `RuntimePipeline`s with fixed work and config."""

    def build(on_terminal: OnTerminal) -> Pipeline:
        return RuntimePipeline(work, on_terminal, name=name, **config)

    return build
