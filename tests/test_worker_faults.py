"""Workers that crash, exceptions that misbehave, values that cannot cross: each fails only its own task.

A pool that restarted its workers too often opens a circuit breaker: later
calls wait (uncharged) for its cool-down instead of failing, `health()` says
so meanwhile, and the stage recovers by itself. The stage functions live in
`tests.pipeline_stages`, so that the process backend can pickle them.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from typing import Any

import pytest

from actorflow import Pipeline, Stage
from actorflow.actors import Milestone, Runtime
from actorflow.actors.backends.process import ProcessBackend
from actorflow.actors.health import Health
from actorflow.actors.messages import ServiceDone
from actorflow.core import RuntimeConfig, Task, TaskState, WouldDeadlock
from tests import pipeline_stages as stages
from tests.conftest import MilestoneLog

S = TaskState

CRASHERS = {"thread": stages.crash_if_asked, "process": stages.crash_if_asked, "async": stages.crash_if_asked_async}


class HealthAtMilestones(MilestoneLog):
    """A MilestoneLog that also notes `runtime.health()` when a pool turns failing and when it recovers."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime: Runtime | None = None
        self.health: dict[str, list[dict[str, str]]] = {"pool.failing": [], "pool.recovered": []}

    def __call__(self, milestone: Milestone) -> None:
        if milestone.name in self.health and self.runtime is not None:
            self.health[milestone.name].append(self.runtime.health())
        super().__call__(milestone)


def one_stage(fn: Any, backend: str, workers: int = 2) -> list[Pipeline]:
    return [Pipeline("p", [Stage("s", fn, workers=workers, backend=backend)])]  # type: ignore[arg-type]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("backend", "crash"), [("thread", "exit"), ("async", "exit"), ("process", "os_exit")])
def test_tasks_that_crash_their_workers_past_max_restarts_fail_alone_and_the_stage_recovers_after_its_cool_down(
    backend: str, crash: str
) -> None:
    milestones = HealthAtMilestones()
    config = RuntimeConfig(
        max_restarts=3, restart_window_s=1.0, max_attempts=3, retry_backoff_s=0.0, retry_backoff_max_s=0.0
    )
    with Runtime(config, pipelines=one_stage(CRASHERS[backend], backend), on_milestone=milestones) as runtime:
        milestones.runtime = runtime
        poisoned = [runtime.submit({"crash": crash}) for _ in range(4)]
        assert milestones.wait_for("worker.restarted", count=4, timeout=30)  # past max_restarts: failing now
        during = runtime.submit({"n": 1})  # while the pool is failing (or just recovered): it waits, never fails
        for record in [handle.result(timeout=60) for handle in poisoned]:
            assert record.state is S.FAILED
            assert record.error is not None
            assert record.error.startswith("s: ")
            assert record.error.endswith("(gave up after 3 attempts)"), record.error  # charged like any failure
            assert record.calls == 3
        during_record = during.result(timeout=60)
        assert (during_record.state, during_record.result, during_record.calls) == (S.COMPLETED, {"n": 1}, 1)
        assert milestones.wait_for("pool.recovered", timeout=30), "the failing pool never recovered"
        later = runtime.submit({"n": 2}).result(timeout=60)
    assert (later.state, later.result, later.calls) == (S.COMPLETED, {"n": 2}, 1)
    failing = milestones.health["pool.failing"][0]
    assert failing["status"] == "degraded"
    assert "pool 's' is failing" in failing["reason"]
    assert milestones.health["pool.recovered"][0] == {"status": "ok"}


