"""Liveness under faults: every acknowledged task reaches a terminal state, whatever fails.

Journal faults (a failing write, a full disk, a deleted file), central actors
that stop, handlers that raise, and cancellations racing queued calls.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pykka
import pytest
import structlog
from structlog.testing import capture_logs

from actorflow.actors import OrchestratorActor, Runtime, StateActor
from actorflow.actors.health import LogThrottle
from actorflow.api import create_app, serve_in_background
from actorflow.core import JournalError, RuntimeConfig, RuntimeFailed, RuntimeStopped, Task, TaskState
from actorflow.core.journal import Journal, ownership
from actorflow.services import ServiceSet
from tests.conftest import MilestoneLog, actor_threads, payload
from tests.faults import Gate

S = TaskState
HERE = Path(__file__).resolve().parent


class FailingWrites:
    """`Journal.write_batch` raises sqlite3.OperationalError while `failing` is set, as on a full disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = threading.Event()
        self.failed = 0
        original = Journal.write_batch

        def write_batch(journal: Journal, created: Any, changed: Any, keys: Any = ()) -> None:
            if self.failing.is_set():
                self.failed += 1
                raise sqlite3.OperationalError("database or disk is full")
            original(journal, created, changed, keys)

        monkeypatch.setattr(Journal, "write_batch", write_batch)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> FailingWrites:
    return FailingWrites(monkeypatch)


def only(cls: type[pykka.Actor]) -> pykka.ActorRef[Any]:
    """The one running actor of `cls` (there is one runtime per test)."""
    refs = pykka.ActorRegistry.get_by_class(cls)
    assert len(refs) == 1, refs
    return refs[0]


# --- finding 1: a short journal write failure ----------------------------------------------------


def test_a_half_second_journal_write_failure_strands_no_acknowledged_task(
    tmp_path: Path, faults: FailingWrites
) -> None:
    gate = Gate()
    services = ServiceSet(validate=lambda payload: gate.wait_here())
    with (
        structlog.testing.capture_logs() as logs,
        Runtime(RuntimeConfig(journal_path=str(tmp_path / "t.db")), services=services) as runtime,
    ):
        handles = [runtime.submit(payload(i)) for i in range(200)]  # all acknowledged (committed)
        faults.failing.set()
        fault_window = threading.Timer(0.5, faults.failing.clear)  # the disk is full for 0.5 s
        fault_window.start()
        gate.opened.set()  # VALIDATED + PROCESSING of every task now meet the failing journal
        assert runtime.join(20), runtime.stats()
        fault_window.join()
        assert {handle.result(timeout=0).state for handle in handles} == {S.COMPLETED}
    # Backed off, not a 10 ms loop (it was 2,562 failed writes and ~150 log lines in 0.5 s).
    assert 1 <= faults.failed <= 20
    assert sum(1 for event in logs if event["event"] == "journal.write_failed") <= 20
    with Journal.open_readonly(str(tmp_path / "t.db")) as reader:
        assert reader.counts()["COMPLETED"] == 200


