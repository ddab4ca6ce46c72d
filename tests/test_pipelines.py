"""Pipelines as data: your own stages, settings per stage, async stages, several pipelines in one runtime."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import itertools
import json
import os
import queue
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from actorflow import (
    ActorflowError,
    ConfigError,
    JournalError,
    Pipeline,
    Runtime,
    RuntimeConfig,
    ServiceSet,
    Stage,
    Task,
    TaskState,
    TransientError,
    UnknownPipeline,
    configure_logging,
)
from actorflow.actors.backends.coroutines import AsyncBackend
from actorflow.actors.backends.toolkit import CallsInFlight
from actorflow.actors.messages import RunService, ServiceDone, ServicesDone
from actorflow.api import create_app, serve_in_background
from actorflow.cli.inspect import main as inspect_main
from actorflow.cli.trace import main as trace_main
from actorflow.cli.tracecheck import check_transitions
from actorflow.cli.traceview import load_trace
from actorflow.core import thaw
from actorflow.core.journal import SCHEMA_VERSION, Journal
from actorflow.core.tracing import TraceContext, new_trace
from actorflow.services import ResultStore, seed_pipeline
from tests.conftest import payload
from tests.pipeline_stages import square_in_child

S = TaskState
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "schema1_journal.db"
SEED_TABLE = {
    S.CREATED: {S.VALIDATED, S.FAILED, S.CANCELLED},
    S.VALIDATED: {S.PROCESSING, S.FAILED, S.CANCELLED},
    S.PROCESSING: {S.COMPLETED, S.FAILED, S.CANCELLED},
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
"""The seed's lifecycle diagram, plus cancellation from every live state."""


def _keep(task: Task, value: Any) -> None:
    return None


def _assert_history_follows(pipeline: Pipeline, record: Any) -> None:
    history = record.history
    assert history[0].from_state is None
    assert history[0].to_state is S.CREATED
    for previous, entry in itertools.pairwise(history):
        assert entry.from_state is previous.to_state
        assert pipeline.is_allowed(previous.to_state, entry.to_state), (previous, entry)


# --- building and checking -----------------------------------------------------------------------


def test_the_seed_pipeline_derives_exactly_the_seed_transition_table() -> None:
    seed = ServiceSet(persist=lambda task, result: None).pipeline(result_store=None)
    assert dict(seed.transitions) == SEED_TABLE
    assert [s.name for s in seed.stages] == ["validator", "processor", "persistence"]
    assert seed.states == (S.CREATED, S.VALIDATED, S.PROCESSING, S.COMPLETED, S.FAILED, S.CANCELLED)


def test_the_seed_pipeline_sizes_its_stages_2_4_2_unless_told_otherwise() -> None:
    store = ResultStore()
    try:
        assert [stage.workers for stage in seed_pipeline(result_store=store).stages] == [2, 4, 2]
        sized = seed_pipeline(result_store=store, workers={"processor": 8})
        assert [stage.workers for stage in sized.stages] == [2, 8, 2]
        with pytest.raises(
            ConfigError, match="the seed pipeline has no stage 'fetch' to size; its stages: 'validator'"
        ):
            seed_pipeline(result_store=store, workers={"fetch": 1})
        with pytest.raises(ConfigError, match="Stage 'processor': workers must be an int >= 1"):
            seed_pipeline(result_store=store, workers={"processor": 0})
    finally:
        store.close()
    with pytest.raises(ConfigError, match="needs persist= or a result_store="):
        seed_pipeline()


def _one_argument(task: Task) -> None:
    return None


def _three_arguments(task: Task, value: Any, extra: Any) -> None:
    return None


async def _async_one_argument(task: Task) -> None:
    return None


class _CallableWithoutValue:
    def __call__(self, task: Task) -> None:
        return None


