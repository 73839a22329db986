"""``create_app(config)``: the aiohttp application with its resources, middlewares and routes."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from . import frame_schema, openapi
from .auth import ANONYMOUS, PRINCIPAL, Authenticator, authenticate
from .config import Config
from .cors import OriginPolicy, is_preflight, is_websocket_upgrade
from .errors import (
    OriginNotAllowed,
    RateLimited,
    ServiceError,
    StorageUnavailable,
    Unauthorized,
    error_body,
)
from .handlers import feed, health, ingest, jobs, scrape, stream, tickets, ui
from .handlers.eventsource import retryable_refusal, wants_event_stream
from .handlers.guard import GuardClock, recheck_revocations
from .handlers.ws import refuse_websocket
from .hub import Hub
from .ingest import IngestRegistry
from .keys import (
    AUTH,
    CONFIG,
    CONFIG_PATH,
    GUARDS,
    HUB,
    INGEST,
    METRICS,
    ORIGINS,
    RATE_LIMITER,
    REQUEST_ID,
    STORE,
    STREAMS,
)
from .limits import RateLimiter
from .metrics import Metrics
from .store import Store
from .streams import StreamRegistry

log = structlog.get_logger("jobfeed.http")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Generated request ids: a per-process random prefix and a counter. Unique within the log and
# across restarts, without a urandom syscall per request (uuid4 was 2 % of W1's profile).
_ID_PREFIX = os.urandom(4).hex()
_id_counter = itertools.count(1)
# Liveness and readiness probes come from the orchestrator's address; throttling them would
# turn a busy server into a restarted one.
_UNTHROTTLED_PATHS = frozenset({"/healthz", "/readyz"})
# Probes and the API description need no credential (auth.md, "Model"); /metrics checks its
# own (a jobs:admin token or metrics.token: server/handlers/scrape.py).
_PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/v1/openapi.json", "/v1/frames.schema.json", "/metrics"}
)
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One structured line per request, with ``request_id`` bound for every line logged
    within; every error leaves in the protocol's shape (a bug is logged and answered 500).

    One middleware, not an access-log one around an error one: a middleware's frame stays
    alive for as long as its request, and a stream's request lasts as long as the stream."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _REQUEST_ID_RE.match(given) else f"{_ID_PREFIX}-{next(_id_counter):x}"
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    status = 500
    try:
        try:
            # Admission is synchronous: a coroutine between this one and the handler would
            # keep its frame for as long as a stream lasts (docs/performance.md, W7).
            admitted = _admit(request)
            if admitted is None:
                response: web.StreamResponse = await handler(request)
            elif isinstance(admitted, ServiceError):
                response = await refuse_websocket(request, admitted)
            else:
                response = admitted
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _http_error_response(exc)
            request.app[METRICS].refused(_HTTP_CODES.get(exc.status, "http_error"))
        except Exception as exc:
            response = _error_response(request, exc)
        status = response.status
        return response
    finally:
        if request.app[CONFIG].log.access:
            log.info(
                "request",
                method=request.method,
                path=request.path,
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 3),
                remote=request.remote,
            )


def _admit(request: web.Request) -> web.Response | ServiceError | None:
    """CORS preflight, the WebSocket ``Origin`` check, and the credential, before the
    handler: None when the handler is to run (the request's ``Principal`` is set and bound
    into the log context as ``tenant`` and ``sub``), a response for a preflight, or the
    error to refuse a WebSocket upgrade with (after it, as 4401). Other refusals raise.

    Part of ``request_middleware``, not a middleware of its own: every middleware's frame
    stays alive for as long as its request, and a stream's request lasts as long as the
    stream (docs/performance.md, idle subscribers)."""
    app = request.app
    if is_preflight(request):
        return app[ORIGINS].preflight(request)
    if request.path in _PUBLIC_PATHS or request.match_info.http_exception is not None:
        return None  # a probe, or aiohttp's own 404 / 405
    if ui.is_public(request.path):
        return None  # the browser's pages and scripts (server/handlers/ui.py)
    upgrade = is_websocket_upgrade(request)
    if upgrade:
        origin = request.headers.get("Origin")
        if origin is not None and not app[ORIGINS].allows_websocket(request, origin):
            raise OriginNotAllowed(origin)
    authenticator = app[AUTH]
    if not authenticator.enabled:
        request[PRINCIPAL] = ANONYMOUS
        structlog.contextvars.bind_contextvars(tenant=ANONYMOUS.tenant)
        return None
    try:
        principal = authenticate(request, authenticator)
    except Unauthorized as exc:
        if upgrade:
            return exc
        raise
    request[PRINCIPAL] = principal
    structlog.contextvars.bind_contextvars(tenant=principal.tenant, sub=principal.sub)
    return None


async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streams included, names its request and carries the CORS headers
    for an allowed origin (headers go out at prepare)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id
    origins = request.app[ORIGINS]
    if origins.active:
        origins.add_headers(request, response)


def _http_error_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own 4xx/5xx (no route, wrong method, body too large) in the protocol's shape."""
    code = _HTTP_CODES.get(exc.status, "http_error")
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return web.Response(
        body=error_body(code, exc.reason),
        status=exc.status,
        content_type="application/json",
        headers=headers,
    )


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    """A refusal (``ServiceError``) as its own response; anything else is a bug: 500."""
    if isinstance(exc, ServiceError):
        request.app[METRICS].refused(exc.code)
        # A storage fault is logged by the writer, once per fault (storage_failed).
        if exc.status >= 500 and not isinstance(exc, StorageUnavailable):
            log.warning("request_refused", code=exc.code, message=exc.message)
        if wants_event_stream(request):
            # An EventSource stops for good on any status but 200: a retryable refusal is
            # a 200 stream of one error record (server/handlers/eventsource.py).
            refusal = retryable_refusal(exc, request.app[CONFIG].stream.sse_retry_ms)
            if refusal is not None:
                return refusal
        return web.Response(
            body=exc.body(),
            status=exc.status,
            content_type="application/json",
            headers=exc.headers,
        )
    # Called while the exception is being handled: log.exception records its traceback.
    log.exception("request_failed", method=request.method, path=request.path)
    return web.Response(
        body=error_body("internal_error", "an internal error occurred; it has been logged"),
        status=500,
        content_type="application/json",
    )


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """429 ``rate_limited`` for a client address over ``limits.rate_per_client``.

    Keyed on the peer address: ``X-Forwarded-For`` is not trusted (any client can send it),
    so behind a proxy the limit applies to the proxy as a whole (docs/operations.md).
    """
    limiter = request.app.get(RATE_LIMITER)
    if limiter is None or request.path in _UNTHROTTLED_PATHS:
        return await handler(request)
    wait = limiter.take(request.remote or "")
    if wait > 0:
        raise RateLimited(
            f"more than {limiter.rate:g} requests per second from this address "
            "(limits.rate_per_client); slow down",
            retry_after=max(1, math.ceil(wait)),
        )
    return await handler(request)


