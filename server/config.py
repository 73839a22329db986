"""Configuration: frozen pydantic models for ``config.toml``, environment overrides, loading.

Every setting lives in one TOML file; any key may be overridden by an environment variable
``JOBFEED_<SECTION>__<KEY>`` (e.g. ``JOBFEED_SERVER__PORT=9000``). A wrong setting (unknown
key, bad type, unwritable database directory) raises ``ConfigError`` with one clear line.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .models import MAX_HEARTBEAT_TIMEOUT, MIN_HEARTBEAT_TIMEOUT

ENV_PREFIX = "JOBFEED_"


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    shutdown_timeout: float = Field(10.0, gt=0)
    header_timeout: float = Field(10.0, gt=0)
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Open TCP connections (streams, keep-alive and in-flight requests). Past it a new
    # connection's request is answered 503 overloaded and the connection closed. Below the
    # fd limit, so that the process refuses politely before accept() starts failing.
    max_connections: int = Field(20_000, ge=1)


class StorageConfig(_Section):
    path: Path = Path("data/jobfeed.db")
    durability: Literal["full", "normal"] = "full"
    read_connections: int = Field(2, ge=1, le=16)
    max_batch_events: int = Field(2_000, ge=1)
    max_pending_appends: int = Field(10_000, ge=1)
    checkpoint_seconds: float = Field(1.0, gt=0)
    # The -wal file is kept under this: the writer restarts the WAL once it passes half of it
    # (server/wal.py). At least 64 KiB: a WAL holds a few pages at any time.
    wal_max_bytes: int = Field(64 * 1024 * 1024, ge=65_536)
    job_cache_size: int = Field(10_000, ge=1)
    # The same cache in bytes, measured (server/job_states.py): a count alone let 600 jobs with
    # object-heavy metadata take a gigabyte.
    job_cache_bytes: int = Field(64 * 1024 * 1024, ge=0)
    busy_timeout_ms: int = Field(5_000, ge=0)
    probe_seconds: float = Field(1.0, gt=0)
    integrity_check: bool = True


class StreamConfig(_Section):
    heartbeat_seconds: float = Field(15.0, gt=0)
    ping_seconds: float = Field(20.0, gt=0)
    send_timeout: float = Field(30.0, gt=0)
    client_frames_per_second: float = Field(20.0, gt=0)
    max_client_frame_bytes: int = Field(65_536, ge=128)
    max_subscribers: int = Field(10_000, ge=1)
    # Kernel send buffer of each stream socket (SO_SNDBUF; 0 = the kernel's autotuning, which
    # grows to 4 MiB on Linux). A small buffer bounds what a stuck subscriber pins in kernel
    # memory and lets send_timeout notice it after kilobytes, not megabytes, of backlog.
    send_buffer_bytes: int = Field(262_144, ge=0)
    # Open streams on any one job, so that one hot job cannot take every stream slot.
    max_subscribers_per_job: int = Field(10_000, ge=1)
    page_events: int = Field(500, ge=1)
    # The most one page read from SQLite may hold (a replay step, a part of a REST page or
    # export); always at least one event. Bounds what one slow or stuck client pins.
    page_bytes: int = Field(1024 * 1024, ge=1)
    cache_events_per_job: int = Field(4_096, ge=0)
    cache_bytes: int = Field(64 * 1024 * 1024, ge=0)
    # The feed (GET /v1/feed): recent frames across all jobs, for subscribers near the end.
    feed_cache_events: int = Field(8_192, ge=0)
    feed_cache_bytes: int = Field(16 * 1024 * 1024, ge=0)
    # Full replay pages kept for the other subscribers of the same job (server.pages); 0: none
    # kept (concurrent reads of the same page are still shared).
    replay_share_bytes: int = Field(32 * 1024 * 1024, ge=0)
    # Ids a feed replay scans per SQLite read: a sparse filter reads the log in windows of
    # this many ids (one bounded primary-key range each), never the whole log at once.
    feed_scan_ids: int = Field(10_000, ge=1)
    # Values of one feed filter parameter (job=, kind=, type=) a request may give.
    feed_max_filter_values: int = Field(100, ge=1)
    # snapshots=1: unfinished matching jobs sent at most; more is 400 (narrow the filter).
    feed_max_snapshots: int = Field(10_000, ge=1)
    # SSE `retry:` hint in ms: each stream's is drawn uniformly from [this, 2 x this), so that
    # browsers dropped together (a restart) do not all come back in the same millisecond.
    sse_retry_ms: int = Field(2_000, ge=100)


class LimitsConfig(_Section):
    max_event_bytes: int = Field(65_536, ge=256)
    body_timeout: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_batch_events: int = Field(1_000, ge=1)
    page_size_max: int = Field(1_000, ge=1)
    page_size_default: int = Field(1_000, ge=1)
    jobs_page_default: int = Field(50, ge=1)
    # Requests per second per client address (token bucket), 0 = off. Off by default: behind
    # a proxy every client shares the proxy's address, so only the operator knows a safe rate.
    rate_per_client: float = Field(0.0, ge=0)
    rate_burst: int = Field(100, ge=1)  # requests a client may send at once, on top of the rate
    rate_max_clients: int = Field(100_000, ge=1)  # addresses remembered (least recent forgotten)


class LogConfig(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True


_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
# HMAC keys shorter than the hash are guessable offline from one token (RFC 7518, 3.2).
MIN_SECRET_CHARS = 32


class HttpConfig(_Section):
    # Browser origins that get CORS answers and may open WebSockets (docs/security.md).
    cors_origins: tuple[str, ...] = ()

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port], no path, or '*'"
                )
        return tuple(origin.lower() for origin in origins)


def _empty_is_none(value: Any) -> Any:
    """TOML has no null: an empty string stands for "not set"."""
    return None if value == "" else value


class TenantAuthConfig(_Section):
    not_before: AwareDatetime | None = None

    _not_before = field_validator("not_before", mode="before")(_empty_is_none)


class AuthConfig(_Section):
    mode: Literal["none", "jwt"] = "none"
    secrets: tuple[SecretStr, ...] = ()
    public_keys: tuple[Path, ...] = ()
    audience: str = "jobfeed"  # "" accepts only tokens without aud
    issuer: str = ""  # "" does not check iss
    leeway_seconds: float = Field(30.0, ge=0, le=3600)
    ticket_seconds: float = Field(300.0, gt=0, le=86_400)
    recheck_seconds: float = Field(10.0, gt=0)
    not_before: AwareDatetime | None = None
    tenants: dict[str, TenantAuthConfig] = {}
    allow_anonymous_remote: bool = False
    token_cache_size: int = Field(10_000, ge=0)

    _not_before = field_validator("not_before", mode="before")(_empty_is_none)

    @field_validator("secrets")
    @classmethod
    def _long_secrets(cls, secrets: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for index, secret in enumerate(secrets):
            if len(secret.get_secret_value()) < MIN_SECRET_CHARS:
                raise ValueError(
                    f"secret {index} is shorter than {MIN_SECRET_CHARS} characters "
                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        return secrets

    @model_validator(mode="after")
    def _keys_for_jwt(self) -> AuthConfig:
        if self.mode == "jwt" and not self.secrets and not self.public_keys:
            raise ValueError("auth.mode = 'jwt' needs auth.secrets or auth.public_keys")
        return self


class MetricsConfig(_Section):
    enabled: bool = True  # GET /metrics; false: the route does not exist (404)
    # Serve /metrics on this address instead of server.host / port ("" : on the main one), so
    # that it can stay on a private interface while the API is public.
    host: str = ""
    port: int = Field(9464, ge=0, le=65535)  # with host set; 0 picks a free port (logged)
    # With authentication on, a bearer token that may read /metrics only (a scraper need not
    # hold a jobs:admin JWT). "" : jobs:admin only. At least 32 characters, like auth.secrets.
    token: SecretStr = SecretStr("")

    @field_validator("token")
    @classmethod
    def _long_token(cls, token: SecretStr) -> SecretStr:
        if token.get_secret_value() and len(token.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(f"metrics.token is shorter than {MIN_SECRET_CHARS} characters")
        return token


class RetentionKindConfig(_Section):
    """``[retention.kinds.<kind>]``: this kind's own ages; an absent key takes
    ``[retention]``'s."""

    finished_days: float | None = Field(None, ge=0)
    unfinished_days: float | None = Field(None, ge=0)


