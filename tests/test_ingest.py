"""The producer stream ``GET /v1/ingest`` through the real app on a real socket (spec
ingest.md; docs/protocol.md, "Producer stream"): pipelined requests answered in order after
commit, per-request errors that refuse nothing else, malformed and oversize frames,
credentials, and idempotent resends after a dropped connection.

The tests that are about processes (SIGKILL, SIGTERM, memory) are in test_ingest_process.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

from server.keys import CONFIG, STORE
from tests.conftest import (
    ClientFactory,
    ConfigFactory,
    append,
    auth_settings,
    bearer,
    create_job,
    token,
)
from tests.procs import read_log
from tests.streams import receive_json

# Every test that builds a config runs with authentication off and on (tests/conftest.py).
AUTH_MODES = ("off", "on")
WAIT = 15.0  # bound on any one wait; a healthy server answers in milliseconds


async def answers(ws: ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [await receive_json(ws) for _ in range(count)]


async def expect_close(ws: ClientWebSocketResponse, code: int) -> None:
    async with asyncio.timeout(WAIT):
        message = await ws.receive()
    assert message.type == WSMsgType.CLOSE, message
    assert ws.close_code == code


def log_event(n: int, key: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "log", "message": f"line {n}"}
    if key is not None:
        event["key"] = key
    return event


async def test_pipelined_requests_over_several_jobs_are_acknowledged_in_order(
    client: TestClient[Any, Any],
) -> None:
    """Creates and 600 appends over three jobs, all sent before any answer is read, are
    answered in the order sent, each job's seqs contiguous, in far fewer group commits than
    requests; the log holds exactly what the acks say."""
    jobs = ["pipe-a", "pipe-b", "pipe-c"]
    writer = client.app[STORE].writer
    commits_before = writer.commits
    async with client.ws_connect("/v1/ingest") as ws:
        ref = 0
        for job_id in jobs:
            ref += 1
            await ws.send_json({"type": "create", "ref": ref, "job_id": job_id, "kind": "k"})
        for n in range(600):
            ref += 1
            job_id = jobs[n % 3]
            await ws.send_json(
                {"type": "append", "ref": ref, "job_id": job_id, "event": log_event(n)}
            )
        got = await answers(ws, ref)
    assert [frame["ref"] for frame in got] == list(range(1, ref + 1))
    assert all(frame["type"] == "ack" for frame in got), [f for f in got if f["type"] != "ack"]
    assert [frame["job"]["job_id"] for frame in got[:3]] == jobs
    assert all(frame["job"]["kind"] == "k" for frame in got[:3])
    for job_id in jobs:
        seqs = [f["events"][0]["seq"] for f in got[3:] if f["job_id"] == job_id]
        assert seqs == list(range(2, 202))
        acked = [f for f in got[3:] if f["job_id"] == job_id]
        assert [f["last_seq"] for f in acked] == seqs
        stored = await read_log(client, job_id)  # type: ignore[arg-type]
        assert [e["seq"] for e in stored] == list(range(1, 202))
        assert [e["id"] for e in stored[1:]] == [f["events"][0]["id"] for f in acked]
    # Pipelined into the writer, not awaited one by one: groups, not one commit each.
    assert writer.commits - commits_before < ref / 4


async def test_an_ack_is_the_http_payload_plus_type_and_ref(client: TestClient[Any, Any]) -> None:
    """The ack of an append is exactly what POST .../events answers, with type and ref: the
    same stored events answered again (keys) give the same payload both ways."""
    await create_job(client, job_id="same")
    batch = {"events": [log_event(1, "k1"), log_event(2, "k2")]}
    async with client.ws_connect("/v1/ingest") as ws:
        await ws.send_json({"type": "append", "ref": 7, "job_id": "same", **batch})
        first = await receive_json(ws)
        await ws.send_json({"type": "append", "ref": 8, "job_id": "same", **batch})
        again = await receive_json(ws)
    response = await client.post("/v1/jobs/same/events", json=batch)
    assert response.status == 200
    http = await response.json()
    assert {k: v for k, v in again.items() if k not in ("type", "ref")} == http
    assert again["type"] == "ack"
    assert again["ref"] == 8
    assert [e["seq"] for e in first["events"]] == [2, 3]
    assert "duplicate" not in first["events"][0]
    assert all(e["duplicate"] for e in again["events"])


async def test_refused_requests_refuse_nothing_else(
    client: TestClient[Any, Any], make_config: ConfigFactory
) -> None:
    """Unknown job, finished job, invalid event, oversize event and a bad progress count,
    pipelined among good appends: each bad one gets its error with its ref and the HTTP
    code; every good one is stored, with contiguous seqs."""
    await create_job(client, job_id="good")
    await create_job(client, job_id="done")
    await append(client, "done", {"type": "completed"})
    await append(client, "good", {"type": "progress", "current": 1, "total": 10})
    big = "x" * (client.app[CONFIG].limits.max_event_bytes + 10)
    bad: dict[int, tuple[dict[str, Any], str]] = {
        2: ({"job_id": "nope", "event": log_event(0)}, "job_not_found"),
        4: ({"job_id": "done", "event": log_event(0)}, "job_finished"),
        6: ({"job_id": "good", "event": {"type": "log"}}, "validation_error"),
        8: ({"job_id": "good", "event": {"type": "log", "message": big}}, "event_too_large"),
        10: ({"job_id": "good", "event": {"type": "progress", "current": 99}}, "validation_error"),
        12: ({"job_id": "good", "events": [log_event(0), {"type": "created"}]}, "validation_error"),
    }
    async with client.ws_connect("/v1/ingest") as ws:
        for ref in range(1, 14):
            body = bad.get(ref, ({"job_id": "good", "event": log_event(ref)}, ""))[0]
            await ws.send_json({"type": "append", "ref": ref, **body})
        got = await answers(ws, 13)
    assert [frame["ref"] for frame in got] == list(range(1, 14))
    for frame in got:
        if frame["ref"] in bad:
            assert frame["type"] == "error", frame
            assert frame["code"] == bad[frame["ref"]][1], frame
            assert isinstance(frame["message"], str)
            assert isinstance(frame["details"], list)
        else:
            assert frame["type"] == "ack", frame
    good = [frame["events"][0]["seq"] for frame in got if frame["type"] == "ack"]
    assert good == [3, 4, 5, 6, 7, 8, 9]
    stored = await read_log(client, "good")  # type: ignore[arg-type]
    assert [e["seq"] for e in stored] == list(range(1, 10))
    assert [e.get("message") for e in stored[2:]] == [f"line {n}" for n in (1, 3, 5, 7, 9, 11, 13)]


async def test_create_answers_the_snapshot_and_refuses_an_existing_job(
    client: TestClient[Any, Any],
) -> None:
    """A create is acknowledged with the job's snapshot (as POST /v1/jobs answers it); a
    second create of the same id gets job_exists; a create without an id gets a new one."""
    async with client.ws_connect("/v1/ingest") as ws:
        await ws.send_json({"type": "create", "ref": 1, "job_id": "c1", "metadata": {"a": 1}})
        await ws.send_json({"type": "create", "ref": 2, "job_id": "c1"})
        await ws.send_json({"type": "create", "ref": 3})
        await ws.send_json({"type": "create", "ref": 4, "job_id": "bad id!"})
        one, two, three, four = await answers(ws, 4)
    response = await client.get("/v1/jobs/c1")
    assert one == {"type": "ack", "ref": 1, "job": await response.json()}
    assert one["job"]["metadata"] == {"a": 1}
    assert (two["type"], two["code"]) == ("error", "job_exists")
    assert three["type"] == "ack"
    assert len(three["job"]["job_id"]) == 26
    assert (four["type"], four["code"], four["ref"]) == ("error", "validation_error", 4)


async def test_malformed_frames_get_errors_and_the_connection_stays_open(
    client: TestClient[Any, Any],
) -> None:
    """Not JSON, not an object, no ref, an unknown type, an unknown field, neither events nor
    event: each gets an error (with its ref when it has one), and the next append works."""
    await create_job(client, job_id="m")
    async with client.ws_connect("/v1/ingest") as ws:
        await ws.send_str("{not json")
        await ws.send_str("[1, 2]")
        await ws.send_json({"type": "append", "job_id": "m", "event": log_event(0)})
        await ws.send_json({"type": "append", "ref": "7", "job_id": "m", "event": log_event(0)})
        await ws.send_json({"type": "subscribe", "ref": 5})
        await ws.send_json({"type": "append", "ref": 6, "job_id": "m", "event": {}, "x": 1})
        await ws.send_json({"type": "append", "ref": 7, "job_id": "m"})
        await ws.send_json({"type": "append", "ref": 8, "event": log_event(0)})
        await ws.send_bytes(b'{"type": "append", "ref": 9, "job_id": "m", "event": 3}')
        await ws.send_json({"type": "append", "ref": 10, "job_id": "m", "event": log_event(1)})
        got = await answers(ws, 10)
    codes = [(frame["type"], frame["ref"], frame.get("code")) for frame in got]
    assert codes == [
        ("error", None, "invalid_json"),
        ("error", None, "invalid_json"),
        ("error", None, "validation_error"),
        ("error", None, "validation_error"),
        ("error", 5, "bad_request"),
        ("error", 6, "validation_error"),
        ("error", 7, "validation_error"),
        ("error", 8, "validation_error"),
        ("error", 9, "invalid_json"),
        ("ack", 10, None),
    ]
    assert got[-1]["events"][0]["seq"] == 2


async def test_a_frame_over_max_body_bytes_closes_1009(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A frame of limits.max_body_bytes is read; one byte more closes the socket with 1009."""
    client = await make_client(make_config(limits__max_body_bytes=4096))
    await create_job(client, job_id="big")
    async with client.ws_connect("/v1/ingest") as ws:
        frame = json.dumps({"type": "append", "ref": 1, "job_id": "big", "event": log_event(0)})
        padded = frame[:-1] + " " * (4096 - len(frame)) + "}"
        assert len(padded.encode()) == 4096
        await ws.send_str(padded)
        assert (await receive_json(ws))["type"] == "ack"
        await ws.send_str(padded[:-1] + "  }")
        await expect_close(ws, 1009)


