"""The run's results as Markdown: the machine, one table of systems, memory, and the targets."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["render"]


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _pair(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "-"
    return f"{_ms(figures.get('p50'))} / {_ms(figures.get('p99'))}"


def _versus(name: str, system: dict[str, Any], ratios: dict[str, Any]) -> str:
    parts = []
    for pair, ratio in ratios.items():
        numerator, _, denominator = pair.partition(" / ")
        if numerator == name and ratio.get("median") is not None:
            parts.append(f"{ratio['median']:.2f}x {denominator}")
    if "efficiency" in system:
        parts.append(f"{system['efficiency']['median']:.0%} of ideal")
    if "vs_one_core" in system:
        parts.append(f"{system['vs_one_core']:.2f}x one core")
    return ", ".join(parts) or "-"


def _machine(results: dict[str, Any]) -> list[str]:
    m, code = results["machine"], results.get("code", {})
    load = m.get("load_average_at_start")
    return [
        f"Machine: {m['cpu_model']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{_num(m.get('memory_mb'))} MB, {m['platform']}, Python {m['python']}, "
        f"pykka {m['libraries'].get('pykka')}, structlog {m['libraries'].get('structlog')}; "
        f"load average at start {load}; {m['date']}.",
        f"Code: {code.get('branch')} @ {(code.get('commit') or '')[:10]} ({code.get('subject')}). "
        f"Mode: {results['mode']}, {results['rounds']} alternating rounds per scenario.",
    ]


def _throughput_table(scenarios: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | system | tasks/s (median) | same-round ratios (median) | CPU µs / switches per task "
        "| light p50 / p99 ms | saturated p50 / p99 ms |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for key, section in scenarios.items():
        if key == "memory" or section.get("status") != "ok":
            continue
        for name, system in section["systems"].items():
            lines.append(
                f"| {key} | {name} | {_num(system['throughput_tps']['median'])} "
                f"| {_versus(name, system, section['ratios'])} | {_num(system['cpu_us_per_task']['median'])} / "
                f"{_num(system['switches_per_task']['median'], 1)} "
                f"| {_pair(system.get('latency_light_ms'))} | {_pair(system.get('latency_saturated_ms'))} |"
            )
    return lines


def _memory_table(section: dict[str, Any]) -> list[str]:
    lines = [
        "| system | tasks | retained | bytes / retained task | RSS before → after (MB) | peak RSS (MB) | tasks/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in section["systems"].items():
        lines.append(
            f"| {name} | {_num(s['tasks'])} | {_num(s['retained_tasks'])} | {_num(s.get('bytes_per_task'))} "
            f"| {_num(s['rss_before_mb'], 1)} → {_num(s['rss_after_mb'], 1)} | {_num(s['peak_rss_mb'], 1)} "
            f"| {_num(s['throughput_tps'])} |"
        )
    return lines


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "**not met**"


def _targets_table(verdicts: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | bound | measured | verdict | note |", "| --- | ---: | ---: | --- | --- |"]
    for v in verdicts:
        measured = v["measured"]
        shown = "-" if measured is None else f"{measured:g} {v['unit']}"
        lines.append(f"| {v['what']} | {v['target']} | {shown} | {_verdict(v['met'])} | {v['note']} |")
    return lines


def render(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    scenarios = results["scenarios"]
    out = ["# actorflow benchmarks", "", *_machine(results), "", *_throughput_table(scenarios), ""]
    memory = scenarios.get("memory")
    if memory is not None and memory.get("status") == "ok":
        out += ["Memory (each system in its own subprocess):", "", *_memory_table(memory), ""]
        journal = memory["systems"].get("runtime-journal-retain")
        if journal and journal.get("rss_timeline_mb"):
            steps = ", ".join(f"{at:g}s {mb:g}" for at, mb in journal["rss_timeline_mb"])
            out += [f"RSS (MB) during the {journal['tasks']:,}-task journal run: {steps}.", ""]
    out += ["Targets:", "", *_targets_table(results["targets"]), ""]
    notes = [f"- {key}: {note}" for key, section in scenarios.items() for note in section.get("notes", []) if note]
    if notes:
        out += ["Notes:", "", *notes, ""]
    return "\n".join(out)
