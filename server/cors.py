"""Browsers and origins: CORS answers for ``[http] cors_origins``, and the WebSocket
``Origin`` check (auth.md, "Browsers and origins").

CORS only tells a browser which pages may *read* an answer; it protects nothing by itself
(tokens do). The WebSocket check matters more: browsers apply no CORS to WebSockets, so
without it any page a user visits could open a stream with whatever the browser attaches.
Requests without ``Origin`` (servers, CLIs) are not affected by either.
"""

from __future__ import annotations

from aiohttp import web

from .config import HttpConfig

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-Request-ID"
# What a client script may read of an answer besides the CORS-safelisted headers.
EXPOSED_HEADERS = "Location, Retry-After, WWW-Authenticate, X-Request-ID"
PREFLIGHT_MAX_AGE = "600"


class OriginPolicy:
    def __init__(self, config: HttpConfig) -> None:
        self.wildcard = "*" in config.cors_origins
        self.origins = frozenset(origin for origin in config.cors_origins if origin != "*")

    @property
    def active(self) -> bool:
        return self.wildcard or bool(self.origins)

    def allows(self, origin: str) -> bool:
        return self.wildcard or origin.lower() in self.origins

    def allows_websocket(self, request: web.BaseRequest, origin: str) -> bool:
        """A listed origin, or the page's own (its host is the one this request names)."""
        if self.allows(origin):
            return True
        _, _, host = origin.partition("://")
        return bool(host) and host.lower() == request.host.lower()

    def add_headers(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """CORS headers on an answer to an allowed origin (headers go out at prepare)."""
        origin = request.headers.get("Origin")
        if origin is None or not self.allows(origin):
            return
        headers = response.headers
        headers["Access-Control-Allow-Origin"] = "*" if self.wildcard else origin
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if not self.wildcard:
            headers.add("Vary", "Origin")

    def preflight(self, request: web.BaseRequest) -> web.Response:
        """The answer to ``OPTIONS`` with ``Access-Control-Request-Method``: 204 with the
        allowed methods and headers for a listed origin; 204 without them for another (the
        browser then refuses the request)."""
        response = web.Response(status=204)
        origin = request.headers.get("Origin")
        if origin is not None and self.allows(origin):
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return response


def is_preflight(request: web.BaseRequest) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"
