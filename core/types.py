"""The data that crosses actor boundaries: task states, tasks, records, events.

Everything here is immutable. Records and events are frozen, slotted
dataclasses; payloads and results are frozen by `freeze`, which turns every
mapping into a read-only `FrozenDict` and every list into a tuple, so that no
two threads can ever share a mutable object through a message.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeAlias

__all__ = [
    "DEFAULT_PIPELINE",
    "MAX_DEPTH",
    "SEED_STATES",
    "FrozenDict",
    "JSONInput",
    "JSONValue",
    "Task",
    "TaskRecord",
    "TaskState",
    "Transition",
    "TransitionEvent",
    "encode_json",
    "evolve",
    "freeze",
    "freeze_payload",
    "thaw",
]

DEFAULT_PIPELINE = "default"
"""The seed pipeline's name (`core.pipeline` re-exports it); a schema-1 journal's tasks belong to it."""

JSONValue: TypeAlias = "bool | int | float | str | tuple[JSONValue, ...] | Mapping[str, JSONValue] | None"
"""A JSON value as actorflow hands it out (frozen by `freeze`: every mapping a read-only `FrozenDict`,
every list a tuple): payloads, stage values and results."""

JSONInput: TypeAlias = "bool | int | float | str | Sequence[JSONInput] | Mapping[str, JSONInput] | None"
"""A JSON value as a program hands it in (payloads): lists and dicts, which `freeze` copies into tuples and
FrozenDicts."""


class _TaskStateType(type):
    """Iterating `TaskState` gives the seed's six states, in lifecycle order (as the enum it replaced did)."""

    def __iter__(cls) -> Iterator[TaskState]:
        return iter(SEED_STATES)

    def __len__(cls) -> int:
        return len(SEED_STATES)


class TaskState(str, metaclass=_TaskStateType):
    """A task's state: a name such as ``"CREATED"`` or ``"FETCH"``. The allowed moves live in a `Pipeline`.

    States are data, derived from each pipeline's stages, so this is a string type rather
    than an enum. Every state of one name is one object (interned), so states can be
    compared with ``is`` as enum members could; `TaskState.CREATED`, `.COMPLETED`,
    `.FAILED` and `.CANCELLED` exist in every pipeline, and the seed pipeline adds
    `.VALIDATED` and `.PROCESSING`.
    """

    __slots__ = ()

    CREATED: ClassVar[TaskState]
    VALIDATED: ClassVar[TaskState]
    PROCESSING: ClassVar[TaskState]
    COMPLETED: ClassVar[TaskState]
    FAILED: ClassVar[TaskState]
    CANCELLED: ClassVar[TaskState]

    def __new__(cls, name: str) -> TaskState:
        """The one state of this name (made on first use).

        Raises:
            ValueError: `name` is not a non-empty str of at most 64 letters, digits, ``_`` or ``-``.
        """
        known = _STATES.get(name)
        if known is not None:
            return known
        if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a task state name: use 1 to 64 letters, digits, '_' or '-', starting with a letter"
            )
        with _STATES_LOCK:
            state = _STATES.get(name)
            if state is None:
                state = str.__new__(cls, name)
                _STATES[str(name)] = state
        return state

    @property
    def value(self) -> str:
        """The state's name as a plain str (as an enum member's ``.value``)."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The state's name (as an enum member's ``.name``)."""
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"TaskState.{str.__str__(self)}"

    def __reduce__(self) -> tuple[type[TaskState], tuple[str]]:
        # unpickled (in a worker process, say) through __new__, so it is interned there too
        return (TaskState, (str.__str__(self),))

    def __copy__(self) -> TaskState:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> TaskState:
        return self


_STATES: dict[str, TaskState] = {}
_STATES_LOCK = threading.Lock()
_STATE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")

for _name in ("CREATED", "VALIDATED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"):
    setattr(TaskState, _name, TaskState(_name))
del _name

