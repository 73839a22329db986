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

from ..auth import PRINCIPAL
from ..errors import JobDeleted
from ..follow import Cursor, StreamClosing
from ..frames import WRITE_PART_BYTES, control_frame, parts_of
from ..keys import CONFIG, METRICS
from ..limits import bound_send_buffer
from ..models import TERMINAL_TYPES
from .eventsource import SSE_HEADERS, error_record, retry_field
from .guard import StreamGuard, guard_stream
from .subscription import Subscription, follow_job, subscribe

log = structlog.get_logger("jobfeed.stream")


async def serve_sse(request: web.Request, job_id: str) -> web.StreamResponse:
    raw_after = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    principal = request[PRINCIPAL]
    async with subscribe(
        request, principal, job_id, raw_after, finished_past_end=True
    ) as subscription:
        head = subscription.head
        if head.status in TERMINAL_TYPES and subscription.after >= head.last_seq:
            return web.Response(status=204)  # the stream is finished: EventSource stops
        guard = guard_stream(request, principal, job_id)
        return await _stream(request, subscription, guard)


async def _stream(
    request: web.Request, subscription: Subscription, guard: StreamGuard | None
) -> web.StreamResponse:
    config = request.app[CONFIG].stream
    key, after, stream = subscription.key, subscription.after, subscription.stream
    job_id = key.job_id
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    # From here on the response is under way: every ending is the end of its body (or a
    # dropped connection), never an error response (which would land inside the body).
    bound_send_buffer(request, config.send_buffer_bytes)
    cursor = Cursor(key, after)
    stream.cursor = cursor  # for the lag metric
    started = time.monotonic()
    outcome = "client_gone"
    metrics = request.app[METRICS]
    metrics.stream_opened("sse", "job")
    # An idle stream writes nothing until its next heartbeat: without this, a client that
    # went away would keep its stream slot until then.
    unhook = stream.cancel_when_lost(request)
    # Within the credential's lifetime (with authentication on); then `event: error`.
    lifetime = guard if guard is not None else contextlib.nullcontext()
    try:
        try:
            async with lifetime:
                async with asyncio.timeout(config.send_timeout):
                    await response.write(
                        retry_field(config.sse_retry_ms)
                        + b"event: hello\ndata: %s\n\n" % subscription.hello()
                    )
                batches = follow_job(request, cursor, subscription)
                async for batch in batches:
                    async with asyncio.timeout(config.send_timeout):
                        if batch is None:
                            await response.write(b": heartbeat\n\n")
                            continue
                        # In parts: aiohttp waits for the peer between them (it drains
                        # every 64 KiB written), so a slow reader never has a whole batch
                        # buffered.
                        for part in parts_of(batch, WRITE_PART_BYTES):
                            await response.write(b"".join(f.sse for f in part))
            outcome = "done"
            await end_response(request, response, config.send_timeout)
        except StreamClosing:
            outcome = "shutdown"
            await end_response(request, response, config.send_timeout)
        except JobDeleted as deleted:
            # `event: error` then the end: final, the log is gone (EventSource's own
            # reconnect then meets 404 and stops).
            outcome = deleted.code
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(config.send_timeout):
                    await response.write(error_record(deleted.code, deleted.message))
            await end_response(request, response, config.send_timeout)
        except TimeoutError:
            if guard is not None and guard.fired():
                # The credential expired or was revoked: say which, then end the response.
                outcome = await end_for_credential(request, response, guard)
            else:
                # The peer stopped reading; drop it rather than hold its buffer. It resumes
                # by offset.
                outcome = "send_timeout"
                if request.transport is not None:
                    request.transport.abort()
        except ConnectionError:
            outcome = stream.gone
        except Exception:
            log.exception("stream_failed", job_id=job_id, last_seq=cursor.after)
            outcome = "error"
            if request.transport is not None:
                request.transport.abort()  # no terminating chunk: the client sees a cut
    except asyncio.CancelledError:
        if not stream.lost:
            raise
        outcome = stream.end_lost()  # the connection closed under an idle stream
    finally:
        unhook()
        metrics.stream_closed("sse", "job", outcome)
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


async def end_response(request: web.Request, response: web.StreamResponse, within: float) -> None:
    """End the body (its last chunk); drop the connection if the peer does not take it."""
    try:
        async with asyncio.timeout(within):
            await response.write_eof()
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        pass


async def end_for_credential(
    request: web.Request, response: web.StreamResponse, guard: StreamGuard
) -> str:
    """The stream's credential expired or was revoked: an ``event: error`` record saying
    which (``token_expired`` / ``forbidden``), then the end of the response; the outcome."""
    error = guard.end_error()
    within = request.app[CONFIG].stream.send_timeout
    record = control_frame({"code": error.code, "message": error.message})
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(within):
            await response.write(b"event: error\ndata: %s\n\n" % record)
    await end_response(request, response, within)
    return error.code
