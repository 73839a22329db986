"""Logging: structlog for our lines, stdlib (aiohttp, asyncio) routed through the same renderer.

``log.format``: ``json`` (one JSON object per line, for production and containers),
``console`` (aligned, coloured when a terminal), or ``auto`` (console on a TTY, else JSON).
Request-scoped fields (``request_id``, ``job_id``, ...) are bound with contextvars and merged
into every line written while the request is handled.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .config import LogConfig


def configure_logging(config: LogConfig) -> None:
    use_json = config.format == "json" or (config.format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # aiohttp's own access log is replaced by ours (server.app.request_middleware).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def bind_request(**fields: Any) -> None:
    structlog.contextvars.bind_contextvars(**fields)
