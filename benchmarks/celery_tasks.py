"""The Celery app of the peer benchmark: the three stages as tasks, on the Redis named by the environment.

Imported by the benchmark (to send chains) and by the Celery worker it starts
(``celery -A benchmarks.celery_tasks worker``), both with
``ACTORFLOW_BENCH_REDIS`` set to the Redis URL of the run.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from benchmarks import peer_work

REDIS_URL = os.environ.get("ACTORFLOW_BENCH_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("actorflow_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.validate")
def validate(payload: dict[str, Any]) -> dict[str, Any]:
    """The first stage."""
    return peer_work.peer_validate(payload)


@app.task(name="bench.process")
def process(payload: dict[str, Any]) -> dict[str, Any]:
    """The middle stage, tiny."""
    return peer_work.peer_process(payload)


@app.task(name="bench.process_sleep")
def process_sleep(payload: dict[str, Any]) -> dict[str, Any]:
    """The middle stage of the I/O job: sleeps 5 ms."""
    return peer_work.peer_process_sleep(payload)


@app.task(name="bench.persist")
def persist(result: dict[str, Any]) -> None:
    """The last stage."""
    peer_work.peer_persist(result)
