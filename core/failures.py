"""Tracebacks of failed service calls, formatted once and bounded in size.

A traceback travels in a `ServiceDone` (across a pipe or Ray's object store),
into a `service.failed` event and into the task record and journal, so it is
kept as text, never as a traceback object, and cut to `MAX_TRACEBACK_CHARS`.
When it must be cut, the innermost frames and the exception line are kept:
that is where the error was raised; the outer frames are the runtime's own.
"""

from __future__ import annotations

import traceback

__all__ = ["MAX_TRACEBACK_CHARS", "describe_error", "format_traceback"]

MAX_TRACEBACK_CHARS = 8192
"""The most characters of a formatted traceback kept (8 KiB of ASCII)."""


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
    text = "".join(parts)
    if len(text) <= limit:
        return text
    head = parts[0] if parts[0].startswith("Traceback") else ""
    kept: list[str] = []
    size = len(head)
    for part in reversed(parts):
        # The marker is at most ~60 characters: leave it room.
        if size + len(part) + 64 > limit:
            break
        kept.append(part)
        size += len(part)
    omitted = len(text) - size
    marker = f"  ... {omitted} characters of outer frames omitted ...\n"
    if not kept:  # one part (a huge message) larger than the limit: keep its end
        tail = text[-(limit - len(head) - len(marker)) :]
        return head + marker + tail
    return head + marker + "".join(reversed(kept))
