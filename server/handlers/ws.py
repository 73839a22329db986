"""WebSocket transport: hello, the replay, then live events, heartbeats and ping/pong.

Only this handler's task calls ``receive()`` (client pings, client closes); a sender task
runs the cursor. Close codes follow protocol v1: 1000 after the terminal event, 1001 on
shutdown, 1009 for a client frame over ``stream.max_client_frame_bytes``, 1011 on a bug,
1013 for a peer that does not drain within ``stream.send_timeout``, 4004 / 4400 / 4409 final.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref

import orjson
import structlog
from aiohttp import WSMsgType, web

from ..errors import ServiceError, WSClose
from ..follow import Cursor, StreamClosing, follow
from ..frames import WRITE_PART_BYTES, Frame, control_frame, parts_of
from ..keys import CONFIG, HUB, STORE, STREAMS
from ..limits import RateLimiter, bound_send_buffer
from ..store import JobHead
from .subscription import close_code_for, subscribe

log = structlog.get_logger("jobfeed.stream")

_PONG = control_frame({"type": "pong"})
# Sockets whose sender is closing them for not draining (see _close_stuck).
_CLOSING_STUCK: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
# The close code the server chose, by outcome (ws.close_code holds the peer's reply).
_CLOSE_CODES = {
    "done": WSClose.DONE,
    "shutdown": WSClose.GOING_AWAY,
    "send_timeout": WSClose.OVERLOADED,
    "error": WSClose.INTERNAL,
}


async def serve_websocket(request: web.Request, job_id: str) -> web.WebSocketResponse:
    config = request.app[CONFIG].stream
    ws = web.WebSocketResponse(
        heartbeat=config.ping_seconds,
        # aiohttp refuses a frame of max_msg_size bytes; the protocol allows exactly the limit.
        max_msg_size=config.max_client_frame_bytes + 1,
        compress=False,  # compression halves fan-out throughput; events are small
    )
    await ws.prepare(request)
    bound_send_buffer(request, config.send_buffer_bytes)
    started = time.monotonic()
    cursor = Cursor(job_id, 0)
    outcome = "client_gone"
    closed_with: int | None = None
    after = None
    try:
        async with subscribe(request, job_id, request.query.get("after") or "0") as subscription:
            after = cursor.after = subscription.after
            request.app[STREAMS].add(ws)
            await ws.send_frame(subscription.hello(), WSMsgType.TEXT)
            sender = asyncio.create_task(_send_events(request, ws, cursor, subscription.head))
            try:
                await _receive_until_closed(ws, config.client_frames_per_second)
            finally:
                # A sender closing a stuck peer is left to finish (its close is bounded) so
                # that its outcome is known and the peer gets aborted. Otherwise the peer went
                # away or the close is done, and the cursor has nobody to send to.
                if not sender.done() and ws not in _CLOSING_STUCK:
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    outcome = await sender
    except ServiceError as exc:
        outcome = "refused"
        closed_with = close_code_for(exc)
        await _refuse(ws, closed_with, exc.code, exc.message)
    finally:
        request.app[STREAMS].discard(ws)
        log.info(
            "stream_closed",
            transport="ws",
            after=after,
            sent=cursor.sent,
            last_seq=cursor.after,
            outcome=outcome,
            close_code=closed_with or _CLOSE_CODES.get(outcome, ws.close_code),
            seconds=round(time.monotonic() - started, 3),
        )
    return ws


async def _refuse(ws: web.WebSocketResponse, code: int, error: str, message: str) -> None:
    await ws.send_frame(
        control_frame({"type": "error", "code": error, "message": message}), WSMsgType.TEXT
    )
    await ws.close(code=code, message=error.encode())


async def _send_events(
    request: web.Request, ws: web.WebSocketResponse, cursor: Cursor, head: JobHead
) -> str:
    """Run the cursor to the end of the job (or until closed); return how it ended."""
    config = request.app[CONFIG].stream
    batches = follow(
        request.app[STORE],
        request.app[HUB],
        cursor,
        head,
        page_events=config.page_events,
        page_bytes=config.page_bytes,
        idle_seconds=config.heartbeat_seconds,
        push=functools.partial(_push, request, ws),
    )
    try:
        async for batch in batches:
            async with asyncio.timeout(config.send_timeout):
                if batch is None:
                    heartbeat = control_frame({"type": "heartbeat", "last_seq": cursor.after})
                    await ws.send_frame(heartbeat, WSMsgType.TEXT)
                    continue
                await _write_batch(request, ws, batch)
        await ws.close(code=WSClose.DONE, message=b"job finished")
        return "done"
    except StreamClosing:
        await ws.close(code=WSClose.GOING_AWAY, message=b"server shutting down")
        return "shutdown"
    except TimeoutError:
        # The peer stopped reading. Dropping it bounds what we hold; it resumes by offset.
        await _close_stuck(request, ws)
        return "send_timeout"
    except ConnectionError:
        return "client_gone"
    except Exception:
        log.exception("stream_failed", job_id=cursor.job_id, last_seq=cursor.after)
        with contextlib.suppress(Exception):
            await ws.close(code=WSClose.INTERNAL, message=b"internal error")
        return "error"


def _push(request: web.Request, ws: web.WebSocketResponse, batch: list[Frame]) -> bool:
    """The publisher's direct send to a caught-up subscriber (``server.hub``): only while
    the socket takes data without waiting; otherwise the subscriber's task sends (and waits
    under ``stream.send_timeout``)."""
    return not request.protocol.writing_paused and _write_frames(request, ws, batch)


async def _write_batch(request: web.Request, ws: web.WebSocketResponse, batch: list[Frame]) -> None:
    """Send a batch of event frames in parts of about ``WRITE_PART_BYTES``; after each,
    wait while the transport is over its high-water mark, as ``send_frame`` does, so that
    the transport never buffers a whole batch for a peer that reads slowly or not at all."""
    protocol = request.protocol
    for part in parts_of(batch, WRITE_PART_BYTES):
        if not _write_frames(request, ws, part):
            raise ConnectionResetError("the WebSocket is closed")
        if protocol.writing_paused:
            # aiohttp's flow control (BaseProtocol): resumes when the peer has read enough.
            await protocol._drain_helper()


def _write_frames(request: web.Request, ws: web.WebSocketResponse, batch: list[Frame]) -> bool:
    """A batch of event frames in one ``writelines`` (one syscall, no copies) rather than one
    ``send_frame`` each; False, writing nothing, once the socket is closing. Compression is
    off, so a frame is header + stored JSON; aiohttp also writes whole frames, so its pings
    and pongs never land inside one of ours."""
    transport = request.transport
    if ws.closed or transport is None or transport.is_closing():
        return False
    parts: list[bytes] = []
    for frame in batch:
        parts.append(frame.ws_header)
        parts.append(frame.json)
    transport.writelines(parts)
    return True


async def _close_stuck(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Send close 1013 without waiting for the backlog to drain; abort if the peer does not
    answer within a second. ``drain=False`` matters: the send timeout cancelled aiohttp's
    drain waiter, and a second drain would re-raise that cancellation at once (the close
    would end with a bare CancelledError and the connection would linger until ping timeout).
    """
    _CLOSING_STUCK.add(ws)
    try:
        async with asyncio.timeout(1):
            await ws.close(code=WSClose.OVERLOADED, message=b"send timeout", drain=False)
    except Exception:
        # The peer (not reading) never answered the close: drop the connection; it sees
        # 1006 if the close frame was stuck behind its backlog, and resumes by offset.
        if request.transport is not None:
            request.transport.abort()


