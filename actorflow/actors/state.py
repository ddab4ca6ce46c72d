"""The StateActor: the one owner of task state.

Every change is a message through its mailbox, so changes are serialized.
Each request is checked against the transition table of the task's pipeline
(derived from the pipeline's stages, `core.pipeline`); a refused one changes
nothing. With a journal, changes are committed in groups: the actor
applies what waits in its mailbox, then commits once, and only then
acknowledges, replies and publishes (acknowledge after commit).

Journal faults are an operating state, not a loop. A refused commit rolls its
changes back and answers every sender: a creation's submitter gets the
`JournalError`, and each orchestrator gets all its refused transitions in
*one* `TransitionsApplied`, in order, so that it retries them as one batch
(VALIDATED and PROCESSING of a task are then committed together again, never
the second without the first). The actor then enters a capped exponential
backoff: until the next try is due, batches are refused at once without
touching the disk (so `submit()` fails fast and the log gets one line per
backoff step); the first commit that succeeds clears the fault
(`Health.degraded` -> ok). A journal whose file or lock file was deleted or
replaced (`WriterStore.lost`) is a failure for good: the runtime's `Health` fails.

A refusal that no retry can cure is not a journal fault, and it never stops the
journal: a value the journal cannot store (a row over its length limit, a broken
constraint) or the encoder cannot encode (`UnstorableValue`). The task at fault
is found (the journal names it when it can, else the batch is halved in trial
transactions that are rolled back), set aside, and the rest of the batch is
committed. A task changed at fault FAILS instead, through a FAILED change made
from its last committed record and a bounded reason (so it can be stored); the
senders of its refused changes get a "rejected" outcome carrying that FAILED
record, which ends the orchestrator's flight. A creation at fault is refused to
its submitter (a `submit_many` batch as a whole), naming the task. Errors and
reasons a record keeps are cut to `core.failures.MAX_MESSAGE_CHARS`.

The journal is a `WriterStore` (`core.journal.store`), this actor's alone: no
other thread calls it. A creation's Idempotency-Key (`CreateTask.idempotency_key`)
is committed in the same transaction as the task, so a key exists if and only if
its task does; a creation refused, or rolled back, leaves no key.

Who drives new tasks: a `CreateTask` without `notify` is announced to the
current *driver*, set by `adopt()`. Adopting a new orchestrator and reading
the non-terminal tasks it must resume is one message, so no creation can fall
between the two (the supervisor restarts a dead orchestrator this way).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pykka

from actorflow.actors.base import FastActor
from actorflow.actors.deadletters import DeadLetterOffice, tell_or_dead_letter
from actorflow.actors.health import Backoff, Health, Milestones
from actorflow.actors.messages import (
    CreateTask,
    CreateTasks,
    TasksCreated,
    TransitionBatch,
    TransitionOutcome,
    TransitionRequest,
    TransitionsApplied,
)
from actorflow.actors.threads import ThreadBook
from actorflow.core.errors import (
    ConfigError,
    InvalidPayload,
    InvalidTransition,
    JournalError,
    TaskNotFound,
    UnknownPipeline,
    UnstorableValue,
)
from actorflow.core.events import (
    JOURNAL_FAILED_IN_MEMORY_ONLY,
    JOURNAL_LOST,
    JOURNAL_RECOVERED,
    JOURNAL_UNSTORABLE,
    JOURNAL_WRITE_FAILED,
    MILESTONE_JOURNAL_DEGRADED,
    MILESTONE_JOURNAL_LOST,
    MILESTONE_JOURNAL_RECOVERED,
    MILESTONE_JOURNAL_RETRY_SCHEDULED,
    MILESTONE_JOURNAL_UNSTORABLE,
    STATE_CREATE_FAILED,
    STATE_ERROR,
    STATE_TRANSITION_FAILED,
    SUBSCRIBER_FAILED,
    TASK_TRANSITION,
    TASK_TRANSITION_REJECTED,
    TERMINAL_HOOK_FAILED,
)
from actorflow.core.failures import MAX_MESSAGE_CHARS, bound_message
from actorflow.core.journal.store import IdempotencyKey
from actorflow.core.pipeline import Pipeline
from actorflow.core.tracing import TraceContext, get_event_logger, new_trace
from actorflow.core.types import (
    TERMINAL_STATES,
    TaskRecord,
    TaskState,
    Transition,
    TransitionEvent,
    evolve,
    freeze,
    freeze_payload,
)

if TYPE_CHECKING:
    from actorflow.core.journal.store import Change, WriterStore

__all__ = ["StateActor", "Subscriber"]

Subscriber = Callable[[TransitionEvent], None]

_Changes = list["_Change"]
_Group = tuple["pykka.Future[tuple[TaskRecord, ...]]", int, int]
"""A `CreateTasks` reply waiting for the commit, with the slice of the pending changes it answers with."""
_Groups = list[tuple["pykka.Future[tuple[TaskRecord, ...]]", _Changes]]
"""The `CreateTasks` replies of a batch being committed, each with its changes."""
_Culprit = tuple[_Changes, "UnstorableValue"]
"""Changes the journal refuses for good, and its refusal."""
_Culprits = list[_Culprit]
_Units = list[_Changes]
_Outcomes = dict[int, tuple["pykka.ActorRef[Any]", list[TransitionOutcome]]]
"""Transition outcomes to send, by recipient: one `TransitionsApplied` each."""
_Records = list[TaskRecord]

_MAX_BATCH = 256
"""Commit at least this often even while the mailbox stays busy, to bound latency."""
_JOURNAL_BACKOFF_S = (0.01, 1.0)
"""First and largest delay between commit attempts while the journal refuses writes."""

_Table = Mapping[TaskState, frozenset[TaskState]]
_NO_TABLE: _Table = {}
"""The table of a pipeline the runtime does not define (its finished tasks may still be read): no moves."""


@dataclass(slots=True)
class _Change:
    """One applied but not yet committed change, with what it replaced (for rollback)."""

    record: TaskRecord
    before: TaskRecord | None
    transition: Transition
    reply: pykka.Future[Any] | None = None
    notify: pykka.ActorRef[Any] | None = None
    request: TransitionRequest | None = None
    stands_for: _Changes | None = None
    """Set on a FAILED change the actor made for a task whose own changes the journal refused for good:
    those changes (undone already), whose senders it answers once committed."""
    why: str | None = None
    """The reason of such a FAILED change."""
    key: tuple[str, str] | None = None
    """A creation's Idempotency-Key and payload fingerprint, committed with it."""


