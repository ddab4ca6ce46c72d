"""The process backend: service calls run in worker processes, for CPU-bound services.

One child process per worker, no shared memory. Calls cross a
`multiprocessing` pipe as one pickle per batch (each call's fields as a
tuple, the frozen payload inside: `send_many` sends several in one message),
the child runs each with `execute` (the very function thread workers use)
and writes its report as soon as the call ends; the parent builds the
`ServiceDone` from it. In the parent, each worker has one forwarding thread
that reads the child's pipe::

    orchestrator ─send_many()─pickle, non-blocking write─► child: execute(fn, call) for each call
    orchestrator ◄─deliver(ServiceDone | ServicesDone)─ forwarding thread ◄─pickle─ child

The orchestrator never blocks, and touches no other thread to send: once the
child is ready, `send_many` writes the message to the pipe without blocking;
whatever does not fit (a large payload, a full pipe), and calls sent before
the child is ready, wait for the forwarding thread, which writes them. The
thread waits on three things at once (the report pipe, the child's exit
sentinel and a wake-up pipe), so it notices reports, a retirement or a dying
child at once. It reads whatever the pipe holds in one go and delivers the
reports that piled up as one `ServicesDone`. The child reports each call
alone, at once: a report held back to make a bigger message would die with a
killed child, and its call would run twice.

The pool keeps at least two calls at a process worker (`min_queue_depth`):
the next call waits in the child's pipe while the current one runs, so a busy
child never waits for a round trip through the parent's threads (as a
`ProcessPoolExecutor` keeps one call more in its queue than it has workers).

Supervision follows the thread workers' rules:

* a service that raises `SystemExit` (any non-`Exception`) is reported
  ``crashed`` by the child, which then exits; the pool replaces the worker
  and the task is retried as a transient failure;
* a child that dies during a call (``os._exit``, a segfault, ``kill -9``)
  is seen as end-of-file on its pipe: the call it was running is reported
  ``crashed`` (error type ``WorkerProcessDied``), with the same effect; the
  calls queued behind it never started, and the pool re-sends them;
* a child that dies while idle is reported through `on_death`, and the pool
  replaces it without charging any task;
* a child that cannot load its function, or the main module it comes from
  (a script that starts its runtime outside ``if __name__ == "__main__":``),
  says why, in its own words (``worker.load_failed``); the calls it held fail
  at once with that reason, since no worker would run them;
* a result that cannot be pickled in the child (or unpickled here) fails its
  own call, permanently, with the reason; the child lives on;
* `retire()` really stops the child: an idle one is asked to exit, a busy
  one (say, hung past `stage_timeout_s`) gets SIGTERM, then SIGKILL. Its
  forwarding thread delivers nothing after retirement;
* a child never outlives its runtime: it watches its parent and exits when
  the parent dies, even by SIGKILL.

A call's one event (``service.call``, or ``service.failed``) carries the
thread workers' fields plus ``node`` (``"pid:1234"``). It is emitted in the
parent, where the host configured logging; its start and duration are the
ones measured in the child.

Children start with the "forkserver" method by default: a single-threaded
server process imports actorflow once and forks each worker from it, so a worker starts in
a few milliseconds instead of the ~300 ms a "spawn" child needs to import
actorflow. "spawn" is available too; "fork" is refused, since forking a
process full of threads can deadlock the child. As with any multiprocessing
program, the host's main script is imported in each worker (a stage may be
defined there): it must keep its work under ``if __name__ == "__main__":``.
A forked worker imports it itself (`_import_main`), not while multiprocessing
prepares it, so that a script that does not is reported with its own error.

The fork server is actorflow's own, not multiprocessing's process-wide one:
a library must not change its host's settings, and multiprocessing's
``set_forkserver_preload`` would change them for every forkserver process
the host starts. `_private_context` builds a context whose processes are
forked from a server that only this module configures.

The default persistence (`services.ResultStore` with no path) is an
in-memory SQLite database private to the parent process; a child would write
to a copy of its own that nobody reads. So that service runs on thread
workers in the parent (SQLite writes are I/O, not CPU). A result store with a
file path is pickled by path, and each child opens the same file (WAL).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import multiprocessing
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing import connection, forkserver, get_context, popen_forkserver, reduction, spawn
from multiprocessing import util as mp_util
from multiprocessing.context import BaseContext, ForkServerContext, ForkServerProcess, set_spawning_popen
from typing import Any, Final

from actorflow.actors.backends.base import BackendDefaults, Deliver, OnDeath, StageFn, WorkerDefaults, WorkerHandle
from actorflow.actors.backends.thread import ThreadBackend
from actorflow.actors.backends.toolkit import (
    AtHome,
    CallsInFlight,
    SilentLog,
    deliver_reports,
    execute,
    log_done,
    report_failure,
    ship_function,
    unsendable,
)
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import RunService, ServiceDone
from actorflow.actors.threads import ThreadBook
from actorflow.core.errors import ConfigError
from actorflow.core.events import (
    PROCESS_BACKEND_CLOSE_SLOW,
    PROCESS_BACKEND_IN_PARENT,
    WORKER_FORWARDING_FAILED,
    WORKER_KILLED,
    WORKER_LOAD_FAILED,
    WORKER_UNKILLABLE,
)
from actorflow.core.failures import describe_error
from actorflow.core.tracing import TraceContext, get_event_logger
from actorflow.core.types import Task

__all__ = ["ProcessBackend", "ProcessWorker", "check_picklable"]

START_METHODS: Final = ("forkserver", "spawn")
"""Start methods the backend accepts; never "fork" (the parent is full of threads)."""

_IDLE_EXIT_S: Final = 0.5
"""How long an idle child asked to exit gets before SIGTERM."""
_TERM_GRACE_S: Final = 1.0
"""How long a child gets between SIGTERM and SIGKILL."""
_KILL_WAIT_S: Final = 5.0
"""How long to wait for a SIGKILLed child to be reaped before giving up on it."""

_PR_SET_PDEATHSIG: Final = 1
"""prctl(2) option: the signal a process gets when its parent dies (Linux)."""

_SERVER_START_S: Final = 60.0
"""Bound on waiting for the fork server to start (it imports actorflow once)."""

_server_lock = threading.Lock()
_server_ready = False
_FORK_SERVER = forkserver.ForkServer()
"""actorflow's own fork server; multiprocessing's process-wide one (and its preload list) stay the host's."""


