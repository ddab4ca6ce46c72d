"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only SCENARIO ...]``.

Prints a Markdown report and writes every figure as JSON to
``benchmarks/results/last-run.json`` (git-ignored), or to ``--out``. Only a
complete full run given ``--publish`` writes the tracked
``benchmarks/results/published.json``, the figures the README quotes; an
ordinary run never changes a tracked file. Exits non-zero if a scenario
failed to run; never because of speed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import structlog

from benchmarks.machine import describe_code, describe_machine
from benchmarks.report import render
from benchmarks.scenarios import SCENARIOS, Mode, workdir
from benchmarks.targets import judge

_RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 1
"""Bumped when the JSON's shape changes."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes and 2 rounds: well under a minute (CI)")
    sizes.add_argument("--smoke", action="store_true", help="tiny sizes and 1 round: checks the suite runs (tests)")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per scenario (5; 2 with --quick)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default results/last-run.json)")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="write results/published.json, the tracked figures the README quotes (a complete full run only)",
    )
    args = parser.parse_args(argv)
    if args.publish and (args.quick or args.smoke or args.only or args.out):
        parser.error("--publish takes a complete full run: no --quick, --smoke, --only or --out")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def _finite(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the selected scenarios, print the report, write the JSON; 1 if a scenario broke."""
    args = _parse(argv)
    selected = args.only or list(SCENARIOS)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    out = args.out or _RESULTS / ("published.json" if args.publish else "last-run.json")
    rounds = args.rounds or {"full": 5, "quick": 2, "smoke": 1}[size]
    structlog.reset_defaults()  # tracing stays off unless a scenario turns it on
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "suite": "actorflow benchmarks",
        "mode": size,
        "rounds": rounds,
        "machine": describe_machine(),
        "code": describe_code(),
        "scenarios": {},
    }
    broken = False
    started = time.perf_counter()
    with workdir() as path:
        mode = Mode(size=size, rounds=rounds, workdir=path)
        for key in selected:
            scenario = SCENARIOS[key]
            print(f"[bench] {key}: {scenario.title} ...", file=sys.stderr, flush=True)
            began = time.perf_counter()
            try:
                section = scenario.run(mode)
            except Exception as exc:
                broken = True
                traceback.print_exc()
                section = {
                    "title": scenario.title,
                    "status": "error",
                    "notes": [repr(exc)],
                    "systems": {},
                    "ratios": {},
                }
            section["duration_s"] = round(time.perf_counter() - began, 1)
            results["scenarios"][key] = section
            print(f"[bench] {key}: {section['status']} in {section['duration_s']}s", file=sys.stderr, flush=True)
    results["duration_s"] = round(time.perf_counter() - started, 1)
    results["targets"] = judge(results["scenarios"], quick=size != "full")
    results = _finite(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    print(f"[bench] figures written to {out} ({results['duration_s']}s in all)", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