class RetentionConfig(_Section):
    # Finished jobs whose terminal event is older than this many days are deleted (0: kept).
    finished_days: float = Field(0.0, ge=0)
    # Unfinished jobs without an event for this many days are deleted (0: never).
    unfinished_days: float = Field(0.0, ge=0)
    interval_seconds: float = Field(600.0, gt=0)  # how often the sweep runs
    # Most events one sweep transaction deletes: each holds the writer for a few ms at most.
    batch_events: int = Field(1_000, ge=1)
    # Pages one incremental-vacuum step gives back to the file system (4 KiB each).
    vacuum_pages: int = Field(256, ge=1)
    kinds: dict[str, RetentionKindConfig] = {}

    @property
    def enabled(self) -> bool:
        ages = [self.finished_days, self.unfinished_days]
        for kind in self.kinds.values():
            ages += [kind.finished_days or 0.0, kind.unfinished_days or 0.0]
        return any(age > 0 for age in ages)


class IngestConfig(_Section):
    """The producer stream, GET /v1/ingest (docs/protocol.md, "Producer stream")."""

    # Unanswered requests one connection may have; past it the server stops reading that
    # socket until answers drain (TCP backpressure), so it never buffers without bound.
    max_in_flight: int = Field(1_000, ge=1)
    # Open producer streams; past it a new one is refused (error overloaded, close 1013).
    max_connections: int = Field(1_000, ge=1)


