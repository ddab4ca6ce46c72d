"""The error tree: parents to catch a kind of failure, builtin bases kept, and each error where it is raised."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import actorflow
from actorflow import (
    ActorflowError,
    InvalidPayload,
    JournalError,
    Overloaded,
    Pipeline,
    Runtime,
    RuntimeConfig,
    RuntimeFailed,
    RuntimeNotAnswering,
    RuntimeStopped,
    RuntimeUnavailable,
    Stage,
    SubmissionRefused,
    Task,
    TaskState,
    TaskTimeout,
    TransitionEvent,
    UnknownPipeline,
    UnstorableValue,
    ValidationError,
    ValueTooLarge,
)
from actorflow.actors.runtime import callers
from actorflow.core import errors

S = TaskState


def _echo(task: Task, value: Any) -> Any:
    return value


def _own_pipeline(*stages: Stage) -> Pipeline:
    return Pipeline("own", stages or [Stage("echo", _echo)])


@pytest.mark.parametrize(
    ("error", "parents"),
    [
        (errors.TaskTimeout, (ActorflowError, TimeoutError)),
        (errors.RuntimeNotAnswering, (RuntimeUnavailable, ActorflowError, TimeoutError)),
        (errors.RuntimeStopped, (RuntimeUnavailable, ActorflowError)),
        (errors.RuntimeFailed, (RuntimeUnavailable, ActorflowError)),
        (errors.InvalidPayload, (SubmissionRefused, ActorflowError, ValueError)),
        (errors.ValidationError, (InvalidPayload, SubmissionRefused, ValueError)),
        (errors.ValueTooLarge, (InvalidPayload, SubmissionRefused, ValueError)),
        (errors.UnknownPipeline, (SubmissionRefused, ActorflowError, LookupError)),
        (errors.Overloaded, (SubmissionRefused, ActorflowError)),
        (errors.UnstorableValue, (JournalError, ActorflowError)),
        (errors.TaskNotFound, (ActorflowError, KeyError)),
    ],
)
def test_each_error_has_its_new_parent_and_keeps_every_base_it_had(error: type, parents: tuple[type, ...]) -> None:
    for parent in parents:
        assert issubclass(error, parent), (error, parent)


@pytest.mark.parametrize(
    ("error", "not_a"),
    [
        (JournalError, SubmissionRefused),  # the store's verdict, raised by reads and at start-up too
        (UnstorableValue, SubmissionRefused),
        (TaskTimeout, RuntimeUnavailable),  # only the wait ended: the runtime is well
        (Overloaded, RuntimeUnavailable),
    ],
)
def test_the_parents_hold_only_their_own_kind(error: type, not_a: type) -> None:
    assert not issubclass(error, not_a)


def test_every_error_of_the_tree_is_at_the_front_door_and_drawn_in_both_docstrings() -> None:
    names = [name for name in errors.__all__ if isinstance(getattr(errors, name), type)]
    for name in names:
        assert getattr(actorflow, name) is getattr(errors, name), name
        assert name in actorflow.__all__, name
        assert name in (errors.__doc__ or ""), name
        assert name in (actorflow.__doc__ or ""), name


@contextlib.contextmanager
def held_runtime(config: RuntimeConfig | None = None) -> Iterator[Runtime]:
    """A runtime of one stage that holds every task until the block ends."""
    gate = threading.Event()

    def held(task: Task, value: Any) -> Any:
        assert gate.wait(10)
        return value

    with Runtime(config, pipelines=[_own_pipeline(Stage("held", held))]) as runtime:
        try:
            yield runtime
        finally:
            gate.set()


def test_result_with_a_timeout_raises_task_timeout_a_timeout_error_and_the_task_runs_on() -> None:
    with held_runtime() as runtime:
        handle = runtime.submit({"x": 1})
        with pytest.raises(TimeoutError) as caught:  # what programs written for the builtin error catch
            handle.result(timeout=0.01)
    error = caught.value
    assert isinstance(error, TaskTimeout)
    assert isinstance(error, ActorflowError)
    assert (error.task_id, error.timeout) == (handle.task_id, 0.01)
    assert str(error) == (
        f"task {handle.task_id!r} is not terminal after 0.01s; it runs on: call result() again to wait more"
    )
    assert handle.result(timeout=10).state is S.COMPLETED  # the runtime drained it on close


def test_a_read_the_runtime_does_not_answer_in_time_raises_runtime_not_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(callers, "ASK_TIMEOUT_S", 0.2)
    holding, release = threading.Event(), threading.Event()

    def hold(event: TransitionEvent) -> None:
        # A subscriber runs on the state actor's thread: while it holds, the actor answers nothing.
        if event.to_state is S.CREATED and not holding.is_set():
            holding.set()
            release.wait(10)

    with Runtime(pipelines=[_own_pipeline()]) as runtime:
        runtime.subscribe(hold)
        handle = runtime.submit({"x": 1})
        assert holding.wait(10)
        try:
            with pytest.raises(RuntimeNotAnswering, match=r"the runtime did not answer within 0\.2s") as caught:
                runtime.get(handle.task_id)
        finally:
            release.set()
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, RuntimeUnavailable)
        assert handle.result(timeout=10).state is S.COMPLETED


def test_every_refusal_of_a_submission_is_caught_as_submission_refused() -> None:
    config = RuntimeConfig(max_in_flight=1, overload="reject", max_value_bytes=1024)
    refusals: list[type[SubmissionRefused]] = []
    with held_runtime(config) as runtime:
        first = runtime.submit({"x": 1})
        for submit in (
            lambda: runtime.submit({"x": 2}, pipeline="nope"),
            lambda: runtime.submit(["not", "a", "mapping"]),  # type: ignore[arg-type]
            lambda: runtime.submit({"x": "y" * 2000}),
            lambda: runtime.submit({"x": 3}),  # the one slot is taken
        ):
            with pytest.raises(SubmissionRefused) as caught:
                submit()
            refusals.append(type(caught.value))
        assert [record.payload for record in runtime.tasks()] == [{"x": 1}]  # the refused ones created nothing
    assert refusals == [UnknownPipeline, InvalidPayload, ValueTooLarge, Overloaded]
    assert first.result(timeout=10).state is S.COMPLETED


def test_a_closed_runtime_refuses_work_with_runtime_unavailable() -> None:
    runtime = Runtime(pipelines=[_own_pipeline()])
    runtime.close()
    with pytest.raises(RuntimeUnavailable) as caught:
        runtime.submit({"x": 1})
    assert type(caught.value) is RuntimeStopped
    assert not issubclass(RuntimeFailed, RuntimeStopped)  # siblings: a handler for one does not take the other


def test_the_seeds_validator_rejection_fails_the_task_and_names_its_error() -> None:
    with Runtime() as runtime:
        record = runtime.submit({"x": 21}).result(timeout=10)  # the seed's validator wants name and data
    assert record.state is S.FAILED
    assert record.error is not None
    assert record.error.startswith(f"validator: {ValidationError.__name__}: unexpected field(s) 'x'")
