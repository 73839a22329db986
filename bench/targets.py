"""The issue's targets, each checked against this run's medians: met, missed, or not measured.

A target compares one jobfeed figure either with a peer's or ceiling's figure from the same run
(a ratio) or with a fixed bound. Phases are found by how their names start or end, so that a
``--set`` or ``--quick`` size change still finds them (the verdict is then about that size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .stats import Phase, Spread

NamePredicate = Callable[[str], bool]


def starts(prefix: str) -> NamePredicate:
    return lambda name: name.startswith(prefix)


def both(prefix: str, suffix: str) -> NamePredicate:
    return lambda name: name.startswith(prefix) and name.endswith(suffix)


@dataclass(frozen=True)
class Target:
    """``ours / theirs >= ratio`` (rates) or ``ours <= bound`` / ``ours <= theirs * ratio``
    (times and sizes), ``theirs`` being the comparator's figure for the same metric."""

    workload: str
    wording: str
    phase: NamePredicate
    metric: str
    higher_is_better: bool
    ratio: float | None = None  # against the comparator
    comparator: str | None = None  # a ceiling label's prefix: "NATS JetStream", "raw aiohttp"
    comparator_phase: NamePredicate | None = None  # when it is another phase's figure
    bound: float | None = None  # a fixed limit instead of a comparator
    # The comparator is another of jobfeed's own phases from the same run (comparator_phase),
    # not a ceiling or a peer: e.g. W9's feed fan-out against W4's job-stream fan-out.
    against_measured: bool = False
    # ``ours <= theirs + margin`` instead of a ratio (a size at most that much over theirs).
    margin: float | None = None


TARGETS = (
    Target(
        "W1",
        "≥ 2x JetStream (sync always) events/s",
        both("W1 durable append:", "1 event/request, full"),
        "events/s",
        True,
        ratio=2.0,
        comparator="NATS JetStream",
    ),
    Target(
        "W2",
        "≥ 1x JetStream (default sync) events/s",
        starts("W2 append:"),
        "events/s",
        True,
        ratio=1.0,
        comparator="NATS JetStream",
    ),
    Target(
        "W3",
        "p99 ≤ Redis's p99 at 1,000 events/s",
        starts("W3 live latency:"),
        "latency p99 ms",
        False,
        ratio=1.0,
        comparator="Redis Streams",
    ),
    Target(
        "W3",
        "p99 < 20 ms at 1,000 events/s",
        starts("W3 live latency:"),
        "latency p99 ms",
        False,
        bound=20.0,
    ),
    Target(
        "W4",
        "≥ 0.9x raw aiohttp fan-out deliveries/s",
        starts("W4 fan-out"),
        "deliveries/s",
        True,
        ratio=0.9,
        comparator="raw aiohttp",
    ),
    Target(
        "W5",
        "WebSocket replay ≥ 0.8x raw aiohttp",
        both("W5 replay", ": 1 WS subscriber"),
        "events/s",
        True,
        ratio=0.8,
        comparator="raw aiohttp",
    ),
    Target(
        "W5",
        "SSE replay ≥ 1x JetStream's replay",
        both("W5 replay", ": 1 SSE subscriber"),
        "events/s",
        True,
        ratio=1.0,
        comparator="NATS JetStream",
        comparator_phase=both("W5 replay", ": 1 WS subscriber"),
    ),
    Target(
        "W5",
        "NDJSON export ≥ 1x JetStream's replay",
        both("W5 replay", ": NDJSON export"),
        "events/s",
        True,
        ratio=1.0,
        comparator="NATS JetStream",
        comparator_phase=both("W5 replay", ": 1 WS subscriber"),
    ),
    Target(
        "W6",
        "every subscriber exact",
        starts("W6 reconnect storm"),
        "subscribers with a wrong sequence",
        False,
        bound=0.0,
    ),
    Target(
        "W6",
        "all live within 2 s",
        starts("W6 reconnect storm"),
        "all live s",
        False,
        bound=2.0,
    ),
    Target(
        "W9",
        "feed fan-out ≥ 0.8x W4's job-stream fan-out",
        starts("W9 feed fan-out"),
        "deliveries/s",
        True,
        ratio=0.8,
        comparator="jobfeed W4",
        comparator_phase=starts("W4 fan-out"),
        against_measured=True,
    ),
    Target(
        "W9",
        "every feed subscriber exact",
        starts("W9 feed fan-out"),
        "subscribers with a wrong sequence",
        False,
        bound=0.0,
    ),
    Target(
        "W7",
        "≤ 20 KB RSS per idle subscriber",
        both("W7 ", ": connect"),
        "server RSS KB/connection",
        False,
        bound=20.0,
    ),
    Target(
        "W1auth",
        "≥ 0.9x W1 (authentication off) events/s",
        starts("W1auth durable append"),
        "events/s",
        True,
        ratio=0.9,
        comparator="W1, authentication off",
        comparator_phase=both("W1 durable append:", "1 event/request, full"),
        against_measured=True,
    ),
    Target(
        "W1metrics",
        "≥ 0.95x W1 (/metrics not scraped) events/s",
        starts("W1metrics durable append"),
        "events/s",
        True,
        ratio=0.95,
        comparator="W1, /metrics not scraped",
        comparator_phase=both("W1 durable append:", "1 event/request, full"),
        against_measured=True,
    ),
    Target(
        "W1backup",
        "ack p99 during a backup ≤ 1.5x without one (same database, same run)",
        starts("W1backup during backup"),
        "ack p99 ms",
        False,
        ratio=1.5,
        comparator="W1backup, no backup running",
        comparator_phase=starts("W1backup baseline"),
        against_measured=True,
    ),
    Target(
        "W1i",
        "≥ 1x Redis Streams (appendfsync always, pipelined) events/s",
        starts("W1i pipelined append:"),
        "events/s",
        True,
        ratio=1.0,
        comparator="Redis Streams",
    ),
    Target(
        "W1i",
        "ack p99 ≤ 2x Redis Streams'",
        starts("W1i pipelined append:"),
        "ack p99 ms",
        False,
        ratio=2.0,
        comparator="Redis Streams",
    ),
    Target(
        "W2i",
        "≥ 1x JetStream (default sync, async publish) events/s",
        starts("W2i pipelined append:"),
        "events/s",
        True,
        ratio=1.0,
        comparator="NATS JetStream",
    ),
    Target(
        "W7auth",
        "≤ 1 KB more RSS per idle subscriber than W7 (authentication off)",
        both("W7auth", ": connect"),
        "server RSS KB/connection",
        False,
        comparator="W7, authentication off",
        comparator_phase=both("W7 ", ": connect"),
        margin=1.0,
        against_measured=True,
    ),
    Target(
        "W3retention",
        "p99 ≤ 1.2x W3 without the purge (same run) while retention purges 1,000,000 events",
        starts("W3retention purge"),
        "latency p99 ms",
        False,
        ratio=1.2,
        comparator="W3retention baseline",
        comparator_phase=starts("W3retention baseline"),
        against_measured=True,
    ),
)


