"""The report: the machine, one markdown table of medians over runs (with min-max, the ratio to
the ceiling and both sides' CPU), the ceilings themselves, and what the runs noticed."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import platform
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from .server import REPO
from .stats import Phase, Spread

RESULTS = Path(__file__).resolve().parent / "results"
DASH, TIMES = "\u2013", "\u00d7"  # en dash, multiplication sign


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command_version(argv: list[str]) -> str:
    """The first line a server binary prints for ``--version`` (the venv's bin first)."""
    local = Path(sys.executable).parent / argv[0]
    if local.exists():
        argv = [str(local), *argv[1:]]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return f"{Path(argv[0]).name} not installed"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server", "migrations", "config.toml"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev} (server/ has uncommitted changes)" if dirty else rev


def machine(cpu_capacity: Sequence[float] = ()) -> list[tuple[str, str]]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"),
        ("parallel capacity", _capacity(cpu_capacity)),
        ("memory", f"{mem_kb / 2**20:.1f} GiB"),
        ("kernel", platform.release()),
        ("Python", sys.version.split()[0]),
        ("aiohttp", _version("aiohttp")),
        ("aiosqlite", _version("aiosqlite")),
        ("SQLite", sqlite3.sqlite_version),
        ("uvloop", _version("uvloop")),
        ("orjson", _version("orjson")),
        ("jobfeed", f"{_version('jobfeed')} at {_git_revision()}"),
        (
            "NATS",
            f"{_command_version(['nats-server', '--version'])}, nats-py {_version('nats-py')}",
        ),
        (
            "Redis",
            f"{_command_version(['/usr/bin/redis-server', '--version'])}, "
            f"redis-py {_version('redis')}, hiredis {_version('hiredis')}",
        ),
        ("RLIMIT_NOFILE", f"{soft} (hard {hard})"),
    ]


def _capacity(rounds: Sequence[float]) -> str:
    if not rounds:
        return "not measured"
    each = ", ".join(f"{c:.2f}{TIMES}" for c in rounds)
    return (
        f"two busy processes did {each} the work of one (before each round; 2.0 = two "
        "full cores). The server and the generators share this."
    )


# -- numbers -----------------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool | None:
    """True for rates, False for times and sizes, None where a ratio means nothing."""
    if metric.endswith("/s"):
        return True
    if metric.endswith((" ms", " s", " MB", " KB/connection")):
        return False
    return None


def fmt(value: float, metric: str = "") -> str:
    if math.isnan(value):
        return "—"
    magnitude = abs(value)
    if metric.endswith("/s") or magnitude >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


@dataclass
class Row:
    phase: str
    metric: str
    values: list[float]
    ceiling: str | None = None
    server_cpu: list[float] = field(default_factory=list)
    generator_cpu: list[float] = field(default_factory=list)
    first_of_phase: bool = False


def rows(phases: Sequence[Phase]) -> list[Row]:
    """One row per (ceiling, phase, metric), values in run order; CPU on a phase's first row."""
    table: dict[tuple[str | None, str, str], Row] = {}
    seen_phases: set[tuple[str | None, str]] = set()
    for phase in phases:
        for metric, value in phase.metrics.items():
            key = (phase.ceiling, phase.name, metric)
            row = table.get(key)
            if row is None:
                row = table[key] = Row(phase.name, metric, [], phase.ceiling)
                if (phase.ceiling, phase.name) not in seen_phases:
                    seen_phases.add((phase.ceiling, phase.name))
                    row.first_of_phase = True
            row.values.append(value)
            if row.first_of_phase:
                if phase.server_cpu_s is not None:
                    row.server_cpu.append(phase.server_cpu_s)
                if phase.generator_cpu_s is not None:
                    row.generator_cpu.append(phase.generator_cpu_s)
    return list(table.values())


def _spread_cells(values: Sequence[float], metric: str) -> tuple[str, str]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "—", ""
    spread = Spread.of(clean)
    if len(clean) == 1:
        return fmt(spread.median, metric), ""
    return fmt(spread.median, metric), f"{fmt(spread.low, metric)}{DASH}{fmt(spread.high, metric)}"


def _cpu_cell(values: Sequence[float]) -> str:
    return f"{Spread.of(values).median:.2f}" if values else ""


def _ratio(row: Row, ceiling: Row) -> str:
    direction = higher_is_better(row.metric)
    ours = [v for v in row.values if not math.isnan(v)]
    theirs = [v for v in ceiling.values if not math.isnan(v)]
    if direction is None or not ours or not theirs:
        return ""
    mine, best = Spread.of(ours).median, Spread.of(theirs).median
    if best == 0:
        return ""
    if direction:
        return f"{mine / best:.0%} of {fmt(best, row.metric)} ({ceiling.ceiling})"
    return f"{mine / best:.1f}{TIMES} {fmt(best, row.metric)} ({ceiling.ceiling})"


