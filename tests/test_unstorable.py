"""A change the journal refuses for good fails its own task, never the journal.

A group commit that SQLite (or the encoder) refuses for a reason a retry cannot
cure (a row too big, a value that cannot be encoded, a constraint) is split
until the task that causes it is found: that task FAILS alone (or, for a
creation, is refused to its submitter), every other change of the batch is
committed, and every sender gets its answer. Here SQLite's own length limit is
lowered on the journal's connection, so that SQLite itself refuses a row of a
few hundred kilobytes (as it refuses one of a gigabyte by default).
"""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pykka
import pytest

from actorflow.actors import Runtime, StateActor
from actorflow.actors import state as state_module
from actorflow.actors.messages import TransitionBatch, TransitionOutcome, TransitionRequest, TransitionsApplied
from actorflow.core import (
    FrozenDict,
    JournalError,
    Pipeline,
    RuntimeConfig,
    Stage,
    Task,
    TaskNotFound,
    TaskState,
    UnstorableValue,
)
from actorflow.core.journal import Journal
from actorflow.services import seed_pipeline
from tests.conftest import MilestoneLog
from tests.value_stages import BIG_CHARS, too_big

S = TaskState
SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline, for a StateActor started by hand: its table is what these tests use."""
SQLITE_LIMIT = BIG_CHARS * 3 // 4
"""The lowered SQLite length limit: under what `too_big` returns, far over any other row."""


def _keep(task: Task, value: Any) -> None:
    """Hands the value on unchanged."""


def _lower_sqlite_limit(journal: Journal, limit: int = SQLITE_LIMIT) -> None:
    """Make SQLite refuse strings and rows longer than `limit` on this journal's connection."""
    connection = journal._connection
    assert connection is not None
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)


