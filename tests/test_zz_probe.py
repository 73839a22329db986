import time
from typing import Any
from tests.conftest import create_job, append

async def test_probe(client: Any) -> None:
    t = time.perf_counter()
    ids = []
    for _ in range(20):
        ids.append((await create_job(client))["job_id"])
    print("per create ms", (time.perf_counter() - t) / 20 * 1000)
    print(ids[:3], ids == sorted(ids))
    r = await client.post("/v1/jobs")
    print("empty", r.status, await r.text(), r.request_info.headers)
    r = await client.post("/v1/jobs/nope/events", json={"type": "log", "message": "x"})
    print(r.status, await r.text())
    await create_job(client, job_id="a")
    print(await append(client, "a", {"type": "progress", "progress": 50, "current": 885.0}))
    r = await client.get("/v1/jobs/a/events")
    print(await r.text())
    r = await client.post("/v1/jobs/a/events", data=b"[" * 20000 + b"]" * 20000, headers={"Content-Type": "application/json"})
    print(r.status, await r.text())
    r = await client.post("/v1/jobs/a/events", json={"type": "progress", "progress": True})
    print(r.status, await r.text())
    r = await client.post("/v1/jobs/a/events", json="hello")
    print(r.status, await r.text())
    r = await client.post("/v1/jobs", json=[1])
    print(r.status, await r.text())
    r = await client.get("/nope")
    print(r.status, await r.text())
    r = await client.put("/v1/jobs")
    print(r.status, await r.text(), r.headers)