def create_app(config: Config, config_path: Path | None = None) -> web.Application:
    """The application for ``config``; ``config_path`` (the file it was read from) lets the
    revocation sweep re-read ``auth.not_before`` while the server runs."""
    limits = config.limits
    middlewares = [request_middleware]
    if limits.rate_per_client > 0:
        # Only when on: every middleware's frame stays alive for as long as a stream lasts.
        middlewares.append(rate_limit_middleware)
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=middlewares)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[HUB] = Hub(
        config.stream.cache_events_per_job,
        config.stream.cache_bytes,
        config.stream.feed_cache_events,
        config.stream.feed_cache_bytes,
        replay_share_bytes=config.stream.replay_share_bytes,
    )
    if limits.rate_per_client > 0:
        app[RATE_LIMITER] = RateLimiter(
            limits.rate_per_client, limits.rate_burst, limits.rate_max_clients
        )
    app[STREAMS] = StreamRegistry(
        config.stream.max_subscribers, config.stream.max_subscribers_per_job
    )
    app.cleanup_ctx.append(_store_ctx)
    # After the store's: cleanup contexts exit in reverse, so the streams have ended (and
    # stopped reading) before the store closes.
    app.cleanup_ctx.append(ended_at_shutdown("end-streams", _end_streams))
    app[INGEST] = IngestRegistry(config.ingest.max_connections)
    # After the store's too: the writer must still commit what the producers' streams read.
    app.cleanup_ctx.append(ended_at_shutdown("end-ingest", _end_ingest))
    app[AUTH] = Authenticator(config.auth)
    app[ORIGINS] = OriginPolicy(config.http)
    app[GUARDS] = GuardClock()
    if config_path is not None:
        app[CONFIG_PATH] = config_path
    app.cleanup_ctx.append(recheck_revocations)
    app.on_response_prepare.append(_tag_response)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/jobs", jobs.create_job)
    app.router.add_get("/v1/jobs", jobs.list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", jobs.get_job)
    app.router.add_delete("/v1/jobs/{job_id}", jobs.delete_job)
    app.router.add_post("/v1/jobs/{job_id}/events", jobs.append_events)
    app.router.add_get("/v1/jobs/{job_id}/events", jobs.read_events)
    # No HEAD: a stream has no headers-only form, and HEAD must never upgrade (405 instead).
    app.router.add_get("/v1/jobs/{job_id}/stream", stream.stream, allow_head=False)
    # The producer stream (a WebSocket only; no HEAD, as for the other streams).
    app.router.add_get("/v1/ingest", ingest.ingest, allow_head=False)
    app.router.add_post("/v1/tickets", tickets.create_ticket)
    app.router.add_get("/v1/feed", feed.feed, allow_head=False)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/v1/openapi.json", openapi.openapi_json)
    app.router.add_get("/v1/frames.schema.json", frame_schema.frames_schema_json)
    metrics = app[CONFIG].metrics
    if metrics.enabled and not metrics.host:  # else on its own address (scrape.metrics_app)
        app.router.add_get("/metrics", scrape.metrics)
    ui.add_routes(app)  # /client/ (the ES module, <jobfeed-progress>), /ui/ (the dashboard)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = Store(app[CONFIG], app[HUB])
    await store.open()
    app[STORE] = store
    log.info("store_opened", path=store.path, durability=app[CONFIG].storage.durability)
    try:
        yield
    finally:
        # Runs after every handler has finished: what was acknowledged is committed, and the
        # writer commits whatever is still queued before its connection closes.
        await store.close()
        log.info("store_closed", path=store.path)


def ended_at_shutdown(
    name: str, end: Callable[[web.Application, float], Coroutine[Any, Any, None]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx for connections that shutdown must end itself: ``end(app, grace)`` is
    called when shutdown begins and runs as a task beside aiohttp's wait for the requests in
    flight, each with half of ``server.shutdown_timeout`` (``server.__main__`` gives aiohttp
    the other half); the context exits once it has finished."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        ending: asyncio.Task[None] | None = None

        async def begin(app: web.Application) -> None:
            nonlocal ending
            grace = app[CONFIG].server.shutdown_timeout / 2
            ending = asyncio.create_task(end(app, grace), name=name)

        app.on_shutdown.append(begin)
        yield
        if ending is not None:
            await ending

    return ctx


def _end_streams(app: web.Application, grace: float) -> Coroutine[Any, Any, None]:
    """Every job and feed stream ends at once (``server.streams``)."""
    app[HUB].close()  # wakes every parked cursor: each stream closes itself (1001 / end of SSE)
    return app[STREAMS].end_all(grace)


def _end_ingest(app: web.Application, grace: float) -> Coroutine[Any, Any, None]:
    """Producer streams answer what they read, then close (``server.ingest``)."""
    return app[INGEST].end_all(grace)