def test_while_the_journal_refuses_writes_submit_fails_fast_health_is_degraded_and_http_answers_503(
    tmp_path: Path, faults: FailingWrites
) -> None:
    gate = Gate()
    milestones = MilestoneLog()
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"))
    services = ServiceSet(process=gate.process)
    with (
        Runtime(config, services=services, on_milestone=milestones) as runtime,
        serve_in_background(create_app(runtime)) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        acked = runtime.submit(payload(0))
        assert gate.entered.wait(10)
        faults.failing.set()
        gate.opened.set()  # the acknowledged task's next commit meets the failing journal
        assert milestones.wait_for("journal.degraded")
        health = runtime.health()
        assert health["status"] == "degraded"
        assert "disk is full" in health["reason"]
        started = time.monotonic()
        for index in range(50):  # refused at once (mostly without touching the disk)
            with pytest.raises(JournalError, match="disk is full"):
                runtime.submit(payload(index))
        assert time.monotonic() - started < 2.0
        response = client.post("/tasks", json=payload(1))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "journal refuses writes" in response.json()["error"]
        healthz = client.get("/healthz")
        assert healthz.status_code == 200  # alive: it heals by itself, a probe must not restart it
        assert healthz.json()["status"] == "degraded"
        faults.failing.clear()  # the disk frees: the held transitions' next try commits, no restart
        assert milestones.wait_for("journal.recovered")
        assert acked.result(timeout=10).state is S.COMPLETED
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.post("/tasks", json=payload(2)).status_code == 201
        assert runtime.join(10)


FULL_DISK_CHILD = r"""
import json, resource, signal, sys, threading, time
import structlog
from actorflow import JournalError, Runtime, RuntimeConfig, ServiceSet, TaskState
from tests.conftest import MilestoneLog, actor_threads, payload
from tests.faults import Gate

journal = sys.argv[1]
gate = Gate()
milestones = MilestoneLog()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
out = {}
with structlog.testing.capture_logs() as logs:
    with Runtime(RuntimeConfig(journal_path=journal), services=ServiceSet(process=lambda task: gate.process(task)),
                 on_milestone=milestones) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(30)]
        assert gate.entered.wait(10)
        # The disk is full: no file may grow past the largest one now.
        import os
        limit = max(os.path.getsize(p) for p in (journal, journal + "-wal") if os.path.exists(p))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        gate.opened.set()
        out["degraded"] = milestones.wait_for("journal.degraded", timeout=20)
        out["health"] = runtime.health()
        started = time.monotonic()
        try:
            runtime.submit(payload(99))
            out["submit"] = "accepted"
        except JournalError as exc:
            out["submit"] = "JournalError: " + str(exc)
        out["submit_s"] = time.monotonic() - started
        # The disk stays full for six backoff steps: one log line each, at growing intervals.
        out["six_steps"] = milestones.wait_for("journal.retry_scheduled", 6, timeout=30)
        out["failed_lines"] = sum(1 for e in logs if e["event"] == "journal.write_failed")
        out["steps"] = [m.fields["step"] for m in milestones.seen if m.name == "journal.retry_scheduled"]
        out["delays"] = [m.fields["delay_s"] for m in milestones.seen if m.name == "journal.retry_scheduled"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # the disk frees
        out["joined"] = runtime.join(30)
        out["states"] = sorted({h.result(timeout=0).state.value for h in handles})
        out["health_after"] = runtime.health()
print(json.dumps(out))
"""


@pytest.mark.timeout(90)
def test_on_a_really_full_disk_the_runtime_degrades_quietly_and_completes_everything_once_it_frees(
    tmp_path: Path,
) -> None:
    root = HERE.parent
    child = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path / "t.db")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["degraded"], out
    assert out["health"]["status"] == "degraded", out
    assert out["submit"].startswith("JournalError"), out
    assert out["submit_s"] < 1.0, out
    assert out["six_steps"], out
    steps = out["steps"]
    assert steps[:6] == [1, 2, 3, 4, 5, 6], out
    assert out["failed_lines"] in (len(steps), len(steps) - 1), out  # one line per backoff step, never more
    delays = out["delays"]
    assert delays == sorted(delays), out  # backing off: each delay at least the one before
    assert out["joined"], out
    assert out["states"] == ["COMPLETED"], out
    assert out["health_after"] == {"status": "ok"}, out


def test_a_journal_file_deleted_while_running_stops_the_runtime_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    gate = Gate()
    milestones = MilestoneLog()
    runtime = Runtime(
        RuntimeConfig(journal_path=str(path)), services=ServiceSet(process=gate.process), on_milestone=milestones
    )
    try:
        handle = runtime.submit(payload(0))
        assert gate.entered.wait(10)
        path.unlink()
        gate.opened.set()  # the next commit finds the file gone
        with pytest.raises(RuntimeFailed, match="deleted"):
            handle.result(timeout=10)
        assert milestones.count("journal.lost") == 1
        with pytest.raises(RuntimeFailed, match="deleted"):
            runtime.submit(payload(1))
        with pytest.raises(RuntimeFailed):
            runtime.join(5)
        assert runtime.health()["status"] == "failed"
    finally:
        runtime.close(drain=False)


