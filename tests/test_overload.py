"""Overload limits and stuck subscribers, on real sockets (docs/operations.md, "Limits").

Each limit refuses past its bound in the protocol's error shape and serves again once load
drops: ``server.max_connections`` (503 and close), ``stream.max_subscribers_per_job`` (WS
error frame + 1013, SSE 503), ``limits.rate_per_client`` (429). A WebSocket subscriber that
stops reading is cut off with 1013 after ``stream.send_timeout`` while the readers beside it
get every event in order and the server keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.limits import JobStreamSlots, RateLimiter
from server.tenancy import JobKey
from tests.conftest import ClientFactory, ConfigFactory, create_job
from tests.procs import Launcher, ServerProcess, launching
from tests.streams import StuckSubscriber


def key(job_id: str) -> JobKey:
    """The job ``job_id`` of the tenant every test here writes to."""
    return JobKey("default", job_id)


WAIT = 10.0  # bound on any one wait; a healthy server answers in milliseconds
STUCK_WAIT = 60.0  # bound on the whole stuck-subscriber scenario (CI machines are slow)


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    """Real server children on ``tmp_path``; killed and reaped when the test ends."""
    with launching(tmp_path) as launcher:
        yield launcher


def assert_error_shape(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["details"] == []


# --- raw HTTP/1.1 over one TCP connection --------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class RawConnection:
    """One keep-alive TCP connection that sends GETs by hand, so the test decides exactly
    how many connections are open (a client session pools and reuses them)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def get(self, path: str) -> RawResponse:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: jobfeed\r\n\r\n".encode())
        return await self._response()

    async def post(self, path: str, body: dict[str, Any]) -> RawResponse:
        data = json.dumps(body).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: jobfeed\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        return await self._response()

    async def _response(self) -> RawResponse:
        async with asyncio.timeout(WAIT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return RawResponse(status, headers, body)

    async def at_eof(self) -> bool:
        """True once the server has closed the connection (reads what is left)."""
        async with asyncio.timeout(WAIT):
            return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def admitted_connection(server: ServerProcess) -> RawConnection:
    """A connection the server admitted (answered 200). Connections closed just before (the
    harness's readiness probe) may still be counted for a moment: retry until admitted."""
    async with asyncio.timeout(WAIT):
        while True:
            connection = await RawConnection.open(server.host, server.port)
            if (await connection.get("/healthz")).status == 200:
                return connection
            await connection.close()


@pytest.mark.process
async def test_connections_past_the_cap_get_503_then_recover(
    jobfeed_process: Launcher,
) -> None:
    """With server.max_connections open, a new connection's request is answered 503
    overloaded with Retry-After and the connection is closed; once one of the open ones
    closes, a new connection is served again."""
    server = await jobfeed_process.start(server__max_connections=3)
    held = [await admitted_connection(server) for _ in range(3)]

    extra = await RawConnection.open(server.host, server.port)
    refused = await extra.get("/v1/jobs")
    assert refused.status == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"].startswith("application/json")
    assert_error_shape(json.loads(refused.body), "overloaded")
    assert await extra.at_eof()  # closed, not kept alive
    await extra.close()
    # The admitted connections are still served while others are refused.
    assert (await held[0].get("/healthz")).status == 200

    await held.pop().close()
    again = await admitted_connection(server)
    assert (await again.get("/v1/jobs")).status == 200
    for connection in [*held, again]:
        await connection.close()


# --- per-job stream cap ----------------------------------------------------------------------


def stream_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/stream"


async def open_ws(client: TestClient[Any, Any], job_id: str) -> aiohttp.ClientWebSocketResponse:
    return await client.ws_connect(stream_path(job_id))


async def first_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        message = await ws.receive()
    assert message.type == WSMsgType.TEXT, message
    frame: dict[str, Any] = json.loads(message.data)
    return frame


async def test_streams_past_the_per_job_cap_are_refused_then_recover(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """With stream.max_subscribers_per_job streams open on a job, another WebSocket gets an
    overloaded error frame and 1013, another SSE request (an EventSource's) 200 with a retry
    hint and one `event: error` record, so that a browser retries (feed.md); other jobs are
    unaffected; when one stream closes, the job takes a new subscriber again."""
    client = await make_client(make_config(stream__max_subscribers_per_job=2))
    await create_job(client, job_id="hot")
    await create_job(client, job_id="cold")
    held = [await open_ws(client, "hot") for _ in range(2)]
    for ws in held:
        assert (await first_frame(ws))["type"] == "hello"

    refused = await open_ws(client, "hot")
    error = await first_frame(refused)
    assert error["type"] == "error"
    assert error["code"] == "overloaded"
    async with asyncio.timeout(WAIT):
        assert (await refused.receive()).type == WSMsgType.CLOSE
    assert refused.close_code == 1013

    response = await client.get(stream_path("hot"), headers={"Accept": "text/event-stream"})
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    lines = (await response.text()).splitlines()
    assert int(lines[0].removeprefix("retry: ")) >= 1000  # at least its Retry-After
    assert lines[1:3] == ["", "event: error"]
    error = json.loads(lines[3].removeprefix("data: "))
    assert error["type"] == "error"
    assert error["code"] == "overloaded"

    other = await open_ws(client, "cold")
    assert (await first_frame(other))["type"] == "hello"
    await other.close()

    await held.pop().close()
    async with asyncio.timeout(WAIT):
        while True:  # the server releases the slot when its handler has finished
            ws = await open_ws(client, "hot")
            frame = await first_frame(ws)
            if frame["type"] == "hello":
                break
            await ws.close()
    await ws.close()
    for ws in held:
        await ws.close()


def test_job_stream_slots_forget_jobs_without_streams() -> None:
    """The per-job table holds only jobs with an open stream: memory follows open streams."""
    slots = JobStreamSlots(per_job=1)
    assert slots.acquire(key("a"))
    assert not slots.acquire(key("a"))
    slots.release(key("a"))
    assert slots.acquire(key("a"))
    slots.release(key("a"))
    assert slots._open == {}


# --- per-client rate -------------------------------------------------------------------------


async def test_requests_past_the_client_rate_get_429_then_recover(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Past limits.rate_per_client's burst, a client gets 429 rate_limited with Retry-After;
    health probes are not throttled; once tokens refill it is served again."""
    client = await make_client(make_config(limits__rate_per_client=20, limits__rate_burst=3))
    statuses = [(await client.get("/v1/jobs")).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    response = await client.get("/v1/jobs")
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert_error_shape(await response.json(), "rate_limited")
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    async with asyncio.timeout(WAIT):
        # Tokens refill at 20 per second; each refused request is one cheap round trip.
        while (await client.get("/v1/jobs")).status == 429:
            pass


async def test_rate_limit_is_off_by_default(client: TestClient[Any, Any]) -> None:
    """limits.rate_per_client = 0 (the default): no client is ever throttled."""
    statuses = {(await client.get("/v1/jobs")).status for _ in range(300)}
    assert statuses == {200}


def test_rate_limiter_refills_and_waits_honestly() -> None:
    """A bucket holds ``burst`` tokens, refills at ``rate``, and says how long to wait."""
    limiter = RateLimiter(rate=2.0, burst=2, max_clients=10)
    assert limiter.take("a", now=0.0) == 0.0
    assert limiter.take("a", now=0.0) == 0.0
    assert limiter.take("a", now=0.0) == pytest.approx(0.5)
    assert limiter.take("a", now=0.25) == pytest.approx(0.25)
    assert limiter.take("a", now=0.5) == 0.0
    assert limiter.take("b", now=0.5) == 0.0  # each address has its own bucket


def test_rate_limiter_table_is_bounded_lru() -> None:
    """However many addresses come, the table keeps at most ``max_clients``, forgetting the
    least recently seen first."""
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=3)
    for n in range(1000):
        limiter.take(f"10.0.{n // 256}.{n % 256}", now=0.0)
    assert len(limiter) == 3
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=2)
    limiter.take("a", now=0.0)
    limiter.take("b", now=0.0)
    assert limiter.take("a", now=0.0) > 0  # "a" is now the most recent
    limiter.take("c", now=0.0)  # evicts "b"
    assert limiter.take("a", now=0.0) > 0  # still remembered
    assert limiter.take("b", now=0.0) == 0.0  # forgotten: a fresh bucket


# --- stuck subscribers -----------------------------------------------------------------------

SUBSCRIBERS = 300
STUCK = SUBSCRIBERS // 10
EVENTS = 120
EVENT_BYTES = 12_000  # padding per event; far more in total than a stuck socket can buffer


@dataclass
class Reader:
    """A WebSocket subscriber that reads everything; records seqs and how it ended."""

    seqs: list[int] = field(default_factory=list)
    close_code: int | None = None

    async def run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            frame = json.loads(message.data)
            if "seq" in frame:
                self.seqs.append(frame["seq"])
        self.close_code = ws.close_code


def count_records(server: ServerProcess, **match: Any) -> int:
    return sum(all(record.get(k) == v for k, v in match.items()) for record in server.log.records)


def wait_for_records(server: ServerProcess, count: int, timeout: float, **match: Any) -> int:
    """Block until ``count`` log records match (or the timeout); the number that do."""
    condition: threading.Condition = server.log._changed
    deadline = time.monotonic() + timeout
    with condition:
        while (found := count_records(server, **match)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or server.log.ended:
                return found
            condition.wait(remaining)
    return found


@pytest.mark.process
async def test_stuck_subscribers_are_cut_off_while_readers_get_everything(
    jobfeed_process: Launcher,
) -> None:
    """Of 300 WebSocket subscribers on one job, 30 never read: the 270 readers receive every
    event in order and end with 1000; the stuck ones are closed with 1013 after
    stream.send_timeout (what they were sent is an in-order prefix of the log); and the
    server keeps answering requests and new subscribers meanwhile."""
    server = await jobfeed_process.start(stream__send_timeout=0.5, log__access="false")
    job = "crowded"
    padding = "x" * EVENT_BYTES
    # limit=0: one pooled connection per subscriber (the default pool stops at 100).
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(server.url, connector=connector) as session:
        async with session.post("/v1/jobs", json={"job_id": job}) as response:
            assert response.status == 201
        stuck = [
            await StuckSubscriber.connect(server.host, server.port, stream_path(job))
            for _ in range(STUCK)
        ]
        readers = [Reader() for _ in range(SUBSCRIBERS - STUCK)]
        sockets = [
            await session.ws_connect(stream_path(job), max_msg_size=1 << 20) for _ in readers
        ]
        tasks = [asyncio.create_task(r.run(ws)) for r, ws in zip(readers, sockets, strict=True)]

        async with asyncio.timeout(STUCK_WAIT):
            for n in range(EVENTS):
                event = {"type": "progress", "current": n, "data": {"pad": padding}}
                async with session.post(f"/v1/jobs/{job}/events", json=event) as response:
                    assert response.status == 201, await response.text()
            # The stuck ones are cut off on the server's own clock; meanwhile it answers.
            cut_off = await asyncio.to_thread(
                wait_for_records, server, STUCK, STUCK_WAIT, outcome="send_timeout"
            )
            assert cut_off == STUCK, server.describe()
            async with session.get(f"/v1/jobs/{job}") as response:
                assert response.status == 200
                assert (await response.json())["last_seq"] == EVENTS + 1
            async with session.post(f"/v1/jobs/{job}/events", json={"type": "completed"}) as r:
                assert r.status == 201
            await asyncio.gather(*tasks)

            drained = await asyncio.gather(*(asyncio.to_thread(s.drain) for s in stuck))
            late = await session.ws_connect(stream_path(job), max_msg_size=1 << 20)
            latecomer = Reader()
            await latecomer.run(late)

    full_log = list(range(1, EVENTS + 3))
    for reader in readers:
        assert reader.seqs == full_log
        assert reader.close_code == 1000
    assert latecomer.seqs == full_log  # a new subscriber after the storm gets it all
    closed = [r for r in server.log.records if r.get("event") == "stream_closed"]
    timed_out = [r for r in closed if r.get("outcome") == "send_timeout"]
    assert len(timed_out) == STUCK
    assert {r["close_code"] for r in timed_out} == {1013}
    for frames, close_code in drained:
        seqs = [frame["seq"] for frame in frames if "seq" in frame]
        assert seqs == full_log[: len(seqs)]  # in order, no hole, and not the whole log
        assert len(seqs) < EVENTS
        # The close frame (1013) is queued behind the backlog the peer never read, and the
        # connection is dropped a second later: a peer that is not reading never sees it.
        assert close_code is None


# --- slow clients ------------------------------------------------------------------------------


@pytest.mark.process
async def test_a_connection_trickling_headers_is_closed(jobfeed_process: Launcher) -> None:
    """A new connection whose first request's headers do not arrive within
    server.header_timeout is closed (a slow-header attack holds no slot for long), while a
    normal connection opened at the same time is served."""
    server = await jobfeed_process.start(server__header_timeout=0.5)
    slow = await RawConnection.open(server.host, server.port)
    slow.writer.write(b"GET /v1/jobs HTTP/1.1\r\nHost: jobfeed\r\n")  # never finished
    normal = await RawConnection.open(server.host, server.port)
    assert (await normal.get("/healthz")).status == 200
    assert await slow.at_eof()
    await slow.close()
    await normal.close()


@pytest.mark.process
async def test_a_kept_alive_connection_trickling_its_next_headers_is_closed(
    jobfeed_process: Launcher,
) -> None:
    """server.header_timeout applies to every request on a connection, not only its first:
    a connection that completes one request and then trickles the next one's headers byte
    by byte is closed."""
    server = await jobfeed_process.start(server__header_timeout=0.5, log__access="false")
    slow = await RawConnection.open(server.host, server.port)
    assert (await slow.get("/healthz")).status == 200

    async def trickle() -> None:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: jobfeed\r\nX-Slow: " + b"a" * 10_000:
            slow.writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the stimulus: one byte every 50 ms, well under any deadline

    trickling = asyncio.create_task(trickle())
    try:
        assert await slow.at_eof()  # within WAIT (20 x header_timeout), not at keep-alive's end
    finally:
        trickling.cancel()
    record = await asyncio.to_thread(server.log.wait_for, "connection_dropped", WAIT)
    assert record is not None, server.describe()
    assert record["reason"] == "header_timeout", record
    slow.writer.transport.abort()


@pytest.mark.process
async def test_a_closed_idle_sse_client_frees_its_slot_at_once(
    jobfeed_process: Launcher,
) -> None:
    """An idle SSE subscriber that closes its connection releases its stream slot as soon as
    the server sees the connection close, not at the next heartbeat: with one slot per job
    and heartbeats a minute apart, a new subscriber is admitted within seconds."""
    server = await jobfeed_process.start(
        stream__max_subscribers_per_job=1, stream__heartbeat_seconds=60, log__access="false"
    )
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "ghost"}) as response:
            assert response.status == 201
        first = await StuckSubscriber.connect(
            server.host, server.port, stream_path("ghost"), transport="sse"
        )
        first.sock.close()
        closed = await asyncio.to_thread(
            wait_for_records, server, 1, WAIT, event="stream_closed", job_id="ghost"
        )
        assert closed == 1, server.describe()
        headers = {"Accept": "text/event-stream"}
        async with session.get(stream_path("ghost"), headers=headers) as response:
            assert response.status == 200, await response.text()
    record = server.log.find("stream_closed")
    assert record is not None
    assert record["outcome"] == "client_gone", record


async def test_concurrent_handshakes_cannot_overshoot_max_subscribers(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """stream.max_subscribers holds under concurrent handshakes: of 20 WebSockets opened at
    once with room for 2, exactly 2 get hello and the others an overloaded error frame."""
    client = await make_client(make_config(stream__max_subscribers=2))
    await create_job(client, job_id="rush")
    sockets = await asyncio.gather(*(open_ws(client, "rush") for _ in range(20)))
    first = await asyncio.gather(*(first_frame(ws) for ws in sockets))
    kinds = sorted(frame.get("code", frame["type"]) for frame in first)
    assert kinds == ["hello"] * 2 + ["overloaded"] * 18, kinds
    for ws in sockets:
        await ws.close()


async def test_a_body_slower_than_body_timeout_is_408(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A request body that has not fully arrived within limits.body_timeout is answered
    408 body_timeout in the error shape, and nothing is written."""
    client = await make_client(make_config(limits__body_timeout=0.3))
    created = await client.post("/v1/jobs", json={"job_id": "slow-body"})
    assert created.status == 201
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/jobs/slow-body/events HTTP/1.1\r\nHost: jobfeed\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
    assert head.startswith(b"HTTP/1.1 408")
    assert_error_shape(body, "body_timeout")
    writer.close()
    log = await (await client.get("/v1/jobs/slow-body")).json()
    assert log["last_seq"] == 1


@pytest.mark.process
async def test_a_silent_peer_is_dropped_by_protocol_pings(jobfeed_process: Launcher) -> None:
    """A half-open WebSocket peer (handshake done, then silence: no reads, no pongs) on an
    idle job is dropped after stream.ping_seconds without a pong, and its stream is logged
    as closed; the server keeps serving."""
    server = await jobfeed_process.start(stream__ping_seconds=0.3, log__access="false")
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "silent"}) as response:
            assert response.status == 201
        peer = await StuckSubscriber.connect(server.host, server.port, stream_path("silent"))
        closed = await asyncio.to_thread(
            wait_for_records, server, 1, WAIT, event="stream_closed", job_id="silent"
        )
        assert closed == 1
        async with session.get("/healthz") as response:
            assert response.status == 200
    await asyncio.to_thread(peer.drain)


@pytest.mark.process
async def test_a_stuck_peer_dropped_by_pings_does_not_linger(jobfeed_process: Launcher) -> None:
    """A WebSocket peer that neither reads (its buffers full) nor answers pings is dropped
    after stream.ping_seconds, and its connection is gone with it: it does not linger,
    holding its backlog and a connection slot, until the peer reads (it never will)."""
    server = await jobfeed_process.start(
        server__max_connections=2,
        stream__ping_seconds=0.5,
        stream__send_timeout=600,  # only the missing pongs end it
        stream__send_buffer_bytes=4096,
        log__access="false",
    )
    producer = await admitted_connection(server)
    assert (await producer.post("/v1/jobs", {"job_id": "backlog"})).status == 201
    peer = await StuckSubscriber.connect(server.host, server.port, stream_path("backlog"))
    for _ in range(20):
        event = {"type": "log", "message": "x" * 60_000}
        assert (await producer.post("/v1/jobs/backlog/events", event)).status == 201
    closed = await asyncio.to_thread(
        wait_for_records, server, 1, WAIT, event="stream_closed", job_id="backlog"
    )
    assert closed == 1, server.describe()
    # Both slots are taken (the peer, the producer): a new connection is admitted only once
    # the peer's connection is really gone.
    again = await admitted_connection(server)
    await again.close()
    await producer.close()
    await asyncio.to_thread(peer.read_rest)


@pytest.mark.process
@pytest.mark.parametrize(
    "headers",
    [
        "".join(f"X-Flood-{i}: v\r\n" for i in range(500)),  # too many
        f"X-Big: {'v' * 20_000}\r\n",  # one too large
    ],
    ids=["many-headers", "huge-header"],
)
async def test_a_header_flood_is_refused_in_the_error_shape(
    jobfeed_process: Launcher, headers: str
) -> None:
    """Too many or too large request headers are refused by the HTTP parser with 400, in
    the protocol's error shape, and the connection is closed."""
    server = await jobfeed_process.start()
    connection = await RawConnection.open(server.host, server.port)
    connection.writer.write(f"GET /healthz HTTP/1.1\r\nHost: jobfeed\r\n{headers}\r\n".encode())
    async with asyncio.timeout(WAIT):
        raw = await connection.reader.read()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400", head
    assert b"application/json" in head
    assert_error_shape(json.loads(body), "bad_request")
    await connection.close()
