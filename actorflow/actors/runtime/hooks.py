"""What a runtime leaves with its process: its name among the open runtimes, and the exit and fork hooks.

The hooks are registered once, when the first Runtime is made, never at import:
a program that only imports actorflow, or reads a journal, gets nothing added to
its exit or to its forks.

- At exit, every runtime left open is closed without draining (its actor
  threads are daemons, so a forgotten runtime cannot hang the exit; closing it
  commits what it has).
- In a fork() child, every runtime of the parent is marked forked: its actors
  stayed in the parent, so nothing of it works in the child.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
from typing import Protocol

from actorflow.actors.runtime.callers import Callers
from actorflow.core.errors import ConfigError, quote

__all__ = ["claim_name", "close_forgotten_runtimes", "forget", "install", "release_name", "remember"]


class Closable(Protocol):
    """A runtime, as the exit hook sees it."""

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the runtime."""


_open_runtimes: dict[Closable, Callers] = {}
"""This process's open runtimes, each with its caller checks (the fork hook marks them forked). Held
strongly: a runtime nobody refers to any more still runs its tasks, and is closed at exit like any other."""
_lock = threading.Lock()
_installed = False
_names_in_use: set[str] = set()
"""The names of this process's open runtimes (the ``runtime`` label of their metrics)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def install() -> None:
    """Register the exit and fork hooks, once (called as each Runtime is made)."""
    global _installed
    with _lock:
        if _installed:
            return
        atexit.register(close_forgotten_runtimes)
        if hasattr(os, "register_at_fork"):  # POSIX only
            os.register_at_fork(after_in_child=_forget_runtimes_in_forked_child)
        _installed = True


def remember(runtime: Closable, callers: Callers) -> None:
    """`runtime` is open: close it at exit if it is still open then; mark `callers` forked in a fork() child."""
    _open_runtimes[runtime] = callers


def forget(runtime: Closable) -> None:
    """`runtime` is closing: the hooks leave it alone."""
    _open_runtimes.pop(runtime, None)


def claim_name(name: object) -> str:
    """Reserve `name` for a new runtime, or pick "default" ("default-2", ... when taken). Raises ConfigError."""
    with _lock:
        if name is None:
            picked, number = "default", 1
            while picked in _names_in_use:
                number += 1
                picked = f"default-{number}"
            _names_in_use.add(picked)
            return picked
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"Runtime name {quote(name)} is not allowed: use 1 to 64 letters, digits, '_', '-' or '.', "
                "starting with a letter or a digit"
            )
        if name in _names_in_use:
            raise ConfigError(
                f"Runtime name {name!r} is taken by an open runtime of this process; its metrics could not be "
                "told apart: give each runtime its own name (or close the other first)"
            )
        _names_in_use.add(name)
        return name


def release_name(name: str) -> None:
    """A runtime called `name` has closed: another may take the name."""
    with _lock:
        _names_in_use.discard(name)


def close_forgotten_runtimes() -> None:
    """Actor threads are daemons, so a forgotten runtime cannot hang exit; commit what it has, though."""
    for runtime in list(_open_runtimes):  # a copy: each close forgets its runtime
        runtime.close(drain=False)


def _forget_runtimes_in_forked_child() -> None:
    """In a fork() child, the runtimes' actor threads stayed in the parent: mark them unusable here.

    Only plain attributes are set: a lock another thread of the parent held at the
    fork stays held in the child forever, so nothing here (nor in `close()` after
    it) may take one. Exit is then immediate instead of waiting on absent threads.
    """
    global _lock
    for callers in list(_open_runtimes.values()):
        callers.forked = True
    _lock = threading.Lock()  # a parent's thread may have held it at the fork: here it would stay held
    _open_runtimes.clear()
    _names_in_use.clear()  # the child's own runtimes may take them again
