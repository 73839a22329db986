"""Producer workers and what all load generators share; each worker runs in its own process
(``bench.fleet``) on uvloop + aiohttp. Subscribers are in ``bench.subscribers``.

Producers post progress events shaped like protocol-v1's example, with ``data.t`` set to
``time.time_ns()`` just before the request is sent. All processes share one host, so
``time_ns()`` is one clock. Per-process CPU time is taken with ``time.process_time()`` over
the measured window and reported with the result.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .fleet import Link
from .http1 import Http1Connection

JSON_HEADERS = {"Content-Type": "application/json"}
READY_TIMEOUT = 120.0  # how long a worker waits for the coordinator's next command
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)


def progress_event(current: int) -> dict[str, Any]:
    """The benchmark's event: protocol-v1's example, with the send time in ``data.t``."""
    return {
        "type": "progress",
        "progress": 42.5,
        "phase": "matching",
        "message": "Matching requirement 3 of 7",
        "current": current % 7,
        "total": 7,
        "data": {"t": time.time_ns()},
    }


def append_body(batch: int, counter: int) -> bytes:
    if batch == 1:
        return orjson.dumps(progress_event(counter))
    return orjson.dumps({"events": [progress_event(counter + i) for i in range(batch)]})


class CpuWindow:
    """This process's CPU seconds between two wall-clock instants (perf_counter_ns)."""

    def __init__(self, start_ns: int, end_ns: int) -> None:
        self.seconds = 0.0
        self._task = asyncio.create_task(self._measure(start_ns, end_ns))

    async def _measure(self, start_ns: int, end_ns: int) -> None:
        await asyncio.sleep(max(0.0, (start_ns - time.perf_counter_ns()) / 1e9))
        begin = time.process_time()
        await asyncio.sleep(max(0.0, (end_ns - time.perf_counter_ns()) / 1e9))
        self.seconds = time.process_time() - begin

    async def result(self) -> float:
        await self._task
        return self.seconds