def _rows(changes: _Changes) -> tuple[_Records, list[Change], list[IdempotencyKey]]:
    """The arguments of `WriterStore.write_batch` for `changes`: creations, transitions, the creations' keys."""
    created = [change.record for change in changes if change.before is None]
    changed = [(change.record, change.transition) for change in changes if change.before is not None]
    keys = [
        IdempotencyKey(change.key[0], change.record.task_id, change.key[1])
        for change in changes
        if change.key is not None and change.before is None
    ]
    return created, changed, keys


def _units(changes: _Changes, groups: _Groups) -> _Units:
    """`changes` in the parts a refusal for good is settled by: each `submit_many` batch whole (all or
    none of it is created), and every other task's changes together, in order (a task fails as a whole)."""
    group_of = {id(change): index for index, (_, members) in enumerate(groups) for change in members}
    units: dict[object, _Changes] = {}
    for change in changes:
        group = group_of.get(id(change))
        key: object = change.record.task_id if group is None else ("group", group)
        units.setdefault(key, []).append(change)
    return list(units.values())


def _named_unit(units: _Units, failure: UnstorableValue) -> _Culprits:
    """The unit holding the task the journal named, if it named one in `units`."""
    if failure.task_id is not None:
        for unit in units:
            if any(change.record.task_id == failure.task_id for change in unit):
                return [(unit, failure)]
    return []


