"""W3retention: W3 (1,000 events/s to 100 live WebSocket subscribers) while the retention sweep
purges 1,000,000 old events, against W3 on the same database without the purge, back to back.

The old events are written straight into the file with SQL before the server starts
(``bench.olddata``: 1,000 finished jobs of 1,000 events, about 240 MB), once, and copied for
each server. They finish "now", so that the sweep (``retention.finished_days = 1``, every
0.2 s) keeps them; the purge phase makes them expire half-way through the warm-up, by setting
their ``finished_at`` two days back from another connection (what time passing would do), and
the next sweep purges them while the producer appends and the subscribers follow. The
baseline runs the same server, database and sweeps, with nothing expiring.

The purge phase reports the sweep's own figures from its ``retention_swept`` log line
(events purged, seconds, longest transaction) and how much of the measured window the purge
covered: a purge that ended before the window opened would measure nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from . import loadgen, server, subscribers
from .fleet import Workers
from .olddata import fill_old_jobs
from .profiles import Profile
from .stats import Phase
from .workloads import (
    GATHER_SLACK,
    LiveRun,
    Target,
    cpu_during,
    live_phase,
    status_notes,
    w3_load,
)

OLD_JOBS = 1_000
OLD_EVENTS_PER_JOB = 1_000
PURGE_WAIT = 120.0  # seconds the purge may take beyond the window before it is an error
RETENTION = {
    "RETENTION__FINISHED_DAYS": "1",
    "RETENTION__INTERVAL_SECONDS": "0.2",
}


@contextlib.contextmanager
def old_database() -> Iterator[Path]:
    """A database holding the 1,000,000 old events, made once per workload run."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-bench-old-") as tmp:
        path = Path(tmp) / "old.db"
        fill_old_jobs(path, jobs=OLD_JOBS, events_per_job=OLD_EVENTS_PER_JOB, age=timedelta(0))
        yield path


def expire_old_jobs(db: Path) -> None:
    """What two days passing would do: the old jobs finished two days ago. One UPDATE of
    1,000 rows from another connection, during the warm-up."""
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    ts = two_days_ago.isoformat(timespec="microseconds").replace("+00:00", "Z")
    conn = sqlite3.connect(db, timeout=5.0)
    try:
        with conn:
            conn.execute(
                "UPDATE jobs SET finished_at = ?, updated_at = ? WHERE job_id GLOB 'old-*'",
                (ts, ts),
            )
    finally:
        conn.close()


def w3_retention(profile: Profile, target: Target = "jobfeed") -> list[Phase]:
    assert target == "jobfeed", "W3retention has no ceiling"
    rate = profile.w3_rate
    with old_database() as template:
        baseline = _run(profile, template, rate, purge=False)
        purged = _run(profile, template, rate, purge=True)
    return [baseline, purged]


def phase_name(profile: Profile, rate: int, purge: bool) -> str:
    what = "purge" if purge else "baseline"
    return (
        f"W3retention {what}: {rate:,} events/s → {profile.w3_subscribers} WS, "
        f"{'while retention purges' if purge else 'beside'} "
        f"{OLD_JOBS * OLD_EVENTS_PER_JOB:,} old events"
    )


def _run(profile: Profile, template: Path, rate: int, *, purge: bool) -> Phase:
    name = phase_name(profile, rate, purge)

    def prepare(db: Path) -> None:
        shutil.copyfile(template, db)

    with server.jobfeed_prepared(prepare, **RETENTION) as process:
        producer_spec, subscriber_specs = w3_load(process, profile, rate)
        db = process.workdir / "jobfeed.db"
        with (
            Workers("subscriber", subscribers.subscribe_window, subscriber_specs) as subs,
            Workers("producer", loadgen.append_paced, [producer_spec]) as producers,
        ):
            subs.gather("ready", GATHER_SLACK)
            producers.gather("ready", GATHER_SLACK)
            subs.send("go")
            producers.send("go")
            window_start = time.time() + profile.warmup
            if purge:
                threading.Timer(profile.warmup / 2, expire_old_jobs, (db,)).start()
            server_cpu = cpu_during(process, profile.warmup, profile.duration)
            window_end = time.time()
            (produced,) = producers.gather("result", GATHER_SLACK)
            time.sleep(0.5)  # the last events reach every subscriber
            subs.send("stop")
            results = subs.gather("result", GATHER_SLACK)
        run = LiveRun(server_cpu, produced, results)
        notes = status_notes([run.produced["statuses"]], name)
        phase = live_phase(name, run, profile.w3_subscribers, notes)
        if purge:
            _purge_figures(phase, process.log_path, window_start, window_end)
    return phase


def _purging_sweep(log_path: Path, deadline: float) -> dict[str, Any] | None:
    """The ``retention_swept`` line of the sweep that purged, once it is written (the
    purge may outlast the window)."""
    while True:
        for line in log_path.read_bytes().splitlines():
            if b'"retention_swept"' in line:
                record: dict[str, Any] = orjson.loads(line)
                if record.get("events"):
                    return record
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _purge_figures(phase: Phase, log_path: Path, window_start: float, window_end: float) -> None:
    """The sweep that purged (its ``retention_swept`` line), and its overlap with the window."""
    sweep = _purging_sweep(log_path, time.monotonic() + PURGE_WAIT)
    expected = OLD_JOBS * OLD_EVENTS_PER_JOB
    if sweep is None:
        phase.notes.append(f"{phase.name}: no sweep purged anything (expected {expected:,})")
        return
    ended = datetime.fromisoformat(sweep["timestamp"].replace("Z", "+00:00")).timestamp()
    began = ended - sweep["seconds"]
    overlap = max(0.0, min(ended, window_end) - max(began, window_start))
    phase.metrics["purged events"] = float(sweep["events"])
    phase.metrics["purge s"] = float(sweep["seconds"])
    phase.metrics["purge transactions"] = float(sweep["transactions"])
    phase.metrics["purge longest transaction ms"] = float(sweep["longest_transaction_ms"])
    phase.metrics["window under purge %"] = 100 * overlap / max(window_end - window_start, 1e-9)
    if sweep["events"] != expected:
        phase.notes.append(f"{phase.name}: the sweep purged {sweep['events']:,}, not {expected:,}")
