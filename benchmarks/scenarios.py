"""The benchmark scenarios, each running the runtime and its baselines alternately in one process.

A scenario lists its contenders and runs them round-robin (A, B, C, A, B, C,
...), a fresh system per round. Throughputs are reported as medians over the
rounds, and ratios are taken *within* each round (the contenders of one round
ran seconds apart, under the same background load) and then their median is
reported: on a noisy 2-core machine the absolute figures swing by 2-3x from
minute to minute, while same-round ratios hold steady.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from actorflow.core.errors import ConfigError
from actorflow.core.pipeline import Stage
from actorflow.core.tracing import configure_logging
from benchmarks import workload
from benchmarks.baselines import baseline_factory
from benchmarks.load import Measurement, Sizes, measure
from benchmarks.mode import Mode
from benchmarks.pipeline import Pipeline, PipelineFactory, RuntimePipeline, Work, runtime_factory, stage_factory
from benchmarks.stats import median, percentiles, rounded

__all__ = ["SCENARIOS", "Mode", "Scenario", "journal_available", "process_backend_available"]


@dataclass(slots=True)
class Contender:
    """One system of a scenario."""

    name: str
    factory: PipelineFactory
    role: str = "baseline"
    """"runtime" or "baseline": ratios are taken of runtimes over baselines by default."""
    sizes: Sizes | None = None
    """Sizes of its own (e.g. fewer tasks for a baseline that runs one task at a time)."""
    report: Callable[[], dict[str, Any]] | None = None
    """Called after each round, once the system is closed, for extra figures (e.g. log lines written)."""
    measurements: list[Measurement] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named scenario: `run(mode)` returns its JSON section."""

    key: str
    title: str
    run: Callable[[Mode], dict[str, Any]]


# --- running and summarizing ------------------------------------------------------------------------


def _alternate(
    contenders: list[Contender], payloads: Callable[[int], Mapping[str, Any]], sizes: Sizes, rounds: int
) -> None:
    for _ in range(rounds):
        for contender in contenders:
            measurement = measure(contender.factory, payloads, contender.sizes or sizes)
            if contender.report is not None:
                measurement.extra.update(contender.report())
            contender.measurements.append(measurement)


def _system_summary(contender: Contender, sizes: Sizes) -> dict[str, Any]:
    runs = contender.measurements
    own = contender.sizes or sizes
    throughputs = [m.load.throughput for m in runs]
    cpu = [m.load.cpu_us_per_task for m in runs]
    switches = [m.load.switches_per_task for m in runs]
    summary: dict[str, Any] = {
        "role": contender.role,
        "tasks_per_round": own.tasks,
        "throughput_tps": {"median": rounded(median(throughputs)), "rounds": [rounded(t) for t in throughputs]},
        "cpu_us_per_task": {"median": rounded(median(cpu)), "rounds": [rounded(c) for c in cpu]},
        "switches_per_task": {"median": rounded(median(switches), 3), "rounds": [rounded(c, 3) for c in switches]},
        "latency_saturated_ms": percentiles([x for m in runs for x in m.load.latencies_ms]),
    }
    if own.light:
        light = [x for m in runs for x in m.light_ms]
        summary["latency_light_ms"] = percentiles(light)
        per_round = [percentiles(m.light_ms) for m in runs]
        summary["latency_light_ms"]["p50_rounds"] = [p["p50"] for p in per_round]
        summary["latency_light_ms"]["p99_rounds"] = [p["p99"] for p in per_round]
    extras = [m.extra for m in runs if m.extra]
    if extras:
        summary["extra"] = {key: [e.get(key) for e in extras] for key in extras[0]}
    return summary


def _ratio(numerator: Contender, denominator: Contender) -> dict[str, Any]:
    rounds = [
        a.load.throughput / b.load.throughput
        for a, b in zip(numerator.measurements, denominator.measurements, strict=True)
        if b.load.throughput > 0
    ]
    return {"median": rounded(median(rounds), 3), "rounds": [rounded(r, 3) for r in rounds]}


