"""Server-Sent Events transport: hello, the replay, then live events; ends after the terminal.

Unknown jobs, bad offsets and a stale ``epoch`` (409 ``log_reset``) are refused with a plain
HTTP error before the stream starts.
``Last-Event-ID`` (sent by browsers on reconnect) takes precedence over ``?after=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiohttp import web

from ..auth import PRINCIPAL
from ..follow import Cursor, StreamClosing, follow
from ..frames import control_frame
from ..keys import CONFIG, HUB, STORE, STREAMS
from ..limits import bound_send_buffer
from .guard import StreamGuard, guard_stream
from .subscription import Subscription, subscribe

log = structlog.get_logger("jobfeed.stream")


async def serve_sse(request: web.Request, job_id: str) -> web.StreamResponse:
    raw_after = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    principal = request[PRINCIPAL]
    async with subscribe(request, principal, job_id, raw_after) as subscription:
        guard = guard_stream(request, principal, job_id)
        return await _stream(request, subscription, guard)


async def _stream(
    request: web.Request, subscription: Subscription, guard: StreamGuard | None
) -> web.StreamResponse:
    config = request.app[CONFIG].stream
    key, after = subscription.key, subscription.after
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # let proxies pass events through as they come
        }
    )
    await response.prepare(request)
    bound_send_buffer(request, config.send_buffer_bytes)
    request.app[STREAMS].add(response)
    cursor = Cursor(key, after)
    started = time.monotonic()
    outcome = "client_gone"
    # Within the credential's lifetime (with authentication on); then `event: error`.
    lifetime = guard.watch() if guard is not None else contextlib.nullcontext()
    try:
        async with lifetime:
            async with asyncio.timeout(config.send_timeout):
                await response.write(b"event: hello\ndata: %s\n\n" % subscription.hello())
            batches = follow(
                request.app[STORE],
                request.app[HUB],
                cursor,
                subscription.head,
                page_events=config.page_events,
                idle_seconds=config.heartbeat_seconds,
            )
            async for batch in batches:
                payload = b": heartbeat\n\n" if batch is None else b"".join(f.sse for f in batch)
                async with asyncio.timeout(config.send_timeout):
                    await response.write(payload)
        outcome = "done"
        await response.write_eof()
    except StreamClosing:
        outcome = "shutdown"
        await _end_quietly(response)
    except TimeoutError:
        if guard is not None and guard.fired():
            # The credential expired or was revoked: say which, then end the response.
            error = guard.end_error()
            outcome = error.code
            frame = control_frame({"code": error.code, "message": error.message})
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(config.send_timeout):
                    await response.write(b"event: error\ndata: %s\n\n" % frame)
            await _end_quietly(response)
        else:
            # The peer stopped reading; drop it rather than hold its buffer. It resumes by
            # offset.
            outcome = "send_timeout"
            if request.transport is not None:
                request.transport.abort()
    except (ConnectionResetError, ConnectionError):
        outcome = "client_gone"
    finally:
        request.app[STREAMS].discard(response)
        log.info(
            "stream_closed",
            transport="sse",
            after=after,
            sent=cursor.sent,
            last_seq=cursor.after,
            outcome=outcome,
            seconds=round(time.monotonic() - started, 3),
        )
    return response


async def _end_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
