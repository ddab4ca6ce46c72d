"""The runtime's own metrics: plain counters and fixed-bucket histograms, cheap to update.

Each histogram is updated by one thread only (the actor that owns the hot path
where its values arise), so an update is a list increment and a float add, with
no lock. A reader on another thread (a Prometheus scrape) copies the bucket
list, which CPython does atomically; the count is taken from the copied
buckets, so a histogram's count always equals its last bucket.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

__all__ = ["LATENCY_BUCKETS_S", "Histogram", "HistogramSnapshot"]

LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the buckets: from 100 µs (no-op services) to a minute."""

HistogramSnapshot = tuple[tuple[float, ...], list[int], float]
"""(upper bounds, per-bucket counts with the +Inf bucket last, sum): a consistent copy."""


class Histogram:
    """Observations counted in fixed buckets, with their sum. Update from one thread only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose bound is >= it (Prometheus' ``le``)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        """A copy safe to read while the owner keeps observing."""
        return self.bounds, list(self.counts), self.total

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)
