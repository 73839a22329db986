"""Bad input at the edge: every malformed, mistyped, oversize or mislabelled body gets an
honest 4xx in the protocol's error shape, and the job's log is left exactly as it was.

Statuses (protocol v1, "Details that clients may rely on"): not JSON / not UTF-8 -> 400
``invalid_json``; breaks the schema -> 422 ``validation_error`` with ``details[].loc``;
wrong Content-Type -> 415; over ``limits.max_body_bytes`` -> 413 ``body_too_large``; an
event over ``limits.max_event_bytes`` -> 413 ``event_too_large``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import ValidationFailed
from server.handlers.request import parse_json
from tests.conftest import ClientFactory, ConfigFactory, append, create_job
from tests.test_api_jobs import assert_error, list_jobs, log_end, read_log

Client = TestClient[Any, Any]

JOB = "target"
EVENTS = f"/v1/jobs/{JOB}/events"


@pytest.fixture
async def job(client: Client) -> str:
    """A job with a created and a progress event: last_seq 2, running."""
    await create_job(client, job_id=JOB)
    await append(client, JOB, {"type": "progress", "progress": 10})
    return JOB


async def post_raw(
    client: Client, path: str, data: bytes, content_type: str = "application/json"
) -> ClientResponse:
    return await client.post(path, data=data, headers={"Content-Type": content_type})


async def assert_unchanged(client: Client) -> None:
    """The fixture job still holds exactly its two events and its snapshot is untouched."""
    assert await log_end(client, JOB) == 2
    snapshot = await (await client.get(f"/v1/jobs/{JOB}")).json()
    assert snapshot["status"] == "running"
    assert snapshot["progress"] == 10


async def locs_of(response: ClientResponse) -> list[list[Any]]:
    error = await assert_error(response, 422, "validation_error")
    return [detail["loc"] for detail in error["details"]]


# -- not JSON: 400 invalid_json ----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b'{"type": "log",', b"{", b"not json", b"{'type': 'log'}", b'{"type": "log"} extra',
     b'{"type": "log", "message": "m",}', b"\x00"],
)  # fmt: skip
async def test_malformed_json_is_400(client: Client, job: str, raw: bytes) -> None:
    """A body that is not valid JSON is 400 invalid_json and appends nothing."""
    await assert_error(await post_raw(client, EVENTS, raw), 400, "invalid_json")
    await assert_unchanged(client)


@pytest.mark.parametrize(
    "raw",
    [b'{"type": "log", "message": "caf\xe9"}', b'{"type": "log", "message": "\xff\xfe"}',
     b'{"type": "log", "message": "\xc3"}', b'{"type": "log", "message": "\xc0\xaf"}'],
)  # fmt: skip
async def test_invalid_utf8_is_400(client: Client, job: str, raw: bytes) -> None:
    """A body with bytes that are not UTF-8 is 400 invalid_json."""
    await assert_error(await post_raw(client, EVENTS, raw), 400, "invalid_json")
    await assert_unchanged(client)


async def test_lone_surrogate_escape_is_400(client: Client, job: str) -> None:
    """A ``\\ud800`` escape (no valid UTF-8 exists for it) is 400, never stored or a 500."""
    raw = b'{"type": "log", "message": "\\ud800"}'
    await assert_error(await post_raw(client, EVENTS, raw), 400, "invalid_json")
    await assert_unchanged(client)


@pytest.mark.parametrize(
    "raw",
    [b"[" * 20_000 + b"]" * 20_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000],
    ids=["arrays", "objects"],
)
async def test_body_nested_20000_deep_is_400(client: Client, job: str, raw: bytes) -> None:
    """A body nested 20,000 deep is 400 invalid_json (not a RecursionError 500)."""
    await assert_error(await post_raw(client, EVENTS, raw), 400, "invalid_json")
    await assert_unchanged(client)


async def test_deep_body_on_create_is_400(client: Client) -> None:
    """POST /v1/jobs with a body nested 20,000 deep is 400 invalid_json; no job is made."""
    raw = b'{"metadata":' + b'{"a":' * 20_000 + b"1" + b"}" * 20_001
    await assert_error(await post_raw(client, "/v1/jobs", raw), 400, "invalid_json")
    assert (await list_jobs(client))["jobs"] == []


async def _assert_refused_as_client_error(response: ClientResponse) -> None:
    """Too deep to store: 400 invalid_json or 422 validation_error, never a 500."""
    if response.status == 400:
        await assert_error(response, 400, "invalid_json")
    else:
        await assert_error(response, 422, "validation_error")


async def test_event_data_nested_300_deep_is_refused_not_500(client: Client, job: str) -> None:
    """An event whose data is nested deeper than the server can store (300 levels: legal for
    the parser, past the serializer's limit) is a 4xx, not a 500, and appends nothing."""
    data = b'{"a":' * 300 + b"1" + b"}" * 300
    raw = b'{"type": "log", "message": "m", "data": ' + data + b"}"
    await _assert_refused_as_client_error(await post_raw(client, EVENTS, raw))
    await assert_unchanged(client)


async def test_metadata_nested_300_deep_is_refused_not_500(client: Client) -> None:
    """A job created with metadata nested 300 deep is a 4xx, not a 500, and makes no job."""
    raw = b'{"job_id": "deep", "metadata": ' + b'{"a":' * 300 + b"1" + b"}" * 301
    await _assert_refused_as_client_error(await post_raw(client, "/v1/jobs", raw))
    await assert_error(await client.get("/v1/jobs/deep"), 404, "job_not_found")


async def test_unstorable_request_does_not_fail_concurrent_ones(client: Client, job: str) -> None:
    """Appends committed alongside an unstorable one (nested too deep) still succeed:
    a request that fails is refused alone, the others in its group go on."""
    await create_job(client, job_id="innocent")
    data = b'{"a":' * 300 + b"1" + b"}" * 300
    bad = b'{"type": "log", "message": "m", "data": ' + data + b"}"
    good = [
        client.post("/v1/jobs/innocent/events", json={"type": "log", "message": str(i)})
        for i in range(5)
    ]
    # The bad request goes in the middle, so that it shares a commit group with good ones.
    responses = await asyncio.gather(*good[:2], post_raw(client, EVENTS, bad), *good[2:])
    del responses[2]
    assert [r.status for r in responses] == [201] * 5, [await r.text() for r in responses]
    assert await log_end(client, "innocent") == 6


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_non_finite_number_literals_are_400(client: Client, job: str, literal: bytes) -> None:
    """NaN / Infinity literals (and numbers that overflow to infinity) are 400 invalid_json."""
    raw = b'{"type": "progress", "progress": ' + literal + b"}"
    await assert_error(await post_raw(client, EVENTS, raw), 400, "invalid_json")
    await assert_unchanged(client)


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n"], ids=["empty", "spaces", "newline"])
async def test_empty_append_body_is_400(client: Client, job: str, raw: bytes) -> None:
    """An append needs a body: an empty (or blank) application/json body is 400 invalid_json."""
    await assert_error(await post_raw(client, EVENTS, raw), 400, "invalid_json")
    await assert_unchanged(client)


async def test_malformed_json_on_create_is_400(client: Client) -> None:
    """POST /v1/jobs with a malformed body is 400 invalid_json; no job is made."""
    await assert_error(await post_raw(client, "/v1/jobs", b'{"job_id": '), 400, "invalid_json")
    assert (await list_jobs(client))["jobs"] == []


# -- non-object bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [[{"type": "log", "message": "m"}], [], "hello", 5, None, True],
    ids=["array-of-event", "empty-array", "string", "number", "null", "true"],
)
async def test_non_object_append_body_is_400(client: Client, job: str, body: Any) -> None:
    """An append body that is JSON but not an object (one event or {"events": [...]}) is
    400 invalid_json: the spec's "not an object where one is expected"."""
    response = await post_raw(client, EVENTS, json.dumps(body).encode())
    await assert_error(response, 400, "invalid_json")
    await assert_unchanged(client)


