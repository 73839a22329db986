"""W8, many jobs: 1,000 jobs, each with one producer at 2 events/s and one WebSocket subscriber.

The shape of a real deployment: many small jobs at once rather than one busy one. Each job's
producer sends single events on a steady clock (its phase spread over the first tick, so the
jobs do not all post in the same millisecond) and waits for each answer; each job has its own
subscriber. Reported: the append rate and ack latency, the send-to-receipt latency, order on
every stream, and the server's memory.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import time
from array import array
from dataclasses import dataclass

import aiohttp
import orjson

from . import loadgen
from .fleet import Link, Workers
from .http1 import Http1Connection
from .loadgen import JSON_HEADERS, READY_TIMEOUT, REQUEST_TIMEOUT, CpuWindow, bounded_gather
from .profiles import Profile
from .stats import Phase, latency_ms, samples
from .subscribers import Subscriber, record_live
from .workloads import (
    ACK_QUANTILES,
    GATHER_SLACK,
    LIVE_QUANTILES,
    Target,
    cpu_during,
    order_notes,
    run_async,
    split,
    status_notes,
    target_server,
)

PRODUCER_CONNECTIONS = 64  # keep-alive connections per producer process, shared by its jobs


@dataclass(frozen=True)
class JobsSpec:
    """One process's share of the jobs: a producer or a subscriber for each."""

    base_url: str
    job_ids: tuple[str, ...]
    rate: float  # events/s per job
    warmup: float
    duration: float
    time_limit: float
    seed: int = 0


async def produce_many(link: Link, spec: JobsSpec) -> None:
    """Each job posts one event every ``1 / rate`` s, waiting for each answer (as a worker
    reporting its own progress would); the ack latency of those sent in the window."""
    pool: asyncio.Queue[Http1Connection] = asyncio.Queue()
    for connection in await loadgen.open_connections(spec.base_url, PRODUCER_CONNECTIONS):
        pool.put_nowait(connection)
    link.send("ready")
    await link.expect("go", READY_TIMEOUT)
    start = time.perf_counter_ns()
    w0 = start + int(spec.warmup * 1e9)
    w1 = w0 + int(spec.duration * 1e9)
    cpu = CpuWindow(w0, w1)
    latencies = array("q")
    statuses: collections.Counter[int] = collections.Counter()
    late = 0
    events = 0
    period_ns = int(1e9 / spec.rate)
    jitter = random.Random(spec.seed)

    async def job(job_id: str) -> None:
        nonlocal events, late
        head = Http1Connection(spec.base_url).head(f"/v1/jobs/{job_id}/events")
        due = start + jitter.randrange(period_ns)
        counter = 0
        while due < w1:
            wait_ns = due - time.perf_counter_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            elif wait_ns < -period_ns:
                late += 1  # the previous answer took longer than a tick
            t0 = time.perf_counter_ns()
            connection = await pool.get()
            try:
                status, _ = await connection.post(head, loadgen.append_body(1, counter))
            finally:
                pool.put_nowait(connection)
            counter += 1
            t1 = time.perf_counter_ns()
            statuses[status] += 1
            if status == 201 and w0 <= t0 and t1 <= w1:
                latencies.append(t1 - t0)
                events += 1
            due += period_ns

    await asyncio.gather(*(job(job_id) for job_id in spec.job_ids))
    while not pool.empty():
        pool.get_nowait().close()
    link.send(
        "result",
        events=events,
        late=late,
        latencies=latencies.tobytes(),
        statuses=dict(statuses),
        cpu_s=await cpu.result(),
    )


async def subscribe_many(link: Link, spec: JobsSpec) -> None:
    """One live subscriber per job; deliveries and latencies over the window; close on
    ``stop``."""
    subscribers = [Subscriber(spec.base_url, job_id, 0) for job_id in spec.job_ids]
    await record_live(link, subscribers, 100, spec)


def w8_name(profile: Profile) -> str:
    return (
        f"W8 many jobs: {profile.w8_jobs:,} jobs, each 1 producer at "
        f"{profile.w8_rate:g} events/s and 1 WS subscriber"
    )


async def _create(base_url: str, job_ids: list[str]) -> None:
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:

        async def one(job_id: str) -> None:
            body = orjson.dumps({"job_id": job_id, "kind": "bench"})
            async with session.post(f"{base_url}/v1/jobs", data=body, headers=JSON_HEADERS) as r:
                if r.status != 201:
                    raise RuntimeError(f"create {job_id}: {r.status} {await r.text()}")

        await bounded_gather([functools.partial(one, j) for j in job_ids], 32)


def w8(profile: Profile, target: Target = "jobfeed") -> list[Phase]:
    name = w8_name(profile)
    job_ids = [f"job-{i:04d}" for i in range(profile.w8_jobs)]
    with target_server(target) as process:
        run_async(_create(process.base_url, job_ids))
        specs = [
            JobsSpec(
                process.base_url,
                share,
                rate=profile.w8_rate,
                warmup=profile.warmup,
                duration=profile.duration,
                time_limit=profile.warmup + profile.duration + 2 * GATHER_SLACK,
                seed=index,
            )
            for index, share in enumerate(split(job_ids, profile.generator_processes))
        ]
        with (
            Workers("subscriber", subscribe_many, specs) as subs,
            Workers("producer", produce_many, specs) as producers,
        ):
            subs.gather("ready", GATHER_SLACK)
            producers.gather("ready", GATHER_SLACK)
            rss_before = process.rss_bytes()
            subs.send("go")
            producers.send("go")
            server_cpu = cpu_during(process, profile.warmup, profile.duration)
            produced = producers.gather("result", GATHER_SLACK)
            peak_rss = process.peak_rss_bytes()
            subs.send("stop")
            results = subs.gather("result", GATHER_SLACK)
    acks = samples(p["latencies"] for p in produced)
    latencies = samples(r["latencies"] for r in results)
    reports = [s for r in results for s in r["subscribers"]]
    metrics = {"appended events/s": sum(p["events"] for p in produced) / profile.duration}
    metrics.update(latency_ms(acks, "ack", ACK_QUANTILES))
    metrics.update(latency_ms(latencies, "latency", LIVE_QUANTILES))
    metrics["server peak RSS MB"] = peak_rss / 2**20
    notes = order_notes(reports, name) + status_notes([p["statuses"] for p in produced], name)
    late = sum(p["late"] for p in produced)
    if late:
        notes.append(f"{name} [{target}]: {late} ticks started over a period late")
    notes.append(f"{name} [{target}]: RSS before load {rss_before / 2**20:.0f} MB")
    return [
        Phase(
            name,
            metrics,
            server_cpu,
            sum(r["cpu_s"] for r in results) + sum(p["cpu_s"] for p in produced),
            notes,
        )
    ]
