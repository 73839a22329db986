"""A lean WebSocket client for the subscribers: reads a server's text frames, nothing more.

aiohttp's client spends ~4-8 µs of CPU per received message (a future and a queue hop per
frame); with 1,000 subscribers on two cores that is more than the server under test spends
sending them, so the generator, not the server, set W4's figure. This protocol parses frames
in ``data_received`` and hands each text payload to a callback in the same step. It answers
pings and closes as RFC 6455 requires; it sends nothing else. Client frames are masked with a
zero key (the RFC requires a mask, not a secret one, and this client never sends data).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
_ZERO_MASK = b"\x00\x00\x00\x00"
ABNORMAL = 1006  # no close frame arrived


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked (zero key) client frame; control payloads are ≤ 125 bytes."""
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + _ZERO_MASK + payload


class LeanWebSocket(asyncio.Protocol):
    """One client connection; ``on_text`` (when set) gets every text payload in order."""

    def __init__(self, handshake: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._handshake_request = handshake
        self._upgraded: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        self.transport: asyncio.Transport | None = None
        self.on_text: Callable[[bytes], None] | None = None
        self.pending: deque[bytes] = deque()  # text that arrived while on_text was unset
        self.arrived = asyncio.Event()
        self._tail = b""
        self._handshaken = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._handshake_request)

    def data_received(self, data: bytes) -> None:
        data = self._tail + data if self._tail else data
        pos = 0
        if not self._handshaken:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._tail = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail(ConnectionError(f"no upgrade: {data[: end + 4][:300]!r}"))
                return
            self._handshaken = True
            self._upgraded.set_result(None)
            pos = end + 4
        size = len(data)
        while size - pos >= 2:
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            offset = pos + 2
            if length == 126:
                if size - offset < 2:
                    break
                (length,) = struct.unpack_from("!H", data, offset)
                offset += 2
            elif length == 127:
                if size - offset < 8:
                    break
                (length,) = struct.unpack_from("!Q", data, offset)
                offset += 8
            if size - offset < length:
                break
            payload = data[offset : offset + length]
            pos = offset + length
            self._frame(first & 0x0F, payload)
        self._tail = data[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = ABNORMAL
        if not self._upgraded.done():
            self._upgraded.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.arrived.set()

    # -- frames ---------------------------------------------------------------------------------

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == TEXT:
            if self.on_text is not None:
                self.on_text(payload)
            else:
                self.pending.append(payload)
                self.arrived.set()
        elif opcode == PING:
            self._send(_client_frame(PONG, payload))
        elif opcode == CLOSE:
            if self.close_code is None:
                self.close_code = struct.unpack_from("!H", payload)[0] if payload else 1005
                self._send(_client_frame(CLOSE, payload[:2]))
            if self.transport is not None:
                self.transport.close()

    def _send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def _fail(self, exc: Exception) -> None:
        if not self._upgraded.done():
            self._upgraded.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- the caller's side ----------------------------------------------------------------------

    async def upgraded(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._upgraded

    async def next_text(self, timeout: float) -> bytes | None:
        """The next text payload received while ``on_text`` was unset; None once closed."""
        async with asyncio.timeout(timeout):
            while not self.pending:
                if self.closed.done():
                    return None
                self.arrived.clear()
                await self.arrived.wait()
        return self.pending.popleft()

    async def close(self, timeout: float = 5.0) -> None:
        """Send close 1000 and wait for the server's close (or drop the connection)."""
        if self.close_code is None:
            self._send(_client_frame(CLOSE, struct.pack("!H", 1000)))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        """Drop the connection without a close frame (a browser tab that vanished)."""
        if self.transport is not None:
            self.transport.abort()


class LeanPool:
    """Opens subscribers' connections to one server; ``close()`` drops every one of them."""

    def __init__(self) -> None:
        self.sockets: list[LeanWebSocket] = []

    async def __aenter__(self) -> LeanPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(
        self, url: str, timeout: float = 30.0, authorization: str = ""
    ) -> LeanWebSocket:
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            + (f"Authorization: Bearer {authorization}\r\n" if authorization else "")
            + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: LeanWebSocket(request), parts.hostname, parts.port
        )
        self.sockets.append(protocol)
        await protocol.upgraded(timeout)
        return protocol

    async def close(self) -> None:
        for socket in self.sockets:
            socket.abort()
        self.sockets.clear()