@pytest.mark.parametrize("body", [[1, 2], "job", 3], ids=["array", "string", "number"])
async def test_non_object_create_body_is_400(client: Client, body: Any) -> None:
    """A job-creation body that is JSON but not an object is 400 invalid_json."""
    await assert_error(await client.post("/v1/jobs", json=body), 400, "invalid_json")
    assert (await list_jobs(client))["jobs"] == []


# -- schema errors: 422 with details[].loc -----------------------------------------------------


@pytest.mark.parametrize(
    ("event", "loc"),
    [
        ({"type": "progress", "progress": "50"}, ["progress"]),
        ({"type": "progress", "current": True}, ["current"]),
        ({"type": "progress", "total": "7"}, ["total"]),
        ({"type": "progress", "phase": 1}, ["phase"]),
        ({"type": "progress", "data": [1]}, ["data"]),
        ({"type": "log", "message": 5}, ["message"]),
        ({"type": "log", "message": "m", "level": "loud"}, ["level"]),
        ({"type": "log", "message": "m", "data": "x"}, ["data"]),
        ({"type": "failed", "error": "boom"}, ["error"]),
        ({"type": "failed", "error": {"code": "E"}}, ["error", "message"]),
        ({"type": "cancelled", "reason": 3}, ["reason"]),
        ({"type": "notification", "message": ["m"]}, ["message"]),
        ({"type": "log", "message": "m", "key": 7}, ["key"]),
    ],
)
async def test_wrong_type_in_single_event_is_422_with_loc(
    client: Client, job: str, event: dict[str, Any], loc: list[Any]
) -> None:
    """A single event with a wrongly typed field is 422 with that field's loc (no prefix)."""
    assert loc in await locs_of(await client.post(EVENTS, json=event))
    await assert_unchanged(client)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"type": "progress", "progress": "50"}, "progress"),
        ({"type": "progress", "current": True}, "current"),
        ({"type": "log", "message": 5}, "message"),
    ],
)
async def test_wrong_type_in_batch_is_422_with_indexed_loc(
    client: Client, job: str, event: dict[str, Any], field: str
) -> None:
    """In a batch, a field error's loc is ``["events", index, field]``; nothing is written."""
    body = {"events": [{"type": "log", "message": "fine"}, event]}
    assert ["events", 1, field] in await locs_of(await client.post(EVENTS, json=body))
    await assert_unchanged(client)


