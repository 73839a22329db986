"""Reading requests: bounded JSON bodies and strict query parameters, with the spec's errors.

Bodies are parsed with orjson, never ``request.json()``: orjson refuses NaN/Infinity, invalid
UTF-8 and nesting deeper than 1024 (where the stdlib parser raises RecursionError, a 500).
Duplicate object keys: the last one wins, as in RFC 8259's common reading (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from aiohttp import web

from ..errors import BodyTimeout, BodyTooLarge, InvalidJson, InvalidParameter, UnsupportedMediaType
from ..keys import CONFIG

_DIGITS = re.compile(r"^[0-9]{1,18}$")
JSON_TYPE = "application/json"


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON_TYPE)


async def read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    """The request body as JSON; ``{}`` for an empty body when ``allow_empty``."""
    limit = request.app[CONFIG].limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if allow_empty and not request.body_exists:
        return {}
    if request.content_type != JSON_TYPE:
        raise UnsupportedMediaType(
            f"the body must be {JSON_TYPE}, not {request.content_type or 'missing'}"
        )
    timeout = request.app[CONFIG].limits.body_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except TimeoutError:
        # A body trickled in slower than this holds a connection and a buffer for nothing.
        message = f"the body did not arrive within {timeout:g} s (limits.body_timeout)"
        raise BodyTimeout(message) from None
    if not raw and allow_empty:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the body is larger than {limit} bytes (limits.max_body_bytes)")


def query_int(
    request: web.Request, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    return parse_int(name, raw, minimum=minimum, maximum=maximum)


def parse_int(name: str, raw: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if not _DIGITS.match(raw):
        raise InvalidParameter(f"{name} must be an integer >= {minimum}, not {raw[:40]!r}")
    value = int(raw)
    if value < minimum:
        raise InvalidParameter(f"{name} must be >= {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameter(f"{name} must be <= {maximum}, not {value}")
    return value
