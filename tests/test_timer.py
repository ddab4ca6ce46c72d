"""The Timer, driven by an injected clock: due order, cancel, stop, errors, and a bounded heap."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from actorflow.actors.timer import _PRUNE_AT, Timer


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def errors() -> list[BaseException]:
    return []


@pytest.fixture
def timer(clock: ManualClock, errors: list[BaseException]) -> Iterator[Timer]:
    timer = Timer(name="actorflow-test-timer", clock=clock, on_error=errors.append)
    yield timer
    timer.stop()


def _advance(timer: Timer, clock: ManualClock, seconds: float) -> None:
    clock.now += seconds
    timer.wake()


def _recorder(log: list[str], name: str, done: threading.Event | None = None) -> Callable[[], None]:
    def callback() -> None:
        log.append(name)
        if done is not None:
            done.set()

    return callback


def test_callbacks_run_only_once_due_and_in_due_order_ties_in_scheduling_order(
    timer: Timer, clock: ManualClock
) -> None:
    ran: list[str] = []
    at_five = threading.Event()
    timer.call_later(10, _recorder(ran, "ten"))
    timer.call_later(5, _recorder(ran, "five-a"))
    timer.call_later(5, _recorder(ran, "five-b", at_five))
    _advance(timer, clock, 5)
    assert at_five.wait(5)
    # "ten" is not due: with the clock standing still it cannot run, whatever the scheduling.
    assert ran == ["five-a", "five-b"]
    at_ten = threading.Event()
    timer.call_later(0, _recorder(ran, "now", at_ten))
    assert at_ten.wait(5)
    assert ran == ["five-a", "five-b", "now"]
    _advance(timer, clock, 5)
    done = threading.Event()
    timer.call_later(0, _recorder(ran, "end", done))
    assert done.wait(5)
    assert ran == ["five-a", "five-b", "now", "ten", "end"]


def test_a_cancelled_callback_never_runs(timer: Timer, clock: ManualClock) -> None:
    ran: list[str] = []
    handle = timer.call_later(1, _recorder(ran, "cancelled"))
    done = threading.Event()
    timer.call_later(2, _recorder(ran, "kept", done))
    handle.cancel()
    _advance(timer, clock, 2)
    assert done.wait(5)
    assert ran == ["kept"]


def test_a_callback_that_raises_is_reported_and_the_timer_keeps_running(
    timer: Timer, clock: ManualClock, errors: list[BaseException]
) -> None:
    def explode() -> None:
        raise RuntimeError("boom")

    ran: list[str] = []
    done = threading.Event()
    timer.call_later(1, explode)
    timer.call_later(1, _recorder(ran, "after", done))
    _advance(timer, clock, 1)
    assert done.wait(5)
    assert [repr(e) for e in errors] == ["RuntimeError('boom')"]
    assert ran == ["after"]


def test_stop_drops_callbacks_not_yet_due(clock: ManualClock) -> None:
    ran: list[str] = []
    timer = Timer(name="actorflow-test-timer", clock=clock)
    timer.call_later(1, _recorder(ran, "never"))
    timer.stop()
    clock.now += 10
    timer.wake()
    assert ran == []
    assert len(timer) == 0


def test_cancelled_entries_are_pruned_so_the_heap_stays_bounded(timer: Timer) -> None:
    # A stage deadline per call, cancelled when the call returns in time: the common case.
    for _ in range(20_000):
        timer.call_later(30, lambda: None).cancel()
    assert len(timer) <= _PRUNE_AT
    live = [timer.call_later(60, lambda: None) for _ in range(100)]
    handles = [timer.call_later(30, lambda: None) for _ in range(10_000)]
    for handle in handles:
        handle.cancel()
    assert len(timer) <= 2 * len(live) + _PRUNE_AT
    for handle in live:
        handle.cancel()
    assert len(timer) <= _PRUNE_AT


def test_pruning_keeps_every_live_callback_and_its_order(timer: Timer, clock: ManualClock) -> None:
    ran: list[str] = []
    done = threading.Event()
    keep = set(range(0, 1000, 7))
    handles = [timer.call_later(1 + index / 1000, _recorder(ran, str(index))) for index in range(1000)]
    for index, handle in enumerate(handles):
        if index not in keep:
            handle.cancel()
    timer.call_later(5, done.set)
    _advance(timer, clock, 5)
    assert done.wait(5)
    assert ran == [str(index) for index in sorted(keep)]


@pytest.mark.parametrize("delay", [1e10, float("inf")], ids=["1e10s", "inf"])
def test_a_delay_longer_than_a_thread_can_wait_neither_ends_the_thread_nor_stops_later_callbacks(
    timer: Timer, clock: ManualClock, errors: list[BaseException], delay: float
) -> None:
    ran: list[str] = []
    done = threading.Event()
    timer.call_later(delay, _recorder(ran, "far"))  # threading waits overflow past TIMEOUT_MAX (~9.2e9 s)
    timer.call_later(1, _recorder(ran, "soon", done))
    _advance(timer, clock, 1)
    assert done.wait(5)
    assert ran == ["soon"]
    assert errors == []


class FlakyClock(ManualClock):
    """A clock whose next reading on the timer's thread raises, once `fail_next` is set (then it works again)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    def __call__(self) -> float:
        if self.fail_next and threading.current_thread().name == "actorflow-test-timer":
            self.fail_next = False
            raise OSError("clock unavailable")
        return self.now


def test_an_exception_outside_any_callback_is_reported_and_the_timer_keeps_running() -> None:
    clock = FlakyClock()
    errors: list[BaseException] = []
    timer = Timer(name="actorflow-test-timer", clock=clock, on_error=errors.append)
    try:
        ran: list[str] = []
        done = threading.Event()
        clock.fail_next = True
        timer.wake()  # the thread reads the clock: it raises there, in no callback
        timer.call_later(0, _recorder(ran, "after", done))
        assert done.wait(5)
        assert ran == ["after"]
        assert [repr(e) for e in errors] == ["OSError('clock unavailable')"]
    finally:
        timer.stop()
