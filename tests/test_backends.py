"""The backend registry: a host's own backend, registered with one call, runs a stage like a built-in one.

The backend defined here runs each worker's calls on a thread of its own, in
the order sent, with the toolkit's `execute` (which turns whatever the stage
does into a report); everything it lacks (withdrawing, cancelling, holding
reports back) it says it lacks through `WorkerDefaults`.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from actorflow import ConfigError, Pipeline, Runtime, RuntimeConfig, Stage, Task, TaskState, TransientError
from actorflow import register_backend as front_door_register_backend
from actorflow.actors.backends import BUILT_IN, backend_names, register_backend, unregister_backend
from actorflow.actors.backends.base import (
    BackendDefaults,
    BackendRequest,
    Deliver,
    OnDeath,
    StageFn,
    WorkerDefaults,
    WorkerHandle,
)
from actorflow.actors.backends.toolkit import execute
from actorflow.actors.messages import RunService
from actorflow.core.tracing import get_event_logger

S = TaskState
ROOT = Path(__file__).resolve().parent.parent


class OwnThreadWorker(WorkerDefaults):
    """Runs its calls one at a time on a thread of its own; a retired worker runs nothing more."""

    def __init__(self, name: str, fn: StageFn, deliver: Deliver) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[RunService | None] = queue.SimpleQueue()
        self._retired = False
        self._thread = threading.Thread(target=self._run, args=(fn, deliver), name=f"own-{name}", daemon=True)
        self._thread.start()

    def send(self, call: RunService) -> bool:
        if self._retired:
            return False
        self._calls.put(call)
        return True

    def retire(self) -> None:
        self._retired = True
        self._calls.put(None)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self, fn: StageFn, deliver: Deliver) -> None:
        log = get_event_logger(self.name)
        while (call := self._calls.get()) is not None:
            if not self._retired:  # the pool takes back what a retired worker had not started
                deliver(execute(fn, call, self.name, log=log))


class OwnThreadBackend(BackendDefaults):
    """A backend of the host's: a thread per worker. Keeps the requests it was built for."""

    name = "own-threads"
    built: ClassVar[list[BackendRequest]] = []
    """The request of every backend built, for the tests to read."""

    def __init__(self, request: BackendRequest) -> None:
        OwnThreadBackend.built.append(request)

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        return OwnThreadWorker(name, fn, deliver)


@pytest.fixture
def own_backend() -> Iterator[str]:
    """The backend above, registered as "own-threads" for one test."""
    OwnThreadBackend.built.clear()
    front_door_register_backend("own-threads", OwnThreadBackend)
    yield "own-threads"
    unregister_backend("own-threads")


