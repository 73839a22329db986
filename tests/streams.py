"""Reading jobfeed's streams the way a client does: an incremental SSE parser and a
WebSocket collector, shared by the transport tests and the catch-up test.

Both keep each event's JSON exactly as it came off the wire (``raw``), so tests can compare
it byte for byte with the stored log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientResponse, ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

STUCK_WAIT = 10.0  # bound on a stuck client's handshake and on its final read
WS_WAIT = 15.0  # bound on one WebSocket read; a healthy server answers in milliseconds


async def ws_until_closed(
    ws: ClientWebSocketResponse, wait: float = WS_WAIT
) -> tuple[list[dict[str, Any]], int | None]:
    """The JSON frames until the server closes the WebSocket, and its close code."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(wait):
        while True:
            message = await ws.receive()
            if message.type != WSMsgType.TEXT:
                return frames, ws.close_code
            frames.append(json.loads(message.data))


async def receive_json(ws: ClientWebSocketResponse, wait: float = WS_WAIT) -> dict[str, Any]:
    """The next WebSocket message, which must be a JSON text frame."""
    async with asyncio.timeout(wait):
        message = await ws.receive()
    assert message.type == WSMsgType.TEXT, message
    payload: dict[str, Any] = json.loads(message.data)
    return payload


STUCK_RCVBUF = 4096  # a small receive window, so the server's send buffer fills quickly


@dataclass(frozen=True)
class SseEvent:
    """One dispatched SSE event (a block of field lines ended by a blank line)."""

    event: str | None
    id: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass(frozen=True)
class SseComment:
    """A ``: text`` comment line (jobfeed sends ``: heartbeat`` while idle)."""

    text: str


SseItem = SseEvent | SseComment


