"""W1backup: W1's closed-loop appends while ``jobfeed backup`` copies a pre-built
1,000,000-event database, against W1 on the same database with no backup running (same run).

The database is built directly in SQL before the server starts (a recursive CTE writes the
events; the jobs' snapshots are folded by the server's own reducer), so setup takes seconds,
not the minutes a million appends over HTTP would. The backup runs in a loop from a thread
(``jobfeed backup --force``, a separate process, as an operator would run it) from before
the producers start until they end, so the whole measured window runs beside a backup
command (its start-up, its copy, its check of the copy; one after another). Reported beside
W1's figures: each copy's duration (the CLI's own time, process start included), and the
largest ``-wal`` seen meanwhile (the copy's read transaction keeps the writer from
restarting the WAL: docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import statistics
import subprocess
import threading
import time
from pathlib import Path

import aiohttp

from server.migrate import apply_migrations
from server.snapshot import apply_event

from . import loadgen, server
from .profiles import Profile
from .stats import Phase
from .workloads import GATHER_SLACK, append_metrics, run_async, run_producers, split, status_notes

PREBUILT_EVENTS = 1_000_000
PREBUILT_JOBS = 1_000
PREBUILT_TS = "2026-11-01T00:00:00.000000Z"  # before any event the run appends
BACKUP_TIMEOUT = 600.0


def build_database(path: Path, events: int = PREBUILT_EVENTS, jobs: int = PREBUILT_JOBS) -> None:
    """A migrated database holding ``jobs`` running jobs of ``events // jobs`` events each
    (a created event, then log events of ~100 bytes), as the server would have stored them."""
    per_job = events // jobs
    apply_migrations(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")  # a throwaway file: built, then served
        conn.execute("BEGIN")
        conn.execute(
            """
            WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)
            SELECT i + 1, 'default', printf('prebuilt-%04d', i / ?), i % ? + 1,
                CASE WHEN i % ? = 0 THEN 'created' ELSE 'log' END, ?, NULL,
                CASE WHEN i % ? = 0 THEN
                    printf('{"job_id":"prebuilt-%04d","seq":1,"id":%d,"type":"created",'
                        || '"ts":"%s","kind":"prebuilt"}', i / ?, i + 1, ?)
                ELSE
                    printf('{"job_id":"prebuilt-%04d","seq":%d,"id":%d,"type":"log",'
                        || '"ts":"%s","message":"line %d of a pre-built log","level":"info"}',
                        i / ?, i % ? + 1, i + 1, ?, i % ?)
                END
            FROM n
            """,
            (
                jobs * per_job - 1,
                *(per_job,) * 3,
                PREBUILT_TS,
                per_job,
                per_job,
                PREBUILT_TS,
                per_job,
                per_job,
                PREBUILT_TS,
                per_job,
            ),
        )
        rows = []
        for job in range(jobs):
            job_id = f"prebuilt-{job:04d}"
            state = apply_event(
                None,
                {
                    "job_id": job_id,
                    "seq": 1,
                    "id": job * per_job + 1,
                    "type": "created",
                    "ts": PREBUILT_TS,
                    "kind": "prebuilt",
                },
            )
            state = apply_event(
                state,
                {
                    "job_id": job_id,
                    "seq": per_job,
                    "id": (job + 1) * per_job,
                    "type": "log",
                    "ts": PREBUILT_TS,
                },
            )
            rows.append(
                (
                    job_id,
                    state.kind,
                    state.status,
                    state.last_seq,
                    state.created_at,
                    state.updated_at,
                    state.to_json().decode(),
                )
            )
        conn.executemany(
            "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at, updated_at,"
            " snapshot) VALUES ('default', ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


class BackupLoop:
    """``jobfeed backup --force`` over and over from a thread until stopped; each copy's
    duration and exit status, and the largest ``-wal`` sampled while they ran."""

    def __init__(self, db_path: Path, dest: Path) -> None:
        self.db_path = db_path
        self.dest = dest
        self.durations: list[float] = []
        self.failures: list[str] = []
        self.wal_max_bytes = 0
        self.started = threading.Event()  # the first copy has begun
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backup-loop", daemon=True)
        self._sampler = threading.Thread(target=self._sample, name="wal-sampler", daemon=True)

    def __enter__(self) -> BackupLoop:
        self._thread.start()
        self._sampler.start()
        self.started.wait(30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(BACKUP_TIMEOUT)
        self._sampler.join(5)

    def _run(self) -> None:
        env = {**os.environ, "JOBFEED_STORAGE__PATH": str(self.db_path)}
        argv = [str(server.BIN / "jobfeed"), "backup", "--config", str(server.REPO / "config.toml")]
        argv += ["--force", str(self.dest)]
        while not self._stop.is_set():
            began = time.monotonic()
            copy = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            self.started.set()
            try:
                _, err = copy.communicate(timeout=BACKUP_TIMEOUT)
            except subprocess.TimeoutExpired:
                copy.kill()
                copy.communicate()
                self.failures.append(f"timed out after {BACKUP_TIMEOUT:g} s")
                return
            if copy.returncode != 0:
                self.failures.append(err.strip()[-300:])
                return
            self.durations.append(time.monotonic() - began)

    def _sample(self) -> None:
        wal = self.db_path.with_name(self.db_path.name + "-wal")
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                self.wal_max_bytes = max(self.wal_max_bytes, wal.stat().st_size)


def _name(profile: Profile, what: str) -> str:
    return (
        f"W1backup {what}: {profile.producers} producers x {profile.depth} in flight, "
        f"1 event/request, full, on a {PREBUILT_EVENTS:,}-event database"
    )


def w1_backup(profile: Profile) -> list[Phase]:
    """Two phases on one server and one pre-built database: W1 alone (the baseline), then W1
    while backups run back to back."""
    phases = []
    with server.jobfeed_prepared(build_database, "full") as process:
        db_path = process.workdir / "jobfeed.db"
        job_ids = [f"producer-{i:02d}" for i in range(profile.producers)]
        run_async(loadgen.create_jobs(process.base_url, job_ids, ""))
        specs = [
            loadgen.AppendSpec(
                process.base_url,
                share,
                profile.depth,
                1,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + GATHER_SLACK,
                tokens=tuple("" for _ in share),
            )
            for share in split(job_ids, profile.generator_processes)
        ]
        for what in ("baseline", "during backup"):
            name = _name(profile, what)
            if what == "baseline":
                cpu, results = run_producers(process, profile, loadgen.append_closed_loop, specs)
                phases.append(
                    Phase(
                        name,
                        append_metrics(results, profile),
                        cpu,
                        sum(r["cpu_s"] for r in results),
                        status_notes([r["statuses"] for r in results], name),
                    )
                )
                continue
            with BackupLoop(db_path, process.workdir / "backup.db") as loop:
                cpu, results = run_producers(process, profile, loadgen.append_closed_loop, specs)
            metrics = append_metrics(results, profile)
            notes = status_notes([r["statuses"] for r in results], name)
            notes += [f"backup failed: {failure}" for failure in loop.failures]
            if loop.durations:
                metrics["backup s"] = statistics.median(loop.durations)
                notes.append(
                    f"{len(loop.durations)} backups of {db_path.stat().st_size / 2**20:,.0f} MiB"
                    f" ran back to back: {', '.join(f'{d:.2f}' for d in loop.durations)} s"
                )
            metrics["wal max MiB"] = loop.wal_max_bytes / 2**20
            cpu_s = sum(r["cpu_s"] for r in results)
            phases.append(Phase(name, metrics, cpu, cpu_s, notes))
    return phases


# -- what a backup does to the WAL (python -m bench.backup) ----------------------------------

WAL_BOUND = 4 * 2**20  # storage.wal_max_bytes for this measurement: restarts at 2 MiB
WAL_PRODUCERS = 32


async def _append_while(base_url: str, stop: threading.Event, acked: list[int]) -> None:
    """WAL_PRODUCERS appenders, one request in flight each, until ``stop``; ``acked[0]``
    counts acknowledged events."""
    jobs = [f"wal-{n:02d}" for n in range(WAL_PRODUCERS)]
    await loadgen.create_jobs(base_url, jobs)
    body = b'{"type":"log","message":"an event of about a hundred bytes","level":"info"}'
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def produce(job: str) -> None:
            while not stop.is_set():
                url = f"{base_url}/v1/jobs/{job}/events"
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 201:
                        acked[0] += 1

        await asyncio.gather(*(produce(job) for job in jobs))


def measure_wal(seconds_before: float = 5.0, seconds_after: float = 5.0) -> None:
    """Appends to a server on a pre-built 1M-event database, with the WAL bounded at 4 MiB
    (restarts at 2 MiB), before, during and after one ``jobfeed backup``; prints the
    ``-wal`` size and the events acknowledged every half second."""
    with server.jobfeed_prepared(build_database, "full", STORAGE__WAL_MAX_BYTES=str(WAL_BOUND)) as (
        process
    ):
        db_path = process.workdir / "jobfeed.db"
        wal = db_path.with_name(db_path.name + "-wal")
        stop = threading.Event()
        acked = [0]
        appender = threading.Thread(
            target=lambda: run_async(_append_while(process.base_url, stop, acked)), daemon=True
        )
        appender.start()
        began = time.monotonic()
        rows: list[tuple[float, int, int, str]] = []
        copy: subprocess.Popen[str] | None = None
        copy_began = copy_ended = 0.0
        env = {**os.environ, "JOBFEED_STORAGE__PATH": str(db_path)}
        argv = [str(server.BIN / "jobfeed"), "backup", "--config", str(server.REPO / "config.toml")]
        while True:
            now = time.monotonic() - began
            if copy is None and now >= seconds_before:
                copy_began = now
                copy = subprocess.Popen(
                    [*argv, str(process.workdir / "backup.db")], env=env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
            state = "before"
            if copy is not None:
                if copy.poll() is None:
                    state = "backup running"
                else:
                    copy_ended = copy_ended or now
                    state = "after"
                    if now >= copy_ended + seconds_after:
                        break
            size = wal.stat().st_size if wal.exists() else 0
            rows.append((now, size, acked[0], state))
            time.sleep(0.5)
        stop.set()
        appender.join(30)
        assert copy is not None
        out, err = copy.communicate()
    print(f"storage.wal_max_bytes {WAL_BOUND / 2**20:g} MiB; {WAL_PRODUCERS} producers")
    print(f"backup: {copy_ended - copy_began:.1f} s (exit {copy.returncode}) {out.strip()}{err}")
    print("| s | -wal MiB | events acked | |")
    print("|--:|--:|--:|---|")
    for now, size, count, state in rows:
        print(f"| {now:.1f} | {size / 2**20:.1f} | {count:,} | {state} |")


def chart(results: Path, out: Path) -> Path:
    """W1backup's runs from a saved ``<stamp>.json``: ack p50 and p99 and events/s, without
    and during a backup, one pair of bars per run (docs/performance.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import read_phases

    measured, _ = read_phases(results)
    base = [p for p in measured if p.name.startswith("W1backup baseline")]
    during = [p for p in measured if p.name.startswith("W1backup during backup")]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    runs = range(1, len(base) + 1)
    for axis, metric in zip(axes, ("ack p50 ms", "ack p99 ms", "events/s"), strict=True):
        width = 0.38
        axis.bar([r - width / 2 for r in runs], [p.metrics[metric] for p in base], width,
                 label="no backup", color="#6b8fb3")  # fmt: skip
        axis.bar([r + width / 2 for r in runs], [p.metrics[metric] for p in during], width,
                 label="during jobfeed backup", color="#d08c4a")  # fmt: skip
        axis.set_title(metric + (" (higher is better)" if metric == "events/s" else ""))
        axis.set_xticks(list(runs), [f"run {r}" for r in runs])
    axes[0].legend(fontsize=8)
    copies = ", ".join(f"{p.metrics.get('backup s', float('nan')):.1f}" for p in during)
    figure.suptitle(
        f"W1 on a {PREBUILT_EVENTS:,}-event database, without and during a backup "
        f"(backups took {copies} s; {results.stem})",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--chart"]:
        print(chart(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        measure_wal()
