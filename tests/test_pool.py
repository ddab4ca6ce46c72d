"""ServicePool on its own: routing, the adaptive queue depth, withdrawal and supervision.

The backend is a small in-test one whose workers only record what they are
sent, and "start" a call when the test says so: the pool is then driven one
step at a time, exactly as the orchestrator's thread drives it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from actorflow.actors.backends.base import BackendDefaults, WorkerDefaults
from actorflow.actors.backends.thread import ThreadBackend
from actorflow.actors.backends.toolkit import CallClaims
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import RunService, ServiceDone, ServicesDone
from actorflow.actors.pool import PoolCannotStart, ServicePool
from actorflow.actors.threads import ThreadBook
from actorflow.actors.timer import Timer
from actorflow.core import Task
from actorflow.core.tracing import new_trace


class RecordingWorker(WorkerDefaults):
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


class RecordingBackend(BackendDefaults):
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
    assert len(backend.workers) == 2  # failing: the empty slot gets no worker


def test_a_failing_pool_holds_new_calls_uncharged_and_its_cool_down_starts_workers_that_take_them(
    timer: Timer,
) -> None:
    cooled: queue.SimpleQueue[str] = queue.SimpleQueue()
    backend = RecordingBackend()
    pool = ServicePool(
        "processor",
        2,
        backend=backend,
        fn=lambda task: {},
        deliver=lambda done: None,
        on_death=lambda name, why: None,
        timer=timer,
        on_deadline=lambda call_id: None,
        stage_timeout_s=None,
        max_restarts=1,
        restart_window_s=0.05,
        on_cool_down=lambda: cooled.put("over"),
    )
    pool.replace(backend.workers[0].name)
    assert pool.failing is None
    pool.replace(backend.workers[2].name)  # the second restart within the window opens the breaker
    assert pool.failing is not None
    assert pool.stats()["workers"] == 1  # the worker that never crashed keeps working
    pool.dispatch(call(1))
    pool.dispatch(call(2))  # no room at the live worker (depth 1): it waits, uncharged
    pool.flush()
    assert backend.workers[1].sent == [1]
    pool.replace(backend.workers[1].name)  # its last worker dies while failing: not replaced
    assert pool.stats()["workers"] == 0
    pool.dispatch(call(3))  # with no worker at all, calls still wait
    assert pool.stats()["queued"] == 2
    assert cooled.get(timeout=10) == "over"  # told on the timer's thread; the owner reopens on its own
    assert pool.reopen()
    assert pool.reopen() is False  # already open
    pool.flush()
    assert pool.failing is None
    assert pool.stats()["workers"] == 2
    assert sorted(call_id for worker in backend.workers[3:] for call_id in worker.sent) == [2, 3]


def test_a_worker_that_cannot_load_its_function_fails_its_calls_and_with_none_left_every_call_at_once(
    timer: Timer,
) -> None:
    pool, backend = make_pool(timer, size=1, max_restarts=0)
    pool.dispatch(call(1))
    pool.dispatch(call(2))
    why = "worker process pid:7 cannot load its service function: ImportError: no module named 'app'"
    stranded = pool.replace(backend.workers[0].name, cannot_load=why)
    assert stranded is not None
    assert [c.call_id for c in stranded] == [1, 2]  # the one it held, and the one waiting: no worker is left
    assert pool.cannot_load == why
    with pytest.raises(PoolCannotStart, match="no module named 'app'"):
        pool.dispatch(call(3))
    assert pool.stats()["queued"] == 0


# --- batching: routed calls leave on flush, one message per worker -----------------------------------


def teach_fast_calls(pool: ServicePool) -> None:
    """Answer enough fast calls for the pool to queue several calls per worker."""
    for call_id in range(1001, 1033):
        pool.dispatch(call(call_id))
        pool.finished(call_id, duration_ms=0.05)
    pool.flush()


def test_calls_routed_to_a_worker_before_a_flush_reach_it_in_one_send_many_and_a_lone_call_in_a_plain_send(
    timer: Timer,
) -> None:
    pool, backend = make_pool(timer, size=1)
    teach_fast_calls(pool)
    worker = backend.workers[0]
    worker.messages.clear()
    for call_id in (1, 2, 3):
        pool.dispatch(call(call_id))
    assert worker.messages == []  # nothing leaves before the owner's handler ends
    assert pool.unsent
    pool.flush()
    assert worker.messages == [[1, 2, 3]]
    assert not pool.unsent
    pool.dispatch(call(4))
    pool.flush()
    assert worker.messages == [[1, 2, 3], [4]]
    pool.flush()  # nothing left: nothing sent
    assert worker.messages == [[1, 2, 3], [4]]


def test_a_call_withdrawn_before_the_flush_is_never_sent_and_the_rest_of_its_batch_is(timer: Timer) -> None:
    pool, backend = make_pool(timer, size=1)
    teach_fast_calls(pool)
    worker = backend.workers[0]
    worker.messages.clear()
    for call_id in (1, 2, 3):
        pool.dispatch(call(call_id))
    assert pool.withdraw(2) is True
    pool.flush()
    assert worker.messages == [[1, 3]]
    assert pool.finished(2) is None
    assert pool.finished(1) is not None
    assert pool.finished(3) is not None


def test_a_worker_replaced_before_the_flush_never_gets_its_calls_and_they_come_back_to_the_caller(
    timer: Timer,
) -> None:
    pool, backend = make_pool(timer, size=1)
    teach_fast_calls(pool)
    pool.dispatch(call(1))
    pool.dispatch(call(2))
    old = backend.workers[0]
    old.messages.clear()
    stranded = pool.replace(old.name)
    assert stranded is not None
    assert [c.call_id for c in stranded] == [1, 2]
    pool.flush()
    assert old.messages == []
    assert backend.workers[1].messages == []


# --- batching on real thread workers -----------------------------------------------------------------


class Crash(BaseException):
    """A BaseException that is not an Exception: the call crashes its worker."""


class ThreadRig:
    """A pool of real thread workers, driven from the test's thread as the orchestrator drives it."""

    def __init__(self, timer: Timer, fn: Callable[..., Any], *, hold_s: float = 0.001, timeout_s: float | None = None):
        self.reports: queue.SimpleQueue[ServiceDone | ServicesDone] = queue.SimpleQueue()
        self.deadlines: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.threads = ThreadBook()
        self.backend = ThreadBackend(DeadLetterOffice(), self.threads, hold_s=hold_s)
        self.pool = ServicePool(
            "processor",
            1,
            backend=self.backend,
            fn=fn,
            deliver=self.reports.put,
            on_death=lambda name, why: None,
            timer=timer,
            on_deadline=self.deadlines.put,
            stage_timeout_s=timeout_s,
            max_restarts=10,
            restart_window_s=60,
        )

    def teach_fast_calls(self) -> None:
        for call_id in range(1001, 1033):
            self.pool.dispatch(call(call_id))
            self.pool.flush()
            report = self.reports.get(timeout=WAIT_S)
            assert isinstance(report, ServiceDone)
            self.pool.finished(report.call_id, duration_ms=0.05)

    def next_dones(self) -> list[ServiceDone]:
        """The reports of the next message, and tell the pool of each, as the orchestrator does."""
        report = self.reports.get(timeout=WAIT_S)
        dones = list(report.dones) if isinstance(report, ServicesDone) else [report]
        for done in dones:
            self.pool.finished(done.call_id, done.duration_ms)
        return dones

    def close(self) -> None:
        self.pool.close(timeout=WAIT_S)
        self.backend.close()
        self.threads.join(WAIT_S)


