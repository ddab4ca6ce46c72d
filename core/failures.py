"""Tracebacks of failed service calls, formatted once and bounded in size.

A traceback travels in a `ServiceDone` (across a pipe or Ray's object store),
into a `service.failed` event and into the task record and journal, so it is
kept as text, never as a traceback object, and cut to `MAX_TRACEBACK_CHARS`.
When it must be cut, the innermost frames and the exception line are kept:
that is where the error was raised; the outer frames are the runtime's own.
"""

from __future__ import annotations

import traceback

__all__ = ["MAX_TRACEBACK_CHARS", "format_traceback"]

MAX_TRACEBACK_CHARS = 8192
"""The most characters of a formatted traceback kept (8 KiB of ASCII)."""


def format_traceback(error: BaseException, *, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """`error`'s formatted traceback (chained causes included), at most `limit` characters long.

    Args:
        error: an exception that was raised (with its ``__traceback__``).
        limit: the most characters to return; the innermost frames are kept.
    """
    parts = traceback.format_exception(error)
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
