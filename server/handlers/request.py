"""Reading requests: bounded JSON bodies and strict query parameters, with the spec's errors.

Bodies are parsed with orjson, never ``request.json()``: orjson refuses NaN/Infinity, invalid
UTF-8 and nesting deeper than 1024 (where the stdlib parser raises RecursionError, a 500).
Duplicate object keys: the last one wins, as in RFC 8259's common reading (docs/protocol.md).

Integers must fit in a signed 64 bits (what SQLite and most clients hold). orjson keeps
integer literals up to 2**64-1 as ints but turns longer ones into floats, silently, so the
check starts from the raw bytes: every integer outside the range has at least 20 digits, or
19 beginning with 9, and only a body with such a run (found by ``bytes.translate`` and a
substring search, ~8x faster than ``re`` here) is looked at further.
"""

from __future__ import annotations

import asyncio
import re
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
# Every ASCII digit as "0", every other byte as " ": a run of 19 digits is then a substring.
_DIGITS_AS_ZERO = bytes(ord("0") if chr(b) in "0123456789" else ord(" ") for b in range(256))
_NINETEEN_DIGITS = b"0" * 19
_NINE = ord("9")
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
        if request.content.is_eof():
            # The whole body came with the headers (the usual case): nothing to wait for, and
            # asyncio.timeout costs a loop timer per request (~3 % of W1's server CPU).
            raw = await request.read()
        else:
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
    if _may_hold_long_integer(raw):
        _refuse_long_integers(raw, value)
    return value


def _may_hold_long_integer(raw: bytes) -> bool:
    """Whether ``raw`` has a run of 20 or more digits, or of 19 beginning with 9: every
    integer outside the signed 64-bit range is written so, while a 19-digit one beginning
    with 1-8 is inside it. Nanosecond timestamps (``time.time_ns()``: 19 digits, "17...")
    are common in events, and sent every body through the slow path's walk."""
    digits = raw.translate(_DIGITS_AS_ZERO)
    at = digits.find(_NINETEEN_DIGITS)
    while at >= 0:
        end = at + 19
        if raw[at] == _NINE or digits[end : end + 1] == b"0":
            return True
        at = digits.find(_NINETEEN_DIGITS, end)  # that run was exactly 19 digits long
    return False


def _refuse_long_integers(raw: bytes, value: Any) -> None:
    """The slow path, for the rare body with a 19-digit run (in a string or a number)."""
    # What an integer outside the range became: an int past INT64_MAX, or a float of at
    # least 2**63 in magnitude. Without one (digit runs in strings only, e.g. 19-digit ids),
    # nothing is wrong: a walk over the values alone, no locs built, says so.
    if not _holds_candidate(value):
        return
    candidates = _candidates(value)
    # Such a float may also have been written as one (1e19): the raw literals decide.
    literals = [int(m) for m in _LONG_INTEGER.findall(_JSON_STRING.sub(b'""', raw))]
    outside = [n for n in literals if not INT64_MIN <= n <= INT64_MAX]
    if not outside:
        return
    # orjson kept those in (INT64_MAX, 2**64-1] as ints and made the others floats.
    as_parsed = {n if INT64_MAX < n < 2**64 else float(n) for n in outside}
    locs = [loc for loc, number in candidates if number in as_parsed]
    details = [
        {
            "loc": loc,
            "msg": f"integers must be within [{INT64_MIN}, {INT64_MAX}] (signed 64 bits)",
            "type": "int_out_of_range",
        }
        # With duplicate keys the offending literal may not be in the parsed document at all.
        for loc in locs or [[]]
    ]
    raise ValidationFailed("the body holds an integer outside the signed 64-bit range", details)


def _holds_candidate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float:
            if abs(item) >= 2**63:
                return True
        elif kind is int and item > INT64_MAX:
            return True
    return False


def _candidates(value: Any) -> list[tuple[list[str | int], int | float]]:
    """Where the parsed document holds an int past INT64_MAX or a float of magnitude 2**63
    or more. Iterative: a body may nest 1024 deep, past Python's recursion limit."""
    found: list[tuple[list[str | int], int | float]] = []
    stack: list[tuple[list[str | int], Any]] = [([], value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, dict):
            stack.extend(([*loc, key], child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(([*loc, index], child) for index, child in reversed(list(enumerate(item))))
        elif isinstance(item, float):
            if abs(item) >= 2**63:
                found.append((loc, item))
        elif isinstance(item, int) and not isinstance(item, bool) and item > INT64_MAX:
            found.append((loc, item))
    return found


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
