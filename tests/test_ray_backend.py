"""The Ray service backend against a real local Ray: same pipeline, retries, timeouts and supervision as threads.

One Ray session serves the whole module (starting Ray takes seconds); each
test builds its own Runtime on it. Service functions that misbehave decide
on `task.attempt`, which travels with the call, so they behave the same in
whichever worker process they land.

Needs `pip install '.[ray]'`; without Ray the module is skipped, saying
so, unless ACTORFLOW_REQUIRE_RAY is set (as in CI), where it fails instead.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from actorflow import Pipeline, Stage
from actorflow.actors import Milestone, Runtime
from actorflow.actors.backends.ray import RayBackend, ServiceActor, _RayWorker, describe_ray_error, node_id_of
from actorflow.actors.messages import RunService, ServiceDone, ServicesDone
from actorflow.cli import demo as run_demo
from actorflow.core import ConfigError, RuntimeConfig, Task, TaskRecord, TaskState, TransientError
from actorflow.core.tracing import new_trace
from actorflow.services import ServiceSet, process
from tests.pipeline_stages import Unpicklable, return_unpicklable, square_in_child

# CI sets ACTORFLOW_REQUIRE_RAY=1, so that a missing Ray fails the run instead of skipping quietly.
ray = importlib.import_module("ray") if os.environ.get("ACTORFLOW_REQUIRE_RAY") else pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """One local Ray for the module: 2 CPUs, token auth off, shut down at the end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        # The functions below are shipped by value: Ray workers need not import the tests package.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def ray_config(**fields: Any) -> RuntimeConfig:
    """A runtime on Ray, retrying at once."""
    return RuntimeConfig(service_backend="ray", retry_backoff_s=0.0, retry_backoff_max_s=0.0, **fields)


def ray_services(processors: int = 1, **functions: Any) -> ServiceSet:
    """Small pools: each Ray actor is a worker process, and booting one takes about a second here."""
    return ServiceSet(**functions, workers={"validator": 1, "processor": processors, "persistence": 1})


# --- service functions that run in Ray workers -----------------------------------------------------


def flaky_process(task: Task) -> Mapping[str, Any]:
    if task.attempt == 1:
        raise TransientError("the upstream is busy")
    return {"attempt": task.attempt, "pid": os.getpid()}


def hanging_process(task: Task) -> Mapping[str, Any]:
    if task.attempt == 1:
        time.sleep(600)  # ok-sleep: this IS the hang, in a Ray worker process; only killing the actor ends it
    return {"attempt": task.attempt}


def dying_process(task: Task) -> Mapping[str, Any]:
    if task.attempt == 1:
        os._exit(1)  # the worker process dies, and its Ray actor with it
    return {"attempt": task.attempt}


def discard(task: Task, result: Mapping[str, Any]) -> None:
    """A persistence that runs on Ray (the default's SQLite store stays on the head)."""


def _outcome(record: TaskRecord) -> tuple[Any, ...]:
    return record.state, record.result, record.error


def _run_payloads(
    config: RuntimeConfig, payloads: list[dict[str, object]], services: ServiceSet | None = None
) -> list[TaskRecord]:
    with Runtime(config, services=services) as runtime:
        handles = [runtime.submit(p) for p in payloads]
        records = [handle.result(timeout=TIMEOUT_S) for handle in handles]
        assert runtime.results is not None
        assert runtime.results.count() == sum(r.state is TaskState.COMPLETED for r in records)
    return records


def _steps(logs: list[dict[str, Any]], task_id: str) -> list[str]:
    steps = []
    for event in logs:
        if event.get("task_id") != task_id or event["event"] == "task.submitted":
            continue  # task.submitted is logged by the submitting thread, racing the pipeline
        name = event["event"]
        if name == "task.transition":
            steps.append(f"{name} {event['to_state']}")
        elif name.startswith("service."):
            steps.append(f"{name} {event['service']}")
        else:
            steps.append(name)
    return steps


# --- the tests -------------------------------------------------------------------------------------

_OWN_SESSION = """
import ray
from actorflow.actors import Runtime
from actorflow.core import RuntimeConfig
from actorflow.services import ServiceSet

config = RuntimeConfig(service_backend="ray")
with Runtime(config, services=ServiceSet(workers={"validator": 1, "processor": 1})) as runtime:
    started = ray.is_initialized()
    record = runtime.submit({"name": "one", "data": 1}).result(timeout=60)
print(started, record.state.value, ray.is_initialized())
"""


@pytest.mark.timeout(180)
def test_without_an_address_a_runtime_starts_a_local_ray_and_shuts_it_down_when_closed() -> None:
    # In a fresh process, where no Ray session exists yet: exactly what a one-line config change does.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _OWN_SESSION],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "COMPLETED", "False"]