async def test_batch_reports_every_bad_event(client: Client, job: str) -> None:
    """A batch with several bad events lists a field error for each of them."""
    body = {
        "events": [
            {"type": "progress", "progress": "50"},
            {"type": "log", "message": "fine"},
            {"type": "log", "message": 5},
        ]
    }
    locs = await locs_of(await client.post(EVENTS, json=body))
    assert ["events", 0, "progress"] in locs
    assert ["events", 2, "message"] in locs
    await assert_unchanged(client)


@pytest.mark.parametrize("progress", [101, -1, 100.0001, -0.5, 1e308])
async def test_progress_out_of_range_is_422(client: Client, job: str, progress: float) -> None:
    """``progress`` outside 0..100 is 422 on ``progress``."""
    event = {"type": "progress", "progress": progress}
    assert ["progress"] in await locs_of(await client.post(EVENTS, json=event))
    await assert_unchanged(client)


@pytest.mark.parametrize("progress", [0, 100, 0.0, 99.999])
async def test_progress_bounds_are_inclusive(client: Client, job: str, progress: float) -> None:
    """``progress`` 0 and 100 (and anything between) are accepted."""
    await append(client, job, {"type": "progress", "progress": progress})
    assert (await read_log(client, job))[-1]["progress"] == progress


@pytest.mark.parametrize(
    "event",
    [{"type": "progress", "current": -1}, {"type": "progress", "total": -3},
     {"type": "progress", "current": 2**53 + 1}],
)  # fmt: skip
async def test_counts_out_of_range_are_422(client: Client, job: str, event: dict[str, Any]) -> None:
    """current/total must be integers in 0..2**53."""
    await assert_error(await client.post(EVENTS, json=event), 422, "validation_error")
    await assert_unchanged(client)


async def test_current_over_total_is_422(client: Client, job: str) -> None:
    """current > total is 422."""
    event = {"type": "progress", "current": 8, "total": 7}
    await assert_error(await client.post(EVENTS, json=event), 422, "validation_error")
    await assert_unchanged(client)


