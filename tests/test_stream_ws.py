"""The WebSocket stream through the real app on a real socket (protocol v1, "WebSocket
frames" and "Close codes")."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import pytest
import structlog
from aiohttp import ClientWebSocketResponse, WSMessage, WSMsgType
from aiohttp.test_utils import TestClient

from server.config import Config
from server.frames import ws_text_header
from server.keys import AUTH, HUB, STORE
from server.tenancy import DEFAULT_TENANT, JobKey
from tests.conftest import AUTH_TENANT, ClientFactory, ConfigFactory, append, create_job
from tests.streams import read_ws, stored_log

# Every test that builds a config runs with authentication off and on (tests/conftest.py).
AUTH_MODES = ("off", "on")
WAIT = 10.0  # bound on any one wait; a healthy server answers in milliseconds


def stream_path(job_id: str, after: int | str | None = None) -> str:
    query = "" if after is None else f"?after={after}"
    return f"/v1/jobs/{job_id}/stream{query}"


async def receive(ws: ClientWebSocketResponse) -> WSMessage:
    async with asyncio.timeout(WAIT):
        return await ws.receive()


async def receive_json(ws: ClientWebSocketResponse) -> dict[str, Any]:
    message = await receive(ws)
    assert message.type == WSMsgType.TEXT, message
    payload: dict[str, Any] = json.loads(message.data)
    return payload


async def expect_close(ws: ClientWebSocketResponse, code: int) -> None:
    message = await receive(ws)
    assert message.type == WSMsgType.CLOSE, message
    assert ws.close_code == code


async def running_job(client: TestClient[Any, Any], job_id: str, events: int) -> int:
    """A job with ``events`` progress events after `created`; its last_seq."""
    await create_job(client, job_id=job_id)
    last_seq = 1
    for n in range(events):
        last_seq = (await append(client, job_id, {"type": "progress", "current": n}))["last_seq"]
    return last_seq


async def test_hello_is_the_first_frame(client: TestClient[Any, Any]) -> None:
    """The first frame is hello with job_id, status, after, the log's end and its epoch."""
    await running_job(client, "ws-hello", 2)
    epoch = (await (await client.get("/v1/jobs/ws-hello")).json())["epoch"]
    async with client.ws_connect(stream_path("ws-hello", 1)) as ws:
        hello = await receive_json(ws)
    assert hello == {
        "type": "hello",
        "job_id": "ws-hello",
        "status": "running",
        "after": 1,
        "last_seq": 3,
        "epoch": epoch,
    }


async def test_after_defaults_to_zero(client: TestClient[Any, Any]) -> None:
    """Without ?after= the subscriber gets the whole log from seq 1."""
    await running_job(client, "ws-default", 1)
    async with client.ws_connect(stream_path("ws-default")) as ws:
        assert (await receive_json(ws))["after"] == 0
        assert (await receive_json(ws))["seq"] == 1


async def test_replays_events_after_the_offset(client: TestClient[Any, Any]) -> None:
    """Every event with seq > after is sent in order, exactly as stored."""
    last_seq = await running_job(client, "ws-replay", 5)
    stored = await stored_log(client, "ws-replay")
    async with client.ws_connect(stream_path("ws-replay", 2)) as ws:
        await receive_json(ws)
        received = [(await receive(ws)).data for _ in range(3, last_seq + 1)]
    assert received == stored[2:]


async def test_live_events_follow_the_replay(client: TestClient[Any, Any]) -> None:
    """After the replay, newly appended events arrive as they are committed."""
    await running_job(client, "ws-live", 1)
    async with client.ws_connect(stream_path("ws-live", 0)) as ws:
        await receive_json(ws)
        assert [(await receive_json(ws))["seq"] for _ in range(2)] == [1, 2]
        await append(client, "ws-live", {"type": "log", "message": "a"})
        await append(client, "ws-live", {"type": "log", "message": "b"}, {"type": "notice"})
        live = [await receive_json(ws) for _ in range(3)]
    assert [event["seq"] for event in live] == [3, 4, 5]
    assert [event["type"] for event in live] == ["log", "log", "notice"]


# Stored sizes around each of RFC 6455's three length encodings (7 bits, 16 bits, 64 bits).
HEADER_BOUNDARIES = (125, 126, 127, 65535, 65536)


