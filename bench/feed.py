"""W9 and W10, the feed (``GET /v1/feed``, feed.md): fan-out over many jobs with filters,
and a replay of a long log over SSE with and without a sparse filter.

W9: ``w9_jobs`` active jobs, a producer posting batches of ``w4_batch`` events to them in
turn (W4's producer, spread over many jobs), and ``w9_subscribers`` WebSocket feed
subscribers, each with one of ten filters (``prefix=j<n>-``: each job matches exactly one
filter). Subscribers start at ``after=0``, so each one's events of every job must arrive as
seq 1, 2, 3 ... (checked per job, as they arrive) with ids strictly increasing: exact, or a
hole or duplicate is counted. Deliveries/s is compared with W4's job-stream fan-out from the
same run (``bench.targets``).

W10: ``w10_events`` events over ``W10_JOBS`` jobs (interleaved in batches of 1,000), then one
more event on the sparse job, which makes it the log's last. One SSE reader replays the feed
with no filter; another with ``job=<one job of 100>`` (1 % of the events): its time to live
is the time to that last event, which needs the whole log scanned.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from . import loadgen
from .fleet import Link, Workers
from .http1 import Http1Connection
from .loadgen import READY_TIMEOUT, REQUEST_TIMEOUT, CpuWindow, append_body, bounded_gather
from .profiles import Profile
from .server import ServerProcess, jobfeed
from .stats import Phase, latency_ms, samples
from .subscribers import Recording
from .workloads import (
    ACK_QUANTILES,
    GATHER_SLACK,
    cpu_during,
    order_notes,
    run_async,
    split,
    status_notes,
)
from .wsclient import LeanPool, LeanWebSocket

W9_FILTERS = 10
W9_PRODUCER_CONNECTIONS = 2
W10_JOBS = 100
W10_SPARSE_JOB = "w10-42"


# -- W9: feed fan-out ------------------------------------------------------------------------


class FeedCheck:
    """A feed subscriber's events checked as they arrive: ids strictly increasing, and each
    job's seqs 1, 2, 3 ... (the subscriber started at after=0 with whole-job filters)."""

    def __init__(self) -> None:
        self.last = 0  # the last event id
        self.seqs: dict[str, int] = {}
        self.count = 0
        self.holes = 0
        self.duplicates = 0

    def see(self, job_id: str, seq: int, event_id: int) -> None:
        previous = self.seqs.get(job_id, 0)
        if seq == previous + 1 and event_id > self.last:
            self.seqs[job_id] = seq
            self.last = event_id
        elif seq > previous + 1:
            self.holes += seq - previous - 1
            self.seqs[job_id] = seq
            self.last = max(self.last, event_id)
        else:
            self.duplicates += 1
        self.count += 1

    def report(self) -> dict[str, Any]:
        return {
            "last": self.last,
            "count": self.count,
            "holes": self.holes,
            "duplicates": self.duplicates,
        }