@dataclass(frozen=True)
class Verdict:
    target: Target
    ours: float | None
    theirs: float | None
    label: str  # what ours was held against
    met: bool | None  # None: not measured

    @property
    def ratio(self) -> float | None:
        """Ours as a multiple of theirs, oriented so that bigger is better for rates and
        smaller is better for times, as the target's wording reads."""
        if self.ours is None or self.theirs is None or self.theirs == 0:
            return None
        return self.ours / self.theirs


def _median(
    phases: Sequence[Phase], phase: NamePredicate, metric: str, ceiling: str | None = None
) -> tuple[float | None, str]:
    values, label = [], ""
    for candidate in phases:
        if not phase(candidate.name) or metric not in candidate.metrics:
            continue
        if ceiling is not None and not (candidate.ceiling or "").startswith(ceiling):
            continue
        value = candidate.metrics[metric]
        if not math.isnan(value):
            values.append(value)
            label = candidate.ceiling or ""
    return (Spread.of(values).median if values else None), label


def judge(measured: Sequence[Phase], compared: Sequence[Phase]) -> list[Verdict]:
    verdicts = []
    for target in TARGETS:
        ours, _ = _median(measured, target.phase, target.metric)
        if target.bound is not None:
            met = None if ours is None else ours <= target.bound
            verdicts.append(Verdict(target, ours, target.bound, "bound", met))
            continue
        assert target.comparator is not None
        if target.against_measured:
            assert target.comparator_phase is not None
            theirs, _ = _median(measured, target.comparator_phase, target.metric)
            label = target.comparator
        else:
            theirs, label = _median(
                compared,
                target.comparator_phase or target.phase,
                target.metric,
                target.comparator,
            )
        met = None
        if ours is not None and theirs is not None and target.margin is not None:
            met = ours <= theirs + target.margin
        elif ours is not None and theirs is not None:
            assert target.ratio is not None
            if target.higher_is_better:
                met = ours >= target.ratio * theirs
            else:
                met = ours <= target.ratio * theirs
        verdicts.append(Verdict(target, ours, theirs, label or target.comparator, met))
    return verdicts


def table(verdicts: Sequence[Verdict], fmt: Callable[[float, str], str]) -> str:
    lines = [
        "| workload | target | jobfeed | against | ratio | verdict |",
        "|---|---|--:|---|--:|---|",
    ]
    for v in verdicts:
        metric = v.target.metric
        ours = "—" if v.ours is None else fmt(v.ours, metric)
        theirs = "—" if v.theirs is None else fmt(v.theirs, metric)
        against = f"{theirs} ({v.label})" if v.label != "bound" else f"bound {theirs}"
        ratio = "" if v.ratio is None or v.label == "bound" else f"{v.ratio:.2f}x"
        verdict = {True: "met", False: "**missed**", None: "not measured"}[v.met]
        lines.append(
            f"| {v.target.workload} | {v.target.wording} ({metric}) | {ours} | {against} "
            f"| {ratio} | {verdict} |"
        )
    return "\n".join(lines)
