"""Overload limits: the open-connection cap, per-job stream slots, per-client request rate.

Each limit refuses in the protocol's error shape (503 ``overloaded`` / 429 ``rate_limited``,
with ``Retry-After``) and holds a bounded amount of memory however many clients there are.

The connection cap lives below the application, in the low-level ``web.Server`` that is the
listening socket's protocol factory: only it sees a connection open and close (the app sees
requests). A connection past the cap is still accepted and its first request is read, then
answered 503 and closed — answering before the request is read would race the client's
write against our close (the client may see a reset instead of the 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from .errors import error_body
from .handlers.eventsource import SSE_HEADERS, error_record, retry_field, wants_event_stream
from .tenancy import JobKey

log = structlog.get_logger("jobfeed.limits")

# A refused connection gets this long to send its request and read the 503; then it is closed
# whatever it is doing, so that refused connections cannot pile up behind the cap.
REFUSED_GRACE_SECONDS = 2.0


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, with the errors it answers itself (a malformed request
    line, too many or too large headers) in the protocol's error shape instead of text; a
    header deadline for every request (``ConnectionCappedServer``); and ``on_lost``, called
    once when the connection closes (``server.streams``: an idle stream hears of it at once).
    """

    __slots__ = ("on_lost",)  # aiohttp's handler is slotted: no per-connection __dict__

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.on_lost: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        # The first bytes of a request on a kept-alive connection start its header deadline
        # (a new connection's starts when it opens). Not while a request is being handled
        # (its body is limits.body_timeout's) or once upgraded to a WebSocket.
        manager = self._manager
        if (
            not self._request_in_progress
            and not self._upgraded
            and isinstance(manager, ConnectionCappedServer)
        ):
            manager.expect_headers(self)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The parent logs the error and refuses when a response was already under way.
        plain = super().handle_error(request, status, exc, message)
        if status >= 500:
            body = error_body("internal_error", "an internal error occurred; it has been logged")
        else:
            body = error_body("bad_request", message or plain.reason or "bad request")
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class ConnectionCappedServer(web.Server):
    """aiohttp's low-level server with at most ``max_connections`` admitted connections.

    Built from the server ``AppRunner`` makes for the app (same handler, request factory and
    handler options); refused connections are not counted, so a flood of them cannot keep
    the cap full once admitted connections close.
    """

    def __init__(
        self, inner: web.Server, max_connections: int, header_timeout: float = 10.0
    ) -> None:
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            **inner._kwargs,
        )
        self.max_connections = max_connections
        self._admit = inner.request_handler
        self.request_handler = self._handle_or_refuse
        self.header_timeout = header_timeout
        self._admitted: set[web.RequestHandler] = set()
        self._refused: set[web.RequestHandler] = set()
        # Admitted connections waiting for a request's headers (a new connection's first, or
        # the next one on a kept-alive connection once its first bytes arrive), with the timer
        # that drops them; it is cancelled when the headers arrive, so that a long-lived
        # request (a stream) does not hold it for header_timeout.
        self._awaiting_headers: dict[web.RequestHandler, asyncio.TimerHandle] = {}

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def admitted(self) -> int:
        return len(self._admitted)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._admitted) < self.max_connections:
            self._admitted.add(handler)
            # aiohttp has no deadline for a request's headers: a peer trickling them (or
            # sending nothing) would hold its slot forever. Keep-alive idling is aiohttp's.
            self.expect_headers(handler)
            return
        self._refused.add(handler)
        asyncio.get_running_loop().call_later(REFUSED_GRACE_SECONDS, transport.close)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        self._admitted.discard(handler)
        self._refused.discard(handler)
        timer = self._awaiting_headers.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def expect_headers(self, handler: web.RequestHandler) -> None:
        """Start ``handler``'s header deadline, unless it runs already."""
        if handler in self._awaiting_headers or handler not in self._admitted:
            return
        self._awaiting_headers[handler] = asyncio.get_running_loop().call_later(
            self.header_timeout, self._drop_if_silent, handler
        )

    def _drop_if_silent(self, handler: web.RequestHandler) -> None:
        if self._awaiting_headers.pop(handler, None) is not None:
            log.info("connection_dropped", reason="header_timeout", seconds=self.header_timeout)
            if handler.transport is not None:
                handler.transport.close()

    def _handle_or_refuse(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine itself: an admitted request's handler coroutine is returned as is,
        # so that no extra frame stays alive for as long as a stream lasts.
        if request.protocol not in self._refused:
            timer = self._awaiting_headers.pop(request.protocol, None)
            if timer is not None:
                timer.cancel()
            return self._admit(request)
        return self._refuse(request)

    async def _refuse(self, request: web.BaseRequest) -> web.StreamResponse:
        log.debug("connection_refused", remote=request.remote, open=len(self._admitted))
        message = (
            f"the server has {self.max_connections} open connections "
            "(server.max_connections); retry later"
        )
        if wants_event_stream(request):
            # EventSource gives up on a 503 but retries after a 200 that ends.
            response = web.Response(
                status=200,
                body=retry_field(1000, 1) + error_record("overloaded", message),
                headers=SSE_HEADERS,
            )
            response.force_close()
            return response
        response = web.Response(
            body=error_body("overloaded", message),
            status=503,
            content_type="application/json",
            headers={"Retry-After": "1"},
        )
        response.force_close()  # Connection: close; the slot was never ours
        return response


class ConnectionCappedRunner(web.AppRunner):
    """``AppRunner`` whose sites accept through a ``ConnectionCappedServer``."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        header_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        return ConnectionCappedServer(
            await super()._make_server(), self._max_connections, self._header_timeout
        )


class JobStreamSlots:
    """Open streams per job (per tenant's job: ``JobKey``), at most ``per_job`` each; only
    jobs with an open stream are kept."""

    def __init__(self, per_job: int) -> None:
        self.per_job = per_job
        self._open: dict[JobKey, int] = {}

    def acquire(self, key: JobKey) -> bool:
        count = self._open.get(key, 0)
        if count >= self.per_job:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: JobKey) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)


class RateLimiter:
    """A token bucket per client address: ``rate`` requests per second, ``burst`` at once.

    The table holds at most ``max_clients`` addresses; the least recently seen is forgotten
    first (it comes back with a full bucket, which errs on the side of serving it).
    """

    def __init__(self, rate: float, burst: int, max_clients: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        # address -> (tokens, monotonic time they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float | None = None) -> float:
        """Spend a token of ``client``'s; 0.0 if it had one, else seconds until it will."""
        now = time.monotonic() if now is None else now
        entry = self._buckets.pop(client, None)
        if entry is None:
            tokens = self.burst
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate


def bound_send_buffer(request: web.BaseRequest, size: int) -> None:
    """Cap a stream socket's kernel send buffer at ``size`` bytes (0: leave it to the kernel).

    Linux autotunes it up to 4 MiB per socket: a subscriber that stops reading would pin that
    much kernel memory, and ``stream.send_timeout`` would only start counting once it was full.
    """
    sock = None if request.transport is None else request.transport.get_extra_info("socket")
    if size and sock is not None:
        with contextlib.suppress(OSError):  # not a TCP socket, e.g. a Unix socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
