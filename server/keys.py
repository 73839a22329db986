"""Every typed ``web.AppKey`` the application holds, in one place."""

from __future__ import annotations

from aiohttp import web

from .config import Config
from .hub import Hub
from .limits import RateLimiter
from .store import Store
from .streams import StreamRegistry

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
# Absent when limits.rate_per_client is 0 (off).
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Open streams: counted against the stream caps, ended together at shutdown.
STREAMS = web.AppKey("streams", StreamRegistry)
# Per request: the id bound into its log lines and echoed as X-Request-ID.
REQUEST_ID = web.RequestKey("request_id", str)