class WatchdogConfig(_Section):
    """The worker-lost watchdog (server/watchdog.py, docs/operations.md)."""

    # false: jobs keep their heartbeat_timeout (it is stored and shown) but none is failed.
    enabled: bool = True
    # How often the sweep looks for jobs past their timeout: a lost worker is noticed within
    # its heartbeat_timeout plus this.
    interval_seconds: float = Field(1.0, gt=0, le=3600)
    # The heartbeat_timeout of jobs of a kind created without one: {"<kind>" = seconds}.
    kinds: dict[str, float] = {}
    # Jobs failed per transaction: bounds how long one sweep holds the writer when many
    # jobs fall silent together (the rest go in the next transactions of the same sweep).
    # At most storage.max_batch_events (a group is never larger).
    batch_jobs: int = Field(50, ge=1)

    @field_validator("kinds")
    @classmethod
    def _sane_timeouts(cls, kinds: dict[str, float]) -> dict[str, float]:
        for kind, seconds in kinds.items():
            if not MIN_HEARTBEAT_TIMEOUT <= seconds <= MAX_HEARTBEAT_TIMEOUT:
                raise ValueError(
                    f"kind {kind!r}: {seconds} is not between {MIN_HEARTBEAT_TIMEOUT} and "
                    f"{MAX_HEARTBEAT_TIMEOUT:.0f} seconds"
                )
        return kinds


class Config(_Section):
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    stream: StreamConfig = StreamConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    auth: AuthConfig = AuthConfig()
    metrics: MetricsConfig = MetricsConfig()
    retention: RetentionConfig = RetentionConfig()
    ingest: IngestConfig = IngestConfig()
    watchdog: WatchdogConfig = WatchdogConfig()

    @model_validator(mode="after")
    def _watchdog_batch_fits(self) -> Config:
        # A larger op would count against storage.max_pending_appends beyond what any group
        # takes, and be refused as overloaded whenever anything else is queued.
        if self.watchdog.batch_jobs > self.storage.max_batch_events:
            raise ValueError(
                f"watchdog.batch_jobs ({self.watchdog.batch_jobs}) must not exceed "
                f"storage.max_batch_events ({self.storage.max_batch_events})"
            )
        return self

    @model_validator(mode="after")
    def _wildcard_needs_auth(self) -> Config:
        if "*" in self.http.cors_origins and self.auth.mode == "none":
            raise ValueError(
                "http.cors_origins = ['*'] is allowed only with authentication on (auth.mode)"
            )
        return self


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in Config.model_fields:
            raise ConfigError(f"{name}: unknown section {section!r}")
        raw.setdefault(section, {})[key] = _env_value(name, value)


def _env_value(name: str, value: str) -> Any:
    """A list or table is written as JSON (``JOBFEED_AUTH__SECRETS='["..."]'``); any other
    value is passed as the string it is, for pydantic to convert."""
    if not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON: {exc}") from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (if given), apply environment overrides, validate, resolve the db path.

    A relative ``storage.path`` is taken relative to the config file's directory, so that
    ``jobfeed serve --config /etc/jobfeed/config.toml`` works from any working directory.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        base = path.resolve().parent
    _apply_env(raw, os.environ if environ is None else environ)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        # Never the input: it may be a secret.
        raise ConfigError(f"config {where}: {first['msg']}") from None
    db_path = config.storage.path
    if not db_path.is_absolute():
        db_path = base / db_path
    storage = config.storage.model_copy(update={"path": db_path})
    keys = tuple(key if key.is_absolute() else base / key for key in config.auth.public_keys)
    auth = config.auth.model_copy(update={"public_keys": keys})
    return config.model_copy(update={"storage": storage, "auth": auth})


def ensure_storage_dir(config: Config) -> None:
    """Create the database directory, or fail with one line if it cannot be written."""
    directory = config.storage.path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"storage.path: cannot create {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"storage.path: directory {directory} is not writable")
    if config.storage.path.exists() and not os.access(config.storage.path, os.W_OK):
        raise ConfigError(f"storage.path: {config.storage.path} is not writable")
