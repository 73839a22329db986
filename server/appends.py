"""What an append or a job creation is, whichever transport brings it: the body's events
checked at the edge (the oversize rule first), and the acknowledgement built from the
writer's answer.

Used by ``POST /v1/jobs/{job_id}/events`` and ``POST /v1/jobs`` (``handlers/jobs.py``) and by
the producer stream ``GET /v1/ingest`` (``handlers/ingest.py``): one place, so that both
refuse the same input with the same error and acknowledge with the same payload, and so that
making this faster makes both faster.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from .auth import Principal
from .config import LimitsConfig
from .errors import EventTooLarge, Forbidden, InvalidJson, ServiceError, ValidationFailed
from .models import (
    CreateJobIn,
    EventIn,
    field_errors,
    is_batch,
    parse_append_body,
    stored_size_estimate,
)
from .tenancy import JobKey
from .writer import AppendResult

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


def parse_append(job_id: str, body: Any, limits: LimitsConfig) -> list[EventIn]:
    """An append body (one event, or ``{"events": [...]}``) as validated events; raises
    ``EventTooLarge`` (413) or ``ValidationFailed`` (422), ``InvalidJson`` for a non-object."""
    if not isinstance(body, dict):
        raise InvalidJson('the body must be one event object or {"events": [...]}')
    events, errors = parse_append_body(body, limits.max_batch_events)
    if errors:
        refuse_oversize(job_id, body, limits.max_event_bytes)
        raise ValidationFailed("the events are not valid", errors)
    return events


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated job creation: what the writer's ``create_job`` takes."""

    key: JobKey
    kind: str | None
    metadata: dict[str, Any] | None
    # The job's own ``heartbeat_timeout``, or its kind's from ``[watchdog] kinds``.
    heartbeat_timeout: float | None


def parse_create(
    principal: Principal, body: Any, limits: LimitsConfig, kind_timeouts: Mapping[str, float]
) -> NewJob:
    """A job creation body; a server-made id when the body names none. Raises
    ``ValidationFailed`` / ``EventTooLarge``, and ``Forbidden`` for an id outside the
    credential's job grants."""
    if not isinstance(body, dict):
        raise InvalidJson("the body must be a JSON object")
    try:
        spec = CreateJobIn.model_validate(body)
    except ValidationError as exc:
        job_id = body.get("job_id")
        created = {"type": "created", "kind": body.get("kind"), "metadata": body.get("metadata")}
        # A server-made id is a 26-character ULID.
        job_id = job_id if isinstance(job_id, str) else "0" * 26
        refuse_oversize(job_id, created, limits.max_event_bytes)
        raise ValidationFailed("the job is not valid", field_errors(exc)) from None
    job_id = spec.job_id or new_job_id()
    if principal.grants is not None and not principal.grants.covers(job_id):
        # Refused, not "not found": a grant names which ids a credential may create, and
        # the refusal says nothing about whether the job exists.
        raise Forbidden(f"this credential's jobs grant does not cover job id {job_id}")
    timeout = spec.heartbeat_timeout
    if timeout is None and spec.kind is not None:
        timeout = kind_timeouts.get(spec.kind)
    return NewJob(JobKey(principal.tenant, job_id), spec.kind, spec.metadata, timeout)


def refuse_oversize(job_id: str, body: dict[str, Any], limit: int) -> None:
    """Size before field rules: an event over ``limit`` is 413 even when it also breaks a
    field cap. Valid events are measured exactly by the writer; this runs only on refusal."""
    items = body["events"] if is_batch(body) and isinstance(body["events"], list) else [body]
    for index, item in enumerate(items):
        size = stored_size_estimate(job_id, item)
        if size > limit:
            raise EventTooLarge(
                f"event {index} is about {size} bytes serialized; "
                f"the limit is {limit} (limits.max_event_bytes)"
            )


# The answer to a single-event append, the producer stream's common case, formatted: the
# same bytes as orjson's dump of the dict (the ts is the writer's, ASCII digits and
# punctuation), in a quarter of the time (0.44 against 1.76 µs with ``ack_frame``).
_ONE_EVENT_ACK = b'{"job_id":%b,"last_seq":%d,"events":[{"seq":%d,"id":%d,"ts":"%b"}]}'


def append_ack(result: AppendResult) -> bytes:
    """The acknowledgement of an append as JSON: the HTTP 201/200 body, and the producer
    stream's ``ack`` frame once ``ack_frame`` puts ``type`` and ``ref`` in front. Serialized
    once, here, for both."""
    events = result.events
    if len(events) == 1 and not events[0].duplicate:
        event = events[0]
        job_id = orjson.dumps(result.job_id)
        return _ONE_EVENT_ACK % (job_id, result.last_seq, event.seq, event.id, event.ts.encode())
    return orjson.dumps(
        {
            "job_id": result.job_id,
            "last_seq": result.last_seq,
            "events": [event.to_dict() for event in result.events],
        }
    )


def ack_frame(ref: int, body: bytes) -> bytes:
    """A producer-stream ``ack``: ``body`` (a JSON object: ``append_ack``'s, or
    ``{"job": <snapshot>}``) with ``type`` and ``ref`` first."""
    return b'{"type":"ack","ref":%d,%b' % (ref, body[1:])


def append_status(result: AppendResult) -> int:
    """201 when anything was stored, 200 when every event was a duplicate of a stored key."""
    return 200 if result.all_duplicates else 201


def append_outcome(error: BaseException | None, result: AppendResult | None = None) -> str:
    """The ``jobfeed_append_requests_total`` outcome of an answered append."""
    if error is None:
        assert result is not None
        return "duplicate" if result.all_duplicates else "created"
    if isinstance(error, ServiceError) and error.status < 500:
        return "refused"
    return "failed"
