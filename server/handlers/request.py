"""Reading requests: bounded JSON bodies and strict query parameters, with the spec's errors.

Bodies are parsed with orjson, never ``request.json()``: orjson refuses NaN/Infinity, invalid
UTF-8 and nesting deeper than 1024 (where the stdlib parser raises RecursionError, a 500).
Duplicate object keys: the last one wins, as in RFC 8259's common reading (docs/protocol.md).

Integers must fit in a signed 64 bits (what SQLite and most clients hold). orjson keeps
integer literals up to 2**64-1 as ints but turns longer ones into floats, silently, so the
check reads the raw bytes: only a body with a run of 19 digits (a C-speed search; every
integer outside the range has at least 19) is looked at further.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web

from ..errors import (
    BodyTimeout,
    BodyTooLarge,
    InvalidJson,
    InvalidParameter,
    UnsupportedMediaType,
    ValidationFailed,
)
from ..keys import CONFIG

# fullmatch, never match with ``$``: ``$`` also matches before a trailing newline ("0\n").
_DIGITS = re.compile(r"[0-9]{1,18}")
JSON_TYPE = "application/json"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_LONG_DIGIT_RUN = re.compile(rb"[0-9]{19}")
# In a document orjson has accepted: every string (escapes included), to blank them out.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# An integer literal of 19+ digits: not a fraction's or an exponent's digits, no '.'/exponent.
_LONG_INTEGER = re.compile(rb"(?<![0-9.eE+-])-?[0-9]{19,}(?![0-9.eE])")


def json_response(body: bytes, status: int = 200) -> web.Response:
    """``body`` (one JSON document) with a trailing newline, so that curl prints whole lines."""
    return web.Response(body=body + b"\n", status=status, content_type=JSON_TYPE)


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
    return parse_json(raw)


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, every integer in it exact: an integer outside the signed 64-bit
    range anywhere is refused (422, with its ``loc``) rather than kept as a float."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    if _LONG_DIGIT_RUN.search(raw) is not None:
        _refuse_long_integers(raw, value)
    return value


def _refuse_long_integers(raw: bytes, value: Any) -> None:
    """The slow path, for the rare body with a 19-digit run (in a string or a number)."""
    literals = [int(m) for m in _LONG_INTEGER.findall(_JSON_STRING.sub(b'""', raw))]
    outside = [n for n in literals if not INT64_MIN <= n <= INT64_MAX]
    if not outside:
        return
    # orjson kept those in (INT64_MAX, 2**64-1] as ints and made the others floats.
    as_parsed = {n if INT64_MAX < n < 2**64 else float(n) for n in outside}
    locs = list(_locs_of(value, as_parsed, ()))
    details = [
        {
            "loc": list(loc),
            "msg": f"integers must be within [{INT64_MIN}, {INT64_MAX}] (signed 64 bits)",
            "type": "int_out_of_range",
        }
        # With duplicate keys the offending literal may not be in the parsed document at all.
        for loc in locs or [()]
    ]
    raise ValidationFailed("the body holds an integer outside the signed 64-bit range", details)


def _locs_of(
    value: Any, wanted: set[int | float], loc: tuple[str | int, ...]
) -> Iterator[tuple[str | int, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _locs_of(item, wanted, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _locs_of(item, wanted, (*loc, index))
    elif (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value in wanted
        # An in-range int may equal an offender's float (-2**63 == float(-2**63 - 1)).
        and (isinstance(value, float) or not INT64_MIN <= value <= INT64_MAX)
    ):
        yield loc


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
    if not _DIGITS.fullmatch(raw):
        raise InvalidParameter(f"{name} must be an integer >= {minimum}, not {raw[:40]!r}")
    value = int(raw)
    if value < minimum:
        raise InvalidParameter(f"{name} must be >= {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameter(f"{name} must be <= {maximum}, not {value}")
    return value