SEED_STATES: tuple[TaskState, ...] = (
    TaskState.CREATED,
    TaskState.VALIDATED,
    TaskState.PROCESSING,
    TaskState.COMPLETED,
    TaskState.FAILED,
    TaskState.CANCELLED,
)
"""The seed pipeline's states, in lifecycle order; what iterating `TaskState` gives."""


class FrozenDict(dict[str, "JSONValue"]):
    """A read-only dict: JSON- and pickle-friendly, but every mutator raises TypeError.

    It subclasses `dict` (rather than wrapping one) so that `json.dumps`, `==`
    and `isinstance(x, dict)` keep working in user code that receives it.
    """

    __slots__ = ()

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("FrozenDict is read-only: payloads and results are immutable once submitted")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly
    __ior__ = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        # pickle would otherwise rebuild the dict through the blocked __setitem__
        return (FrozenDict, (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


MAX_DEPTH = 128
"""How deep payloads and results may nest (mappings and lists): deeper ones are refused.

A fixed bound, far from the interpreter's recursion limit, so that `freeze`, `thaw`,
the journal's encoder and decoder and `to_dict()` never meet a RecursionError
whatever the caller's stack depth (serde_json's default limit is the same).
"""

encode_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
"""The canonical JSON text of a value, as the journal stores it: what `freeze` accepts always encodes.

One encoder, built once: json.dumps with non-default arguments builds a new encoder per call.
"""

_ALWAYS_PRINTABLE_BITS = 2100
"""Ints this short print whatever `sys.set_int_max_str_digits` allows (its least limit is 640 digits)."""


def freeze(value: Any, *, where: str = "payload") -> JSONValue:
    """Return an immutable deep copy of a JSON value, or raise TypeError naming the bad part.

    Allowed: None, bool, int that prints as JSON (at most `sys.get_int_max_str_digits()`
    digits), finite float, str of valid Unicode text, list/tuple of allowed values and
    mappings with str keys, nested at most `MAX_DEPTH` levels. These are exactly the
    values `encode_json` (the journal) and `TaskRecord.to_dict()` can store. `where`
    names the root in error messages (``payload['data'][2]``).
    """
    return _freeze(value, where, 0)


def _freeze(value: Any, where: str, depth: int) -> JSONValue:
    if isinstance(value, str):
        if not value.isascii():
            _check_encodable(value, where)
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > _ALWAYS_PRINTABLE_BITS:
            _check_printable(value, where)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where} is {value!r}; JSON allows only finite numbers")
        return value
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            raise _too_deep(where)
        items = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has key {key!r} of type {type(key).__name__}; JSON keys must be str")
            if not key.isascii():
                _check_encodable(key, f"a key of {where}")
            items[key] = _freeze(item, f"{where}[{key!r}]", depth + 1)
        # A FrozenDict is immutable already, but anyone can build one: it is checked, and kept as it is.
        return value if isinstance(value, FrozenDict) else FrozenDict(items)
    if isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise _too_deep(where)
        return tuple(_freeze(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value))
    raise TypeError(
        f"{where} is of type {type(value).__name__}; allowed are None, bool, int, float, str, list and dict"
    )


def freeze_payload(payload: Mapping[str, JSONInput], *, where: str = "payload") -> Mapping[str, JSONValue]:
    """`freeze` for a mapping: its frozen copy, typed as the mapping it is. Raises TypeError as `freeze` does."""
    frozen = freeze(payload, where=where)
    if not isinstance(frozen, Mapping):
        raise TypeError(f"{where} must be a mapping (a JSON object), got {type(payload).__name__}")
    return frozen


def _too_deep(where: str) -> TypeError:
    return TypeError(
        f"{where} is nested more than {MAX_DEPTH} levels deep (or contains itself); JSON values "
        f"here may nest at most {MAX_DEPTH} mappings and lists"
    )


def _check_printable(number: int, where: str) -> None:
    try:
        int.__repr__(number)  # what the encoder does; it refuses past the process's digit limit
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise TypeError(
            f"{where} is an int of more than {limit} digits; JSON numbers may have at most {limit} digits "
            "(sys.get_int_max_str_digits()): send a longer one as a str"
        ) from None


def _check_encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(
            f"{where} holds a lone surrogate {text[exc.start]!r}; JSON strings must be valid Unicode text"
        ) from None


def thaw(value: object) -> Any:
    """Return a plain, mutable copy (dicts and lists) of a frozen JSON value."""
    if isinstance(value, dict):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


@dataclass(frozen=True, slots=True)
class Task:
    """What a service sees: the task's id and its frozen payload."""

    task_id: str
    payload: Mapping[str, JSONValue]
    attempt: int = 1
    """Which attempt of the current stage this call is (1 for the first)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One accepted state change, as kept in a record's history."""

    from_state: TaskState | None
    """None for the creation entry."""
    to_state: TaskState
    at: float
    """Wall-clock time (seconds since the epoch) when the change was accepted."""
    reason: str | None = None


@dataclass(frozen=True)
class TaskRecord:
    """The state actor's view of one task. A new record is made for every change (see `evolve`).

    Not slotted, on purpose: with a __dict__, `evolve` can copy a record in two C-level dict
    updates instead of twelve object.__setattr__ calls, which is most of what a transition costs.
    """

    task_id: str
    state: TaskState
    payload: Mapping[str, JSONValue]
    result: Mapping[str, JSONValue] | None = None
    error: str | None = None
    history: tuple[Transition, ...] = ()
    created_at: float = 0.0
    updated_at: float = 0.0
    trace_id: str = ""
    """The task's 32-hex W3C trace id (adopted from the submitter's traceparent, if given)."""
    span_id: str = ""
    """The task's own 16-hex span; every service call is a child span of it."""
    parent_span_id: str | None = None
    """The submitter's span, from its traceparent; None if the task started the trace."""
    calls: int = 0
    """Stage function calls made for this task: one per stage run, plus one per retry."""
    retries: int = 0
    """How many of those calls were retries of a stage after a transient failure (or a timeout)."""
    pipeline: str = DEFAULT_PIPELINE
    """The name of the pipeline the task runs through."""
    value: JSONValue = None
    """While the task runs: the value handed to its current stage, if that is not the payload (None)."""
    traceback: str | None = None
    """The formatted traceback of the task's last failed service call (bounded in size), if any."""

    @property
    def attempts(self) -> int:
        """The former name of `calls` (a clean run of three stages shows 3: not two retries; see `retries`)."""
        return self.calls

    def path(self) -> list[str]:
        """The states the task went through, in order (``["CREATED", "VALIDATED", ...]``)."""
        return [entry.to_state.value for entry in self.history]

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict of the record, history included."""
        return {
            "task_id": self.task_id,
            "state": self.state.value,
            "payload": thaw(self.payload),
            "result": thaw(self.result),
            "error": self.error,
            "history": [
                {
                    "from_state": entry.from_state.value if entry.from_state else None,
                    "to_state": entry.to_state.value,
                    "at": entry.at,
                    "reason": entry.reason,
                }
                for entry in self.history
            ],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "pipeline": self.pipeline,
            "calls": self.calls,
            "retries": self.retries,
            "attempts": self.calls,
            "traceback": self.traceback,
        }


def evolve(record: TaskRecord, /, **changes: Any) -> TaskRecord:
    """A copy of `record` with `changes` applied: `dataclasses.replace` at a quarter of the cost.

    Only for field names of TaskRecord (unchecked: this is the state actor's hot path).
    """
    new = object.__new__(TaskRecord)
    fields = new.__dict__
    fields.update(record.__dict__)
    fields.update(changes)
    return new


@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """Published to subscribers for every accepted (and, with a journal, committed) change."""

    task_id: str
    from_state: TaskState | None
    to_state: TaskState
    at: float
    reason: str | None
    record: TaskRecord = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict (the record's payload and result left out)."""
        return {
            "task_id": self.task_id,
            "from_state": self.from_state.value if self.from_state else None,
            "to_state": self.to_state.value,
            "at": self.at,
            "reason": self.reason,
            "trace_id": self.record.trace_id,
            "pipeline": self.record.pipeline,
        }
