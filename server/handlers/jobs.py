"""REST for producers and auditors: create, list, snapshot, append, events page, NDJSON export.

Thin: parse and validate at the edge, hand the work to the store, shape the answer. Stored
events and snapshots are already JSON; pages are built by joining those bytes, not by parsing
and re-serializing them.
"""

from __future__ import annotations

import os
import time

import orjson
from aiohttp import web
from pydantic import ValidationError

from ..errors import InvalidJson, InvalidParameter, JobNotFound, ValidationFailed
from ..keys import CONFIG, STORE
from ..logs import bind_request
from ..models import JOB_STATUSES, CreateJobIn, field_errors, parse_append_body
from .request import json_response, parse_int, query_int, read_json

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_last_ulid = 0


def new_job_id() -> str:
    """A monotonic ULID: 48 bits of milliseconds then 80 random bits; within one millisecond
    the next id is the previous plus one, so ids sort by creation time."""
    global _last_ulid
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    if value <= _last_ulid:
        value = _last_ulid + 1
    _last_ulid = value
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


async def create_job(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict):
        raise InvalidJson("the body must be a JSON object")
    try:
        spec = CreateJobIn.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed("the job is not valid", field_errors(exc)) from None
    job_id = spec.job_id or new_job_id()
    bind_request(job_id=job_id)
    state = await request.app[STORE].writer.create_job(job_id, spec.kind, spec.metadata)
    response = json_response(state.to_json(), status=201)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return response


async def list_jobs(request: web.Request) -> web.Response:
    limits = request.app[CONFIG].limits
    status = request.query.get("status") or None
    if status is not None and status not in JOB_STATUSES:
        raise InvalidParameter(f"status must be one of {', '.join(JOB_STATUSES)}")
    kind = request.query.get("kind") or None
    default = min(limits.jobs_page_default, limits.page_size_max)
    limit = query_int(request, "limit", default, minimum=1, maximum=limits.page_size_max)
    cursor_raw = request.query.get("cursor") or None
    before = None if cursor_raw is None else parse_int("cursor", cursor_raw, minimum=1)
    store = request.app[STORE]
    snapshots, next_before, last_id = await store.list_jobs(status, kind, limit, before)
    # "cursor": the feed position of this list (feed.md): GET /v1/feed?after=<cursor> goes on
    # from exactly the state these snapshots show.
    body = b'{"jobs":[%s],"next_cursor":%s,"cursor":%d}' % (
        b",".join(snapshots),
        orjson.dumps(None if next_before is None else str(next_before)),
        last_id,
    )
    return json_response(body)


async def get_job(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    snapshot = await request.app[STORE].snapshot_json(job_id)
    if snapshot is None:
        raise JobNotFound(job_id)
    return json_response(snapshot)


async def append_events(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    config = request.app[CONFIG]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidJson('the body must be one event object or {"events": [...]}')
    events, errors = parse_append_body(body, config.limits.max_batch_events)
    if errors:
        raise ValidationFailed("the events are not valid", errors)
    result = await request.app[STORE].writer.append(job_id, events)
    payload = {
        "job_id": result.job_id,
        "last_seq": result.last_seq,
        "events": [event.to_dict() for event in result.events],
    }
    return json_response(orjson.dumps(payload), status=200 if result.all_duplicates else 201)


async def read_events(request: web.Request) -> web.StreamResponse:
    job_id = _job_id(request)
    config = request.app[CONFIG]
    store = request.app[STORE]
    after = query_int(request, "after", 0)
    head = await store.job_head(job_id)
    if head is None:
        raise JobNotFound(job_id)
    if after > head.last_seq:
        raise InvalidParameter(f"after={after} is past the end of the log ({head.last_seq})")
    if "application/x-ndjson" in request.headers.get("Accept", ""):
        return await _export_ndjson(request, job_id, after)
    limit = query_int(
        request,
        "limit",
        min(config.limits.page_size_default, config.limits.page_size_max),
        minimum=1,
        maximum=config.limits.page_size_max,
    )
    frames = await store.read_after(job_id, after, limit)
    last_seq = max(head.last_seq, frames[-1].seq if frames else 0)
    next_after = frames[-1].seq if frames and frames[-1].seq < last_seq else None
    body = b'{"events":[%s],"last_seq":%d,"next_after":%s}' % (
        b",".join(frame.json for frame in frames),
        last_seq,
        orjson.dumps(next_after),
    )
    return json_response(body)


async def _export_ndjson(request: web.Request, job_id: str, after: int) -> web.StreamResponse:
    """The whole log from ``after``, one event per line, streamed page by page."""
    store = request.app[STORE]
    page = request.app[CONFIG].limits.page_size_max
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    while True:
        frames = await store.read_after(job_id, after, page)
        if not frames:
            break
        await response.write(b"".join(frame.json + b"\n" for frame in frames))
        after = frames[-1].seq
        if len(frames) < page:
            break
    await response.write_eof()
    return response


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    bind_request(job_id=job_id)
    return job_id