WAIT_S = 10


def test_a_thread_worker_returns_the_results_of_a_batch_in_one_services_done(timer: Timer) -> None:
    rig = ThreadRig(timer, lambda task, value: {"seen": task.task_id}, hold_s=60.0)
    try:
        rig.teach_fast_calls()
        for call_id in (1, 2, 3):
            rig.pool.dispatch(call(call_id))
        rig.pool.flush()
        report = rig.reports.get(timeout=WAIT_S)
        assert isinstance(report, ServicesDone)
        assert [(done.call_id, done.status, done.result) for done in report.dones] == [
            (1, "ok", {"seen": "task-1"}),
            (2, "ok", {"seen": "task-2"}),
            (3, "ok", {"seen": "task-3"}),
        ]
    finally:
        rig.close()


def test_the_result_of_a_fast_call_is_not_held_back_while_a_slow_call_behind_it_in_the_batch_runs(
    timer: Timer,
) -> None:
    slow_started, release = threading.Event(), threading.Event()

    def stage(task: Task, value: Any) -> None:
        if task.task_id == "task-2":
            slow_started.set()
            assert release.wait(WAIT_S)

    rig = ThreadRig(timer, stage)
    try:
        rig.teach_fast_calls()
        rig.pool.dispatch(call(1))
        rig.pool.dispatch(call(2))
        rig.pool.flush()
        assert [done.call_id for done in rig.next_dones()] == [1]  # while the slow call still runs
        assert slow_started.is_set()
        assert not release.is_set()
        release.set()
        assert [done.call_id for done in rig.next_dones()] == [2]
    finally:
        release.set()
        rig.close()