def test_a_deleted_lock_file_is_detected_before_anything_more_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sidecar lock file exists only where the database itself cannot be locked (no OFD locks).
    monkeypatch.setattr(ownership, "_OFD_LOCKS", False)
    path = tmp_path / "t.db"
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        runtime.submit(payload(0)).result(timeout=10)
        Path(f"{path}.lock").unlink()
        with pytest.raises(JournalError, match="lock file"):
            runtime.submit(payload(1))
        with pytest.raises(RuntimeFailed, match="lock file"):
            runtime.submit(payload(2))
        assert runtime.health()["status"] == "failed"


# --- finding 4: cancelled tasks' results are never persisted -------------------------------------


def test_persistence_calls_queued_at_a_worker_never_start_once_their_tasks_are_cancelled() -> None:
    gate = Gate()
    persisted: set[str] = set()
    milestones = MilestoneLog()

    def persist(task: Task, result: Mapping[str, Any]) -> None:
        if task.payload["name"] == "blocker":
            gate.wait_here()
        persisted.add(task.task_id)

    services = ServiceSet(persist=persist, workers={"persistence": 1})
    with Runtime(services=services, on_milestone=milestones) as runtime:
        warm_up = [runtime.submit(payload(i)) for i in range(64)]  # uniformly fast calls: a deep worker queue
        assert runtime.join(10)
        blocker = runtime.submit({"name": "blocker", "data": {}})
        assert gate.entered.wait(10)  # the only persistence worker is busy with it
        queued_before = milestones.count("call.queued")
        behind = [runtime.submit(payload(i)) for i in range(100, 124)]
        assert milestones.wait_for("call.queued", queued_before + len(behind))  # queued at the worker
        start = threading.Barrier(4)

        def cancel_every_fourth(offset: int) -> None:
            start.wait(10)
            for handle in behind[offset::4]:
                assert handle.cancel() is True

        threads = [threading.Thread(target=cancel_every_fourth, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        gate.opened.set()  # the worker moves on to the calls queued behind the blocker
        assert runtime.join(10)
        assert {h.result(timeout=0).state for h in behind} == {S.CANCELLED}
        assert blocker.result(timeout=0).state is S.COMPLETED
    assert {h.task_id for h in warm_up} <= persisted
    assert persisted & {h.task_id for h in behind} == set()  # CANCELLED was committed before any of them ran


def test_submissions_refused_by_a_full_disk_log_one_line_per_second_with_the_count_left_out(
    tmp_path: Path, faults: FailingWrites
) -> None:
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"))
    with capture_logs() as logs, Runtime(config) as runtime:
        runtime.submit(payload(0)).result(timeout=10)
        faults.failing.set()
        started = time.monotonic()
        for index in range(300):
            with pytest.raises(JournalError):
                runtime.submit(payload(index))
        with pytest.raises(JournalError):
            runtime.submit_many([payload(index) for index in range(3)])
        elapsed = time.monotonic() - started
        faults.failing.clear()
    lines = [e for e in logs if e["event"] in ("task.submit_refused", "tasks.submit_refused")]
    assert 1 <= len(lines) <= 2 + int(elapsed)  # one per second at most (it was one per refusal: 301)
    assert lines[0]["suppressed"] == 0
    assert sum(1 + line["suppressed"] for line in lines) <= 301  # each refusal logged or counted once


def test_a_log_throttle_lets_one_line_through_per_interval_and_counts_the_others() -> None:
    now = [100.0]
    throttle = LogThrottle(1.0, clock=lambda: now[0])
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(5)] == [None] * 5
    now[0] += 0.999
    assert throttle.allow() is None
    now[0] += 0.001
    assert throttle.allow() == 6  # the six left out since the last line
    now[0] += 5
    assert throttle.allow() == 0


# --- finding 5: a dead central actor --------------------------------------------------------------


def test_a_stopped_orchestrator_is_restarted_and_every_task_still_completes() -> None:
    gate = Gate()
    milestones = MilestoneLog()
    with Runtime(services=ServiceSet(process=gate.process), on_milestone=milestones) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(20)]
        assert gate.entered.wait(10)
        only(OrchestratorActor).stop()
        assert milestones.wait_for("orchestrator.restarted")
        later = [runtime.submit(payload(i)) for i in range(20, 30)]
        gate.opened.set()
        assert runtime.join(20), runtime.stats()
        assert {h.result(timeout=0).state for h in handles + later} == {S.COMPLETED}
        assert runtime.health() == {"status": "ok"}


