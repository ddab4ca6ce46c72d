"""Shared fixtures: every test leaves no actor, no structlog config and no runtime behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
import structlog

from actorflow.actors import Milestone, Runtime
from actorflow.core import RuntimeConfig
from actorflow.core import journal as journal_package
from actorflow.core.journal import Journal, WriterStore
from tests.ast_parse_lock import serialise_ast_parse

# Before any test parses: on CPython 3.11.0-3.11.7 two threads parsing at once can fail one of them
# (tests/ast_parse_lock.py says why), and Hypothesis parses while the runtime's workers format tracebacks.
serialise_ast_parse()


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    """Like pykka's own test suite: no actor outlives its test."""
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    """A default in-memory runtime, closed after the test."""
    rt = Runtime(RuntimeConfig())
    try:
        yield rt
    finally:
        rt.close(drain=False)


@pytest.fixture
def runtime_journals(monkeypatch: pytest.MonkeyPatch) -> list[Journal]:
    """Every journal a runtime opens for its StateActor during the test, in order (the last is the current one).

    The StateActor owns each: a test may look at its connection, never write through it.
    """
    opened: list[Journal] = []
    open_store = journal_package.open_store

    def recording(*args: Any, **kwargs: Any) -> WriterStore:
        store = open_store(*args, **kwargs)
        assert isinstance(store, Journal)
        opened.append(store)
        return store

    monkeypatch.setattr(journal_package, "open_store", recording)
    return opened


def payload(index: int = 0, **data: object) -> dict[str, object]:
    """A payload the default validator accepts."""
    return {"name": f"task-{index}", "data": {"index": index, **data}}


def actor_threads() -> list[threading.Thread]:
    """Threads started by pykka actors or actorflow (named ClassName-N or actorflow-*)."""
    names = ("StateActor-", "OrchestratorActor-", "ServiceWorker-", "actorflow-")
    return [t for t in threading.enumerate() if t.name.startswith(names) and t.is_alive()]


class MilestoneLog:
    """A runtime's `on_milestone` callback that records milestones; tests wait on them, never poll."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.seen: list[Milestone] = []

    def __call__(self, milestone: Milestone) -> None:
        with self._changed:
            self.seen.append(milestone)
            self._changed.notify_all()

    def count(self, name: str) -> int:
        """How many milestones called `name` were reached so far."""
        with self._changed:
            return sum(1 for milestone in self.seen if milestone.name == name)

    def wait_for(self, name: str, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until `count` milestones called `name` were reached; False after `timeout` s."""
        with self._changed:
            return self._changed.wait_for(
                lambda: sum(1 for milestone in self.seen if milestone.name == name) >= count, timeout
            )
