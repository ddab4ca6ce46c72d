"""The performance targets, judged against a run's figures: met, not met, or not measured."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TARGETS", "Target", "judge"]


@dataclass(frozen=True, slots=True)
class Target:
    """One target: where its figure lives in the results, and the bound it must keep."""

    key: str
    what: str
    scenario: str
    path: tuple[str, ...]
    """Keys from the scenario's section down to the figure."""
    compare: str
    """">=", "<=" or "<"."""
    bound: float
    unit: str


_COMPARE: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "<": operator.lt}

TARGETS: tuple[Target, ...] = (
    Target(
        "noop_vs_celery",
        "no-op in memory: throughput vs celery on the same job",
        "peers",
        ("ratios", "runtime / celery", "median"),
        ">=",
        10.0,
        "x",
    ),
    Target(
        "io_vs_celery",
        "I/O job in memory: throughput vs celery on the same job",
        "peers-io",
        ("ratios", "runtime / celery", "median"),
        ">=",
        1.0,
        "x",
    ),
    Target(
        "noop_vs_dask",
        "no-op in memory: throughput vs dask on the same job",
        "peers",
        ("ratios", "runtime / dask", "median"),
        ">=",
        10.0,
        "x",
    ),
    Target(
        "io_vs_dask",
        "I/O job in memory: throughput vs dask on the same job",
        "peers-io",
        ("ratios", "runtime / dask", "median"),
        ">=",
        1.0,
        "x",
    ),
    Target(
        "noop_vs_ray_tasks",
        "no-op in memory: throughput vs ray-tasks on the same job",
        "peers",
        ("ratios", "runtime / ray-tasks", "median"),
        ">=",
        10.0,
        "x",
    ),
    Target(
        "io_vs_ray_tasks",
        "I/O job in memory: throughput vs ray-tasks on the same job",
        "peers-io",
        ("ratios", "runtime / ray-tasks", "median"),
        ">=",
        1.0,
        "x",
    ),
    Target(
        "noop_vs_floor",
        "no-op in memory: throughput vs the bare tells-only pipeline",
        "noop",
        ("ratios", "runtime / bare-pykka", "median"),
        ">=",
        1.0,
        "x",
    ),
    Target(
        "light_p50",
        "light load: p50 from submit() to terminal",
        "noop",
        ("systems", "runtime", "latency_light_ms", "p50"),
        "<=",
        0.5,
        "ms",
    ),
    Target(
        "light_p99",
        "light load: p99 from submit() to terminal",
        "noop",
        ("systems", "runtime", "latency_light_ms", "p99"),
        "<=",
        2.0,
        "ms",
    ),
    Target(
        "io_efficiency",
        "I/O-bound: throughput vs the ideal 16 workers / 5 ms",
        "io",
        ("systems", "runtime", "efficiency", "median"),
        ">=",
        0.9,
        "x",
    ),
    Target(
        "cpu_process_vs_thread",
        "CPU-bound: process backend vs thread backend, 2 workers each",
        "cpu",
        ("ratios", "runtime-process / runtime-thread", "median"),
        ">=",
        1.8,
        "x",
    ),
    Target(
        "journal_normal_vs_memory",
        'journal durability="normal": throughput vs in memory',
        "journal",
        ("ratios", "runtime-journal-normal / runtime-memory", "median"),
        ">=",
        0.7,
        "x",
    ),
    Target(
        "tracing_vs_off",
        "JSON tracing on: throughput vs tracing off",
        "tracing",
        ("ratios", "runtime-tracing-json / runtime-tracing-off", "median"),
        ">=",
        0.7,
        "x",
    ),
    Target(
        "metrics_cost",
        "Prometheus metrics on: throughput vs metrics off (under 5% cost)",
        "metrics",
        ("ratios", "runtime-metrics-on / runtime-metrics-off", "median"),
        ">=",
        0.95,
        "x",
    ),
    Target(
        "bytes_per_task",
        "memory: bytes per retained terminal task (100k tasks)",
        "memory",
        ("systems", "runtime", "bytes_per_task"),
        "<=",
        2048,
        "B",
    ),
    Target(
        "peak_rss_1m_journal",
        "memory: peak RSS, 1M tasks with journal and retain_terminal=10000",
        "memory",
        ("systems", "runtime-journal-retain", "peak_rss_mb"),
        "<",
        300,
        "MB",
    ),
)


def _dig(section: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = section
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def judge(scenarios: dict[str, dict[str, Any]], *, quick: bool) -> list[dict[str, Any]]:
    """Each target with its measured figure and verdict (`met` is None when not measured)."""
    verdicts = []
    for target in TARGETS:
        section = scenarios.get(target.scenario)
        measured = _dig(section, target.path) if section is not None else None
        if section is None:
            note = "scenario not run"
        elif section.get("status") != "ok":
            note = "; ".join(section.get("notes", [])) or section.get("status", "")
        elif measured is None:
            note = "not measured in this build (see the scenario's notes)"
        else:
            note = "quick run: sizes too small to judge" if quick else ""
        met = None if measured is None else _COMPARE[target.compare](float(measured), target.bound)
        verdicts.append(
            {
                "key": target.key,
                "what": target.what,
                "target": f"{target.compare} {target.bound:g} {target.unit}",
                "measured": measured,
                "unit": target.unit,
                "met": met,
                "note": note,
            }
        )
    return verdicts
