"""The process backend: service calls in worker processes, under the thread workers' supervision rules.

Every test runs real child processes (the default "forkserver" start method,
and "spawn" once). Cross-process synchronisation goes through a Unix-socket
rendezvous (`tests.process_services`) or a pidfd, never through sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from actorflow.actors import Runtime
from actorflow.actors.backends.process import (
    _STOP,
    ProcessBackend,
    ProcessWorker,
    _child_main,
    _context,
    _decode_call,
    _encode_call,
)
from actorflow.actors.deadletters import DeadLetterOffice
from actorflow.actors.messages import RunService, ServiceDone, ServicesDone
from actorflow.actors.threads import ThreadBook
from actorflow.cli.demo import _payloads as demo_payloads
from actorflow.core import ConfigError, RuntimeConfig, Task, TaskRecord, TaskState
from actorflow.core.tracing import TraceContext
from actorflow.core.types import freeze
from actorflow.services import ServiceSet
from actorflow.services.seed import ProcessStage
from tests import process_services as ps
from tests.conftest import actor_threads, payload

S = TaskState
pytestmark = pytest.mark.timeout(90)


def process_config(**overrides: Any) -> RuntimeConfig:
    fields: dict[str, Any] = {"service_backend": "process"}
    fields.update(overrides)
    return RuntimeConfig(**fields)


def on_processes(processors: int = 2, **functions: Any) -> ServiceSet:
    """The seed pipeline with `functions`, on few processes: one validator, `processors` processors, one persistence."""
    return ServiceSet(**functions, workers={"validator": 1, "processor": processors, "persistence": 1})


def run_all(runtime: Runtime, payloads: list[dict[str, Any]], timeout: float = 60) -> list[TaskRecord]:
    handles = [runtime.submit(p) for p in payloads]
    return [h.result(timeout=timeout) for h in handles]


# --- helpers: processes as the kernel sees them -------------------------------------------------


def worker_pids() -> set[int]:
    """Pids of the live worker processes of this test process (multiprocessing's bookkeeping)."""
    return {p.pid for p in multiprocessing.active_children() if p.name.startswith("actorflow-") and p.pid}


def exists(pid: int) -> bool:
    """True if `pid` is a process, zombies included (a zombie still has its /proc entry)."""
    return Path(f"/proc/{pid}").exists()


def children_of(pid: int) -> dict[int, str]:
    """Every process whose parent is `pid`, with its command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def multiprocessing_helper(cmdline: str) -> bool:
    """multiprocessing's own long-lived helpers: the fork server and the resource tracker."""
    return "multiprocessing.forkserver" in cmdline or "multiprocessing.resource_tracker" in cmdline


@contextlib.contextmanager
def watching(pid: int) -> Iterator[Callable[[float], bool]]:
    """A pidfd on `pid`, opened now; yields `ended(timeout)`, True once the process has terminated."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone and reaped
        yield lambda timeout: True
        return
    try:

        def ended(timeout: float) -> bool:
            readable, _, _ = select.select([fd], [], [], timeout)
            return bool(readable)

        yield ended
    finally:
        os.close(fd)


def service_events(logs: Sequence[Mapping[str, Any]], event: str, service: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == event and e.get("service") == service]


# --- the pipeline -------------------------------------------------------------------------------


def test_the_demo_pipeline_on_processes_ends_in_the_same_states_and_results_as_on_threads() -> None:
    payloads = demo_payloads(24)
    outcomes = {}
    for backend in ("thread", "process"):
        with Runtime(RuntimeConfig(service_backend=backend)) as runtime:
            records = run_all(runtime, payloads)
            assert runtime.results is not None
            stored = {r.task_id: runtime.results.get(r.task_id) for r in records}
        outcomes[backend] = [
            (r.state, r.path(), r.result, r.error, stored[r.task_id], r.calls, r.payload) for r in records
        ]
    assert outcomes["process"] == outcomes["thread"]
    assert {o[0] for o in outcomes["process"]} == {S.COMPLETED, S.FAILED}


def test_a_frozen_payload_crosses_to_the_child_and_its_result_comes_back() -> None:
    with Runtime(process_config(), services=on_processes(process=ps.describe)) as runtime:
        record = runtime.submit({"name": "x", "data": {"items": [1, [2, 3], {"k": "v"}]}}).result(timeout=30)
    assert record.state is S.COMPLETED, record.error
    result = record.result
    assert result is not None
    assert result["in_child"] is True
    assert result["pid"] != os.getpid()
    assert (result["payload_type"], result["data_type"], result["items_type"]) == ("FrozenDict", "FrozenDict", "tuple")
    assert result["frozen"] is True
    assert result["items"] == (1, (2, 3), {"k": "v"})
    assert result["task_id"] == record.task_id


def test_service_events_carry_the_thread_backends_fields_plus_the_node_that_ran_the_call() -> None:
    services = on_processes(process=ps.describe)
    logs = {}
    results = {}
    for backend in ("thread", "process"):
        with (
            structlog.testing.capture_logs() as captured,
            Runtime(process_config(service_backend=backend), services=services) as runtime,
        ):
            ok = runtime.submit({"name": "ok", "data": {"items": []}}).result(timeout=30)
        logs[backend] = captured
        assert ok.state is S.COMPLETED
        assert ok.result is not None
        results[backend] = ok.result
    with (
        structlog.testing.capture_logs() as failing_logs,
        Runtime(process_config(), services=on_processes(process=ps.fail_permanently)) as runtime,
    ):
        failed = runtime.submit(payload()).result(timeout=30)
    assert failed.state is S.FAILED
    assert failed.error is not None
    assert "ValueError: cannot compute" in failed.error

    (on_thread,) = service_events(logs["thread"], "service.call", "processor")
    (on_process,) = service_events(logs["process"], "service.call", "processor")
    assert set(on_process) == set(on_thread) | {"node"}
    assert on_process["node"] == f"pid:{results['process']['pid']}"
    assert "node" not in on_thread
    (finished,) = service_events(logs["process"], "service.call", "processor")
    assert finished["duration_ms"] > 0
    assert finished["status"] == "ok"
    assert 0 < finished["started_at"] <= time.time()  # measured in the child
    assert finished["trace_id"] == ok.trace_id  # `ok` is the task that ran on processes
    (failure,) = service_events(failing_logs, "service.failed", "processor")
    assert failure["error_type"] == "ValueError"
    assert failure["transient"] is False
    assert failure["node"].startswith("pid:")
    assert {"task_id", "trace_id", "span_id", "parent_span_id", "worker", "attempt", "duration_ms"} <= set(failure)
    assert failure["status"] == "permanent"
    assert failure["started_at"] > 0


@pytest.mark.parametrize("field", ["validate", "process", "persist"])
@pytest.mark.parametrize("kind", ["lambda", "closure", "local function"])
def test_a_lambda_a_closure_or_a_local_function_gets_a_config_error_naming_it(field: str, kind: str) -> None:
    secret = 42

    def local(*args: Any) -> Mapping[str, Any]:
        return {"secret": secret}

    def make_closure() -> Callable[..., Any]:
        factor = 2
        return lambda *args: {"double": factor * 2}

    fn: Any = {"lambda": lambda *args: {}, "closure": make_closure(), "local function": local}[kind]
    before = set(actor_threads())
    with pytest.raises(ConfigError) as caught:
        Runtime(process_config(), services=on_processes(**{field: fn}))
    message = str(caught.value)
    assert message.startswith(f"ServiceSet.{field} {fn!r} cannot be sent to worker processes")
    assert "define it at module level" in message
    assert worker_pids() == set()
    assert set(actor_threads()) - before == set()


def test_the_same_functions_run_on_threads_without_complaint() -> None:
    with Runtime(RuntimeConfig(), services=ServiceSet(process=lambda task: {"ok": True})) as runtime:
        assert runtime.submit(payload()).result(timeout=30).state is S.COMPLETED


# --- supervision --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "error_type"),
    [
        (ps.exit_on_first_attempt, "SystemExit"),
        (ps.os_exit_on_first_attempt, "WorkerProcessDied"),
        (ps.sigkill_self_on_first_attempt, "WorkerProcessDied"),
    ],
    ids=["SystemExit", "os._exit", "kill -9"],
)
def test_a_child_that_crashes_during_a_call_is_replaced_and_the_task_retried(
    service: Callable[[Task], Mapping[str, Any]], error_type: str
) -> None:
    with (
        structlog.testing.capture_logs() as logs,
        Runtime(process_config(retry_backoff_s=0.0), services=on_processes(process=service)) as runtime,
    ):
        record = runtime.submit(payload()).result(timeout=30)
        stats = runtime.stats()
        crashed_pid = int(service_events(logs, "service.failed", "processor")[0]["node"].removeprefix("pid:"))
        with watching(crashed_pid) as ended:
            assert ended(10), "the crashed child is still running"
    assert record.state is S.COMPLETED, record.error
    assert record.result is not None
    assert record.result["attempt"] == 2
    assert record.result["pid"] != crashed_pid
    (failure,) = service_events(logs, "service.failed", "processor")
    assert failure["error_type"] == error_type
    assert failure["transient"] is True
    assert failure["attempt"] == 1
    processor = stats["pools"]["processor"]
    assert (processor["workers"], processor["size"], processor["restarts"], processor["failing"]) == (2, 2, 1, None)
    assert (stats["restarts"], stats["retries"]) == (1, 1)
    assert not exists(crashed_pid)


def test_a_child_killed_while_idle_is_replaced_without_charging_the_next_task() -> None:
    with Runtime(process_config(), services=on_processes(1, process=ps.describe)) as runtime:
        first = runtime.submit({"name": "a", "data": {"items": []}}).result(timeout=30)
        assert first.result is not None
        victim = first.result["pid"]
        with watching(victim) as ended:
            os.kill(victim, 9)
            assert ended(10)
        second = runtime.submit({"name": "b", "data": {"items": []}}).result(timeout=30)
        stats = runtime.stats()
    assert second.state is S.COMPLETED, second.error
    assert second.result is not None
    assert second.result["pid"] != victim
    assert (second.calls, second.retries) == (first.calls, 0)  # the call was re-sent, not retried
    assert stats["retries"] == 0
    processor = stats["pools"]["processor"]
    assert (processor["workers"], processor["restarts"], processor["failing"]) == (1, 1, None)


def test_a_hung_call_is_killed_at_the_stage_timeout_and_retried_on_a_fresh_child() -> None:
    with (
        ps.rendezvous() as point,
        Runtime(
            process_config(stage_timeout_s=1.0, retry_backoff_s=0.0),
            services=on_processes(1, process=ps.hang_on_first_attempt),
        ) as runtime,
    ):
        handle = runtime.submit({"name": "hang", "data": {"rendezvous": point.path}})
        (hung_pid,) = point.arrivals(1)
        with watching(hung_pid) as ended:
            assert ended(30), "the hung child was not killed"
        record = handle.result(timeout=30)
        stats = runtime.stats()
    assert record.state is S.COMPLETED, record.error
    assert record.result is not None
    assert record.result["attempt"] == 2
    assert record.result["pid"] != hung_pid
    assert (stats["timeouts"], stats["restarts"], stats["retries"]) == (1, 1, 1)
    assert stats["pools"]["processor"]["workers"] == 1
    assert stats["late_results"] == 0  # the killed call never answered
    assert not exists(hung_pid)


def test_a_function_that_cannot_be_loaded_in_the_child_fails_its_tasks_at_once_with_the_childs_own_error() -> None:
    with (
        structlog.testing.capture_logs() as logs,
        Runtime(
            process_config(max_restarts=1),
            services=on_processes(1, process=ps.LoadsOnlyInTheParent()),
        ) as runtime,
    ):
        records = run_all(runtime, [{"name": f"x{i}", "data": {"items": []}} for i in range(3)], timeout=30)
    for record in records:
        assert record.state is S.FAILED
        assert record.error is not None
        assert record.error.startswith("processor: worker process pid:")
        assert "cannot load its service function: ImportError: this function cannot be loaded" in record.error
        assert record.calls == 1  # the validator's call; the processor's never ran, so it is not counted
    load_failures = [e for e in logs if e["event"] == "worker.load_failed"]
    assert load_failures
    assert "ImportError: this function cannot be loaded in a worker process" in load_failures[0]["error"]
    restarted = [e for e in logs if e["event"] == "worker.restarted" and e["service"] == "processor"]
    assert "cannot load its service function" in restarted[0]["why"]


@pytest.mark.timeout(60)
def test_a_script_that_starts_its_runtime_outside_the_main_guard_fails_its_tasks_at_once_saying_so(
    tmp_path: Path,
) -> None:
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from actorflow import Pipeline, Runtime, Stage\n"
        "def square(task, value):\n"
        "    return {'n': value['n'] ** 2}\n"
        "runtime = Runtime(pipelines=[Pipeline('p', [Stage('square', square, backend='process')])])\n"
        "record = runtime.submit({'n': 3}).result(timeout=30)\n"
        "print(record.state.value, record.calls)\n"
        "print(record.error)\n"
        "runtime.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, env=env, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state, error = done.stdout.splitlines()[:2]
    assert state == "FAILED 0"
    assert error.startswith("square: worker process pid:")
    assert f"importing the main module {str(script)!r} starts a runtime or a process" in error
    assert "(line 4: runtime = Runtime(" in error
    assert 'under `if __name__ == "__main__":`' in error
    assert "is failing" not in error  # at once: the first worker's own error, not a restart count


@pytest.mark.slow
def test_chaos_on_processes_leaves_every_task_in_its_expected_state_and_the_pool_whole() -> None:
    # Per attempt: 10% TransientError, 2% ValueError, 1% SystemExit, 1% os._exit, 0.5% kill -9, 0.5% hang.
    config = process_config(stage_timeout_s=1.0, max_restarts=10_000, retry_backoff_s=0.001, retry_backoff_max_s=0.01)
    ids = [f"chaos-{i}" for i in range(1000)]
    with Runtime(config, services=on_processes(4, process=ps.chaos)) as runtime:
        handles = [runtime.submit(payload(i), task_id=task_id) for i, task_id in enumerate(ids)]
        records = [h.result(timeout=120) for h in handles]
        stats = runtime.stats()
    wrong = [(r.task_id, r.state.value, r.error) for r in records if r.state.value != ps.chaos_expected(r.task_id, 3)]
    assert wrong == []
    assert stats["COMPLETED"] + stats["FAILED"] == len(ids)
    assert stats["in_flight"] == 0
    assert stats["restarts"] > 0
    assert stats["timeouts"] > 0
    processor = stats["pools"]["processor"]
    assert (processor["workers"], processor["failing"]) == (4, None)
    assert worker_pids() == set()


# --- parallelism and clean-up -------------------------------------------------------------------


def test_two_process_workers_run_two_calls_at_the_same_time_in_two_processes() -> None:
    with (
        ps.rendezvous() as point,
        Runtime(process_config(), services=on_processes(process=ps.meet)) as runtime,
    ):
        handles = [runtime.submit({"name": f"meet-{i}", "data": {"rendezvous": point.path}}) for i in range(2)]
        # Each call waits for "go" after arriving: the second can arrive only while the first is still running.
        pids = point.arrivals(2)
        point.release_all()
        records = [h.result(timeout=30) for h in handles]
    assert len(set(pids)) == 2
    assert os.getpid() not in pids
    assert {r.result["pid"] for r in records if r.result is not None} == set(pids)


def test_close_leaves_no_worker_process_no_zombie_and_no_forwarding_thread() -> None:
    before = set(actor_threads())
    runtime = Runtime(RuntimeConfig(service_backend="process"), services=ServiceSet(workers={"processor": 3}))
    run_all(runtime, [payload(i) for i in range(20)])
    pids = worker_pids()
    # At least the validator and the processor that served calls; at most every validator and processor
    # (the in-memory persistence runs on threads in the parent).
    assert 2 <= len(pids) <= 2 + 3
    runtime.close()
    assert worker_pids() == set()
    assert not [pid for pid in pids if exists(pid)]
    strays = {pid: cmd for pid, cmd in children_of(os.getpid()).items() if not multiprocessing_helper(cmd)}
    assert strays == {}
    assert set(actor_threads()) - before == set()


def test_close_without_draining_kills_calls_still_running() -> None:
    with ps.rendezvous() as point:
        runtime = Runtime(process_config(), services=on_processes(1, process=ps.hang_on_first_attempt))
        runtime.submit({"name": "hang", "data": {"rendezvous": point.path}})
        (hung_pid,) = point.arrivals(1)
        runtime.close(drain=False)
        assert not exists(hung_pid)
        assert worker_pids() == set()


_HOST_PROGRAM = """
import sys
import time
from actorflow.actors import Runtime
from actorflow.core import RuntimeConfig
from actorflow.services import ServiceSet
from tests import process_services as ps

runtime = Runtime(RuntimeConfig(service_backend="process"), services=ServiceSet(process=ps.hang_on_first_attempt))
runtime.submit({"name": "hang", "data": {"rendezvous": sys.argv[1]}})
sys.stdin.read()  # until the test kills us
"""


@pytest.mark.slow
def test_a_runtime_killed_with_sigkill_leaves_no_worker_behind_even_one_hung_in_a_call() -> None:
    with ps.rendezvous() as point:
        host = subprocess.Popen(
            [sys.executable, "-c", _HOST_PROGRAM, point.path],
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            (hung_pid,) = point.arrivals(1)
            with watching(hung_pid) as ended:
                host.kill()
                assert ended(30), "the hung worker outlived its runtime"
        finally:
            host.kill()
            assert host.stdin is not None
            host.stdin.close()
            host.wait(30)


_FORGETFUL_PROGRAM = """
import sys
import time
from actorflow.actors import Runtime
from actorflow.core import RuntimeConfig
from actorflow.core.tracing import configure_logging
from actorflow.services import ServiceSet
from tests import process_services as ps

configure_logging(level="INFO", colors=False)
runtime = Runtime(RuntimeConfig(service_backend="process"), services=ServiceSet(process=ps.hang_on_first_attempt))
runtime.submit({"name": "hang", "data": {"rendezvous": sys.argv[1]}})
sys.stdin.read()  # until the test says: exit now, without closing the runtime
"""


def test_a_runtime_left_open_at_exit_stops_its_workers_and_the_interpreter_exits() -> None:
    # multiprocessing's exit handler would SIGTERM the workers, the pools would start new ones, and
    # the interpreter would hang joining them; the backend closes forgotten runtimes before it runs.
    with ps.rendezvous() as point:
        host = subprocess.Popen(
            [sys.executable, "-c", _FORGETFUL_PROGRAM, point.path],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        try:
            (hung_pid,) = point.arrivals(1)
            with watching(hung_pid) as ended:
                _, log = host.communicate(timeout=30)  # closes its stdin: the program ends
                assert ended(10), "the hung worker outlived the interpreter's exit"
        finally:
            host.kill()
            host.communicate(timeout=30)
    assert host.returncode == 0, log
    assert "runtime.stopped" in log
    assert "worker.restarted" not in log  # stopped in order, not killed from under the pools


def test_a_file_result_store_is_written_from_the_worker_processes(tmp_path: Path) -> None:
    store = str(tmp_path / "results.db")
    with (
        structlog.testing.capture_logs() as logs,
        Runtime(process_config(result_store=store), services=on_processes()) as runtime,
    ):
        records = run_all(runtime, [payload(i) for i in range(6)])
        assert runtime.results is not None
        assert all(runtime.results.get(r.task_id) == r.result for r in records)
    persisted = service_events(logs, "service.call", "persistence")
    assert len(persisted) == 6
    assert all(e["node"].startswith("pid:") for e in persisted)


def test_the_default_in_memory_result_store_is_written_from_the_parent() -> None:
    with structlog.testing.capture_logs() as logs, Runtime(process_config(), services=on_processes()) as runtime:
        records = run_all(runtime, [payload(i) for i in range(6)])
        assert runtime.results is not None
        assert runtime.results.count() == 6
        assert all(runtime.results.get(r.task_id) == r.result for r in records)
    persisted = service_events(logs, "service.call", "persistence")
    assert len(persisted) == 6
    assert not any("node" in e for e in persisted)
    processed = service_events(logs, "service.call", "processor")
    assert all(e["node"].startswith("pid:") for e in processed)


# --- the backend on its own ---------------------------------------------------------------------


class Replies:
    """What a worker delivers, as the orchestrator gets it: single reports and `ServicesDone` batches."""

    def __init__(self) -> None:
        self._messages: queue.SimpleQueue[ServiceDone | ServicesDone] = queue.SimpleQueue()
        self.messages = 0
        """Messages taken so far (a batch counts once)."""
        self._ready: list[ServiceDone] = []

    def put(self, message: ServiceDone | ServicesDone) -> None:
        self._messages.put(message)

    def take(self, count: int, timeout: float = 60) -> list[ServiceDone]:
        """The next `count` reports, in the order delivered, waiting for the messages that carry them."""
        while len(self._ready) < count:
            message = self._messages.get(timeout=timeout)
            self.messages += 1
            self._ready.extend(message.dones if isinstance(message, ServicesDone) else (message,))
        taken, self._ready = self._ready[:count], self._ready[count:]
        return taken

    def empty(self) -> bool:
        """True if nothing more was delivered (and nothing is left over)."""
        return not self._ready and self._messages.empty()


def test_the_spawn_start_method_works_too() -> None:
    replies = Replies()
    deaths: list[tuple[str, str]] = []
    describe = ProcessStage(ps.describe)  # backends run stage functions, fn(task, value)
    backend = ProcessBackend(
        {"processor": describe}, dead_letters=DeadLetterOffice(), threads=ThreadBook(), start_method="spawn"
    )
    worker = backend.start_worker("processor-1", "processor", describe, replies.put, lambda *d: deaths.append(d))
    assert isinstance(worker, ProcessWorker)
    task = Task("t-1", freeze({"name": "x", "data": {"items": [1]}}))
    for call_id in (1, 2):
        assert worker.send(RunService(call_id, "processor", task, TraceContext("a" * 32, "b" * 16), 1))
    first, second = replies.take(2)
    assert (first.call_id, second.call_id) == (1, 2)
    assert first.status == second.status == "ok"
    assert first.result is not None
    assert first.node == f"pid:{first.result['pid']}"
    (pid,) = backend.pids()
    backend.close()
    assert worker.join(0)
    assert deaths == []
    assert not exists(pid)
    assert not worker.send(RunService(3, "processor", task, TraceContext("a" * 32, "b" * 16), 1))


def field_names(cls: type) -> list[str]:
    """The fields of a NamedTuple or a dataclass, in order."""
    named: tuple[str, ...] | None = getattr(cls, "_fields", None)
    return list(named) if named is not None else [f.name for f in dataclasses.fields(cls)]


def test_the_wire_format_carries_every_field_of_a_call_and_of_its_report() -> None:
    # The backend pickles calls as tuples (3x cheaper than the dataclasses). A new field in any of these
    # must be added to `_encode_call`/`_decode_call` or to the report, or it would silently not cross.
    # dispatched_at stays in the parent on purpose: the pool keeps the original call, which the report is matched to.
    assert field_names(RunService) == [
        "call_id",
        "service",
        "task",
        "trace",
        "attempt",
        "value",
        "pipeline",
        "dispatched_at",
        "max_value_bytes",
    ]
    assert field_names(Task) == ["task_id", "payload", "attempt"]
    assert field_names(TraceContext) == ["trace_id", "span_id", "parent_span_id"]
    assert field_names(ServiceDone) == [
        "call_id",
        "service",
        "task_id",
        "worker",
        "status",
        "result",
        "error_type",
        "error",
        "duration_ms",
        "node",
        "started_at",
        "traceback",
    ]
    call = RunService(
        7,
        "persistence",
        Task("t-7", freeze({"name": "x", "data": [1, {"k": None}]}), 2),
        TraceContext("a" * 32, "b" * 16, "c" * 16),
        2,
        freeze({"sha256": "0" * 64}),
        "ingest",
        max_value_bytes=4096,
    )
    assert _decode_call(pickle.loads(pickle.dumps(_encode_call(call)))) == call


def test_the_fork_start_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="start_method 'fork' is not allowed"):
        ProcessBackend({}, dead_letters=DeadLetterOffice(), threads=ThreadBook(), start_method="fork")


# --- batches -------------------------------------------------------------------------------------


def a_call(call_id: int, data: Mapping[str, Any], service: str = "processor") -> RunService:
    task = Task(f"t-{call_id}", freeze({"name": "x", "data": data}))
    return RunService(call_id, service, task, TraceContext("a" * 32, f"{call_id:016x}"), 1)


def test_several_calls_in_one_message_to_a_child_each_get_their_own_report_in_order() -> None:
    # The child's side of the protocol, on a real child: one message carrying three calls, the middle one raising.
    context = _context("forkserver")
    ours, theirs = context.Pipe()
    fn = ProcessStage(ps.fail_if_asked)
    child = context.Process(target=_child_main, args=(theirs, pickle.dumps(fn), "processor-1"), daemon=True)  # type: ignore[attr-defined]
    child.start()
    theirs.close()
    try:
        assert pickle.loads(ours.recv_bytes())[0] == "ready"
        calls = [a_call(1, {}), a_call(2, {"fail": True}), a_call(3, {})]
        ours.send_bytes(pickle.dumps(tuple(_encode_call(c) for c in calls)))
        reports = [pickle.loads(ours.recv_bytes()) for _ in calls]
        ours.send_bytes(_STOP)
        child.join(30)
    finally:
        if child.exitcode is None:
            child.kill()
            child.join(30)
    assert child.exitcode == 0
    assert [r[:2] for r in reports] == [(1, "ok"), (2, "permanent"), (3, "ok")]
    assert [r[2]["task_id"] if r[2] else None for r in reports] == ["t-1", None, "t-3"]
    assert (reports[1][3], reports[1][4]) == ("ValueError", "asked to fail t-2")
    assert reports[0][3:5] == reports[2][3:5] == (None, None)


def test_send_many_gives_each_call_its_own_result_and_a_call_raising_in_the_middle_fails_only_itself() -> None:
    replies = Replies()
    deaths: list[tuple[str, str]] = []
    fn = ProcessStage(ps.fail_if_asked)
    backend = ProcessBackend({"processor": fn}, dead_letters=DeadLetterOffice(), threads=ThreadBook())
    try:
        worker = backend.start_worker("processor-1", "processor", fn, replies.put, lambda *d: deaths.append(d))
        calls = [a_call(i, {"fail": i == 3}) for i in range(1, 6)]
        assert worker.send_many(calls)
        reports = replies.take(len(calls))
    finally:
        backend.close()
    assert [(r.call_id, r.task_id, r.status) for r in reports] == [
        (1, "t-1", "ok"),
        (2, "t-2", "ok"),
        (3, "t-3", "permanent"),
        (4, "t-4", "ok"),
        (5, "t-5", "ok"),
    ]
    assert [r.result["task_id"] if r.result else None for r in reports] == ["t-1", "t-2", None, "t-4", "t-5"]
    assert reports[2].error == "asked to fail t-3"
    assert reports[2].traceback is not None
    assert {r.node for r in reports} == {f"pid:{reports[0].result['pid'] if reports[0].result else 0}"}
    assert deaths == []


def test_a_child_killed_while_it_holds_a_batch_reports_only_the_running_call_as_crashed() -> None:
    replies = Replies()
    deaths: list[tuple[str, str]] = []
    fn = ProcessStage(ps.record_and_hold)
    backend = ProcessBackend({"processor": fn}, dead_letters=DeadLetterOffice(), threads=ThreadBook())
    try:
        with ps.rendezvous() as point:
            worker = backend.start_worker("processor-1", "processor", fn, replies.put, lambda *d: deaths.append(d))
            calls = [a_call(1, {"hold": True, "rendezvous": point.path}), a_call(2, {}), a_call(3, {})]
            assert worker.send_many(calls)  # one message: once call 1 runs, the child holds all three
            (pid,) = point.arrivals(1)
            with watching(pid) as ended:
                os.kill(pid, signal.SIGKILL)
                assert ended(10)
            (report,) = replies.take(1)
            assert worker.join(10), "the forwarding thread outlived its child"
    finally:
        backend.close()
    assert (report.call_id, report.status, report.error_type) == (1, "crashed", "WorkerProcessDied")
    assert "SIGKILL" in (report.error or "")
    assert replies.empty()  # calls 2 and 3 never started: no report, the pool re-sends them
    assert deaths == []  # the crashed call's report is what has the pool replace the worker


def test_a_child_killed_mid_batch_in_a_runtime_has_its_running_task_retried_and_the_rest_run_exactly_once(
    tmp_path: Path,
) -> None:
    runs = str(tmp_path / "runs.txt")
    config = process_config(retry_backoff_s=0.0)
    with (
        ps.rendezvous() as point,
        Runtime(config, services=on_processes(1, process=ps.record_and_hold)) as runtime,
    ):
        held = runtime.submit({"name": "held", "data": {"hold": True, "rendezvous": point.path, "runs": runs}})
        others = [runtime.submit({"name": f"other-{i}", "data": {"runs": runs}}) for i in range(6)]
        (pid,) = point.arrivals(1)
        with watching(pid) as ended:
            os.kill(pid, signal.SIGKILL)
            assert ended(10)
        records = [h.result(timeout=30) for h in [held, *others]]
        stats = runtime.stats()
    assert [r.state for r in records] == [S.COMPLETED] * 7, [r.error for r in records]
    started = Path(runs).read_text().splitlines()
    assert sorted(started) == sorted([f"{held.task_id} 1", f"{held.task_id} 2", *(f"{h.task_id} 1" for h in others)])
    assert (stats["restarts"], stats["retries"]) == (1, 1)


def test_reports_that_pile_up_while_the_parent_is_busy_reach_it_in_fewer_messages_than_calls() -> None:
    # "Busy" is the forwarding thread held inside its first delivery (as when the orchestrator or the GIL
    # is slow); meanwhile the child runs the batch on and writes each report as its call ends.
    first_delivery = threading.Event()
    go_on = threading.Event()
    replies = Replies()

    def deliver(message: ServiceDone | ServicesDone) -> None:
        replies.put(message)
        if not first_delivery.is_set():
            first_delivery.set()
            assert go_on.wait(30)

    fn = ProcessStage(ps.record_and_hold)
    backend = ProcessBackend({"processor": fn}, dead_letters=DeadLetterOffice(), threads=ThreadBook())
    try:
        with ps.rendezvous() as point:
            worker = backend.start_worker("processor-1", "processor", fn, deliver, lambda *d: None)
            calls = [a_call(i, {}) for i in range(1, 8)]
            calls.append(a_call(8, {"hold": True, "rendezvous": point.path}))
            assert worker.send_many(calls)
            point.arrivals(1)  # call 8 runs: the child wrote the reports of calls 1-7 before starting it
            assert first_delivery.wait(30)
            go_on.set()
            reports = replies.take(7)
            point.release_all()
            reports += replies.take(1)
    finally:
        backend.close()
    assert [(r.call_id, r.status) for r in reports] == [(i, "ok") for i in range(1, 9)]
    # The first delivery, then everything the pipe held when the thread came back, then call 8's own.
    assert replies.messages <= 3 < len(calls)


def test_a_process_pool_keeps_the_next_call_waiting_at_its_worker_and_a_thread_pool_does_not() -> None:
    # Depth 2 for slow calls on processes: the child never idles for a round trip through the parent.
    depths = {}
    for backend in ("process", "thread"):
        with Runtime(process_config(service_backend=backend), services=on_processes(process=ps.describe)) as runtime:
            assert runtime.submit({"name": "x", "data": {"items": []}}).result(timeout=30).state is S.COMPLETED
            depths[backend] = runtime.stats()["pools"]["processor"]["depth"]
    assert depths == {"process": 2, "thread": 1}


def test_a_hung_child_with_a_large_call_queued_behind_it_is_still_killed_at_the_stage_timeout() -> None:
    # The queued call (8 MB) cannot fit in the child's pipe while the child hangs: writing it must not hold the
    # forwarding thread, which has to kill the child at the stage timeout.
    config = process_config(stage_timeout_s=1.0, retry_backoff_s=0.0)
    with (
        ps.rendezvous() as point,
        Runtime(config, services=on_processes(1, process=ps.record_and_hold)) as runtime,
    ):
        held = runtime.submit({"name": "held", "data": {"hold": True, "rendezvous": point.path}})
        (hung_pid,) = point.arrivals(1)
        large = runtime.submit({"name": "large", "data": {"blob": "x" * (8 << 20)}})
        with watching(hung_pid) as ended:
            assert ended(30), "the hung child was not killed"
        records = [held.result(timeout=30), large.result(timeout=30)]
        stats = runtime.stats()
    assert [r.state for r in records] == [S.COMPLETED, S.COMPLETED], [r.error for r in records]
    assert (stats["timeouts"], stats["restarts"]) == (1, 1)


def test_every_report_a_child_wrote_before_it_exited_is_delivered_even_more_than_one_read_takes() -> None:
    # The forwarding thread is held in its first delivery until the child has exited: it then sees the exit
    # and 120 KB of reports at once (more than one read takes, less than the pipe holds), and must read
    # them all before it counts the exit.
    first_delivery = threading.Event()
    go_on = threading.Event()
    replies = Replies()

    def deliver(message: ServiceDone | ServicesDone) -> None:
        replies.put(message)
        if not first_delivery.is_set():
            first_delivery.set()
            assert go_on.wait(30)

    fn = ProcessStage(ps.sized_or_exit)
    backend = ProcessBackend({"processor": fn}, dead_letters=DeadLetterOffice(), threads=ThreadBook())
    try:
        worker = backend.start_worker("processor-1", "processor", fn, deliver, lambda *d: None)
        calls = [a_call(i, {"size": 12_000}) for i in range(1, 11)]
        calls.append(a_call(11, {"exit": True}))
        assert worker.send_many(calls)
        assert first_delivery.wait(30)
        (pid,) = backend.pids()
        with watching(pid) as ended:
            assert ended(30)
        go_on.set()
        reports = replies.take(len(calls))
    finally:
        backend.close()
    assert [(r.call_id, r.status) for r in reports] == [*((i, "ok") for i in range(1, 11)), (11, "crashed")]
    assert reports[-1].error_type == "SystemExit"
    assert all(r.result == {"blob": "x" * 12_000} for r in reports[:-1])


def test_importing_the_process_backend_registers_nothing_at_exit_until_a_backend_is_made() -> None:
    code = (
        "import atexit\n"
        "import multiprocessing.forkserver, multiprocessing.popen_forkserver, multiprocessing.util\n"
        "import actorflow.actors\n"
        "before = atexit._ncallbacks()  # multiprocessing registers its own exit handler when imported\n"
        "from actorflow.actors.backends import process as process_backend\n"
        "from actorflow.actors.deadletters import DeadLetterOffice\n"
        "from actorflow.actors.threads import ThreadBook\n"
        "imported = atexit._ncallbacks() - before\n"
        "backends = [process_backend.ProcessBackend({}, dead_letters=DeadLetterOffice(), threads=ThreadBook())\n"
        "            for _ in range(2)]\n"
        "made = atexit._ncallbacks() - before\n"
        "for backend in backends:\n"
        "    backend.close()\n"
        "print(imported, made)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0", "1"]  # nothing at import; one hook for any number of backends
