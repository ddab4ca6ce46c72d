"""The StateActor: the single owner of task state, checked against the transition table."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from actorflow.actors import StateActor
from actorflow.actors.messages import CreateTask
from actorflow.core import (
    ConfigError,
    InvalidPayload,
    InvalidTransition,
    Pipeline,
    Stage,
    TaskNotFound,
    TaskState,
    TransitionEvent,
)
from actorflow.core.journal import Journal
from actorflow.core.tracing import new_trace
from actorflow.services import seed_pipeline

S = TaskState
SEED = seed_pipeline(persist=lambda task, result: None)
"""The seed pipeline: its table is the one these tests check the StateActor against."""


@pytest.fixture
def state() -> Iterator[Any]:
    ref = StateActor.start(pipelines=[SEED])
    yield ref.proxy()
    ref.stop()


def test_create_makes_a_created_record_with_one_history_entry(state: Any) -> None:
    record = state.create("t1", {"name": "a", "data": [1]}).get(timeout=5)
    assert record.state is S.CREATED
    assert record.payload == {"name": "a", "data": (1,)}
    assert record.path() == ["CREATED"]
    assert state.get("t1").get(timeout=5) == record


def test_an_accepted_transition_is_appended_to_history_with_time_and_reason(state: Any) -> None:
    state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    record = state.transition("t1", S.VALIDATED, reason="looks fine").get(timeout=5)
    assert record.state is S.VALIDATED
    last = record.history[-1]
    assert (last.from_state, last.to_state, last.reason) == (S.CREATED, S.VALIDATED, "looks fine")
    assert last.at >= record.created_at
    assert record.updated_at == last.at


def test_a_forbidden_transition_raises_through_the_future_and_changes_nothing(state: Any) -> None:
    before = state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    with pytest.raises(InvalidTransition, match="cannot go from CREATED to COMPLETED"):
        state.transition("t1", S.COMPLETED).get(timeout=5)
    assert state.get("t1").get(timeout=5) == before
    # the actor keeps running
    assert state.transition("t1", "VALIDATED").get(timeout=5).state is S.VALIDATED


def test_a_transition_whose_expected_state_differs_is_refused(state: Any) -> None:
    state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    state.transition("t1", S.VALIDATED).get(timeout=5)
    with pytest.raises(InvalidTransition, match="not the expected CREATED"):
        state.transition("t1", S.FAILED, expected=S.CREATED).get(timeout=5)
    assert state.get("t1").get(timeout=5).state is S.VALIDATED


def test_nothing_leaves_a_terminal_state(state: Any) -> None:
    state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    state.transition("t1", S.FAILED, error="boom").get(timeout=5)
    for target in TaskState:
        with pytest.raises(InvalidTransition):
            state.transition("t1", target).get(timeout=5)


def test_unknown_ids_raise_task_not_found(state: Any) -> None:
    with pytest.raises(TaskNotFound, match="nope"):
        state.get("nope").get(timeout=5)
    with pytest.raises(TaskNotFound):
        state.transition("nope", S.VALIDATED).get(timeout=5)


def test_a_duplicate_id_or_a_non_json_payload_is_refused(state: Any) -> None:
    state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    with pytest.raises(InvalidPayload, match="already taken"):
        state.create("t1", {"name": "b", "data": 2}).get(timeout=5)
    with pytest.raises(InvalidPayload, match="set"):
        state.create("t2", {"data": {1, 2}}).get(timeout=5)


def test_an_unknown_state_name_is_refused_listing_the_allowed_ones(state: Any) -> None:
    state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    with pytest.raises(InvalidTransition, match="allowed: CREATED, VALIDATED"):
        state.transition("t1", "DONE").get(timeout=5)


def test_list_and_counts_see_every_task_by_state(state: Any) -> None:
    for index in range(5):
        state.create(f"t{index}", {"name": "a", "data": index}).get(timeout=5)
    state.transition("t0", S.FAILED).get(timeout=5)
    state.transition("t1", S.VALIDATED).get(timeout=5)
    assert [r.task_id for r in state.list().get(timeout=5)] == [f"t{i}" for i in range(5)]
    assert [r.task_id for r in state.list(S.FAILED).get(timeout=5)] == ["t0"]
    assert [r.task_id for r in state.list("CREATED", limit=2, offset=1).get(timeout=5)] == ["t3", "t4"]
    counts = state.counts().get(timeout=5)
    assert counts == {"CREATED": 3, "VALIDATED": 1, "PROCESSING": 0, "COMPLETED": 0, "FAILED": 1, "CANCELLED": 0}


def test_subscribers_get_every_accepted_transition_and_a_failing_one_harms_nobody(state: Any) -> None:
    seen: list[TransitionEvent] = []
    state.subscribe(seen.append).get(timeout=5)

    def broken(event: TransitionEvent) -> None:
        raise SystemExit("a subscriber that exits")

    state.subscribe(broken).get(timeout=5)
    state.create("t1", {"name": "a", "data": 1}).get(timeout=5)
    state.transition("t1", S.VALIDATED).get(timeout=5)
    with pytest.raises(InvalidTransition):
        state.transition("t1", S.COMPLETED).get(timeout=5)
    assert [(e.from_state, e.to_state) for e in seen] == [(None, S.CREATED), (S.CREATED, S.VALIDATED)]
    assert seen[-1].record.state is S.VALIDATED
    assert state.get("t1").get(timeout=5).state is S.VALIDATED


@pytest.mark.timeout(60)
def test_under_contention_exactly_one_of_eight_racing_threads_wins_each_transition() -> None:
    ref = StateActor.start(pipelines=[SEED])
    proxy = ref.proxy()
    tasks = [f"t{i}" for i in range(200)]
    for task_id in tasks:
        proxy.create(task_id, {"name": "a", "data": 1}).get(timeout=5)
    targets = [S.VALIDATED, S.FAILED, S.CANCELLED, S.VALIDATED, S.FAILED, S.CANCELLED, S.VALIDATED, S.FAILED]
    barrier = threading.Barrier(len(targets))
    wins: list[list[str]] = [[] for _ in targets]
    errors: list[BaseException] = []

    def racer(index: int) -> None:
        own = ref.proxy()  # each thread its own proxy, as separate callers would have
        try:
            for task_id in tasks:
                barrier.wait(timeout=10)
                try:
                    own.transition(task_id, targets[index], expected=S.CREATED).get(timeout=10)
                    wins[index].append(task_id)
                except InvalidTransition:
                    pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    winners = [task_id for won in wins for task_id in won]
    assert sorted(winners) == sorted(tasks)  # every task won exactly once
    for record in proxy.list().get(timeout=5):
        assert len(record.history) == 2
        for entry in record.history[1:]:
            assert entry.from_state is not None
            assert SEED.is_allowed(entry.from_state, entry.to_state)
    ref.stop()


class StateActorMachine(RuleBasedStateMachine):
    """Random creates and transitions agree with a dict-and-table model."""

    @initialize()
    def start(self) -> None:
        self.ref = StateActor.start(pipelines=[SEED])
        self.proxy = self.ref.proxy()
        self.model: dict[str, TaskState] = {}

    @rule(task_id=st.sampled_from([f"t{i}" for i in range(6)]))
    def create(self, task_id: str) -> None:
        future = self.proxy.create(task_id, {"name": task_id, "data": None})
        if task_id in self.model:
            with pytest.raises(InvalidPayload):
                future.get(timeout=5)
        else:
            assert future.get(timeout=5).state is S.CREATED
            self.model[task_id] = S.CREATED

    @rule(
        task_id=st.sampled_from([f"t{i}" for i in range(6)]),
        to_state=st.sampled_from(list(TaskState)),
        use_expected=st.booleans(),
        expected=st.sampled_from(list(TaskState)),
    )
    def transition(self, task_id: str, to_state: TaskState, use_expected: bool, expected: TaskState) -> None:
        future = self.proxy.transition(task_id, to_state, expected=expected if use_expected else None)
        current = self.model.get(task_id)
        if current is None:
            with pytest.raises(TaskNotFound):
                future.get(timeout=5)
        elif (use_expected and expected is not current) or to_state not in SEED.transitions[current]:
            with pytest.raises(InvalidTransition):
                future.get(timeout=5)
        else:
            assert future.get(timeout=5).state is to_state
            self.model[task_id] = to_state

    @invariant()
    def agrees_with_the_model(self) -> None:
        if not hasattr(self, "proxy"):
            return
        records = {r.task_id: r for r in self.proxy.list().get(timeout=5)}
        assert {k: r.state for k, r in records.items()} == self.model
        for record in records.values():
            for entry in record.history[1:]:
                assert entry.from_state is not None
                assert SEED.is_allowed(entry.from_state, entry.to_state)

    def teardown(self) -> None:
        if hasattr(self, "ref"):
            self.ref.stop()


StateActorMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_the_state_actor_agrees_with_a_model_of_the_table = StateActorMachine.TestCase


def test_a_stopped_state_actor_refuses_further_requests(state: Any) -> None:
    ref = StateActor.start(pipelines=[SEED])
    ref.stop()
    with pytest.raises(pykka.ActorDeadError):
        ref.proxy()


def test_a_proxy_call_that_empties_the_mailbox_commits_what_was_held_for_group_commit(tmp_path: Any) -> None:
    blocked, release = threading.Event(), threading.Event()

    def slow_subscriber(event: TransitionEvent) -> None:
        if event.task_id == "first":
            blocked.set()
            release.wait(10)

    ref = StateActor.start(pipelines=[SEED], journal=Journal(str(tmp_path / "t.db")))
    state = ref.proxy()
    state.subscribe(slow_subscriber).get(timeout=5)
    first = pykka.ThreadingFuture()
    ref.tell(CreateTask("first", {"name": "a", "data": 1}, new_trace(), reply=first))
    assert blocked.wait(5)  # the actor is busy publishing "first"
    second = pykka.ThreadingFuture()
    ref.tell(CreateTask("second", {"name": "b", "data": 2}, new_trace(), reply=second))
    size = state.memory_size()  # queued right behind: the mailbox is not empty when "second" is applied
    release.set()
    assert size.get(timeout=5) == 2
    assert second.get(timeout=5).task_id == "second"  # committed by the proxy call's idle flush
    ref.stop()


def test_a_state_actor_is_given_its_pipelines_and_knows_no_table_of_its_own() -> None:
    with pytest.raises(TypeError, match="pipelines"):
        StateActor.start()  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="StateActor needs pipelines"):
        StateActor.start(pipelines=[])
    own = Pipeline("own", [Stage("check", lambda task, value: None)])
    ref = StateActor.start(pipelines=[own])
    try:
        state = ref.proxy()
        state.create("t1", {"x": 1}).get(timeout=5)
        with pytest.raises(
            InvalidTransition, match="VALIDATED is not a task state; allowed: CREATED, CHECK, COMPLETED"
        ):
            state.transition("t1", S.VALIDATED).get(timeout=5)  # the seed's state: not in this pipeline's table
        assert state.transition("t1", S("CHECK")).get(timeout=5).state is S("CHECK")
    finally:
        ref.stop()
