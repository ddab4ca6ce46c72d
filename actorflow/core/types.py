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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeAlias

from actorflow.core.errors import ValueTooLarge

__all__ = [
    "DEFAULT_PIPELINE",
    "MAX_DEPTH",
    "SEED_STATES",
    "TERMINAL_STATES",
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
    "is_terminal",
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

TERMINAL_STATES: frozenset[TaskState] = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})
"""The states nothing leaves, the same in every pipeline: every pipeline's table ends in them."""


def is_terminal(state: TaskState) -> bool:
    """True for COMPLETED, FAILED and CANCELLED (terminal in every pipeline)."""
    return state in TERMINAL_STATES


class FrozenDict(dict[str, "JSONValue"]):
    """A read-only dict of frozen JSON values: JSON- and pickle-friendly, but every mutator raises TypeError.

    It subclasses `dict` (rather than wrapping one) so that `json.dumps`, `==`
    and `isinstance(x, dict)` keep working in user code that receives it.

    It is deeply immutable: building one freezes what it is given, as `freeze`
    does (lists become tuples, mappings FrozenDicts, a str, int or float
    subclass its plain type), so no list its builder keeps can change it later.
    Building one raises TypeError for whatever `freeze` refuses. It also
    remembers its size as JSON (a lower bound), so that `freeze` can keep it as
    it is, and still count it against `RuntimeConfig.max_value_bytes`.
    """

    __slots__ = ("_size",)

    _size: int
    """A lower bound of its length as canonical JSON (`encode_json`); -1 if not known (then freeze copies it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._size  # noqa: B018 - set once built: a second __init__ would change it
        except AttributeError:
            pass
        else:
            self._readonly()
        try:
            items, size = _freeze_items(dict(*args, **kwargs), 0, _UNLIMITED)
        except _Refused as exc:
            raise TypeError(exc.message("FrozenDict")) from None
        dict.update(self, items)
        self._size = size

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("FrozenDict is read-only: payloads and results are immutable once submitted")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly
    __ior__ = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple[Callable[[dict[str, Any], int], FrozenDict], tuple[dict[str, Any], int]]:
        # Rebuilt as it is, not frozen again: its values are frozen (and pickle would otherwise
        # rebuild the dict through the blocked __setitem__).
        return (_rebuild_frozen_dict, (dict(self), getattr(self, "_size", -1)))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self


_new_dict = dict.__new__
_fill_dict = dict.update


def _frozen_dict(items: dict[str, Any], size: int) -> FrozenDict:
    """A FrozenDict of `items`, whose values are frozen already (trusted: not checked, not copied).

    For `freeze` and the journal's decoder only: what they pass is frozen by construction.
    """
    frozen = _new_dict(FrozenDict)
    _fill_dict(frozen, items)
    frozen._size = size
    return frozen


def _rebuild_frozen_dict(items: dict[str, Any], size: int) -> FrozenDict:
    """Unpickling: the items were frozen when the FrozenDict was pickled."""
    return _frozen_dict(items, size)


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

_UNLIMITED = sys.maxsize

_SIZE_SPREAD = 20
"""How many times its counted size a value's JSON text may be, at most.

