"""Module-level stage functions for the pipeline tests (the process backend pickles them by reference)."""

from __future__ import annotations

import os
from typing import Any

from actorflow.core import Task


def square_in_child(task: Task, value: Any) -> dict[str, Any]:
    """A CPU stage for the process backend: squares value["n"] and says which process ran it."""
    return {**value, "n": value["n"] * value["n"], "pid": os.getpid()}