class StateActor(FastActor):
    """Owns every TaskRecord. Start with `StateActor.start()`; use its proxy or messages.

    Proxy methods (`create`, `transition`, `get`, `list`, `counts`) commit
    before they return. The runtime's hot path uses messages (`CreateTask`,
    `TransitionBatch`) and gets group commit.
    """

    def __init__(
        self,
        *,
        pipelines: Sequence[Pipeline],
        journal: WriterStore | None = None,
        retain_terminal: int | None = None,
        dead_letters: DeadLetterOffice | None = None,
        threads: ThreadBook | None = None,
        on_terminal: Callable[[TaskRecord], None] | None = None,
        on_transition: Callable[[TaskRecord, Transition], None] | None = None,
        clock: Callable[[], float] = time.time,
        health: Health | None = None,
        milestones: Milestones | None = None,
        on_exit: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(threads=threads)
        if not pipelines:
            raise ConfigError("StateActor needs pipelines: the transition table of each task is its pipeline's")
        self._tables: dict[str, _Table] = {pipeline.name: pipeline.transitions for pipeline in pipelines}
        """The transition table of each pipeline, by name; every request is checked against its task's."""
        known: dict[TaskState, None] = {}
        for table in self._tables.values():
            known.update(dict.fromkeys(table))
        self._states: tuple[TaskState, ...] = tuple(known)
        """Every state of every pipeline, in lifecycle order (pipeline after pipeline)."""
        self._health = health or Health()
        self._milestones = milestones or Milestones()
        self._on_exit = on_exit
        """Told why this actor stopped (requested or not): the runtime's supervisor decides what to do."""
        self._driver: pykka.ActorRef[Any] | None = None
        self._journal_fault: JournalError | None = None
        self._journal_backoff = Backoff(*_JOURNAL_BACKOFF_S)
        self._retry_at = 0.0
        self._on_terminal = on_terminal
        self._on_transition = on_transition
        """Called after each committed transition (the runtime's metrics); must be quick and not raise."""
        self._journal = journal
        self._retain = retain_terminal
        self._dead_letters = dead_letters or DeadLetterOffice()
        self._clock = clock
        self._records: dict[str, TaskRecord] = {}
        self._terminal_order: deque[str] = deque()
        self._counts: Counter[TaskState] = Counter()
        self._subscribers: dict[int, Subscriber] = {}
        self._next_subscriber = 0
        self._pending: _Changes = []
        self._groups: list[_Group] = []
        self._log = get_event_logger("state")
        if journal is not None:
            self._load(journal)

    # --- proxy API -------------------------------------------------------------------------------

    def create(
        self,
        task_id: str,
        payload: Mapping[str, Any],
        *,
        trace: TraceContext | None = None,
        pipeline: str | None = None,
    ) -> TaskRecord:
        """Create a task in CREATED, in `pipeline` (the first one known by default).

        Raises InvalidPayload for a duplicate id or a non-JSON payload, UnknownPipeline for an unknown pipeline.
        """
        try:
            frozen = freeze_payload(payload)
        except TypeError as exc:
            raise InvalidPayload(str(exc)) from None
        future: pykka.Future[TaskRecord] = pykka.ThreadingFuture()
        name = next(iter(self._tables)) if pipeline is None else pipeline
        self._apply_create(CreateTask(task_id, frozen, trace or new_trace(), reply=future, pipeline=name))
        self._flush()
        return future.get(timeout=0)

    def transition(
        self,
        task_id: str,
        to_state: TaskState | str,
        *,
        reason: str | None = None,
        expected: TaskState | str | None = None,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> TaskRecord:
        """Move a task to `to_state`; raises InvalidTransition or TaskNotFound and changes nothing."""
        request = TransitionRequest(
            task_id,
            self._as_state(to_state),
            reason=reason,
            expected=None if expected is None else self._as_state(expected),
            result=None if result is None else freeze(result, where="result"),
            error=error,
        )
        future: pykka.Future[TaskRecord] = pykka.ThreadingFuture()
        self._apply_transition(request, reply=future)
        self._flush()
        return future.get(timeout=0)

    def get(self, task_id: str) -> TaskRecord:
        """The task's current record. Raises TaskNotFound."""
        self._flush()
        record = self._lookup(task_id)
        if record is None:
            raise TaskNotFound(f"no task with id {task_id!r}")
        return record

    def list(self, state: TaskState | str | None = None, *, limit: int | None = None, offset: int = 0) -> _Records:
        """Records, oldest first, optionally only those in `state`, paged by limit/offset."""
        self._flush()
        wanted = None if state is None else self._as_state(state)
        if self._journal is not None and self._retain is not None:
            return self._journal.records(state=wanted, limit=limit, offset=offset)
        records = (r for r in self._records.values() if wanted is None or r.state is wanted)
        selected = list(records)[offset:]
        return selected if limit is None else selected[:limit]

    def counts(self) -> dict[str, int]:
        """How many tasks are in each state (every state named, zeros included)."""
        self._flush()
        counts = {state.value: self._counts.get(state, 0) for state in self._states}
        for state, count in self._counts.items():  # states of pipelines no longer defined, still on record
            if count and state.value not in counts:
                counts[state.value] = count
        return counts

    def memory_size(self) -> int:
        """How many records are held in memory (bounded by retain_terminal plus tasks in flight)."""
        return len(self._records)

    def non_terminal(self) -> _Records:
        """Every task not yet terminal (for recovery after a restart)."""
        return [record for record in self._records.values() if record.state not in TERMINAL_STATES]

    def adopt(self, driver: pykka.ActorRef[Any]) -> _Records:
        """Announce new tasks to `driver` from now on; returns every non-terminal task for it to resume.

        Pending changes are committed first (their announcements go to the
        previous driver, and the tasks are in the returned list either way).
        """
        self._flush()
        self._driver = driver
        return self.non_terminal()

    def subscribe(self, callback: Subscriber) -> int:
        """Call `callback(event)` after each committed transition, on this actor's thread. Returns a token."""
        self._next_subscriber += 1
        self._subscribers[self._next_subscriber] = callback
        return self._next_subscriber

    def unsubscribe(self, token: int) -> None:
        """Stop calling the subscriber registered under `token`."""
        self._subscribers.pop(token, None)

    # --- messages (the hot path) -----------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Apply creates and transition batches; commit when the mailbox runs dry."""
        try:
            self._receive(message)
        except Exception as exc:  # noqa: BLE001 - the one owner of state must outlive any bug in a message
            self._log.error(STATE_ERROR, error_type=type(exc).__name__, error=str(exc), message=type(message).__name__)

    def on_mailbox_idle(self) -> None:
        """Commit changes held back for group commit once nothing else is waiting."""
        if self._pending and self.actor_inbox.empty():
            self._flush()

    def _receive(self, message: Any) -> None:
        if isinstance(message, TransitionBatch):
            for request in message.requests:
                try:
                    self._apply_transition(request, notify=message.reply_to)
                except Exception as exc:  # noqa: BLE001 - one broken request must not cost the batch the rest
                    self._refuse_broken(request, message.reply_to, exc)
        elif isinstance(message, CreateTasks):
            try:
                self._apply_creates(message)
            except Exception as exc:  # noqa: BLE001 - the submitter gets the error; nothing was created
                self._log.error(STATE_CREATE_FAILED, tasks=len(message.tasks), error=repr(exc))
                if message.reply is not None:
                    message.reply.set_exception(exc_info=(type(exc), exc, None))
        elif isinstance(message, CreateTask):
            try:
                self._apply_create(message)
            except Exception as exc:  # noqa: BLE001 - the submitter gets the error; nothing was created
                self._log.error(STATE_CREATE_FAILED, task_id=message.task_id, error=repr(exc))
                if message.reply is not None:
                    message.reply.set_exception(exc_info=(type(exc), exc, None))
        else:
            self._dead_letters.post(message, to="state", why="unknown message type")
        # One commit covers everything that was waiting in the mailbox (group commit), up to _MAX_BATCH
        # changes. In memory too: the tasks created meanwhile then reach the orchestrator in one
        # TasksCreated, and their first calls each worker in one message. An empty mailbox (light load)
        # still acknowledges at once.
        if len(self._pending) >= _MAX_BATCH or self.actor_inbox.empty():
            self._flush()

    def on_stop(self) -> None:
        """Commit what is pending, close the journal, then tell the supervisor."""
        try:
            self._dead_letters.drain(self)
            self._flush()
        finally:
            if self._journal is not None:
                self._journal.close()
            if self._on_exit is not None:
                self._on_exit("stopped")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        """Never expected: handlers catch everything. Close the journal cleanly and tell the supervisor."""
        if self._journal is not None:
            self._journal.close()
        if self._on_exit is not None:
            self._on_exit(f"failed with {exception_type.__name__}: {exception_value}")

    def _refuse_broken(self, request: TransitionRequest, notify: pykka.ActorRef[Any] | None, exc: Exception) -> None:
        """A request whose handling raised: refuse it with the reason (its sender then fails the task)."""
        why = bound_message(f"internal error applying {request.to_state.value}: {type(exc).__name__}: {exc}")
        self._log.error(STATE_TRANSITION_FAILED, task_id=request.task_id, error=why)
        if notify is not None:
            self._reply_outcome(notify, TransitionOutcome(request, "rejected", self._records.get(request.task_id), why))

    # --- applying --------------------------------------------------------------------------------

    def _apply_create(self, message: CreateTask) -> None:
        if message.pipeline not in self._tables:
            unknown = UnknownPipeline(message.pipeline, list(self._tables))
            if message.reply is not None:
                message.reply.set_exception(exc_info=(UnknownPipeline, unknown, None))
            else:
                self._dead_letters.post(message, to="state", why=str(unknown))
            return
        if message.task_id in self._records or (
            self._journal is not None and self._retain is not None and self._journal.contains(message.task_id)
        ):
            error = InvalidPayload(f"task_id {message.task_id!r} is already taken; task ids must be unique")
            if message.reply is not None:
                message.reply.set_exception(exc_info=(InvalidPayload, error, None))
            return
        self._add_created(message)

    def _apply_creates(self, message: CreateTasks) -> None:
        """Create every task of `message` or, if any one is refused, none (its error names its index)."""
        refusal = self._refuse_creates(message.tasks)
        if refusal is not None:
            if message.reply is not None:
                message.reply.set_exception(exc_info=(type(refusal), refusal, None))
            else:
                self._dead_letters.post(message, to="state", why=str(refusal))
            return
        start = len(self._pending)
        try:
            for task in message.tasks:
                self._add_created(task)
        except BaseException:
            # Never expected after the checks; undo the part applied, so that the batch stays all or nothing.
            for change in self._pending[start:]:
                del self._records[change.record.task_id]
                self._counts[TaskState.CREATED] -= 1
            del self._pending[start:]
            raise
        if message.reply is not None:
            self._groups.append((message.reply, start, len(self._pending)))

    def _refuse_creates(self, tasks: tuple[CreateTask, ...]) -> Exception | None:
        """Why the batch `tasks` cannot be created (naming the first bad task by index), or None."""
        seen: dict[str, int] = {}
        check_journal = self._journal is not None and self._retain is not None
        for index, task in enumerate(tasks):
            if task.pipeline not in self._tables:
                return UnknownPipeline(task.pipeline, list(self._tables))
            earlier = seen.setdefault(task.task_id, index)
            if earlier != index:
                return InvalidPayload(
                    f"payloads[{index}]: task_id {task.task_id!r} is also the id of payloads[{earlier}]; "
                    "task ids must be unique; nothing was created"
                )
            if task.task_id in self._records or (
                check_journal and self._journal is not None and self._journal.contains(task.task_id)
            ):
                return InvalidPayload(
                    f"payloads[{index}]: task_id {task.task_id!r} is already taken; task ids must be unique; "
                    "nothing was created"
                )
        return None

    def _add_created(self, message: CreateTask) -> None:
        """Apply a creation that passed its checks (held for the next commit)."""
        now = self._clock()
        transition = Transition(None, TaskState.CREATED, now, None)
        record = TaskRecord(
            task_id=message.task_id,
            state=TaskState.CREATED,
            payload=message.payload,
            history=(transition,),
            created_at=now,
            updated_at=now,
            trace_id=message.trace.trace_id,
            span_id=message.trace.span_id,
            parent_span_id=message.trace.parent_span_id,
            pipeline=message.pipeline,
        )
        self._records[record.task_id] = record
        self._counts[TaskState.CREATED] += 1
        self._pending.append(
            _Change(record, None, transition, reply=message.reply, notify=message.notify, key=message.idempotency_key)
        )

    def _apply_transition(
        self,
        request: TransitionRequest,
        *,
        reply: pykka.Future[Any] | None = None,
        notify: pykka.ActorRef[Any] | None = None,
    ) -> None:
        before = self._lookup(request.task_id)
        refusal: Exception | None = None
        if before is None:
            refusal = TaskNotFound(f"no task with id {request.task_id!r}")
        else:
            why = None
            if request.expected is not None and before.state is not request.expected:
                why = f"is {before.state.value}, not the expected {request.expected.value}; nothing changed"
            elif request.to_state not in self._tables.get(before.pipeline, _NO_TABLE).get(before.state, ()):
                why = (
                    f"cannot go from {before.state.value} to {request.to_state.value}; "
                    f"allowed from {before.state.value}: {self._allowed_from(before)}"
                )
            if why is not None:
                refusal = InvalidTransition(
                    f"task {request.task_id!r} {why}",
                    task_id=request.task_id,
                    from_state=before.state.value,
                    to_state=request.to_state.value,
                )
        if refusal is not None:
            self._log.warning(
                TASK_TRANSITION_REJECTED,
                task_id=request.task_id,
                trace_id=before.trace_id if before else None,
                from_state=before.state.value if before else None,
                to_state=request.to_state.value,
                expected=request.expected.value if request.expected else None,
                why=str(refusal),
            )
            if reply is not None:
                reply.set_exception(exc_info=(type(refusal), refusal, None))
            if notify is not None:
                self._reply_outcome(notify, TransitionOutcome(request, "rejected", before, str(refusal)))
            return
        assert before is not None
        now = self._clock()
        # What a record keeps of an error or a reason is bounded, whoever sent it (an exception's message
        # may be of any length): cut with a marker saying how much, never refused.
        reason = request.reason
        if reason is not None and len(reason) > MAX_MESSAGE_CHARS:
            reason = bound_message(reason)
        error = request.error
        if error is not None and len(error) > MAX_MESSAGE_CHARS:
            error = bound_message(error)
        transition = Transition(before.state, request.to_state, now, reason)
        record = evolve(
            before,
            state=request.to_state,
            result=request.result if request.result is not None else before.result,
            error=error if error is not None else before.error,
            calls=request.calls if request.calls is not None else before.calls,
            retries=request.retries if request.retries is not None else before.retries,
            value=None
            if request.to_state in TERMINAL_STATES
            else (request.value if request.value is not None else before.value),
            traceback=request.traceback if request.traceback is not None else before.traceback,
            history=(*before.history, transition),
            updated_at=now,
        )
        self._records[record.task_id] = record
        self._counts[before.state] -= 1
        self._counts[record.state] += 1
        self._pending.append(_Change(record, before, transition, reply=reply, notify=notify, request=request))

    # --- committing ------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Commit the pending changes, then acknowledge, notify and publish them."""
        if not self._pending:
            return
        changes, self._pending = self._pending, []
        groups: _Groups = [(reply, changes[start:end]) for reply, start, end in self._groups]
        self._groups = []
        if self._journal is not None:
            changes, failure = self._store(changes, groups)
            if failure is not None:
                self._roll_back(changes, failure)
                for reply, _ in groups:
                    reply.set_exception(exc_info=(JournalError, failure, None))
                return
        for reply, members in groups:
            reply.set(tuple(change.record for change in members))
        verbose = self._log.enabled("debug")  # once per batch, not once per transition
        created: dict[int, tuple[pykka.ActorRef[Any], list[TaskRecord]]] = {}
        applied: dict[int, tuple[pykka.ActorRef[Any], list[TransitionOutcome]]] = {}
        for change in changes:
            record = change.record
            if change.stands_for is not None:
                self._answer_stood_for(change, applied)
                self._publish(change, verbose=verbose)
                continue
            if change.reply is not None:
                change.reply.set(record)
            notify = change.notify
            if notify is None and change.request is None:
                notify = self._driver  # a creation from the runtime: announce it to whoever drives tasks now
            if notify is not None:
                if change.request is None:
                    created.setdefault(id(notify), (notify, []))[1].append(record)
                else:
                    outcome = TransitionOutcome(change.request, "accepted", record)
                    applied.setdefault(id(notify), (notify, []))[1].append(outcome)
            self._publish(change, verbose=verbose)
        for ref, records in created.values():
            self._tell(ref, TasksCreated(tuple(records)))
        for ref, outcomes in applied.values():
            self._tell(ref, TransitionsApplied(tuple(outcomes)))
        if self._retain is not None:
            self._evict(changes)

    def _store(self, changes: _Changes, groups: _Groups) -> tuple[_Changes, JournalError | None]:
        """Commit `changes`: the changes committed (or to roll back), and None or the refusal.

        A refusal for good (`UnstorableValue`) names its task, or the batch is halved
        until the parts it refuses are found (`_refused_units`); each of those is set
        aside (`_set_aside`: its task fails, or its creation is refused) and the rest
        is committed. Any other refusal is the journal's fault: the batch is refused
        whole, and the journal backs off.
        """
        while changes:
            failure = self._commit(changes)
            if not isinstance(failure, UnstorableValue):
                return changes, failure
            units = _units(changes, groups)
            try:
                culprits = _named_unit(units, failure) or self._refused_units(units, failure)
            except JournalError as exc:  # the journal failed while the batch was split: its fault, not a task's
                return changes, self._fault(exc)
            if not culprits:
                # Refused whole, but no part of it alone: not one task's fault after all. Backed off and
                # retried as any fault (as a plain JournalError: the backoff must not split it again).
                return changes, self._fault(JournalError(str(failure)))
            changes = self._set_aside(changes, groups, culprits)
        return changes, None

    def _refused_units(self, units: _Units, failure: UnstorableValue) -> _Culprits:
        """The units that `failure` refused, found by halving: a half that passes a trial holds none.

        Each trial is a transaction that is rolled back (`WriterStore.check_batch`), at most about
        2·log2(units) of them per culprit; it happens only when a batch is refused for good.
        Raises JournalError if the journal fails otherwise meanwhile.
        """
        if len(units) == 1:
            return [(units[0], failure)]
        journal = self._journal
        assert journal is not None
        middle = len(units) // 2
        found: _Culprits = []
        for half in (units[:middle], units[middle:]):
            try:
                journal.check_batch(*_rows([change for unit in half for change in unit]))
            except UnstorableValue as refused:
                # One named by the journal is enough for now: the commit that follows finds any other.
                found += _named_unit(half, refused) or self._refused_units(half, refused)
        return found

    def _set_aside(self, changes: _Changes, groups: _Groups, culprits: _Culprits) -> _Changes:
        """Take the culprits' changes out of the batch; return what is left to commit.

        A culprit's changes are undone. A task created in it is refused to its submitter
        (a `submit_many` batch as a whole), with the journal's reason and the task's id.
        A task changed in it FAILS instead: a FAILED change made from its last committed
        record and a bounded reason, so storable, takes the changes' place and answers their
        senders once committed. If even that change is refused, the task fails in memory only.
        """
        refused = {id(change) for unit, _ in culprits for change in unit}
        kept = [change for change in changes if id(change) not in refused]
        for unit, failure in culprits:
            first = unit[0]
            task_id = failure.task_id or first.record.task_id
            if first.stands_for is not None:
                # Even the FAILED change made for it is refused (its row is gone, say): the task stays FAILED
                # here, and a restart resumes it from the journal. Every sender still gets its answer.
                self._log.error(JOURNAL_FAILED_IN_MEMORY_ONLY, task_id=task_id, fault=bound_message(failure.fault))
                self._answer_stood_for(first, None)
                continue
            self._undo(unit)
            if any(change.before is None for change in unit):
                task_id = self._refuse_creation(unit, groups, failure)
            else:
                kept.append(self._stand_in(unit, failure))
            self._log.error(JOURNAL_UNSTORABLE, task_id=task_id, fault=bound_message(failure.fault))
            self._milestones.emit(MILESTONE_JOURNAL_UNSTORABLE, task_id=task_id)
        return kept

    def _undo(self, changes: _Changes) -> None:
        """Restore memory to what it was before `changes` (newest first); tells nobody."""
        for change in reversed(changes):
            record = change.record
            self._counts[record.state] -= 1
            if change.before is None:
                del self._records[record.task_id]
            else:
                self._records[record.task_id] = change.before
                self._counts[change.before.state] += 1

    def _refuse_creation(self, unit: _Changes, groups: _Groups, failure: UnstorableValue) -> str:
        """Refuse a creation the journal cannot store (all of its `submit_many` batch, if it has one).

        Returns the id of the task at fault (named by the journal, or found by splitting the batch).
        """
        group = next(
            (index for index, (_, members) in enumerate(groups) if any(member is unit[0] for member in members)), None
        )
        task_id = failure.task_id
        if task_id is None and group is not None and len(unit) > 1:
            # Name the task in the batch, by splitting it too (trials only, on this rare path).
            with contextlib.suppress(JournalError):
                found = self._refused_units([[change] for change in unit], failure)
                task_id = found[0][0][0].record.task_id if found else None
        task_id = task_id or unit[0].record.task_id
        what = "nothing of the batch was created" if group is not None else "it was not created"
        error = UnstorableValue(
            f"the journal cannot store task {task_id!r}: {bound_message(failure.fault)}; {what}",
            task_id=task_id,
            fault=failure.fault,
        )
        if group is not None:
            reply, _ = groups.pop(group)
            reply.set_exception(exc_info=(UnstorableValue, error, None))
        for change in unit:
            if change.reply is not None:
                change.reply.set_exception(exc_info=(UnstorableValue, error, None))
            if change.notify is not None and change.request is not None:  # a change of the refused task
                outcome = TransitionOutcome(change.request, "rejected", None, str(error))
                self._reply_outcome(change.notify, outcome)
        return task_id

    def _stand_in(self, unit: _Changes, failure: UnstorableValue) -> _Change:
        """The FAILED change that takes the place of a task's refused changes (already undone)."""
        before = unit[0].before
        assert before is not None
        why = bound_message(
            f"the journal cannot store the task's change to {unit[0].record.state.value}: {failure.fault}"
        )
        last = unit[-1].record
        now = self._clock()
        transition = Transition(before.state, TaskState.FAILED, now, why)
        record = evolve(
            before,
            state=TaskState.FAILED,
            error=why,
            value=None,
            calls=last.calls,
            retries=last.retries,
            history=(*before.history, transition),
            updated_at=now,
        )
        self._records[record.task_id] = record
        self._counts[before.state] -= 1
        self._counts[TaskState.FAILED] += 1
        return _Change(record, before, transition, stands_for=unit, why=why)

    def _answer_stood_for(self, change: _Change, applied: _Outcomes | None) -> None:
        """Answer the senders of the changes a FAILED stand-in replaced: refused, the task failed."""
        assert change.stands_for is not None
        record = change.record
        error = UnstorableValue(
            f"task {record.task_id!r} failed: {change.why}", task_id=record.task_id, fault=change.why or ""
        )
        for original in change.stands_for:
            if original.reply is not None:
                original.reply.set_exception(exc_info=(UnstorableValue, error, None))
            if original.notify is not None and original.request is not None:
                outcome = TransitionOutcome(original.request, "rejected", record, change.why)
                if applied is None:
                    self._reply_outcome(original.notify, outcome)
                else:
                    applied.setdefault(id(original.notify), (original.notify, []))[1].append(outcome)

    def _commit(self, changes: _Changes) -> JournalError | None:
        """Write one batch; None when committed, else the refusal (see the module docstring: backoff).

        A refusal for good (`UnstorableValue`) is returned as it is, with no backoff: `_store` deals with it.
        """
        journal = self._journal
        assert journal is not None
        fault = self._journal_fault
        if fault is not None and (journal.lost is not None or time.monotonic() < self._retry_at):
            return fault  # in backoff: refused without touching the disk, and without a log line
        try:
            journal.write_batch(*_rows(changes))
        except UnstorableValue as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - whatever the journal raises, the batch is refused
            return self._fault(exc if isinstance(exc, JournalError) else JournalError(f"journal write failed: {exc!r}"))
        if fault is not None:
            self._journal_fault = None
            self._log.info(JOURNAL_RECOVERED, failed_steps=self._journal_backoff.steps)
            self._journal_backoff.reset()
            self._health.recover()
            self._milestones.emit(MILESTONE_JOURNAL_RECOVERED)
        return None

    def _fault(self, failure: JournalError) -> JournalError:
        """The journal refused a batch for a reason that may pass: back off (or fail the runtime if it is lost)."""
        journal = self._journal
        assert journal is not None
        self._journal_fault = failure
        if journal.lost is not None:
            self._log.error(JOURNAL_LOST, error=str(failure))
            self._milestones.emit(MILESTONE_JOURNAL_LOST, reason=journal.lost)
            self._health.fail(str(failure))
            return failure
        delay = self._journal_backoff.failed()
        self._retry_at = time.monotonic() + delay
        if self._journal_backoff.steps == 1:
            self._health.degrade(f"the journal refuses writes: {failure}")
            self._milestones.emit(MILESTONE_JOURNAL_DEGRADED, reason=str(failure))
        self._log.error(
            JOURNAL_WRITE_FAILED, step=self._journal_backoff.steps, retry_in_s=round(delay, 3), error=str(failure)
        )
        self._milestones.emit(MILESTONE_JOURNAL_RETRY_SCHEDULED, step=self._journal_backoff.steps, delay_s=delay)
        return failure

    def _roll_back(self, changes: _Changes, failure: JournalError) -> None:
        """Undo changes the journal refused, newest first, and tell their senders.

        Each sender of transitions gets all of its refused ones in one message,
        in order, to retry as one batch.
        """
        self._undo(changes)
        refused: dict[int, tuple[pykka.ActorRef[Any], list[TransitionOutcome]]] = {}
        for change in changes:
            for original in change.stands_for or (change,):
                if original.reply is not None:
                    original.reply.set_exception(exc_info=(JournalError, failure, None))
                if original.notify is not None and original.request is not None:
                    outcome = TransitionOutcome(original.request, "journal_failed", change.before, str(failure))
                    refused.setdefault(id(original.notify), (original.notify, []))[1].append(outcome)
        for ref, outcomes in refused.values():
            self._tell(ref, TransitionsApplied(tuple(outcomes)))

    def _publish(self, change: _Change, *, verbose: bool) -> None:
        record, transition = change.record, change.transition
        if self._on_transition is not None:
            self._on_transition(record, transition)
        if verbose:
            self._log.debug(
                TASK_TRANSITION,
                task_id=record.task_id,
                trace_id=record.trace_id,
                from_state=transition.from_state.value if transition.from_state else None,
                to_state=transition.to_state.value,
                reason=transition.reason,
                calls=record.calls,
                pipeline=record.pipeline,
            )
        if self._on_terminal is not None and record.state in TERMINAL_STATES:
            try:
                self._on_terminal(record)
            except Exception as exc:  # noqa: BLE001 - one bad waiter callback must not cost the batch its acks
                self._log.error(TERMINAL_HOOK_FAILED, task_id=record.task_id, error=repr(exc))
        if not self._subscribers:
            return
        event = TransitionEvent(
            record.task_id, transition.from_state, transition.to_state, transition.at, transition.reason, record
        )
        for token, callback in list(self._subscribers.items()):
            try:
                callback(event)
            except BaseException as exc:  # noqa: BLE001 - a subscriber must never take the state actor down
                self._log.error(SUBSCRIBER_FAILED, token=token, error_type=type(exc).__name__, error=str(exc))

    def _reply_outcome(self, ref: pykka.ActorRef[Any], outcome: TransitionOutcome) -> None:
        self._tell(ref, TransitionsApplied((outcome,)))

    def _tell(self, ref: pykka.ActorRef[Any], message: Any) -> None:
        tell_or_dead_letter(ref, message, self._dead_letters)

    # --- memory bound ----------------------------------------------------------------------------

    def _lookup(self, task_id: str) -> TaskRecord | None:
        record = self._records.get(task_id)
        if record is None and self._journal is not None and self._retain is not None:
            record = self._journal.get(task_id)
        return record

    def _as_state(self, value: TaskState | str) -> TaskState:
        """`value` as a state of one of the runtime's pipelines, or InvalidTransition listing them."""
        if any(value in table for table in self._tables.values()):
            return TaskState(value)
        allowed = ", ".join(state.value for state in self._states)
        raise InvalidTransition(f"{value!r} is not a task state; allowed: {allowed}")

    def _allowed_from(self, record: TaskRecord) -> str:
        table = self._tables.get(record.pipeline)
        if table is None:
            return f"nothing (pipeline {record.pipeline!r} is not defined in this runtime)"
        targets = sorted(target.value for target in table.get(record.state, ()))
        return ", ".join(targets) if targets else "nothing (terminal)"

    def _evict(self, changes: _Changes) -> None:
        assert self._retain is not None
        for change in changes:
            if change.record.state in TERMINAL_STATES:
                self._terminal_order.append(change.record.task_id)
        while len(self._terminal_order) > self._retain:
            self._records.pop(self._terminal_order.popleft(), None)

    def _load(self, journal: WriterStore) -> None:
        """Rebuild memory from the journal: every non-terminal task, and the newest terminal ones."""
        for state, count in journal.counts().items():
            self._counts[TaskState(state)] = count  # any pipeline's: names, not a fixed set
        for record in journal.iter_records(terminal=False):
            self._records[record.task_id] = record
        if self._retain is None:
            for record in journal.iter_records(terminal=True):
                self._records[record.task_id] = record
        elif self._retain > 0:
            newest = journal.records(terminal=True, newest_first=True, limit=self._retain)
            for record in reversed(newest):
                self._records[record.task_id] = record
                self._terminal_order.append(record.task_id)
