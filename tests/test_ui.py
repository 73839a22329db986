"""The browser's files as jobfeed serves them (server/handlers/ui.py): the ES module and the
progress element at /client/, the dashboard at /ui/ (every job page the same document),
``GET /`` a redirect there; an unknown name is a 404 in the protocol's error shape; an
unchanged file revalidates as 304. And the fold vectors checked in beside the module are what
the server's fold makes now (so the JavaScript copy is tested against the current rules).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.fold_vectors import render
from server.handlers.ui import CLIENT_FILES, UI_FILES
from tests.conftest import ClientFactory, ConfigFactory, auth_settings, bearer, token

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "clients" / "js" / "fold-vectors.json"


@pytest.mark.parametrize("name", CLIENT_FILES)
async def test_client_files_are_served_as_they_are_in_clients_js(
    client: TestClient[Any, Any], name: str
) -> None:
    """/client/<name> answers clients/js/<name> byte for byte, with its type."""
    response = await client.get(f"/client/{name}")
    assert response.status == 200
    assert await response.read() == (REPO / "clients" / "js" / name).read_bytes()
    expected = (
        "text/javascript" if name.endswith(".js") and not name.endswith(".d.ts") else "text/plain"
    )
    assert response.content_type == expected
    assert response.charset == "utf-8"


@pytest.mark.parametrize("name", UI_FILES)
async def test_dashboard_files_are_served(client: TestClient[Any, Any], name: str) -> None:
    response = await client.get(f"/ui/{name}")
    assert response.status == 200
    assert await response.read() == (REPO / "server" / "static" / "ui" / name).read_bytes()


async def test_dashboard_pages_and_the_root_redirect(client: TestClient[Any, Any]) -> None:
    """/ and /ui redirect to /ui/; /ui/ is the job table; /ui/jobs/<id> the job page."""
    for path in ("/", "/ui"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 302
        assert response.headers["Location"] == "/ui/"
    index = await client.get("/ui/")
    assert index.content_type == "text/html"
    assert "<title>jobfeed</title>" in await index.text()
    job = await client.get("/ui/jobs/build-42")
    assert job.content_type == "text/html"
    assert await job.read() == (REPO / "server" / "static" / "ui" / "job.html").read_bytes()


@pytest.mark.parametrize(
    "path", ["/client/fold-vectors.json", "/client/package.json", "/client/..%2Fjs", "/ui/x.js"]
)
async def test_only_listed_files_are_served(client: TestClient[Any, Any], path: str) -> None:
    response = await client.get(path)
    assert response.status == 404
    body = await response.json()
    assert body["error"]["code"] == "not_found"


async def test_an_unchanged_file_is_answered_304(client: TestClient[Any, Any]) -> None:
    first = await client.get("/client/jobfeed.js")
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "no-cache"
    again = await client.get("/client/jobfeed.js", headers={"If-None-Match": etag})
    assert again.status == 304
    assert await again.read() == b""


def test_checked_in_fold_vectors_are_what_the_server_makes_now() -> None:
    """clients/js/fold-vectors.json equals a fresh ``python -m server.fold_vectors``:
    regenerate it with that command whenever server/snapshot.py changes."""
    fresh = subprocess.run(
        [sys.executable, "-m", "server.fold_vectors"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert fresh == render()
    assert VECTORS.read_bytes() == fresh, (
        "clients/js/fold-vectors.json is stale: "
        "python -m server.fold_vectors > clients/js/fold-vectors.json"
    )


async def test_counts_by_status_for_the_dashboard(client: TestClient[Any, Any]) -> None:
    """/ui/counts.json counts the jobs in every status (zeros included), narrowed by kind and
    id prefix as the list is; a bad prefix is 400."""
    for job_id, kind in (("a-1", "x"), ("a-2", "x"), ("a-3", "y"), ("b-1", "x")):
        response = await client.post("/v1/jobs", json={"job_id": job_id, "kind": kind})
        assert response.status == 201
    for job_id, event in (
        ("a-2", {"type": "progress", "progress": 5}),
        ("b-1", {"type": "completed"}),
    ):
        response = await client.post(f"/v1/jobs/{job_id}/events", json=event)
        assert response.status == 201
    zero = dict.fromkeys(("queued", "running", "completed", "failed", "cancelled"), 0)

    async def counts(query: str = "") -> dict[str, int]:
        response = await client.get(f"/ui/counts.json{query}")
        assert response.status == 200
        body: dict[str, dict[str, int]] = await response.json()
        return body["counts"]

    assert await counts() == {**zero, "queued": 2, "running": 1, "completed": 1}
    assert await counts("?kind=x") == {**zero, "queued": 1, "running": 1, "completed": 1}
    assert await counts("?prefix=a-&kind=x") == {**zero, "queued": 1, "running": 1}
    assert (await client.get("/ui/counts.json?prefix=%20")).status == 400


async def test_with_authentication_pages_are_public_and_counts_are_the_tenants(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """Authentication on: the pages and scripts answer without a credential (a browser puts
    none on a navigation or a script tag); /ui/counts.json needs one and counts only its
    tenant's jobs; the list's prefix filter stays within the tenant too."""
    client = await make_client(make_config(**auth_settings()), credential=None)
    for path in ("/ui/", "/ui/jobs/x", "/ui/dashboard.js", "/client/jobfeed.js"):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/", allow_redirects=False)).status == 302
    assert (await client.get("/ui/counts.json")).status == 401
    for tenant, job_id in (("acme", "a-1"), ("acme", "a-2"), ("umbrella", "a-3")):
        response = await client.post(
            "/v1/jobs", json={"job_id": job_id}, headers=bearer(token(tenant=tenant))
        )
        assert response.status == 201
    acme = bearer(token(tenant="acme"))
    counts = await (await client.get("/ui/counts.json?prefix=a-", headers=acme)).json()
    assert counts["counts"]["queued"] == 2
    listed = await (await client.get("/v1/jobs?prefix=a-", headers=acme)).json()
    assert [job["job_id"] for job in listed["jobs"]] == ["a-2", "a-1"]
