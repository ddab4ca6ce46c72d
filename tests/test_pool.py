"""ServicePool on its own: routing, the adaptive queue depth, withdrawal and supervision.

The backend is a small in-test one whose workers only record what they are
sent, and "start" a call when the test says so: the pool is then driven one
step at a time, exactly as the orchestrator's thread drives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from actorflow.actors.messages import RunService
from actorflow.actors.pool import PoolFailing, ServicePool
from actorflow.actors.service import CallClaims
from actorflow.actors.timer import Timer
from actorflow.core import Task
from actorflow.core.tracing import new_trace


class RecordingWorker:
    """A worker that keeps what it is sent; `start(call_id)` claims a call as a real worker would."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[int] = []
        """Every call id sent, in order."""
        self.messages: list[list[int]] = []
        """The call ids of each message the worker got (`send` or `send_many`)."""
        self.retired = False
        self._claims = CallClaims()

    def send(self, call: RunService) -> bool:
        self._claims.sent(call.call_id)
        self.sent.append(call.call_id)
        self.messages.append([call.call_id])
        return not self.retired

    def send_many(self, calls: Sequence[RunService]) -> bool:
        for one in calls:
            self._claims.sent(one.call_id)
        self.sent.extend(one.call_id for one in calls)
        self.messages.append([one.call_id for one in calls])
        return not self.retired

    def start(self, call_id: int) -> bool:
        return self._claims.take(call_id)

    def withdraw(self, call_id: int) -> bool:
        return self._claims.take(call_id)

    def retire(self) -> None:
        self.retired = True

    def join(self, timeout: float) -> bool:
        return True


class RecordingBackend:
    name = "recording"

    def __init__(self, max_queue_depth: int | None = None) -> None:
        self.workers: list[RecordingWorker] = []
        if max_queue_depth is not None:
            self.max_queue_depth = max_queue_depth

    def start_worker(
        self, name: str, service: str, fn: Callable[..., Any], deliver: Any, on_death: Any
    ) -> RecordingWorker:
        worker = RecordingWorker(name)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        """Nothing to release."""


@pytest.fixture
def timer() -> Iterator[Timer]:
    timer = Timer()
    yield timer
    timer.stop()


def make_pool(
    timer: Timer, size: int = 2, *, backend: RecordingBackend | None = None, max_restarts: int = 3
) -> tuple[ServicePool, RecordingBackend]:
    backend = backend or RecordingBackend()
    pool = ServicePool(
        "processor",
        size,
        backend=backend,
        fn=lambda task: {},
        deliver=lambda done: None,
        on_death=lambda name, why: None,
        timer=timer,
        on_deadline=lambda call_id: None,
        stage_timeout_s=None,
        max_restarts=max_restarts,
        restart_window_s=60,
        clock=lambda: 0.0,
    )
    return pool, backend


def call(call_id: int) -> RunService:
    return RunService(call_id, "processor", Task(f"task-{call_id}", {}), new_trace(), 1)


def test_calls_go_to_idle_workers_first_and_wait_in_the_pool_when_every_worker_is_busy(timer: Timer) -> None:
    pool, backend = make_pool(timer, size=2)
    for call_id in (1, 2, 3):
        pool.dispatch(call(call_id))
    pool.flush()
    assert [worker.sent for worker in backend.workers] == [[1], [2]]
    assert pool.stats()["queued"] == 1
    assert pool.finished(1) is not None
    pool.flush()
    assert backend.workers[0].sent == [1, 3]  # the freed worker gets the waiting call


def test_the_queue_depth_grows_only_while_every_recent_call_is_fast_and_one_slow_call_shrinks_it(
    timer: Timer,
) -> None:
    pool, _ = make_pool(timer, size=1)
    assert pool.stats()["depth"] == 1
    for call_id in range(1, 33):
        pool.dispatch(call(call_id))
        pool.finished(call_id, duration_ms=0.05)
    assert pool.stats()["depth"] == 32
    pool.dispatch(call(100))
    pool.finished(100, duration_ms=5.0)  # one slow call: no more queueing behind a worker
    assert pool.stats()["depth"] == 1


def test_a_backend_can_cap_the_queue_depth(timer: Timer) -> None:
    pool, _ = make_pool(timer, size=1, backend=RecordingBackend(max_queue_depth=2))
    for call_id in range(1, 33):
        pool.dispatch(call(call_id))
        pool.finished(call_id, duration_ms=0.05)
    assert pool.stats()["depth"] == 2


def test_withdrawing_takes_back_waiting_and_unstarted_calls_but_never_a_started_one(timer: Timer) -> None:
    pool, backend = make_pool(timer, size=1)
    for call_id in range(1, 33):  # learn a deep queue
        pool.dispatch(call(call_id))
        pool.finished(call_id, duration_ms=0.05)
    worker = backend.workers[0]
    for call_id in (40, 41, 42):
        pool.dispatch(call(call_id))
    pool.flush()
    assert worker.start(40)  # the worker runs the head
    assert pool.withdraw(40) is False  # started: it runs to the end
    assert pool.withdraw(41) is True  # queued at the worker, never started
    assert worker.start(41) is False  # ... so the worker skips it
    assert pool.finished(40) is not None
    assert pool.finished(41) is None  # withdrawn calls are not the pool's any more
    assert pool.withdraw(999) is False


def test_a_replaced_worker_hands_back_its_calls_head_first_and_too_many_restarts_turn_the_pool_failing(
    timer: Timer,
) -> None:
    pool, backend = make_pool(timer, size=1, max_restarts=1)
    pool.dispatch(call(1))
    pool.dispatch(call(2))  # waits in the pool (depth 1)
    first = backend.workers[0]
    stranded = pool.replace(first.name)
    assert stranded is not None
    assert [c.call_id for c in stranded] == [1]
    assert first.retired
    pool.flush()
    assert backend.workers[1].sent == [2]  # the fresh worker takes the waiting call
    assert pool.replace("no-such-worker") is None
    stranded = pool.replace(backend.workers[1].name)  # the second restart in the window: over the limit
    assert stranded is not None
    assert [c.call_id for c in stranded] == [2]
    assert pool.failing is not None
    assert "max_restarts=1" in pool.failing
    with pytest.raises(PoolFailing):
        pool.dispatch(call(3))