@pytest.mark.parametrize("field", ["current", "total"])
async def test_integral_float_is_taken_as_integer(client: Client, job: str, field: str) -> None:
    """885.0 is accepted for current/total and stored as the integer 885."""
    event = {"type": "progress", "current": 10, "total": 1000, field: 885.0}
    response = await post_raw(client, EVENTS, json.dumps(event).encode())
    assert response.status == 201, await response.text()
    stored = (await read_log(client, job))[-1]
    assert stored[field] == 885
    assert isinstance(stored[field], int)


@pytest.mark.parametrize("field", ["current", "total"])
async def test_fractional_count_is_422(client: Client, job: str, field: str) -> None:
    """885.5 is not an integer: 422 on that field."""
    event = {"type": "progress", "current": 1, "total": 1000, field: 885.5}
    assert [field] in await locs_of(await client.post(EVENTS, json=event))
    await assert_unchanged(client)


@pytest.mark.parametrize("field", ["current", "total"])
@pytest.mark.parametrize("value", [False, True])
async def test_json_booleans_are_never_integers(
    client: Client, job: str, field: str, value: bool
) -> None:
    """JSON false/true is never accepted as an integer (not even false as 0)."""
    event = {"type": "progress", "phase": "p", field: value}
    assert [field] in await locs_of(await client.post(EVENTS, json=event))
    await assert_unchanged(client)


@pytest.mark.parametrize("value", [False, True])
async def test_json_booleans_are_never_progress(client: Client, job: str, value: bool) -> None:
    """JSON true/false is not a number for ``progress``."""
    event = {"type": "progress", "progress": value}
    assert ["progress"] in await locs_of(await client.post(EVENTS, json=event))
    await assert_unchanged(client)


@pytest.mark.parametrize(
    "event",
    [{"type": "log", "message": "m", "colour": "red"},
     {"type": "progress", "progress": 1, "Progress": 2},
     {"type": "failed", "error": {"message": "m", "extra": 1}}],
)  # fmt: skip
async def test_unknown_field_is_422(client: Client, job: str, event: dict[str, Any]) -> None:
    """An unknown field is refused (a typo never silently loses data)."""
    await assert_error(await client.post(EVENTS, json=event), 422, "validation_error")
    await assert_unchanged(client)


@pytest.mark.parametrize("field", ["job_id", "seq", "id", "ts"])
async def test_server_set_fields_cannot_be_sent(client: Client, job: str, field: str) -> None:
    """job_id, seq, id and ts are set by the server; a producer sending one gets 422."""
    event = {"type": "log", "message": "m", field: 99}
    assert [field] in await locs_of(await client.post(EVENTS, json=event))
    await assert_unchanged(client)


async def test_unknown_field_next_to_batch_is_422(client: Client, job: str) -> None:
    """A batch envelope with a field besides ``events`` is 422."""
    body = {"events": [{"type": "log", "message": "m"}], "atomic": True}
    assert ["atomic"] in await locs_of(await client.post(EVENTS, json=body))
    await assert_unchanged(client)


@pytest.mark.parametrize("events", [{}, "x", None], ids=["object", "string", "null"])
async def test_events_not_an_array_is_422(client: Client, job: str, events: Any) -> None:
    """``{"events": ...}`` where events is not an array is 422 on ``events``."""
    assert ["events"] in await locs_of(await client.post(EVENTS, json={"events": events}))
    await assert_unchanged(client)


async def test_empty_batch_is_422(client: Client, job: str) -> None:
    """``{"events": []}`` is 422 on ``events``."""
    assert ["events"] in await locs_of(await client.post(EVENTS, json={"events": []}))
    await assert_unchanged(client)