def results_table(measured: Sequence[Phase], ceilings: Sequence[Phase]) -> str:
    bounds: dict[tuple[str, str], list[Row]] = {}
    for ceiling in rows(ceilings):
        bounds.setdefault((ceiling.phase, ceiling.metric), []).append(ceiling)
    lines = [
        f"| workload | metric | median | min{DASH}max | vs ceiling or peer "
        "| server CPU s | generator CPU s |",
        "|---|---|--:|--:|---|--:|--:|",
    ]
    for row in rows(measured):
        median, spread = _spread_cells(row.values, row.metric)
        ratios = [_ratio(row, c) for c in bounds.get((row.phase, row.metric), [])]
        phase = row.phase if row.first_of_phase else "″"
        lines.append(
            f"| {phase} | {row.metric} | {median} | {spread} | "
            f"{'; '.join(r for r in ratios if r)} | "
            f"{_cpu_cell(row.server_cpu)} | {_cpu_cell(row.generator_cpu)} |"
        )
    return "\n".join(lines)


def ceilings_table(ceilings: Sequence[Phase]) -> str:
    lines = [
        f"| ceiling or peer | for | metric | median | min{DASH}max | server CPU s "
        "| generator CPU s |",
        "|---|---|---|--:|--:|--:|--:|",
    ]
    for row in rows(ceilings):
        median, spread = _spread_cells(row.values, row.metric)
        label, phase = (row.ceiling, row.phase) if row.first_of_phase else ("″", "″")
        lines.append(
            f"| {label} | {phase} | {row.metric} | {median} | {spread} | "
            f"{_cpu_cell(row.server_cpu)} | {_cpu_cell(row.generator_cpu)} |"
        )
    return "\n".join(lines)


EXPLAIN = """\
How to read it
- Every figure is the median over the runs, with min-max when there was more than one.
- *vs ceiling or peer*: for rates, jobfeed's median as a share of the other's median; for times
  and sizes, jobfeed's median as a multiple of the other's (1.0x = as good). Peers: NATS
  JetStream and Redis Streams on this machine, driven by generators in the same framework
  (their notes say where a peer's nearest equivalent differs from jobfeed's). Ceilings: stdlib
  sqlite3 alone committing the same rows in groups as large as the load allows (W1/W1b/W2);
  *raw aiohttp* is `bench.rawws` driven by the same generators: the same URLs and frames, the
  log in a Python list, each frame sent to each socket from the append's own task. It is the
  simple baseline aiohttp gives, not a hard upper bound: where jobfeed batches better it
  can beat it (W4).
- CPU columns: seconds of CPU used by the jobfeed process (all threads, /proc/<pid>/stat) and
  by all generator processes together, over the phase's measured window (replays, W6 and W7:
  from the command to the last frame). Both sides share the machine's parallel capacity
  (above); when it is near 1x, the generators take CPU the server would otherwise get.
- Latency: wall clock from the producer's `data.t = time.time_ns()` (set just before the
  request is sent) to the subscriber's receipt; all processes on one host, one clock.
- W3 light load runs at a tenth of W3's rate, where neither side is saturated: its latency is
  the live path's own; W3 at full rate also measures queueing on a busy machine.
- W4: the producer appends while the same CPU fans out, so its rate is what the fan-out leaves.
- W5, 100 concurrent replays: 100 x the whole log is more than fits the phase's cap; the rate
  is over the capped window, with how many caught up."""


def render(
    *,
    title: str,
    command: str,
    measured: Sequence[Phase],
    ceilings: Sequence[Phase],
    failures: Sequence[str],
    elapsed: float,
    cpu_capacity: Sequence[float],
    targets: str,
    chart: str | None,
) -> str:
    notes = list(dict.fromkeys(note for phase in [*measured, *ceilings] for note in phase.notes))
    parts = [
        f"# {title}",
        "",
        f"`{command}` — {elapsed / 60:.1f} min",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in machine(cpu_capacity)),
        "",
        "## Targets",
        "",
        targets,
        "",
        *([f"![jobfeed beside its peers and ceilings]({chart})", ""] if chart else []),
        "## Results",
        "",
        results_table(measured, ceilings),
        "",
        EXPLAIN,
        "",
        "## Ceilings and peers",
        "",
        ceilings_table(ceilings) if ceilings else "(not measured)",
    ]
    if notes:
        parts += ["", "## Notes from the runs", "", *(f"- {note}" for note in notes)]
    if failures:
        parts += ["", "## Failed runs", "", *(f"- {failure}" for failure in failures)]
    return "\n".join(parts) + "\n"


def write_phases(
    stamp: str, measured: Sequence[Phase], compared: Sequence[Phase], directory: Path = RESULTS
) -> Path:
    """Every phase of every run as JSON (``<stamp>.json``), to re-render or re-analyse."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    body = {
        "measured": [dataclasses.asdict(p) for p in measured],
        "compared": [dataclasses.asdict(p) for p in compared],
    }
    path.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def read_phases(path: Path) -> tuple[list[Phase], list[Phase]]:
    body = orjson.loads(path.read_bytes())
    return [Phase(**p) for p in body["measured"]], [Phase(**p) for p in body["compared"]]


def write(text: str, stamp: str, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.md"
    path.write_text(text)
    (directory / "latest.md").write_text(text)
    return path
