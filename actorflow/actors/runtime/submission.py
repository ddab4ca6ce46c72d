"""Submission: payloads and batches checked, prepared into `CreateTask`s, admitted and sent to the StateActor.

Everything a submission can be refused for is judged on the caller's thread,
before anything is sent: the runtime's state, the pipeline, the payload (a JSON
object within `max_value_bytes`, frozen so that no thread shares it), the task
id, the trace context, and room under `max_in_flight`. A batch is all or
nothing: one bad payload refuses it, named by its index. A creation is
acknowledged (the caller waits for the StateActor's answer) only when there is
something to wait for: a commit (with a journal), or a caller-chosen id that
may be taken.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import pykka

from actorflow.actors.health import LogThrottle
from actorflow.actors.messages import CreateTask, CreateTasks
from actorflow.actors.runtime.assembly import Assembly
from actorflow.actors.runtime.callers import Callers, answer
from actorflow.actors.runtime.handles import Handles, TaskHandle
from actorflow.actors.runtime.parts import RuntimeParts
from actorflow.actors.runtime.supervision import Supervisor
from actorflow.core.errors import InvalidPayload, Overloaded, RuntimeStopped, TaskNotFound, UnknownPipeline, quote
from actorflow.core.events import TASK_SUBMIT_REFUSED, TASK_SUBMITTED, TASKS_SUBMIT_REFUSED
from actorflow.core.pipeline import Pipeline
from actorflow.core.tracing import new_task_id, new_trace, parse_traceparent
from actorflow.core.types import JSONInput, TaskRecord, freeze_payload

if TYPE_CHECKING:
    from actorflow.core.journal import ReaderStore

__all__ = ["MAX_TASK_ID", "IdempotencyKeys", "Submitter", "check_lookup", "find_pipeline"]

MAX_TASK_ID = 200
"""The longest task id `submit` accepts."""
_REFUSAL_LOG_INTERVAL_S = 1.0
"""At most one ``task.submit_refused`` / ``tasks.submit_refused`` line per this many seconds."""


def check_lookup(task_id: object) -> None:
    """Raise TaskNotFound for an id no task can have, quoting it bounded (the actor would quote it whole)."""
    if not isinstance(task_id, str) or len(task_id) > MAX_TASK_ID:
        raise TaskNotFound(f"no task with id {quote(task_id)}; task ids are str of at most {MAX_TASK_ID} chars")


def _checked_key(idempotency_key: object) -> tuple[str, str]:
    """`idempotency_key` if it is a (key, payload fingerprint) pair of str, else InvalidPayload naming it."""
    if (
        isinstance(idempotency_key, tuple)
        and len(idempotency_key) == 2
        and isinstance(idempotency_key[0], str)
        and isinstance(idempotency_key[1], str)
    ):
        return (idempotency_key[0], idempotency_key[1])
    raise InvalidPayload(
        f"idempotency_key must be a (key, payload fingerprint) pair of str, got {quote(idempotency_key)}"
    )


def find_pipeline(pipelines: Mapping[str, Pipeline], name: str | None) -> Pipeline:
    """The pipeline called `name` (the first one for None). Raises UnknownPipeline naming the known ones."""
    if name is None:
        return next(iter(pipelines.values()))
    found = pipelines.get(name) if isinstance(name, str) else None
    if found is None:
        raise UnknownPipeline(name, list(pipelines))
    return found


class Submitter:
    """Turns `submit` and `submit_many` calls into tasks on the runtime's StateActor."""

    def __init__(
        self,
        parts: RuntimeParts,
        *,
        pipelines: Mapping[str, Pipeline],
        supervisor: Supervisor,
        assembly: Assembly,
        handles: Handles,
    ) -> None:
        self._config = parts.config
        self._telemetry = parts.telemetry
        self._admission = parts.admission
        self._callers = parts.callers
        self._log = parts.log
        self._pipelines = pipelines
        self._first_pipeline = next(iter(pipelines))
        self._supervisor = supervisor
        self._assembly = assembly
        self._handles = handles
        self._refusals = LogThrottle(_REFUSAL_LOG_INTERVAL_S)
        """One ``task.submit_refused`` line per interval, with how many were left out (a full disk refuses many)."""

    # --- one task --------------------------------------------------------------------------------

    def submit(
        self,
        payload: Mapping[str, JSONInput],
        task_id: str | None,
        traceparent: str | None,
        pipeline: str | None,
        idempotency_key: tuple[str, str] | None,
    ) -> TaskHandle:
        """`Runtime.submit`: create one task; returns once its creation is committed (or sent, in memory)."""
        message: CreateTask | None = None
        try:
            message = self._prepare(payload, task_id, traceparent, pipeline)
            if idempotency_key is not None:
                message = message._replace(idempotency_key=_checked_key(idempotency_key))
            return self._reserve_and_send(message)
        except BaseException as exc:
            self._telemetry.submit_refused(None if message is None else message.task_id, exc)
            raise

    def _prepare(
        self,
        payload: Mapping[str, JSONInput],
        task_id: str | None,
        traceparent: str | None,
        pipeline: str | None,
        *,
        single: bool = True,
    ) -> CreateTask:
        callers = self._callers
        callers.check_not_forked()
        if callers.closed.is_set() or self._admission.failure is not None:
            raise self._admission.unavailable()
        pipeline_name = self._first_pipeline if pipeline is None else find_pipeline(self._pipelines, pipeline).name
        if not isinstance(payload, Mapping):
            raise InvalidPayload(f"payload must be a mapping (a JSON object), got {type(payload).__name__}")
        try:
            frozen = freeze_payload(payload, max_bytes=self._config.max_value_bytes)
        except TypeError as exc:
            raise InvalidPayload(f"payload is not JSON-serializable: {exc}") from None
        # An acknowledgement costs a round trip to the state actor. It is needed when there is a commit
        # to wait for (a journal) or a caller-chosen id that may be taken; a fresh uuid in memory is neither.
        needs_ack = task_id is not None or self._config.journal_path is not None
        if task_id is None:
            task_id = new_task_id()
        elif not isinstance(task_id, str) or not task_id or len(task_id) > MAX_TASK_ID:
            raise InvalidPayload(
                f"task_id must be a non-empty str of at most {MAX_TASK_ID} chars, got {quote(task_id)}"
            )
        elif not task_id.isascii():
            try:
                task_id.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidPayload(
                    f"task_id {task_id!r} holds a lone surrogate {task_id[exc.start]!r}; "
                    "a task id must be valid Unicode text"
                ) from None
        if traceparent is not None:
            try:
                trace = parse_traceparent(traceparent)
            except ValueError as exc:
                raise InvalidPayload(str(exc)) from None
        else:
            trace = new_trace()
        trace = self._telemetry.task_submitted(task_id, trace, traceparent)
        # A batch (not `single`) is acknowledged as a whole, by its CreateTasks message.
        reply: pykka.Future[TaskRecord] | None = pykka.ThreadingFuture() if needs_ack and single else None
        # No `notify`: the StateActor announces the task to whichever orchestrator it has adopted then.
        return CreateTask(task_id, frozen, trace, reply=reply, pipeline=pipeline_name)

    def _reserve_and_send(self, message: CreateTask) -> TaskHandle:
        config = self._config
        central = self._callers.must_not_wait()
        if central and message.reply is not None:
            self._callers.refuse_blocking("Runtime.submit() with a journal or a task_id (it waits for the commit)")
        try:
            self._admission.reserve(wait=config.overload == "wait" and not central, timeout=config.submit_timeout_s)
        except Overloaded as exc:
            if central and config.overload == "wait":
                self._callers.refuse_blocking("Runtime.submit() at max_in_flight (it waits for room)")
            raise exc from None
        return self._send_create(message)

    def _send_create(self, message: CreateTask) -> TaskHandle:
        waiter = self._admission.track(message.task_id, reserved=True)
        self._log_submitted(message)
        try:
            self._deliver_create(message)
        except BaseException as exc:
            self._admission.forget(message.task_id)
            suppressed = self._refusals.allow()
            if suppressed is not None:
                self._log.warning(
                    TASK_SUBMIT_REFUSED,
                    task_id=message.task_id,
                    trace_id=message.trace.trace_id,
                    error_type=type(exc).__name__,
                    error=str(exc),
                    suppressed=suppressed,
                )
            raise
        return TaskHandle(self._handles, message.task_id, waiter)

    def _log_submitted(self, message: CreateTask) -> None:
        """The task's ``task.submitted`` event (debug): when `submit()` was called, before the commit."""
        trace = message.trace
        self._log.debug(
            TASK_SUBMITTED,
            task_id=message.task_id,
            trace_id=trace.trace_id,
            span_id=trace.span_id,
            parent_span_id=trace.parent_span_id,
            pipeline=message.pipeline,
        )

    def _deliver_create(self, message: CreateTask | CreateTasks) -> None:
        """Tell the StateActor a creation or a batch; if it stopped before taking it, wait for its replacement once."""
        for attempt in (1, 2):
            state = self._assembly.state
            assert state is not None
            try:
                state.tell(message)
                if message.reply is not None:
                    answer(message.reply, state)
                return
            except (pykka.ActorDeadError, RuntimeStopped):
                # Never handled (an actor's leftover asks get RuntimeStopped): nothing was created.
                if attempt == 2 or not self._supervisor.await_replacement("state", state):
                    raise self._admission.unavailable() from None
                if message.reply is not None:
                    message = message._replace(reply=pykka.ThreadingFuture())

    # --- a batch ---------------------------------------------------------------------------------

    def submit_many(
        self,
        payloads: Iterable[Mapping[str, JSONInput]],
        pipeline: str | None,
        task_ids: Sequence[str] | None,
        traceparent: str | None,
    ) -> list[TaskHandle]:
        """`Runtime.submit_many`: create several tasks, all or none, in one message and one commit."""
        batch: list[Mapping[str, JSONInput]] = []
        messages: list[CreateTask] = []
        try:
            batch = self._check_batch(payloads, task_ids)
            name = find_pipeline(self._pipelines, pipeline).name  # UnknownPipeline concerns the batch
            if traceparent is not None:  # shared by the batch: judged once, not as some payload's fault
                try:
                    parse_traceparent(traceparent)
                except ValueError as exc:
                    raise InvalidPayload(f"{exc}; nothing was created") from None
            self._prepare_many(batch, name, task_ids, traceparent, into=messages)
            return self._reserve_and_send_many(messages, explicit_ids=task_ids is not None)
        except BaseException as exc:
            # Every payload of the batch was refused: end the spans opened, and count each one.
            for message in messages:
                self._telemetry.submit_refused(message.task_id, exc)
            for _ in range(max(1, len(batch)) - len(messages)):
                self._telemetry.submit_refused(None, exc)
            raise

    def _check_batch(
        self, payloads: Iterable[Mapping[str, JSONInput]], task_ids: Sequence[str] | None
    ) -> list[Mapping[str, JSONInput]]:
        """The batch as a list, once the runtime's state and the batch's shape and size are judged."""
        self._callers.check_not_forked()
        if self._callers.closed.is_set() or self._admission.failure is not None:
            raise self._admission.unavailable()
        if isinstance(payloads, (Mapping, str, bytes)) or not isinstance(payloads, Iterable):
            raise InvalidPayload(
                f"payloads must be a sequence of mappings (JSON objects), got {type(payloads).__name__}; "
                "to submit one payload, call submit()"
            )
        batch = list(payloads)
        if task_ids is not None:
            if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Sequence):
                raise InvalidPayload(f"task_ids must be a sequence of str, got {type(task_ids).__name__}")
            if len(task_ids) != len(batch):
                raise InvalidPayload(
                    f"task_ids has {len(task_ids)} id(s) for {len(batch)} payload(s); give one id per payload"
                )
        limit = self._config.max_in_flight
        if limit is not None and len(batch) > limit:
            raise InvalidPayload(
                f"a batch of {len(batch)} payloads can never be admitted under max_in_flight={limit}; "
                f"submit batches of at most {limit}"
            )
        return batch

    def _prepare_many(
        self,
        batch: list[Mapping[str, JSONInput]],
        pipeline: str,
        task_ids: Sequence[str] | None,
        traceparent: str | None,
        *,
        into: list[CreateTask],
    ) -> None:
        """Prepare each payload as `submit` does, appending to `into`; InvalidPayload names the first bad one."""
        first_index: dict[str, int] = {}
        for index, payload in enumerate(batch):
            task_id = None if task_ids is None else task_ids[index]
            try:
                message = self._prepare(payload, task_id, traceparent, pipeline, single=False)
            except InvalidPayload as exc:
                raise InvalidPayload(f"payloads[{index}]: {exc}; nothing was created") from None
            into.append(message)
            if task_ids is not None:
                earlier = first_index.setdefault(message.task_id, index)
                if earlier != index:
                    raise InvalidPayload(
                        f"payloads[{index}]: task_id {message.task_id!r} is also the id of payloads[{earlier}]; "
                        "task ids must be unique; nothing was created"
                    )

    def _reserve_and_send_many(self, messages: list[CreateTask], *, explicit_ids: bool) -> list[TaskHandle]:
        if not messages:
            return []
        config = self._config
        central = self._callers.must_not_wait()
        reply: pykka.Future[tuple[TaskRecord, ...]] | None = None
        # As for submit: wait for an answer when there is a commit to wait for, or ids that may be taken.
        if config.journal_path is not None or explicit_ids:
            if central:
                self._callers.refuse_blocking(
                    "Runtime.submit_many() with a journal or task_ids (it waits for the commit)"
                )
            reply = pykka.ThreadingFuture()
        count = len(messages)
        try:
            self._admission.reserve(
                wait=config.overload == "wait" and not central, timeout=config.submit_timeout_s, count=count
            )
        except Overloaded as exc:
            if central and config.overload == "wait":
                self._callers.refuse_blocking("Runtime.submit_many() at max_in_flight (it waits for room)")
            raise exc from None
        task_ids = [message.task_id for message in messages]
        waiters = self._admission.track_many(task_ids)
        if self._log.enabled("debug"):
            for message in messages:
                self._log_submitted(message)
        try:
            self._deliver_create(CreateTasks(tuple(messages), reply))
        except BaseException as exc:
            self._admission.forget_many(task_ids)
            suppressed = self._refusals.allow()
            if suppressed is not None:
                self._log.warning(
                    TASKS_SUBMIT_REFUSED,
                    tasks=count,
                    first_task_id=task_ids[0],
                    error_type=type(exc).__name__,
                    error=str(exc),
                    suppressed=suppressed,
                )
            raise
        handles = self._handles
        return [TaskHandle(handles, task_id, waiter) for task_id, waiter in zip(task_ids, waiters, strict=True)]


