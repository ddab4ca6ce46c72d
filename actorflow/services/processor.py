"""The default processor: a deterministic digest of the payload."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from actorflow.core.types import Task

__all__ = ["canonical_json", "process"]

_MAX_SLEEP_MS = 60_000


def canonical_json(value: Any) -> bytes:
    """The payload as canonical JSON bytes: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def process(task: Task) -> Mapping[str, Any]:
    """Return the sha256 of the payload's canonical JSON, its size and its name.

    A numeric ``data["sleep_ms"]`` (0 to 60000) makes the call sleep that long,
    to stand in for I/O in demos and benchmarks.
    """
    data = task.payload.get("data")
    if isinstance(data, Mapping):
        sleep_ms = data.get("sleep_ms")
        if isinstance(sleep_ms, (int, float)) and not isinstance(sleep_ms, bool) and sleep_ms > 0:
            time.sleep(min(float(sleep_ms), _MAX_SLEEP_MS) / 1000)
    body = canonical_json(task.payload)
    return {
        "name": task.payload.get("name"),
        "sha256": hashlib.sha256(body).hexdigest(),
        "bytes": len(body),
    }