UNPRINTABLE = {
    "thread": stages.raise_unprintable,
    "process": stages.raise_unprintable,
    "async": stages.raise_unprintable_async,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", "async", "process"])
def test_an_exception_whose_str_raises_fails_only_its_task_once_and_costs_no_worker(backend: str) -> None:
    config = RuntimeConfig(max_restarts=1000, max_attempts=3)
    with Runtime(config, pipelines=one_stage(UNPRINTABLE[backend], backend)) as runtime:
        record = runtime.submit({"n": 1}).result(timeout=30)
        stats = runtime.stats()
    assert record.state is S.FAILED
    assert record.error == "s: Unprintable: Unprintable('the message nobody will read')"
    assert record.calls == 1
    assert record.traceback is not None
    assert "Unprintable" in record.traceback
    assert (stats["restarts"], stats["pools"]["s"]["failing"]) == (0, None)


def test_health_holds_a_reason_per_source_and_each_clears_on_its_own() -> None:
    health = Health()
    health.degrade("the journal refuses writes: disk full")
    health.degrade("pool 's' is failing: 4 worker restarts within 10s", source="pool 's'")
    assert health.snapshot() == (
        "degraded",
        "the journal refuses writes: disk full; pool 's' is failing: 4 worker restarts within 10s",
    )
    health.recover()  # the journal's write succeeded: the failing pool is still reported
    assert health.snapshot() == ("degraded", "pool 's' is failing: 4 worker restarts within 10s")
    health.degrade("the journal refuses writes: read-only", source="journal")
    health.recover(source="pool 's'")
    assert health.snapshot() == ("degraded", "the journal refuses writes: read-only")
    health.recover(source="journal")
    assert health.snapshot() == ("ok", None)
    assert health.fail("the journal file is gone")
    health.recover()
    assert health.snapshot() == ("failed", "the journal file is gone")  # failed never clears


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (
            stages.return_unpicklable,
            "s: TypeError: the value returned by stage 's' cannot be sent from the worker process to the runtime: "
            "Unpicklable values stay where they are",
        ),
        (
            stages.return_unreadable,
            "s: ValueError: the value returned by stage 's' cannot be read in the runtime's process: "
            "'stuck' cannot be rebuilt in this process",
        ),
    ],
)
def test_a_result_that_cannot_cross_from_a_worker_process_fails_only_its_task_once_and_the_worker_lives_on(
    fn: Any, why: str
) -> None:
    config = RuntimeConfig(max_attempts=3, retry_backoff_s=0.0)
    with Runtime(config, pipelines=one_stage(fn, "process", workers=1)) as runtime:
        record = runtime.submit({"n": 1}).result(timeout=30)
        stats = runtime.stats()
    assert (stats["restarts"], stats["retries"]) == (0, 0)
    assert record.calls == 1
    # The value is a str subclass. If `freeze` hands results on as plain builtins, it crosses as a str;
    # otherwise it cannot, and fails its own task, permanently. Never a restart or a retry.
    if record.state is S.COMPLETED:
        assert record.result == {"v": "stuck"}
        assert type(record.result["v"]) is str
    else:
        assert (record.state, record.error) == (S.FAILED, why)


def test_a_child_reports_a_result_it_cannot_pickle_as_a_permanent_failure_of_that_call() -> None:
    from actorflow.actors.backends.process import _encode_report  # noqa: PLC0415 - the child's side of the wire

    done = ServiceDone(7, "s", "t-7", "s-1", "ok", {"v": stages.Unpicklable("stuck")}, None, None, 1.5)  # type: ignore[dict-item]
    report = pickle.loads(_encode_report(done))
    assert report[:5] == (
        7,
        "permanent",
        None,
        "TypeError",
        "the value returned by stage 's' cannot be sent from the worker process to the runtime: "
        "Unpicklable values stay where they are",
    )
    assert report[5] == 1.5  # its duration is kept
    plain = pickle.loads(_encode_report(done._replace(result={"v": "fine"})))
    assert plain[:3] == (7, "ok", {"v": "fine"})


# --- async stages --------------------------------------------------------------------------------


def test_an_async_stages_own_cancelled_error_fails_its_task_with_its_message() -> None:
    async def gives_up(task: Task, value: Any) -> None:
        raise asyncio.CancelledError("the upstream stream went away")

    with Runtime(RuntimeConfig(), pipelines=[Pipeline("p", [Stage("s", gives_up)])]) as runtime:
        record = runtime.submit({"n": 1}).result(timeout=10)
        stats = runtime.stats()
    assert record.state is S.FAILED
    assert record.error == "s: CancelledError: the upstream stream went away"
    assert (record.calls, stats["retries"], stats["restarts"]) == (1, 0, 0)


def loop_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("actorflow-loop-")]