@pytest.mark.timeout(180)
def test_the_demo_pipeline_on_ray_ends_in_the_same_states_results_and_trace_as_on_threads(ray_session: Any) -> None:
    payloads = run_demo._payloads(24)  # one in eight is invalid
    with capture_logs() as thread_logs:
        on_threads = _run_payloads(RuntimeConfig(), payloads)
    with capture_logs() as ray_logs:
        on_ray = _run_payloads(ray_config(), payloads, ray_services(2))

    assert [_outcome(r) for r in on_ray] == [_outcome(r) for r in on_threads]
    assert {r.state for r in on_ray} == {TaskState.COMPLETED, TaskState.FAILED}
    for threaded, remote in zip(on_threads, on_ray, strict=True):
        assert _steps(ray_logs, remote.task_id) == _steps(thread_logs, threaded.task_id)
    assert ray_session.is_initialized(), "a runtime must leave a Ray session it did not start running"


@pytest.mark.timeout(120)
def test_a_transient_error_on_attempt_one_is_retried_in_another_call_and_succeeds(ray_session: Any) -> None:
    with capture_logs() as logs, Runtime(ray_config(), services=ray_services(process=flaky_process)) as runtime:
        record = runtime.submit({"name": "flaky", "data": 1}).result(timeout=TIMEOUT_S)
        stats = runtime.stats()
    assert record.state is TaskState.COMPLETED
    assert record.result is not None
    assert record.result["attempt"] == 2
    assert record.result["pid"] != os.getpid()
    assert stats["retries"] == 1
    assert stats["pools"]["processor"]["restarts"] == 0
    failed = [e for e in logs if e["event"] == "service.failed" and e["task_id"] == record.task_id]
    assert [(e["error_type"], e["transient"], e["attempt"]) for e in failed] == [("TransientError", True, 1)]
    assert failed[0]["node"].endswith(f":{record.result['pid']}")  # one processor actor ran both attempts


def too_big_process(task: Task) -> Mapping[str, Any]:
    """A result of 200,000 characters for the task named "big"; a small one for the others."""
    if task.payload["name"] == "big":
        return {"v": "x" * 200_000}
    return {"name": task.payload["name"]}


@pytest.mark.timeout(120)
def test_a_result_over_max_value_bytes_fails_its_task_once_in_the_ray_worker_and_the_others_complete(
    ray_session: Any,
) -> None:
    config = ray_config(max_value_bytes=100_000)
    services = ray_services(process=too_big_process, persist=discard)
    with Runtime(config, services=services) as runtime:
        big = runtime.submit({"name": "big", "data": 1})
        small = runtime.submit({"name": "small", "data": 2})
        record = big.result(timeout=TIMEOUT_S)
        assert small.result(timeout=TIMEOUT_S).state is TaskState.COMPLETED
        stats = runtime.stats()
    assert record.state is TaskState.FAILED
    assert record.error is not None
    assert record.error.startswith("processor: ValueTooLarge: the value returned by stage 'processor' is at least")
    assert "at most 100000 bytes per value (RuntimeConfig.max_value_bytes)" in record.error
    assert (record.calls, record.retries) == (2, 0), "the validator's call and the processor's, charged once"
    assert stats["pools"]["processor"]["restarts"] == 0


@pytest.mark.timeout(120)
def test_a_hung_call_is_killed_at_the_stage_timeout_and_the_retry_completes_the_task(ray_session: Any) -> None:
    config = ray_config(stage_timeout_s=3.0)
    with capture_logs() as logs, Runtime(config, services=ray_services(process=hanging_process)) as runtime:
        record = runtime.submit({"name": "hangs", "data": 1}).result(timeout=TIMEOUT_S)
        stats = runtime.stats()
    assert record.state is TaskState.COMPLETED
    assert record.result == {"attempt": 2}
    assert stats["timeouts"] == 1
    assert stats["retries"] == 1
    assert stats["pools"]["processor"]["restarts"] == 1
    assert stats["pools"]["processor"]["workers"] == 1
    assert stats["late_results"] == 0  # the killed call's ref was dropped, not delivered
    assert any(e["event"] == "service.timeout" and e["task_id"] == record.task_id for e in logs)


@pytest.mark.timeout(120)
def test_a_service_that_kills_its_worker_process_gets_the_actor_replaced_and_the_task_retried(
    ray_session: Any,
) -> None:
    with capture_logs() as logs, Runtime(ray_config(), services=ray_services(process=dying_process)) as runtime:
        record = runtime.submit({"name": "dies", "data": 1}).result(timeout=TIMEOUT_S)
        second = runtime.submit({"name": "after", "data": 2}).result(timeout=TIMEOUT_S)
        stats = runtime.stats()
    assert record.state is TaskState.COMPLETED
    assert record.result == {"attempt": 2}
    assert second.state is TaskState.COMPLETED
    assert stats["pools"]["processor"]["restarts"] >= 1
    assert stats["pools"]["processor"]["workers"] == 1
    assert stats["pools"]["processor"]["failing"] is None
    assert stats["restarts"] >= 1
    failed = next(e for e in logs if e["event"] == "service.failed" and e["task_id"] == record.task_id)
    assert failed["error_type"] == "ActorDiedError"
    assert failed["transient"] is True
    assert any(e["event"] == "worker.restarted" and e["service"] == "processor" for e in logs)