async def test_resending_after_a_dropped_connection_stores_nothing_twice(
    client: TestClient[Any, Any],
) -> None:
    """A producer whose connection drops with requests unanswered resends every one of them
    on a new connection: with keys, each event is stored once (the resent ones that had
    been committed are answered as duplicates with their original seq)."""
    await create_job(client, job_id="resend")
    frames = [
        {"type": "append", "ref": n, "job_id": "resend", "event": log_event(n, f"key-{n}")}
        for n in range(1, 201)
    ]
    async with client.ws_connect("/v1/ingest") as ws:
        for frame in frames:
            await ws.send_json(frame)
        answered = await answers(ws, 50)
        # Dropped without a close handshake, 150 requests unanswered.
        assert ws._response.connection is not None
        ws._response.connection.transport.abort()  # type: ignore[union-attr]
    first_seq = {frame["ref"]: frame["events"][0]["seq"] for frame in answered}
    async with client.ws_connect("/v1/ingest") as ws:
        for frame in frames[50:]:
            await ws.send_json(frame)
        resent = await answers(ws, 150)
    assert all(frame["type"] == "ack" for frame in resent)
    stored = await read_log(client, "resend")  # type: ignore[arg-type]
    assert [e["message"] for e in stored[1:]] == [f"line {n}" for n in range(1, 201)]
    assert [e["seq"] for e in stored] == list(range(1, 202))
    for n, seq in first_seq.items():
        assert stored[seq - 1]["message"] == f"line {n}"


