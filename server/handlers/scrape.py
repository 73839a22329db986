"""``GET /metrics``: the Prometheus text (``server.metrics``), for a scraper.

With authentication on it needs a ``jobs:admin`` credential or the ``[metrics] token``
(operations.md, Metrics): the figures name no job or tenant, but their movement tells an
outsider how busy the service is. The path is among the app's public paths, so the request
middleware leaves the credential to this handler (a scraper holds no JWT).
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from ..auth import ADMIN, authenticate, bearer_token
from ..errors import Forbidden, ServiceError
from ..keys import AUTH, CONFIG, HUB, METRICS, STORE, STREAMS
from ..metrics import Sources, render

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# On the metrics app (``metrics.host`` set): the application whose figures it serves.
SERVED_APP = web.AppKey("served_app", web.Application)


async def metrics(request: web.Request) -> web.Response:
    app = request.app.get(SERVED_APP, request.app)
    authenticator = app[AUTH]
    if authenticator.enabled and not _holds_metrics_token(app, request):
        principal = authenticate(request, authenticator)
        if not principal.allows(ADMIN):
            raise Forbidden(f"/metrics needs the scope {ADMIN} or the metrics.token")
    # One descent of the log's primary key: the retention horizon, exact at every scrape.
    oldest = await app[STORE].oldest_event_seconds()
    text = render(app[METRICS], _sources(app, oldest))
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


def metrics_app(served: web.Application) -> web.Application:
    """``GET /metrics`` alone, for its own address (``metrics.host``, ``port``), reporting on
    ``served``; the same credential rules, refusals in the same error shape."""
    app = web.Application(middlewares=[_refusals])
    app[SERVED_APP] = served
    app.router.add_get("/metrics", metrics)
    return app


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        request.app[SERVED_APP][METRICS].refused(exc.code)
        return web.Response(
            body=exc.body(), status=exc.status, content_type="application/json", headers=exc.headers
        )


def _holds_metrics_token(app: web.Application, request: web.Request) -> bool:
    expected = app[CONFIG].metrics.token.get_secret_value()
    header = request.headers.get("Authorization")
    if not expected or header is None:
        return False
    return hmac.compare_digest(bearer_token(header).encode(), expected.encode())


def _sources(app: web.Application, oldest_event_seconds: float | None) -> Sources:
    store, hub = app[STORE], app[HUB]
    writer, deleter, retention = store.writer, store.deleter, store.retention
    watchdog = store.watchdog
    last = None if retention is None else retention.last
    return Sources(
        commits=writer.commits,
        events_written=writer.events_written,
        commit_group_events=writer.group_events,
        writer_queue_events=writer.pending,
        storage_faults=writer.faults,
        storage_healthy=writer.healthy,
        job_cache_jobs=writer.cached_jobs,
        job_cache_bytes=writer.cache_bytes,
        frame_cache_bytes=hub.total_bytes,
        feed_cache_bytes=hub.feed.cached_bytes,
        job_frames_sent=hub.frames_sent,
        feed_frames_sent=hub.feed.frames_sent,
        database_path=store.path,
        jobs_by_status=writer.jobs_by_status,
        jobs_deleted=deleter.jobs_deleted,
        events_deleted=deleter.events_deleted,
        delete_transaction_seconds=deleter.transaction_seconds,
        retention_sweeps=0 if retention is None else retention.sweeps,
        retention_last_seconds=None if last is None else last.seconds,
        retention_last_longest_seconds=None if last is None else last.longest_transaction,
        oldest_event_seconds=oldest_event_seconds,
        jobs_lost=0 if watchdog is None else watchdog.lost,
        watched_jobs=0 if watchdog is None else watchdog.watched,
        subscriber_lag=app[STREAMS].lag(hub.high_water, hub.feed.high_water),
    )