async def test_batch_over_max_batch_events_is_422(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A batch with more than limits.max_batch_events events is 422; at the limit it is fine."""
    client = await make_client(make_config(limits__max_batch_events=3))
    await create_job(client, job_id="small")
    four = {"events": [{"type": "log", "message": str(i)} for i in range(4)]}
    await assert_error(
        await client.post("/v1/jobs/small/events", json=four), 422, "validation_error"
    )
    assert await log_end(client, "small") == 1
    await append(client, "small", *four["events"][:3])


@pytest.mark.parametrize(
    "event",
    [{"message": "no type"}, {"type": None, "message": "m"}, {"type": 5},
     {"type": "progress"}, {"type": "log"}, {"type": "failed"},
     {"type": "log", "message": "m", "key": ""}, {"type": "log", "message": "m", "key": "k" * 201}],
)  # fmt: skip
async def test_missing_or_invalid_required_fields_are_422(
    client: Client, job: str, event: dict[str, Any]
) -> None:
    """No type, a progress with no field, a log with no message, a failed with no error,
    a key of 0 or over 200 chars: each is 422. (A text over 65,536 characters is 422 only
    in an event within limits.max_event_bytes: see the size tests below.)"""
    await assert_error(await client.post(EVENTS, json=event), 422, "validation_error")
    await assert_unchanged(client)


# -- Content-Type: 415 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/octet-stream",
     "application/jsonx"],
)  # fmt: skip
async def test_append_with_wrong_content_type_is_415(
    client: Client, job: str, content_type: str
) -> None:
    """An append whose Content-Type is not application/json is 415, even with a JSON body."""
    raw = b'{"type": "log", "message": "m"}'
    response = await post_raw(client, EVENTS, raw, content_type)
    await assert_error(response, 415, "unsupported_media_type")
    await assert_unchanged(client)


async def test_create_with_wrong_content_type_is_415(client: Client) -> None:
    """A job creation with a body labelled text/plain is 415; no job is made."""
    response = await post_raw(client, "/v1/jobs", b'{"job_id": "x"}', "text/plain")
    await assert_error(response, 415, "unsupported_media_type")
    assert (await list_jobs(client))["jobs"] == []


async def test_json_content_type_with_charset_is_accepted(client: Client, job: str) -> None:
    """``application/json; charset=utf-8`` is application/json."""
    raw = b'{"type": "log", "message": "m"}'
    response = await post_raw(client, EVENTS, raw, "application/json; charset=utf-8")
    assert response.status == 201, await response.text()


# -- sizes: 413 --------------------------------------------------------------------------------


@pytest.fixture
async def small_body_client(make_client: ClientFactory, make_config: ConfigFactory) -> Client:
    """An app with limits.max_body_bytes = 2048, holding the usual fixture job."""
    client = await make_client(make_config(limits__max_body_bytes=2048))
    await create_job(client, job_id=JOB)
    await append(client, JOB, {"type": "progress", "progress": 10})
    return client


async def test_body_over_max_body_bytes_is_413(small_body_client: Client) -> None:
    """A body over limits.max_body_bytes (by Content-Length) is 413 body_too_large."""
    client = small_body_client
    raw = json.dumps({"type": "log", "message": "x" * 3000}).encode()
    await assert_error(await post_raw(client, EVENTS, raw), 413, "body_too_large")
    await assert_unchanged(client)


async def test_chunked_body_over_max_body_bytes_is_413(small_body_client: Client) -> None:
    """A chunked body (no Content-Length) that grows past the limit is 413 body_too_large."""
    client = small_body_client
    raw = json.dumps({"type": "log", "message": "x" * 3000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 512):
            yield raw[start : start + 512]

    response = await client.post(
        EVENTS, data=chunks(), headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 413, "body_too_large")
    await assert_unchanged(client)


async def test_body_at_max_body_bytes_is_accepted(small_body_client: Client) -> None:
    """A body of exactly limits.max_body_bytes is accepted."""
    client = small_body_client
    prefix, suffix = b'{"type": "log", "message": "', b'"}'
    raw = prefix + b"x" * (2048 - len(prefix) - len(suffix)) + suffix
    assert len(raw) == 2048
    response = await post_raw(client, EVENTS, raw)
    assert response.status == 201, await response.text()


async def test_server_keeps_serving_after_413(small_body_client: Client) -> None:
    """After refusing an oversize body the server answers the next request normally."""
    client = small_body_client
    raw = json.dumps({"type": "log", "message": "x" * 50_000}).encode()
    await assert_error(await post_raw(client, EVENTS, raw), 413, "body_too_large")
    await append(client, JOB, {"type": "log", "message": "after"})
    assert await log_end(client, JOB) == 3


async def test_create_body_over_limit_is_413(small_body_client: Client) -> None:
    """A job creation body over limits.max_body_bytes is 413 body_too_large."""
    client = small_body_client
    raw = json.dumps({"job_id": "big", "metadata": {"x": "y" * 3000}}).encode()
    await assert_error(await post_raw(client, "/v1/jobs", raw), 413, "body_too_large")
    await assert_error(await client.get("/v1/jobs/big"), 404, "job_not_found")


async def test_event_over_max_event_bytes_is_413(client: Client, job: str) -> None:
    """One event under the body limit but over limits.max_event_bytes (64 KiB serialized)
    is 413 event_too_large, and nothing is written."""
    event = {"type": "log", "message": "m", "data": {"blob": "x" * 70_000}}
    await assert_error(await client.post(EVENTS, json=event), 413, "event_too_large")
    await assert_unchanged(client)


async def test_event_limit_counts_the_stored_serialization(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """max_event_bytes counts the stored event (server fields included), not the input."""
    client = await make_client(make_config(limits__max_event_bytes=300))
    await create_job(client, job_id="tight")
    base = {"type": "log", "message": ""}
    input_size = len(json.dumps(base, separators=(",", ":")))
    # Input just under 300 bytes; with job_id, seq, id, ts and level it is well over.
    base["message"] = "x" * (290 - input_size)
    await assert_error(
        await client.post("/v1/jobs/tight/events", json=base), 413, "event_too_large"
    )
    assert await log_end(client, "tight") == 1


async def test_oversize_event_in_batch_writes_nothing(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """A batch with one event over limits.max_event_bytes is 413 and writes none of it."""
    client = await make_client(make_config(limits__max_event_bytes=1024))
    await create_job(client, job_id="batchbig")
    body = {
        "events": [
            {"type": "log", "message": "small"},
            {"type": "log", "message": "x" * 2000},
            {"type": "log", "message": "small again"},
        ]
    }
    response = await client.post("/v1/jobs/batchbig/events", json=body)
    await assert_error(response, 413, "event_too_large")
    assert await log_end(client, "batchbig") == 1


async def test_oversize_metadata_is_413(client: Client) -> None:
    """A job whose created event would exceed max_event_bytes is 413; no job is made."""
    response = await client.post(
        "/v1/jobs", json={"job_id": "huge", "metadata": {"blob": "x" * 70_000}}
    )
    await assert_error(response, 413, "event_too_large")
    await assert_error(await client.get("/v1/jobs/huge"), 404, "job_not_found")


async def test_oversize_request_does_not_fail_concurrent_ones(client: Client, job: str) -> None:
    """An oversize append refused at commit time leaves concurrent good appends alone."""
    big = {"type": "log", "message": "m", "data": {"blob": "x" * 70_000}}
    responses = await asyncio.gather(
        client.post(EVENTS, json=big),
        *(client.post(EVENTS, json={"type": "log", "message": str(i)}) for i in range(3)),
    )
    await assert_error(responses[0], 413, "event_too_large")
    assert [r.status for r in responses[1:]] == [201] * 3
    assert await log_end(client, JOB) == 5


# -- integers outside the signed 64-bit range: 422, never a silent float -----------------------

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (b'{"type":"log","message":"m","data":{"x":18446744073709551616}}', ["data", "x"]),
        (b'{"type":"log","message":"m","data":{"x":9223372036854775808}}', ["data", "x"]),
        (b'{"type":"log","message":"m","data":{"x":-9223372036854775809}}', ["data", "x"]),
        (b'{"type":"log","message":"m","data":{"a":[1,{"b":[123456789012345678901234]}]}}',
         ["data", "a", 1, "b", 0]),
        (b'{"type":"completed","result":99999999999999999999}', ["result"]),
        (b'{"type":"failed","error":{"message":"m","details":[18446744073709551615]}}',
         ["error", "details", 0]),
        (b'{"events":[{"type":"log","message":"m"},{"type":"x.y","data":{"n":-1e2,'
         b'"big":-18446744073709551617}}]}', ["events", 1, "data", "big"]),
        (b'{"type":"progress","current":9223372036854775808}', ["current"]),
    ],
)  # fmt: skip
async def test_integer_outside_int64_is_422_with_loc(
    client: Client, job: str, raw: bytes, loc: list[Any]
) -> None:
    """An integer outside [-2**63, 2**63-1] anywhere in an event is 422 naming where it is,
    not stored as a float; nothing is written."""
    assert await locs_of(await post_raw(client, EVENTS, raw)) == [loc]
    await assert_unchanged(client)


async def test_integer_outside_int64_in_metadata_is_422(client: Client) -> None:
    """Job metadata is held to the same rule: 422 with its loc, and no job is made."""
    raw = b'{"job_id":"bigmeta","metadata":{"deep":[[{"n":18446744073709551616}]]}}'
    locs = await locs_of(await post_raw(client, "/v1/jobs", raw))
    assert locs == [["metadata", "deep", 0, 0, "n"]]
    await assert_error(await client.get("/v1/jobs/bigmeta"), 404, "job_not_found")


async def test_integers_at_the_int64_bounds_are_stored_exactly(client: Client, job: str) -> None:
    """The bounds themselves, and big digit runs inside strings, are kept exactly."""
    raw = (
        b'{"type":"log","message":"12345678901234567890123","data":{"min":-9223372036854775808,'
        b'"max":9223372036854775807,"s":"99999999999999999999","f":1.8446744073709552e19}}'
    )
    response = await post_raw(client, EVENTS, raw)
    assert response.status == 201, await response.text()
    page = await (await client.get(f"{EVENTS}?after=2")).read()
    assert b'"min":-9223372036854775808,"max":9223372036854775807' in page
    assert b'"s":"99999999999999999999"' in page
    assert b'"message":"12345678901234567890123"' in page


# -- size before field rules: an event over limits.max_event_bytes is 413, never 422 -----------


@pytest.mark.parametrize(
    ("max_event_bytes", "event"),
    [
        # The default limit: a log message past the 65,536-character field cap.
        (65_536, {"type": "log", "message": "x" * 70_000}),
        (65_536, {"type": "progress", "phase": "p" * 66_000, "current": 1}),
        # A limit below the field caps: a key over its 200 characters in a too-big event.
        (1024, {"type": "log", "message": "x" * 2000, "key": "k" * 300}),
        (1024, {"type": "log", "message": "x" * 2000, "level": "loud"}),
        (1024, {"type": "failed", "error": {"message": "x" * 2000, "code": "c" * 300}}),
        # A limit above the field caps: a message past both.
        (300_000, {"type": "log", "message": "x" * 310_000}),
        (300_000, {"type": "log", "message": "x" * 310_000, "key": "k" * 300}),
    ],
)
async def test_oversize_event_is_413_whatever_its_field_errors(
    make_client: ClientFactory, make_config: ConfigFactory, max_event_bytes: int, event: Any
) -> None:
    """No field cap turns an event over limits.max_event_bytes into a 422: size comes first,
    alone or in a batch, whatever the limit is configured to."""
    config = make_config(
        limits__max_event_bytes=max_event_bytes, limits__max_body_bytes=4 * 1024 * 1024
    )
    client = await make_client(config)
    await create_job(client, job_id="sized")
    for body in (event, {"events": [{"type": "log", "message": "small"}, event]}):
        response = await client.post("/v1/jobs/sized/events", json=body)
        await assert_error(response, 413, "event_too_large")
    assert await log_end(client, "sized") == 1


async def test_field_cap_still_applies_under_a_higher_limit(
    make_client: ClientFactory, make_config: ConfigFactory
) -> None:
    """With limits.max_event_bytes above the field caps, an event within the limit whose
    message is over 65,536 characters is still 422 (the cap, not the size, is broken)."""
    config = make_config(limits__max_event_bytes=300_000)
    client = await make_client(config)
    await create_job(client, job_id="capped")
    body = {"type": "log", "message": "x" * 70_000}
    assert await locs_of(await client.post("/v1/jobs/capped/events", json=body)) == [["message"]]


def _near(bound: int) -> st.SearchStrategy[int]:
    return st.integers(bound - 3, bound + 3)


_INTEGERS = st.one_of(
    st.integers(-1000, 1000),
    *(_near(b) for b in (I64_MIN, I64_MAX, 2**64 - 1, -(2**64))),
    st.integers(-(2**80), 2**80),
)
_SCALARS = st.one_of(
    _INTEGERS,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet='0123456789"\\.e- x'),
    st.booleans(),
    st.none(),
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=30,
)


def _int_locs(value: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], int]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _int_locs(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _int_locs(item, (*loc, index))
    elif isinstance(value, int) and not isinstance(value, bool):
        yield loc, value


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same JSON types all the way down (an int is never a float)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(document=_DOCUMENTS)
def test_every_integer_is_exact_or_refused(document: Any) -> None:
    """Over nested JSON with integers near the 64-bit bounds (and digit runs in strings):
    a body whose integers all fit in signed 64 bits parses to exactly what was sent; one with
    any integer outside is 422 ``int_out_of_range`` naming each such integer's loc."""
    raw = json.dumps(document).encode()
    outside = {loc for loc, n in _int_locs(document) if not I64_MIN <= n <= I64_MAX}
    if not outside:
        assert _same(parse_json(raw), document)
        return
    with pytest.raises(ValidationFailed) as refused:
        parse_json(raw)
    reported = {tuple(detail["loc"]) for detail in refused.value.details}
    assert {detail["type"] for detail in refused.value.details} == {"int_out_of_range"}
    # A float that happens to equal an offender's rounded value may be named too.
    assert outside <= reported


@pytest.mark.parametrize(
    "extra", [{"kind": "k" * 200}, {"job_id": "bad id"}, {"kind": ""}], ids=["kind", "id", "empty"]
)
async def test_oversize_created_event_is_413_whatever_its_field_errors(
    client: Client, extra: dict[str, Any]
) -> None:
    """Job creation keeps the same order: a created event over limits.max_event_bytes is 413
    even with a field error beside it; no job is made."""
    body = {"job_id": "hugejob", "metadata": {"blob": "x" * 70_000}, **extra}
    await assert_error(await client.post("/v1/jobs", json=body), 413, "event_too_large")
    await assert_error(await client.get("/v1/jobs/hugejob"), 404, "job_not_found")


async def test_integer_outside_int64_deep_in_a_body_is_422_not_500(
    client: Client, job: str
) -> None:
    """The check walks a body as deep as the parser takes (1024), past Python's recursion
    limit, without a RecursionError: the loc is named."""
    depth = 1000
    raw = b'{"type":"log","message":"m","data":{"x":' + b"[" * depth
    raw += b"18446744073709551616" + b"]" * depth + b"}}"
    locs = await locs_of(await post_raw(client, EVENTS, raw))
    assert locs == [["data", "x", *[0] * depth]]


@pytest.mark.parametrize(
    ("raw", "candidate"),
    [
        (b'{"t": 1764320000000000000}', False),  # time.time_ns(): 19 digits, inside
        (b'{"t": 8999999999999999999, "u": "1234567890123456789"}', False),
        (b'{"t": -8999999999999999999}', False),
        (b'{"t": 9223372036854775807}', True),  # INT64_MAX itself: looked at, then kept
        (b'{"t": 9223372036854775808}', True),
        (b'{"t": 12345678901234567890}', True),
        (b'{"t": 1764320000000000000, "u": 99999999999999999999}', True),
        (b'{"t": 1.12345678901234567891}', True),  # fraction digits: the slow path decides
    ],
)
def test_long_integer_prefilter(raw: bytes, candidate: bool) -> None:
    """The cheap test that sends a body to the exact one: every integer outside signed 64
    bits is caught (20+ digits, or 19 beginning with 9), nanosecond timestamps are not."""
    from server.handlers.request import _may_hold_long_integer

    assert _may_hold_long_integer(raw) is candidate
