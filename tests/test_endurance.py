"""Endurance: a steady load long enough for the defects of months of service to show in a
minute. Producers append to many jobs while subscribers come and go — WebSocket and SSE
readers resuming from random offsets, and clients that never read (stuck WebSocket and SSE
replays, stuck event pages and NDJSON exports) on a job of large events. Throughout, the
``-wal`` file stays under ``storage.wal_max_bytes`` and the server's memory stays flat; at the
end SIGTERM, with stuck clients still attached, exits 0 within ``server.shutdown_timeout``,
and every acknowledged event is in the log after a restart.

Bounded in count, not time: the run ends when the producers have sent their requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.procs import Launcher, ServerProcess, launching, read_log, rss_bytes

pytestmark = [pytest.mark.process, pytest.mark.endurance]

WAL_BOUND = 2 << 20  # storage.wal_max_bytes for the run
# A checkpoint can only restart the WAL between groups: one group (at most max_batch_events
# events) may land on top of a full WAL before the writer restarts it.
MAX_BATCH_EVENTS = 200
PRODUCERS = 4
REQUESTS_PER_PRODUCER = 600
EVENTS_PER_REQUEST = 20
EVENT_PAD = 1_500  # bytes of padding per event: ~72 MB of events in all, 36x the WAL bound
JOBS = 24
FAT_JOB = "fat"
FAT_EVENTS = 200
FAT_PAD = 60_000  # large events: what a stuck replay or page would pin in memory
STUCK_EVERY = 40  # a new set of stuck clients every this many churn rounds
RSS_GROWTH_BOUND = (
    160 << 20
)  # bytes over the RSS after warm-up; the caches alone stay under ~40 MiB
SHUTDOWN_TIMEOUT = 3.0
EXIT_MARGIN = 5.0  # interpreter teardown and a loaded CI machine; the contract is the timeout
WAIT = 30.0
RUN_TIMEOUT = 150.0
STUCK_RCVBUF = 4096


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


@dataclass
class Samples:
    """The -wal size and the server's RSS, sampled after every acknowledged request."""

    wal_path: Path
    pid: int
    wal_max: int = 0
    rss: list[int] = field(default_factory=list)

    def take(self) -> None:
        try:
            wal = self.wal_path.stat().st_size
        except FileNotFoundError:
            wal = 0
        self.wal_max = max(self.wal_max, wal)
        self.rss.append(rss_bytes(self.pid))


class StuckClient:
    """A raw socket that sends one request with a small receive window and never reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, server: ServerProcess, request: str) -> StuckClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUCK_RCVBUF)
        sock.setblocking(False)
        await loop.sock_connect(sock, (server.host, server.port))
        await loop.sock_sendall(sock, request.encode())
        return cls(sock)

    def close(self) -> None:
        self.sock.close()


def stuck_requests(host: str) -> list[str]:
    """One of each kind of response that can be large, on the job of large events."""
    head = f"Host: {host}\r\n"
    ws = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    return [
        f"GET /v1/jobs/{FAT_JOB}/stream?after=0 HTTP/1.1\r\n{head}{ws}\r\n",
        f"GET /v1/jobs/{FAT_JOB}/stream?after=0 HTTP/1.1\r\n{head}"
        "Accept: text/event-stream\r\n\r\n",
        f"GET /v1/jobs/{FAT_JOB}/events?after=0&limit=1000 HTTP/1.1\r\n{head}\r\n",
        f"GET /v1/jobs/{FAT_JOB}/events?after=0 HTTP/1.1\r\n{head}"
        "Accept: application/x-ndjson\r\n\r\n",
    ]


@dataclass
class Ledger:
    """What the producers were told: (job, seq) -> event id, and each job's acked end."""

    acks: dict[tuple[str, int], int] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    producers_done: asyncio.Event = field(default_factory=asyncio.Event)


async def produce(
    session: aiohttp.ClientSession, rng: random.Random, ledger: Ledger, samples: Samples
) -> None:
    pad = "p" * EVENT_PAD
    for n in range(REQUESTS_PER_PRODUCER):
        job = f"job-{rng.randrange(JOBS)}"
        events = [
            {"type": "log", "message": f"line {n}.{i}", "data": {"pad": pad}}
            for i in range(EVENTS_PER_REQUEST)
        ]
        async with session.post(f"/v1/jobs/{job}/events", json={"events": events}) as response:
            assert response.status == 201, await response.text()
            body = await response.json()
        for event in body["events"]:
            ledger.acks[(job, event["seq"])] = event["id"]
        ledger.last_seq[job] = max(ledger.last_seq.get(job, 0), body["last_seq"])
        samples.take()


