"""``GET /v1/jobs/{job_id}/stream``: WebSocket on an Upgrade request, SSE on
``Accept: text/event-stream``; both are thin loops over ``server.follow``."""

from __future__ import annotations

from aiohttp import web

from ..errors import BadRequest
from ..logs import bind_request
from .sse import serve_sse
from .ws import serve_websocket


async def stream(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    bind_request(job_id=job_id)
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await serve_websocket(request, job_id)
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await serve_sse(request, job_id)
    raise BadRequest("a stream needs a WebSocket upgrade or an 'Accept: text/event-stream' header")
