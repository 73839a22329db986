"""A lean HTTP/1.1 keep-alive client for the producers: one request at a time per connection.

aiohttp's client spends ~130 µs of CPU per request here, as much as the server under test,
and on a 2-core box the generator's CPU is taken from the server. The producers only ever
POST JSON and read a ``Content-Length`` answer, so this client sends pre-built request heads
and parses the status line and one header: ~15-20 µs per request. Setup calls and streams
keep using aiohttp.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

_HEAD_END = b"\r\n\r\n"


class ProtocolError(RuntimeError):
    """The server's answer is not the HTTP/1.1 this client understands."""


class Http1Connection:
    """A keep-alive connection to ``base_url``; reopened when the server closes it."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{base_url}: needs a host and a port")
        self.host, self.port = parts.hostname, parts.port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def head(self, path: str, authorization: str = "") -> bytes:
        """The request head for a JSON POST to ``path`` (``%d`` left for Content-Length),
        with ``Authorization: Bearer <authorization>`` when one is given."""
        credential = f"Authorization: Bearer {authorization}\r\n" if authorization else ""
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{credential}"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        ).encode()

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """Send ``head % len(body) + body``; the answer's status and body."""
        if self._writer is None:
            await self.open()
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(head % len(body) + body)
        try:
            raw = await self._reader.readuntil(_HEAD_END)
        except asyncio.IncompleteReadError as exc:
            self.close()
            raise ConnectionResetError("the server closed the connection") from exc
        status, length, closing = _parse_head(raw)
        answer = await self._reader.readexactly(length)
        if closing:
            self.close()
        return status, answer


def _parse_head(raw: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server will close, from a response head."""
    if not raw.startswith(b"HTTP/1.1 "):
        raise ProtocolError(f"not an HTTP/1.1 answer: {raw[:80]!r}")
    status = int(raw[9:12])
    length, closing = -1, False
    for line in raw.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lowered = name.lower()
        if lowered == b"content-length":
            length = int(value)
        elif lowered == b"connection" and value.strip().lower() == b"close":
            closing = True
    if length < 0:
        raise ProtocolError(f"an answer without Content-Length: {raw[:200]!r}")
    return status, length, closing