def _section(
    title: str,
    contenders: list[Contender],
    sizes: Sizes,
    mode: Mode,
    *,
    pairs: list[tuple[str, str]] | None = None,
    params: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    by_name = {c.name: c for c in contenders}
    if pairs is None:
        runtimes = [c.name for c in contenders if c.role == "runtime"]
        baselines = [c.name for c in contenders if c.role == "baseline"]
        pairs = [(r, b) for r in runtimes for b in baselines]
    return {
        "title": title,
        "status": "ok",
        "notes": notes or [],
        "params": {
            "rounds": mode.rounds,
            "tasks": sizes.tasks,
            "light_tasks": sizes.light,
            "warmup_tasks": sizes.warmup,
            "concurrency": sizes.concurrency,
            "submitters": sizes.submitters,
            **(params or {}),
        },
        "systems": {c.name: _system_summary(c, sizes) for c in contenders},
        "ratios": {f"{a} / {b}": _ratio(by_name[a], by_name[b]) for a, b in pairs},
    }


def skipped(title: str, why: str) -> dict[str, Any]:
    """The section of a scenario that cannot run in this build."""
    return {"title": title, "status": "skipped", "notes": [why], "systems": {}, "ratios": {}}


def journal_available() -> str | None:
    """None if `core.journal` exists, else why the journal scenarios are skipped."""
    if importlib.util.find_spec("actorflow.core.journal") is None:
        return "core.journal is not in this build; journal scenarios skipped"
    return None


def process_backend_available() -> str | None:
    """None if `RuntimeConfig(service_backend="process")` starts, else the ConfigError's message."""
    work = Work(workload.noop_validate, workload.noop_process, workload.noop_persist, 1, 1, 1)
    try:
        RuntimePipeline(work, 1, service_backend="process").close()
    except ConfigError as exc:
        return f"the process backend is not in this build yet: {exc}"
    return None


_NOOP = Work(workload.noop_validate, workload.noop_process, workload.noop_persist)


def _noop_baselines(work: Work) -> list[Contender]:
    return [Contender(kind, baseline_factory(kind, work)) for kind in ("bare-pykka", "naive-pykka", "threadpool")]


# --- the scenarios ----------------------------------------------------------------------------------


def run_noop(mode: Mode) -> dict[str, Any]:
    """No-op services in memory: throughput, and latency at light and saturating load."""
    sizes = Sizes(tasks=mode.pick(5000, 600), light=mode.pick(1000, 100), warmup=mode.pick(500, 100), timeout_s=300)
    contenders = [Contender("runtime", runtime_factory(_NOOP), role="runtime"), *_noop_baselines(_NOOP)]
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    return _section(
        "No-op services, in memory",
        contenders,
        sizes,
        mode,
        params={"workers": {"validator": 2, "processor": 4, "persistence": 2}, "threadpool_threads": 4},
    )


def run_journal(mode: Mode) -> dict[str, Any]:
    """No-op services with the SQLite journal, durability "normal" and "full", against in memory."""
    title = "No-op services, journal (SQLite)"
    why = journal_available()
    if why is not None:
        return skipped(title, why)
    sizes = Sizes(tasks=mode.pick(4000, 400), light=mode.pick(500, 50), warmup=mode.pick(300, 50), timeout_s=600)
    counter = iter(range(1_000_000))

    def journaled(durability: str) -> PipelineFactory:
        def build(concurrency: int) -> Pipeline:
            path = os.path.join(mode.workdir, f"journal-{durability}-{next(counter)}.sqlite")
            return RuntimePipeline(
                _NOOP, concurrency, name=f"runtime-journal-{durability}", journal_path=path, durability=durability
            )

        return build

    many = 16
    batch = 64
    batched = replace(sizes, batch=batch)
    contenders = [
        Contender("runtime-memory", runtime_factory(_NOOP, name="runtime-memory"), role="reference"),
        Contender("runtime-journal-normal", journaled("normal"), role="runtime"),
        Contender("runtime-journal-full", journaled("full"), role="runtime"),
        Contender("runtime-journal-normal-submit-many", journaled("normal"), role="runtime", sizes=batched),
        Contender("runtime-journal-full-submit-many", journaled("full"), role="runtime", sizes=batched),
        Contender(
            f"runtime-journal-normal-{many}-submitters",
            journaled("normal"),
            role="runtime",
            sizes=replace(sizes, submitters=many),
        ),
        Contender("bare-pykka", baseline_factory("bare-pykka", _NOOP)),
    ]
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    return _section(
        title,
        contenders,
        sizes,
        mode,
        pairs=[
            ("runtime-journal-normal", "runtime-memory"),
            ("runtime-journal-full", "runtime-memory"),
            ("runtime-journal-normal-submit-many", "runtime-memory"),
            ("runtime-journal-full-submit-many", "runtime-memory"),
            (f"runtime-journal-normal-{many}-submitters", "runtime-memory"),
            ("runtime-journal-normal", "bare-pykka"),
        ],
        notes=[
            "with a journal, submit() returns once the creation is committed, so each submitting thread waits "
            f"for a commit per task; the {many}-submitter row shows how much group commit recovers with more "
            "producers (the in-memory runtime does not wait: it has nothing to commit)",
            f"the submit-many rows submit in batches of {batch} with Runtime.submit_many: one message and one "
            "commit per batch; the light-load phase still submits one task at a time",
        ],
    )


class _TracedPipeline(RuntimePipeline):
    """A runtime with `configure_logging(json=True, level=level, file=...)` for its lifetime."""

    def __init__(
        self, concurrency: int, path: str, level: str, tally: dict[str, Any], *, name: str = "", **config: Any
    ) -> None:
        structlog.reset_defaults()
        self._path = path
        self._tally = tally
        self._close_log = configure_logging(json=True, level=level, file=path)
        try:
            super().__init__(_NOOP, concurrency, name=name or f"runtime-tracing-json-{level.lower()}", **config)
        except BaseException:
            self._close_log()
            structlog.reset_defaults()
            raise

    def close(self) -> None:
        """Stop the runtime, then flush and close the log and count what it holds."""
        try:
            super().close()
        finally:
            self._close_log()
            structlog.reset_defaults()
        with open(self._path, "rb") as log:
            lines = sum(1 for _ in log)
        self._tally.update(events=lines, log_bytes=os.path.getsize(self._path))
        os.remove(self._path)


def run_tracing(mode: Mode) -> dict[str, Any]:
    """No-op services with JSON tracing to a file at INFO and at DEBUG, against tracing off."""
    sizes = Sizes(tasks=mode.pick(4000, 400), light=mode.pick(500, 50), warmup=mode.pick(300, 50), timeout_s=300)
    counter = iter(range(1_000_000))

    def traced(level: str) -> Contender:
        tally: dict[str, Any] = {}

        def build(concurrency: int) -> Pipeline:
            path = os.path.join(mode.workdir, f"trace-{level.lower()}-{next(counter)}.jsonl")
            return _TracedPipeline(concurrency, path, level, tally)

        def report() -> dict[str, Any]:
            # Every line of the file, the run's few lifecycle events included, over every task submitted.
            total = sizes.tasks + sizes.light + sizes.warmup
            return {**tally, "events_per_task": rounded(tally["events"] / total, 3)}

        return Contender(f"runtime-tracing-json-{level.lower()}", build, role="runtime", report=report)

    structlog.reset_defaults()
    contenders = [
        Contender("runtime-tracing-off", runtime_factory(_NOOP, name="runtime-tracing-off"), role="reference"),
        traced("INFO"),
        traced("DEBUG"),
    ]
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    return _section(
        "No-op services, JSON tracing to a file at INFO and at DEBUG",
        contenders,
        sizes,
        mode,
        pairs=[
            ("runtime-tracing-json-info", "runtime-tracing-off"),
            ("runtime-tracing-json-debug", "runtime-tracing-off"),
        ],
        params={"configure_logging": {"json": True, "level": ["INFO", "DEBUG"], "file": "<tmp>/trace-LEVEL-N.jsonl"}},
    )


def run_production(mode: Mode) -> dict[str, Any]:
    """The production profile (journal "normal", JSON tracing at INFO, metrics on) against no-op in memory."""
    title = "Production profile: journal, JSON tracing at INFO, metrics on"
    why = journal_available()
    if why is not None:
        return skipped(title, why)
    batch = 64
    sizes = Sizes(tasks=mode.pick(4000, 400), light=mode.pick(500, 50), warmup=mode.pick(300, 50), timeout_s=600)
    tally: dict[str, Any] = {}
    counter = iter(range(1_000_000))

    def production(concurrency: int) -> Pipeline:
        round_ = next(counter)
        return _TracedPipeline(
            concurrency,
            os.path.join(mode.workdir, f"production-{round_}.jsonl"),
            "INFO",
            tally,
            name="runtime-production",
            journal_path=os.path.join(mode.workdir, f"production-{round_}.sqlite"),
            durability="normal",
        )

    structlog.reset_defaults()
    contenders = [
        Contender("runtime-memory", runtime_factory(_NOOP, name="runtime-memory"), role="reference"),
        Contender("runtime-production", production, role="runtime", sizes=replace(sizes, batch=batch)),
    ]
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    return _section(
        title,
        contenders,
        sizes,
        mode,
        pairs=[("runtime-production", "runtime-memory")],
        params={
            "journal": {"durability": "normal"},
            "configure_logging": {"json": True, "level": "INFO", "file": "<tmp>/production-N.jsonl"},
            "metrics": True,
            "submit_many_batch": batch,
        },
        notes=[
            f"the production runtime submits in batches of {batch} with Runtime.submit_many (one commit each); "
            "the in-memory reference submits one task at a time, as in the other scenarios"
        ],
    )


def run_metrics(mode: Mode) -> dict[str, Any]:
    """No-op services with the runtime's metrics counted (the default) against metrics off, scraped once a round."""
    sizes = Sizes(tasks=mode.pick(5000, 600), light=mode.pick(500, 50), warmup=mode.pick(300, 50), timeout_s=300)
    tally: dict[str, Any] = {}

    class _Scraped(RuntimePipeline):
        def close(self) -> None:
            # One scrape of everything counted, as Prometheus would make: it must not be what costs.
            from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415 - optional extra

            registry = CollectorRegistry()
            registry.register(self.runtime.metrics_collector())
            tally["exposition_bytes"] = len(generate_latest(registry))
            super().close()

    def scraped(concurrency: int) -> Pipeline:
        return _Scraped(_NOOP, concurrency, name="runtime-metrics-on")

    contenders = [
        Contender(
            "runtime-metrics-off", runtime_factory(_NOOP, name="runtime-metrics-off", metrics=False), role="reference"
        ),
        Contender("runtime-metrics-on", scraped, role="runtime", report=lambda: dict(tally)),
    ]
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    return _section(
        "No-op services, Prometheus metrics counted vs off",
        contenders,
        sizes,
        mode,
        pairs=[("runtime-metrics-on", "runtime-metrics-off")],
        notes=[
            "metrics on: per task 5 transition counts, 3 run-time and 3 queue-wait histogram updates and one "
            "end-to-end latency update, each on the actor thread that owns it (no locks)"
        ],
    )


def run_io(mode: Mode) -> dict[str, Any]:
    """I/O-bound: the processor sleeps 5 ms, 16 processor workers; efficiency against 16 / 5 ms."""
    workers = 16
    work = Work(workload.noop_validate, workload.sleep_process, workload.noop_persist, processor_workers=workers)
    ideal = workers / workload.SLEEP_S
    sizes = Sizes(tasks=mode.pick(4000, 400), warmup=mode.pick(300, 50), timeout_s=300)
    naive_sizes = replace(sizes, tasks=mode.pick(300, 40), warmup=mode.pick(10, 10, 2))
    contenders = [
        Contender("runtime", runtime_factory(work), role="runtime"),
        Contender("bare-pykka", baseline_factory("bare-pykka", work)),
        Contender("naive-pykka", baseline_factory("naive-pykka", work), sizes=naive_sizes),
        Contender("threadpool", baseline_factory("threadpool", work)),
    ]
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    section = _section(
        "I/O-bound: the processor sleeps 5 ms, 16 processor workers",
        contenders,
        sizes,
        mode,
        params={"sleep_ms": workload.SLEEP_S * 1000, "processor_workers": workers, "ideal_tps": ideal},
        notes=["efficiency = throughput / (16 workers / 5 ms) = throughput / 3200 tasks/s"],
    )
    for name, system in section["systems"].items():
        rounds = [m.load.throughput / ideal for m in next(c for c in contenders if c.name == name).measurements]
        system["efficiency"] = {"median": rounded(median(rounds), 3), "rounds": [rounded(r, 3) for r in rounds]}
    return section


def _run_peers(mode: Mode, *, io: bool) -> dict[str, Any]:
    """actorflow (in memory and journaled) against Celery+Redis, Dask distributed and Ray tasks, alternating."""
    from benchmarks import peers  # noqa: PLC0415 - the peers' packages are the bench extra's

    job = "I/O job (the middle stage sleeps 5 ms)" if io else "no-op job"
    title = f"Peers, {job}"
    if mode.quick:
        return skipped(title, "peers run in the full run only (python -m benchmarks --only peers)")
    work = (
        Work(workload.noop_validate, workload.sleep_process, workload.noop_persist, processor_workers=16)
        if io
        else _NOOP
    )
    workers = work.validator_workers + work.processor_workers + work.persistence_workers
    missing = peers.missing_peers()
    # A closed loop of 64 for every system: Celery's Redis result backend stalls with hundreds pending
    # (NOTES), and latencies compare only at the same concurrency.
    sizes = Sizes(tasks=mode.pick(5000, 400), warmup=mode.pick(300, 30), concurrency=64, timeout_s=600)
    peer_sizes = Sizes(tasks=mode.pick(1500, 100), warmup=mode.pick(100, 10), concurrency=64, timeout_s=600)
    counter = iter(range(1_000_000))

    def journaled(concurrency: int) -> Pipeline:
        path = os.path.join(mode.workdir, f"peers-journal-{next(counter)}.sqlite")
        return RuntimePipeline(work, concurrency, name="runtime-journal", journal_path=path)

    with contextlib.ExitStack() as stack:
        contenders = [
            Contender("runtime", runtime_factory(work), role="runtime"),
            Contender("runtime-journal", journaled, role="runtime"),
        ]
        if "celery" not in missing:
            url = stack.enter_context(peers.celery_services(workers))
            contenders.append(Contender("celery", lambda c: peers.CeleryPipeline(url, c, io=io), sizes=peer_sizes))
        if "dask" not in missing:
            client = stack.enter_context(peers.dask_client(workers))
            contenders.append(Contender("dask", lambda c: peers.DaskPipeline(client, c, io=io), sizes=peer_sizes))
        if "ray" not in missing:
            remote = stack.enter_context(peers.ray_session(workers))
            contenders.append(
                Contender("ray-tasks", lambda c: peers.RayTasksPipeline(remote, c, io=io), sizes=peer_sizes)
            )
        _alternate(contenders, workload.payload, sizes, mode.rounds)
    notes = [f"{name}: not run: {why}" for name, why in missing.items()]
    notes.append(f"every system runs the same three stages with {workers} workers in all, 64 items in flight")
    return _section(title, contenders, sizes, mode, params={"workers": workers, "io": io}, notes=notes)


def run_peers(mode: Mode) -> dict[str, Any]:
    """The no-op job: actorflow against Celery+Redis, Dask distributed and Ray tasks."""
    return _run_peers(mode, io=False)


def run_peers_io(mode: Mode) -> dict[str, Any]:
    """The I/O job: actorflow against Celery+Redis, Dask distributed and Ray tasks."""
    return _run_peers(mode, io=True)


def run_cpu(mode: Mode) -> dict[str, Any]:
    """CPU-bound: about 5 ms of pure-Python work per task, 2 workers: threads against processes."""
    workers = 2
    iterations = workload.calibrate_cpu()
    cpu_s, wall_s = workload.time_cpu(iterations)
    one_call_ms = cpu_s * 1000
    work = Work(workload.noop_validate, workload.cpu_process, workload.noop_persist, processor_workers=workers)
    sizes = Sizes(tasks=mode.pick(400, 40), warmup=mode.pick(20, 4, 2), timeout_s=300)

    def payloads(index: int) -> Mapping[str, Any]:
        return workload.payload(index, spin=iterations)

    notes = [
        f"one processor call = {iterations} loop iterations, calibrated to {one_call_ms:.2f} ms of CPU "
        f"({wall_s * 1000:.2f} ms wall when checked)",
        "single-core bound = 1 / 5 ms = 200 tasks/s; cpu_us_per_task counts this process only, not children",
    ]
    contenders = [Contender("runtime-thread", runtime_factory(work, name="runtime-thread"), role="runtime")]
    pairs = [("runtime-thread", "threadpool")]
    why = process_backend_available()
    if why is None:
        contenders.append(
            Contender(
                "runtime-process",
                runtime_factory(work, name="runtime-process", service_backend="process"),
                role="runtime",
            )
        )
        # The same job with only the CPU stage on processes (validate and persist on threads, as in the
        # hand-written ProcessPoolExecutor pipeline): Stage(..., backend="process").
        steps = [
            Stage("validate", workload.validate_stage, workers=work.validator_workers),
            Stage("process", workload.cpu_stage, workers=workers, backend="process"),
            Stage("persist", workload.persist_stage, workers=work.persistence_workers),
        ]
        contenders.append(
            Contender(
                "runtime-process-stage",
                stage_factory(steps, name="runtime-process-stage", threads=[]),
                role="runtime",
            )
        )
        pairs = [
            ("runtime-process", "runtime-thread"),
            ("runtime-process", "processpool"),
            ("runtime-process-stage", "processpool"),
            *pairs,
        ]
    else:
        notes.append(why + "; runtime-process skipped")
    contenders += [
        Contender("threadpool", baseline_factory("threadpool", work)),
        Contender("processpool", baseline_factory("processpool", work)),
    ]
    pairs.append(("processpool", "threadpool"))
    _alternate(contenders, payloads, sizes, mode.rounds)
    section = _section(
        "CPU-bound: about 5 ms of pure-Python work per task, 2 workers",
        contenders,
        sizes,
        mode,
        pairs=pairs,
        params={"processor_workers": workers, "spin_iterations": iterations, "one_call_ms": rounded(one_call_ms)},
        notes=notes,
    )
    for system in section["systems"].values():
        system["vs_one_core"] = rounded(system["throughput_tps"]["median"] * workload.CPU_TARGET_S, 3)
    return section


def run_async_io(mode: Mode) -> dict[str, Any]:
    """I/O-bound stage awaiting 20 ms: workers=1000 on one event loop, against 16 and 200 threads."""
    tasks = mode.pick(10_000, 2_000, 300)
    contenders: list[Contender] = []
    threads: dict[str, list[int]] = {}
    for name, stage in (
        ("async-1000", Stage("fetch", workload.await_stage, workers=1000)),
        ("threads-16", Stage("fetch", workload.sleep_stage, workers=16)),
        ("threads-200", Stage("fetch", workload.sleep_stage, workers=200)),
    ):
        threads[name] = []
        contenders.append(Contender(name, stage_factory(stage, name=name, threads=threads[name]), role="runtime"))
    sizes = Sizes(tasks=tasks, warmup=mode.pick(500, 200, 50), concurrency=1000, submitters=2, timeout_s=600)
    _alternate(contenders, workload.payload, sizes, mode.rounds)
    section = _section(
        "I/O-bound stage awaiting 20 ms: 1000 calls in flight on one event loop against 16 and 200 threads",
        contenders,
        sizes,
        mode,
        pairs=[("async-1000", "threads-16"), ("async-1000", "threads-200")],
        params={"await_ms": workload.AWAIT_S * 1000, "concurrency": 1000},
        notes=[
            "ideal = workers / 20 ms: 50,000 tasks/s for 1000 in flight, 800 for 16 threads, 10,000 for 200",
            "threads = threads the runtime started (state actor, orchestrator, timer, workers or event loop)",
        ],
    )
    for name, system in section["systems"].items():
        system["threads"] = {"median": median(threads[name]), "rounds": threads[name]}
    return section


def run_memory(mode: Mode) -> dict[str, Any]:
    """Peak RSS and bytes per retained task, each system in its own subprocess."""
    from benchmarks.memory import run_memory_scenario  # noqa: PLC0415 - keeps the subprocess entry point apart

    return run_memory_scenario(mode, journal_available())


SCENARIOS: dict[str, Scenario] = {
    scenario.key: scenario
    for scenario in (
        Scenario("noop", "No-op services, in memory", run_noop),
        Scenario("journal", "No-op services, journal", run_journal),
        Scenario("tracing", "No-op services, JSON tracing", run_tracing),
        Scenario("metrics", "No-op services, Prometheus metrics on vs off", run_metrics),
        Scenario("production", "Production profile: journal, JSON tracing at INFO, metrics on", run_production),
        Scenario("io", "I/O-bound, 5 ms sleep, 16 workers", run_io),
        Scenario("cpu", "CPU-bound, 5 ms pure Python, 2 workers", run_cpu),
        Scenario("async_io", "I/O-bound async stage, 20 ms await, 1000 in flight", run_async_io),
        Scenario("memory", "Memory: peak RSS, bytes per retained task", run_memory),
        Scenario("peers", "Peers (Celery+Redis, Dask, Ray tasks), no-op job", run_peers),
        Scenario("peers-io", "Peers (Celery+Redis, Dask, Ray tasks), I/O job", run_peers_io),
    )
}


@contextlib.contextmanager
def workdir() -> Iterator[str]:
    """A temporary directory for one run's files."""
    with tempfile.TemporaryDirectory(prefix="actorflow-bench-") as path:
        yield path
