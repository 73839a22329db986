"""``GET /v1/ingest``: the producer stream, a WebSocket on which a producer pipelines
``append`` and ``create`` requests (docs/protocol.md, "Producer stream"; spec ingest.md).

Two tasks per connection. The handler's task reads frames, checks each one as the HTTP
handlers would (``server.appends``) and hands it to the writer at once, without waiting for
its commit (``Writer.submit_append``): the writer applies requests in the order they are
submitted, so one connection's thousand requests land in a few group commits, in order. The
answering task takes the requests in the order they were read and sends each one's ``ack``
(after its commit) or ``error``; a refused request is answered alone and refuses nothing
else (the writer plans each request on its own).

Flow control: at most ``ingest.max_in_flight`` requests are unanswered; past it the handler
stops reading, so the kernel's buffers fill and TCP pushes back on the producer. Answers are
written under ``stream.send_timeout``: a producer that does not read them is cut off (1013),
so what one connection holds is bounded by its window, whoever is slow.

The connection ends by: the producer closing (what it has not taken is not sent), a frame over
``limits.max_body_bytes`` (1009, closed by aiohttp at once), shutdown (stop reading, answer
what was read, 1001), the credential expiring or being revoked (the same, then ``error`` and
4401 / 4403), or a producer that does not read (1013).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import WSMsgType, web

from ..appends import ack_frame, append_ack, append_outcome, parse_append, parse_create
from ..auth import WRITE, Principal, require
from ..config import Config
from ..cors import is_websocket_upgrade
from ..errors import (
    BadRequest,
    InvalidJson,
    ServiceError,
    ValidationFailed,
    WSClose,
)
from ..ingest import IngestSlot
from ..keys import CONFIG, INGEST, METRICS, STORE
from ..limits import bound_send_buffer
from ..metrics import Metrics
from ..writer import AppendResult, Writer
from .guard import guard_stream
from .subscription import close_code_for
from .ws import close_socket, drop_backlog, refuse, send_control_frames

log = structlog.get_logger("jobfeed.ingest")

_APPEND_FIELDS = frozenset({"type", "ref", "job_id", "events", "event"})
_FRAME_FIELDS = ("type", "ref")
_YIELD_EVERY = 64  # frames read in a row before the reader lets other tasks run


@dataclass(slots=True)
class _Request:
    """One request read and not yet answered: its writer future (None: refused at once, and
    ``frame`` is its error), or the frame to send."""

    ref: int | None
    future: asyncio.Future[Any] | None
    frame: bytes = b""
    append: bool = True
    started: float = 0.0


class _Stats:
    __slots__ = ("events", "refused", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.events = 0
        self.refused = 0


async def ingest(request: web.Request) -> web.WebSocketResponse:
    if not is_websocket_upgrade(request):
        raise BadRequest("the producer stream needs a WebSocket upgrade")
    config = request.app[CONFIG]
    ws: web.WebSocketResponse = web.WebSocketResponse(
        heartbeat=config.stream.ping_seconds,
        # aiohttp refuses a frame of max_msg_size bytes; the protocol allows exactly the limit.
        max_msg_size=config.limits.max_body_bytes + 1,
        compress=False,
    )
    await ws.prepare(request)
    bound_send_buffer(request, config.stream.send_buffer_bytes)
    metrics = request.app[METRICS]
    try:
        principal = require(request, WRITE)
        slot = request.app[INGEST].admit(request)
    except ServiceError as exc:
        code = close_code_for(exc)
        metrics.refused(exc.code)
        await refuse(request, ws, code, exc.code, exc.message)
        log.info("ingest_closed", outcome=exc.code, close_code=code, requests=0, events=0)
        return ws
    metrics.ingest_opened += 1
    try:
        await IngestConnection(request, ws, principal, slot).run()
    finally:
        request.app[INGEST].release(slot)
        metrics.ingest_closed += 1
    return ws


class IngestConnection:
    """One producer stream: the read loop (the handler's task) and the answers (its own)."""

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        principal: Principal,
        slot: IngestSlot,
    ) -> None:
        config: Config = request.app[CONFIG]
        self._request = request
        self._ws = ws
        self._principal = principal
        self._slot = slot
        self._limits = config.limits
        self._kind_timeouts = config.watchdog.kinds
        self._max_in_flight = config.ingest.max_in_flight
        self._send_timeout = config.stream.send_timeout
        self._writer: Writer = request.app[STORE].writer
        self._metrics: Metrics = request.app[METRICS]
        self._pending: collections.deque[_Request] = collections.deque()
        # Set by the reader when it adds a request, by the answerer when it makes room.
        self._added = asyncio.Event()
        self._room = asyncio.Event()
        self._reading = True
        self._stats = _Stats()

    async def run(self) -> None:
        started = time.monotonic()
        outcome, close_code = "client_gone", None
        ending: ServiceError | None = None
        answering = asyncio.create_task(self._answer(), name="ingest-answers")
        guard = guard_stream(self._request, self._principal, None)
        try:
            try:
                if guard is None:
                    await self._read()
                else:
                    async with guard:
                        await self._read()
            except TimeoutError:
                if guard is None or not guard.fired():
                    raise
                ending = guard.end_error()  # the credential expired or was revoked
                self._slot.stop(ending.code)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._slot.stopped is None or task is None or task.uncancel() > 0:
                    raise  # not our own stop: the handler itself is being cancelled
            self._reading = False
            self._added.set()
            outcome, close_code = await self._finish(answering, ending)
        except Exception:
            log.exception("ingest_failed", requests=self._stats.requests)
            outcome, close_code = "error", WSClose.INTERNAL
            await close_socket(self._request, self._ws, WSClose.INTERNAL, b"internal error")
        finally:
            if not answering.done():
                answering.cancel()
            self._forget_pending()
            drop_backlog(self._request.transport)
            log.info(
                "ingest_closed",
                requests=self._stats.requests,
                events=self._stats.events,
                refused=self._stats.refused,
                outcome=outcome,
                close_code=close_code,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _finish(
        self, answering: asyncio.Task[None], ending: ServiceError | None
    ) -> tuple[str, int | None]:
        """After reading stopped: answer what was read when the socket still takes answers,
        then close; how the stream ended."""
        ws, stopped = self._ws, self._slot.stopped
        if stopped is None or stopped == "too_big":
            # The producer closed, the connection dropped, or aiohttp closed it (1009).
            answering.cancel()
            if stopped == "too_big":
                return "too_big", WSClose.TOO_BIG
            return "client_gone", ws.close_code
        await asyncio.wait([answering])
        if self._slot.dropped:
            return "shutdown", 1006
        if stopped == "send_timeout":
            await close_socket(self._request, ws, WSClose.OVERLOADED, b"send timeout")
            return "send_timeout", WSClose.OVERLOADED
        if answering.exception() is not None:
            return "client_gone", ws.close_code
        if ending is not None:
            code = close_code_for(ending)
            self._metrics.refused(ending.code)
            await refuse(self._request, ws, code, ending.code, ending.message)
            return ending.code, code
        await close_socket(self._request, ws, WSClose.GOING_AWAY, b"server shutting down")
        return "shutdown", WSClose.GOING_AWAY

    # -- reading ------------------------------------------------------------------------

    async def _read(self) -> None:
        """Read and submit requests until the socket closes or ``stop`` is called."""
        ws, slot, pending = self._ws, self._slot, self._pending
        read = 0
        while slot.stopped is None:
            slot.parked = True
            try:
                read += 1
                if read % _YIELD_EVERY == 0:
                    # receive() does not suspend while frames are buffered: a producer's burst
                    # would hold the loop, and the commits' answers, until it is all read.
                    await asyncio.sleep(0)
                while len(pending) >= self._max_in_flight:
                    # Not reading is the backpressure: the producer's writes block in TCP.
                    self._room.clear()
                    await self._room.wait()
                message = await ws.receive()
            finally:
                slot.parked = False
            kind = message.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                item = self._take(message.data)
                pending.append(item)
                self._stats.requests += 1
                self._added.set()
            elif kind is WSMsgType.ERROR:
                if ws.close_code == WSClose.TOO_BIG:
                    slot.stop("too_big")
                return
            elif kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return

    def _take(self, data: str | bytes) -> _Request:
        """One frame as a request handed to the writer, or refused at once."""
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return self._refused(None, InvalidJson(f"the frame is not valid JSON: {exc}"))
        if not isinstance(frame, dict):
            return self._refused(None, InvalidJson("a frame must be a JSON object"))
        ref = frame.get("ref")
        if type(ref) is not int:
            detail = {"loc": ["ref"], "msg": "ref must be an integer", "type": "int_type"}
            return self._refused(None, ValidationFailed("the frame needs a ref", [detail]))
        kind = frame.get("type")
        try:
            if kind == "append":
                return self._append(ref, frame)
            if kind == "create":
                return self._create(ref, frame)
            raise BadRequest('client frames are {"type": "append"} and {"type": "create"}')
        except ServiceError as exc:
            return self._refused(ref, exc, append=kind == "append")

    def _append(self, ref: int, frame: dict[str, Any]) -> _Request:
        job_id = frame.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise _invalid("job_id", "job_id must be a non-empty string", "string_type")
        extra = frame.keys() - _APPEND_FIELDS
        if extra:
            raise _invalid(sorted(extra)[0], "unexpected field in an append", "extra_forbidden")
        if "events" in frame:
            if "event" in frame:
                raise _invalid("event", "send events or event, not both", "extra_forbidden")
            body: Any = {"events": frame["events"]}
        elif "event" in frame:
            body = frame["event"]  # one event: exactly the HTTP body of one event
        else:
            raise _invalid("events", "an append needs events or event", "missing")
        key = self._principal.job_key(job_id)
        events = parse_append(job_id, body, self._limits)
        future = self._writer.submit_append(key, events)
        return _Request(ref, future, started=time.perf_counter())

    def _create(self, ref: int, frame: dict[str, Any]) -> _Request:
        body = {name: value for name, value in frame.items() if name not in _FRAME_FIELDS}
        job = parse_create(self._principal, body, self._limits, self._kind_timeouts)
        future = self._writer.submit_create(job.key, job.kind, job.metadata, job.heartbeat_timeout)
        return _Request(ref, future, append=False)

    def _refused(self, ref: int | None, error: ServiceError, append: bool = False) -> _Request:
        if append:
            self._metrics.append_requests[append_outcome(error)] += 1
        return _Request(ref, None, self._error(ref, error), append=False)

    # -- answering ----------------------------------------------------------------------

    async def _answer(self) -> None:
        """Send each request's answer in the order read, as soon as it and every request
        before it are answered; one write for all those ready together."""
        pending, added = self._pending, self._added
        try:
            while True:
                if not pending:
                    if not self._reading:
                        return
                    added.clear()
                    await added.wait()
                    continue
                head = pending[0].future
                if head is not None and not head.done():
                    await asyncio.wait([head])
                frames = []
                while pending:
                    item = pending[0]
                    if item.future is not None and not item.future.done():
                        break
                    pending.popleft()
                    frames.append(self._answer_frame(item) if item.future else item.frame)
                if len(pending) < self._max_in_flight:
                    self._room.set()
                async with asyncio.timeout(self._send_timeout):
                    await send_control_frames(self._request, self._ws, frames)
        except TimeoutError:
            self._slot.stop("send_timeout")  # the producer does not read its answers
        except ConnectionError:
            self._slot.stop("client_gone")
            raise

    def _answer_frame(self, item: _Request) -> bytes:
        """The ``ack`` or ``error`` of a request whose future has settled."""
        future = item.future
        assert future is not None
        error = future.exception()
        if item.append:
            counts = self._metrics.append_requests
            if error is None:
                result: AppendResult = future.result()
                counts[append_outcome(None, result)] += 1
                self._metrics.append_ack_seconds.observe(time.perf_counter() - item.started)
                self._stats.events += len(result.events)
                assert item.ref is not None  # a request without a ref never reaches the writer
                return ack_frame(item.ref, append_ack(result))
            counts[append_outcome(error)] += 1
        elif error is None:
            snapshot: bytes = future.result().to_json()
            assert item.ref is not None
            return ack_frame(item.ref, b'{"job":%b}' % snapshot)
        if isinstance(error, ServiceError):
            return self._error(item.ref, error)
        log.error("ingest_request_failed", ref=item.ref, error=repr(error))
        return self._error(item.ref, ServiceError("an internal error occurred; it has been logged"))

    def _error(self, ref: int | None, error: ServiceError) -> bytes:
        self._metrics.refused(error.code)
        self._stats.refused += 1
        return _error_frame(ref, error)

    def _forget_pending(self) -> None:
        """Requests never answered (the producer went away): the writer still commits them;
        their outcome is read so that asyncio does not log it as never retrieved."""
        for item in self._pending:
            if item.future is not None:
                item.future.add_done_callback(_retrieve)
        self._pending.clear()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _invalid(field: str, msg: str, kind: str) -> ValidationFailed:
    return ValidationFailed("the frame is not valid", [{"loc": [field], "msg": msg, "type": kind}])


def _error_frame(ref: int | None, error: ServiceError) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "ref": ref,
            "code": error.code,
            "message": error.message,
            "details": error.details,
        }
    )
