"""``/healthz`` (the process answers) and ``/readyz`` (the log can be read and written)."""

from __future__ import annotations

import orjson
from aiohttp import web

from ..keys import HUB, STORE
from .request import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response(b'{"status":"ok"}')


async def readyz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    problem = None if not request.app[HUB].closing else "shutting down"
    problem = problem or await store.check_ready()
    if problem is not None:
        return json_response(orjson.dumps({"status": "unavailable", "reason": problem}), 503)
    body = {
        "status": "ready",
        "schema_version": store.schema_version,
        "pending_appends": store.writer.pending,
    }
    return json_response(orjson.dumps(body))
