"""``GET /metrics``: the Prometheus text (``server.metrics``), for a scraper.

With authentication on it needs a ``jobs:admin`` credential or the ``[metrics] token``
(operations.md, Metrics): the figures name no job or tenant, but their movement tells an
outsider how busy the service is. The path is among the app's public paths, so the request
middleware leaves the credential to this handler (a scraper holds no JWT).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from ..auth import ADMIN, authenticate, bearer_token
from ..errors import Forbidden
from ..keys import AUTH, CONFIG, HUB, METRICS, STORE
from ..metrics import Sources, render

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def metrics(request: web.Request) -> web.Response:
    authenticator = request.app[AUTH]
    if authenticator.enabled and not _holds_metrics_token(request):
        principal = authenticate(request, authenticator)
        if not principal.allows(ADMIN):
            raise Forbidden(f"/metrics needs the scope {ADMIN} or the metrics.token")
    text = render(request.app[METRICS], _sources(request.app))
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


def _holds_metrics_token(request: web.Request) -> bool:
    expected = request.app[CONFIG].metrics.token.get_secret_value()
    header = request.headers.get("Authorization")
    if not expected or header is None:
        return False
    return hmac.compare_digest(bearer_token(header).encode(), expected.encode())


def _sources(app: web.Application) -> Sources:
    store, hub = app[STORE], app[HUB]
    writer = store.writer
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
    )
