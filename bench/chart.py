"""The chart: jobfeed beside its peers and ceilings from the same run, and each target's score.

Three panels: append throughput (W1, W1b, W2), live latency p99 (W3 and W8; W4's latency is
the backlog of a saturated fan-out, not a live-path figure), and every target as "achieved /
required" (1.0 = just met). Written as a PNG with matplotlib's Agg backend, so
it needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .stats import Phase, Spread
from .targets import NamePredicate, Verdict, both, starts

JOBFEED = "jobfeed"
COLOURS = {
    JOBFEED: "#1f77b4",
    "NATS JetStream": "#ff7f0e",
    "Redis Streams": "#d62728",
    "sqlite3": "#7f7f7f",  # sqlite3 alone, the storage ceiling
    "raw aiohttp": "#2ca02c",
}

THROUGHPUT = (
    ("W1 single", both("W1 durable append:", "1 event/request, full"), "events/s"),
    ("W1b batches", starts("W1b durable append:"), "events/s"),
    ("W2 normal", starts("W2 append:"), "events/s"),
)
LATENCY = (
    ("W3 1,000/s", starts("W3 live latency:"), "latency p99 ms"),
    ("W3 100/s", starts("W3 live latency, light load:"), "latency p99 ms"),
    ("W8 many jobs", starts("W8 many jobs"), "latency p99 ms"),
)


def _source(phase: Phase) -> str:
    if phase.ceiling is None:
        return JOBFEED
    for name in COLOURS:
        if phase.ceiling.startswith(name):
            return name
    return phase.ceiling


def _medians(phases: Sequence[Phase], predicate: NamePredicate, metric: str) -> dict[str, float]:
    """Each source's median of ``metric`` over the phases whose names match."""
    values: dict[str, list[float]] = {}
    for phase in phases:
        value = phase.metrics.get(metric)
        if predicate(phase.name) and value is not None and not math.isnan(value):
            values.setdefault(_source(phase), []).append(value)
    return {source: Spread.of(v).median for source, v in values.items()}


def _grouped(
    axis: object,
    phases: Sequence[Phase],
    groups: Sequence[tuple[str, NamePredicate, str]],
    ylabel: str,
) -> None:
    from matplotlib.axes import Axes

    assert isinstance(axis, Axes)
    medians = [_medians(phases, predicate, metric) for _, predicate, metric in groups]
    sources = [s for s in COLOURS if any(s in m for m in medians)]
    width = 0.8 / max(1, len(sources))
    for index, source in enumerate(sources):
        xs = [g + index * width for g, m in enumerate(medians) if source in m]
        ys = [m[source] for m in medians if source in m]
        bars = axis.bar(xs, ys, width, label=source, color=COLOURS[source])
        axis.bar_label(
            bars,
            labels=[f"{y:,.0f}" if y >= 100 else f"{y:.1f}" for y in ys],
            fontsize=6,
            rotation=90,
            padding=2,
        )
    axis.set_xticks([g + width * (len(sources) - 1) / 2 for g in range(len(groups))])
    axis.set_xticklabels([label for label, _, _ in groups])
    axis.set_ylabel(ylabel)
    axis.set_yscale("log")
    axis.legend(fontsize=7)


def _scores(axis: object, verdicts: Sequence[Verdict]) -> None:
    from matplotlib.axes import Axes

    assert isinstance(axis, Axes)
    labels, scores, colours = [], [], []
    for verdict in verdicts:
        score = _score(verdict)
        if score is None:
            continue
        labels.append(f"{verdict.target.workload} {verdict.target.wording}")
        scores.append(score)
        colours.append("#2ca02c" if verdict.met else "#d62728")
    axis.barh(range(len(scores)), [min(score, 10.0) for score in scores], color=colours)
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(scores)))
    axis.set_yticklabels(labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, max([2.0, *(min(score, 10.0) * 1.15 for score in scores)]))
    axis.set_xlabel("achieved / required (≥ 1 met)")
    for y, score in enumerate(scores):
        axis.text(min(score, 10.0), y, f" {score:.2f}", va="center", fontsize=8)


def _score(verdict: Verdict) -> float | None:
    """Achieved over required, > 1 when met, for targets with a scale (not "0 wrong")."""
    target, ours, theirs = verdict.target, verdict.ours, verdict.theirs
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return None
    if target.bound is not None:
        return theirs / ours  # times and sizes under a bound
    if target.margin is not None:
        return (theirs + target.margin) / ours  # a size at most `margin` over theirs
    assert target.ratio is not None
    if target.higher_is_better:
        return ours / (target.ratio * theirs)
    return target.ratio * theirs / ours


def render(
    path: Path,
    measured: Sequence[Phase],
    compared: Sequence[Phase],
    verdicts: Sequence[Verdict],
    title: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [*measured, *compared]
    figure = plt.figure(figsize=(13, 10))
    grid = figure.add_gridspec(2, 2, height_ratios=[1, 1])
    throughput = figure.add_subplot(grid[0, 0])
    latency = figure.add_subplot(grid[0, 1])
    scores = figure.add_subplot(grid[1, :])
    _grouped(throughput, phases, THROUGHPUT, "events/s acknowledged (log)")
    throughput.set_title("Durable appends, 32 producers")
    _grouped(latency, phases, LATENCY, "p99 send → receipt, ms (log)")
    latency.set_title("Live latency p99 (lower is better)")
    _scores(scores, verdicts)
    scores.set_title("Targets: achieved / required (green met, red missed)")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.chart results/<stamp>.json``: draw a saved run's chart again."""
    import argparse

    from . import report, targets

    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=main.__doc__)
    parser.add_argument("phases", type=Path, help="a <stamp>.json that python -m bench wrote")
    args = parser.parse_args(argv)
    measured, compared = report.read_phases(args.phases)
    verdicts = targets.judge(measured, compared)
    out = render(args.phases.with_suffix(".png"), measured, compared, verdicts, args.phases.stem)
    print(out)


if __name__ == "__main__":
    main()
