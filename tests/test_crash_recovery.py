"""A crash never fails an acknowledged task, whatever the pipeline: after a restart it goes on where it was."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from actorflow import JournalError, Pipeline, Runtime, RuntimeConfig, Stage, TaskRecord, TaskState
from actorflow.core.journal import Journal
from actorflow.core.tracing import new_trace
from actorflow.core.types import FrozenDict, Transition, thaw
from tests import crash_child
from tests.journal_child import run_then_kill

S = TaskState


def _assert_history_follows(pipeline: Pipeline, record: TaskRecord) -> None:
    history = record.history
    assert history[0].from_state is None
    assert history[0].to_state is S.CREATED
    for previous, entry in itertools.pairwise(history):
        assert entry.from_state is previous.to_state, record
        assert pipeline.is_allowed(previous.to_state, entry.to_state), record
    assert record.state is history[-1].to_state


def _committed_in(journal: str, task_id: str, state: TaskState, value: object = None) -> None:
    """Write a task into a fresh journal as a crash would have left it: committed in `state`, nothing after."""
    trace = new_trace()
    created = Transition(None, S.CREATED, 1.0)
    history = (created,) if state is S.CREATED else (created, Transition(S.CREATED, state, 2.0))
    record = TaskRecord(
        task_id=task_id,
        state=state,
        payload=FrozenDict({"n": 1}),
        history=history,
        created_at=1.0,
        updated_at=history[-1].at,
        trace_id=trace.trace_id,
        span_id=trace.span_id,
        pipeline="p",
        value=value,  # type: ignore[arg-type]
    )
    with Journal(journal) as writer:
        writer.write_batch([record], [])


def _double(task: object, value: dict[str, int]) -> dict[str, int]:
    return {"n": value["n"] * 2}


def test_a_task_committed_in_created_resumes_through_a_pipeline_whose_first_stage_has_a_state_of_its_own(
    tmp_path: Path,
) -> None:
    journal = str(tmp_path / "tasks.db")
    _committed_in(journal, "t1", S.CREATED)
    pipeline = Pipeline("p", [Stage("work", _double)])
    with Runtime(RuntimeConfig(journal_path=journal), pipelines=[pipeline]) as runtime:
        record = runtime.handle("t1").result(timeout=10)
    assert record.state is S.COMPLETED, record.error
    assert record.result == {"n": 2}
    assert record.path() == ["CREATED", "WORK", "COMPLETED"]
    _assert_history_follows(pipeline, record)


# --- kill -9 at a random moment, across the shapes users build -----------------------------------

_SEEDS = range(12)


def _shape_and_mode(seed: int) -> tuple[str, str]:
    """Every shape with both ways of submitting, spread over the seeds."""
    shapes = crash_child.SHAPES
    return shapes[seed % len(shapes)], ("submit", "submit_many")[(seed // len(shapes)) % 2]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", _SEEDS)
def test_kill_minus_nine_at_a_random_moment_fails_no_acknowledged_task_of_a_users_pipeline(
    tmp_path: Path, seed: int
) -> None:
    shape, mode = _shape_and_mode(seed)
    journal = str(tmp_path / "tasks.db")
    count = 200  # far more than are acknowledged before the kill: the child is still busy when it lands
    rng = random.Random(seed)
    acks = run_then_kill(
        [journal, shape, mode, seed, count],
        prefix="acked ",
        kill_after=rng.randrange(5, 40),
        module="tests.crash_child",
    )
    acked = [words[0] for words in acks]
    assert acked
    pipeline = crash_child.pipeline(shape)
    with Journal.open_readonly(journal) as reader:
        before = {record.task_id: record for record in reader.records()}
    assert set(acked) <= set(before), "an acknowledged task is missing from the journal"
    # The reader lags the child: tasks acknowledged after the last line read count as much.
    caught = [record for record in before.values() if record.state not in (S.COMPLETED, S.FAILED, S.CANCELLED)]
    assert caught, "the kill caught no task in flight: the test proved nothing"

    with Runtime(RuntimeConfig(journal_path=journal), pipelines=[pipeline]) as runtime:
        assert runtime.join(timeout=60)
        records = {record.task_id: record for record in runtime.tasks()}
    for task_id in acked:
        record = records[task_id]
        n = int(task_id.removeprefix("t-"))
        assert record.state is S.COMPLETED, f"{shape}/{mode}: {task_id} is {record.state}: {record.error}"
        assert thaw(record.result) == crash_child.expected_result(shape, n), record
        _assert_history_follows(pipeline, record)
    # Tasks created but not yet acknowledged when the kill landed are all-or-nothing, and never failed either.
    assert all(record.state is S.COMPLETED for record in records.values())


def test_a_journal_with_unfinished_tasks_in_a_state_the_pipeline_no_longer_has_is_refused_untouched(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "tasks.db"
    _committed_in(str(journal), "t1", TaskState("RENAMED"), value={"n": 1})
    before = journal.read_bytes()
    pipeline = Pipeline("p", [Stage("work", _double)])
    with pytest.raises(JournalError, match=r"1 in 'RENAMED' \(pipeline 'p', whose states are .*WORK"):
        Runtime(RuntimeConfig(journal_path=str(journal)), pipelines=[pipeline])
    assert journal.read_bytes() == before