@pytest.mark.timeout(60)
def test_a_cancelled_coroutine_that_ignores_it_is_abandoned_after_the_grace_its_slot_freed_and_close_ends() -> None:
    entered = threading.Event()
    ignored = threading.Event()

    async def stubborn(task: Task, value: Any) -> dict[str, Any]:
        if value.get("stubborn"):
            entered.set()
            while True:  # swallows every cancellation: only abandoning it frees its slot
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    ignored.set()
        return {"n": value["n"]}

    before = set(loop_threads())
    runtime = Runtime(RuntimeConfig(), pipelines=[Pipeline("p", [Stage("s", stubborn, workers=1)])])
    try:
        handle = runtime.submit({"stubborn": True})
        assert entered.wait(10)
        assert handle.cancel()
        assert handle.result(timeout=10).state is S.CANCELLED
        assert ignored.wait(10)
        after = runtime.submit({"n": 2}).result(timeout=20)  # needs the only slot, held by the stubborn coroutine
        assert (after.state, after.result) == (S.COMPLETED, {"n": 2})
    finally:
        closer = threading.Thread(target=runtime.close, name="test-closer")
        closer.start()
        closer.join(30)
    assert not closer.is_alive(), "close() waited on a coroutine that ignores cancellation"
    assert [thread for thread in loop_threads() if thread not in before] == [], "the loop's thread outlived close()"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("what", ["await handle", "handle.result()", "runtime.get()"])
def test_waiting_or_blocking_inside_an_async_stage_raises_would_deadlock_at_once_saying_what_to_do(what: str) -> None:
    holder: dict[str, Runtime] = {}
    raised: list[WouldDeadlock] = []

    async def follows_up(task: Task, value: Any) -> dict[str, Any]:
        if not value.get("first"):
            return {"follow_up": True}
        runtime = holder["runtime"]
        try:
            if what == "runtime.get()":
                runtime.get(task.task_id)
            else:
                handle = await runtime.submit_async({"first": False})  # needs this stage's only slot: ours
                await handle if what == "await handle" else handle.result(timeout=20)
        except WouldDeadlock as exc:
            raised.append(exc)
            raise
        return {"waited": True}

    pipeline = Pipeline("p", [Stage("s", follows_up, workers=1)])
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        holder["runtime"] = runtime
        record = runtime.submit({"first": True}).result(timeout=20)
        assert runtime.join(20)
    assert record.state is S.FAILED
    assert record.error is not None
    assert record.error.startswith("s: WouldDeadlock: ")
    (refusal,) = raised
    text = str(refusal)
    assert "inside an async stage, on the event loop thread 'actorflow-loop-" in text
    assert "subscriber" not in text
    if what == "runtime.get()":
        assert "stalling every coroutine of that loop" in text
        assert "asyncio.to_thread" in text
    else:
        assert "it waits for a task to finish" in text
        assert "would deadlock" in text


# --- closing ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_runtime_closes_its_backends_on_the_thread_that_closes_it_never_on_a_central_actors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed_on: list[str] = []
    close = ProcessBackend.close

    def noting_where(backend: ProcessBackend, timeout: float = 2.5) -> None:
        closed_on.append(threading.current_thread().name)
        close(backend, timeout)

    monkeypatch.setattr(ProcessBackend, "close", noting_where)
    with Runtime(RuntimeConfig(), pipelines=one_stage(stages.crash_if_asked, "process", workers=1)) as runtime:
        assert runtime.submit({"n": 1}).result(timeout=30).state is S.COMPLETED
    assert closed_on == [threading.current_thread().name]


def test_a_milestone_listener_raising_an_exception_whose_str_raises_harms_no_task() -> None:
    def listener(milestone: Milestone) -> None:
        raise stages.Unprintable("the listener's bug")

    config = RuntimeConfig(retry_backoff_s=0.0)
    with Runtime(config, pipelines=one_stage(stages.crash_if_asked, "thread"), on_milestone=listener) as runtime:
        crashed = runtime.submit({"crash": "exit"}).result(timeout=10)  # restarts and retries: milestones
        record = runtime.submit({"n": 5}).result(timeout=10)
    assert (crashed.state, crashed.error) == (S.FAILED, "s: SystemExit: boom (gave up after 3 attempts)")
    assert (record.state, record.result) == (S.COMPLETED, {"n": 5})
