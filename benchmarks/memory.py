"""Memory: peak RSS and bytes per retained task, each system measured in a fresh subprocess.

A subprocess per system keeps one measurement from inheriting another's heap.
The child (``python -m benchmarks.memory SPEC_JSON``) builds the system, warms
it up, notes its RSS, runs the tasks closed-loop without keeping anything per
task itself, collects garbage, and notes its RSS again and its peak (VmHWM).
Bytes per retained task = (RSS after - RSS before) / tasks retained.

RSS comes from /proc/self/status (VmRSS, VmHWM); where there is no /proc,
psutil if installed, else `resource.getrusage` (peak only).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.mode import Mode

__all__ = ["current_rss", "peak_rss", "probe", "run_memory_scenario"]

_MB = 1024 * 1024
_ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss() -> int:
    """The process's peak resident set size in bytes."""
    value = _status_kb("VmHWM")
    if value is not None:
        return value
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    """The process's resident set size now, in bytes (its peak, if nothing better is available)."""
    value = _status_kb("VmRSS")
    if value is not None:
        return value
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415 - optional dependency
    except ImportError:
        return peak_rss()
    return int(psutil.Process().memory_info().rss)


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one system as `spec` says and return its memory figures (in the child process)."""
    from benchmarks import workload  # noqa: PLC0415 - imported after the first RSS reading
    from benchmarks.baselines import baseline_factory  # noqa: PLC0415
    from benchmarks.load import Sizes, saturate  # noqa: PLC0415
    from benchmarks.pipeline import Work, runtime_factory  # noqa: PLC0415

    rss_empty = current_rss()
    work = Work(workload.noop_validate, workload.noop_process, workload.noop_persist)
    system, tasks = spec["system"], int(spec["tasks"])
    if system.startswith("runtime"):
        config = {key: spec[key] for key in ("journal_path", "durability", "retain_terminal") if key in spec}
        factory = runtime_factory(work, name=system, **config)
    else:
        factory = baseline_factory(system, work, record=False)
    sizes = Sizes(
        tasks=tasks,
        warmup=int(spec.get("warmup", 1000)),
        submitters=int(spec.get("submitters", 2)),
        timeout_s=float(spec.get("timeout_s", 7200)),
    )
    pipeline = factory(sizes.concurrency)
    try:
        saturate(pipeline, workload.payload, count=sizes.warmup, sizes=sizes, record=False)
        gc.collect()
        rss_before = current_rss()
        with _RssSampler(float(spec.get("sample_s", 1.0))) as sampler:
            run = saturate(pipeline, workload.payload, count=tasks, sizes=sizes, record=False)
        gc.collect()
        rss_after = current_rss()
        peak = peak_rss()
        retained = tasks + sizes.warmup
        if spec.get("retain_terminal") is not None:
            retained = min(retained, int(spec["retain_terminal"]))
    finally:
        pipeline.close()
    grown = rss_after - rss_before
    return {
        "tasks": tasks,
        "retained_tasks": retained,
        "throughput_tps": round(run.throughput, 1),
        "elapsed_s": round(run.elapsed_s, 2),
        "rss_empty_mb": round(rss_empty / _MB, 1),
        "rss_before_mb": round(rss_before / _MB, 1),
        "rss_after_mb": round(rss_after / _MB, 1),
        "peak_rss_mb": round(peak / _MB, 1),
        "bytes_per_task": round(grown / tasks) if spec.get("retain_terminal") is None else None,
        "rss_growth_mb": round(grown / _MB, 1),
        "rss_timeline_mb": sampler.timeline(points=24),
    }


class _RssSampler:
    """Samples the RSS every `every_s` seconds on a daemon thread, to show whether memory stays bounded."""

    def __init__(self, every_s: float) -> None:
        self._every = every_s
        self._stop = threading.Event()
        self._samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> _RssSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._samples.append((time.perf_counter() - self._started, current_rss()))
            if self._stop.wait(self._every):
                return

    def timeline(self, points: int) -> list[list[float]]:
        """At most `points` evenly spaced samples, as [seconds, MB] pairs."""
        step = max(1, len(self._samples) // points)
        chosen = self._samples[::step]
        if self._samples and chosen[-1] is not self._samples[-1]:
            chosen.append(self._samples[-1])
        return [[round(at, 1), round(rss / _MB, 1)] for at, rss in chosen]


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=float(spec.get("timeout_s", 7200)) + 120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory probe {spec['system']} exited with {completed.returncode}: {completed.stderr.strip()[-2000:]}"
        )
    figures: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    return figures


def run_memory_scenario(mode: Mode, journal_missing: str | None) -> dict[str, Any]:
    """Each system in its own subprocess, once: memory figures barely move between runs."""
    tasks = mode.pick(100_000, 2_000)
    warmup = mode.pick(1000, 200, 20)
    specs: list[dict[str, Any]] = [
        {"system": system, "tasks": tasks, "warmup": warmup} for system in ("runtime", "bare-pykka", "threadpool")
    ]
    notes = [
        "one subprocess per system, run once; bytes_per_task = (RSS after - RSS before the tasks) / tasks, "
        "after gc.collect(), every terminal task retained",
    ]
    big = mode.pick(1_000_000, 5_000)
    if journal_missing is None:
        specs.append(
            {
                "system": "runtime-journal-retain",
                "tasks": big,
                "warmup": warmup,
                "journal_path": os.path.join(mode.workdir, "memory-journal.sqlite"),
                "durability": "normal",
                "retain_terminal": 10_000,
                "submitters": 8,
                "sample_s": mode.pick(10, 1, 1),
            }
        )
    else:
        notes.append(f"{journal_missing}: the {big:,}-task journal run with retain_terminal=10000 is skipped")
    systems = {spec["system"]: {"role": _role(spec["system"]), **_run_child(spec)} for spec in specs}
    runtime, bare = systems["runtime"], systems["bare-pykka"]
    return {
        "title": "Memory: peak RSS and bytes per retained terminal task",
        "status": "ok",
        "notes": notes,
        "params": {
            "tasks": tasks,
            "journal_tasks": big,
            "retain_terminal": 10_000,
            "concurrency": 256,
            "submitters": 2,
            "journal_submitters": 8,
        },
        "systems": systems,
        "ratios": {"runtime / bare-pykka (bytes per task)": _safe_ratio(runtime, bare)},
    }


def _role(system: str) -> str:
    return "runtime" if system.startswith("runtime") else "baseline"


def _safe_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    x, y = a.get("bytes_per_task"), b.get("bytes_per_task")
    value = round(x / y, 2) if x and y and y > 0 else None
    return {"median": value, "rounds": [value]}


def main(argv: list[str]) -> int:
    """The child's entry point: one JSON spec in, one JSON line of figures out."""
    figures = probe(json.loads(argv[0]))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
