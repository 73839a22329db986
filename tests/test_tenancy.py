"""The isolation matrix (issue 9): two tenants with the same job ids, appending at the same
time, read back through every endpoint and both stream transports. Not one event, job or key
of one tenant may show on the other's streams, lists, pages, exports or idempotency answers.

Every event carries its tenant in ``data``, every job in ``metadata``, so a leak is visible
wherever it lands. Subscribers join before the appends (live path, the hub's channels) and
after them (replay from SQLite and from the hub's cache).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory, ConfigFactory, auth_settings, bearer, token
from tests.feedclient import feed_url, read_feed_sse, read_feed_ws
from tests.streams import StreamLog, read_sse, read_ws, stored_log

TENANTS = ("alpha", "beta")
JOBS = ("build-1", "build-2", "shared")
EVENTS = 60  # per job and tenant, in batches; then `completed`
WAIT = 30.0


@pytest.fixture
async def client(make_config: ConfigFactory, make_client: ClientFactory) -> TestClient[Any, Any]:
    """Authentication on; requests name their tenant's token explicitly."""
    return await make_client(make_config(**auth_settings()), None)


def as_tenant(tenant: str, **more: Any) -> dict[str, str]:
    return bearer(token(tenant, **more))


async def produce(client: TestClient[Any, Any], tenant: str, job_id: str) -> None:
    headers = as_tenant(tenant)
    for start in range(0, EVENTS, 6):
        events = [
            {"type": "log", "message": f"{tenant} {n}", "data": {"tenant": tenant, "n": n}}
            for n in range(start, min(start + 6, EVENTS))
        ]
        response = await client.post(
            f"/v1/jobs/{job_id}/events", json={"events": events}, headers=headers
        )
        assert response.status == 201, await response.text()
        await asyncio.sleep(0)  # let the other tenant's producers interleave
    done = await client.post(
        f"/v1/jobs/{job_id}/events",
        json={"type": "completed", "data": {"tenant": tenant}},
        headers=headers,
    )
    assert done.status == 201, await done.text()


def check_stream(log: StreamLog, tenant: str, job_id: str) -> None:
    """A whole log of ``tenant``'s job: created, EVENTS events and completed, all its own."""
    assert log.ended, log
    assert log.seqs == list(range(1, EVENTS + 3)), (tenant, job_id, log.seqs[:5])
    for raw in log.events:
        event = json.loads(raw)
        assert event["job_id"] == job_id
        if event["type"] == "created":
            assert event["metadata"] == {"tenant": tenant}
        else:
            assert event["data"]["tenant"] == tenant, (tenant, event)


async def subscribe_all(client: TestClient[Any, Any], tenant: str) -> list[asyncio.Task[Any]]:
    """One WebSocket and one SSE subscriber per job of ``tenant``, each reading to the end."""
    headers = as_tenant(tenant)
    tasks = []
    for job_id in JOBS:
        path = f"/v1/jobs/{job_id}/stream"
        tasks.append(asyncio.create_task(read_ws(client, path, headers=headers)))
        tasks.append(asyncio.create_task(read_sse(client, path, headers=headers)))
    return tasks