@pytest.mark.timeout(30)
def test_a_backend_registered_with_one_call_runs_a_stage_with_its_retries_and_failures(own_backend: str) -> None:
    ran_on: list[tuple[str, int, str]] = []

    def double(task: Task, value: Any) -> Any:
        ran_on.append((task.task_id, task.attempt, threading.current_thread().name))
        if value["n"] == 2 and task.attempt == 1:
            raise TransientError("not yet")
        if value["n"] == 3:
            raise ValueError("three is not allowed")
        return {"n": value["n"] * 2}

    pipeline = Pipeline("own", [Stage("double", double, backend=own_backend, workers=2)])
    config = RuntimeConfig(retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    with Runtime(config, pipelines=[pipeline]) as runtime:
        handles = {n: runtime.submit({"n": n}, task_id=f"task-{n}") for n in (1, 2, 3)}
        records = {n: handle.result(timeout=10) for n, handle in handles.items()}

    assert (records[1].state, records[1].result, records[1].retries) == (S.COMPLETED, {"n": 2}, 0)
    assert (records[2].state, records[2].result, records[2].retries) == (S.COMPLETED, {"n": 4}, 1)
    assert records[3].state is S.FAILED
    assert records[3].error == "double: ValueError: three is not allowed"
    assert sorted((task_id, attempt) for task_id, attempt, _ in ran_on) == [
        ("task-1", 1),
        ("task-2", 1),
        ("task-2", 2),
        ("task-3", 1),
    ]
    assert all(thread.startswith("own-double-") for _, _, thread in ran_on), ran_on  # the workers' own threads
    [request] = OwnThreadBackend.built  # one backend for the runtime, asked for the stage's pool alone
    assert (request.name, dict(request.sizes), list(request.functions)) == ("own-threads", {"double": 2}, ["double"])


@pytest.mark.timeout(30)
def test_service_backend_sends_every_stage_that_names_no_backend_to_a_registered_backend(own_backend: str) -> None:
    def where(task: Task, value: Any) -> Any:
        return {"thread": threading.current_thread().name}

    pipeline = Pipeline("p", [Stage("where", where)])
    with Runtime(RuntimeConfig(service_backend=own_backend), pipelines=[pipeline]) as runtime:
        record = runtime.submit({"x": 1}).result(timeout=10)
    assert record.state is S.COMPLETED
    assert record.result is not None
    assert str(record.result["thread"]).startswith("own-where-")


def test_a_stage_naming_a_backend_nobody_registered_is_refused_by_the_runtime_naming_the_stage_and_the_names() -> None:
    stage = Stage("draw", lambda task, value: value, backend="gpu")  # core cannot know: it checks the form only
    with pytest.raises(ConfigError) as caught:
        Runtime(RuntimeConfig(), pipelines=[Pipeline("render", [stage])])
    message = str(caught.value)
    assert "Stage 'draw' of pipeline 'render': its backend 'gpu' is not a registered backend" in message
    assert "'thread', 'async', 'process', 'ray'" in message
    assert "register_backend" in message


def test_a_service_backend_nobody_registered_is_refused_by_the_runtime_naming_the_field() -> None:
    config = RuntimeConfig(service_backend="gpu")
    with pytest.raises(ConfigError, match=r"Stage 'a' of pipeline 'p': RuntimeConfig.service_backend 'gpu' is not"):
        Runtime(config, pipelines=[Pipeline("p", [Stage("a", lambda task, value: value)])])


def test_service_backend_async_refuses_a_stage_that_is_not_async_def_naming_it() -> None:
    config = RuntimeConfig(service_backend="async")
    with pytest.raises(ConfigError, match=r"Stage 'plain' of pipeline 'p': .* 'async' runs only async def functions"):
        Runtime(config, pipelines=[Pipeline("p", [Stage("plain", lambda task, value: value)])])


@pytest.mark.parametrize("name", ["", "gpu!", "a b", "x" * 65, 42])
def test_a_malformed_backend_name_is_refused_where_it_is_written(name: object) -> None:
    with pytest.raises(ConfigError, match=r"Stage 'a': backend must be a backend's name"):
        Stage("a", lambda task, value: value, backend=name)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"RuntimeConfig.service_backend must be a backend's name"):
        RuntimeConfig(service_backend=name)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"register_backend: name must be a backend's name"):
        register_backend(name, OwnThreadBackend)  # type: ignore[arg-type]


def test_a_taken_name_is_refused_unless_replace_is_true_and_unregistering_gives_a_built_in_back(
    own_backend: str,
) -> None:
    with pytest.raises(ConfigError, match=r"backend 'own-threads' is registered already; pass replace=True"):
        register_backend(own_backend, OwnThreadBackend)
    with pytest.raises(ConfigError, match=r"backend 'thread' is a built-in backend; pass replace=True"):
        register_backend("thread", OwnThreadBackend)
    assert backend_names() == ("thread", "async", "process", "ray", "own-threads")

    register_backend("thread", OwnThreadBackend, replace=True)
    try:
        with Runtime(RuntimeConfig(), pipelines=[Pipeline("p", [Stage("a", lambda task, value: value)])]) as runtime:
            assert runtime.submit({"x": 1}).result(timeout=10).state is S.COMPLETED
        assert [request.name for request in OwnThreadBackend.built] == ["thread"]  # the replacement ran the stage
    finally:
        unregister_backend("thread")
    with pytest.raises(ConfigError, match=r"backend 'thread' was not registered by register_backend"):
        unregister_backend("thread")  # the built-in is back, and stays
    assert backend_names() == ("thread", "async", "process", "ray", "own-threads")
    assert set(BUILT_IN) == {"thread", "async", "process", "ray"}


def test_a_factory_that_is_not_callable_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"the factory of backend 'mine' must be callable, got 42"):
        register_backend("mine", 42)  # type: ignore[arg-type]
    assert "mine" not in backend_names()


@pytest.mark.timeout(60)
def test_a_runtime_on_threads_loads_neither_the_process_nor_the_ray_backend() -> None:
    code = (
        "import sys\n"
        "from actorflow import Pipeline, Runtime, RuntimeConfig, Stage\n"
        "def keep(task, value):\n"
        "    return value\n"
        "with Runtime(RuntimeConfig(), pipelines=[Pipeline('p', [Stage('a', keep)])]) as runtime:\n"
        "    assert runtime.submit({'x': 1}).result(timeout=10).state.value == 'COMPLETED'\n"
        "names = ('actorflow.actors.backends.process', 'actorflow.actors.backends.ray', 'ray')\n"
        "print(sorted(name for name in names if name in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-c", code]
    done = subprocess.run(run, capture_output=True, text=True, timeout=50, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