async def test_counted_in_the_append_metrics(client: TestClient[Any, Any]) -> None:
    """Ingest appends move jobfeed_append_requests_total by outcome, as HTTP appends do, and
    an open producer stream shows in jobfeed_ingest_connections_open."""
    await create_job(client, job_id="counted")
    async with client.ws_connect("/v1/ingest") as ws:
        await ws.send_json({"type": "append", "ref": 1, "job_id": "counted", "event": log_event(1)})
        await ws.send_json({"type": "append", "ref": 2, "job_id": "gone", "event": log_event(2)})
        await ws.send_json({"type": "append", "ref": 3, "job_id": "counted", "event": {}})
        await answers(ws, 3)
        text = await (await client.get("/metrics")).text()
        assert "jobfeed_ingest_connections_open 1" in text
    assert 'jobfeed_append_requests_total{outcome="created"} 1' in text
    assert 'jobfeed_append_requests_total{outcome="refused"} 2' in text
    assert "jobfeed_append_ack_seconds_count 1" in text


async def test_ingest_connections_are_capped(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Past ingest.max_connections a new producer stream gets overloaded and 1013; once one
    closes, a new one is admitted."""
    client = await make_client(make_config(ingest__max_connections=1))
    async with client.ws_connect("/v1/ingest") as first:
        async with client.ws_connect("/v1/ingest") as second:
            error = await receive_json(second)
            await expect_close(second, 1013)
        assert error["code"] == "overloaded"
        await first.send_json({"type": "create", "ref": 1, "job_id": "cap"})
        assert (await receive_json(first))["type"] == "ack"
    async with client.ws_connect("/v1/ingest") as third:
        await third.send_json({"type": "create", "ref": 1, "job_id": "cap2"})
        assert (await receive_json(third))["type"] == "ack"


# -- credentials (authentication on) ----------------------------------------------------


@pytest.fixture
async def anon(make_config: ConfigFactory, make_client: ClientFactory) -> TestClient[Any, Any]:
    """A client of an app with authentication on (leeway 0) that sends no credential."""
    return await make_client(make_config(**auth_settings(auth__leeway_seconds=0)), None)


async def test_no_token_is_refused_4401(anon: TestClient[Any, Any]) -> None:
    """Without a credential the upgrade is answered with unauthorized and 4401, as every
    stream is (an HTTP append would be 401)."""
    async with anon.ws_connect("/v1/ingest") as ws:
        error = await receive_json(ws)
        await expect_close(ws, 4401)
    assert error["code"] == "unauthorized"


async def test_a_token_without_jobs_write_is_refused_4403(anon: TestClient[Any, Any]) -> None:
    """A jobs:read token cannot produce: forbidden and 4403 (HTTP: 403)."""
    async with anon.ws_connect("/v1/ingest", headers=bearer(token(scope="jobs:read"))) as ws:
        error = await receive_json(ws)
        await expect_close(ws, 4403)
    assert error["code"] == "forbidden"


async def test_job_grants_and_tenants_apply_per_request(anon: TestClient[Any, Any]) -> None:
    """A token granted jobs build-* appends to build-1; another tenant's job and a job
    outside the grant are job_not_found; a create outside the grant is forbidden."""
    for tenant in ("acme", "other"):
        response = await anon.post(
            "/v1/jobs", json={"job_id": "build-1"}, headers=bearer(token(tenant))
        )
        assert response.status == 201
    await anon.post("/v1/jobs", json={"job_id": "deploy-1"}, headers=bearer(token("acme")))
    granted = bearer(token("acme", jobs=["build-*"]))
    async with anon.ws_connect("/v1/ingest", headers=granted) as ws:
        await ws.send_json({"type": "append", "ref": 1, "job_id": "build-1", "event": log_event(1)})
        await ws.send_json(
            {"type": "append", "ref": 2, "job_id": "deploy-1", "event": log_event(1)}
        )
        await ws.send_json({"type": "create", "ref": 3, "job_id": "deploy-2"})
        one, two, three = await answers(ws, 3)
    assert one["type"] == "ack"
    assert one["last_seq"] == 2
    assert two["code"] == "job_not_found"
    assert three["code"] == "forbidden"
    other = await anon.get("/v1/jobs/build-1", headers=bearer(token("other")))
    assert (await other.json())["last_seq"] == 1


async def test_an_expiring_token_answers_what_was_read_then_closes_4401(
    anon: TestClient[Any, Any],
) -> None:
    """A producer stream whose token expires is answered for every request it sent before,
    then gets token_expired and 4401, as subscribers' streams do."""
    await anon.post("/v1/jobs", json={"job_id": "exp"}, headers=bearer(token()))
    async with anon.ws_connect("/v1/ingest", headers=bearer(token(ttl_seconds=2))) as ws:
        await ws.send_json({"type": "append", "ref": 1, "job_id": "exp", "event": log_event(1)})
        assert (await receive_json(ws))["type"] == "ack"
        error = await receive_json(ws)
        await expect_close(ws, 4401)
    assert error["code"] == "token_expired"


async def test_a_revoked_token_answers_what_was_read_then_closes_4403(
    make_config: ConfigFactory, make_client: ClientFactory, tmp_path: Path
) -> None:
    """auth.not_before written into the running server's config file ends a producer stream
    of an earlier token within recheck_seconds: forbidden and 4403, as subscribers' streams
    end; what it sent before was answered."""
    config_path = tmp_path / "jobfeed.toml"
    config_path.write_text('[auth]\nnot_before = ""\n', encoding="utf-8")
    config = make_config(**auth_settings(auth__recheck_seconds=0.2))
    client = await make_client(config, None, config_path=config_path)
    await client.post("/v1/jobs", json={"job_id": "rev"}, headers=bearer(token()))
    old = bearer(token(now=time.time() - 60))
    async with client.ws_connect("/v1/ingest", headers=old) as ws:
        await ws.send_json({"type": "append", "ref": 1, "job_id": "rev", "event": log_event(1)})
        assert (await receive_json(ws))["type"] == "ack"
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
        config_path.write_text(f'[auth]\nnot_before = "{cutoff}"\n', encoding="utf-8")
        error = await receive_json(ws)
        await expect_close(ws, 4403)
    assert error["code"] == "forbidden"
