"""The sizes of a whole benchmark run, which every scenario reads."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Mode"]


@dataclass(frozen=True, slots=True)
class Mode:
    """Sizes for a whole run: "full", "quick" (CI, well under a minute) or "smoke" (the test suite)."""

    size: str
    rounds: int
    workdir: str
    """Where journals, logs and other files of the run go (a temporary directory)."""

    @property
    def quick(self) -> bool:
        """True for the reduced sizes (quick and smoke)."""
        return self.size != "full"

    def pick(self, full: int, quick: int, smoke: int | None = None) -> int:
        """The figure for this run's size; smoke defaults to a tenth of quick."""
        if self.size == "full":
            return full
        if self.size == "quick":
            return quick
        return smoke if smoke is not None else max(1, quick // 10)
