"""The worker-lost watchdog with many jobs falling silent at once: how long its transactions
hold the writer, and what appends see meanwhile.

    .venv/bin/python -m bench.watchdog [--jobs 10000] [--batches 50,100,500]
    .venv/bin/python -m bench.watchdog --hot-path [--rounds 6]

For each batch size (``watchdog.batch_jobs``): a real ``Store`` on a fresh SQLite file in a
temporary directory (durability full, as served) gets ``--jobs`` jobs with the same
``heartbeat_timeout`` (watchdog off), and is opened again with the watchdog on: every job
loaded at start has the same deadline (start + timeout), so one sweep finds them all due at
once, as after a restart or when a whole worker pool dies. Meanwhile one producer appends to
an unwatched job back to back (each append waits for the previous answer) until the
watchdog has failed every watched job. Reported per batch size:

- fence ops: writer operations the sweep submitted (each one group transaction at most);
- op ms, median and max: from an op's submission to its answer (queue wait, planning,
  INSERTs and UPDATEs, COMMIT with fsync), i.e. about how long it held the writer;
- total s: from the first op to the last answer (every job failed);
- append ack ms, p50 / p99 / max, of the producer's appends during that window, against the
  same before the jobs came due (baseline).

With ``--hot-path``: what watching costs appends. 100 producers append one event per call to
100 jobs, back to back, with the watchdog off, on with unwatched jobs, and on with every job
watched (its schedule updated from each commit, and the partial index ``jobs_watched``
maintained by each UPDATE); the three interleaved, ``--rounds`` times. Reported: process CPU
(event loop and SQLite's thread) per event, medians.

In-process (no HTTP): the watchdog's cost is in the writer, and HTTP would only add noise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

from server.config import LogConfig, load_config
from server.hub import Hub
from server.logs import configure_logging
from server.models import EventIn, LogIn
from server.store import Store
from server.tenancy import JobKey
from server.writer import Fence, FenceOutcome

TIMEOUT = 2.0  # seconds: the baseline is taken in the first one after the second start


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def make_jobs(path: Path, jobs: int) -> None:
    config = load_config(
        None, environ={"JOBFEED_STORAGE__PATH": str(path), "JOBFEED_WATCHDOG__ENABLED": "false"}
    )
    store = Store(config, Hub(0, 0, 0, 0))
    await store.open()
    try:
        await store.writer.create_job(JobKey("default", "producer"), None, None)
        step = 1000
        for start in range(0, jobs, step):
            await asyncio.gather(
                *(
                    store.writer.create_job(JobKey("default", f"w{n}"), None, None, TIMEOUT)
                    for n in range(start, min(jobs, start + step))
                )
            )
    finally:
        await store.close()


async def one_run(directory: Path, jobs: int, batch: int) -> dict[str, float]:
    path = directory / f"watchdog-{batch}.db"
    await make_jobs(path, jobs)
    config = load_config(
        None,
        environ={
            "JOBFEED_STORAGE__PATH": str(path),
            "JOBFEED_WATCHDOG__INTERVAL_SECONDS": "0.05",
            "JOBFEED_WATCHDOG__BATCH_JOBS": str(batch),
        },
    )
    store = Store(config, Hub(0, 0, 0, 0))
    await store.open()
    opened_at = time.perf_counter()
    try:
        writer, watchdog = store.writer, store.watchdog
        assert watchdog is not None
        op_ms: list[float] = []
        windows: list[tuple[float, float]] = []
        real_fence = writer.fence

        async def timed_fence(fences: list[Fence]) -> list[FenceOutcome]:
            started = time.perf_counter()
            outcomes = await real_fence(fences)
            ended = time.perf_counter()
            op_ms.append((ended - started) * 1000)
            windows.append((started, ended))
            return outcomes

        writer.fence = timed_fence  # type: ignore[method-assign]
        producer = JobKey("default", "producer")
        assert watchdog.watched == jobs
        acks: list[tuple[float, float]] = []  # (sent at, ms)
        event: list[EventIn] = [LogIn(type="log", message="still here")]
        deadline = time.perf_counter() + 120
        while watchdog.lost < jobs and time.perf_counter() < deadline:
            sent = time.perf_counter()
            await writer.append(producer, event)
            acks.append((sent, (time.perf_counter() - sent) * 1000))
        assert watchdog.lost == jobs, f"{watchdog.lost} of {jobs} failed in time"
        first, last = windows[0][0], windows[-1][1]
        during = [ms for sent, ms in acks if first <= sent <= last]
        before = [ms for sent, ms in acks if opened_at < sent < first]
        return {
            "batch": batch,
            "ops": len(op_ms),
            "op_median_ms": statistics.median(op_ms),
            "op_max_ms": max(op_ms),
            "total_s": last - first,
            "base_p50": _percentile(before, 0.5),
            "base_p99": _percentile(before, 0.99),
            "ack_p50": _percentile(during, 0.5),
            "ack_p99": _percentile(during, 0.99),
            "ack_max": max(during, default=float("nan")),
            "acks_during": len(during),
        }
    finally:
        await store.close()


HOT_MODES = ("off", "on, unwatched", "on, watched")


async def hot_path_run(path: Path, mode: str, producers: int, appends: int) -> float:
    """Process CPU seconds per appended event for one mode."""
    environ = {"JOBFEED_STORAGE__PATH": str(path)}
    if mode == "off":
        environ["JOBFEED_WATCHDOG__ENABLED"] = "false"
    store = Store(load_config(None, environ=environ), Hub(0, 0, 0, 0))
    await store.open()
    try:
        writer = store.writer
        timeout = 3600.0 if mode == "on, watched" else None
        keys = [JobKey("default", f"hot-{n}") for n in range(producers)]
        await asyncio.gather(*(writer.create_job(key, None, None, timeout) for key in keys))
        event: list[EventIn] = [LogIn(type="log", message="working")]

        async def produce(key: JobKey) -> None:
            for _ in range(appends):
                await writer.append(key, event)

        started = time.process_time()
        await asyncio.gather(*(produce(key) for key in keys))
        return (time.process_time() - started) / (producers * appends)
    finally:
        await store.close()


async def hot_path(directory: Path, rounds: int) -> None:
    print("append CPU per event (µs), 100 producers x 200 appends of one event", flush=True)
    results: dict[str, list[float]] = {mode: [] for mode in HOT_MODES}
    for round_no in range(rounds):
        # Each round in another order: what runs first in a round is not always the same.
        for index in range(len(HOT_MODES)):
            mode = HOT_MODES[(index + round_no) % len(HOT_MODES)]
            path = directory / f"hot-{round_no}-{index}.db"
            results[mode].append(await hot_path_run(path, mode, 100, 200) * 1e6)
    for mode, values in results.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"{mode}: median {statistics.median(values):.1f} ({runs})", flush=True)


async def main_async(directory: Path, jobs: int, batches: list[int]) -> None:
    print(
        f"{jobs} jobs silent together, heartbeat_timeout {TIMEOUT:g} s; one producer appending "
        "back to back meanwhile"
    )
    print(
        "batch_jobs | fence ops | op ms median / max | total s | append ack ms p50 / p99 / max "
        "(during) | baseline p50 / p99",
        flush=True,
    )
    for batch in batches:
        r = await one_run(directory, jobs, batch)
        print(
            f"{batch} | {r['ops']:.0f} | {r['op_median_ms']:.1f} / {r['op_max_ms']:.1f} | "
            f"{r['total_s']:.2f} | {r['ack_p50']:.1f} / {r['ack_p99']:.1f} / "
            f"{r['ack_max']:.1f} ({r['acks_during']:.0f} appends) | "
            f"{r['base_p50']:.1f} / {r['base_p99']:.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batches", default="50,100,500")
    parser.add_argument("--hot-path", action="store_true", help="what watching costs appends")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with (
        tempfile.TemporaryDirectory(prefix="jobfeed-watchdog-") as directory,
        open(Path(directory) / "server.log", "w", encoding="utf-8") as server_log,
    ):
        # As served: JSON lines at info (one worker_lost line per job), here into a file.
        configure_logging(LogConfig(format="json", level="info"))
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(server_log)
        if args.hot_path:
            asyncio.run(hot_path(Path(directory), args.rounds))
        else:
            asyncio.run(main_async(Path(directory), args.jobs, batches))


if __name__ == "__main__":
    main()
