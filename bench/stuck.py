"""Stuck subscribers: server memory and readers' latency with and without them.

Runs a real ``jobfeed serve`` (``bench.server.jobfeed``) with a short ``stream.send_timeout``,
puts ``--subscribers`` WebSocket subscribers on one job, of which ``--stuck`` complete the
handshake by hand and never read again, and appends ``--events`` events of ``--event-bytes``
each at ``--rate`` per second. It prints the server's RSS (before, with every subscriber
attached, peak, after) and the readers' append-to-receipt latency; then the same run without
the stuck subscribers, for comparison.

    .venv/bin/python -m bench.stuck [--subscribers 1000 --stuck 100 ...]

The readers live in this one process, so their latency includes this process's own queueing;
compare the two runs with each other, not with bench/results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from .server import HOST, ServerProcess, jobfeed

MIB = 1024 * 1024


@dataclass
class Figures:
    stuck: int
    rss_before: int = 0
    rss_attached: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cut_off: int = 0
    complete_readers: int = 0
    readers: int = 0
    health_ms: list[float] = field(default_factory=list)


async def stuck_socket(port: int, path: str) -> socket.socket:
    """A WebSocket handshake by hand, then nothing is ever read again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    return sock


async def read_all(ws: aiohttp.ClientWebSocketResponse, latencies: list[float]) -> list[int]:
    seqs = []
    async for message in ws:
        received = time.time_ns()
        frame = orjson.loads(message.data)
        if "seq" in frame:
            seqs.append(frame["seq"])
            sent = frame.get("data", {}).get("t")
            if sent is not None:
                latencies.append((received - sent) / 1e6)
    return seqs


def count_cut_off(server: ServerProcess) -> int:
    count = 0
    for line in server.log_path.read_bytes().splitlines():
        if b"send_timeout" in line and b"stream_closed" in line:
            count += 1
    return count


async def one_run(args: argparse.Namespace, stuck: int) -> Figures:
    figures = Figures(stuck=stuck)
    settings = {"STREAM__SEND_TIMEOUT": str(args.send_timeout), "STREAM__MAX_SUBSCRIBERS": "20000"}
    with jobfeed("normal", **settings) as server:
        job = "stuck-bench"
        path = f"/v1/jobs/{job}/stream"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(server.base_url, connector=connector) as session:
            async with session.post("/v1/jobs", json={"job_id": job}) as response:
                assert response.status == 201
            figures.rss_before = server.rss_bytes()
            stuck_sockets = [await stuck_socket(server.port, path) for _ in range(stuck)]
            readers = args.subscribers - stuck
            figures.readers = readers
            sockets = [await session.ws_connect(path, max_msg_size=1 << 20) for _ in range(readers)]
            latencies: list[float] = []
            tasks = [asyncio.create_task(read_all(ws, latencies)) for ws in sockets]
            figures.rss_attached = server.rss_bytes()
            pad = "x" * args.event_bytes
            interval = 1.0 / args.rate
            started = time.monotonic()
            for n in range(args.events):
                # Paced on the clock so that latency is measured under a steady load.
                delay = started + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                event = {"type": "progress", "current": n, "data": {"t": time.time_ns(), "p": pad}}
                async with session.post(f"/v1/jobs/{job}/events", json=event) as response:
                    assert response.status == 201, await response.text()
                if n % 20 == 0:
                    t0 = time.perf_counter()
                    async with session.get("/healthz") as response:
                        assert response.status == 200
                    figures.health_ms.append((time.perf_counter() - t0) * 1000)
            async with session.post(f"/v1/jobs/{job}/events", json={"type": "completed"}) as r:
                assert r.status == 201
            results = await asyncio.wait_for(asyncio.gather(*tasks), 300)
            full = list(range(1, args.events + 3))
            figures.complete_readers = sum(seqs == full for seqs in results)
            figures.latencies_ms = latencies
            figures.rss_peak = server.peak_rss_bytes()
            for _ in range(int((args.send_timeout + 5) * 10)):  # the server's log is a file
                if count_cut_off(server) >= stuck:
                    break
                await asyncio.sleep(0.1)
            figures.cut_off = count_cut_off(server)
            figures.rss_after = server.rss_bytes()
            for sock in stuck_sockets:
                sock.close()
    return figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(figures: Figures) -> None:
    lat = figures.latencies_ms
    print(f"\n## {figures.readers} readers + {figures.stuck} stuck")
    print(
        f"server RSS: before {figures.rss_before / MIB:.1f} MiB, "
        f"attached {figures.rss_attached / MIB:.1f} MiB, peak {figures.rss_peak / MIB:.1f} MiB, "
        f"after {figures.rss_after / MIB:.1f} MiB "
        f"(growth at peak {(figures.rss_peak - figures.rss_before) / MIB:.1f} MiB)"
    )
    print(
        f"readers with every event in order: {figures.complete_readers}/{figures.readers}; "
        f"stuck cut off with send_timeout: {figures.cut_off}/{figures.stuck}"
    )
    print(
        f"reader latency ms: p50 {percentile(lat, 0.5):.1f}, p90 {percentile(lat, 0.9):.1f}, "
        f"p99 {percentile(lat, 0.99):.1f}, max {max(lat, default=float('nan')):.1f} "
        f"({len(lat)} deliveries)"
    )
    health = figures.health_ms
    print(
        f"/healthz during the run ms: median {statistics.median(health):.1f}, max {max(health):.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.stuck", description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--stuck", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--event-bytes", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=20.0, help="appends per second")
    parser.add_argument("--send-timeout", type=float, default=2.0)
    args = parser.parse_args()
    for stuck in (args.stuck, 0):
        report(asyncio.run(one_run(args, stuck)))


if __name__ == "__main__":
    main()
