"""Module-level stage functions for the pipeline tests (the process backend pickles them by reference)."""

from __future__ import annotations

import os
from typing import Any

from actorflow.core import Task


def square_in_child(task: Task, value: Any) -> dict[str, Any]:
    """A CPU stage for the process backend: squares value["n"] and says which process ran it."""
    return {**value, "n": value["n"] * value["n"], "pid": os.getpid()}


def crash_if_asked(task: Task, value: Any) -> dict[str, Any]:
    """Crashes its worker when value["crash"] says how: "exit" raises SystemExit, "os_exit" ends the process."""
    if value.get("crash") == "exit":
        raise SystemExit("boom")
    if value.get("crash") == "os_exit":
        os._exit(1)
    return {"n": value.get("n")}


async def crash_if_asked_async(task: Task, value: Any) -> dict[str, Any]:
    """`crash_if_asked` as a coroutine."""
    return crash_if_asked(task, value)


class Unprintable(Exception):
    """An exception whose text cannot be taken: `str()` raises."""

    def __str__(self) -> str:
        raise RuntimeError("this exception refuses to be printed")


def raise_unprintable(task: Task, value: Any) -> None:
    raise Unprintable("the message nobody will read")


async def raise_unprintable_async(task: Task, value: Any) -> None:
    raise Unprintable("the message nobody will read")


class Unpicklable(str):
    """A str that cannot be pickled, so it cannot cross from a worker process to the runtime's."""

    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable values stay where they are")


def return_unpicklable(task: Task, value: Any) -> dict[str, Any]:
    return {"v": Unpicklable("stuck")}


def _refuse_to_rebuild(text: str) -> str:
    raise ValueError(f"{text!r} cannot be rebuilt in this process")


class Unreadable(str):
    """A str that pickles in a worker process but cannot be unpickled in the runtime's (nor anywhere)."""

    def __reduce__(self) -> Any:
        return (_refuse_to_rebuild, (str(self),))


def return_unreadable(task: Task, value: Any) -> dict[str, Any]:
    return {"v": Unreadable("stuck")}
