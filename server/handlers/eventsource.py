"""What makes a browser's own ``EventSource`` behave (feed.md, "Browser-ready Server-Sent
Events"), shared by the job stream and the feed.

- Every stream starts with a ``retry:`` hint drawn from ``[sse_retry_ms, 2 x sse_retry_ms)``:
  browsers dropped together by a restart come back spread out, not in one millisecond.
- A refusal the client should retry (503 overloaded / shutting down / storage unavailable,
  429 rate limited) is answered to an ``EventSource``-style request with 200, ``retry:``, an
  ``event: error`` record and the end of the response: ``EventSource`` gives up for good on
  any status but 200, and reconnects after a response that ends. Final refusals (400, 404,
  409 ...) keep their status, which stops it, as it should.
"""

from __future__ import annotations

import random

import orjson
from aiohttp import web

from ..errors import ServiceError

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # let proxies pass events through as they come
}
RETRYABLE_STATUSES = frozenset({429, 503})


def wants_event_stream(request: web.BaseRequest) -> bool:
    """A GET whose Accept names ``text/event-stream``, as ``EventSource`` sends."""
    return request.method == "GET" and "text/event-stream" in request.headers.get("Accept", "")


def retry_field(base_ms: int, retry_after: int = 0) -> bytes:
    """``retry: N`` with N in ``[base, 2 x base)`` ms, at least ``retry_after`` seconds."""
    base = max(base_ms, retry_after * 1000)
    return b"retry: %d\n\n" % random.randrange(base, 2 * base)


def error_record(code: str, message: str) -> bytes:
    payload = orjson.dumps({"type": "error", "code": code, "message": message})
    return b"event: error\ndata: %s\n\n" % payload


def retryable_refusal(exc: ServiceError, base_ms: int) -> web.Response | None:
    """The 200 event-stream answer to a retryable refusal; None for a final one."""
    if exc.status not in RETRYABLE_STATUSES:
        return None
    retry_after = int(exc.headers.get("Retry-After", "1") or 1)
    body = retry_field(base_ms, retry_after) + error_record(exc.code, exc.message)
    return web.Response(status=200, body=body, headers=SSE_HEADERS)