async def read_some(session: aiohttp.ClientSession, rng: random.Random, ledger: Ledger) -> int:
    """Subscribe to a random job from a random offset, over WebSocket or SSE; check that what
    arrives continues the offset with no hole and no duplicate; drop after a random count."""
    job = f"job-{rng.randrange(JOBS)}"
    acked = ledger.last_seq.get(job, 1)
    after = rng.randrange(acked)
    # Only what is acknowledged is sure to come: a reader never waits past it.
    want = min(rng.randrange(1, 200), acked - after)
    seqs: list[int] = []
    path = f"/v1/jobs/{job}/stream?after={after}"
    if rng.random() < 0.5:
        async with session.ws_connect(path, max_msg_size=1 << 20) as ws:
            async for message in ws:
                frame = json.loads(message.data)
                if "seq" in frame:
                    seqs.append(frame["seq"])
                    if len(seqs) >= want:
                        break
    else:
        headers = {"Accept": "text/event-stream"}
        async with session.get(path, headers=headers) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data: ") and b'"seq"' in line:
                    seqs.append(json.loads(line[6:])["seq"])
                    if len(seqs) >= want:
                        break
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), (job, after, seqs[:10])
    return len(seqs)


async def churn(
    server: ServerProcess,
    session: aiohttp.ClientSession,
    rng: random.Random,
    ledger: Ledger,
    stuck: list[StuckClient],
) -> int:
    """Readers come and go until the producers finish; stuck clients pile up meanwhile."""
    received = 0
    rounds = 0
    while not ledger.producers_done.is_set():
        if rounds % STUCK_EVERY == 0:
            for request in stuck_requests(server.host):
                stuck.append(await StuckClient.open(server, request))
        received += await read_some(session, rng, ledger)
        rounds += 1
    return received


@pytest.mark.parametrize("seed", [1])
async def test_steady_load_keeps_wal_and_memory_bounded_and_sigterm_prompt(
    jobfeed_process: Launcher, seed: int
) -> None:
    """Under a minute of steady appends with subscribers churning and stuck clients piling up,
    the WAL never passes its bound (plus one commit group), RSS stays within a fixed growth,
    SIGTERM with stuck clients attached exits 0 within shutdown_timeout, and every
    acknowledged event is in the log after a restart."""
    server = await jobfeed_process.start(
        storage__wal_max_bytes=WAL_BOUND,
        storage__max_batch_events=MAX_BATCH_EVENTS,
        server__shutdown_timeout=SHUTDOWN_TIMEOUT,
        stream__send_timeout=2.0,
        stream__cache_bytes=16 << 20,
        log__access="false",
    )
    rng = random.Random(seed)
    ledger = Ledger()
    wal_path = server.db_path.with_name(server.db_path.name + "-wal")
    samples = Samples(wal_path, server.pid)
    stuck: list[StuckClient] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with asyncio.timeout(RUN_TIMEOUT):
        async with aiohttp.ClientSession(server.url, connector=connector) as session:
            for job in [FAT_JOB, *(f"job-{n}" for n in range(JOBS))]:
                async with session.post("/v1/jobs", json={"job_id": job}) as response:
                    assert response.status == 201, await response.text()
            fat = {"type": "log", "message": "large", "data": {"pad": "f" * FAT_PAD}}
            for _ in range(FAT_EVENTS // 10):
                async with session.post(
                    f"/v1/jobs/{FAT_JOB}/events", json={"events": [fat] * 10}
                ) as response:
                    assert response.status == 201, await response.text()
            samples.take()
            baseline_rss = samples.rss[-1]

            producers = [
                asyncio.create_task(
                    produce(session, random.Random(seed * 100 + p), ledger, samples)
                )
                for p in range(PRODUCERS)
            ]
            churner = asyncio.create_task(churn(server, session, rng, ledger, stuck))
            await asyncio.gather(*producers)
            ledger.producers_done.set()
            received = await churner
            assert received > 0

            # SIGTERM with the last set of stuck clients attached and not reading.
            for request in stuck_requests(server.host):
                stuck.append(await StuckClient.open(server, request))
            sent_at = time.monotonic()
            server.kill(15)
            try:
                returncode = await server.wait_async(SHUTDOWN_TIMEOUT + EXIT_MARGIN)
            finally:
                exit_seconds = time.monotonic() - sent_at
                for client in stuck:
                    client.close()

    assert returncode == 0, server.describe()
    assert exit_seconds <= SHUTDOWN_TIMEOUT + EXIT_MARGIN
    assert server.log.find("store_closed") is not None, server.describe()
    slack = MAX_BATCH_EVENTS * (EVENT_PAD + 400) * 2  # one group's pages, written twice at most
    assert samples.wal_max <= WAL_BOUND + slack, (samples.wal_max, WAL_BOUND + slack)
    growth = max(samples.rss) - baseline_rss
    assert growth <= RSS_GROWTH_BOUND, f"RSS grew {growth >> 20} MiB"

    restarted = await jobfeed_process.start(log__access="false")
    async with aiohttp.ClientSession(restarted.url) as session:
        for job in {job for job, _ in ledger.acks}:
            stored = {event["seq"]: event["id"] for event in await read_log(session, job, 1000)}
            acked = {seq: event_id for (j, seq), event_id in ledger.acks.items() if j == job}
            assert {seq: stored.get(seq) for seq in acked} == acked, job
