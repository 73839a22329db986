"""W1i and W2i: single-event appends pipelined over the producer stream ``GET /v1/ingest``,
32 producers with 1,000 requests in flight each (``bench.profiles``: ``producers``,
``ingest_window``); W1i with durability full (beside Redis Streams, ``appendfsync always``,
pipelined XADDs), W2i with durability normal (beside NATS JetStream's default sync,
asynchronous publishes with 1,000 pending acks).

The producers are lean: one raw WebSocket each (``bench.wsclient.LeanWebSocket``), frames
built from bytes, answers matched to requests by order (the stream answers in the order
sent) without parsing them. Each answer sends the next request in the same step, and all the
requests one read produced go out in one write: a generator spends a few microseconds per
request, so that the server, not the generator, sets the figure.

What counts: the events acknowledged within the measured window, and the latency of those
acknowledgements (from the request's send), for jobfeed and both peers alike. With a thousand
requests in flight an acknowledgement takes ~0.5-3 s (Little's law: the window over the
rate), so counting only requests both sent and answered within a 4 s window, as the closed-loop
workloads do, would count a fraction of what each system did, the more so the slower it is.

The server runs with ``storage.max_pending_appends`` raised to hold every producer's window
(32 x 1,000 = 32,000 > the default 10,000): with the default, a third of the requests would
be answered ``overloaded`` at once; the phase's notes say so.
"""

from __future__ import annotations

import asyncio
import collections
import time
from array import array
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import server
from .fleet import Link
from .loadgen import READY_TIMEOUT, CpuWindow, append_body, create_jobs
from .profiles import Profile
from .stats import Phase
from .workloads import GATHER_SLACK, append_metrics, run_async, run_producers, split
from .wsclient import LeanPool, LeanWebSocket

_ACK = b'{"type":"ack"'
DRAIN_SECONDS = 10.0  # after the window: how long the answers still in flight may take


def w1i_name(profile: Profile) -> str:
    return (
        f"W1i pipelined append: {profile.producers} producers x {profile.ingest_window} "
        "in flight, 1 event/request, full"
    )


def w2i_name(profile: Profile) -> str:
    return (
        f"W2i pipelined append: {profile.producers} producers x {profile.ingest_window} "
        "in flight, 1 event/request, normal"
    )