@pytest.mark.parametrize(
    ("fn", "shown"),
    [
        (_one_argument, "_one_argument(task: 'Task') -> 'None'"),
        (_three_arguments, "_three_arguments(task: 'Task', value: 'Any', extra: 'Any') -> 'None'"),
        (_async_one_argument, "_async_one_argument(task: 'Task') -> 'None'"),
        (lambda task, value, *, key: None, "<lambda>(task, value, *, key)"),
        (_CallableWithoutValue(), "_CallableWithoutValue(task: 'Task') -> 'None'"),
        (len, "len(obj, /)"),
    ],
)
def test_a_stage_whose_function_cannot_take_task_and_value_is_refused_naming_the_stage_and_the_signature(
    fn: Any, shown: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Stage("enrich", fn)
    message = str(caught.value)
    assert message.startswith(f"Stage 'enrich': fn {shown} cannot be called as fn(task, value)"), message
    assert "takes two positional arguments: the Task and the value" in message


async def _async_stage(task: Task, value: Any) -> None:
    return None


class _CallableStage:
    def __call__(self, task: Task, value: Any) -> None:
        return None


@pytest.mark.parametrize(
    "fn",
    [
        _keep,
        _async_stage,
        _CallableStage(),
        lambda *args: None,
        lambda task, value=None, extra=None: None,
        functools.partial(_three_arguments, extra=1),
        print,  # a builtin with a readable signature that takes two positional arguments
        dict.fromkeys,  # a builtin method
    ],
)
def test_a_stage_function_that_can_take_task_and_value_is_accepted(fn: Any) -> None:
    assert Stage("ok", fn).fn is fn


def test_a_callable_whose_signature_cannot_be_read_is_taken_on_trust() -> None:
    unreadable = getattr  # its signature cannot be read
    with pytest.raises(ValueError, match="no signature found"):
        inspect.signature(unreadable)
    assert Stage("trusted", unreadable).fn is unreadable  # type: ignore[arg-type]


_TYPED_STAGES = """
from typing import Any

from actorflow import JSONValue, Stage, Task


def right(task: Task, value: JSONValue) -> dict[str, int]:
    return {"y": 1}


async def right_async(task: Task, value: Any) -> None:
    return None


def without_value(task: Task) -> None:
    return None


async def without_value_async(task: Task) -> None:
    return None


Stage("right", right)
Stage("right_async", right_async)
Stage("lambda", lambda task, value: value)
Stage("without_value", without_value)
Stage("without_value_async", without_value_async)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_type_checker_refuses_a_stage_function_that_does_not_take_task_and_value(tmp_path: Path) -> None:
    program = tmp_path / "stages.py"
    program.write_text(_TYPED_STAGES)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(program),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "MYPYPATH": str(Path(__file__).resolve().parent.parent)},
        check=False,
    )
    flagged = sorted(int(line.split(":")[1]) for line in checked.stdout.splitlines() if ": error:" in line)
    lines = _TYPED_STAGES.splitlines()
    assert [lines[number - 1] for number in flagged] == [
        'Stage("without_value", without_value)',
        'Stage("without_value_async", without_value_async)',
    ], checked.stdout + checked.stderr
    assert all("SyncStageFunction | AsyncStageFunction" in line for line in checked.stdout.splitlines()), checked.stdout


def test_a_pipeline_of_ones_own_takes_any_payload_the_first_example_shows() -> None:
    def double(task: Task, value: Any) -> dict[str, int]:
        return {"y": value["x"] * 2}

    with Runtime(pipelines=[Pipeline("double", [Stage("double", double)])]) as runtime:
        record = runtime.submit({"x": 21}).result(timeout=10)
    assert record.state is S.COMPLETED, record.error
    assert record.result == {"y": 42}
    assert record.path() == ["CREATED", "DOUBLE", "COMPLETED"]


def test_a_stage_may_return_any_json_value_and_the_record_keeps_it_as_its_result() -> None:
    def answer(task: Task, value: Any) -> int:
        return 42

    with Runtime(pipelines=[Pipeline("answer", [Stage("answer", answer)])]) as runtime:
        record = runtime.submit({"question": "?"}).result(timeout=10)
    assert record.result == 42
    assert record.to_dict()["result"] == 42


def test_a_pipeline_derives_a_state_per_stage_and_lets_every_live_state_fail_or_be_cancelled() -> None:
    pipeline = Pipeline("p", [Stage("check", _keep), Stage("fetch-page", _keep, state="DOWNLOADING")])
    assert pipeline.transitions == {
        S.CREATED: {S("CHECK"), S.FAILED, S.CANCELLED},
        S("CHECK"): {S("DOWNLOADING"), S.FAILED, S.CANCELLED},
        S("DOWNLOADING"): {S.COMPLETED, S.FAILED, S.CANCELLED},
        S.COMPLETED: frozenset(),
        S.FAILED: frozenset(),
        S.CANCELLED: frozenset(),
    }


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Pipeline("p", []), "Pipeline 'p': stages is empty"),
        (lambda: Pipeline("p", [Stage("a", _keep), Stage("a", _keep)]), "stage name 'a' is used twice"),
        (lambda: Stage("a", 42), "Stage 'a': fn must be callable, got 42"),  # type: ignore[arg-type]
        (lambda: Stage("a", _keep, workers=0), "Stage 'a': workers must be an int >= 1"),
        (lambda: Stage("a", _keep, max_attempts=0), "Stage 'a': max_attempts must be an int >= 1"),
        (lambda: Stage("a", _keep, timeout_s=-1.0), "Stage 'a': timeout_s must be a finite number of seconds > 0"),
        (lambda: Stage("a", _keep, retry_backoff_s=float("nan")), "Stage 'a': retry_backoff_s must be a finite"),
        (lambda: Stage("a", _keep, backend="gpu!"), "Stage 'a': backend must be a backend's name"),
        (lambda: Stage("a", _keep, backend="async"), "Stage 'a': backend 'async' needs an async def function"),
        (lambda: Pipeline("p", [Stage("completed", _keep)]), "stage 'completed' has the terminal state 'COMPLETED'"),
        (lambda: Pipeline("p", [Stage("a", _keep), Stage("b", _keep, state="A"), Stage("c", _keep, state="a")]), ""),
        (lambda: Pipeline("p", [Stage("a", _keep), Stage("b", _keep), Stage("c", _keep, state="A")]), "'A' is already"),
        (lambda: Stage("", _keep), "Stage name '' is not allowed"),
    ],
)
def test_a_bad_pipeline_or_stage_raises_config_error_naming_the_stage_and_field(build: Any, message: str) -> None:
    if not message:  # consecutive stages sharing a state is allowed (the seed's processor and persistence do)
        build()
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


# --- running -------------------------------------------------------------------------------------


def test_a_five_stage_pipeline_runs_in_order_hands_values_on_and_records_each_stage_in_the_history() -> None:
    calls: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def stage(name: str, returns: Any) -> Any:
        def fn(task: Task, value: Any) -> Any:
            with lock:
                calls.append((name, value))
            return returns(value)

        return fn

    pipeline = Pipeline(
        "five",
        [
            Stage("parse", stage("parse", lambda v: {"n": v["data"]["index"]})),
            Stage("double", stage("double", lambda v: {"n": v["n"] * 2})),
            Stage("audit", stage("audit", lambda v: None)),  # None hands the value on unchanged
            Stage("label", stage("label", lambda v: [v["n"], "even" if v["n"] % 2 == 0 else "odd"])),
            Stage("wrap", stage("wrap", lambda v: {"result": v})),
        ],
    )
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        record = runtime.submit(payload(21)).result(timeout=10)
    assert record.state is S.COMPLETED
    assert record.pipeline == "five"
    assert [name for name, _ in calls] == ["parse", "double", "audit", "label", "wrap"]
    assert [value for _, value in calls] == [payload(21), {"n": 21}, {"n": 42}, {"n": 42}, (42, "even")]
    assert record.result == {"result": (42, "even")}
    assert record.path() == ["CREATED", "PARSE", "DOUBLE", "AUDIT", "LABEL", "WRAP", "COMPLETED"]
    _assert_history_follows(pipeline, record)
    assert (record.calls, record.retries) == (5, 0)


def test_a_stage_that_raises_fails_the_task_with_an_error_naming_the_stage() -> None:
    def boom(task: Task, value: Any) -> None:
        raise LookupError("no such customer")

    pipeline = Pipeline("p", [Stage("check", _keep), Stage("lookup", boom), Stage("store", _keep)])
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        record = runtime.submit(payload(1)).result(timeout=10)
    assert record.state is S.FAILED
    assert record.error == "lookup: LookupError: no such customer"
    assert record.path() == ["CREATED", "CHECK", "LOOKUP", "FAILED"]


def test_two_pipelines_run_side_by_side_and_each_task_and_event_records_its_pipeline() -> None:
    def shout(task: Task, value: Any) -> Any:
        return {"text": str(value["name"]).upper()}

    shouting = Pipeline("shouting", [Stage("shout", shout)])
    events: list[dict[str, Any]] = []
    with Runtime(RuntimeConfig(), services=ServiceSet(), pipelines=[shouting]) as runtime:
        runtime.subscribe(lambda event: events.append(event.to_dict()))
        seed = runtime.submit(payload(1)).result(timeout=10)
        loud = runtime.submit(payload(2), pipeline="shouting").result(timeout=10)
        assert [p.name for p in runtime.pipelines] == ["default", "shouting"]
        stats = runtime.stats()
    assert (seed.pipeline, seed.path()) == ("default", ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"])
    assert (loud.pipeline, loud.path(), loud.result) == (
        "shouting",
        ["CREATED", "SHOUT", "COMPLETED"],
        {"text": "TASK-2"},
    )
    assert {e["pipeline"] for e in events if e["task_id"] == seed.task_id} == {"default"}
    assert {e["pipeline"] for e in events if e["task_id"] == loud.task_id} == {"shouting"}
    assert set(stats["pools"]) == {"default.validator", "default.processor", "default.persistence", "shouting.shout"}
    assert stats["SHOUT"] == 0
    assert stats["COMPLETED"] == 2


def test_submitting_to_an_unknown_pipeline_raises_naming_the_known_ones_and_creates_nothing() -> None:
    with Runtime(RuntimeConfig()) as runtime:
        with pytest.raises(UnknownPipeline, match=r"no pipeline 'ingest' in this runtime; its pipelines: 'default'"):
            runtime.submit(payload(1), pipeline="ingest")
        assert isinstance(UnknownPipeline("x", []), ActorflowError)
        assert runtime.tasks() == []
        assert runtime.stats()["submitted"] == 0


def test_a_stage_runs_as_many_calls_at_once_as_its_workers_and_never_more() -> None:
    bound = 3
    barrier = threading.Barrier(bound, timeout=10)
    lock = threading.Lock()
    running = peak = 0

    def crowded(task: Task, value: Any) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            barrier.wait()  # passes only when `bound` calls are inside at once
        finally:
            with lock:
                running -= 1

    pipeline = Pipeline("p", [Stage("crowded", crowded, workers=bound), Stage("after", _keep, workers=1)])
    with Runtime(RuntimeConfig(stage_workers=8), pipelines=[pipeline]) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(bound * 4)]
        records = [handle.result(timeout=30) for handle in handles]
        pools = runtime.stats()["pools"]
    assert {record.state for record in records} == {S.COMPLETED}
    assert peak == bound
    assert (pools["crowded"]["size"], pools["after"]["size"]) == (bound, 1)


def test_max_attempts_is_per_stage_and_each_record_counts_its_retries() -> None:
    tries: dict[str, int] = {"stubborn": 0, "flaky": 0}
    lock = threading.Lock()

    def flaky(task: Task, value: Any) -> None:
        with lock:
            tries["flaky"] += 1
            if tries["flaky"] < 3:
                raise TransientError("try again")

    def stubborn(task: Task, value: Any) -> None:
        with lock:
            tries["stubborn"] += 1
        raise TransientError("still down")

    config = RuntimeConfig(max_attempts=2, retry_backoff_s=0.0, retry_backoff_max_s=0.0)
    flaky_first = Pipeline("p", [Stage("flaky", flaky, max_attempts=3), Stage("stubborn", stubborn, max_attempts=5)])
    with Runtime(config, pipelines=[flaky_first]) as runtime:
        record = runtime.submit(payload(1)).result(timeout=10)
    assert tries == {"flaky": 3, "stubborn": 5}
    assert record.state is S.FAILED
    assert record.error == "stubborn: TransientError: still down (gave up after 5 attempts)"
    assert (record.calls, record.retries) == (8, 6)


def test_a_clean_three_stage_run_makes_three_calls_and_no_retries() -> None:
    with Runtime(RuntimeConfig()) as runtime:
        record = runtime.submit(payload(1)).result(timeout=10)
    assert (record.calls, record.retries) == (3, 0)
    assert record.to_dict()["calls"] == 3
    assert record.to_dict()["retries"] == 0
    assert not hasattr(record, "attempts")
    assert "attempts" not in record.to_dict()


def test_a_stage_on_processes_runs_next_to_stages_on_threads() -> None:
    def prepare(task: Task, value: Any) -> Any:
        return {"n": value["data"]["index"], "thread_pid": os.getpid()}

    pipeline = Pipeline(
        "mixed",
        [
            Stage("prepare", prepare),
            Stage("square", square_in_child, backend="process", workers=1),
            Stage("finish", _keep),
        ],
    )
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        records = [runtime.submit(payload(i)).result(timeout=60) for i in (3, 4)]
    for record, n in zip(records, (9, 16), strict=True):
        assert record.state is S.COMPLETED, record.error
        assert record.result["n"] == n
        assert record.result["thread_pid"] == os.getpid()
        assert record.result["pid"] != os.getpid()


def test_an_async_stage_keeps_150_calls_in_flight_at_once_on_one_event_loop_thread() -> None:
    in_flight = 150
    threads: set[int] = set()
    state: dict[str, Any] = {"running": 0, "peak": 0, "all_in": None}

    async def wait_for_company(task: Task, value: Any) -> Any:
        if state["all_in"] is None:
            state["all_in"] = asyncio.Event()  # made on the loop that runs every call
        threads.add(threading.get_ident())
        state["running"] += 1
        state["peak"] = max(state["peak"], state["running"])
        if state["running"] == in_flight:
            state["all_in"].set()
        await asyncio.wait_for(state["all_in"].wait(), timeout=20)
        state["running"] -= 1
        return {"n": value["data"]["index"]}

    pipeline = Pipeline("io", [Stage("fetch", wait_for_company, workers=in_flight)])
    before = threading.active_count()
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        handles = [runtime.submit(payload(i)) for i in range(in_flight)]
        records = [handle.result(timeout=30) for handle in handles]
        grown = threading.active_count() - before
    assert {record.state for record in records} == {S.COMPLETED}
    assert sorted(record.result["n"] for record in records) == list(range(in_flight))
    assert state["peak"] == in_flight
    assert len(threads) == 1
    assert grown <= 6  # the state actor, the orchestrator, the timer, one event loop: not a thread per call


def test_an_async_stage_sees_its_calls_trace_context_and_no_other_calls() -> None:
    seen: dict[str, dict[str, Any]] = {}

    async def traced(task: Task, value: Any) -> None:
        await asyncio.sleep(0)  # the context must survive a suspension, with other calls running meanwhile
        seen[task.task_id] = structlog.contextvars.get_contextvars()

    with Runtime(RuntimeConfig(), pipelines=[Pipeline("io", [Stage("fetch", traced, workers=4)])]) as runtime:
        records = [runtime.submit(payload(i), traceparent=None).result(timeout=10) for i in range(4)]
    for record in records:
        context = seen[record.task_id]
        assert context["task_id"] == record.task_id
        assert context["trace_id"] == record.trace_id
        assert context["parent_span_id"] == record.span_id  # the call's span is a child of the task's
        assert context["service"] == "fetch"


def test_an_async_stage_past_its_timeout_is_cancelled_and_retried() -> None:
    cancelled = threading.Event()
    tries: list[int] = []

    async def slow_once(task: Task, value: Any) -> Any:
        tries.append(task.attempt)
        if task.attempt == 1:
            try:
                await asyncio.Event().wait()  # never set: only the timeout ends it
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return {"attempt": task.attempt}

    pipeline = Pipeline("io", [Stage("fetch", slow_once, timeout_s=0.2, retry_backoff_s=0.0)])
    with Runtime(RuntimeConfig(), pipelines=[pipeline]) as runtime:
        record = runtime.submit(payload(1)).result(timeout=10)
    assert cancelled.is_set()
    assert record.state is S.COMPLETED
    assert record.result == {"attempt": 2}
    assert (tries, record.retries) == ([1, 2], 1)


def test_cancelling_a_task_cancels_its_running_coroutine() -> None:
    entered = threading.Event()
    cancelled = threading.Event()

    async def forever(task: Task, value: Any) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with Runtime(RuntimeConfig(), pipelines=[Pipeline("io", [Stage("wait", forever)])]) as runtime:
        handle = runtime.submit(payload(1))
        assert entered.wait(10)
        assert handle.cancel()
        assert cancelled.wait(10)
        assert handle.result(timeout=10).state is S.CANCELLED


# --- the journal ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_schema_1_journal_of_the_previous_release_opens_migrates_in_place_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as old:
        assert old.execute("PRAGMA user_version").fetchone() == (1,)
        before = {row[0]: row for row in old.execute("SELECT task_id, state, payload, result, error FROM tasks")}
        old_records = {row[0]: row for row in old.execute("SELECT task_id, payload, result, trace_id FROM tasks")}
        log_before = old.execute("SELECT * FROM transitions ORDER BY task_id, seq").fetchall()
    with Runtime(RuntimeConfig(journal_path=str(path))) as runtime:
        assert runtime.join(30)
        records = {record.task_id: record for record in runtime.tasks()}
    assert set(records) == set(before)
    assert {r.pipeline for r in records.values()} == {"default"}
    for task_id in ("done-0", "done-1", "done-2", "retried-0", "invalid-0", "broken-0", "cancelled-0"):
        record = records[task_id]
        assert (record.task_id, record.state.value) == before[task_id][:2]
        assert record.error == before[task_id][4]
    assert records["retried-0"].calls == 4
    for task_id, (_, payload_json, result_json, trace_id) in old_records.items():
        assert thaw(records[task_id].payload) == json.loads(payload_json)
        assert records[task_id].trace_id == trace_id
        if result_json is not None:
            assert thaw(records[task_id].result) == json.loads(result_json)
    for task_id in ("stuck-0", "queued-0", "queued-1", "fresh-0"):  # unfinished: resumed to the end
        assert records[task_id].state is S.COMPLETED, records[task_id]
        assert records[task_id].path()[-1] == "COMPLETED"
        _assert_history_follows(runtime.pipelines[0], records[task_id])
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as new:
        assert new.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        log_after = new.execute("SELECT * FROM transitions ORDER BY task_id, seq").fetchall()
        assert new.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert set(log_before) <= set(log_after)  # nothing of the old log was lost


def test_a_schema_1_journal_can_be_inspected_read_only_without_being_migrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    digest = _sha256(path)
    assert inspect_main([str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["pipelines"] == {"default": 11}
    assert document["counts"]["COMPLETED"] == 4
    assert document["counts"]["PROCESSING"] == 3
    assert {task["pipeline"] for task in document["tasks"]} == {"default"}
    assert _sha256(path) == digest


def test_a_schema_1_journal_is_refused_untouched_by_a_runtime_without_the_seed_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, path)
    digest = _sha256(path)
    with pytest.raises(JournalError, match=r"unfinished tasks of pipeline\(s\) .*'default' \(4 unfinished tasks\)"):
        Runtime(RuntimeConfig(journal_path=str(path)), pipelines=[Pipeline("other", [Stage("a", _keep)])])
    assert _sha256(path) == digest


class _Gate:
    """Blocks the stage's calls until opened (in the first runtime only)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, task: Task, value: Any) -> Any:
        self.entered.set()
        self.opened.wait(30)
        return {"gated": value}


def _enrich(task: Task, value: Any) -> Any:
    return {"n": value["data"]["index"] * 10}


def _store(task: Task, value: Any) -> Any:
    return {"stored": value}


def _custom(gate: Any) -> Pipeline:
    return Pipeline("custom", [Stage("enrich", _enrich), Stage("gate", gate, workers=1), Stage("store", _store)])


def test_a_custom_pipelines_tasks_survive_close_without_drain_and_resume_with_their_values(tmp_path: Path) -> None:
    path = str(tmp_path / "tasks.db")
    gate = _Gate()
    first = Runtime(RuntimeConfig(journal_path=path), pipelines=[_custom(gate)])
    ids = [first.submit(payload(i)).task_id for i in range(4)]
    assert gate.entered.wait(10)
    first.close(drain=False)
    gate.opened.set()
    with Journal.open_readonly(path) as reader:
        left = [r for r in reader.records() if r.state.value in ("ENRICH", "GATE")]
    assert left, "the close must have left tasks in flight"

    with Runtime(RuntimeConfig(journal_path=path), pipelines=[_custom(lambda task, value: {"gated": value})]) as again:
        assert again.join(30)
        records = [again.get(task_id) for task_id in ids]
    for index, record in enumerate(records):
        assert record.state is S.COMPLETED, record
        assert record.pipeline == "custom"
        assert record.result == {"stored": {"gated": {"n": index * 10}}}  # the value handed on survived the restart
        _assert_history_follows(_custom(gate), record)


def test_reopening_a_journal_without_the_pipeline_of_its_unfinished_tasks_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    gate = _Gate()
    first = Runtime(RuntimeConfig(journal_path=str(path)), pipelines=[_custom(gate)])
    first.submit(payload(1))
    assert gate.entered.wait(10)
    first.close(drain=False)
    gate.opened.set()
    digest = _sha256(path)
    with pytest.raises(
        JournalError, match=r"pipeline\(s\) this runtime does not define: 'custom' \(1 unfinished task\)"
    ):
        Runtime(RuntimeConfig(journal_path=str(path)))
    assert _sha256(path) == digest
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


# --- reading the log back ------------------------------------------------------------------------


def test_the_trace_viewer_checks_each_task_against_the_table_of_its_own_pipeline(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    close = configure_logging(json=True, level="DEBUG", file=log)
    try:
        shouting = Pipeline("shouting", [Stage("shout", _keep), Stage("echo", _keep)])
        with Runtime(RuntimeConfig(), services=ServiceSet(), pipelines=[shouting]) as runtime:
            loud = runtime.submit(payload(1), pipeline="shouting").result(timeout=10)
            seed = runtime.submit(payload(2)).result(timeout=10)
    finally:
        close()
    trace = load_trace(log)
    assert check_transitions(trace) == []
    timelines = {timeline.task_id: timeline for timeline in trace.tasks}
    assert timelines[loud.task_id].pipeline == "shouting"
    assert timelines[loud.task_id].path == ["CREATED", "SHOUT", "ECHO", "COMPLETED"]
    assert timelines[seed.task_id].path == ["CREATED", "VALIDATED", "PROCESSING", "COMPLETED"]
    # The same moves are wrong for a task of the seed pipeline: the viewer reads each task's own table.
    forged = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("pipeline") == "shouting":
            event["pipeline"] = "default"
        forged.append(json.dumps(event))
    (tmp_path / "forged.jsonl").write_text("\n".join(forged) + "\n")
    kinds = {violation.kind for violation in check_transitions(load_trace(tmp_path / "forged.jsonl"))}
    assert "unknown_state" in kinds


def test_the_trace_command_filters_by_a_custom_pipelines_state_and_refuses_a_state_the_log_never_had(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run.jsonl"
    close = configure_logging(json=True, level="DEBUG", file=log)
    try:
        gate = _Gate()
        runtime = Runtime(RuntimeConfig(), pipelines=[_custom(gate)])
        held = runtime.submit(payload(1)).task_id
        assert gate.entered.wait(10)
        runtime.close(drain=False)  # the task is left in GATE
        gate.opened.set()
    finally:
        close()
    assert trace_main([str(log), "--state", "gate", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [task["task_id"] for task in document["tasks"]] == [held]
    assert trace_main([str(log), "--state", "FETCH"]) == 2
    assert "'FETCH' is not a task state; allowed: CREATED, VALIDATED" in capsys.readouterr().err


# --- the HTTP API and inspect --------------------------------------------------------------------


def test_the_http_api_takes_the_pipeline_by_name_lists_them_and_refuses_an_unknown_one() -> None:
    shouting = Pipeline("shouting", [Stage("shout", lambda task, value: {"text": str(value["name"]).upper()})])
    with (
        Runtime(RuntimeConfig(), services=ServiceSet(), pipelines=[shouting]) as runtime,
        serve_in_background(create_app(runtime)) as server,
        httpx.Client(base_url=server.url) as api,
    ):
        created = api.post("/tasks?pipeline=shouting", json={"name": "hi"})
        assert created.status_code == 201
        assert created.json()["pipeline"] == "shouting"
        assert api.post("/tasks", json={"name": "a", "data": 1}).json()["pipeline"] == "default"
        unknown = api.post("/tasks?pipeline=ingest", json={"name": "a"})
        assert unknown.status_code == 400
        assert "no pipeline 'ingest' in this runtime; its pipelines: default, shouting" in unknown.text
        assert runtime.join(10)
        record = api.get(f"/tasks/{created.json()['task_id']}").json()
        assert (record["pipeline"], record["state"], record["result"]) == ("shouting", "COMPLETED", {"text": "HI"})
        assert (record["calls"], record["retries"]) == (1, 0)
        assert api.get("/tasks?state=SHOUT").status_code == 200
        assert api.get("/tasks?state=FETCH").status_code == 400
        document = api.get("/openapi.json").json()
    assert [p["name"] for p in document["x-pipelines"]] == ["default", "shouting"]
    assert "SHOUT" in document["components"]["schemas"]["TaskState"]["enum"]
    post = document["paths"]["/tasks"]["post"]
    assert next(p for p in post["parameters"] if p["name"] == "pipeline")["schema"]["enum"] == ["default", "shouting"]


def test_inspect_shows_each_tasks_pipeline_and_the_states_of_a_custom_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "tasks.db")
    with Runtime(RuntimeConfig(journal_path=path), pipelines=[_custom(lambda task, value: None)]) as runtime:
        task_id = runtime.submit(payload(2)).task_id
    assert inspect_main([path, "--state", "GATE"]) == 0
    assert inspect_main([path, "--task", task_id]) == 0
    out = capsys.readouterr().out
    assert "pipelines  custom (1)" in out
    assert f"task {task_id}  COMPLETED  pipeline custom  calls 3  retries 0" in out
    assert "ENRICH     -> GATE" in out
    assert inspect_main([path, "--state", "FETCH"]) == 2  # no task of this journal ever was in FETCH
    allowed = "CREATED, VALIDATED, PROCESSING, COMPLETED, FAILED, CANCELLED, ENRICH, GATE, STORE"
    assert f"unknown state 'FETCH'; allowed: {allowed}" in capsys.readouterr().err


def test_metrics_are_labelled_with_each_tasks_pipeline() -> None:
    shouting = Pipeline("shouting", [Stage("shout", _keep)])
    registry = prometheus_client.CollectorRegistry()
    with Runtime(RuntimeConfig(), services=ServiceSet(), pipelines=[shouting]) as runtime:
        registry.register(runtime.metrics_collector())
        runtime.submit(payload(1), pipeline="shouting").result(timeout=10)
        runtime.submit(payload(2)).result(timeout=10)
        text = prometheus_client.generate_latest(registry).decode()
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    shout = (("from_state", "CREATED"), ("pipeline", "shouting"), ("runtime", "default"), ("to_state", "SHOUT"))
    seed = (("from_state", "VALIDATED"), ("pipeline", "default"), ("runtime", "default"), ("to_state", "PROCESSING"))
    assert found[("actorflow_transitions_total", shout)] == 1
    assert found[("actorflow_transitions_total", seed)] == 1


def test_calls_in_flight_name_the_running_call_as_the_oldest_one_not_yet_answered() -> None:
    def call(call_id: int) -> RunService:
        return RunService(call_id, "stage", Task(f"t-{call_id}", {}), TraceContext("a" * 32, "b" * 16), 1)

    held = CallsInFlight()
    assert held.head() is None
    assert held.add(call(1)) is True  # the first call starts at once
    assert held.add(call(2)) is False  # the next waits behind it
    assert held.head() == call(1)
    assert held.settle(1) is True  # answered: call 2 starts now
    assert held.head() == call(2)
    assert held.settle(99) is False  # an unknown (late) answer changes nothing
    assert held.settle(2) is False
    assert len(held) == 0


def test_the_async_backend_takes_a_batch_with_one_wake_up_and_reports_calls_finished_together_in_one_message() -> None:
    backend = AsyncBackend()
    reports: queue.SimpleQueue[ServiceDone | ServicesDone] = queue.SimpleQueue()
    wake_ups = 0
    call_soon_threadsafe = backend.loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any) -> Any:
        nonlocal wake_ups
        wake_ups += 1
        return call_soon_threadsafe(callback, *args)

    async def echo(task: Task, value: Any) -> Any:
        return {"echo": task.task_id}  # no await: the three finish in the loop iteration they start in

    try:
        backend.loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        worker = backend.start_worker("fetch-1", "fetch", echo, reports.put, lambda name, why: None)
        calls = [RunService(n, "fetch", Task(f"t{n}", {"n": n}), new_trace(), 1) for n in (1, 2, 3)]
        assert worker.send_many(calls)
        assert wake_ups == 1
        report = reports.get(timeout=10)
        assert isinstance(report, ServicesDone)
        assert [(done.call_id, done.status, done.result) for done in report.dones] == [
            (1, "ok", {"echo": "t1"}),
            (2, "ok", {"echo": "t2"}),
            (3, "ok", {"echo": "t3"}),
        ]
        assert worker.send(RunService(4, "fetch", Task("t4", {"n": 4}), new_trace(), 1))
        alone = reports.get(timeout=10)  # a lone report goes as itself
        assert isinstance(alone, ServiceDone)
        assert alone.call_id == 4
    finally:
        worker.retire()
        backend.close()


async def _keep_async(task: Task, value: Any) -> None:
    return None


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_stage_with_more_workers_than_max_workers_is_refused_before_any_is_started(backend: str) -> None:
    before = threading.active_count()
    pipeline = Pipeline("wide", [Stage("work", _keep, workers=2000, backend=backend)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        Runtime(pipelines=[pipeline])
    message = str(caught.value)
    assert "Stage 'work' of pipeline 'wide'" in message
    assert "2000" in message
    assert "RuntimeConfig.max_workers" in message
    assert threading.active_count() <= before  # refused before any thread was started
    with Runtime(RuntimeConfig(max_workers=8), pipelines=[Pipeline("p", [Stage("work", _keep, workers=8)])]) as ok:
        assert ok.submit({"n": 1}).result(timeout=10).state is TaskState.COMPLETED


def test_an_async_stage_may_keep_ten_thousand_calls_in_flight_and_is_bounded_by_max_async_workers() -> None:
    with Runtime(pipelines=[Pipeline("p", [Stage("wait", _keep_async, workers=10_000)])]) as runtime:
        assert runtime.submit({"n": 1}).result(timeout=10).state is TaskState.COMPLETED
    with pytest.raises(ConfigError, match=r"RuntimeConfig\.max_async_workers"):
        Runtime(
            RuntimeConfig(max_async_workers=100), pipelines=[Pipeline("p", [Stage("wait", _keep_async, workers=101)])]
        )