@pytest.mark.parametrize("live", [False, True], ids=["replayed", "live"])
async def test_frames_at_every_header_size_arrive_whole(
    client: TestClient[Any, Any], live: bool
) -> None:
    """Events whose JSON is 125/126/127/65535/65536 bytes, sent as one batch, arrive byte for
    byte and in order: the batched writer frames each length as RFC 6455 says."""
    job_id = f"ws-sizes-{live}"
    await create_job(client, job_id=job_id)
    await append(client, job_id, {"type": "log", "message": ""})
    base = len((await stored_log(client, job_id))[1])  # seq 2, message ""
    batch = [{"type": "log", "message": "x" * (size - base)} for size in HEADER_BOUNDARIES]
    if not live:
        await append(client, job_id, *batch)
    async with client.ws_connect(stream_path(job_id, 2), max_msg_size=1 << 20) as ws:
        assert (await receive_json(ws))["last_seq"] == (7 if not live else 2)
        if live:
            await append(client, job_id, *batch)
        received = [(await receive(ws)).data for _ in HEADER_BOUNDARIES]
    stored = (await stored_log(client, job_id))[2:]
    assert [len(frame) for frame in stored] == list(HEADER_BOUNDARIES)
    assert received == stored


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frame_header_uses_the_shortest_length(size: int, header: bytes) -> None:
    """RFC 6455 5.2: the minimal number of bytes MUST encode the length (aiohttp's reader is
    lenient; a browser need not be)."""
    assert ws_text_header(size) == header


async def test_closes_1000_after_the_terminal_event(client: TestClient[Any, Any]) -> None:
    """The terminal event is the last frame; then the server closes with 1000."""
    await running_job(client, "ws-done", 1)
    await append(client, "ws-done", {"type": "failed", "error": {"message": "boom"}})
    log = await read_ws(client, stream_path("ws-done", 0))
    assert log.seqs == [1, 2, 3]
    assert json.loads(log.events[-1])["type"] == "failed"
    assert log.ended
    assert log.close_code == 1000


async def test_finished_job_at_its_end_closes_at_once(client: TestClient[Any, Any]) -> None:
    """A finished job with after = last_seq: hello, no events, close 1000."""
    await create_job(client, job_id="ws-end")
    last_seq = (await append(client, "ws-end", {"type": "cancelled"}))["last_seq"]
    log = await read_ws(client, stream_path("ws-end", last_seq))
    assert log.hello is not None
    assert log.hello["status"] == "cancelled"
    assert log.events == []
    assert log.close_code == 1000


async def test_all_frames_are_text(client: TestClient[Any, Any]) -> None:
    """hello, events and the rest are text frames holding one JSON object each."""
    await running_job(client, "ws-text", 2)
    await append(client, "ws-text", {"type": "completed", "result": {"ok": "é ✓"}})
    kinds = []
    async with client.ws_connect(stream_path("ws-text", 0)) as ws:
        while (message := await receive(ws)).type != WSMsgType.CLOSE:
            kinds.append(message.type)
            assert isinstance(json.loads(message.data), dict)
    assert kinds == [WSMsgType.TEXT] * 5


async def test_ping_is_answered_with_pong(client: TestClient[Any, Any]) -> None:
    """A client {"type": "ping"} gets {"type": "pong"}."""
    last_seq = await running_job(client, "ws-ping", 0)
    async with client.ws_connect(stream_path("ws-ping", last_seq)) as ws:
        await receive_json(ws)
        await ws.send_str('{"type": "ping"}')
        assert await receive_json(ws) == {"type": "pong"}


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param('{"type": "subscribe"}', id="other-json"),
        pytest.param("[1, 2]", id="json-array"),
        pytest.param("{not json", id="invalid-json"),
        pytest.param(b"\x00\x01binary", id="binary"),
    ],
)
async def test_other_client_frames_get_an_error_frame(
    client: TestClient[Any, Any], frame: str | bytes
) -> None:
    """Anything but a ping is answered with an error frame, and the stream goes on."""
    last_seq = await running_job(client, "ws-other", 0)
    async with client.ws_connect(stream_path("ws-other", last_seq)) as ws:
        await receive_json(ws)
        if isinstance(frame, bytes):
            await ws.send_bytes(frame)
        else:
            await ws.send_str(frame)
        error = await receive_json(ws)
        assert error["type"] == "error"
        assert isinstance(error["code"], str)
        assert isinstance(error["message"], str)
        await append(client, "ws-other", {"type": "log", "message": "still here"})
        assert (await receive_json(ws))["seq"] == last_seq + 1
        await ws.send_str('{"type": "ping"}')
        assert await receive_json(ws) == {"type": "pong"}


