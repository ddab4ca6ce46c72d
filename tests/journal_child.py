"""A child process for the kill -9 test: runs a journaled runtime and prints each acknowledged task id.

Usage: python -m tests.journal_child JOURNAL RESULTS START COUNT [BATCH]

With BATCH, tasks are submitted BATCH at a time with `submit_many`, and each acknowledged
batch is printed as one line: ``acked-batch ID ID ...``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
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
    config = RuntimeConfig(journal_path=journal, result_store=results)
    with Runtime(config, services=ServiceSet(process=process, workers={"processor": 4})) as runtime:
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


def run_then_kill(
    args: list[object], *, prefix: str, kill_after: int, module: str = "tests.journal_child"
) -> list[list[str]]:
    """Run a child (this one: JOURNAL RESULTS START COUNT [BATCH]) with `args`; SIGKILL it after `kill_after` acks.

    An ack is an output line starting with `prefix` (``"acked "`` or ``"acked-batch "``); returns the
    words after the prefix of each ack read before the kill. The kill is checked to have landed.
    `module` names another child that prints ``ready`` and then its acks the same way.
    """
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        stdin=subprocess.PIPE,  # never written: a child that waits on it to be killed waits for good
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=root,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    assert child.stderr is not None
    acks: list[list[str]] = []
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        for line in child.stdout:
            if line.startswith(prefix):
                acks.append(line.split()[1:])
                if len(acks) == kill_after:
                    break
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
        child.stdin.close()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return acks


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
