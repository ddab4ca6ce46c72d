"""actorflow's benchmark suite: the runtime measured against what a user would write instead.

    python -m benchmarks            # the full run: prints a Markdown table, writes results/last-run.json
    python -m benchmarks --publish  # the same, written to results/published.json (tracked; the README's figures)
    python -m benchmarks --quick    # small sizes, well under a minute (what CI runs)
    python -m benchmarks --only io  # one scenario

Every scenario runs the runtime and its baselines in the same process run,
alternating rounds (A, B, C, A, B, C, ...), and reports medians and ratios,
because a 2-core machine is noisy and only same-run ratios compare fairly.
The suite asserts no speed anywhere: figures are reported, never enforced.

Modules, one concept each:

* `workload` - the service functions every system runs, and the payloads;
* `pipeline` - the interface every system under test offers, and the Runtime adapter;
* `baselines` - ThreadPoolExecutor, naive (ask-blocking) pykka, bare tells-only pykka;
* `load` - how one system is driven: light load, saturating load, latency;
* `scenarios` - the scenarios, each alternating the runtime with its baselines;
* `memory` - peak RSS and bytes per retained task, measured in a subprocess;
* `targets` - the performance targets, judged against the measured figures;
* `machine`, `stats`, `report` - the machine, the arithmetic, the Markdown.
"""

__all__: list[str] = []
