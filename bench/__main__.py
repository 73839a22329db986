"""``python -m bench``: run the workloads and their ceilings, print the table, write the report.

Runs go round-robin (W1, W1b, ..., W7, then again), each workload and its ceiling side by
side, so a slow minute on the machine spreads over all figures instead of sinking one.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
import traceback
from datetime import UTC, datetime

from . import ceilings as ceilings_module
from . import chart, report, server, targets
from .fleet import raise_fd_limit
from .profiles import FULL, QUICK, Profile
from .stats import Phase
from .suite import SUITE, Run


def _summary(phases: list[Phase]) -> str:
    parts = []
    for phase in phases:
        figures = ", ".join(f"{k} {report.fmt(v, k)}" for k, v in list(phase.metrics.items())[:3])
        label = phase.ceiling or phase.name.split(":")[-1].strip()
        parts.append(f"{label}: {figures}")
    return "; ".join(parts)


def _chart(
    stamp: str,
    measured: list[Phase],
    compared: list[Phase],
    verdicts: list[targets.Verdict],
    title: str,
    failures: list[str],
) -> str | None:
    """The PNG beside the report (and as latest.png); its file name, or None without
    matplotlib (``make bench`` installs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        failures.append("chart: matplotlib is not installed (make bench installs the bench extra)")
        return None
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    path = chart.render(report.RESULTS / f"{stamp}.png", measured, compared, verdicts, title)
    shutil.copyfile(path, report.RESULTS / "latest.png")
    return path.name


def _attempt(
    label: str, run: Run, profile: Profile, into: list[Phase], failures: list[str]
) -> None:
    started = time.monotonic()
    try:
        phases = run(profile)
    except Exception as exc:
        failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:2000]}")
        sys.stderr.write(f"[{label}] FAILED after {time.monotonic() - started:.1f} s\n")
        traceback.print_exc()
        return
    into.extend(phases)
    seconds = time.monotonic() - started
    sys.stderr.write(f"[{label}] {seconds:.1f} s — {_summary(phases)}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke check (< 1 min)")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W4")
    parser.add_argument("--runs", type=int, default=None, help="runs per workload (3; quick: 1)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the ceiling runs")
    parser.add_argument(
        "--no-peers", action="store_true", help="skip NATS JetStream and Redis Streams"
    )
    parser.add_argument(
        "--flame",
        metavar="WORKLOAD",
        default=None,
        help="sample jobfeed with py-spy during this workload's first run "
        "(bench/results/flame-<workload>.svg; needs py-spy in the venv)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=N",
        help="override a profile size, e.g. --set w6_subscribers=2000 (see bench/profiles.py)",
    )
    args = parser.parse_args(argv)

    profile = QUICK if args.quick else FULL
    if args.runs is not None:
        profile = dataclasses.replace(profile, runs=max(1, args.runs))
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        current = getattr(profile, name, None)
        if current is None or not value:
            parser.error(f"--set {assignment}: no profile field {name!r}")
        profile = dataclasses.replace(profile, **{name: type(current)(value)})
    wanted = {key.strip().lower() for key in args.only.split(",") if key.strip()}
    selected = [w for w in SUITE if not wanted or w.key.lower() in wanted]
    if not selected:
        parser.error(f"--only matches none of {', '.join(w.key for w in SUITE)}")
    raise_fd_limit()

    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    measured: list[Phase] = []
    ceilings: list[Phase] = []
    failures: list[str] = []
    capacity: list[float] = []
    started = time.monotonic()
    for run in range(profile.runs):
        # The host may lend this VM less than its vCPUs: measured before every round.
        capacity.append(ceilings_module.cpu_capacity())
        sys.stderr.write(f"round {run + 1}: 2 busy processes do {capacity[-1]:.2f}x one's work\n")
        for workload in selected:
            tag = f"{workload.key} run {run + 1}/{profile.runs}"
            if run == 0 and args.flame and args.flame.lower() == workload.key.lower():
                server.flame_path = report.RESULTS / f"flame-{workload.key}.svg"
            _attempt(tag, workload.run, profile, measured, failures)
            if workload.ceiling is not None and not args.no_ceilings:
                _attempt(f"{tag} ceiling", workload.ceiling, profile, ceilings, failures)
            if not args.no_peers:
                for index, peer in enumerate(workload.peers):
                    _attempt(f"{tag} peer {index + 1}", peer, profile, ceilings, failures)
    elapsed = time.monotonic() - started

    title = f"jobfeed benchmark, {profile.name} profile ({profile.runs} run(s)), {stamp}"
    report.write_phases(stamp, measured, ceilings)
    verdicts = targets.judge(measured, ceilings)
    chart_name = _chart(stamp, measured, ceilings, verdicts, title, failures)
    text = report.render(
        title=title,
        command=command.strip(),
        measured=measured,
        ceilings=ceilings,
        failures=failures,
        elapsed=elapsed,
        cpu_capacity=capacity,
        targets=targets.table(verdicts, report.fmt),
        chart=chart_name,
    )
    path = report.write(text, stamp)
    print(report.results_table(measured, ceilings))
    print(f"\nfull report: {path} (also {report.RESULTS / 'latest.md'}); {elapsed / 60:.1f} min")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
