"""Figures: one measured phase of one run, percentiles, and the median over runs."""

from __future__ import annotations

import math
import statistics
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class Phase:
    """One measured phase of one run: its metrics and the CPU each side spent in it.

    ``name`` identifies the phase across runs. A ceiling phase carries the name of the jobfeed
    phase it bounds and a ``ceiling`` label saying what it is (``"sqlite3 alone"``); each of its
    metrics gives the same jobfeed metric a ratio.
    """

    name: str
    metrics: dict[str, float]
    server_cpu_s: float | None = None
    generator_cpu_s: float | None = None
    notes: list[str] = field(default_factory=list)
    ceiling: str | None = None


def samples(chunks: Iterable[bytes]) -> list[int]:
    """Latency samples (ns) from the workers' ``array('q')`` bytes, sorted."""
    merged = array("q")
    for chunk in chunks:
        merged.frombytes(chunk)
    return sorted(merged)


def percentile(ordered: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted ``ordered``; NaN when empty."""
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def latency_ms(ordered: Sequence[int], prefix: str, quantiles: Sequence[float]) -> dict[str, float]:
    """``{"<prefix> p50 ms": ..., "<prefix> max ms": ...}`` from sorted ns samples."""
    out = {}
    for q in quantiles:
        label = "max" if q == 100 else f"p{q:g}"
        out[f"{prefix} {label} ms"] = percentile(ordered, q) / 1e6
    return out


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))