def test_a_stopped_state_actor_with_a_journal_is_rebuilt_from_it_and_every_task_completes(tmp_path: Path) -> None:
    gate = Gate()
    milestones = MilestoneLog()
    events: list[str] = []
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"))
    with Runtime(config, services=ServiceSet(process=gate.process), on_milestone=milestones) as runtime:
        runtime.subscribe(lambda event: events.append(event.to_state.value))
        handles = [runtime.submit(payload(i)) for i in range(20)]
        assert gate.entered.wait(10)
        only(StateActor).stop()
        assert milestones.wait_for("state.restarted")
        later = [runtime.submit(payload(i)) for i in range(20, 30)]
        gate.opened.set()
        assert runtime.join(20), runtime.stats()
        assert {h.result(timeout=0).state for h in handles + later} == {S.COMPLETED}
        assert events.count("COMPLETED") >= 10  # the subscription moved to the new StateActor
    with Journal.open_readonly(str(tmp_path / "t.db")) as reader:
        assert reader.counts()["COMPLETED"] == 30


def test_a_stopped_state_actor_without_a_journal_fails_the_runtime_loudly() -> None:
    gate = Gate()
    runtime = Runtime(services=ServiceSet(process=gate.process))
    try:
        with serve_in_background(create_app(runtime)) as server, httpx.Client(base_url=server.url) as client:
            handle = runtime.submit(payload(0))
            assert gate.entered.wait(10)
            outcome: list[BaseException] = []

            def wait_for_result() -> None:
                try:
                    handle.result(timeout=20)
                except BaseException as exc:
                    outcome.append(exc)

            waiter = threading.Thread(target=wait_for_result)
            waiter.start()
            only(StateActor).stop()
            waiter.join(20)
            assert len(outcome) == 1
            assert isinstance(outcome[0], RuntimeFailed)
            assert "without a journal" in str(outcome[0])
            with pytest.raises(RuntimeFailed):
                runtime.join(5)
            with pytest.raises(RuntimeFailed):
                runtime.submit(payload(1))
            healthz = client.get("/healthz")
            assert healthz.status_code == 503
            assert healthz.json()["status"] == "failed"
            assert client.post("/tasks", json=payload(2)).status_code == 503
    finally:
        gate.opened.set()
        runtime.close(drain=False)


@pytest.fixture
def broken_advance(monkeypatch: pytest.MonkeyPatch) -> str:
    """The orchestrator's handler raises for the task whose payload is named "broken"."""
    original = OrchestratorActor._after_stage  # what a stage's success moves on to

    def after_stage(self: OrchestratorActor, flight: Any) -> None:
        if flight.task.payload["name"] == "broken":
            raise RuntimeError("a bug in a handler")
        original(self, flight)

    monkeypatch.setattr(OrchestratorActor, "_after_stage", after_stage)
    return "broken"


def test_an_exception_in_an_orchestrator_handler_fails_only_its_task_with_the_reason(broken_advance: str) -> None:
    with Runtime() as runtime:
        broken = runtime.submit({"name": broken_advance, "data": {}})
        others = [runtime.submit(payload(i)) for i in range(50)]
        record = broken.result(timeout=10)
        assert record.state is S.FAILED
        assert "a bug in a handler" in (record.error or "")
        assert {h.result(timeout=10).state for h in others} == {S.COMPLETED}


def test_an_exception_applying_one_transition_fails_that_task_and_not_the_rest_of_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = StateActor._apply_transition

    def apply(self: StateActor, request: Any, **kwargs: Any) -> None:
        if request.to_state is S.COMPLETED and self._records[request.task_id].payload["name"] == "broken":
            raise RuntimeError("a bug applying a change")
        original(self, request, **kwargs)

    monkeypatch.setattr(StateActor, "_apply_transition", apply)
    with Runtime() as runtime:
        broken = runtime.submit({"name": "broken", "data": {}})
        others = [runtime.submit(payload(i)) for i in range(50)]
        record = broken.result(timeout=10)
        assert record.state is S.FAILED  # refused while in flight: failed with the reason, not dropped
        assert "a bug applying a change" in (record.error or "")
        assert {h.result(timeout=10).state for h in others} == {S.COMPLETED}