async def test_too_large_client_frame_closes_1009(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A client frame over stream.max_client_frame_bytes closes the socket with 1009."""
    client = await make_client(make_config(stream__max_client_frame_bytes=1024))
    last_seq = await running_job(client, "ws-big", 0)
    async with client.ws_connect(stream_path("ws-big", last_seq)) as ws:
        await receive_json(ws)
        await ws.send_str(json.dumps({"type": "ping", "pad": "x" * 1024}))
        await expect_close(ws, 1009)


async def test_frame_at_the_limit_is_accepted(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A client frame of exactly stream.max_client_frame_bytes is read (and answered)."""
    client = await make_client(make_config(stream__max_client_frame_bytes=1024))
    last_seq = await running_job(client, "ws-limit", 0)
    frame = '{"type": "ping", "pad": "'
    frame += "x" * (1024 - len(frame) - 2) + '"}'
    assert len(frame) == 1024
    async with client.ws_connect(stream_path("ws-limit", last_seq)) as ws:
        await receive_json(ws)
        await ws.send_str(frame)
        assert await receive_json(ws) == {"type": "pong"}


async def test_unknown_job_is_an_error_frame_then_4004(client: TestClient[Any, Any]) -> None:
    """No such job: an error frame with code job_not_found, then close 4004."""
    async with client.ws_connect(stream_path("no-such-job", 0)) as ws:
        error = await receive_json(ws)
        assert error["type"] == "error"
        assert error["code"] == "job_not_found"
        assert isinstance(error["message"], str)
        await expect_close(ws, 4004)


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "5"])
async def test_bad_after_is_an_error_frame_then_4400(
    client: TestClient[Any, Any], after: str
) -> None:
    """after not an integer >= 0, or past the log's end (last_seq is 2): error, then 4400."""
    await running_job(client, "ws-bad", 1)
    async with client.ws_connect(stream_path("ws-bad", after)) as ws:
        error = await receive_json(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_parameter"
        await expect_close(ws, 4400)


async def test_heartbeat_when_idle(make_config: ConfigFactory, make_client: ClientFactory) -> None:
    """Nothing to send for stream.heartbeat_seconds: a heartbeat frame with last_seq."""
    client = await make_client(make_config(stream__heartbeat_seconds=0.2))
    last_seq = await running_job(client, "ws-beat", 1)
    async with client.ws_connect(stream_path("ws-beat", 0)) as ws:
        await receive_json(ws)
        assert [(await receive_json(ws))["seq"] for _ in range(last_seq)] == [1, 2]
        assert await receive_json(ws) == {"type": "heartbeat", "last_seq": last_seq}


def sending_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running a stream's sending side (its cursor), not the handlers' own."""
    ours = ("handlers/ws.py", "server/follow.py")
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "cr_code", None) is not None
        and task.get_coro().cr_code.co_filename.endswith(ours)  # type: ignore[union-attr]
    ]


async def parked_subscribers(client: TestClient[Any, Any], job_id: str, count: int) -> None:
    """Until ``count`` subscribers are parked on the job's channel. Parking is a state with
    no event to wait on: yield to the loop until it holds."""
    hub = client.app[HUB]
    tenant = AUTH_TENANT if client.app[AUTH].enabled else DEFAULT_TENANT
    channel = hub.attach(JobKey(tenant, job_id), 0)  # the subscribers' own channel
    hub.detach(channel)
    async with asyncio.timeout(WAIT):
        while len(channel.live) < count:  # noqa: ASYNC110
            await asyncio.sleep(0)


async def test_an_idle_subscriber_holds_no_task(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Caught up, a subscriber parks on its job's channel with no task of its own (W7: an
    idle WebSocket costs its connection and its cursor); heartbeats and live events still
    reach it, written by the channel's callbacks."""
    client = await make_client(make_config(stream__heartbeat_seconds=0.2))
    last_seq = await running_job(client, "ws-idle", 1)
    sockets = [await client.ws_connect(stream_path("ws-idle", last_seq)) for _ in range(3)]
    try:
        for ws in sockets:
            assert (await receive_json(ws))["type"] == "hello"
        await parked_subscribers(client, "ws-idle", 3)
        assert sending_tasks() == []
        for ws in sockets:
            assert await receive_json(ws) == {"type": "heartbeat", "last_seq": last_seq}
        await parked_subscribers(client, "ws-idle", 3)
        assert sending_tasks() == []
        await append(client, "ws-idle", {"type": "log", "message": "live"})
        for ws in sockets:
            frame = await receive_json(ws)
            while frame["type"] == "heartbeat":
                frame = await receive_json(ws)
            assert frame["seq"] == last_seq + 1
        assert sending_tasks() == []
    finally:
        for ws in sockets:
            await ws.close()


async def test_the_handshake_names_its_request(client: TestClient[Any, Any]) -> None:
    """The 101 carries X-Request-ID, as every response does (the stream forgets its
    handshake's headers once they are sent)."""
    await running_job(client, "ws-rid", 0)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            f"GET {stream_path('ws-rid', 1)} HTTP/1.1\r\nHost: {client.host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "X-Request-ID: trace-ws-1\r\n\r\n".encode()
        )
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"\r\nX-Request-ID: trace-ws-1\r\n" in head, head