`freeze` counts a lower bound of each value's length as JSON, cheaply: a str's
length plus its quotes (escapes only lengthen it: 12 characters at most per
character, for a character outside the BMP), 1 for an int of up to 64 bits (at
most 20 digits), 3 for a float (at most 24 characters), the exact punctuation of
mappings and lists. A value whose count is over the limit is refused while it is
walked; one whose count is within 1/20 of the limit is accepted; only one in
between is encoded once, to be measured exactly.
"""


class _Refused(Exception):
    """Raised inside the walk, where the bad part is; `freeze` turns it into a TypeError naming where."""

    def __init__(self, what: str, step: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        """What is wrong, after the place: ``is nan; JSON allows ...``."""
        self.steps: list[str] = [] if step is None else [step]
        """The way from the root to the bad part, innermost first (``['k']``, ``[2]``)."""

    def message(self, where: str) -> str:
        return f"{where}{''.join(reversed(self.steps))} {self.what}"


class _TooLarge(Exception):
    """Raised inside the walk once the count passes the limit."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def freeze(value: Any, *, where: str = "payload", max_bytes: int | None = None) -> JSONValue:
    """Return an immutable deep copy of a JSON value, or raise TypeError naming the bad part.

    Allowed: None, bool, int that prints as JSON (at most `sys.get_int_max_str_digits()`
    digits), finite float, str of valid Unicode text, list/tuple of allowed values and
    mappings with str keys, nested at most `MAX_DEPTH` levels. These are exactly the
    values `encode_json` (the journal) and `TaskRecord.to_dict()` can store. A subclass
    of str, int or float is handed on as the plain type (it may not pickle, or print,
    as its class pleases). `where` names the root in error messages (``payload['data'][2]``).

    A `FrozenDict` is kept as it is: it is deeply frozen already.

    Args:
        value: the value to freeze.
        where: the name of the value, for error messages.
        max_bytes: refuse a value longer than this as canonical JSON (`encode_json`); None
            for no limit. The length is counted while the value is walked: a value far over
            the limit is refused without being walked to its end, and none is encoded twice.

    Raises:
        TypeError: a part of the value is not allowed (the message names where it is).
        ValueTooLarge: the value is longer than `max_bytes` as JSON (an `InvalidPayload`).
    """
    limit = _UNLIMITED if max_bytes is None else max_bytes
    try:
        frozen, size = _freeze_value(value, 0, limit)
    except _Refused as exc:
        raise TypeError(exc.message(where)) from None
    except _TooLarge as exc:
        raise _too_large(where, exc.size, limit, exact=False) from None
    if max_bytes is not None and size * _SIZE_SPREAD > max_bytes:
        if size <= max_bytes:
            size = len(encode_json(frozen))  # the count cannot tell: measure it
            exact = True
        else:
            exact = False
        if size > max_bytes:
            raise _too_large(where, size, max_bytes, exact=exact)
    return frozen


def _freeze_value(value: Any, depth: int, budget: int) -> tuple[JSONValue, int]:
    """`value` frozen, and a lower bound of its length as JSON. Mappings and lists stop past `budget`."""
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_encodable(value, "holds")
        return value, len(value) + 2
    if kind is int:
        bits = value.bit_length()
        if bits <= 64:
            return value, 1
        if bits > _ALWAYS_PRINTABLE_BITS:
            _check_printable(value)
        return value, bits // 4  # a number of b bits has more than b/4 digits (log10(2) > 1/4)
    if kind is float:
        if not _isfinite(value):
            raise _Refused(f"is {value!r}; JSON allows only finite numbers")
        return value, 3
    if value is None or kind is bool:
        return value, 4
    if kind is FrozenDict:
        size = getattr(value, "_size", -1)
        if size >= 0:
            return value, size  # deeply frozen when it was built: kept, and counted
        items, size = _freeze_items(value, depth, budget)
        return _frozen_dict(items, size), size
    if kind is dict or kind is list or kind is tuple:
        pass
    elif isinstance(value, str):  # a subclass: handed on as the plain type, which always pickles
        return _freeze_value(str.__str__(value), depth, budget)
    elif isinstance(value, bool):  # pragma: no cover - bool cannot be subclassed
        return bool(value), 4
    elif isinstance(value, int):
        return _freeze_value(int.__int__(value), depth, budget)
    elif isinstance(value, float):
        return _freeze_value(float.__float__(value), depth, budget)
    if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
        items, size = _freeze_items(value, depth, budget)
        return _frozen_dict(items, size), size
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        return _freeze_sequence(value, depth, budget)
    raise _Refused(f"is of type {type(value).__name__}; allowed are None, bool, int, float, str, list and dict")


def _freeze_items(value: Mapping[Any, Any], depth: int, budget: int) -> tuple[dict[str, JSONValue], int]:
    """A mapping's items frozen (keys plain str), and their count as a JSON object."""
    if depth >= MAX_DEPTH:
        raise _Refused(_TOO_DEEP)
    items: dict[str, JSONValue] = {}
    size = 1  # "{", then "key":value, per item, the last comma being the "}"
    for name, item in value.items():
        key = name if type(name) is str else _plain_key(name)
        if not key.isascii():
            _check_encodable(key, "has a key that holds")
        try:
            frozen, counted = _freeze_value(item, depth + 1, budget - size)
        except _Refused as exc:
            exc.steps.append(f"[{_shown(key)}]")
            raise
        except _TooLarge as exc:
            exc.size += size + len(key) + 4
            raise
        items[key] = frozen
        size += len(key) + 4 + counted
        if size > budget:
            raise _TooLarge(size)
    return items, size if items else 2