@pytest.mark.timeout(120)
def test_service_events_carry_the_tasks_trace_and_the_node_the_call_ran_on(ray_session: Any) -> None:
    services = ray_services(persist=discard)
    with capture_logs() as logs, Runtime(ray_config(), services=services) as runtime:
        records = [runtime.submit({"name": f"t{i}", "data": i}).result(timeout=TIMEOUT_S) for i in range(4)]
    for record in records:
        finished = [e for e in logs if e["event"] == "service.call" and e["task_id"] == record.task_id]
        assert [e["service"] for e in finished] == ["validator", "processor", "persistence"]
        for event in finished:
            assert event["trace_id"] == record.trace_id
            assert len(event["span_id"]) == 16
            host, _, pid = event["node"].rpartition(":")
            assert host
            assert int(pid) != os.getpid()
            assert event["duration_ms"] >= 0
            assert event["status"] == "ok"
            assert event["started_at"] > 0  # measured where the call ran
        assert len({e["span_id"] for e in finished}) == 3


@pytest.mark.timeout(120)
def test_a_cancelled_task_stays_cancelled_and_its_late_result_is_never_persisted(ray_session: Any) -> None:
    processing = threading.Event()
    with Runtime(ray_config(), services=ray_services()) as runtime:
        runtime.subscribe(lambda event: processing.set() if event.to_state is TaskState.PROCESSING else None)
        handle = runtime.submit({"name": "slow", "data": {"sleep_ms": 1500}})
        assert processing.wait(TIMEOUT_S)
        assert handle.cancel() is True
        record = handle.result(timeout=TIMEOUT_S)
        runtime.join(TIMEOUT_S)
        assert runtime.results is not None
        stored = runtime.results.count()
    assert record.state is TaskState.CANCELLED
    assert stored == 0


@pytest.mark.timeout(60)
def test_a_service_function_ray_cannot_pickle_is_a_config_error_naming_the_service(ray_session: Any) -> None:
    lock = threading.Lock()

    def locked_process(task: Task) -> Mapping[str, Any]:
        with lock:
            return process(task)

    with pytest.raises(ConfigError, match=r"ServiceSet.process .*locked_process.* cannot be sent to Ray workers"):
        Runtime(ray_config(), services=ray_services(process=locked_process))
    assert ray_session.is_initialized()


def test_choosing_ray_without_ray_installed_is_a_config_error_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install '\.\[ray\]'"):
        Runtime(RuntimeConfig(service_backend="ray"))


@pytest.mark.timeout(60)
def test_a_service_function_workers_cannot_import_is_a_config_error_at_start(
    ray_session: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "only_on_the_head.py").write_text("def process(task):\n    return {'ok': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, not in the Ray workers
    head_only = importlib.import_module("only_on_the_head").process

    cause = r"processor function cannot be loaded on a Ray worker \(ModuleNotFoundError: No module named"
    with pytest.raises(ConfigError, match=cause):
        Runtime(ray_config(), services=ray_services(process=head_only))
    assert ray_session.is_initialized()


# --- without a Ray session: the session rules and error texts ---------------------------------------


class _FakeRay:
    """Just enough of Ray for the session rules: who starts it, who shuts it down."""

    def __init__(self, *, initialized: bool = False) -> None:
        self.initialized = initialized
        self.inits: list[str | None] = []
        self.shutdowns = 0

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, address: str | None = None, **options: Any) -> None:
        self.initialized = True
        self.inits.append(address)

    def shutdown(self) -> None:
        self.initialized = False
        self.shutdowns += 1

    def remote(self, **options: Any) -> Any:
        return lambda cls: cls


class _NoLocalWorkers:
    name = "none"

    def close(self) -> None:
        pass


def _backend(fake: _FakeRay, address: str | None = None) -> RayBackend:
    return RayBackend(address, functions={}, pool_sizes={}, local=_NoLocalWorkers(), ray_module=fake)  # type: ignore[arg-type]


def test_runtimes_sharing_a_ray_that_actorflow_started_shut_it_down_only_when_the_last_one_closes() -> None:
    fake = _FakeRay()
    first, second = _backend(fake), _backend(fake)
    assert fake.inits == [None]
    first.close()
    assert fake.shutdowns == 0
    second.close()
    second.close()  # idempotent
    assert fake.shutdowns == 1


def test_a_ray_session_the_program_started_is_used_and_never_shut_down() -> None:
    fake = _FakeRay(initialized=True)
    _backend(fake, "ray://head:10001").close()
    assert fake.inits == []
    assert fake.shutdowns == 0