async def _receive_until_closed(ws: web.WebSocketResponse, frames_per_second: float) -> None:
    """Answer client pings; refuse anything else politely; return when the socket closes.

    Client frames beyond ``stream.client_frames_per_second`` (a burst of twice that) are
    read and dropped unanswered, so a ping flood cannot make the server write for it; the
    first dropped frame of each flood gets one ``rate_limited`` error frame.
    """
    budget: RateLimiter | None = None  # made at the first client frame: most peers send none
    warned = False
    async for message in ws:
        if budget is None:
            budget = RateLimiter(frames_per_second, max(1, int(2 * frames_per_second)), 1)
        if budget.take("") > 0:
            if not warned:
                warned = True
                error = {
                    "type": "error",
                    "code": "rate_limited",
                    "message": f"more than {frames_per_second:g} client frames per second "
                    "(stream.client_frames_per_second); extra frames are ignored",
                }
                await ws.send_frame(control_frame(error), WSMsgType.TEXT)
            continue
        warned = False
        if message.type == WSMsgType.TEXT:
            try:
                payload = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                payload = None
            if isinstance(payload, dict) and payload.get("type") == "ping":
                await ws.send_frame(_PONG, WSMsgType.TEXT)
            else:
                error = {
                    "type": "error",
                    "code": "unknown_frame",
                    "message": 'the only client frame is {"type": "ping"}',
                }
                await ws.send_frame(control_frame(error), WSMsgType.TEXT)
        elif message.type == WSMsgType.BINARY:
            error = {
                "type": "error",
                "code": "unknown_frame",
                "message": "binary frames are not part of the protocol",
            }
            await ws.send_frame(control_frame(error), WSMsgType.TEXT)
