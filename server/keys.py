"""Every typed ``web.AppKey`` the application holds, in one place."""

from __future__ import annotations

import weakref

from aiohttp import web

from .config import Config
from .hub import Hub
from .limits import JobStreamSlots, RateLimiter
from .store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
JOB_STREAMS = web.AppKey("job_streams", JobStreamSlots)
# Absent when limits.rate_per_client is 0 (off).
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Open streams, closed with 1001 / ended on shutdown. Weak: a finished handler drops out.
# Per request: the id bound into its log lines and echoed as X-Request-ID.
REQUEST_ID = web.RequestKey("request_id", str)
STREAMS: web.AppKey[weakref.WeakSet[web.StreamResponse]] = web.AppKey("streams")
