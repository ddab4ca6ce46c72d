"""A child process for the kill -9 test: runs a journaled runtime and prints each acknowledged task id.

Usage: python -m tests.journal_child JOURNAL RESULTS START COUNT [BATCH]

With BATCH, tasks are submitted BATCH at a time with `submit_many`, and each acknowledged
batch is printed as one line: ``acked-batch ID ID ...``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

from actorflow.actors import Runtime
from actorflow.core import RuntimeConfig, Task
from actorflow.services import ServiceSet


def process(task: Task) -> Mapping[str, Any]:
    # A little work of random length (up to about a millisecond), so that kills land in every stage.
    sum(range(random.randrange(20_000)))
    return {"index": task.payload["data"]["index"]}


def main(argv: list[str]) -> int:
    journal, results, start, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    batch = int(argv[4]) if len(argv) > 4 else 0
    config = RuntimeConfig(journal_path=journal, result_store=results, processor_workers=4)
    with Runtime(config, services=ServiceSet(process=process)) as runtime:
        print("ready", flush=True)
        if batch:
            for first in range(start, start + count, batch):
                indexes = range(first, min(first + batch, start + count))
                handles = runtime.submit_many(
                    [{"name": f"k-{index}", "data": {"index": index}} for index in indexes],
                    task_ids=[f"k-{index}" for index in indexes],
                )  # returned: the whole batch is committed
                print("acked-batch " + " ".join(handle.task_id for handle in handles), flush=True)
        else:
            for index in range(start, start + count):
                handle = runtime.submit({"name": f"k-{index}", "data": {"index": index}}, task_id=f"k-{index}")
                print(f"acked {handle.task_id}", flush=True)  # submit() returned: the creation is committed
        runtime.join()
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
