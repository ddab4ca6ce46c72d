"""Service functions that misbehave on purpose, for the fault-tolerance tests."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from actorflow.core import Task, TransientError

Fault = Literal["ok", "transient", "permanent", "exit", "hang", "oversized", "broken"]

_PERMANENT: frozenset[Fault] = frozenset({"permanent", "oversized", "broken"})
"""Faults that fail their task at once: an error, a value over the cap, an exception that cannot be printed."""

CHAOS_MAX_VALUE_BYTES = 4096
"""The `max_value_bytes` the chaos runs use: an "oversized" result is larger."""


def chaos_fault(seed: int, index: int, attempt: int) -> Fault:
    """The fault a chaos processor plays for (task, attempt): fixed by the seed, independent per attempt."""
    roll = random.Random(f"{seed}:{index}:{attempt}").random()
    if roll < 0.10:
        return "transient"
    if roll < 0.12:
        return "permanent"
    if roll < 0.13:
        return "exit"
    if roll < 0.135:
        return "hang"
    if roll < 0.14:
        return "oversized"
    if roll < 0.145:
        return "broken"
    return "ok"


class Unprintable(Exception):
    """An exception whose ``str()`` and ``repr()`` raise, as user code may make."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of a broken exception")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ of a broken exception")


def expected_outcome(seed: int, index: int, max_attempts: int) -> str:
    """COMPLETED or FAILED, as the rules say: permanent errors fail at once, others retry until attempts run out."""
    for attempt in range(1, max_attempts + 1):
        fault = chaos_fault(seed, index, attempt)
        if fault == "ok":
            return "COMPLETED"
        if fault in _PERMANENT:
            return "FAILED"
    return "FAILED"


@dataclass
class ChaosProcessor:
    """A processor playing `chaos_fault` per (task, attempt); hung calls wait for `release`."""

    seed: int
    release: threading.Event = field(default_factory=threading.Event)
    calls: list[tuple[int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, task: Task) -> Mapping[str, Any]:
        index = int(task.payload["data"]["index"])
        with self.lock:
            self.calls.append((index, task.attempt))
        fault = chaos_fault(self.seed, index, task.attempt)
        if fault == "transient":
            raise TransientError(f"flaky dependency (task {index}, attempt {task.attempt})")
        if fault == "permanent":
            raise ValueError(f"bad input (task {index})")
        if fault == "exit":
            raise SystemExit(f"service called exit (task {index})")
        if fault == "hang":
            self.release.wait(60)
        if fault == "oversized":
            return {"index": index, "blob": "x" * (2 * CHAOS_MAX_VALUE_BYTES)}
        if fault == "broken":
            raise Unprintable
        return {"index": index, "attempt": task.attempt}


class Gate:
    """A service that blocks every call until opened; `entered` tells that a call is inside."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.count = 0
        self._lock = threading.Lock()

    def wait_here(self) -> None:
        with self._lock:
            self.count += 1
        self.entered.set()
        self.opened.wait(30)

    def process(self, task: Task) -> Mapping[str, Any]:
        self.wait_here()
        return {"gated": True}

    def validate(self, payload: Mapping[str, Any]) -> None:
        self.wait_here()

    def persist(self, task: Task, result: Mapping[str, Any]) -> None:
        self.wait_here()