class FeedSubscriber(FeedCheck):
    """One WebSocket feed subscription on the lean client."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.ws: LeanWebSocket | None = None

    async def connect(self, pool: LeanPool) -> None:
        self.ws = await pool.connect(self.url)
        hello = await self.ws.next_text(timeout=30)
        if hello is None or orjson.loads(hello).get("type") != "hello":
            raise ConnectionError(f"no hello from {self.url}: {hello!r}")

    async def read(self, recording: Recording) -> None:
        ws = self.ws
        assert ws is not None
        loads, time_ns = orjson.loads, time.time_ns

        def on_text(payload: bytes) -> None:
            now = time_ns()
            frame = loads(payload)
            seq = frame.get("seq")
            if seq is None:
                return  # heartbeat
            self.see(frame["job_id"], seq, frame["id"])
            data = frame.get("data")
            recording.count(now, None if data is None else data["t"])

        while ws.pending:
            on_text(ws.pending.popleft())
        ws.on_text = on_text
        try:
            await ws.closed
        finally:
            ws.on_text = None


@dataclass(frozen=True)
class FeedSubscribeSpec:
    urls: tuple[str, ...]
    connect_parallel: int
    warmup: float
    duration: float
    time_limit: float


async def feed_window(link: Link, spec: FeedSubscribeSpec) -> None:
    """Feed subscribers: connect, record over the window after ``go``, report on ``stop``."""
    subscribers = [FeedSubscriber(url) for url in spec.urls]
    async with LeanPool() as pool:
        await bounded_gather(
            [functools.partial(s.connect, pool) for s in subscribers], spec.connect_parallel
        )
        recording = Recording()
        readers = [asyncio.create_task(s.read(recording)) for s in subscribers]
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        cpu = recording.open(spec.warmup, spec.duration)
        await link.expect("stop", spec.time_limit)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        link.send(
            "result",
            deliveries=recording.deliveries,
            latencies=recording.latencies.tobytes(),
            subscribers=[s.report() for s in subscribers],
            cpu_s=await cpu.result(),
        )


@dataclass(frozen=True)
class RotatingSpec:
    """Closed loop over many jobs: each connection posts ``batch`` events to its jobs in
    turn, one request in flight."""

    base_url: str
    job_ids: tuple[str, ...]
    connections: int
    batch: int
    warmup: float
    duration: float
    time_limit: float


async def append_rotating(link: Link, spec: RotatingSpec) -> None:
    connections = await loadgen.open_connections(spec.base_url, spec.connections)
    link.send("ready")
    await link.expect("go", READY_TIMEOUT)
    w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
    w1 = w0 + int(spec.duration * 1e9)
    cpu = CpuWindow(w0, w1)
    statuses: dict[int, int] = {}
    events = last_id = 0

    async def loop(connection: Http1Connection, jobs: Sequence[str]) -> None:
        nonlocal events, last_id
        heads = [connection.head(f"/v1/jobs/{job_id}/events") for job_id in jobs]
        turn = counter = 0
        while (t0 := time.perf_counter_ns()) < w1:
            status, answer = await connection.post(heads[turn], append_body(spec.batch, counter))
            turn = (turn + 1) % len(heads)
            counter += spec.batch
            t1 = time.perf_counter_ns()
            statuses[status] = statuses.get(status, 0) + 1
            if status == 201:
                last_id = max(last_id, orjson.loads(answer)["events"][-1]["id"])
                if t0 >= w0 and t1 <= w1:
                    events += spec.batch
            elif status == 503:
                await asyncio.sleep(0.005)

    shares = split(spec.job_ids, len(connections))
    await asyncio.gather(*(loop(c, share) for c, share in zip(connections, shares, strict=True)))
    for connection in connections:
        connection.close()
    link.send("result", events=events, last_id=last_id, statuses=statuses, cpu_s=await cpu.result())


def w9_name(profile: Profile) -> str:
    return (
        f"W9 feed fan-out: {profile.w9_subscribers:,} WS feed subscribers, "
        f"{profile.w9_jobs:,} jobs, {W9_FILTERS} filters"
    )


def w9(profile: Profile) -> list[Phase]:
    name = w9_name(profile)
    job_ids = [f"j{n % W9_FILTERS}-{n:05d}" for n in range(profile.w9_jobs)]
    with jobfeed() as process:
        run_async(loadgen.create_jobs(process.base_url, job_ids))
        ws_base = process.base_url.replace("http://", "ws://")
        urls = [
            f"{ws_base}/v1/feed?after=0&prefix=j{n % W9_FILTERS}-"
            for n in range(profile.w9_subscribers)
        ]
        sub_specs = [
            FeedSubscribeSpec(
                share,
                connect_parallel=100,
                warmup=profile.warmup,
                duration=profile.duration,
                time_limit=profile.warmup + profile.duration + 2 * GATHER_SLACK,
            )
            for share in split(urls, profile.generator_processes)
        ]
        producer_spec = RotatingSpec(
            process.base_url,
            tuple(job_ids),
            W9_PRODUCER_CONNECTIONS,
            profile.w4_batch,
            profile.warmup,
            profile.duration,
            time_limit=profile.warmup + profile.duration + GATHER_SLACK,
        )
        with (
            Workers("subscriber", feed_window, sub_specs) as subs,
            Workers("producer", append_rotating, [producer_spec]) as producer,
        ):
            subs.gather("ready", GATHER_SLACK)
            producer.gather("ready", GATHER_SLACK)
            subs.send("go")
            producer.send("go")
            server_cpu = cpu_during(process, profile.warmup, profile.duration)
            (produced,) = producer.gather("result", GATHER_SLACK)
            subs.send("stop")
            peak_rss = process.peak_rss_bytes()
            results = subs.gather("result", GATHER_SLACK)
    latencies = samples(r["latencies"] for r in results)
    reports = [s for r in results for s in r["subscribers"]]
    metrics = {
        "deliveries/s": sum(r["deliveries"] for r in results) / profile.duration,
        "appended events/s": produced["events"] / profile.duration,
    }
    metrics.update(latency_ms(latencies, "latency", ACK_QUANTILES))
    metrics["max lag at end, ids"] = produced["last_id"] - min(s["last"] for s in reports)
    metrics["subscribers with a wrong sequence"] = sum(
        1 for s in reports if s["holes"] or s["duplicates"]
    )
    metrics["server peak RSS MB"] = peak_rss / 2**20
    notes = order_notes(reports, name)
    notes += status_notes([produced["statuses"]], name)
    generator_cpu = sum(r["cpu_s"] for r in results) + produced["cpu_s"]
    return [Phase(name, metrics, server_cpu, generator_cpu, notes)]


# -- W10: feed replay over SSE ---------------------------------------------------------------


@dataclass(frozen=True)
class FeedReadSpec:
    url: str
    last_id: int  # read until the event with this id has arrived
    time_limit: float


async def read_feed_sse(link: Link, spec: FeedReadSpec) -> None:
    """One SSE feed reader: events counted as the bytes arrive (each event's JSON has one
    ``"seq":``); done at the record ``id: <last_id>``."""
    marker, end = b'"seq":', b"\nid: %d\n" % spec.last_id
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        started, cpu0 = time.perf_counter(), time.process_time()
        count, tail, reached = 0, b"", False
        headers = {"Accept": "text/event-stream"}
        async with session.get(spec.url, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"{spec.url}: {response.status} {await response.text()}")
            async with asyncio.timeout(spec.time_limit):
                async for chunk in response.content.iter_any():
                    joined = tail + chunk
                    count += joined.count(marker) - tail.count(marker)
                    if end in joined:
                        reached = True
                        break
                    tail = joined[-64:]
        link.send(
            "result",
            events=count,
            seconds=time.perf_counter() - started,
            reached=reached,
            cpu_s=time.process_time() - cpu0,
        )


def w10_label(profile: Profile) -> str:
    return f"W10 feed replay of {profile.w10_events:,} events over SSE"


async def _load(base_url: str, events: int) -> int:
    """``events`` progress events over the W10 jobs, interleaved in batches of 1,000; then
    one more on the sparse job. The last event id."""
    per_job = events // W10_JOBS
    jobs = [f"w10-{n:02d}" for n in range(W10_JOBS)]
    await loadgen.create_jobs(base_url, jobs)
    await bounded_gather(
        [functools.partial(loadgen.preload, base_url, job_id, per_job, 1000, 1) for job_id in jobs],
        4,
    )
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        url = f"{base_url}/v1/jobs/{W10_SPARSE_JOB}/events"
        async with session.post(url, data=append_body(1, 0), headers=loadgen.JSON_HEADERS) as r:
            last_id: int = orjson.loads(await r.read())["events"][-1]["id"]
    return last_id


def _replay(
    process: ServerProcess, name: str, url: str, last_id: int, expected: int, limit: float
) -> tuple[dict[str, Any], float, list[str]]:
    spec = FeedReadSpec(process.base_url + url, last_id, limit)
    with Workers("reader", read_feed_sse, [spec]) as reader:
        reader.gather("ready", GATHER_SLACK)
        cpu0 = process.cpu_seconds()
        reader.send("go")
        (result,) = reader.gather("result", limit + GATHER_SLACK)
        server_cpu = process.cpu_seconds() - cpu0
    notes = []
    if not result["reached"] or result["events"] != expected:
        notes.append(
            f"{name}: read {result['events']} events (expected {expected}), "
            f"last id reached: {result['reached']}"
        )
    return result, server_cpu, notes


def w10(profile: Profile) -> list[Phase]:
    label = w10_label(profile)
    limit = 300.0
    with jobfeed() as process:
        started, cpu0 = time.perf_counter(), process.cpu_seconds()
        last_id = run_async(_load(process.base_url, profile.w10_events))
        load_rate = last_id / (time.perf_counter() - started)
        phases = [
            Phase(
                f"{label}: loading {W10_JOBS} jobs in batches of 1,000",
                {"events/s": load_rate},
                process.cpu_seconds() - cpu0,
            )
        ]
        name = f"{label}: no filter"
        result, server_cpu, notes = _replay(
            process, name, "/v1/feed?after=0", last_id, last_id, limit
        )
        metrics = {"events/s": result["events"] / result["seconds"]}
        phases.append(Phase(name, metrics, server_cpu, result["cpu_s"], notes))
        name = f"{label}: 1 % filter (one job of {W10_JOBS})"
        sparse = profile.w10_events // W10_JOBS + 2  # its created event and the last one
        result, server_cpu, notes = _replay(
            process, name, f"/v1/feed?after=0&job={W10_SPARSE_JOB}", last_id, sparse, limit
        )
        metrics = {
            "time to live s": result["seconds"],
            "ids scanned/s": last_id / result["seconds"],
            "events/s": result["events"] / result["seconds"],
        }
        phases.append(Phase(name, metrics, server_cpu, result["cpu_s"], notes))
    return phases
