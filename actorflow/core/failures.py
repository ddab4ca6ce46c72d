"""Tracebacks and error messages of failed service calls, bounded in size.

A traceback travels in a `ServiceDone` (across a pipe or Ray's object store),
into a `service.failed` event and into the task record and journal, so it is
kept as text, never as a traceback object, and cut to `MAX_TRACEBACK_CHARS`.
When it must be cut, the innermost frames and the exception line are kept:
that is where the error was raised; the outer frames are the runtime's own.

An error message (``str(exception)``, and the error and reason a task's record
keeps) is cut to `MAX_MESSAGE_CHARS` by `bound_message`: its start is kept,
and a marker says how much was cut. An exception may carry a message of any
length; what is stored and logged of it must not.
"""

from __future__ import annotations

import traceback

__all__ = ["MAX_MESSAGE_CHARS", "MAX_TRACEBACK_CHARS", "bound_message", "describe_error", "format_traceback"]

MAX_TRACEBACK_CHARS = 8192
"""The most characters of a formatted traceback kept (8 KiB of ASCII)."""

MAX_MESSAGE_CHARS = 4096
"""The most characters of an error message (or a transition's reason) kept, marker included."""


def bound_message(text: str, *, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` if it has at most `limit` characters, else its start and a marker saying how much was cut.

    The result never has more than `limit` characters (`limit` must leave the marker room: >= 64).
    """
    if len(text) <= limit:
        return text
    # The marker's length depends on the count it states; 48 characters always hold it.
    kept = limit - 48
    return f"{text[:kept]} ... [{len(text) - kept} characters cut]"


def describe_error(error: BaseException) -> str:
    """``str(error)`` as a plain `str`, whatever the exception does; never raises.

    A service's exception is user code: its ``__str__`` may raise, or return a
    `str` subclass that cannot be pickled to the runtime's process. Then its
    ``repr`` is tried, and last a line naming its type and what went wrong.
    """
    for render in (str, repr):
        try:
            text = render(error)
            # A plain str, even if __str__ returned a subclass (join copies one into a plain str).
            return text if type(text) is str else "".join((str.__str__(text),))
        except BaseException:  # noqa: BLE001, S112 - user code: any failure means "try the next form"
            continue
    return f"<{_type_name(error)} whose str() and repr() raised>"


def _type_name(error: BaseException) -> str:
    name = type(error).__name__
    return name if type(name) is str else "exception"


def format_traceback(error: BaseException, *, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """`error`'s formatted traceback (chained causes included), at most `limit` characters long; never raises.

    Args:
        error: an exception that was raised (with its ``__traceback__``).
        limit: the most characters to return; the innermost frames are kept.
    """
    try:
        parts = traceback.format_exception(error)
    except BaseException:  # noqa: BLE001 - a hostile exception (its notes, its cause) must not cost the report
        parts = [f"{_type_name(error)}: {describe_error(error)} (its traceback could not be formatted)\n"]
    total = sum(map(len, parts))
    if total <= limit:
        return "".join(parts)
    # Never joined whole: with a message of a gigabyte, that would be one more gigabyte.
    head = parts[0] if parts[0].startswith("Traceback") else ""
    kept: list[str] = []
    size = len(head)
    for part in reversed(parts):
        # The marker is at most ~60 characters: leave it room.
        if size + len(part) + 64 > limit:
            break
        kept.append(part)
        size += len(part)
    omitted = total - size
    marker = f"  ... {omitted} characters of outer frames omitted ...\n"
    if not kept:  # the last part (a huge message) is larger than the limit: keep its end
        tail = parts[-1][-(limit - len(head) - len(marker)) :]
        return head + marker + tail
    return head + marker + "".join(reversed(kept))
