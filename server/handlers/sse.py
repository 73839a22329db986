"""Server-Sent Events transport: hello, the replay, then live events; ends after the terminal.

Unknown jobs, bad offsets and a stale ``epoch`` (409 ``log_reset``) are refused with a plain
HTTP error before the stream starts; a reconnect at or past a finished job's terminal event
gets 204, which stops a browser's ``EventSource`` from reconnecting. Retryable refusals are
200 streams of one error record (``server.handlers.eventsource``).
``Last-Event-ID`` (sent by browsers on reconnect) takes precedence over ``?after=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from aiohttp import web

from ..follow import Cursor, StreamClosing, follow
from ..keys import CONFIG, HUB, STORE, STREAMS
from ..limits import bound_send_buffer
from ..models import TERMINAL_TYPES
from .eventsource import SSE_HEADERS, retry_field
from .subscription import Subscription, subscribe

log = structlog.get_logger("jobfeed.stream")


async def serve_sse(request: web.Request, job_id: str) -> web.StreamResponse:
    raw_after = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    async with subscribe(request, job_id, raw_after, finished_past_end=True) as subscription:
        head = subscription.head
        if head.status in TERMINAL_TYPES and subscription.after >= head.last_seq:
            return web.Response(status=204)  # the stream is finished: EventSource stops
        return await _stream(request, subscription)


async def _stream(request: web.Request, subscription: Subscription) -> web.StreamResponse:
    config = request.app[CONFIG].stream
    job_id, after = subscription.job_id, subscription.after
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    bound_send_buffer(request, config.send_buffer_bytes)
    request.app[STREAMS].add(response)
    cursor = Cursor(job_id, after)
    started = time.monotonic()
    outcome = "client_gone"
    try:
        async with asyncio.timeout(config.send_timeout):
            await response.write(
                retry_field(config.sse_retry_ms)
                + b"event: hello\ndata: %s\n\n" % subscription.hello()
            )
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
        # The peer stopped reading; drop it rather than hold its buffer. It resumes by offset.
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