# --- done means: chaos ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_chaos_journal_faults_and_central_actor_kills_at_random_moments_strand_no_acknowledged_task(
    tmp_path: Path, faults: FailingWrites
) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    path = tmp_path / "t.db"
    milestones = MilestoneLog()
    before = set(actor_threads())
    acked: list[str] = []
    refused: list[str] = []
    progress = threading.Condition()  # notified on every acknowledgement, and when submitting ends
    submitting = threading.Event()
    submitting.set()
    played: Counter[str] = Counter()
    config = RuntimeConfig(journal_path=str(path), max_in_flight=300)
    with Runtime(config, on_milestone=milestones) as runtime:

        def submit(offset: int) -> None:
            for index in range(offset, 4000, 2):
                while True:  # like a client: a refused submission is tried again once the runtime healed
                    recovered = milestones.count("journal.recovered")
                    restarted = milestones.count("state.restarted")
                    try:
                        # The same id on each try: had a refused one been created after all, the
                        # retry would raise InvalidPayload ("already taken") and fail the test.
                        handle = runtime.submit(payload(index), task_id=f"task-{index}")
                    except JournalError as exc:  # refused: never acknowledged
                        refused.append(f"JournalError: {exc}")
                        milestones.wait_for("journal.recovered", recovered + 1, timeout=10)
                        continue
                    except RuntimeStopped as exc:  # met a StateActor being replaced
                        refused.append(f"RuntimeStopped: {exc}")
                        milestones.wait_for("state.restarted", restarted + 1, timeout=10)
                        continue
                    break
                with progress:
                    acked.append(handle.task_id)
                    progress.notify_all()
            if offset == 0:
                with progress:
                    submitting.clear()
                    progress.notify_all()

        def acknowledged_after(count: int) -> bool:
            """Wait until `count` more tasks were acknowledged; False once submitting has ended."""
            with progress:
                target = len(acked) + count
                progress.wait_for(lambda: len(acked) >= target or not submitting.is_set(), timeout=30)
                return submitting.is_set()

        def play_chaos() -> None:
            # Faults strike at moments the runtime's own progress picks: after a random number of
            # acknowledged tasks; a full disk stays full for a random number of refused commits.
            while acknowledged_after(rng.randint(20, 120)):
                fault = rng.choice(["journal", "journal", "orchestrator", "state", "both"])
                played[fault] += 1
                if fault == "journal":
                    steps = milestones.count("journal.retry_scheduled")
                    faults.failing.set()
                    milestones.wait_for("journal.retry_scheduled", steps + rng.randint(1, 4), timeout=10)
                    faults.failing.clear()
                else:
                    kinds = {"orchestrator": [OrchestratorActor], "state": [StateActor]}.get(
                        fault,
                        rng.sample([OrchestratorActor, StateActor], 2),  # both, in a random order
                    )
                    refs = [ref for kind in kinds for ref in pykka.ActorRegistry.get_by_class(kind)]
                    for ref in refs:
                        ref.stop(block=False)
                    name = "orchestrator.restarted" if fault == "orchestrator" else "state.restarted"
                    expected = played["orchestrator"] if fault == "orchestrator" else played["state"] + played["both"]
                    assert milestones.wait_for(name, expected, timeout=30), (seed, name, played)

        threads = [threading.Thread(target=submit, args=(offset,)) for offset in (0, 1)]
        threads.append(threading.Thread(target=play_chaos))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert not any(thread.is_alive() for thread in threads), seed
        assert runtime.join(60), (seed, runtime.stats())
        records = {task_id: runtime.handle(task_id).result(timeout=0) for task_id in acked}
        assert runtime.health() == {"status": "ok"}, seed
    assert set(actor_threads()) - before == set(), seed  # no thread left behind
    assert {record.state for record in records.values()} == {S.COMPLETED}, seed
    assert min(played["orchestrator"], played["state"], played["journal"], played["both"]) >= 1, played
    with Journal.open_readonly(str(path)) as reader:
        stored = list(reader.iter_records())
    assert len(acked) == len(set(acked)) == 4000, (seed, len(acked), refused[:3])
    assert sorted(record.task_id for record in stored) == sorted(acked), seed  # nothing duplicated, nothing extra
    for record in stored:
        assert record.state is S.COMPLETED, (seed, record)
        states = record.path()
        assert states == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"], (seed, record)  # each change once