# --- through a runtime ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_value_sqlite_refuses_fails_only_its_own_task_and_every_other_task_and_submission_carries_on(
    tmp_path: Path, runtime_journals: list[Journal]
) -> None:
    pipeline = Pipeline("p", [Stage("make", too_big), Stage("keep", _keep, state="KEEPING")])
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"), max_value_bytes=4 * BIG_CHARS)
    milestones = MilestoneLog()
    with Runtime(config, pipelines=[pipeline], on_milestone=milestones) as runtime:
        _lower_sqlite_limit(runtime_journals[-1])
        payloads: list[dict[str, Any]] = [{"name": f"small-{n}", "n": n} for n in range(20)]
        payloads[7] = {"name": "big", "n": 7}  # its value alone is over SQLite's limit: the journal names it
        payloads[13] = {"name": "half", "n": 13, "pad": "x" * (BIG_CHARS // 2)}  # payload and value together
        handles = runtime.submit_many(payloads)
        records = [handle.result(timeout=30) for handle in handles]
        for index, fault in ((7, "column 'value' is 200"), (13, "string or blob too big")):
            bad = records[index]
            assert bad.state is S.FAILED
            assert bad.error is not None
            assert bad.error.startswith("the journal cannot store the task's change to KEEPING: ")
            assert fault in bad.error
            assert bad.path() == ["CREATED", "MAKE", "FAILED"]
            assert bad.value is None
            assert bad.calls == 1
        others = [record for index, record in enumerate(records) if index not in (7, 13)]
        assert [record.state for record in others] == [S.COMPLETED] * 18
        assert runtime.health()["status"] == "ok", "a refusal for good is no journal fault"
        assert milestones.count("journal.degraded") == 0
        assert milestones.count("journal.unstorable") == 2
        assert runtime.submit({"name": "after", "n": 99}).result(timeout=30).state is S.COMPLETED
    with Runtime(config, pipelines=[pipeline]) as reopened:
        assert reopened.get(handles[7].task_id).state is S.FAILED
        assert reopened.get(handles[13].task_id).state is S.FAILED
        assert reopened.stats()["COMPLETED"] == 19
        assert reopened.join(10)


@pytest.mark.timeout(60)
def test_a_creation_sqlite_refuses_is_refused_to_its_submitter_naming_it_and_nothing_else_is_held_up(
    tmp_path: Path, runtime_journals: list[Journal]
) -> None:
    pipeline = Pipeline("p", [Stage("keep", _keep)])
    config = RuntimeConfig(journal_path=str(tmp_path / "t.db"), max_value_bytes=4 * BIG_CHARS)
    with Runtime(config, pipelines=[pipeline]) as runtime:
        _lower_sqlite_limit(runtime_journals[-1])
        big = {"name": "big", "pad": "x" * BIG_CHARS}
        with pytest.raises(JournalError, match=r"cannot store task 'big-1'.*over SQLite's limit.*not created"):
            runtime.submit(big, task_id="big-1")
        with pytest.raises(TaskNotFound):
            runtime.get("big-1")
        with pytest.raises(JournalError, match=r"cannot store task 'big-2'.*nothing of the batch was created"):
            runtime.submit_many([{"name": "a"}, big, {"name": "b"}], task_ids=["a", "big-2", "b"])
        for task_id in ("a", "big-2", "b"):
            with pytest.raises(TaskNotFound):
                runtime.get(task_id)
        # A payload within SQLite's limit whose row is not: SQLite refuses the batch, which is split to name it.
        edge = {"name": "edge", "pad": "x" * (SQLITE_LIMIT - 30)}
        with pytest.raises(JournalError, match=r"cannot store task 'edge'.*string or blob too big.*nothing of the"):
            runtime.submit_many([{"name": "c"}, {"name": "d"}, edge, {"name": "e"}], task_ids=["c", "d", "edge", "e"])
        with pytest.raises(JournalError, match=r"cannot store task 'edge-2'.*string or blob too big.*not created"):
            runtime.submit(edge, task_id="edge-2")
        assert runtime.submit({"name": "after"}).result(timeout=30).state is S.COMPLETED
        assert runtime.health()["status"] == "ok"


# --- the state actor's answers --------------------------------------------------------------------


class _Collected:
    """The outcomes an `_Outcomes` actor was told; the test waits on them from its own thread."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.outcomes: list[TransitionOutcome] = []

    def wait_for(self, count: int) -> list[TransitionOutcome]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.outcomes) >= count, timeout=20)
            return list(self.outcomes)


class _Outcomes(pykka.ThreadingActor):
    """Stands in for an orchestrator: keeps every TransitionOutcome it is told."""

    def __init__(self, collected: _Collected) -> None:
        super().__init__()
        self.collected = collected

    def on_receive(self, message: Any) -> None:
        assert isinstance(message, TransitionsApplied)
        with self.collected.changed:
            self.collected.outcomes.extend(message.outcomes)
            self.collected.changed.notify_all()


@pytest.mark.timeout(60)
def test_two_culprits_in_one_batch_fail_alone_and_every_request_of_the_batch_gets_its_outcome(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    journal = Journal(path)
    _lower_sqlite_limit(journal)
    state_ref = StateActor.start(pipelines=[SEED], journal=journal)
    collected = _Collected()
    receiver = _Outcomes.start(collected)
    try:
        state = state_ref.proxy()
        ids = [f"t{n}" for n in range(12)]
        culprits = {"t3", "t8"}
        half = "x" * (SQLITE_LIMIT * 2 // 3)  # a payload and a value of this size fit alone, not together
        for task_id in ids:
            state.create(task_id, {"name": task_id, "pad": half if task_id in culprits else ""}).get(timeout=5)
        requests = tuple(
            TransitionRequest(task_id, S.VALIDATED, value={"v": half} if task_id in culprits else None)
            for task_id in ids
        )
        state_ref.tell(TransitionBatch(requests, reply_to=receiver))
        outcomes = collected.wait_for(len(ids))
        by_id = {outcome.request.task_id: outcome for outcome in outcomes}
        assert len(by_id) == len(ids), "one outcome per request"
        for task_id in ids:
            outcome = by_id[task_id]
            assert outcome.record is not None
            if task_id in culprits:
                assert outcome.outcome == "rejected"
                assert outcome.record.state is S.FAILED, "an outcome that finishes the task's flight"
                assert outcome.why is not None
                assert "string or blob too big" in outcome.why
            else:
                assert outcome.outcome == "accepted"
                assert outcome.record.state is S.VALIDATED
        assert state.transition("t0", S.PROCESSING).get(timeout=5).state is S.PROCESSING
    finally:
        state_ref.stop()
        receiver.stop()
    with Journal.open_readonly(path) as reader:
        states = {record.task_id: record.state for record in reader.records()}
    expected = {task_id: S.FAILED if task_id in culprits else S.VALIDATED for task_id in ids}
    assert states == {**expected, "t0": S.PROCESSING}


@pytest.mark.timeout(60)
def test_a_culprit_asked_for_through_the_proxy_raises_journal_error_and_its_task_is_failed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "t.db")
    _lower_sqlite_limit(journal)
    state_ref = StateActor.start(pipelines=[SEED], journal=journal)
    try:
        state = state_ref.proxy()
        state.create("t", {"name": "t"}).get(timeout=5)
        with pytest.raises(UnstorableValue, match=r"task 't' failed: .*column 'result' is \d+ bytes .*over SQLite's"):
            state.transition("t", S.VALIDATED, result={"v": "x" * BIG_CHARS}).get(timeout=5)
        record = state.get("t").get(timeout=5)
        assert record.state is S.FAILED
        assert record.result is None
    finally:
        state_ref.stop()


@pytest.mark.timeout(60)
def test_a_value_poisoned_behind_freezes_back_is_named_by_the_journal_and_fails_only_its_task(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "t.db")
    state_ref = StateActor.start(pipelines=[SEED], journal=journal)
    collected = _Collected()
    receiver = _Outcomes.start(collected)
    try:
        state = state_ref.proxy()
        for task_id in ("a", "b", "c"):
            state.create(task_id, {"name": task_id}).get(timeout=5)
        poisoned = FrozenDict(v=1.0)
        dict.__setitem__(poisoned, "v", math.nan)  # what no FrozenDict can hold, forced in by dict's own method
        requests = (
            TransitionRequest("a", S.VALIDATED),
            TransitionRequest("b", S.VALIDATED, value=poisoned),
            TransitionRequest("c", S.VALIDATED),
        )
        state_ref.tell(TransitionBatch(requests, reply_to=receiver))
        outcomes = {o.request.task_id: o for o in collected.wait_for(3)}
        assert {task_id: o.outcome for task_id, o in outcomes.items()} == {
            "a": "accepted",
            "b": "rejected",
            "c": "accepted",
        }
        why = outcomes["b"].why
        assert why is not None
        assert "column 'value'" in why
        assert "cannot be encoded" in why
        assert state.get("b").get(timeout=5).state is S.FAILED
    finally:
        state_ref.stop()
        receiver.stop()


@pytest.mark.timeout(60)
def test_a_transient_fault_after_a_culprit_is_set_aside_refuses_the_batch_whole_and_its_retry_fails_only_the_culprit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "t.db")
    _lower_sqlite_limit(journal)
    monkeypatch.setattr(state_module, "_JOURNAL_BACKOFF_S", (0.0, 0.0))  # the retry below may write at once
    writes = 0
    armed = False
    original = Journal.write_batch

    def write_batch(self: Journal, created: Any, changed: Any, keys: Any = ()) -> None:
        nonlocal writes
        writes += armed
        connection = self._connection
        assert connection is not None
        if writes == 2:  # the commit of the rest, once the culprit is set aside: interrupted (OperationalError)
            connection.set_progress_handler(lambda: 1, 1)
        try:
            original(self, created, changed, keys)
        finally:
            connection.set_progress_handler(None, 0)

    monkeypatch.setattr(Journal, "write_batch", write_batch)
    state_ref = StateActor.start(pipelines=[SEED], journal=journal)
    collected = _Collected()
    receiver = _Outcomes.start(collected)
    try:
        state = state_ref.proxy()
        for task_id in ("a", "b", "c"):
            state.create(task_id, {"name": task_id}).get(timeout=5)
        armed = True
        requests = (
            TransitionRequest("a", S.VALIDATED),
            TransitionRequest("b", S.VALIDATED, value={"v": "x" * BIG_CHARS}),
            TransitionRequest("c", S.VALIDATED),
        )
        state_ref.tell(TransitionBatch(requests, reply_to=receiver))
        first = collected.wait_for(3)
        assert {o.request.task_id: o.outcome for o in first} == dict.fromkeys("abc", "journal_failed")
        assert all(o.record is not None and o.record.state is S.CREATED for o in first), "nothing was kept"
        assert [state.get(task_id).get(timeout=5).state for task_id in "abc"] == [S.CREATED] * 3
        state_ref.tell(TransitionBatch(requests, reply_to=receiver))  # sent again, as the orchestrator does
        again = {o.request.task_id: o for o in collected.wait_for(6)[3:]}
        assert {task_id: o.outcome for task_id, o in again.items()} == {
            "a": "accepted",
            "b": "rejected",
            "c": "accepted",
        }
        record = again["b"].record
        assert record is not None
        assert record.state is S.FAILED
        assert record.path() == ["CREATED", "FAILED"]
    finally:
        state_ref.stop()
        receiver.stop()
