"""Memory per slow client: large responses and replays hold a bounded number of bytes.

Real server processes, real sockets, and the process's own resident memory (``VmRSS`` from
``/proc/<pid>/status``). The clients ask for something large (a page of 60 KB events, the
NDJSON export, a page of jobs with 60 KB metadata, a WebSocket replay) with a 4 KB receive
buffer and never read. The bounds are generous (tens of MiB per test) and far below what the
unbounded code took (each stuck client pinned its whole page: tens of MiB each).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.procs import Launcher, ServerProcess, launching, rss_bytes

pytestmark = pytest.mark.process

MiB = 1 << 20
BIG = "x" * 60_000  # one event's message: ~60 KB serialized, under limits.max_event_bytes
EVENTS = 600  # 36 MB of log: a page of page_size_max events, a replay page of page_events
SEND_TIMEOUT = 2.0  # seconds a stuck client is given before it is cut off
# How long a test waits for every stuck client to be cut off: the send timeout, plus a
# machine shared with other test runs.
CUTOFF_WAIT = 60.0


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as started:
        yield started


async def fill_job(server: ServerProcess, job_id: str, events: int = EVENTS) -> None:
    """A job whose log holds ``events`` log events of ~60 KB each (15 per request)."""
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": job_id}) as response:
            assert response.status == 201, await response.text()
        for start in range(0, events, 15):
            batch = [{"type": "log", "message": BIG} for _ in range(min(15, events - start))]
            async with session.post(f"/v1/jobs/{job_id}/events", json={"events": batch}) as r:
                assert r.status == 201, await r.text()


async def create_big_jobs(server: ServerProcess, count: int) -> None:
    """``count`` jobs whose snapshots carry ~60 KB of metadata each."""
    async with aiohttp.ClientSession(server.url) as session:

        async def create(index: int) -> None:
            body = {"job_id": f"big-{index}", "metadata": {"blob": BIG}}
            async with session.post("/v1/jobs", json=body) as response:
                assert response.status == 201, await response.text()

        for start in range(0, count, 20):
            await asyncio.gather(*(create(i) for i in range(start, min(count, start + 20))))


def stuck_client(port: int, request: bytes) -> socket.socket:
    """A connection that sends ``request`` and never reads (a 4 KB receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def stuck_websocket(port: int, path: str) -> socket.socket:
    """A WebSocket handshake, then nothing read again."""
    key = base64.b64encode(os.urandom(16)).decode()
    return stuck_client(
        port,
        (
            f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read what the server left in the socket; True once it is closed (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def peak_growth_until(
    server: ServerProcess, baseline: int, event: str, count: int, limit: int
) -> int:
    """Sample the server's RSS until ``count`` log records named ``event`` have appeared;
    the largest growth over ``baseline`` seen. Fails as soon as it passes ``limit`` (the
    unbounded code would go on to exhaust memory) or after ``CUTOFF_WAIT`` seconds."""
    peak = 0
    deadline = asyncio.get_running_loop().time() + CUTOFF_WAIT
    while True:
        peak = max(peak, rss_bytes(server.pid) - baseline)
        assert peak < limit, f"the server grew by {peak / MiB:.0f} MiB (bound {limit / MiB:.0f})"
        seen = [r for r in server.lines if r.get("event") == event]
        if len(seen) >= count:
            return peak
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"only {len(seen)} of {count} {event!r} after {CUTOFF_WAIT} s"
        # Not a synchronisation sleep: the sampling interval of the RSS measurement.
        await asyncio.sleep(0.05)


async def start_server(launcher: Launcher) -> ServerProcess:
    return await launcher.start(
        stream__send_timeout=SEND_TIMEOUT,
        stream__cache_bytes=0,  # every page comes from SQLite, as after a restart
        log__access="false",
    )


@pytest.mark.parametrize(
    "accept", ["application/json", "application/x-ndjson"], ids=["events_page", "ndjson_export"]
)
async def test_stuck_readers_of_event_pages_are_bounded_and_cut_off(
    launcher: Launcher, accept: str
) -> None:
    """Eight clients that ask for 36 MB of events and never read grow the server by less
    than 150 MiB together (each held its whole page before), and each is cut off after
    ``stream.send_timeout``, with the outcome logged."""
    server = await start_server(launcher)
    await fill_job(server, "big")
    baseline = rss_bytes(server.pid)
    request = (
        f"GET /v1/jobs/big/events?limit=1000 HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\n\r\n"
    ).encode()
    clients = [stuck_client(server.port, request) for _ in range(8)]
    try:
        peak = await peak_growth_until(server, baseline, "response_aborted", 8, 150 * MiB)
        assert all(closed_by_server(client, CUTOFF_WAIT) for client in clients)
    finally:
        for client in clients:
            client.close()
    aborted = [r for r in server.lines if r.get("event") == "response_aborted"]
    assert {r["outcome"] for r in aborted} == {"send_timeout"}, aborted
    assert peak < 150 * MiB


async def test_stuck_readers_of_job_lists_are_bounded_and_cut_off(launcher: Launcher) -> None:
    """Eight clients that ask for a page of 300 jobs with 60 KB of metadata each (18 MB)
    and never read grow the server by less than 150 MiB together and are cut off."""
    server = await start_server(launcher)
    await create_big_jobs(server, 300)
    baseline = rss_bytes(server.pid)
    request = b"GET /v1/jobs?limit=1000 HTTP/1.1\r\nHost: test\r\n\r\n"
    clients = [stuck_client(server.port, request) for _ in range(8)]
    try:
        await peak_growth_until(server, baseline, "response_aborted", 8, 150 * MiB)
        assert all(closed_by_server(client, CUTOFF_WAIT) for client in clients)
    finally:
        for client in clients:
            client.close()


async def test_stuck_replaying_websockets_hold_a_bounded_page(launcher: Launcher) -> None:
    """Ten WebSocket subscribers replaying 60 KB events from SQLite that never read grow the
    server by less than 100 MiB together (each pinned a 500-event page, ~30 MB, before):
    what one subscriber holds is bounded in bytes (``stream.page_bytes``), not in events."""
    server = await start_server(launcher)
    await fill_job(server, "big")
    baseline = rss_bytes(server.pid)
    clients = [stuck_websocket(server.port, "/v1/jobs/big/stream?after=0") for _ in range(10)]
    try:
        await peak_growth_until(server, baseline, "stream_closed", 10, 100 * MiB)
    finally:
        for client in clients:
            client.close()
    closed = [r for r in server.lines if r.get("event") == "stream_closed"]
    assert {r["outcome"] for r in closed} == {"send_timeout"}, closed
