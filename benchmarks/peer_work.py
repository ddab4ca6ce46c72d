"""The benchmark's three stages as the peers run them: plain functions of plain values.

actorflow's stages take a `Task`; a Celery chain, a Dask graph or a chain of Ray
tasks hands each stage the previous one's return value instead. These are the
same tiny functions as `benchmarks.workload`'s, in that shape, at module level
so that every peer can import or pickle them by reference.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.workload import SLEEP_S

__all__ = ["peer_persist", "peer_process", "peer_process_sleep", "peer_validate"]

_RESULT = {"ok": True}


def peer_validate(payload: dict[str, Any]) -> dict[str, Any]:
    """Accept everything; hand the payload on."""
    return payload


def peer_process(payload: dict[str, Any]) -> dict[str, Any]:
    """Return a constant result."""
    return _RESULT


def peer_process_sleep(payload: dict[str, Any]) -> dict[str, Any]:
    """Stand in for I/O: sleep `SLEEP_S`, as the I/O job's processor does."""
    time.sleep(SLEEP_S)
    return _RESULT


def peer_persist(result: dict[str, Any]) -> None:
    """Store nothing."""
