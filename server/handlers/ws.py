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

from ..auth import PRINCIPAL
from ..errors import ServiceError, WSClose
from ..follow import Cursor, StreamClosing, follow
from ..frames import Frame, control_frame
from ..keys import CONFIG, HUB, STORE, STREAMS
from ..limits import RateLimiter, bound_send_buffer
from ..store import JobHead
from ..tenancy import DEFAULT_TENANT, JobKey
from .guard import StreamGuard, guard_stream
from .subscription import close_code_for, subscribe

log = structlog.get_logger("jobfeed.stream")

_PONG = control_frame({"type": "pong"})
_AUTH_OFF_OK = control_frame({"type": "auth_ok", "expires_at": None})
# Sockets whose sender is closing them for not draining (see _close_stuck).
_CLOSING_STUCK: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
# The close code the server chose, by outcome (ws.close_code holds the peer's reply).
_CLOSE_CODES = {
    "done": WSClose.DONE,
    "shutdown": WSClose.GOING_AWAY,
    "send_timeout": WSClose.OVERLOADED,
    "error": WSClose.INTERNAL,
}


class StreamEnded(Exception):
    """The server ends this stream for its credential: expired, revoked, or refused in an
    in-band ``auth`` frame. The handler stops the sender, then sends ``error`` and closes."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


def _new_socket(request: web.Request) -> web.WebSocketResponse:
    config = request.app[CONFIG].stream
    return web.WebSocketResponse(
        heartbeat=config.ping_seconds,
        # aiohttp refuses a frame of max_msg_size bytes; the protocol allows exactly the limit.
        max_msg_size=config.max_client_frame_bytes + 1,
        compress=False,  # compression halves fan-out throughput; events are small
    )


async def refuse_websocket(request: web.Request, error: ServiceError) -> web.WebSocketResponse:
    """A credential refused at the upgrade: accept, send the ``error`` frame and close with
    4401 / 4403. A browser cannot read the status of a refused handshake (it sees 1006), but
    it can read a close code: this tells it to re-authenticate rather than retry."""
    ws = _new_socket(request)
    await ws.prepare(request)
    code = close_code_for(error)
    await _refuse(ws, code, error.code, error.message)
    log.info("stream_closed", transport="ws", outcome=error.code, close_code=code)
    return ws


async def serve_websocket(request: web.Request, job_id: str) -> web.WebSocketResponse:
    config = request.app[CONFIG].stream
    principal = request[PRINCIPAL]
    ws = _new_socket(request)
    await ws.prepare(request)
    bound_send_buffer(request, config.send_buffer_bytes)
    started = time.monotonic()
    cursor = Cursor(JobKey(DEFAULT_TENANT, job_id), 0)
    outcome = "client_gone"
    closed_with: int | None = None
    after = None
    try:
        raw_after = request.query.get("after") or "0"
        async with subscribe(request, principal, job_id, raw_after) as subscription:
            cursor.key = subscription.key
            after = cursor.after = subscription.after
            request.app[STREAMS].add(ws)
            await ws.send_frame(subscription.hello(), WSMsgType.TEXT)
            guard = guard_stream(request, principal, job_id)
            sender = asyncio.create_task(_send_events(request, ws, cursor, subscription.head))
            ending: ServiceError | None = None
            try:
                await _receive_guarded(ws, config.client_frames_per_second, guard)
            except StreamEnded as ended:
                ending = ended.error
            finally:
                # A sender closing a stuck peer is left to finish (its close is bounded) so
                # that its outcome is known and the peer gets aborted. Otherwise the peer went
                # away, the close is done, or the credential ended the stream: the cursor has
                # nobody to send to.
                if not sender.done() and ws not in _CLOSING_STUCK:
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    outcome = await sender
            if ending is not None and not ws.closed:
                outcome = ending.code
                closed_with = close_code_for(ending)
                await _refuse(ws, closed_with, ending.code, ending.message)
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
        log.exception("stream_failed", job_id=cursor.key.job_id, last_seq=cursor.after)
        with contextlib.suppress(Exception):
            await ws.close(code=WSClose.INTERNAL, message=b"internal error")
        return "error"


def _push(request: web.Request, ws: web.WebSocketResponse, batch: list[Frame]) -> bool:
    """The publisher's direct send to a caught-up subscriber (``server.hub``): only while
    the socket takes data without waiting; otherwise the subscriber's task sends (and waits
    under ``stream.send_timeout``)."""
    return not request.protocol.writing_paused and _write_frames(request, ws, batch)


async def _write_batch(request: web.Request, ws: web.WebSocketResponse, batch: list[Frame]) -> None:
    """Send a batch of event frames, then wait while the transport is over its high-water
    mark, as ``send_frame`` does."""
    if not _write_frames(request, ws, batch):
        raise ConnectionResetError("the WebSocket is closed")
    protocol = request.protocol
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


async def _receive_guarded(
    ws: web.WebSocketResponse, frames_per_second: float, guard: StreamGuard | None
) -> None:
    """``_receive_until_closed`` within the credential's lifetime (``StreamEnded`` after)."""
    if guard is None:
        await _receive_until_closed(ws, frames_per_second, None)
        return
    try:
        async with guard.watch():
            await _receive_until_closed(ws, frames_per_second, guard)
    except TimeoutError:
        if guard.fired():
            raise StreamEnded(guard.end_error()) from None
        raise


async def _receive_until_closed(
    ws: web.WebSocketResponse, frames_per_second: float, guard: StreamGuard | None
) -> None:
    """Answer client pings and ``auth`` frames; refuse anything else politely; return when
    the socket closes. An ``auth`` frame the guard refuses raises ``StreamEnded``.

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
            kind = payload.get("type") if isinstance(payload, dict) else None
            if kind == "ping":
                await ws.send_frame(_PONG, WSMsgType.TEXT)
            elif kind == "auth":
                await ws.send_frame(_refresh(guard, payload), WSMsgType.TEXT)
            else:
                error = {
                    "type": "error",
                    "code": "unknown_frame",
                    "message": 'client frames are {"type": "ping"} and {"type": "auth"}',
                }
                await ws.send_frame(control_frame(error), WSMsgType.TEXT)
        elif message.type == WSMsgType.BINARY:
            error = {
                "type": "error",
                "code": "unknown_frame",
                "message": "binary frames are not part of the protocol",
            }
            await ws.send_frame(control_frame(error), WSMsgType.TEXT)


def _refresh(guard: StreamGuard | None, payload: dict[str, object]) -> bytes:
    """The answer to ``{"type": "auth", "token": ...}``: ``auth_ok`` with the new expiry."""
    if guard is None:  # authentication is off: nothing to refresh, nothing expires
        return _AUTH_OFF_OK
    try:
        principal = guard.refresh(payload.get("token"))
    except ServiceError as exc:
        raise StreamEnded(exc) from None
    return control_frame({"type": "auth_ok", "expires_at": principal.expires_at})
