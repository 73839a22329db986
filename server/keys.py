"""Every typed ``web.AppKey`` the application holds, in one place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .auth import Authenticator
from .config import Config
from .cors import OriginPolicy
from .hub import Hub
from .limits import RateLimiter
from .metrics import Metrics
from .store import Store
from .streams import StreamRegistry

if TYPE_CHECKING:
    from .handlers.guard import GuardClock
    from .ingest import IngestRegistry

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
HUB = web.AppKey("hub", Hub)
# Absent when limits.rate_per_client is 0 (off).
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
# Open streams: counted against the stream caps, ended together at shutdown.
STREAMS = web.AppKey("streams", StreamRegistry)
# Per request: the id bound into its log lines and echoed as X-Request-ID.
REQUEST_ID = web.RequestKey("request_id", str)
# Verifies credentials and mints tickets (present with authentication off too: tickets).
AUTH = web.AppKey("auth", Authenticator)
ORIGINS = web.AppKey("origins", OriginPolicy)
# The config file the server was started with (absent in tests that build a Config): the
# revocation sweep re-reads auth.not_before from it.
CONFIG_PATH = web.AppKey("config_path", Path)
# Open streams' credentials by expiry: their timers, and the revocation sweep's list.
GUARDS: web.AppKey[GuardClock] = web.AppKey("guards")
# The counters behind GET /metrics (present with metrics.enabled = false too: moving them is
# cheaper than asking whether to).
METRICS = web.AppKey("metrics", Metrics)
# Open producer streams (GET /v1/ingest): counted against ingest.max_connections, ended
# together at shutdown.
INGEST: web.AppKey[IngestRegistry] = web.AppKey("ingest")