def test_an_unreachable_cluster_is_a_config_error_naming_the_address() -> None:
    fake = _FakeRay()

    def refuse(address: str | None = None, **options: Any) -> None:
        raise ConnectionError("could not reach the GCS")

    fake.init = refuse  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match=r"ray_address='auto': cannot connect to Ray at .*GCS"):
        _backend(fake, "auto")  # an address Ray resolves itself: only ray.init can tell
    with pytest.raises(ConfigError, match=r"ray_address='ray://nowhere.invalid:10001': cannot connect to Ray at "):
        _backend(fake, "ray://nowhere.invalid:10001")  # no such host: refused before ray.init


@pytest.mark.timeout(60)
def test_a_cluster_address_where_nothing_listens_is_a_config_error_within_the_connect_timeout() -> None:
    # A real Ray in a fresh process (this module's own session would be used as it is): ray.init on
    # such an address retried for minutes.
    code = (
        "import time\n"
        "from actorflow.actors import Runtime\n"
        "from actorflow.core import ConfigError, RuntimeConfig\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    Runtime(RuntimeConfig(service_backend='ray', ray_address='127.0.0.1:1', ray_connect_timeout_s=5))\n"
        "except ConfigError as exc:\n"
        "    print(round(time.monotonic() - started, 1))\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, error = done.stdout.splitlines()[:2]
    assert float(seconds) < 5
    assert error.startswith("RuntimeConfig.ray_address='127.0.0.1:1': cannot connect to Ray at '127.0.0.1:1': ")
    assert "Connection refused" in error


def test_a_cluster_address_that_accepts_but_never_answers_is_a_config_error_after_the_connect_timeout() -> None:
    fake = _FakeRay()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts connections; nobody ever answers them
        address = f"ray://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ConfigError, match=r"no answer within 0\.2s \(RuntimeConfig\.ray_connect_timeout_s\)"):
            RayBackend(
                address,
                functions={},
                pool_sizes={},
                local=_NoLocalWorkers(),  # type: ignore[arg-type]
                connect_timeout_s=0.2,
                ray_module=fake,
            )
    assert fake.inits == []  # refused before Ray would have retried it for minutes


def test_a_stage_asking_for_ray_without_ray_installed_is_a_config_error_naming_the_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    prepare = Stage("prepare", lambda task, value: value)
    pipeline = Pipeline("p", [prepare, Stage("square", square_in_child, backend="ray")])
    with pytest.raises(ConfigError, match=r"^Stage 'square' \(backend='ray'\) needs Ray, which is not installed"):
        Runtime(pipelines=[pipeline])


def test_a_result_that_cannot_be_pickled_fails_its_own_call_in_the_actor_instead_of_its_invocation() -> None:
    from actorflow.actors.backends.ray import _crossable  # noqa: PLC0415 - the actor's side

    call = RunService(1, "processor", Task("t-1", {}), new_trace(), 1)
    done = ServiceDone(1, "processor", "t-1", "processor-1", "ok", {"v": Unpicklable("stuck")}, None, None, 2.0)  # type: ignore[dict-item]
    failed = _crossable(done)
    assert (failed.status, failed.result, failed.error_type) == ("permanent", None, "TypeError")
    assert failed.error == (
        "the value returned by stage 'processor' cannot be sent from the Ray actor to the runtime: "
        "Unpicklable values stay where they are"
    )
    assert _crossable(done._replace(result={"v": "fine"})).status == "ok"

    # Through the actor's own method: whatever freeze hands on, what it returns always pickles.
    dones, _ = ServiceActor(return_unpicklable).run_many([call], "processor-1")
    (answer,) = dones
    assert ray.cloudpickle.loads(ray.cloudpickle.dumps(answer)) == answer
    assert answer.status == "permanent" or answer.result == {"v": "stuck"}


@pytest.mark.timeout(120)
def test_the_ray_backend_is_closed_on_the_thread_that_closes_the_runtime_not_on_the_orchestrators(
    ray_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed_on: list[str] = []
    close = RayBackend.close

    def noting_where(backend: RayBackend) -> None:
        closed_on.append(threading.current_thread().name)
        close(backend)

    monkeypatch.setattr(RayBackend, "close", noting_where)
    pipeline = Pipeline("p", [Stage("square", square_in_child, backend="ray", workers=1)])
    with Runtime(pipelines=[pipeline]) as runtime:
        assert runtime.submit({"n": 3}).result(timeout=TIMEOUT_S).result["n"] == 9  # type: ignore[index]
    assert closed_on == [threading.current_thread().name]
    assert ray_session.is_initialized()  # the module's own session: used, never shut down


def test_ray_errors_are_shortened_to_their_root_cause() -> None:
    creation = RuntimeError(
        "The actor died because of an error raised in its creation task, \x1b[36mray::ServiceActor.__init__()\x1b[39m\n"
        "  At least one of the input arguments for this task could not be computed:\n"
        "ray.exceptions.RaySystemError: System error: No module named 'app'\n"
        "traceback: Traceback (most recent call last):\n"
        "ModuleNotFoundError: No module named 'app'\n"
    )
    assert describe_ray_error(creation) == "ModuleNotFoundError: No module named 'app'"
    died = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: ServiceActor\n")
    assert describe_ray_error(died) == "The actor died unexpectedly before finishing this task."


def test_calls_run_on_ray_get_otel_spans_under_their_tasks_span_with_the_retried_calls_error(
    ray_session: Any,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - the otel test dependency, here only
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: PLC0415
    from opentelemetry.trace import StatusCode  # noqa: PLC0415

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    services = ray_services(process=flaky_process, persist=discard)
    with Runtime(ray_config(), services=services, tracer_provider=provider) as runtime:
        record = runtime.submit({"name": "t", "data": 1}).result(timeout=TIMEOUT_S)
    provider.shutdown()
    spans = exporter.get_finished_spans()
    (task,) = [s for s in spans if s.name == "actorflow.task"]
    calls = sorted((s for s in spans if s.name != "actorflow.task"), key=lambda s: s.start_time or 0)
    assert f"{task.get_span_context().trace_id:032x}" == record.trace_id
    assert [(c.name, (c.attributes or {}).get("actorflow.attempt")) for c in calls] == [
        ("actorflow.validator", 1),
        ("actorflow.processor", 1),
        ("actorflow.processor", 2),
        ("actorflow.persistence", 1),
    ]
    assert all(c.parent is not None and c.parent.span_id == task.get_span_context().span_id for c in calls)
    assert calls[1].status.status_code is StatusCode.ERROR
    assert record.traceback is not None
    assert "TransientError: the upstream is busy" in record.traceback  # the retried call's, kept in the record


def test_the_node_of_a_ray_call_carries_the_ray_node_id_between_host_and_pid() -> None:
    assert node_id_of("worker-7/3f2a9c01bd44:4242") == "3f2a9c01bd44"
    assert node_id_of("worker-7:4242") == ""  # outside Ray: no node id


@pytest.mark.timeout(300)
def test_a_stage_on_ray_runs_next_to_a_stage_on_threads(ray_session: Any) -> None:
    # Here, on the module's Ray: a local Ray started and stopped by a runtime in this process before
    # that session would leave token-auth state behind that breaks it.

    def prepare(task: Task, value: Any) -> Any:
        return {"n": value["data"]["index"]}

    pipeline = Pipeline("mixed", [Stage("prepare", prepare), Stage("square", square_in_child, backend="ray")])
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        record = runtime.submit({"name": "seven", "data": {"index": 7}}).result(timeout=120)
    assert record.state is TaskState.COMPLETED, record.error
    assert record.result["n"] == 49
    assert record.result["pid"] != os.getpid()
    assert record.path() == ["CREATED", "PREPARE", "SQUARE", "COMPLETED"]


# --- several calls in one invocation ------------------------------------------------------------------
#
# The backend batches a worker's queued calls while its calls are fast. These tests make every call count
# as fast (`fast_call_ms`): on this loaded machine a 50 us call now and then takes over 5 ms, and whether
# calls batch must not depend on that. Each builds a batch for certain: after a warm-up (the pool learns
# that calls are fast, and queues deep), a gate call holds the one processor actor until the calls of a
# burst are all queued at the worker (the `call.queued` milestones); then the gate opens, and what is
# queued goes in one invocation. Every processor run is written to a file (a line survives the process's
# own death), and `ray.invocation_done`/`ray.batch_lost` name the tasks of each invocation.


@ray.remote(num_cpus=0)
class OpenGate:
    """A named gate: calls of `batch_process` of kind "gate" wait in `wait` until the test calls `open`."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()

    async def wait(self) -> None:
        await self._opened.wait()

    async def open(self) -> None:
        self._opened.set()


def batch_process(task: Task) -> Mapping[str, Any]:
    """A processor that does, on attempt 1, what the payload's ``kind`` asks; every run noted in ``runs``."""
    data = task.payload["data"]
    assert isinstance(data, Mapping)
    with open(str(data["runs"]), "a", encoding="utf-8") as runs:
        runs.write(f"{data['i']} {task.attempt}\n")
    kind = data["kind"] if task.attempt == 1 else "ok"
    if kind == "gate":
        ray.get(ray.get_actor(str(data["gate"])).wait.remote())
    elif kind == "raise":
        raise ValueError(f"task {data['i']} is refused")
    elif kind == "flaky":
        raise TransientError("the upstream is busy")
    elif kind == "die":
        os._exit(1)
    elif kind == "hang":
        time.sleep(600)  # ok-sleep: this IS the hang, in a Ray worker process; only killing the actor ends it
    elif kind == "exit":
        raise SystemExit(f"task {data['i']} exits")  # a BaseException: the call crashed, the process lives on
    return {"i": data["i"], "attempt": task.attempt}


class QueuedCalls:
    """An `on_milestone` callback: waits until `count` processor calls were queued behind another."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.queued = 0

    def __call__(self, milestone: Milestone) -> None:
        if milestone.name == "call.queued" and milestone.fields.get("service") == "processor":
            with self._changed:
                self.queued += 1
                self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = TIMEOUT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.queued >= count, timeout)


@dataclass
class Burst:
    """What a burst left: its records in order, the runs per task index, and the logged events."""

    records: list[TaskRecord]
    held: TaskRecord
    """The gate call's task (index -100): its call may share an invocation with the burst's."""
    runs: dict[int, list[int]]
    """Task index -> the attempts its processor calls ran, in order."""
    logs: list[dict[str, Any]]
    stats: dict[str, Any]

    def index_of(self, task_id: str) -> int:
        if task_id == self.held.task_id:
            return -100
        return next((i for i, record in enumerate(self.records) if record.task_id == task_id), -1)  # -1: warm-up

    def invocations(self) -> list[list[int]]:
        """The task indexes of each answered processor invocation (-1 for a warm-up task, -100 for the gate's)."""
        return [
            [self.index_of(t) for t in e["task_ids"]]
            for e in self.logs
            if e["event"] == "ray.invocation_done" and e["actor"].startswith("processor-")
        ]


def run_burst(
    kinds: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracer_provider: Any = None, **config: Any
) -> Burst:
    """Warm up, then hold the processor with a gate call while `kinds` queue behind it; open; wait for all."""
    monkeypatch.setattr(RayBackend, "fast_call_ms", 1e6)
    runs_file = tmp_path / "runs.txt"
    gate_name = f"gate-{uuid.uuid4().hex}"
    gate = OpenGate.options(name=gate_name).remote()  # type: ignore[attr-defined]

    def payload(i: int, kind: str) -> dict[str, object]:
        return {"name": f"t{i}", "data": {"i": i, "kind": kind, "runs": str(runs_file), "gate": gate_name}}

    queued = QueuedCalls()
    services = ray_services(process=batch_process, persist=discard)
    try:
        with (
            capture_logs() as logs,
            Runtime(
                ray_config(**config), services=services, on_milestone=queued, tracer_provider=tracer_provider
            ) as runtime,
        ):
            warm = [runtime.submit(payload(-1 - i, "ok")) for i in range(40)]
            assert {h.result(timeout=TIMEOUT_S).state for h in warm} == {TaskState.COMPLETED}
            queued_before = queued.queued
            held = runtime.submit(payload(-100, "gate"))
            handles = [runtime.submit(payload(i, kind)) for i, kind in enumerate(kinds)]
            assert queued.wait_for(queued_before + len(kinds)), "every call of the burst waits behind the gate"
            ray.get(gate.open.remote(), timeout=TIMEOUT_S)
            held_record = held.result(timeout=TIMEOUT_S)
            assert held_record.state is TaskState.COMPLETED
            records = [handle.result(timeout=TIMEOUT_S) for handle in handles]
            stats = runtime.stats()
    finally:
        ray.kill(gate)
    runs: dict[int, list[int]] = {}
    for line in runs_file.read_text(encoding="utf-8").splitlines():
        index, attempt = map(int, line.split())
        if index >= 0:
            runs.setdefault(index, []).append(attempt)
    return Burst(records, held_record, runs, logs, stats)


def _results(burst: Burst) -> list[tuple[TaskState, int | None]]:
    return [(r.state, r.result["attempt"] if r.result is not None else None) for r in burst.records]


@pytest.mark.timeout(180)
def test_calls_in_one_invocation_each_get_their_own_result_and_one_raising_mid_batch_fails_only_its_task(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["ok", "raise", "ok", "raise", "ok", "ok", "raise", "ok"]
    burst = run_burst(kinds, tmp_path, monkeypatch)

    for index, (kind, record) in enumerate(zip(kinds, burst.records, strict=True)):
        if kind == "raise":
            assert record.state is TaskState.FAILED
            assert record.error == f"processor: ValueError: task {index} is refused"
        else:
            assert record.state is TaskState.COMPLETED
            assert record.result == {"i": index, "attempt": 1}
    assert burst.runs == {index: [1] for index in range(len(kinds))}, "each call ran once"
    assert burst.stats["retries"] == 0
    raisers = {index for index, kind in enumerate(kinds) if kind == "raise"}
    in_the_middle = [calls for calls in burst.invocations() if any(index in raisers for index in calls[1:-1])]
    assert in_the_middle, f"a raising call ran between others in one invocation: {burst.invocations()}"


@pytest.mark.timeout(180)
def test_a_transient_error_in_a_batch_retries_only_that_call(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - the otel test dependency, here only
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: PLC0415
    from opentelemetry.trace import StatusCode  # noqa: PLC0415

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    kinds = ["ok", "flaky", "ok", "ok", "flaky", "ok"]
    burst = run_burst(kinds, tmp_path, monkeypatch, tracer_provider=provider)
    provider.shutdown()

    assert _results(burst) == [(TaskState.COMPLETED, 2 if kind == "flaky" else 1) for kind in kinds]
    assert burst.runs == {index: [1, 2] if kind == "flaky" else [1] for index, kind in enumerate(kinds)}
    assert burst.stats["retries"] == kinds.count("flaky")
    assert burst.stats["pools"]["processor"]["restarts"] == 0
    flaky = {index for index, kind in enumerate(kinds) if kind == "flaky"}
    assert any(len(calls) > 1 and flaky & set(calls) for calls in burst.invocations())
    # Each call of the batch has its own span, under its own task's span, with its own status.
    spans = exporter.get_finished_spans()

    def of(name: str, task_id: str) -> list[Any]:
        return [s for s in spans if s.name == name and (s.attributes or {}).get("actorflow.task_id") == task_id]

    for index, record in enumerate(burst.records):
        (task,) = of("actorflow.task", record.task_id)
        calls = sorted(
            of("actorflow.processor", record.task_id), key=lambda s: (s.attributes or {})["actorflow.attempt"]
        )
        assert all(c.parent is not None and c.parent.span_id == task.get_span_context().span_id for c in calls)
        expected = [StatusCode.ERROR, StatusCode.UNSET] if index in flaky else [StatusCode.UNSET]
        assert [c.status.status_code for c in calls] == expected, index


@pytest.mark.timeout(240)
def test_an_actor_killed_mid_batch_charges_only_the_call_that_killed_it_and_the_others_run_again_once(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["ok", "ok", "ok", "die", "ok", "ok"]
    killer = kinds.index("die")
    burst = run_burst(kinds, tmp_path, monkeypatch)

    assert _results(burst) == [(TaskState.COMPLETED, 2 if kind == "die" else 1) for kind in kinds]
    (lost,) = [e for e in burst.logs if e["event"] == "ray.batch_lost"]
    batch = [burst.index_of(task_id) for task_id in lost["task_ids"]]
    assert killer in batch
    assert lost["calls"] == len(batch) > 1, "the actor died in a batch"
    # Which call killed it is unknown: none is charged, and each call of that batch runs again, alone; the
    # killer then kills its actor alone, and is charged (attempt 2 completes). Calls that had run before
    # it in the batch ran again once; calls behind it in the batch, or in later invocations, ran once.
    ran_before = batch[: batch.index(killer)]
    for index in range(len(kinds)):
        if index == killer:
            assert burst.runs[index] == [1, 1, 2]
        else:
            assert burst.runs[index] == ([1, 1] if index in ran_before else [1]), index
    failed = [e for e in burst.logs if e["event"] == "service.failed" and e["service"] == "processor"]
    assert [(burst.index_of(e["task_id"]), e["attempt"]) for e in failed] == [(killer, 1)]
    assert failed[0]["error_type"] == "ActorDiedError"
    pool = burst.stats["pools"]["processor"]
    assert (pool["restarts"], pool["workers"], pool["failing"]) == (2, 1, None)


@pytest.mark.timeout(240)
def test_a_call_that_crashes_mid_batch_stops_its_actor_so_the_calls_behind_it_run_once_on_the_new_one(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["ok", "ok", "ok", "exit", "ok", "ok", "ok", "ok"]
    crasher = kinds.index("exit")
    burst = run_burst(kinds, tmp_path, monkeypatch)

    assert any(crasher in calls[:-1] for calls in burst.invocations()), (
        f"the crashing call ran with calls behind it in one invocation: {burst.invocations()}"
    )
    # The crash is the call's own (SystemExit, reported by the actor): it is charged and retried, and the
    # actor is replaced. The calls behind it never ran on that actor: each ran once, on its replacement.
    assert _results(burst) == [(TaskState.COMPLETED, 2 if kind == "exit" else 1) for kind in kinds]
    assert burst.runs == {index: [1, 2] if kind == "exit" else [1] for index, kind in enumerate(kinds)}
    failed = [e for e in burst.logs if e["event"] == "service.failed" and e["service"] == "processor"]
    assert [(burst.index_of(e["task_id"]), e["attempt"], e["error_type"]) for e in failed] == [
        (crasher, 1, "SystemExit")
    ]
    assert not [e for e in burst.logs if e["event"] == "ray.batch_lost"]
    assert burst.stats["retries"] == 1
    assert burst.stats["late_results"] == 0, "no call of the crashed actor came back after the crash"
    pool = burst.stats["pools"]["processor"]
    assert (pool["restarts"], pool["workers"], pool["failing"]) == (1, 1, None)


@pytest.mark.timeout(240)
def test_a_call_that_hangs_in_a_batch_times_out_alone_and_only_it_is_charged(
    ray_session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = ["ok", "ok", "hang", "ok", "ok"]
    hung = kinds.index("hang")
    burst = run_burst(kinds, tmp_path, monkeypatch, stage_timeout_s=4.0)

    assert _results(burst) == [(TaskState.COMPLETED, 2 if kind == "hang" else 1) for kind in kinds]
    timeouts = [e for e in burst.logs if e["event"] == "service.timeout"]
    # The batch's timeout is charged to none of its calls (its head may not be the one that hangs); run
    # alone, the hung call times out again, and that timeout is its own.
    assert [e.get("charged", True) for e in timeouts] == [False, True]
    assert burst.index_of(timeouts[1]["task_id"]) == hung
    assert burst.runs[hung] == [1, 1, 2]
    assert all(burst.runs[i] in ([1], [1, 1]) for i in range(len(kinds)) if i != hung)
    assert burst.stats["timeouts"] == 2
    assert burst.stats["retries"] == 1


@pytest.mark.timeout(180)
def test_under_load_calls_share_invocations_by_the_actors_own_count(
    ray_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RayBackend, "fast_call_ms", 1e6)
    services = ray_services(persist=discard)
    with capture_logs() as logs, Runtime(ray_config(), services=services) as runtime:
        handles = [runtime.submit({"name": f"t{i}", "data": i}) for i in range(300)]
        assert {h.result(timeout=TIMEOUT_S).state for h in handles} == {TaskState.COMPLETED}
    (stopped,) = [e for e in logs if e["event"] == "ray.backend_stopped"]
    assert stopped["calls"] == 3 * 300
    assert 0 < stopped["invocations"] < stopped["calls"] / 2, stopped


# --- a crashed call poisons its actor: the driver's side, with the actor's answers held back ------------


class _HeldActor:
    """A Ray actor handle played in this process, so that its answers can come back in any order.

    Each invocation (`actor.run_many.remote(calls, worker)`) runs at once, in order, in a real
    `ServiceActor`, as a Ray actor would run it; its answer is held until the test releases it.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.body = ServiceActor(fn)
        self.run_many = self
        self.answers: list[tuple[list[str], Future[Any], Any]] = []
        """Per invocation: its calls' task ids, its ref's future, and what the actor answered."""

    def remote(self, calls: Sequence[RunService], worker: str) -> _HeldActor.Ref:
        ref = _HeldActor.Ref()
        self.answers.append(([call.task.task_id for call in calls], ref.answer, self.body.run_many(calls, worker)))
        return ref

    class Ref:
        def __init__(self) -> None:
            self.answer: Future[Any] = Future()

        def future(self) -> Future[Any]:
            return self.answer


def _settle(backend: RayBackend) -> None:
    """Wait until the backend's Ray thread has done all that was queued on it so far."""
    done = threading.Event()
    backend.waiter.run_soon(done.set)
    assert done.wait(10)


@pytest.mark.parametrize("first", ["the crash report", "the empty answer"])
def test_an_actor_runs_nothing_after_a_crashed_call_and_the_calls_it_skipped_are_left_to_the_pool(first: str) -> None:
    ran: list[str] = []

    def exits_on_x(task: Task, value: Any) -> Mapping[str, Any]:
        ran.append(task.task_id)
        if task.task_id == "X":
            raise SystemExit("X exits")
        return {"id": task.task_id}

    backend = _backend(_FakeRay())
    delivered: list[Any] = []
    deaths: list[str] = []
    actor = _HeldActor(exits_on_x)
    worker = _RayWorker("processor-1", backend, delivered.append, lambda name, why: deaths.append(why))
    worker._actor = actor
    worker.recent.extend([0.1] * 16)  # its calls are fast: the queued ones share an invocation
    calls = {name: RunService(n, "processor", Task(name, {}), new_trace(), 1) for n, name in enumerate("AXBCD", 1)}
    try:
        assert worker.send_many([calls["A"], calls["X"], calls["B"]])
        _settle(backend)
        assert worker.send(calls["C"])  # a second invocation, on its way while the first runs
        _settle(backend)
        (batch, crash_ref, crash_answer), (second, empty_ref, empty_answer) = actor.answers
        assert (batch, second) == (["A", "X", "B"], ["C"])
        assert ran == ["A", "X"], "the actor stopped at the crash, and ran nothing after it"
        assert [(done.task_id, done.status) for done in crash_answer[0]] == [("A", "ok"), ("X", "crashed")]
        assert empty_answer == ([], 2)

        # Ray may resolve the two refs' callbacks in either order: the pool hears the same either way.
        answers = [(crash_ref, crash_answer), (empty_ref, empty_answer)]
        for ref, answer in answers if first == "the crash report" else reversed(answers):
            ref.set_result(answer)
        _settle(backend)
        (message,) = delivered
        assert isinstance(message, ServicesDone)
        assert [(done.task_id, done.status) for done in message.dones] == [("A", "ok"), ("X", "crashed")]
        assert deaths == [], "the crash report alone has the pool replace the worker"

        assert worker.send(calls["D"])  # sent before the pool has replaced the worker: it never reaches the actor
        _settle(backend)
        assert len(actor.answers) == 2
        worker.retire()
        _settle(backend)
        assert backend.suspects == {}, "B and C never ran: nothing to suspect them of"
        assert ran == ["A", "X"]
    finally:
        backend.close()
