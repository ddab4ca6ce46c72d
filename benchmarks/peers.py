"""The task systems users would use instead, on the benchmark's own jobs: Celery, Dask and Ray tasks.

Each peer runs the same three stages (`benchmarks.peer_work`) as actorflow, one
item at a time through all three, with the same number of workers, and is
driven by the same closed loop (`benchmarks.load`): `submit()` blocks while
`concurrency` items are in flight, and an item's latency runs from its submit
to the moment the system reported it done.

* **Celery** 5 with a real Redis as broker and result backend: a Debian
  ``redis-server`` started on 127.0.0.1 for the scenario and stopped after it,
  and a Celery worker process with a thread pool. An item is
  ``chain(validate.s(p), process.s(), persist.s())``; a waiter thread collects
  results in submission order (NOTES: Celery's Redis backend stalls when
  several hundred results are pending, so the loop admits 64 at a time).
* **Dask distributed**, ``Client(processes=False)`` with one worker of N
  threads: three dependent futures per item, done when the last one is.
* **Ray tasks** (with the ``ray`` extra): three chained remote calls per item.

Each is a context (`celery_services`, `dask_client`, `ray_session`) opened once
per scenario, and a `Pipeline` built per round on it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from benchmarks import peer_work
from benchmarks.pipeline import Completion, Handle

__all__ = [
    "CeleryPipeline",
    "DaskPipeline",
    "RayTasksPipeline",
    "celery_services",
    "dask_client",
    "missing_peers",
    "ray_session",
]

_ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT_S = 60.0
_RESULT_TIMEOUT_S = 120.0


def missing_peers() -> dict[str, str]:
    """Each peer that cannot run here, with the reason (nothing is started to find out)."""
    import importlib.util  # noqa: PLC0415

    missing: dict[str, str] = {}
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        missing["celery"] = "celery[redis] is not installed: pip install '.[bench]'"
    elif shutil.which("redis-server") is None:
        missing["celery"] = "redis-server is not installed: apt-get install redis-server"
    if importlib.util.find_spec("distributed") is None:
        missing["dask"] = "dask distributed is not installed: pip install '.[bench]'"
    if importlib.util.find_spec("ray") is None:
        missing["ray"] = "Ray is not installed: pip install '.[ray]'"
    return missing


class _ClosedLoop:
    """Admits `concurrency` items in flight and records when each one finished."""

    def __init__(self, concurrency: int) -> None:
        self._room = threading.Semaphore(concurrency)
        self._idle = threading.Condition()
        self._pending = 0
        self.finished: dict[str, float] = {}

    def admit(self) -> tuple[str, Completion]:
        self._room.acquire()
        with self._idle:
            self._pending += 1
        task_id = uuid.uuid4().hex
        return task_id, Completion(task_id)

    def done(self, task_id: str, handle: Completion, state: str) -> None:
        now = time.time()
        with self._idle:
            self.finished[task_id] = now
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()
        handle.set(state)
        self._room.release()

    def join(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def finished_at(self, task_ids: Iterable[str]) -> dict[str, float]:
        with self._idle:
            return {task_id: self.finished[task_id] for task_id in task_ids if task_id in self.finished}


class _LoopPipeline:
    """What every peer's pipeline shares: the closed loop behind `join` and `finished_at`."""

    _loop: _ClosedLoop

    def join(self, timeout: float) -> bool:
        return self._loop.join(timeout)

    def finished_at(self, task_ids: Iterable[str]) -> dict[str, float]:
        return self._loop.finished_at(task_ids)


