"""Two versions of actorflow on the same load, alternating in one run: ``python -m benchmarks.versions``.

A speed claim about a change ("the redesign costs nothing", "a no-op task costs less CPU than in the
first release") compares code, not machines, so both versions run here, now, in turns: each round
runs every version once, in an order that alternates, each in a fresh interpreter whose import path
holds only that version's tree (``git archive`` of a commit, or this checkout). A version is a git
commit, or ``.`` for the working tree::

    python -m benchmarks.versions --against cd71e48                 # this checkout against a commit
    python -m benchmarks.versions --versions 1717439 . --rounds 6   # any list of versions

Loads (each through the seed's three stages with no-op functions, one submitting thread):

    noop      in memory: submit every task, then wait for all (throughput, CPU per task)
    journal   with the SQLite journal ("normal"): each submit() returns once its creation is committed

Prints, per load, each version's median tasks/s and CPU µs per task, and each version's ratio to the
first one. Works with the first release's code too (its packages were top-level `actors`, `core`,
`services`). Asserts no speed; exits non-zero only if a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent

_LOADS = {"noop": 20_000, "journal": 2_000}
"""Tasks per run of each load (`--quick` divides by 4)."""

_WORKLOAD = r"""
import json, os, resource, sys, tempfile, time
if sys.argv[3] == "actorflow":
    from actorflow import Runtime, RuntimeConfig, ServiceSet
else:  # the first release: top-level packages (never `import actorflow`: an editable install would answer)
    from actors import Runtime
    from core import RuntimeConfig
    from services import ServiceSet

load, count = sys.argv[1], int(sys.argv[2])


def validate(payload):
    return None


def process(task):
    return {}


def persist(task, result):
    return None


services = ServiceSet(validate=validate, process=process, persist=persist)
folder = tempfile.mkdtemp()
config = RuntimeConfig(journal_path=os.path.join(folder, "j.db")) if load == "journal" else RuntimeConfig()
payloads = [{"name": f"t-{i}", "data": {"i": i}} for i in range(count)]
with Runtime(config, services=services) as runtime:
    for payload in payloads[:200]:  # warm up: threads started, caches filled
        runtime.submit(payload)
    runtime.join(60)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for payload in payloads:
        runtime.submit(payload)
    assert runtime.join(600)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(json.dumps({"tasks_per_s": count / elapsed, "cpu_us_per_task": cpu / count * 1e6}))
"""


@dataclass
class _Version:
    label: str
    tree: Path
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def _tree_of(version: str, into: Path) -> Path:
    """The source tree of `version`: this checkout for ".", else the commit exported with git archive."""
    if version == ".":
        return _ROOT
    target = into / version
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(_ROOT), "archive", version], capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as file:
        file.write(archive)
        file.seek(0)
        with tarfile.open(fileobj=file) as tar:
            tar.extractall(target, filter="data")
    return target


def _run(version: _Version, load: str, count: int) -> dict[str, float]:
    layout = "actorflow" if (version.tree / "actorflow" / "__init__.py").exists() else "toplevel"
    env = {**os.environ, "PYTHONPATH": str(version.tree), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _WORKLOAD, load, str(count), layout],
        capture_output=True,
        text=True,
        env=env,
        cwd=version.tree,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{version.label} failed on {load}:\n{done.stderr[-4000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def compare(versions: list[str], *, rounds: int, divide_by: int = 1) -> dict[str, Any]:
    """Run every load for every version, alternating, `rounds` times; return the medians and ratios."""
    with tempfile.TemporaryDirectory() as folder:
        made = [_Version(label, _tree_of(label, Path(folder))) for label in versions]
        for index in range(rounds):
            order = made if index % 2 == 0 else list(reversed(made))
            for load, count in _LOADS.items():
                for version in order:
                    figures = _run(version, load, max(50, count // divide_by))
                    version.runs.setdefault(load, []).append(figures)
                    print(
                        f"round {index + 1} {load:8} {version.label:10} {figures['tasks_per_s']:9,.0f} tasks/s "
                        f"{figures['cpu_us_per_task']:7.1f} µs CPU/task",
                        file=sys.stderr,
                    )
    report: dict[str, Any] = {}
    first = made[0]
    for load in _LOADS:
        section: dict[str, Any] = {}
        for version in made:
            throughput = statistics.median(run["tasks_per_s"] for run in version.runs[load])
            cpu = statistics.median(run["cpu_us_per_task"] for run in version.runs[load])
            section[version.label] = {"tasks_per_s": throughput, "cpu_us_per_task": cpu}
        base = section[first.label]
        for version in made:
            figures = section[version.label]
            figures["throughput_ratio"] = figures["tasks_per_s"] / base["tasks_per_s"]
            figures["cpu_ratio"] = figures["cpu_us_per_task"] / base["cpu_us_per_task"]
        report[load] = section
    return report


def main(argv: list[str] | None = None) -> int:
    """Compare the versions and print a Markdown table (and the JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versions", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--against", metavar="COMMIT", help="compare that commit (first) with this checkout")
    which.add_argument("--versions", nargs="+", metavar="VERSION", help="commits, or '.' for this checkout")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the tasks per run")
    parser.add_argument("--smoke", action="store_true", help="a few tasks per run: checks the comparison runs (tests)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    versions = [args.against, "."] if args.against else args.versions
    report = compare(versions, rounds=args.rounds, divide_by=100 if args.smoke else 4 if args.quick else 1)
    print(f"| load | version | tasks/s | CPU µs/task | throughput vs {versions[0]} | CPU vs {versions[0]} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for load, section in report.items():
        for label, figures in section.items():
            print(
                f"| {load} | {label} | {figures['tasks_per_s']:,.0f} | {figures['cpu_us_per_task']:.1f} "
                f"| {figures['throughput_ratio']:.2f}x | {figures['cpu_ratio']:.2f}x |"
            )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
