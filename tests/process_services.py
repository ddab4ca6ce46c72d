"""Service functions for the process backend's tests, and the rendezvous they report to.

They live at module level in an importable module so that worker processes
can unpickle them (by module and name). Children talk to the test through a
`Rendezvous`: a Unix socket whose path travels in the payload. A child
connects, sends its pid, and may wait for the test to say "go". That makes
cross-process tests deterministic without sleeps or shared memory.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from actorflow.core.errors import TransientError
from actorflow.core.types import FrozenDict, Task

_TIMEOUT_S = 30.0


# --- the test's side -------------------------------------------------------------------------------


class Rendezvous:
    """A Unix socket the test listens on; children report their pid to it."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "rendezvous.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._listener.settimeout(_TIMEOUT_S)
        self._arrived: list[socket.socket] = []

    def arrivals(self, count: int) -> list[int]:
        """Wait for `count` more children to report (each then waits); their pids, in arrival order."""
        pids = []
        for _ in range(count):
            conn, _ = self._listener.accept()
            conn.settimeout(_TIMEOUT_S)
            self._arrived.append(conn)
            pids.append(int(_read_line(conn)))
        return pids

    def release_all(self) -> None:
        """Let every waiting child go on."""
        for conn in self._arrived:
            conn.sendall(b"go\n")

    def close(self) -> None:
        for conn in self._arrived:
            conn.close()
        self._listener.close()


@contextmanager
def rendezvous() -> Iterator[Rendezvous]:
    """A Rendezvous in a short temporary directory (Unix socket paths are limited to ~100 chars)."""
    with tempfile.TemporaryDirectory(prefix="af-") as directory:
        point = Rendezvous(directory)
        try:
            yield point
        finally:
            point.close()


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            raise EOFError("the other side closed the rendezvous")
        data += chunk
    return data.decode().strip()


def _report(path: str) -> socket.socket:
    """Connect to the test's rendezvous and tell it our pid."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(_TIMEOUT_S)
    conn.connect(path)
    conn.sendall(f"{os.getpid()}\n".encode())
    return conn


# --- services (run in the worker processes) ----------------------------------------------------


def describe(task: Task) -> Mapping[str, Any]:
    """What the child received, and where it ran."""
    data = task.payload["data"]
    return {
        "pid": os.getpid(),
        "in_child": multiprocessing.parent_process() is not None,
        "payload_type": type(task.payload).__name__,
        "data_type": type(data).__name__,
        "items_type": type(data["items"]).__name__,
        "items": data["items"],
        "frozen": isinstance(task.payload, FrozenDict) and _is_read_only(task.payload),
        "task_id": task.task_id,
    }


def _is_read_only(mapping: FrozenDict) -> bool:
    try:
        mapping["x"] = 1
    except TypeError:
        return True
    return False


def fail_permanently(task: Task) -> Mapping[str, Any]:
    raise ValueError(f"cannot compute {task.task_id}")


def exit_on_first_attempt(task: Task) -> Mapping[str, Any]:
    if task.attempt == 1:
        raise SystemExit(3)
    return {"pid": os.getpid(), "attempt": task.attempt}


def os_exit_on_first_attempt(task: Task) -> Mapping[str, Any]:
    if task.attempt == 1:
        os._exit(1)
    return {"pid": os.getpid(), "attempt": task.attempt}


def sigkill_self_on_first_attempt(task: Task) -> Mapping[str, Any]:
    if task.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # what a segfault or the OOM killer looks like from outside
    return {"pid": os.getpid(), "attempt": task.attempt}


def hang_on_first_attempt(task: Task) -> Mapping[str, Any]:
    """Report the pid, then hang for good on the first attempt; answer at once on the next."""
    if task.attempt == 1:
        conn = _report(task.payload["data"]["rendezvous"])
        threading.Event().wait()  # hangs until the backend kills this process
        conn.close()
    return {"pid": os.getpid(), "attempt": task.attempt}


def meet(task: Task) -> Mapping[str, Any]:
    """Report the pid and wait for the test's "go": passes only once every party has arrived."""
    with _report(task.payload["data"]["rendezvous"]) as conn:
        if _read_line(conn) != "go":
            raise RuntimeError("the rendezvous said something else than go")
    return {"pid": os.getpid()}


def _refuse_to_load() -> Any:
    if multiprocessing.parent_process() is not None:
        raise ImportError("this function cannot be loaded in a worker process")
    return describe


class LoadsOnlyInTheParent:
    """Pickles fine, but unpickling it in a worker process raises."""

    def __call__(self, task: Task) -> Mapping[str, Any]:
        return describe(task)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_to_load, ())


# --- chaos ---------------------------------------------------------------------------------------


def chaos_fate(task_id: str, attempt: int) -> float:
    """The fixed-seed random draw deciding what `chaos` does to this attempt."""
    return random.Random(f"{task_id}:{attempt}").random()


def chaos(task: Task) -> Mapping[str, Any]:
    """Misbehave at random, with a fixed seed per task and attempt (the rates are in `chaos_expected`)."""
    draw = chaos_fate(task.task_id, task.attempt)
    if draw < 0.10:
        raise TransientError("flaky")
    if draw < 0.12:
        raise ValueError("bad input")
    if draw < 0.13:
        raise SystemExit(1)
    if draw < 0.14:
        os._exit(1)
    if draw < 0.145:
        os.kill(os.getpid(), signal.SIGKILL)
    if draw < 0.15:
        threading.Event().wait()  # hangs until killed at the stage timeout
    return {"ok": task.task_id}


def chaos_expected(task_id: str, max_attempts: int) -> str:
    """The state `chaos` must leave a task in: FAILED on a permanent error or when attempts run out."""
    for attempt in range(1, max_attempts + 1):
        draw = chaos_fate(task_id, attempt)
        if 0.10 <= draw < 0.12:
            return "FAILED"
        if draw >= 0.15:
            return "COMPLETED"
    return "FAILED"


# --- batches -------------------------------------------------------------------------------------


def fail_if_asked(task: Task) -> Mapping[str, Any]:
    """Raise ValueError when the payload says ``"fail": true``; otherwise say which call this was."""
    data = task.payload["data"]
    if data.get("fail"):
        raise ValueError(f"asked to fail {task.task_id}")
    return {"pid": os.getpid(), "task_id": task.task_id}


def record_and_hold(task: Task) -> Mapping[str, Any]:
    """Append ``task_id attempt`` to the runs file, if any; then a ``"hold"`` payload waits at the rendezvous.

    The runs file (O_APPEND, one short write per run) counts how many times each call really started.
    """
    data = task.payload["data"]
    if "runs" in data:
        fd = os.open(data["runs"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{task.task_id} {task.attempt}\n".encode())
        finally:
            os.close(fd)
    if data.get("hold") and task.attempt == 1:
        with _report(data["rendezvous"]) as conn:
            _read_line(conn)  # "go" never comes: the test kills this process here
    return {"pid": os.getpid(), "attempt": task.attempt}


def sized_or_exit(task: Task) -> Mapping[str, Any]:
    """Return ``"size"`` bytes of text, or raise SystemExit when the payload says ``"exit": true``."""
    data = task.payload["data"]
    if data.get("exit"):
        raise SystemExit(5)
    return {"blob": "x" * data.get("size", 0)}