async def test_two_tenants_with_the_same_job_ids_share_nothing(
    client: TestClient[Any, Any],
) -> None:
    """Both tenants create build-1, build-2 and shared, subscribe to all of them over both
    transports, and append to all six jobs at once. Every stream (live and replayed), list,
    snapshot, page and export of a tenant holds exactly that tenant's events."""
    for tenant in TENANTS:
        for job_id in JOBS:
            response = await client.post(
                "/v1/jobs",
                json={"job_id": job_id, "metadata": {"tenant": tenant}},
                headers=as_tenant(tenant),
            )
            assert response.status == 201, await response.text()
    again = await client.post("/v1/jobs", json={"job_id": "shared"}, headers=as_tenant("alpha"))
    assert again.status == 409

    live = {tenant: await subscribe_all(client, tenant) for tenant in TENANTS}
    async with asyncio.timeout(WAIT):
        await asyncio.gather(
            *(produce(client, tenant, job_id) for tenant in TENANTS for job_id in JOBS)
        )
        live_logs = {tenant: await asyncio.gather(*tasks) for tenant, tasks in live.items()}
        replay = {tenant: await subscribe_all(client, tenant) for tenant in TENANTS}
        replay_logs = {tenant: await asyncio.gather(*tasks) for tenant, tasks in replay.items()}

    for logs in (live_logs, replay_logs):
        for tenant, tenant_logs in logs.items():
            for index, log in enumerate(tenant_logs):
                check_stream(log, tenant, JOBS[index // 2])

    for tenant in TENANTS:
        headers = as_tenant(tenant)
        listed = await (await client.get("/v1/jobs?limit=100", headers=headers)).json()
        assert sorted(job["job_id"] for job in listed["jobs"]) == sorted(JOBS)
        assert all(job["metadata"] == {"tenant": tenant} for job in listed["jobs"])
        for job_id in JOBS:
            snapshot = await (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
            assert snapshot["metadata"] == {"tenant": tenant}
            assert snapshot["last_seq"] == EVENTS + 2
            assert snapshot["status"] == "completed"
            page = await (
                await client.get(f"/v1/jobs/{job_id}/events?limit=1000", headers=headers)
            ).json()
            exported = await client.get(
                f"/v1/jobs/{job_id}/events",
                headers={**headers, "Accept": "application/x-ndjson"},
            )
            lines = (await exported.text()).splitlines()
            assert [json.dumps(e, separators=(",", ":")) for e in page["events"]] == lines
            for event in page["events"][1:]:
                assert event["data"]["tenant"] == tenant


async def test_idempotency_keys_belong_to_one_tenant(client: TestClient[Any, Any]) -> None:
    """The same key on the same job id in two tenants appends in both; a retry within one
    tenant is that tenant's duplicate, answered with its own seq."""
    for tenant in TENANTS:
        response = await client.post(
            "/v1/jobs", json={"job_id": "job-k"}, headers=as_tenant(tenant)
        )
        assert response.status == 201
    alpha, beta = as_tenant("alpha"), as_tenant("beta")
    body = {"type": "log", "message": "once", "key": "k-1"}
    assert (await client.post("/v1/jobs/job-k/events", json=body, headers=alpha)).status == 201
    extra = {"type": "log", "message": "beta first"}
    assert (await client.post("/v1/jobs/job-k/events", json=extra, headers=beta)).status == 201
    beta_once = await client.post("/v1/jobs/job-k/events", json=body, headers=beta)
    assert beta_once.status == 201
    assert (await beta_once.json())["events"][0]["seq"] == 3
    retry = await client.post("/v1/jobs/job-k/events", json=body, headers=alpha)
    assert retry.status == 200
    assert (await retry.json())["events"][0]["seq"] == 2


async def test_a_tenant_cannot_see_another_tenants_job(client: TestClient[Any, Any]) -> None:
    """A job only beta has is missing for alpha everywhere: 404 on snapshot, page, export,
    append and SSE; 4004 on WebSocket; absent from alpha's list; and alpha's ticket does
    not reach it either."""
    response = await client.post(
        "/v1/jobs", json={"job_id": "beta-only"}, headers=as_tenant("beta")
    )
    assert response.status == 201
    alpha = as_tenant("alpha")
    for path, headers in (
        ("/v1/jobs/beta-only", alpha),
        ("/v1/jobs/beta-only/events", alpha),
        ("/v1/jobs/beta-only/events", {**alpha, "Accept": "application/x-ndjson"}),
        ("/v1/jobs/beta-only/stream", {**alpha, "Accept": "text/event-stream"}),
    ):
        answer = await client.get(path, headers=headers)
        assert answer.status == 404, path
        assert (await answer.json())["error"]["code"] == "job_not_found"
    append = await client.post(
        "/v1/jobs/beta-only/events", json={"type": "log", "message": "x"}, headers=alpha
    )
    assert append.status == 404
    ws = await read_ws(client, "/v1/jobs/beta-only/stream", headers=alpha)
    assert ws.close_code == 4004
    listed = await (await client.get("/v1/jobs", headers=alpha)).json()
    assert listed["jobs"] == []
    ticket = await (await client.post("/v1/tickets", json={}, headers=alpha)).json()
    assert (await client.get(f"/v1/jobs/beta-only?ticket={ticket['ticket']}")).status == 404
    assert await stored_log(client, "beta-only", headers=as_tenant("beta"))


# -- the feed (feed.md): one cursor over many jobs, per tenant -----------------------------


def _tenant_of(event: dict[str, Any]) -> str:
    carrier = event["metadata"] if event["type"] == "created" else event["data"]
    tenant: str = carrier["tenant"]
    return tenant


async def _create_all(client: TestClient[Any, Any]) -> None:
    for tenant in TENANTS:
        for job_id in JOBS:
            response = await client.post(
                "/v1/jobs",
                json={"job_id": job_id, "metadata": {"tenant": tenant}},
                headers=as_tenant(tenant),
            )
            assert response.status == 201, await response.text()


async def test_the_feed_carries_only_the_tenants_events(client: TestClient[Any, Any]) -> None:
    """Both tenants follow the feed over WebSocket and SSE from their list's cursor while all
    six jobs are appended to at once, and replay it from 0 afterwards: every feed holds
    exactly its tenant's events, in id order, none of the other's."""
    await _create_all(client)
    base = str(client.make_url("")).rstrip("/")
    sessions = {t: aiohttp.ClientSession(headers=as_tenant(t)) for t in TENANTS}
    try:
        cursors = {}
        for tenant, session in sessions.items():
            async with session.get(f"{base}/v1/jobs") as response:
                cursors[tenant] = (await response.json())["cursor"]
        live_count = len(JOBS) * (EVENTS + 1)  # each job's events and its `completed`
        live = {
            tenant: [
                asyncio.create_task(
                    read_feed_ws(session, feed_url(base, cursors[tenant]), count=live_count)
                ),
                asyncio.create_task(
                    read_feed_sse(session, feed_url(base, cursors[tenant]), count=live_count)
                ),
            ]
            for tenant, session in sessions.items()
        }
        async with asyncio.timeout(WAIT):
            await asyncio.gather(
                *(produce(client, tenant, job_id) for tenant in TENANTS for job_id in JOBS)
            )
            followed = {t: await asyncio.gather(*tasks) for t, tasks in live.items()}
            whole = len(JOBS) * (EVENTS + 2)
            replayed = {
                tenant: [
                    await read_feed_ws(session, feed_url(base, 0), count=whole),
                    await read_feed_sse(session, feed_url(base, 0), count=whole),
                ]
                for tenant, session in sessions.items()
            }
        for tenant in TENANTS:
            for feed_log, count in [
                *((log, live_count) for log in followed[tenant]),
                *((log, whole) for log in replayed[tenant]),
            ]:
                assert len(feed_log.events) == count, (tenant, feed_log.transport)
                ids = feed_log.ids
                assert ids == sorted(set(ids))
                assert {_tenant_of(event) for event in feed_log.events} == {tenant}
    finally:
        for session in sessions.values():
            await session.close()


async def test_the_feed_keeps_to_the_credentials_grants(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """A credential granted `build-*` gets only those jobs' events on the feed (replay and
    snapshots=1 alike), whatever its filters ask for; one without jobs:read gets 403."""
    config = make_config(**auth_settings(stream__heartbeat_seconds=0.2))
    client = await make_client(config, None)
    await _create_all(client)
    base = str(client.make_url("")).rstrip("/")
    await produce(client, "alpha", "shared")
    async with client.get("/v1/jobs", headers=as_tenant("beta")) as response:
        last_id = (await response.json())["cursor"]
    narrow = aiohttp.ClientSession(headers=as_tenant("alpha", jobs=["build-*"]))
    writer = aiohttp.ClientSession(headers=as_tenant("alpha", scope="jobs:write"))
    try:
        async with asyncio.timeout(WAIT):
            created_only = await read_feed_ws(narrow, feed_url(base, 0), count=2)
            # Read until a heartbeat says the whole log was scanned: nothing was sent.
            asked_for_shared = await read_feed_sse(
                narrow, feed_url(base, 0, job="shared"), until_id=last_id
            )
            # Snapshots come right after hello; the first heartbeat follows them.
            snapshots = await read_feed_ws(
                narrow, feed_url(base, snapshots=1), stop=lambda log: bool(log.heartbeats)
            )
        assert [e["job_id"] for e in created_only.events] == ["build-1", "build-2"]
        assert all(_tenant_of(e) == "alpha" for e in created_only.events)
        assert asked_for_shared.events == []
        assert sorted(s["job_id"] for s in snapshots.snapshots) == ["build-1", "build-2"]
        assert all(s["metadata"] == {"tenant": "alpha"} for s in snapshots.snapshots)
        async with writer.get(feed_url(base, 0), headers={"Accept": "text/event-stream"}) as r:
            assert r.status == 403
    finally:
        await narrow.close()
        await writer.close()
