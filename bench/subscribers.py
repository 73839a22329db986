"""Subscriber workers: WebSocket subscribers (live, replaying, idle, reconnecting; on the lean
client of ``bench.wsclient``) and SSE /
NDJSON readers, each run in its own process (``bench.fleet``).

A subscriber takes its receipt time the moment a frame is handed to it, reads the producer's
send time from ``data.t``, and checks that seqs arrive as ``after+1, after+2, ...`` (no hole,
no duplicate). Per-process CPU time is reported with each result.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from .fleet import Link
from .loadgen import READY_TIMEOUT, REQUEST_TIMEOUT, CpuWindow, bounded_gather
from .wsclient import LeanPool, LeanWebSocket


@dataclass
class Recording:
    """What the subscribers of one process record over a wall-clock window: deliveries that
    arrived in it, and the latency of every event sent in it."""

    start_ns: float = math.inf  # wall clock (time_ns)
    end_ns: float = math.inf
    latencies: array[int] = field(default_factory=lambda: array("q"))
    deliveries: int = 0

    def open(self, warmup: float, duration: float) -> CpuWindow:
        """Open the window ``warmup`` s from now for ``duration`` s; this process's CPU
        over the same window."""
        w0 = time.perf_counter_ns() + int(warmup * 1e9)
        self.start_ns = time.time_ns() + warmup * 1e9
        self.end_ns = self.start_ns + duration * 1e9
        return CpuWindow(w0, w0 + int(duration * 1e9))

    def count(self, now: int, sent: int | None, deliveries: int = 1) -> None:
        """``deliveries`` received at ``now``; the latency of one sent at ``sent``, counted
        by send time so that events sent late in the window and slow to arrive are not left
        out."""
        if self.start_ns <= now < self.end_ns:
            self.deliveries += deliveries
        if sent is not None and self.start_ns <= sent < self.end_ns:
            self.latencies.append(now - sent)


class SeqCheck:
    """A stream's seqs checked as they arrive: ``after+1, after+2, ...``, no hole, no
    duplicate. Shared by jobfeed's subscribers and the peers' readers."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.last = after
        self.count = 0
        self.holes = 0
        self.duplicates = 0
        self.caught_up_ns = 0

    def see(self, seq: int) -> None:
        if seq == self.last + 1:
            self.last = seq
        elif seq > self.last:
            self.holes += seq - self.last - 1
            self.last = seq
        else:
            self.duplicates += 1
        self.count += 1

    def report(self) -> dict[str, Any]:
        return {
            "after": self.after,
            "last": self.last,
            "count": self.count,
            "holes": self.holes,
            "duplicates": self.duplicates,
            "caught_up_ns": self.caught_up_ns,
        }


