"""The arithmetic: medians, percentiles, and rounding for JSON."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["median", "percentile", "percentiles", "rounded"]


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return statistics.median(values) if values else math.nan


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (NaN for none)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def percentiles(values: Sequence[float]) -> dict[str, float | int]:
    """p50, p90, p99, max and the sample count, in the values' unit."""
    ordered = sorted(values)
    return {
        "p50": rounded(percentile(ordered, 0.50)),
        "p90": rounded(percentile(ordered, 0.90)),
        "p99": rounded(percentile(ordered, 0.99)),
        "max": rounded(ordered[-1] if ordered else math.nan),
        "samples": len(ordered),
    }


def rounded(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits (JSON stays readable; NaN stays NaN)."""
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, max(0, digits - 1 - math.floor(math.log10(abs(value)))))