async def test_get_without_upgrade_or_accept_is_400(client: TestClient[Any, Any]) -> None:
    """A plain GET on /stream is neither transport: 400 in the error shape."""
    await running_job(client, "ws-plain", 0)
    response = await client.get(stream_path("ws-plain"))
    assert response.status == 400
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["details"] == []


async def test_a_client_close_frees_its_slot_at_once(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A subscriber that closes its socket while idle releases its stream slot right away
    (not at the next heartbeat): with one slot per job, an immediate reconnect is served."""
    client = await make_client(
        make_config(stream__max_subscribers_per_job=1, stream__heartbeat_seconds=60)
    )
    last_seq = await running_job(client, "ws-slot", 1)
    for _ in range(3):
        async with client.ws_connect(stream_path("ws-slot", last_seq)) as ws:
            hello = await receive_json(ws)
            assert hello["type"] == "hello", hello
            await ws.close()


async def test_a_ping_flood_is_dropped_not_answered(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Client frames beyond stream.client_frames_per_second are dropped: the first one of
    the flood gets a rate_limited error frame, the rest nothing, and the stream goes on."""
    client = await make_client(make_config(stream__client_frames_per_second=0.01))
    last_seq = await running_job(client, "ws-flood", 0)
    async with client.ws_connect(stream_path("ws-flood", last_seq)) as ws:
        assert (await receive_json(ws))["type"] == "hello"
        for _ in range(50):
            await ws.send_str('{"type": "ping"}')
        assert await receive_json(ws) == {"type": "pong"}
        error = await receive_json(ws)
        assert (error["type"], error["code"]) == ("error", "rate_limited")
        await append(client, "ws-flood", {"type": "log", "message": "still here"})
        event = await receive_json(ws)
        assert (event["type"], event["seq"]) == ("log", last_seq + 1)


async def test_head_on_the_stream_route_is_405_not_an_upgrade(
    client: TestClient[Any, Any],
) -> None:
    """HEAD on a stream route is refused with 405 method_not_allowed (Allow: GET): it never
    upgrades to a WebSocket, even with the upgrade headers."""
    await running_job(client, "ws-head", 0)
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"HEAD /v1/jobs/ws-head/stream HTTP/1.1\r\nHost: jobfeed\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line.split()[1] == "405", head
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert "GET" in headers["allow"], headers


async def test_a_bug_after_the_upgrade_closes_1011_not_an_http_500(
    client: TestClient[Any, Any], config: Config
) -> None:
    """An unexpected error (not a refusal) after the upgrade, here a damaged jobs row that
    SQLite cannot read, closes the WebSocket with 1011 and is logged; no HTTP response is
    written into the upgraded connection."""
    await running_job(client, "ws-damaged", 0)
    with sqlite3.connect(config.storage.path) as db:
        db.execute("UPDATE jobs SET snapshot = 'not json' WHERE job_id = 'ws-damaged'")
    # The writer's cache still holds the job as it committed it: drop it, so that the
    # stream reads the damaged row (as it would once the cache evicts the job).
    assert client.app is not None
    client.app[STORE].writer.forget_all()
    with structlog.testing.capture_logs() as logs:
        async with client.ws_connect(stream_path("ws-damaged")) as ws:
            message = await receive(ws)
            assert message.type == WSMsgType.CLOSE, message
            assert ws.close_code == 1011
        await client.close()  # waits for the handler, which logs as it ends
    closed = [r for r in logs if r["event"] == "stream_closed"]
    assert [(r["outcome"], r["close_code"]) for r in closed] == [("error", 1011)], logs
    assert any(r["event"] == "stream_failed" for r in logs), logs
