"""Pipeline shapes users build, and a child process that runs one until it is killed with SIGKILL.

Usage: python -m tests.crash_child JOURNAL SHAPE MODE SEED COUNT

The child opens a journaled runtime with the pipeline `SHAPE`, submits COUNT tasks (one at a
time with ``MODE=submit``, in batches with ``MODE=submit_many``) and prints each acknowledged
task id on a line of its own (``acked ID``) as soon as its creation is committed. The parent
kills it at a random moment, reopens the journal with the same pipeline and checks that every
acknowledged task completes with the right result.

Each stage adds its own mark to the value, so a task's result says which stages ran, in which
order, on what value: `expected_result` is what a task must end with, whatever was interrupted.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable
from typing import Any

from actorflow import Pipeline, Runtime, RuntimeConfig, Stage, Task

SHAPES = ("single", "mixed", "created_first", "done_states")
"""Pipeline shapes: one stage; thread, async and process stages; a first stage that runs in CREATED
(as the seed's does); stages that record a done state of their own."""


def _spin(task: Task) -> None:
    # A little CPU work of random length (up to about a millisecond): kills land in every stage.
    sum(range(random.randrange(20_000)))


def _mark(value: Any, mark: str) -> dict[str, Any]:
    return {"n": value["n"], "trail": [*value.get("trail", ()), mark]}


def on_thread(task: Task, value: Any) -> dict[str, Any]:
    _spin(task)
    return _mark(value, "thread")


def on_process(task: Task, value: Any) -> dict[str, Any]:
    _spin(task)
    return _mark(value, "process")


async def on_loop(task: Task, value: Any) -> dict[str, Any]:
    await asyncio.sleep(random.random() / 1000)
    return _mark(value, "async")


def second_thread(task: Task, value: Any) -> dict[str, Any]:
    _spin(task)
    return _mark(value, "thread2")


def keep(task: Task, value: Any) -> None:
    """Returns None: the value passes on unchanged."""
    _spin(task)


def pipeline(shape: str) -> Pipeline:
    """The pipeline called "p" of the given shape."""
    stages: list[Stage]
    if shape == "single":
        stages = [Stage("work", on_thread, workers=2)]
    elif shape == "mixed":
        stages = [
            Stage("intake", on_thread, workers=2),
            Stage("wait", on_loop, workers=8),
            Stage("crunch", on_process, backend="process", workers=2),
            Stage("store", second_thread, workers=2),
        ]
    elif shape == "created_first":
        stages = [
            Stage("check", keep, state="CREATED", done_state="CHECKED", workers=2),
            Stage("work", on_thread, workers=2),
        ]
    elif shape == "done_states":
        stages = [
            Stage("a", on_thread, done_state="A_DONE", workers=2),
            Stage("b", second_thread, state="B", workers=2),
            Stage("c", keep, state="B", done_state="C_DONE", workers=2),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    return Pipeline("p", stages)


_TRAILS: dict[str, list[str]] = {
    "single": ["thread"],
    "mixed": ["thread", "async", "process", "thread2"],
    "created_first": ["thread"],
    "done_states": ["thread", "thread2"],
}


def expected_result(shape: str, n: int) -> dict[str, Any]:
    """What a task with payload ``{"n": n}`` ends with, through the pipeline of `shape`."""
    return {"n": n, "trail": _TRAILS[shape]}


def submitter(runtime: Runtime, mode: str, rng: random.Random) -> Callable[[list[int]], list[str]]:
    """A function that submits the tasks of some indexes and returns their ids once committed."""

    def submit(indexes: list[int]) -> list[str]:
        if mode == "submit":
            return [runtime.submit({"n": n}, task_id=f"t-{n}").task_id for n in indexes]
        handles = runtime.submit_many([{"n": n} for n in indexes], task_ids=[f"t-{n}" for n in indexes])
        return [handle.task_id for handle in handles]

    return submit


def main(argv: list[str]) -> int:
    journal, shape, mode, seed, count = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    rng = random.Random(seed)
    runtime = Runtime(RuntimeConfig(journal_path=journal), pipelines=[pipeline(shape)])
    print("ready", flush=True)
    submit = submitter(runtime, mode, rng)
    index = 0
    while index < count:
        size = 1 if mode == "submit" else rng.randint(1, 8)
        indexes = list(range(index, min(count, index + size)))
        index += len(indexes)
        for task_id in submit(indexes):
            print(f"acked {task_id}", flush=True)  # returned: the creation is committed
    runtime.join()
    print("done", flush=True)
    sys.stdin.read()  # wait to be killed: the kill must land whatever the parent's pace
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
