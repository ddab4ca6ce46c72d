"""Module-level stage functions for the value-limit tests (the process backend pickles them by reference)."""

from __future__ import annotations

from typing import Any

from actorflow.core import Task

BIG_CHARS = 200_000
"""Characters of the string `too_big` returns: more than the tests' `max_value_bytes` allows."""


def too_big(task: Task, value: Any) -> Any:
    """Returns a value larger than the tests' limit for the task named "big", half of it for the task
    named "half", a small one for the others."""
    if value["name"] == "big":
        return {"v": "x" * BIG_CHARS}
    if value["name"] == "half":
        return {"v": "x" * (BIG_CHARS // 2)}
    return {"n": value["n"]}


async def too_big_async(task: Task, value: Any) -> Any:
    """`too_big` as a coroutine (the async backend)."""
    return too_big(task, value)


class Unpicklable(str):
    """A str that refuses to be pickled (to a process or Ray worker, or back from one)."""

    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable refuses to be pickled")


def returns_unpicklable(task: Task, value: Any) -> Any:
    """Returns a str subclass that cannot be pickled, inside a mapping."""
    return {"v": Unpicklable("plain text"), "n": value["n"]}


def raises_long_message(task: Task, value: Any) -> Any:
    """Fails with a message of two million characters."""
    raise ValueError("y" * 2_000_000)