def client_text_frame(payload: bytes) -> bytes:
    """A client's text frame, masked with a zero key (the RFC asks for a mask, not a secret)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    elif size < 65536:
        head = bytes((0x81, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


@dataclass(frozen=True)
class IngestSpec:
    base_url: str
    job_ids: tuple[str, ...]
    window: int
    warmup: float
    duration: float
    time_limit: float


class Pipeline:
    """One producer: ``window`` appends in flight on its own producer stream, one job."""

    def __init__(self, ws: LeanWebSocket, job_id: str, window: int) -> None:
        self.ws = ws
        self.prefix = b'{"type":"append","job_id":"%s","event":' % job_id.encode()
        self.window = window
        self.sent_at: deque[int] = deque()
        self.counter = 0
        self.out: list[bytes] = []
        self.w0 = self.w1 = 0
        self.latencies = array("q")
        self.events = 0
        self.answered = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.drained = asyncio.Event()
        ws.on_text = self.on_answer

    def frame(self) -> bytes:
        """The next request (its ref is its place in this connection's order)."""
        self.counter += 1
        body = append_body(1, self.counter)
        return client_text_frame(self.prefix + body + b',"ref":%d}' % self.counter)

    def start(self, w0: int, w1: int) -> None:
        self.w0, self.w1 = w0, w1
        now = time.perf_counter_ns()
        frames = [self.frame() for _ in range(self.window)]
        self.sent_at.extend([now] * len(frames))
        self._write(frames)

    def on_answer(self, payload: bytes) -> None:
        t1 = time.perf_counter_ns()
        t0 = self.sent_at.popleft()
        self.answered += 1
        if payload.startswith(_ACK):
            if self.w0 <= t1 <= self.w1:
                self.latencies.append(t1 - t0)
                self.events += 1
        else:
            code = payload.split(b'"code":"', 1)[-1].split(b'"', 1)[0]
            self.refused[code.decode(errors="replace")] += 1
        if t1 < self.w1:
            self.out.append(self.frame())
            self.sent_at.append(time.perf_counter_ns())
        elif not self.sent_at:
            self.drained.set()

    def flush(self) -> None:
        """After one read's answers: their next requests in one write."""
        if self.out:
            frames, self.out = self.out, []
            self._write(frames)

    def _write(self, frames: list[bytes]) -> None:
        transport = self.ws.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(frames)


class _FlushingSocket(LeanWebSocket):
    """Calls ``after_read`` once each read's frames are handled."""

    after_read: Pipeline | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.after_read is not None:
            self.after_read.flush()


async def append_pipelined(link: Link, spec: IngestSpec) -> None:
    loop = asyncio.get_running_loop()
    sockets: list[_FlushingSocket] = []
    async with LeanPool() as pool:
        for _job_id in spec.job_ids:
            # LeanPool makes LeanWebSockets; ours flush after each read.
            ws = await _connect(loop, pool, f"{spec.base_url}/v1/ingest")
            sockets.append(ws)
        pipelines = [
            Pipeline(ws, job_id, spec.window)
            for ws, job_id in zip(sockets, spec.job_ids, strict=True)
        ]
        for ws, pipeline in zip(sockets, pipelines, strict=True):
            ws.after_read = pipeline
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        w0 = time.perf_counter_ns() + int(spec.warmup * 1e9)
        w1 = w0 + int(spec.duration * 1e9)
        cpu = CpuWindow(w0, w1)
        for pipeline in pipelines:
            pipeline.start(w0, w1)
        await asyncio.sleep(max(0.0, (w1 - time.perf_counter_ns()) / 1e9))
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await asyncio.gather(*(p.drained.wait() for p in pipelines if p.sent_at))
        except TimeoutError:
            pass
        latencies = array("q")
        refused: collections.Counter[str] = collections.Counter()
        for pipeline in pipelines:
            latencies.extend(pipeline.latencies)
            refused.update(pipeline.refused)
        link.send(
            "result",
            events=sum(p.events for p in pipelines),
            answered=sum(p.answered for p in pipelines),
            unanswered=sum(len(p.sent_at) for p in pipelines),
            refused=dict(refused),
            latencies=latencies.tobytes(),
            cpu_s=await cpu.result(),
        )


async def _connect(loop: asyncio.AbstractEventLoop, pool: LeanPool, url: str) -> _FlushingSocket:
    """``LeanPool.connect`` with our protocol class."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    _, protocol = await loop.create_connection(
        lambda: _FlushingSocket(request), parts.hostname, parts.port
    )
    pool.sockets.append(protocol)
    await protocol.upgraded(30.0)
    return protocol


def pipelined_append(profile: Profile, name: str, durability: str) -> list[Phase]:
    job_ids = [f"producer-{i:02d}" for i in range(profile.producers)]
    # Every producer's window fits the writer's queue (see the module docstring).
    pending = max(10_000, profile.producers * profile.ingest_window)
    settings = {"storage__max_pending_appends": str(pending)}
    with server.jobfeed(durability, **settings) as process:
        run_async(create_jobs(process.base_url, job_ids, ""))
        specs = [
            IngestSpec(
                process.base_url,
                share,
                profile.ingest_window,
                profile.warmup,
                profile.duration,
                time_limit=profile.warmup + profile.duration + DRAIN_SECONDS + GATHER_SLACK,
            )
            for share in split(job_ids, profile.generator_processes)
        ]
        server_cpu, results = run_producers(process, profile, append_pipelined, specs)
    metrics = append_metrics(results, profile)
    notes = [f"{name}: storage.max_pending_appends = {pending} (every window fits the queue)"]
    refused: collections.Counter[str] = collections.Counter()
    for result in results:
        refused.update(result["refused"])
    if refused:
        notes.append(f"{name}: answers other than ack: {dict(refused)}")
    unanswered = sum(r["unanswered"] for r in results)
    if unanswered:
        notes.append(
            f"{name}: {unanswered} requests unanswered {DRAIN_SECONDS:g} s after the window"
        )
    return [Phase(name, metrics, server_cpu, sum(r["cpu_s"] for r in results), notes)]


def w1i(profile: Profile) -> list[Phase]:
    return pipelined_append(profile, w1i_name(profile), "full")


def w2i(profile: Profile) -> list[Phase]:
    return pipelined_append(profile, w2i_name(profile), "normal")