class IdempotencyKeys:
    """Finds the task an Idempotency-Key created, through the journal's reader side.

    The reader is a connection of its own, opened at the first lookup and closed
    with the runtime, never the StateActor's writer: it sees committed tasks and
    keys only. A key travels to the StateActor with its task (`Submitter.submit`).
    """

    def __init__(self, journal_path: str | None, callers: Callers) -> None:
        self._journal_path = journal_path
        self._callers = callers
        self._reader: ReaderStore | None = None
        self._lock = threading.Lock()
        """Held while the reader is opened or taken away: it is opened once, and never after `close`."""

    def find(self, key: str) -> tuple[str, str] | None:
        """(task id, payload fingerprint) of the task submitted with `key`; None without a journal or if unknown.

        Raises:
            RuntimeStopped: the runtime is closing.
            JournalError: the journal cannot be read.
        """
        if self._journal_path is None:
            return None
        with self._lock:
            if self._callers.closed.is_set():
                raise RuntimeStopped("the runtime is closed; create a new Runtime to submit more tasks")
            if self._reader is None:
                from actorflow.core.journal import open_reader  # noqa: PLC0415 - the journal only when asked for

                self._reader = open_reader(self._journal_path)
            reader = self._reader
        return reader.find_key(key)

    def close(self) -> None:
        """Close the reader, if one was opened; later lookups raise RuntimeStopped."""
        with self._lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