def _freeze_sequence(value: Sequence[Any], depth: int, budget: int) -> tuple[tuple[JSONValue, ...], int]:
    """A list's items frozen into a tuple, and their count as a JSON array."""
    if depth >= MAX_DEPTH:
        raise _Refused(_TOO_DEEP)
    items: list[JSONValue] = []
    size = 1  # "[", then value, per item, the last comma being the "]"
    for item in value:
        try:
            frozen, counted = _freeze_value(item, depth + 1, budget - size)
        except _Refused as exc:
            exc.steps.append(f"[{len(items)}]")
            raise
        except _TooLarge as exc:
            exc.size += size
            raise
        items.append(frozen)
        size += counted + 1
        if size > budget:
            raise _TooLarge(size)
    return tuple(items), size if items else 2


def _plain_key(key: object) -> str:
    if not isinstance(key, str):
        raise _Refused(f"has key {_shown(key)} of type {type(key).__name__}; JSON keys must be str")
    return str.__str__(key)  # a subclass: handed on as a plain str


def freeze_payload(
    payload: Mapping[str, JSONInput], *, where: str = "payload", max_bytes: int | None = None
) -> Mapping[str, JSONValue]:
    """`freeze` for a mapping: its frozen copy, typed as the mapping it is. Raises as `freeze` does."""
    frozen = freeze(payload, where=where, max_bytes=max_bytes)
    if not isinstance(frozen, Mapping):
        raise TypeError(f"{where} must be a mapping (a JSON object), got {type(payload).__name__}")
    return frozen


_TOO_DEEP = (
    f"is nested more than {MAX_DEPTH} levels deep (or contains itself); JSON values "
    f"here may nest at most {MAX_DEPTH} mappings and lists"
)

_isfinite = math.isfinite


def _too_large(where: str, size: int, limit: int, *, exact: bool) -> ValueTooLarge:
    measured = f"is {size} bytes" if exact else f"is at least {size} bytes"
    return ValueTooLarge(
        f"{where} {measured} as JSON; a task may store at most {limit} bytes per value (RuntimeConfig.max_value_bytes)"
    )


def _shown(value: object, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: an error message quotes what was wrong, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _check_printable(number: int) -> None:
    try:
        int.__repr__(number)  # what the encoder does; it refuses past the process's digit limit
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise _Refused(
            f"is an int of more than {limit} digits; JSON numbers may have at most {limit} digits "
            "(sys.get_int_max_str_digits()): send a longer one as a str"
        ) from None


def _check_encodable(text: str, verb: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Refused(
            f"{verb} a lone surrogate {text[exc.start]!r}; JSON strings must be valid Unicode text"
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
    """What a stage function sees: the task's id, its frozen payload, and which attempt this call is."""

    task_id: str
    payload: Mapping[str, JSONValue]
    attempt: int = 1
    """Which attempt of the current stage this call is: 1 for the first, 2 for its first retry...
    (counted per stage: the next stage starts at 1 again; see `TaskRecord` for the task's totals)."""


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

    Counting, in one vocabulary: `calls` is how many stage function calls were
    made for the task, retries included; `retries` is how many of those calls
    were retries (of a stage, after a transient failure or a timeout); a stage
    function sees `Task.attempt`, which attempt of its current stage the call is
    (1, then 2 for the first retry, and 1 again at the next stage). A clean run
    of three stages has ``calls == 3`` and ``retries == 0``.

    Not slotted, on purpose: with a __dict__, `evolve` can copy a record in two C-level dict
    updates instead of twelve object.__setattr__ calls, which is most of what a transition costs.
    """

    task_id: str
    state: TaskState
    payload: Mapping[str, JSONValue]
    result: JSONValue = None
    """The last stage's value once COMPLETED (any JSON value: a mapping, a list, 42...); None until then."""
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