# --- Celery + Redis -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def celery_services(workers: int) -> Iterator[Any]:
    """A Redis server on 127.0.0.1 and a Celery worker with `workers` threads; yields a client app on them.

    The client app is new for each context: a Celery app keeps its broker and backend connections
    pooled, so one app cannot move to another Redis.
    """
    port = _free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker: subprocess.Popen[str] | None = None
    try:
        assert redis.stdout is not None
        for line in redis.stdout:  # redis-server says when it listens
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError(f"redis-server exited with {redis.wait()} before accepting connections")
        url = f"redis://127.0.0.1:{port}/0"
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.celery_tasks",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(workers),
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "WARNING",
            ],
            cwd=_ROOT,
            env={**os.environ, "ACTORFLOW_BENCH_REDIS": url, "PYTHONPATH": str(_ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        app = _client_app(url)
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not app.control.ping(timeout=0.5):  # a bounded wait for the worker process to come up
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the Celery worker did not start")
            yield app
        finally:
            app.close()
    finally:
        for process in (worker, redis):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        if redis.stdout is not None:
            redis.stdout.close()


def _client_app(url: str) -> Any:
    from celery import Celery  # noqa: PLC0415 - celery is the bench extra's

    from benchmarks import celery_tasks  # noqa: PLC0415

    app = Celery("actorflow_bench_client", broker=url, backend=url)
    app.conf.update(celery_tasks.app.conf.table(with_defaults=False))
    app.conf.update(broker_url=url, result_backend=url)
    return app


class CeleryPipeline(_LoopPipeline):
    """Items as Celery chains of three tasks (sent by name), on `celery_services`' Redis and worker."""

    def __init__(self, app: Any, concurrency: int, *, io: bool, name: str = "celery") -> None:
        from celery import chain  # noqa: PLC0415

        self.name = name
        self._loop = _ClosedLoop(concurrency)
        middle = app.signature("bench.process_sleep" if io else "bench.process")
        validate, persist = app.signature("bench.validate"), app.signature("bench.persist")
        self._chain: Callable[[dict[str, Any]], Any] = lambda p: chain(
            validate.clone(args=(p,)), middle.clone(), persist.clone()
        )
        self._results: queue.SimpleQueue[tuple[str, Completion, Any] | None] = queue.SimpleQueue()
        self._waiter = threading.Thread(target=self._collect, name="bench-celery-results", daemon=True)
        self._waiter.start()

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        task_id, handle = self._loop.admit()
        self._results.put((task_id, handle, self._chain(dict(payload)).apply_async()))
        return handle

    def _collect(self) -> None:
        while (item := self._results.get()) is not None:
            task_id, handle, result = item
            try:
                result.get(timeout=_RESULT_TIMEOUT_S, propagate=False)
                state = "COMPLETED" if result.successful() else "FAILED"
                result.forget()
            except Exception:  # a lost result counts as a failed item, never as a hang
                state = "FAILED"
            self._loop.done(task_id, handle, state)

    def close(self) -> None:
        self._results.put(None)
        self._waiter.join(_RESULT_TIMEOUT_S)


# --- Dask distributed -----------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(workers: int) -> Iterator[Any]:
    """``Client(processes=False)``: one in-process worker with `workers` threads."""
    from distributed import Client  # noqa: PLC0415 - the bench extra's

    client = Client(processes=False, n_workers=1, threads_per_worker=workers, dashboard_address=None)
    try:
        yield client
    finally:
        client.close()


class DaskPipeline(_LoopPipeline):
    """Items as three dependent Dask futures."""

    def __init__(self, client: Any, concurrency: int, *, io: bool, name: str = "dask") -> None:
        self.name = name
        self._client = client
        self._loop = _ClosedLoop(concurrency)
        self._middle = peer_work.peer_process_sleep if io else peer_work.peer_process
        self._held: dict[str, Any] = {}  # a future nobody holds is released, and its task forgotten
        self._lock = threading.Lock()

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        task_id, handle = self._loop.admit()
        client = self._client
        first = client.submit(peer_work.peer_validate, dict(payload), pure=False)
        second = client.submit(self._middle, first, pure=False)
        last = client.submit(peer_work.peer_persist, second, pure=False)
        with self._lock:
            self._held[task_id] = (first, second, last)

        def finished(future: Any) -> None:
            with self._lock:
                self._held.pop(task_id, None)
            self._loop.done(task_id, handle, "COMPLETED" if future.status == "finished" else "FAILED")

        last.add_done_callback(finished)
        return handle

    def close(self) -> None:
        self._loop.join(_RESULT_TIMEOUT_S)


# --- Ray tasks ------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(workers: int) -> Iterator[dict[str, Any]]:
    """A local Ray with `workers` CPUs, and the three stages as remote functions."""
    import ray  # noqa: PLC0415 - the ray extra's

    environ = dict(os.environ)  # ray.init sets RAY_AUTH_MODE & co. for the process: undone at the end
    # address="local": a Ray of its own, never a cluster that happens to run on this machine
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        remote = {
            "validate": ray.remote(peer_work.peer_validate),
            "process": ray.remote(peer_work.peer_process),
            "process_sleep": ray.remote(peer_work.peer_process_sleep),
            "persist": ray.remote(peer_work.peer_persist),
        }
        yield remote
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(environ)


class RayTasksPipeline(_LoopPipeline):
    """Items as three chained Ray tasks; a waiter thread turns finished refs into completions."""

    def __init__(self, remote: dict[str, Any], concurrency: int, *, io: bool, name: str = "ray-tasks") -> None:
        self.name = name
        self._remote = remote
        self._middle = remote["process_sleep" if io else "process"]
        self._loop = _ClosedLoop(concurrency)
        self._new: queue.SimpleQueue[tuple[str, Completion, Any] | None] = queue.SimpleQueue()
        self._waiter = threading.Thread(target=self._collect, name="bench-ray-results", daemon=True)
        self._waiter.start()

    def submit(self, payload: Mapping[str, Any]) -> Handle:
        task_id, handle = self._loop.admit()
        remote = self._remote
        ref = remote["persist"].remote(self._middle.remote(remote["validate"].remote(dict(payload))))
        self._new.put((task_id, handle, ref))
        return handle

    def _collect(self) -> None:
        import ray  # noqa: PLC0415

        pending: dict[Any, tuple[str, Completion]] = {}
        closing = False
        while not closing or pending:
            block = not pending and not closing
            while True:
                try:
                    item = self._new.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is None:
                    closing = True
                    continue
                pending[item[2]] = (item[0], item[1])
            if not pending:
                continue
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.002, fetch_local=False)
            for ref in ready:
                task_id, handle = pending.pop(ref)
                try:
                    ray.get(ref)
                    state = "COMPLETED"
                except Exception:
                    state = "FAILED"
                self._loop.done(task_id, handle, state)

    def close(self) -> None:
        self._new.put(None)
        self._waiter.join(_RESULT_TIMEOUT_S)
