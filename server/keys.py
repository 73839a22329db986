"""Every typed ``web.AppKey`` the application holds, in one place."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from .auth import Authenticator
from .config import Config
from .cors import OriginPolicy
from .hub import Hub
from .limits import JobStreamSlots, RateLimiter
from .store import Store

if TYPE_CHECKING:
    from .handlers.guard import StreamGuard

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
# Verifies credentials and mints tickets (present with authentication off too: tickets).
AUTH = web.AppKey("auth", Authenticator)
ORIGINS = web.AppKey("origins", OriginPolicy)
# The config file the server was started with (absent in tests that build a Config): the
# revocation sweep re-reads auth.not_before from it.
CONFIG_PATH = web.AppKey("config_path", Path)
# Open streams' credentials, for the revocation sweep. Weak: a finished stream drops out.
GUARDS: web.AppKey[weakref.WeakSet[StreamGuard]] = web.AppKey("guards")