async def bounded_gather(
    factories: Sequence[Callable[[], Awaitable[Any]]], parallel: int
) -> list[Any]:
    """Run coroutines with at most ``parallel`` at a time (e.g. WebSocket handshakes)."""
    gate = asyncio.Semaphore(parallel)

    async def one(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await factory()

    return await asyncio.gather(*(one(f) for f in factories))


# -- producers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendSpec:
    """Closed loop: ``depth`` requests in flight per job, each answered before the next."""

    base_url: str
    job_ids: tuple[str, ...]
    depth: int
    batch: int
    warmup: float
    duration: float
    time_limit: float
    tokens: tuple[str, ...] = ()  # with authentication on: one bearer token per job


async def open_connections(base_url: str, count: int) -> list[Http1Connection]:
    """``count`` keep-alive connections, open before the clock starts."""
    connections = [Http1Connection(base_url) for _ in range(count)]
    await asyncio.gather(*(c.open() for c in connections))
    return connections


async def append_closed_loop(link: Link, spec: AppendSpec) -> None:
    connections = await open_connections(spec.base_url, len(spec.job_ids) * spec.depth)
    link.send("ready")
    await link.expect("go", READY_TIMEOUT)
    w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
    w1 = w0 + int(spec.duration * 1e9)
    cpu = CpuWindow(w0, w1)
    latencies = array("q")
    statuses: collections.Counter[int] = collections.Counter()
    events = last_seq = 0

    async def slot(connection: Http1Connection, job_id: str) -> None:
        nonlocal events, last_seq
        head = connection.head(f"/v1/jobs/{job_id}/events", tokens.get(job_id, ""))
        counter = 0
        while (t0 := time.perf_counter_ns()) < w1:
            body = append_body(spec.batch, counter)
            counter += spec.batch
            status, answer = await connection.post(head, body)
            t1 = time.perf_counter_ns()
            statuses[status] += 1
            if status == 201:
                last_seq = max(last_seq, orjson.loads(answer)["last_seq"])
                if t0 >= w0 and t1 <= w1:
                    latencies.append(t1 - t0)
                    events += spec.batch
            elif status == 503:
                await asyncio.sleep(0.005)  # overloaded: back off as a producer should

    tokens = dict(zip(spec.job_ids, spec.tokens, strict=False))
    jobs = [job_id for job_id in spec.job_ids for _ in range(spec.depth)]
    await asyncio.gather(*(slot(c, j) for c, j in zip(connections, jobs, strict=True)))
    for connection in connections:
        connection.close()
    link.send(
        "result",
        events=events,
        last_seq=last_seq,  # the highest seq acknowledged (one job: its log's end)
        latencies=latencies.tobytes(),
        statuses=dict(statuses),
        cpu_s=await cpu.result(),
    )


@dataclass(frozen=True)
class PacedSpec:
    """Open loop: ``rate`` events/s in requests of ``batch``, scheduled by the clock, until
    ``duration`` has passed or the coordinator says ``stop``; then optionally ``completed``."""

    base_url: str
    job_id: str
    rate: float
    batch: int
    max_in_flight: int
    warmup: float
    duration: float | None
    finish: bool
    time_limit: float


async def append_paced(link: Link, spec: PacedSpec) -> None:
    idle = await open_connections(spec.base_url, spec.max_in_flight)
    head = idle[0].head(f"/v1/jobs/{spec.job_id}/events")
    link.send("ready")
    await link.expect("go", READY_TIMEOUT)
    start = time.perf_counter_ns()
    w0 = start + int(spec.warmup * 1e9)
    end = math.inf if spec.duration is None else w0 + spec.duration * 1e9
    cpu = CpuWindow(w0, int(min(end, start + spec.time_limit * 1e9)))
    in_flight: set[asyncio.Task[None]] = set()
    statuses: collections.Counter[int] = collections.Counter()
    sent = 0
    last_seq = 0

    async def post(body: bytes) -> None:
        nonlocal last_seq
        connection = idle.pop()  # there is one: at most max_in_flight posts run at once
        try:
            status, answer = await connection.post(head, body)
        finally:
            idle.append(connection)
        statuses[status] += 1
        if status == 201:
            last_seq = max(last_seq, orjson.loads(answer)["last_seq"])

    per_second = spec.rate / spec.batch
    while (now := time.perf_counter_ns()) < end:
        if spec.duration is None and link.pending():
            await link.expect("stop", 1.0)
            break
        due = int((now - start) / 1e9 * per_second) - sent
        while due > 0 and len(in_flight) < spec.max_in_flight:
            # The body (and its data.t) is made as the request is sent, not when it runs.
            task = asyncio.create_task(post(append_body(spec.batch, sent * spec.batch)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
            due -= 1
        await asyncio.sleep(0.001)
    if in_flight:
        await asyncio.wait(in_flight, timeout=30)
    elapsed = (time.perf_counter_ns() - start) / 1e9
    cpu_s = await cpu.result() if spec.duration is not None else time.process_time()
    if spec.finish:
        done = orjson.dumps({"type": "completed", "message": "benchmark finished"})
        status, answer = await idle[0].post(head, done)
        statuses[status] += 1
        if status == 201:
            last_seq = orjson.loads(answer)["last_seq"]
    for connection in idle:
        connection.close()
    link.send(
        "result",
        sent_events=sent * spec.batch,
        sent_rate=sent * spec.batch / elapsed,
        statuses=dict(statuses),
        last_seq=last_seq,
        cpu_s=cpu_s,
    )


# -- the coordinator's own setup calls --------------------------------------------------------


async def create_jobs(base_url: str, job_ids: Sequence[str], token: str = "") -> None:
    headers = {**JSON_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        for job_id in job_ids:
            body = orjson.dumps({"job_id": job_id, "kind": "bench"})
            async with session.post(f"{base_url}/v1/jobs", data=body, headers=headers) as r:
                if r.status != 201:
                    raise RuntimeError(f"create {job_id}: {r.status} {await r.text()}")


async def preload(base_url: str, job_id: str, events: int, batch: int, parallel: int) -> int:
    """Append ``events`` in batches with ``parallel`` requests in flight; the job's last_seq."""
    url = f"{base_url}/v1/jobs/{job_id}/events"
    requests = [min(batch, events - start) for start in range(0, events, batch)]
    last_seq = 0
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:

        async def one(size: int) -> None:
            nonlocal last_seq
            async with session.post(url, data=append_body(size, 0), headers=JSON_HEADERS) as r:
                answer = await r.read()
                if r.status != 201:
                    raise RuntimeError(f"preload {job_id}: {r.status} {answer[:200]!r}")
                last_seq = max(last_seq, orjson.loads(answer)["last_seq"])

        await bounded_gather([functools.partial(one, n) for n in requests], parallel)
    return last_seq


async def append_one(base_url: str, job_id: str, token: str = "") -> None:
    """One event, its ``data.t`` the moment it is sent."""
    headers = {**JSON_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        url = f"{base_url}/v1/jobs/{job_id}/events"
        async with session.post(url, data=append_body(1, 0), headers=headers) as r:
            if r.status != 201:
                raise RuntimeError(f"append {job_id}: {r.status} {await r.text()}")