def test_a_crash_in_the_middle_of_a_batch_stops_the_worker_and_the_calls_behind_it_run_once_elsewhere(
    timer: Timer,
) -> None:
    runs: list[tuple[str, str]] = []

    def stage(task: Task, value: Any) -> None:
        runs.append((task.task_id, threading.current_thread().name))
        if task.task_id == "task-2":
            raise Crash("the worker dies")

    rig = ThreadRig(timer, stage, hold_s=60.0)
    try:
        rig.teach_fast_calls()
        runs.clear()
        for call_id in (1, 2, 3, 4):
            rig.pool.dispatch(call(call_id))
        rig.pool.flush()
        dones = rig.next_dones()
        assert [(done.call_id, done.status) for done in dones] == [(1, "ok"), (2, "crashed")]
        stranded = rig.pool.replace(dones[1].worker)  # as the orchestrator does on a crash
        assert stranded is not None
        assert [c.call_id for c in stranded] == [3, 4]
        for stranded_call in stranded:
            rig.pool.dispatch(stranded_call)
        rig.pool.flush()
        rerun = []
        while len(rerun) < 2:
            rerun += rig.next_dones()
        assert [(done.call_id, done.status, done.worker) for done in rerun] == [
            (3, "ok", "processor-2"),
            (4, "ok", "processor-2"),
        ]
        assert [task_id for task_id, _ in runs] == ["task-1", "task-2", "task-3", "task-4"]  # each exactly once
        assert runs[2][1] != runs[1][1]  # on the fresh worker's thread
    finally:
        rig.close()


def test_a_call_queued_behind_others_in_a_batch_gets_its_own_stage_deadline_once_it_is_the_head(
    timer: Timer,
) -> None:
    release = threading.Event()
    runs: list[str] = []

    def stage(task: Task, value: Any) -> None:
        runs.append(task.task_id)
        if task.task_id == "task-2":
            assert release.wait(WAIT_S)  # hangs until the test is done

    rig = ThreadRig(timer, stage, timeout_s=0.2)
    try:
        rig.teach_fast_calls()
        for call_id in (1, 2, 3):
            rig.pool.dispatch(call(call_id))
        rig.pool.flush()
        assert [done.call_id for done in rig.next_dones()] == [1]
        assert rig.pool.running(2)
        assert rig.deadlines.get(timeout=WAIT_S) == 2  # the second call's own deadline, armed when it became the head
        worker = rig.pool.worker_of(2)
        stranded = rig.pool.replace(worker)  # as the orchestrator does on a timeout
        assert stranded is not None
        assert [c.call_id for c in stranded] == [2, 3]
        release.set()
        late = rig.reports.get(timeout=WAIT_S)  # the hung call's result, once it returns, comes alone
        assert isinstance(late, ServiceDone)
        assert late.call_id == 2
        assert rig.pool.finished(late.call_id) is None  # no longer the pool's: a late result
        assert runs[-2:] == ["task-1", "task-2"]  # the retired worker did not go on to the third call
    finally:
        release.set()
        rig.close()


def test_a_deadline_that_fires_while_the_calls_report_is_held_back_with_a_batch_sends_it_and_charges_nothing(
    timer: Timer,
) -> None:
    release = threading.Event()
    runs: list[str] = []

    def stage(task: Task, value: Any) -> None:
        runs.append(task.task_id)
        if task.task_id == "task-2":
            assert release.wait(WAIT_S)  # runs on while the first call's report is held

    rig = ThreadRig(timer, stage, hold_s=60.0, timeout_s=0.2)  # held until the batch ends
    try:
        rig.teach_fast_calls()
        for call_id in (1, 2):
            rig.pool.dispatch(call(call_id))
        rig.pool.flush()
        assert rig.deadlines.get(timeout=WAIT_S) == 1  # the finished first call still looks like the head
        assert rig.pool.running(1)
        assert rig.pool.answered(1)  # as the orchestrator asks before charging a timeout
        assert [done.call_id for done in rig.next_dones()] == [1]  # sent at once, while the second call runs
        assert rig.pool.running(2)
        assert not rig.pool.answered(2)  # running, not answered: its deadline would be a real timeout
        release.set()
        assert [done.call_id for done in rig.next_dones()] == [2]
        assert runs[-2:] == ["task-1", "task-2"]  # each ran once, on the same worker: nobody was replaced
        assert rig.pool.stats()["restarts"] == 0
    finally:
        release.set()
        rig.close()


def test_a_worker_that_raises_when_sent_its_calls_is_reported_dead_so_that_its_calls_are_re_sent(
    timer: Timer,
) -> None:
    deaths: list[tuple[str, str]] = []
    backend = RecordingBackend()
    pool = ServicePool(
        "processor",
        1,
        backend=backend,
        fn=lambda task: {},
        deliver=lambda done: None,
        on_death=lambda name, why: deaths.append((name, why)),
        timer=timer,
        on_deadline=lambda call_id: None,
        stage_timeout_s=None,
        max_restarts=3,
        restart_window_s=60,
    )

    def refuse(call: RunService) -> bool:
        raise OSError("pipe closed")

    backend.workers[0].send = refuse  # type: ignore[method-assign]
    pool.dispatch(call(1))
    pool.flush()  # must not raise in the orchestrator's thread
    assert deaths == [("processor-1", "failed to take calls: OSError: pipe closed")]
    stranded = pool.replace("processor-1")
    assert stranded is not None
    assert [c.call_id for c in stranded] == [1]
