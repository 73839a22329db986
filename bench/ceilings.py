"""Machine ceilings, measured by the same script: what SQLite alone and aiohttp alone do here.

- SQLite group commit: stdlib ``sqlite3`` in a thread, jobfeed's schema and row shape (event
  rows plus one snapshot UPDATE per job touched), WAL with checkpoints off the commit path as
  jobfeed runs them, groups as large as the writer's can get under the same load.
- HTTP alone: the W1 producers against ``bench.rawws`` (no SQLite, no validation).
- CPU: how much work two busy processes get done next to one (this VM's two vCPUs may not
  be two cores' worth: the generators and the server share what there is).
- Fan-out: W3, W4, W5 and W7 against ``bench.rawws`` (see ``bench.workloads``).

A ceiling phase carries the same name as the jobfeed phase it bounds, so the report can set
one against the other.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from server.migrate import apply_migrations

from . import loadgen
from .profiles import Profile
from .stats import Phase
from .workloads import GATHER_SLACK, closed_loop_append, w1_name, w1b_name, w2_name

CHECKPOINT_SECONDS = 1.0  # storage.checkpoint_seconds in config.toml
RAW = "raw aiohttp"  # bench.rawws


# The fields a producer sends (protocol-v1's example event, with data.t), minus the type.
_FIELDS = {k: v for k, v in loadgen.progress_event(3).items() if k != "type"}


def _snapshot(job_id: str, seq: int, ts: str) -> str:
    return orjson.dumps(
        {
            "job_id": job_id,
            "kind": "bench",
            "status": "running",
            "progress": 42.5,
            "phase": "matching",
            "message": "Matching requirement 3 of 7",
            "current": 3,
            "total": 7,
            "last_seq": seq,
            "created_at": ts,
            "updated_at": ts,
            "finished_at": None,
            "metadata": {},
            "result": None,
            "error": None,
        }
    ).decode()


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def _group_commits(
    path: Path, synchronous: str, batch: int, jobs: int, seconds: float, out: list[float]
) -> None:
    conn = _connect(path, synchronous)
    job_ids = [f"producer-{i:02d}" for i in range(jobs)]
    ts = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    conn.executemany(
        "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at, updated_at, "
        "snapshot) VALUES ('default', ?, 'bench', 'running', 0, ?, ?, ?)",
        [(job_id, ts, ts, _snapshot(job_id, 0, ts)) for job_id in job_ids],
    )
    seqs = dict.fromkeys(job_ids, 0)
    next_id, events = 1, 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        rows = []
        for i in range(batch):
            job_id = job_ids[i % jobs]
            seqs[job_id] += 1
            seq = seqs[job_id]
            event = {"job_id": job_id, "seq": seq, "id": next_id, "type": "progress", "ts": ts}
            body = orjson.dumps({**event, **_FIELDS}).decode()
            rows.append((next_id, job_id, seq, "progress", ts, None, body))
            next_id += 1
        touched = job_ids[: min(batch, jobs)]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body) "
            "VALUES (?,'default',?,?,?,?,?,?)",
            rows,
        )
        conn.executemany(
            "UPDATE jobs SET status = 'running', last_seq = ?, updated_at = ?, snapshot = ? "
            "WHERE tenant = 'default' AND job_id = ?",
            [(seqs[j], ts, _snapshot(j, seqs[j], ts), j) for j in touched],
        )
        conn.execute("COMMIT")
        events += batch
    out.append(events / (time.perf_counter() - started))
    conn.close()


def _checkpoints(path: Path, stop: threading.Event) -> None:
    conn = _connect(path, "NORMAL")
    while not stop.wait(CHECKPOINT_SECONDS):
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    conn.close()


def sqlite_group_commit(
    name: str, *, synchronous: str, batch: int, jobs: int, seconds: float
) -> Phase:
    """Events/s committed in groups of ``batch`` over ``jobs`` jobs, in a writer thread."""
    with tempfile.TemporaryDirectory(prefix="jobfeed-bench-sqlite-") as tmp:
        path = Path(tmp) / "ceiling.db"
        apply_migrations(path)
        stop = threading.Event()
        checkpointer = threading.Thread(target=_checkpoints, args=(path, stop), daemon=True)
        checkpointer.start()
        out: list[float] = []
        cpu0 = time.process_time()
        writer = threading.Thread(
            target=_group_commits, args=(path, synchronous, batch, jobs, seconds, out)
        )
        writer.start()
        writer.join(seconds + GATHER_SLACK)
        stop.set()
        checkpointer.join(5)
        if not out:
            raise RuntimeError(f"the SQLite ceiling for {name} did not finish")
        return Phase(
            name,
            {"events/s": out[0]},
            server_cpu_s=time.process_time() - cpu0,
            ceiling=f"sqlite3 {synchronous}, groups of {batch}",
        )


def http_only(profile: Profile, name: str, *, batch: int, depth: int) -> Phase:
    """The same producers against the raw aiohttp server: the HTTP path without SQLite."""
    (phase,) = closed_loop_append(profile, name, batch=batch, depth=depth, target="raw")
    phase.ceiling = RAW
    return phase


def w1_ceilings(profile: Profile) -> list[Phase]:
    in_flight = profile.producers * profile.depth
    return [
        sqlite_group_commit(
            w1_name(profile),
            synchronous="FULL",
            batch=in_flight,
            jobs=profile.producers,
            seconds=profile.sqlite_seconds,
        ),
        http_only(profile, w1_name(profile), batch=1, depth=profile.depth),
    ]


def w1b_ceilings(profile: Profile) -> list[Phase]:
    # The writer takes queued requests until a group holds storage.max_batch_events (2,000).
    requests = min(profile.producers * profile.batch_depth, 2000 // profile.batch)
    return [
        sqlite_group_commit(
            w1b_name(profile),
            synchronous="FULL",
            batch=requests * profile.batch,
            jobs=min(profile.producers, requests),
            seconds=profile.sqlite_seconds,
        )
    ]


def w2_ceilings(profile: Profile) -> list[Phase]:
    in_flight = profile.producers * profile.depth
    return [
        sqlite_group_commit(
            w2_name(profile),
            synchronous="NORMAL",
            batch=in_flight,
            jobs=profile.producers,
            seconds=profile.sqlite_seconds,
        )
    ]


def _spin(seconds: float, out: Any) -> None:
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        count += 1
    out.put(count)


def cpu_capacity(seconds: float = 1.0) -> float:
    """Work done by two busy processes at once over the work of one alone (2.0 = two cores).

    One alone runs before and after the pair and the two are averaged: the host's share of
    the CPU drifts, and a single probe caught in a slow second overstates the ratio."""
    context = multiprocessing.get_context("spawn")
    rates: list[int] = []
    for processes in (1, 2, 1):
        out = context.Queue()
        workers = [
            context.Process(target=_spin, args=(seconds, out), daemon=True)
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        rates.append(sum(int(out.get(timeout=seconds + 30)) for _ in workers))
        for worker in workers:
            worker.join(5)
    return 2 * rates[1] / (rates[0] + rates[2])