class _PrivatePopen(popen_forkserver.Popen):
    """multiprocessing's forkserver Popen, launching from `_FORK_SERVER` instead of the process-wide server."""

    def _launch(self, process_obj: Any) -> None:
        # The body of popen_forkserver.Popen._launch (CPython 3.11-3.13), but for the server it talks to.
        prep_data = spawn.get_preparation_data(process_obj._name)
        # The child imports the main module itself (`_import_main`, told where by `_main_module`), where it
        # can catch and report a failure: imported while multiprocessing prepares the child, a failure
        # would only be a traceback on stderr and an exit code.
        for key in _MAIN_KEYS:
            prep_data.pop(key, None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = _FORK_SERVER.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        # A duplicate of the data pipe's write end is the child's sign that its parent lives.
        parent_w = os.dup(w)
        self.finalizer = mp_util.Finalize(self, mp_util.close_fds, (parent_w, self.sentinel))  # type: ignore[attr-defined]
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _PrivateProcess(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> _PrivatePopen:  # noqa: N802 - multiprocessing's name
        return _PrivatePopen(process_obj)


class _PrivateForkServerContext(ForkServerContext):
    Process = _PrivateProcess


_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Register `_close_forgotten_runtimes_first` at exit, once, when the first backend is made.

    Not at import: importing a module must not change what the host's
    interpreter does at exit. Registered after multiprocessing's own handler
    (which `multiprocessing.util` registers at import, before this module
    could be made), it runs before that one.
    """
    global _exit_hook_registered
    with _exit_hook_lock:
        if not _exit_hook_registered:
            atexit.register(_close_forgotten_runtimes_first)
            _exit_hook_registered = True


def _close_forgotten_runtimes_first() -> None:
    """Close runtimes left open at exit before multiprocessing's own exit handler runs.

    That handler (registered when `multiprocessing` was imported, so it runs
    after this one) SIGTERMs every daemonic child, then joins every child with
    no timeout. Left to it, a forgotten runtime would see its workers die, start
    replacements, and the interpreter would hang joining them. Closing the
    runtimes first (as `actors.runtime.hooks` does at exit anyway, only later) stops
    every worker in order, and leaves unfinished tasks to a journal, unfailed.
    """
    from actorflow.actors.runtime import hooks  # noqa: PLC0415 - at exit it is loaded (a runtime made this backend)

    hooks.close_forgotten_runtimes()


# --- set-up checks -------------------------------------------------------------------------------


def check_picklable(service: str, fn: StageFn) -> bytes:
    """Pickle the function of pool `service` for its worker processes, or raise `ConfigError` naming it.

    Functions cross by reference (module and qualified name), so lambdas,
    closures and functions defined inside other functions cannot be sent.
    A function of an interactive ``__main__`` pickles, but no child could
    import it, so it is refused too.
    """
    return ship_function(
        service,
        fn,
        pack=_pickle_by_reference,
        to="worker processes",
        advice="define it at module level, in a module a worker process can import (the process backend pickles "
        "each stage function by its module and name)",
    )


def _pickle_by_reference(fn: StageFn) -> bytes:
    data = pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and getattr(main, "__file__", None) is None:
        raise pickle.PicklingError("it is defined in an interactive __main__, which a worker process cannot import")
    return data


def _context(start_method: str) -> BaseContext:
    if start_method not in START_METHODS:
        raise ConfigError(
            f"ProcessBackend start_method {start_method!r} is not allowed; use one of {START_METHODS} "
            "('fork' would copy a process full of threads and their locks)"
        )
    if start_method == "spawn":
        return get_context("spawn")  # spawn has no process-wide state to share
    context = _PrivateForkServerContext()
    if start_method == "forkserver":
        global _server_ready
        with _server_lock:
            if not _server_ready:
                # The server imports actorflow once; every worker forked from it starts with it imported.
                # ("__main__" is multiprocessing's own default; this takes effect when the server starts.)
                _FORK_SERVER.set_forkserver_preload(["__main__", __name__])
                # Start the server now, once per process, and wait for its imports: otherwise the first
                # calls' stage deadlines would include them (a replacement worker then starts in milliseconds).
                probe = context.Process(target=_probe, name="actorflow-forkserver-probe", daemon=True)
                probe.start()
                probe.join(_SERVER_START_S)
                if probe.exitcode is None:
                    probe.kill()
                    probe.join()
                probe.close()
                _server_ready = True
    return context


def _probe() -> None:
    """A no-op child: starting one starts the fork server."""


_MAIN_KEYS: Final = ("init_main_from_name", "init_main_from_path")
"""How multiprocessing's preparation data tells a child to import the parent's main module."""


def _main_module() -> tuple[str, str] | None:
    """Where a child finds this process's main module, as multiprocessing's spawn says: ("name", module) or
    ("path", file); None if it has none to import (an interactive session)."""
    data = spawn.get_preparation_data("actorflow-worker")
    if "init_main_from_name" in data:
        return ("name", data["init_main_from_name"])
    if "init_main_from_path" in data:
        return ("path", data["init_main_from_path"])
    return None


# --- the backend ---------------------------------------------------------------------------------


class ProcessBackend(BackendDefaults):
    """Workers are child processes; see the module docstring for the design.

    Args:
        functions: the pipeline's functions by service name; each one that
            will run in a child is pickled now, so a lambda or closure fails
            the runtime's start with a `ConfigError` naming it.
        dead_letters: the runtime's office (for the in-parent thread workers).
        threads: the runtime's thread book; forwarding threads are written
            down in it, so that `Runtime.close()` joins them.
        start_method: "forkserver" (default) or "spawn".
    """

    max_queue_depth = 8
    """Calls held per worker at most, while calls are uniformly fast (see ServicePool): a batch of them
    crosses the pipe as one message. Kept small: calls in a child's pipe cannot be taken back."""
    min_queue_depth = 2
    """Calls held per worker at least: the running one and the next, which waits in the child's pipe, so
    a busy child never idles for the round trip through the parent's threads (as a ProcessPoolExecutor's
    call queue holds one call more than it has workers). A call can then wait behind a slow one while
    another worker idles; a stage timeout bounds that wait."""

    name = "process"

    def __init__(
        self,
        functions: Mapping[str, StageFn],
        *,
        dead_letters: DeadLetterOffice,
        threads: ThreadBook,
        start_method: str = "forkserver",
    ) -> None:
        self._in_parent = AtHome(lambda: ThreadBackend(dead_letters, threads), same_machine=True)
        self._pickled: dict[str, tuple[StageFn, bytes]] = {
            service: (fn, check_picklable(service, fn)) for service, fn in self._in_parent.away(functions).items()
        }
        self._context = _context(start_method)
        _register_exit_hook()
        self.start_method = start_method
        self._threads = threads
        self._lock = threading.Lock()
        self._workers: list[ProcessWorker] = []
        self._log = get_event_logger("process-backend")
        in_parent = sorted(set(functions) - set(self._pickled))
        if in_parent:
            self._log.info(
                PROCESS_BACKEND_IN_PARENT,
                services=in_parent,
                why="the default in-memory result store lives in this process; set result_store to a file "
                "to persist from the worker processes",
            )

    def start_worker(self, name: str, service: str, fn: StageFn, deliver: Deliver, on_death: OnDeath) -> WorkerHandle:
        """Start a worker: its child process boots in the background, so this returns at once."""
        if self._in_parent.runs_here(fn):
            return self._in_parent.start_worker(name, service, fn, deliver, on_death)
        known = self._pickled.get(service)
        data = known[1] if known is not None and known[0] is fn else check_picklable(service, fn)
        worker = ProcessWorker(name, data, self._context, deliver, on_death, self._threads)
        with self._lock:
            self._workers = [w for w in self._workers if not w.finished()]
            self._workers.append(worker)
        return worker

    def close(self, timeout: float = _IDLE_EXIT_S + _TERM_GRACE_S + 1.0) -> None:
        """Retire every worker still running and wait (up to `timeout` in all) for its child to be gone."""
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.retire()
        deadline = time.monotonic() + timeout
        busy = [w.name for w in workers if not w.join(max(0.0, deadline - time.monotonic()))]
        if busy:
            self._log.warning(PROCESS_BACKEND_CLOSE_SLOW, workers=busy, timeout_s=timeout)
        self._in_parent.close()

    def pids(self) -> list[int]:
        """The pids of the worker processes running now (for inspection and tests)."""
        with self._lock:
            workers = list(self._workers)
        return [pid for pid in (w.pid for w in workers if not w.finished()) if pid is not None]


# --- one worker, parent side ---------------------------------------------------------------------


class _Died:
    """What `_receive` returns once the child process is gone."""


_DIED: Final = _Died()
_WAKE: Final = "wake"
_REPORT: Final = "report"
_EXIT: Final = "exit"
_STOP: Final = b"stop"
"""Tells an idle child to exit (a pickle never equals it)."""


class ProcessWorker(WorkerDefaults):
    """One worker: a child process and the forwarding thread that owns its pipe.

    `send`, `send_many`, `withdraw`, `retire` and `join` may be called from any
    thread; the lock orders their writes to the pipe with the forwarding thread's.
    Reading the pipe is the forwarding thread's alone.
    """

    def __init__(
        self,
        name: str,
        pickled_fn: bytes,
        context: BaseContext,
        deliver: Deliver,
        on_death: OnDeath,
        threads: ThreadBook,
    ) -> None:
        self.name = name
        self.pid: int | None = None
        self.node = ""
        self._deliver = deliver
        self._on_death = on_death
        self._threads = threads
        self._log = get_event_logger(name)
        self._calls: deque[RunService] = deque()
        self._lock = threading.Lock()
        self._retired = False
        self._closed = False
        """No more calls are taken, and the wake-up pipe is closed."""
        self._in_child = CallsInFlight()
        """Calls sent down the pipe and not yet answered, in order: the head is running."""
        self._crashed = False
        """A call crashed the child (its report was delivered): the pool replaces the worker on that report."""
        self._cannot_load = False
        """The child said it cannot load the function (or the main module): its calls fail with its reason."""
        self._ready = False
        """The child said it is ready: `send_many` writes to its pipe directly."""
        self._outbox = memoryview(b"")
        """What is left of a message the child's pipe did not take at once: the forwarding thread writes it."""
        self._watching = selectors.EVENT_READ
        """What the selector watches the child's pipe for (and writable, while the outbox is not empty)."""
        self._inbox = bytearray()
        """Bytes read from the child and not yet a whole report."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._conn, child_conn = context.Pipe()
        self._child_conn: connection.Connection | None = child_conn
        # The same socket, for non-blocking writes from the caller's thread and buffered reads.
        self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self._process = context.Process(  # type: ignore[attr-defined]
            target=_child_main,
            args=(child_conn, pickled_fn, name, _main_module()),
            name=f"actorflow-{name}",
            daemon=True,
        )
        # Started by the forwarding thread: every worker of a runtime boots at the same time.
        self._thread = threading.Thread(target=self._run, name=f"actorflow-proc-{name}", daemon=True)
        self._thread.start()

    # --- the WorkerHandle face (any thread) -------------------------------------------------------

    def send(self, call: RunService) -> bool:
        """Send a call to the child; False if the worker is retired or its child is gone."""
        return self.send_many((call,))

    def send_many(self, calls: Sequence[RunService]) -> bool:
        """Send several calls to the child, in order, in one message; False if the worker is retired or gone.

        Once the child is ready, the calling thread writes the message itself, without blocking
        (the forwarding thread is not woken). Before that, or when the child's pipe is full, the
        calls wait in the deque and the forwarding thread writes them.
        """
        with self._lock:
            if self._closed or self._retired:
                return False
            if self._ready and not self._calls and not self._outbox:
                self._write_now(calls)
            else:
                self._calls.extend(calls)
                self._wake()
        return True

    def _write_now(self, calls: Sequence[RunService]) -> None:
        """Write `calls` to the child's pipe without blocking; what does not fit is the forwarding thread's to write.

        Called with the lock held. The calls join `_in_child` first, so that a report that comes back at
        once finds its call; if nothing could be written (the child is gone), they leave it again, and the
        pool re-sends them when the worker's death is reported.
        """
        frame = _frame(pickle.dumps(tuple(map(_encode_call, calls)), protocol=pickle.HIGHEST_PROTOCOL))
        for call in calls:
            self._in_child.add(call)
        try:
            sent = self._sock.send(frame, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            for call in calls:
                self._in_child.settle(call.call_id)
            return
        if sent < len(frame):
            self._outbox = memoryview(frame)[sent:]
            self._wake()

    def retire(self) -> None:
        """Stop the worker: queued calls are dropped, a running call is killed with its child."""
        with self._lock:
            self._retired = True
            if not self._closed:
                self._wake()

    def withdraw(self, call_id: int) -> bool:
        """Take back a call still queued here (not yet written to the child's pipe). True if it was."""
        with self._lock:
            for call in self._calls:
                if call.call_id == call_id:
                    self._calls.remove(call)
                    return True
        return False

    def join(self, timeout: float) -> bool:
        """Wait until the child is gone and reaped; False if it is still being stopped."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def finished(self) -> bool:
        """True once the forwarding thread has ended (its child is gone)."""
        return not self._thread.is_alive()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the thread
            os.write(self._wake_w, b"\0")

    # --- the forwarding thread --------------------------------------------------------------------

    def _run(self) -> None:
        self._threads.record_current("worker")
        why: str | None = None
        try:
            why = self._serve()
        except Exception as exc:  # noqa: BLE001 - our own bug: report it, the pool replaces the worker
            why = f"forwarding thread failed with {type(exc).__name__}: {exc}"
            self._log.error(WORKER_FORWARDING_FAILED, worker=self.name, error_type=type(exc).__name__, error=str(exc))
        finally:
            with self._lock:
                self._closed = True
            if why is not None and not self._retired:
                self._on_death(self.name, why, cannot_load=self._cannot_load)
            self._stop_child()
            with self._lock:
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _serve(self) -> str | None:
        """Run calls until retired (None) or the child ends (the reason, when `on_death` should hear it)."""
        if self._retired:
            return None
        self._process.start()
        assert self._child_conn is not None
        self._child_conn.close()  # the child holds its end now; ours would hide its end-of-file
        self._child_conn = None
        self.pid = self._process.pid
        self.node = f"pid:{self.pid}"
        # One selector for the worker's life (epoll on Linux): far cheaper per call than connection.wait().
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
            selector.register(self._conn, selectors.EVENT_READ, _REPORT)
            selector.register(self._process.sentinel, selectors.EVENT_READ, _EXIT)
            why = self._await_ready(selector)
            if why is not None or self._retired:
                return why
            with self._lock:
                self._ready = True
            while True:
                self._feed_child(selector)
                stirred = self._wait(selector)
                if self._retired:
                    return None
                if stirred and not self._take_reports(stirred):
                    if self._crashed:
                        return None  # the crashed call's report tells the pool to replace us
                    return f"worker process {self.node} exited with code {self._exit_code()} while idle"

    def _wait(self, selector: selectors.BaseSelector) -> set[str]:
        """Wait for the wake-up pipe or the child; what the child did: {_REPORT} and/or {_EXIT}, or nothing."""
        stirred = set()
        for key, events in selector.select():
            if key.data is _WAKE:
                self._drain_wake()
            elif events & selectors.EVENT_READ:  # a writable pipe only needs the next `_feed_child`
                stirred.add(key.data)
        return stirred

    def _await_ready(self, selector: selectors.BaseSelector) -> str | None:
        """Wait for the child's hello; calls wait in the deque meanwhile. The reason if it never comes."""
        while not self._retired:
            stirred = self._wait(selector)
            if not stirred or self._retired:
                continue
            hello = self._receive(stirred)
            if isinstance(hello, tuple) and hello[:1] == ("ready",):
                return None
            if isinstance(hello, tuple) and hello[:1] == ("load_failed",):
                self._log.error(WORKER_LOAD_FAILED, worker=self.name, node=self.node, error=hello[1])
                self._cannot_load = True
                return f"worker process {self.node} cannot load its service function: {hello[1]}"
            return (
                f"worker process {self.node} exited with code {self._exit_code()} before it was ready (its own "
                "error output, on this process's stderr, says why)"
            )
        return None

    def _receive(self, stirred: set[str]) -> Any:
        """The child's next message, or _DIED once it is gone (end-of-file is a readable pipe too).

        A child may write its last report and exit at once: what the pipe holds is read before the exit counts.
        """
        try:
            if _REPORT in stirred or self._conn.poll():
                return pickle.loads(self._conn.recv_bytes())  # noqa: S301 - our own child pickled it
        except (EOFError, OSError):
            return _DIED
        return _DIED

    def _take_reports(self, stirred: set[str]) -> bool:
        """Read every report the pipe holds and deliver them in one message. False once the child is gone.

        The child writes each report as soon as its call ends (a report it held back would be lost
        with it, and its call run twice); reports that piled up while this thread waited for the
        GIL reach the orchestrator together, as one `ServicesDone`.
        """
        dones: list[ServiceDone] = []
        # Once the child has exited, everything it wrote must be read before its death counts.
        alive = self._read_inbox(until_empty=_EXIT in stirred)
        for report in self._reports():
            done = self._finish(report)
            dones.append(done)
            if done.status == "crashed":
                self._crashed = True  # the child exits after such a report: nothing more will come
                alive = False
                break
        if _EXIT in stirred:
            alive = False  # the child has exited, and what it wrote before has just been read
        if not alive:
            with self._lock:
                self._closed = True  # no more writes: `_in_child` holds what the child held
            if self._in_child and not self._crashed:
                self._crashed = True
                dones.append(self._death_during_call())
        deliver_reports(self._deliver, dones)
        return alive

    def _read_inbox(self, *, until_empty: bool) -> bool:
        """Append what the child's pipe holds to the inbox; False at end-of-file.

        One read nearly always takes it all; more follow while reads come back full (a large report,
        read in growing chunks), or, with `until_empty`, until the pipe is empty.
        """
        while True:
            size = max(_READ_SIZE, len(self._inbox))
            try:
                data = self._sock.recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._inbox += data
            if len(data) < size and not until_empty:
                return True

    def _reports(self) -> Iterator[tuple[Any, ...] | BaseException]:
        """The complete reports in the inbox, in order (a partial one stays for the next read).

        A report that cannot be unpickled here is given as the exception that says why: the child
        pickled it, but its value needs something this process lacks. It is its call's alone.
        """
        inbox = self._inbox
        start = 0
        while len(inbox) - start >= 4:
            (size,) = _HEADER.unpack_from(inbox, start)
            begin = start + 4
            if size == -1:  # over 2 GiB: an 8-byte length follows (multiprocessing's framing)
                if len(inbox) - begin < 8:
                    break
                (size,) = _LONG_HEADER.unpack_from(inbox, begin)
                begin += 8
            if len(inbox) - begin < size:
                break
            start = begin + size
            try:
                report = pickle.loads(inbox[begin:start])  # noqa: S301 - our own child pickled it
            except Exception as exc:  # noqa: BLE001 - the user's value: any failure to rebuild it is its call's
                report = exc
            yield report
        del inbox[:start]

    def _feed_child(self, selector: selectors.BaseSelector) -> None:
        """Write the outbox, then what waits in the deque, to the child, as far as its pipe takes it now.

        Never blocks: a child busy with a hung call may leave its pipe full, and this thread must
        still see a retirement (to kill it) and the child's reports. What is left waits for the
        pipe to be writable (the selector watches for it meanwhile).
        """
        while not self._retired:
            with self._lock:
                if not self._outbox:
                    calls = list(self._calls)
                    self._calls.clear()
                    if not calls:
                        break
                    message = pickle.dumps(tuple(map(_encode_call, calls)), protocol=pickle.HIGHEST_PROTOCOL)
                    self._outbox = memoryview(_frame(message))
                    for call in calls:
                        self._in_child.add(call)  # the head call's start is kept for a death during it
                outbox = self._outbox
            try:
                sent = self._sock.send(outbox, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = len(outbox)  # the child is gone: the wait sees it, and the pool re-sends what it held
            with self._lock:
                self._outbox = outbox[sent:]  # `send_many` queues calls in the deque while the outbox is not empty
            if sent < len(outbox):
                break
        wants = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox and not self._retired else 0)
        if wants != self._watching:
            selector.modify(self._conn, wants, _REPORT)
            self._watching = wants

    def _finish(self, report: tuple[Any, ...] | BaseException) -> ServiceDone:
        """The head call's report, logged; the next call is the head now."""
        call = self._in_child.head()
        assert call is not None, "a report with no call in the child"
        if isinstance(report, BaseException):  # its value could not be rebuilt here: its call fails, alone
            duration_ms = self._in_child.running_ms()
            self._in_child.settle(call.call_id)
            why = f"the value returned by stage {call.service!r} cannot be read in the runtime's process: "
            error_type = type(report).__name__
            why += describe_error(report)
            return report_failure(self._log, call, self.name, self.node, "permanent", error_type, why, duration_ms)
        call_id, status, result, error_type, error, duration_ms, started_at, formatted = report
        if call_id != call.call_id:  # the child answers in order; anything else is our bug
            raise RuntimeError(f"worker process {self.node} answered call {call_id}, not {call.call_id}")
        done = ServiceDone(
            call_id,
            call.service,
            call.task.task_id,
            self.name,
            status,
            result,
            error_type,
            error,
            duration_ms,
            self.node,
            started_at,
            formatted,
        )
        self._in_child.settle(call_id)
        return log_done(self._log, call, done)

    def _death_during_call(self) -> ServiceDone:
        """The child died running the head call: that call crashed. Those behind it never started."""
        error = f"worker process {self.node} exited with code {self._exit_code()} during the call"
        return self._in_child.blame_head(self._log, self.name, self.node, "WorkerProcessDied", error)

    def _drain_wake(self) -> None:
        # One read nearly always empties the pipe (one byte per send); a short read proves it, saving
        # the syscall and the BlockingIOError a second read would cost on every wake-up.
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass

    def _exit_code(self) -> str:
        self._process.join(_IDLE_EXIT_S)
        code = self._process.exitcode
        if code is None:
            return "(still running)"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"{code} ({signal.Signals(-code).name})"
        return str(code)

    def _stop_child(self) -> None:
        """Make sure the child is gone and reaped: ask an idle one to exit, then SIGTERM, then SIGKILL."""
        process = self._process
        if self.pid is None:
            if self._child_conn is not None:
                self._child_conn.close()
            self._conn.close()
            self._sock.close()
            return
        if process.exitcode is None and not self._in_child:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send_bytes(_STOP)
            process.join(_IDLE_EXIT_S)
        if process.exitcode is None:
            process.terminate()
            process.join(_TERM_GRACE_S)
        if process.exitcode is None:
            process.kill()
            process.join(_KILL_WAIT_S)
        self._conn.close()
        self._sock.close()
        if process.exitcode is None:
            self._log.error(WORKER_UNKILLABLE, worker=self.name, node=self.node)
            return
        if process.exitcode != 0 and self._retired:
            self._log.info(WORKER_KILLED, worker=self.name, node=self.node, exit_code=self._exit_code())
        process.close()


_HEADER: Final = struct.Struct("!i")
_LONG_HEADER: Final = struct.Struct("!Q")
_READ_SIZE: Final = 1 << 16
"""Bytes read from a child's pipe at a time (several reports of ordinary size)."""


def _frame(message: bytes) -> bytes:
    """A message framed as `multiprocessing.connection.Connection.send_bytes` frames it."""
    if len(message) > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(len(message)) + message
    return _HEADER.pack(len(message)) + message


def _encode_call(call: RunService) -> tuple[Any, ...]:
    """A call as plain tuples and the frozen payload: about 3x cheaper to pickle than the dataclasses."""
    task, trace = call.task, call.trace
    return (
        call.call_id,
        call.service,
        task.task_id,
        task.payload,
        task.attempt,
        trace.trace_id,
        trace.span_id,
        trace.parent_span_id,
        call.attempt,
        call.value,
        call.pipeline,
        call.max_value_bytes,
    )


def _encode_report(done: ServiceDone) -> bytes:
    """A call's report as the child sends it; never raises.

    A result that cannot be pickled (user code: a `__reduce__` may raise)
    becomes a permanent failure of its own call, saying so: the child lives
    on, and no other call is charged.
    """
    try:
        return pickle.dumps(_report_fields(done), protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - whatever pickling the user's value raises, it cannot cross
        failed = unsendable(done, exc, "from the worker process to the runtime")
        return pickle.dumps(_report_fields(failed), protocol=pickle.HIGHEST_PROTOCOL)


def _report_fields(done: ServiceDone) -> tuple[Any, ...]:
    return (
        done.call_id,
        done.status,
        done.result,
        done.error_type,
        done.error,
        done.duration_ms,
        done.started_at,
        done.traceback,
    )


def _decode_call(wire: tuple[Any, ...]) -> RunService:
    (
        call_id,
        service,
        task_id,
        payload,
        task_attempt,
        trace_id,
        span_id,
        parent_span_id,
        attempt,
        value,
        pipeline,
        max_value_bytes,
    ) = wire
    return RunService(
        call_id,
        service,
        Task(task_id, payload, task_attempt),
        TraceContext(trace_id, span_id, parent_span_id),
        attempt,
        value,
        pipeline,
        max_value_bytes=max_value_bytes,
    )


# --- one worker, child side ----------------------------------------------------------------------


def _die_with_parent() -> bool:
    """Make sure no worker outlives a runtime killed with SIGKILL. False if the parent is already gone.

    An idle child sees end-of-file on its pipe anyway; a child hung in a call
    would not. A watchdog thread waits on the parent's sentinel and ends the
    process when the parent dies (it needs the GIL, which any Python code and
    most blocking calls give up). On Linux the kernel also SIGKILLs the child
    when its parent process dies: that covers a "spawn" child stuck in C code
    that holds the GIL (a "forkserver" child's parent is the fork server, which
    outlives the runtime while any of its children lives).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is None:
        return True
    sentinel = parent.sentinel
    if connection.wait([sentinel], timeout=0):
        return False  # it died before the watchdog was set
    threading.Thread(target=_exit_when_ready, args=(sentinel,), name="actorflow-parent-watch", daemon=True).start()
    return True


def _exit_when_ready(sentinel: int) -> None:
    connection.wait([sentinel])
    os._exit(1)


def _import_main(main: tuple[str, str] | None) -> str | None:
    """Import the parent's main module, as multiprocessing's spawn does (a stage may live there); why not, if it fails.

    As during spawn's own import, the process is marked as still starting:
    a script that starts a runtime (or any process) at import, instead of
    under ``if __name__ == "__main__":``, then raises at once, here, rather
    than starting a runtime of its own inside the worker.
    """
    if main is None:
        return None
    kind, where = main
    process: Any = multiprocessing.current_process()
    process._inheriting = True
    try:
        if kind == "name":
            spawn._fixup_main_from_name(where)  # type: ignore[attr-defined]
        else:
            spawn._fixup_main_from_path(where)  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - whatever the script raises is the reason the worker cannot start
        return _main_failure(where, exc)
    finally:
        del process._inheriting
    return None


def _main_failure(where: str, exc: BaseException) -> str:
    """Why importing the main module `where` failed, in one line, with the script's own line that raised."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == where]
    at = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames and frames[-1].line else ""
    text = " ".join(describe_error(exc).split())
    # multiprocessing refuses to start a process there: a daemonic worker may have no children, and a
    # process still starting may not start any (the two texts of CPython 3.11-3.13).
    if isinstance(exc, (AssertionError, RuntimeError)) and any(sign in text for sign in _STARTS_A_PROCESS):
        return (
            f"importing the main module {where!r} starts a runtime or a process{at}; every worker process "
            'imports that module, so it must keep such work under `if __name__ == "__main__":`'
        )
    return f"importing the main module {where!r} failed{at}: {type(exc).__name__}: {text[:_REASON_CHARS]}"


_STARTS_A_PROCESS: Final = ("daemonic processes are not allowed to have children", "bootstrapping phase")
_REASON_CHARS: Final = 1000
"""The most characters of a child's own error quoted in the reason a worker could not start."""


def _child_main(conn: connection.Connection, pickled_fn: bytes, name: str, main: tuple[str, str] | None = None) -> None:
    """A worker process: import the parent's main module, load the function, then run calls one at a time.

    Protocol, one pickle per message: the child first sends ``("ready", node)``
    or ``("load_failed", why)``; then each message from the parent is a tuple
    of one or more calls (`_encode_call`), and the child answers each call,
    in order, with exactly one report ``(call_id, status, result, error_type,
    error, duration_ms, started_at, traceback)``, written as soon as the call
    ends. `_STOP` or end-of-file ends it; so does a ``crashed`` call, after
    its report (the calls after it in its batch never start).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    if not _die_with_parent():
        return
    node = f"pid:{os.getpid()}"
    failure = _import_main(main)
    if failure is None:
        try:
            fn = pickle.loads(pickled_fn)  # noqa: S301 - our own parent pickled it
        except BaseException as exc:  # noqa: BLE001 - report any failure to load, then end
            failure = f"{type(exc).__name__}: {describe_error(exc)[:_REASON_CHARS]}"
    if failure is not None:
        with contextlib.suppress(OSError):
            conn.send_bytes(pickle.dumps(("load_failed", failure)))
        return
    conn.send_bytes(pickle.dumps(("ready", node)))
    log = SilentLog(name)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        if message == _STOP:
            return
        for wire in pickle.loads(message):  # noqa: S301 - our own parent pickled it
            done = execute(fn, _decode_call(wire), name, log=log, node=node)
            try:
                conn.send_bytes(_encode_report(done))
            except OSError:
                return
            if done.status == "crashed":
                return  # after a SystemExit & co. this interpreter is not to be trusted: the pool replaces us