class SseParser:
    """Turns lines into events per the HTML Server-Sent Events parsing rules (the subset
    jobfeed can produce: ``event``, ``id``, ``data``, ``retry`` fields and comments). As in
    a browser, a block without ``data`` (e.g. only ``retry:``) dispatches nothing."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._id: str | None = None
        self._data: list[str] = []
        self._has_fields = False
        self.retry: int | None = None  # the last retry: field seen

    def feed_line(self, line: str) -> SseItem | None:
        """One line without its line ending; an item when the line completes one."""
        if line == "":
            if not self._data:
                self._event, self._id, self._has_fields = None, None, False
                return None
            item = SseEvent(self._event, self._id, "\n".join(self._data))
            self._event, self._id, self._data, self._has_fields = None, None, [], False
            return item
        if line.startswith(":"):
            return SseComment(line[1:].removeprefix(" "))
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        self._has_fields = True
        if name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        elif name == "data":
            self._data.append(value)
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


async def sse_items(response: ClientResponse) -> AsyncIterator[SseItem]:
    """Items as they arrive on ``response``; ends when the server ends the response."""
    parser = SseParser()
    while True:
        raw = await response.content.readline()
        if not raw:
            return
        item = parser.feed_line(raw.decode("utf-8").rstrip("\r\n"))
        if item is not None:
            yield item


@dataclass
class StreamLog:
    """What one subscription (one connection) received."""

    transport: str
    hello: dict[str, Any] | None = None
    events: list[str] = field(default_factory=list)  # each event's JSON, as received
    seqs: list[int] = field(default_factory=list)
    heartbeats: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False  # the server ended the stream (WS close, SSE end of response)
    close_code: int | None = None
    status: int | None = None  # the HTTP status (SSE) or 101 (WebSocket)


async def read_ws(
    client: TestClient[Any, Any],
    path: str,
    *,
    drop_after: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> StreamLog:
    """Subscribe over WebSocket and read until the server closes, or until ``drop_after``
    events have arrived (then the client closes: a subscriber going away mid-stream)."""
    log = StreamLog("ws", status=101)
    async with client.ws_connect(path, headers=headers) as ws:
        while True:
            message = await ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                log.ended = True
                log.close_code = ws.close_code
                return log
            assert message.type == WSMsgType.TEXT, f"not a text frame: {message!r}"
            if _take(log, message.data, json.loads(message.data)) and _full(log, drop_after):
                await ws.close()
                return log


async def read_sse(
    client: TestClient[Any, Any],
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    drop_after: int | None = None,
) -> StreamLog:
    """Subscribe over SSE and read until the response ends, or until ``drop_after`` events
    have arrived (then the client drops the connection)."""
    log = StreamLog("sse")
    request_headers = {"Accept": "text/event-stream", **(headers or {})}
    async with client.get(path, headers=request_headers) as response:
        log.status = response.status
        if response.status == 204:  # a finished stream, reconnected at or past its end
            log.ended = True
            return log
        if response.status != 200:
            log.errors.append(await response.json())
            return log
        async for item in sse_items(response):
            if isinstance(item, SseComment):
                if item.text == "heartbeat":
                    log.heartbeats += 1
                continue
            payload = item.json()
            if item.event == "error":  # a stream ended by the server (e.g. job_deleted)
                log.errors.append(payload)
                continue
            if item.event == "hello":
                assert item.id is None, f"hello carries an id: {item!r}"
            else:
                # Unnamed, so that EventSource.onmessage gets every event (feed.md).
                assert item.event is None, f"a named event record: {item!r}"
                assert item.id == str(payload["seq"]), f"id != seq: {item!r}"
            if _take(log, item.data, payload) and _full(log, drop_after):
                response.close()
                return log
        log.ended = True
        return log


def _take(log: StreamLog, raw: str, payload: dict[str, Any]) -> bool:
    """Record one frame; True when it was an event."""
    kind = payload.get("type")
    if "seq" in payload:
        # Checked as they arrive, so a duplicate or a hole fails at once, not at a deadline.
        assert log.hello is not None, f"event before hello: {payload!r}"
        expected = log.seqs[-1] + 1 if log.seqs else log.hello["after"] + 1
        assert payload["seq"] == expected, f"seq {payload['seq']}, expected {expected}"
        log.events.append(raw)
        log.seqs.append(payload["seq"])
        return True
    if kind == "hello":
        assert log.hello is None, f"a second hello: {payload!r}"
        log.hello = payload
    elif kind == "heartbeat":
        log.heartbeats += 1
    elif kind == "error":
        log.errors.append(payload)
    else:
        raise AssertionError(f"unexpected frame: {payload!r}")
    return False


def _full(log: StreamLog, drop_after: int | None) -> bool:
    return drop_after is not None and len(log.events) >= drop_after


async def stored_log(
    client: TestClient[Any, Any], job_id: str, headers: Mapping[str, str] | None = None
) -> list[str]:
    """The job's whole log as stored: each event's JSON line from the NDJSON export."""
    response = await client.get(
        f"/v1/jobs/{job_id}/events", headers={"Accept": "application/x-ndjson", **(headers or {})}
    )
    assert response.status == 200, await response.text()
    body = await response.text()
    return body.splitlines()


class StuckSubscriber:
    """A subscriber that completes the handshake by hand (a WebSocket upgrade, or an SSE
    request) and then never reads; at the end it reads what the server left."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str, transport: str = "ws"
    ) -> StuckSubscriber:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUCK_RCVBUF)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        if transport == "ws":
            key = base64.b64encode(os.urandom(16)).decode()
            headers = (
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
            )
            expected = b"HTTP/1.1 101"
        else:
            headers = "Accept: text/event-stream\r\n"
            expected = b"HTTP/1.1 200"
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}\r\n"
        await loop.sock_sendall(sock, request.encode())
        head = b""
        async with asyncio.timeout(STUCK_WAIT):
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 1)  # byte by byte: leave the frames unread
                assert chunk, "the server closed the connection during the handshake"
                head += chunk
        assert head.startswith(expected), head
        return cls(sock)

    def read_rest(self) -> bytes:
        """Read until the server's EOF (blocking: run it in a thread); what arrived."""
        self.sock.setblocking(True)
        self.sock.settimeout(STUCK_WAIT)
        data = bytearray()
        try:
            while chunk := self.sock.recv(1 << 16):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass  # an aborted connection: what arrived before the reset is what we check
        finally:
            self.sock.close()
        return bytes(data)

    def drain(self) -> tuple[list[dict[str, Any]], int | None]:
        """``read_rest`` of a WebSocket: the text frames and the close code, if a close
        frame came through."""
        return parse_frames(self.read_rest())


def parse_frames(data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """Unmasked server frames (RFC 6455 5.2); a trailing partial frame is ignored."""
    frames: list[dict[str, Any]] = []
    close_code = None
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, at)
            at += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, at)
            at += 8
        if at + length > len(data):
            break
        payload = data[at : at + length]
        at += length
        if opcode == 0x1:
            frames.append(json.loads(payload))
        elif opcode == 0x8:
            close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
    return frames, close_code
