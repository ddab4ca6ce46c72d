"""A steady no-op load to profile: ``python -m benchmarks.hotpath [--system S] [--tasks N]``.

Runs one system (the runtime by default) at saturating load with no-op
services in memory, the same load as the "noop" scenario, for a profiler
to watch. For example::

    py-spy record --gil --rate 250 -o hot.svg -- python -m benchmarks.hotpath --tasks 20000
    py-spy record --gil -f speedscope -o hot.speedscope.json -- python -m benchmarks.hotpath
    python -m pyinstrument -m benchmarks.hotpath --tasks 5000   # the main thread only: less useful here

`--gil` matters: the runtime's threads mostly wait for the GIL, and only the
samples of the thread holding it show where the time goes.
"""

from __future__ import annotations

import argparse
import sys

from actorflow.core.tracing import configure_logging
from benchmarks import workload
from benchmarks.baselines import baseline_factory
from benchmarks.load import Sizes, saturate
from benchmarks.pipeline import Work, runtime_factory

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the load and print its throughput and CPU per task."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="runtime", choices=["runtime", "bare-pykka", "naive-pykka", "threadpool"])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--submitters", type=int, default=2)
    parser.add_argument("--journal", default=None, help="journal path (runtime only)")
    parser.add_argument("--trace-file", default=None, help="JSON tracing at DEBUG to this file, as in the scenario")
    args = parser.parse_args(argv)
    close_log = configure_logging(json=True, level="DEBUG", file=args.trace_file) if args.trace_file else None
    work = Work(workload.noop_validate, workload.noop_process, workload.noop_persist)
    if args.system == "runtime":
        config = {"journal_path": args.journal} if args.journal else {}
        factory = runtime_factory(work, **config)
    else:
        factory = baseline_factory(args.system, work)
    sizes = Sizes(tasks=args.tasks, concurrency=args.concurrency, submitters=args.submitters)
    pipeline = factory(sizes.concurrency)
    try:
        saturate(pipeline, workload.payload, count=200, sizes=sizes, record=False)
        run = saturate(pipeline, workload.payload, count=args.tasks, sizes=sizes, record=False)
    finally:
        pipeline.close()
        if close_log is not None:
            close_log()
    print(
        f"{args.system}: {run.tasks} tasks in {run.elapsed_s:.2f}s = {run.throughput:,.0f} tasks/s, "
        f"{run.cpu_us_per_task:,.0f} µs CPU and {run.switches_per_task:.1f} context switches per task",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
