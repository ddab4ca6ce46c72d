"""One `ast.parse` at a time in the test process, on the CPython versions where two at once can fail.

CPython 3.11.0 to 3.11.7 and 3.12.0 to 3.12.1 keep the recursion depth that
``ast.parse`` counts while it builds the tree's Python objects in one place per
interpreter, not per call (python/cpython#106905, fixed in 3.11.8 and 3.12.2).
Building those objects can run the garbage collector, whose finalizers and
callbacks may let another thread run; if that thread parses too, it resets the
shared count, and the first parse ends with ``SystemError: AST constructor
recursion depth mismatch``.

The test suite parses on two threads at once as a matter of course: Hypothesis
parses source on the main thread (to describe strategies and examples, which
Schemathesis builds per request), while the runtime's service workers format
the traceback of every failed call, and Python 3.11's ``traceback`` parses each
frame's line to place its carets. ``tests/test_api_schema.py`` sends hundreds
of payloads that the default validator fails, so its main-thread parses race
with the workers'. On an affected interpreter, `serialise_ast_parse` puts
every ``ast.parse`` of the process behind one lock, which makes that race
impossible; elsewhere it does nothing.
"""

from __future__ import annotations

import ast
import sys
import threading
from typing import Any

__all__ = ["AFFECTED", "SerialParse", "serialise_ast_parse"]

AFFECTED = (3, 11) <= sys.version_info[:3] < (3, 11, 8) or (3, 12) <= sys.version_info[:3] < (3, 12, 2)
"""This interpreter has the shared recursion count of ``ast.parse`` (python/cpython#106905)."""


class SerialParse:
    """`ast.parse`, one call at a time across threads (a thread may parse again inside its own parse)."""

    def __init__(self, parse: Any) -> None:
        self.parse = parse
        self._lock = threading.RLock()
        self._contended = threading.Condition()
        self.contended = 0
        """How many calls had to wait for another thread's parse to end."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._lock.acquire(blocking=False):
            with self._contended:
                self.contended += 1
                self._contended.notify_all()
            self._lock.acquire()
        try:
            return self.parse(*args, **kwargs)
        finally:
            self._lock.release()

    def wait_until_contended(self, count: int, timeout: float) -> bool:
        """Block until `count` calls have had to wait; False if that did not happen within `timeout` s."""
        with self._contended:
            return self._contended.wait_for(lambda: self.contended >= count, timeout)


def serialise_ast_parse() -> None:
    """On an affected interpreter, make every later ``ast.parse`` of this process take one lock. Idempotent."""
    if AFFECTED and not isinstance(ast.parse, SerialParse):
        ast.parse = SerialParse(ast.parse)
