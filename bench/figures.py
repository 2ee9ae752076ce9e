"""What bench/run.py's goals report: table rows, percentiles, progress lines."""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class Row:
    """One line of the final table: a figure, what it is compared with, and the target."""
    goal: str
    measure: str
    figure: str
    baseline: str = "-"
    ratio: float | None = None
    target: str = "-"
    met: bool | None = None


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: a value that was measured, never one interpolated between two."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))]


def say(message: str) -> None:
    print(message, flush=True)
