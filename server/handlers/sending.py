"""Large response bodies, written with the streams' discipline: bounded buffering, a deadline.

A body handed to the transport in one write stays in this process's memory until the client
has read it, however slowly it reads or if it never does (eight clients that asked for pages
of 60 KB events and never read took the server from 57 MiB to 1.3 GiB, and kept it while
they stayed connected). Here a body
goes out in pieces of at most ``CHUNK_BYTES``: aiohttp's writer waits for the transport to fall
below its high-water mark between them, so that per connection at most a few pieces sit in
user space, plus the kernel's send buffer, capped at ``stream.send_buffer_bytes`` as a stream's
is. Each piece must be taken within ``stream.send_timeout``, the time a stream subscriber gets
to drain: a client that takes nothing for that long is cut off (the connection aborted, the
outcome logged), as a stuck subscriber is. The deadline counts time without progress, not the
whole body, so that a long export to a slow but reading client is not cut short.

Callers produce the body in bounded pieces too (pages read within ``stream.page_bytes``), so
that what one client can pin is a page, never a whole response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable

import structlog
from aiohttp import hdrs, web

from ..keys import CONFIG
from ..limits import bound_send_buffer

log = structlog.get_logger("jobfeed.http")

# The most handed to the transport at once; aiohttp drains every 64 KiB written.
CHUNK_BYTES = 64 * 1024


class ResponseAborted(Exception):
    """The client took nothing for ``stream.send_timeout``; the connection was aborted."""


class BoundedBody:
    """One large response body: ``start`` sends the headers, ``write`` the body piece by
    piece under the send timeout, ``finish`` ends it. On a send timeout the connection is
    aborted, ``response_aborted`` logged, and ``ResponseAborted`` raised: the handler returns
    its response as it is (aiohttp finds the connection closed and leaves it)."""

    __slots__ = ("_request", "_send_timeout", "_started", "response", "sent")

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request = request
        self._send_timeout = request.app[CONFIG].stream.send_timeout
        self._started = time.monotonic()
        self.response = response
        self.sent = 0  # body bytes handed to the transport

    async def start(self) -> None:
        await self._within_deadline(self.response.prepare(self._request))
        bound_send_buffer(self._request, self._request.app[CONFIG].stream.send_buffer_bytes)

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), CHUNK_BYTES):
            piece = data[start : start + CHUNK_BYTES] if len(data) > CHUNK_BYTES else data
            await self._within_deadline(self.response.write(piece))
            self.sent += len(piece)

    async def finish(self) -> None:
        await self._within_deadline(self.response.write_eof())

    async def _within_deadline(self, sending: Awaitable[object]) -> None:
        try:
            async with asyncio.timeout(self._send_timeout):
                await sending
        except TimeoutError:
            # The client stopped reading: drop it rather than hold its buffers.
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            log.info(
                "response_aborted",
                outcome="send_timeout",
                send_timeout=self._send_timeout,
                sent=self.sent,
                seconds=round(time.monotonic() - self._started, 3),
            )
            raise ResponseAborted() from None


async def send_bounded(
    request: web.Request, response: web.StreamResponse, pieces: AsyncGenerator[bytes, None]
) -> web.StreamResponse:
    """Send ``pieces`` as ``response``'s body under ``BoundedBody``'s rules.

    Pieces are produced before the headers go out until they pass ``CHUNK_BYTES``: a
    request that fails there (a storage error) is still answered with its error status, and
    a body that ends there (most pages) goes out with a ``Content-Length``; a longer one is
    chunked. A failure after the headers can only cut the body short: it is logged and the
    connection aborted, so that the client sees an incomplete body, never a wrong one.
    """
    ahead: list[bytes] = []
    held = 0
    while held <= CHUNK_BYTES:
        piece = await anext(pieces, None)
        if piece is None:
            response.content_length = held  # the whole body is known
            break
        ahead.append(piece)
        held += len(piece)
    body = BoundedBody(request, response)
    try:
        await body.start()
        if request.method != hdrs.METH_HEAD:  # HEAD: the headers only, as for GET
            for piece in ahead:
                await body.write(piece)
            ahead.clear()
            async for piece in pieces:
                await body.write(piece)
        await body.finish()
    except ResponseAborted:
        pass
    except ConnectionError:
        log.debug("response_client_gone", sent=body.sent)
    except Exception:
        log.exception("response_failed", sent=body.sent)
        if request.transport is not None:
            request.transport.abort()
    finally:
        await pieces.aclose()
    return response