class Subscriber(SeqCheck):
    """One WebSocket subscription: ``after`` given, seq order checked frame by frame."""

    def __init__(self, base_url: str, job_id: str, after: int, authorization: str = "") -> None:
        super().__init__(after)
        self.url = f"{base_url}/v1/jobs/{job_id}/stream?after={after}"
        self.authorization = authorization  # a bearer token, with authentication on
        self.hello_last_seq = -1
        self.caught_up = asyncio.Event()
        self.close_code: int | None = None
        self.ws: LeanWebSocket | None = None

    async def connect(self, pool: LeanPool) -> None:
        self.ws = await pool.connect(self.url, authorization=self.authorization)
        hello = await self.ws.next_text(timeout=30)
        if hello is None:
            raise ConnectionError(f"no hello from {self.url}: closed {self.ws.close_code}")
        frame = orjson.loads(hello)
        if frame.get("type") != "hello":
            raise ConnectionError(f"first frame from {self.url} is {frame!r}")
        self.hello_last_seq = frame["last_seq"]
        if self.hello_last_seq <= self.after:
            self.caught_up_ns = time.time_ns()
            self.caught_up.set()

    async def read(self, recording: Recording | None = None, stop_seq: int | None = None) -> None:
        """Take frames until the stream closes or ``stop_seq`` has arrived; each is handled
        in the protocol's own ``data_received`` step (no hop through a queue)."""
        ws = self.ws
        assert ws is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        loads, time_ns = orjson.loads, time.time_ns

        def on_text(payload: bytes) -> None:
            if done.done():
                return
            now = time_ns()
            frame = loads(payload)
            seq = frame.get("seq")
            if seq is None:
                return  # heartbeat
            self.see(seq)
            if not self.caught_up_ns and seq >= self.hello_last_seq:
                self.caught_up_ns = now
                self.caught_up.set()
            if recording is not None:
                data = frame.get("data")
                recording.count(now, None if data is None else data["t"])
            if stop_seq is not None and seq >= stop_seq:
                done.set_result(None)

        while ws.pending:
            on_text(ws.pending.popleft())
        ws.on_text = on_text
        try:
            await asyncio.wait([done, ws.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ws.on_text = _discard
        if ws.closed.done():
            self.close_code = ws.close_code

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "close_code": self.close_code,
            "hello_last_seq": self.hello_last_seq,
        }


def _discard(payload: bytes) -> None:
    """Frames after a reader stopped (cancelled, or past its stop_seq) are not counted."""


def ws_session() -> LeanPool:
    """The subscribers' connections (one socket each); closing it drops them all."""
    return LeanPool()


@dataclass(frozen=True)
class SubscribeSpec:
    base_url: str
    job_id: str
    afters: tuple[int, ...]  # one subscriber per entry
    connect_parallel: int
    warmup: float
    duration: float
    time_limit: float
    resume_afters: tuple[int, ...] = ()  # subscribe_storm: the offsets to resume from
    authorization: str = ""  # a bearer token for every subscriber (authentication on)


async def subscribe_window(link: Link, spec: SubscribeSpec) -> None:
    """Live subscribers: connect, then on ``go`` record deliveries and latencies over the
    window [go + warmup, go + warmup + duration]; close on ``stop``; report."""
    subscribers = [Subscriber(spec.base_url, spec.job_id, after) for after in spec.afters]
    await record_live(link, subscribers, spec.connect_parallel, spec)


class LiveWindow(Protocol):
    @property
    def warmup(self) -> float: ...
    @property
    def duration(self) -> float: ...
    @property
    def time_limit(self) -> float: ...


async def record_live(
    link: Link, subscribers: Sequence[Subscriber], connect_parallel: int, window: LiveWindow
) -> None:
    """The body of a live-subscribers worker, whatever jobs they follow."""
    async with ws_session() as session:
        await bounded_gather(
            [functools.partial(s.connect, session) for s in subscribers], connect_parallel
        )
        recording = Recording()
        readers = [asyncio.create_task(s.read(recording)) for s in subscribers]
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        cpu = recording.open(window.warmup, window.duration)
        await link.expect("stop", window.time_limit)
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


async def subscribe_catch_up(link: Link, spec: SubscribeSpec) -> None:
    """Replays: on ``go`` connect every subscriber and read up to the hello's ``last_seq``;
    the clock runs from ``go`` (handshake included) to the last frame, or stops at
    ``spec.duration`` (the cap) with each subscriber wherever it got to."""
    async with ws_session() as session:
        subscribers = [Subscriber(spec.base_url, spec.job_id, after) for after in spec.afters]
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        go_ns, cpu0 = time.time_ns(), time.process_time()

        async def replay(subscriber: Subscriber) -> None:
            await subscriber.connect(session)
            await subscriber.read(stop_seq=subscriber.hello_last_seq)
            assert subscriber.ws is not None
            await subscriber.ws.close()

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(spec.duration):
                await bounded_gather(
                    [functools.partial(replay, s) for s in subscribers], spec.connect_parallel
                )
        link.send(
            "result",
            go_ns=go_ns,
            end_ns=time.time_ns(),
            subscribers=[s.report() for s in subscribers],
            cpu_s=time.process_time() - cpu0,
        )


async def subscribe_idle(link: Link, spec: SubscribeSpec) -> None:
    """Idle subscribers: connect all, report ``ready``; on ``go`` wait for the one event the
    coordinator appends and report each subscriber's delay; close on ``stop``."""
    async with ws_session() as session:
        subscribers = [
            Subscriber(spec.base_url, spec.job_id, after, spec.authorization)
            for after in spec.afters
        ]
        started, cpu0 = time.perf_counter(), time.process_time()
        await bounded_gather(
            [functools.partial(s.connect, session) for s in subscribers], spec.connect_parallel
        )
        connect_s = time.perf_counter() - started
        recording = Recording(start_ns=0)
        readers = [
            asyncio.create_task(s.read(recording, stop_seq=s.hello_last_seq + 1))
            for s in subscribers
        ]
        link.send("ready", connect_s=connect_s, cpu_s=time.process_time() - cpu0)
        await link.expect("go", READY_TIMEOUT)
        cpu0 = time.process_time()
        done, _ = await asyncio.wait(readers, timeout=spec.duration)
        cpu_s = time.process_time() - cpu0
        link.send(
            "result",
            received=recording.deliveries,
            latencies=recording.latencies.tobytes(),
            missing=len(readers) - len(done),
            cpu_s=cpu_s,
        )
        await link.expect("stop", READY_TIMEOUT)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def subscribe_storm(link: Link, spec: SubscribeSpec) -> None:
    """Reconnect storm: live subscribers all drop at once on ``drop`` (their connections cut,
    no close frame), reconnect from ``resume_afters``, report ``live`` when every one has
    caught up, then read until the job's terminal event ends each stream."""
    first = ws_session()
    subscribers = [Subscriber(spec.base_url, spec.job_id, after) for after in spec.afters]
    await bounded_gather(
        [functools.partial(s.connect, first) for s in subscribers], spec.connect_parallel
    )
    readers = [asyncio.create_task(s.read()) for s in subscribers]
    link.send("ready")
    drop = await link.expect("drop", READY_TIMEOUT)
    cpu0 = time.process_time()
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    before = [s.last for s in subscribers]
    await first.close()  # closes every transport: the server sees the peers vanish
    drop_ns = drop["drop_ns"]
    async with ws_session() as session:
        resumed = [Subscriber(spec.base_url, spec.job_id, after) for after in spec.resume_afters]
        await bounded_gather(
            [functools.partial(s.connect, session) for s in resumed], spec.connect_parallel
        )
        readers = [asyncio.create_task(s.read()) for s in resumed]

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(spec.duration):
                await asyncio.gather(*(s.caught_up.wait() for s in resumed))
        link.send(
            "live",
            catch_up_ns=[s.caught_up_ns - drop_ns if s.caught_up_ns else -1 for s in resumed],
            cpu_s=time.process_time() - cpu0,
        )
        done, _ = await asyncio.wait(readers, timeout=spec.duration)
        link.send(
            "result",
            before_drop=before,
            subscribers=[s.report() for s in resumed],
            unfinished=len(readers) - len(done),
        )
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


# -- HTTP streams (SSE, NDJSON) ----------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    url: str
    accept: str
    events: int  # read until this many events have arrived (SSE) or the body ends (NDJSON)
    time_limit: float


async def read_http_stream(link: Link, spec: StreamSpec) -> None:
    """One SSE or NDJSON reader: events counted by their separators as the bytes arrive."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        link.send("ready")
        await link.expect("go", READY_TIMEOUT)
        started, cpu0 = time.perf_counter(), time.process_time()
        sse = spec.accept == "text/event-stream"
        marker = b"\nid: " if sse else b"\n"
        count, tail, recent = 0, b"", b""
        async with session.get(spec.url, headers={"Accept": spec.accept}) as response:
            if response.status != 200:
                raise RuntimeError(f"{spec.url}: {response.status} {await response.text()}")
            async for chunk in response.content.iter_any():
                # A marker may straddle two chunks: count in the last bytes + this chunk.
                joined = tail + chunk
                count += joined.count(marker)
                tail = joined[-(len(marker) - 1) :] if len(marker) > 1 else b""
                recent = recent[-4096:] + chunk
                # An SSE stream stays open: stop once the last event is complete.
                if sse and count >= spec.events and chunk.endswith(b"\n\n"):
                    break
        elapsed = time.perf_counter() - started
        last_seq = _last_seq(recent, sse)
        link.send(
            "result",
            events=count,
            seconds=elapsed,
            last_seq=last_seq,
            cpu_s=time.process_time() - cpu0,
        )


def _last_seq(recent: bytes, sse: bool) -> int:
    """The seq of the last event in the stream's last bytes."""
    if sse:
        start = recent.rfind(b"\nid: ") + 5
        return int(recent[start : recent.index(b"\n", start)])
    line = recent.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    seq: int = orjson.loads(line)["seq"]
    return seq
