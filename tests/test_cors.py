"""Browsers and origins (auth.md): CORS answers for ``[http] cors_origins`` and the WebSocket
``Origin`` check, through the real app on a real socket. tests/test_browser_cors.py does the same
from a real browser."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient

from server.config import ConfigError
from tests.conftest import ClientFactory, ConfigFactory, auth_settings, bearer, token

APP = "https://app.example.com"
EVIL = "https://evil.example.net"


@pytest.fixture
async def client(make_config: ConfigFactory, make_client: ClientFactory) -> TestClient[Any, Any]:
    config = make_config(**auth_settings(http__cors_origins=f'["{APP}"]'))
    client = await make_client(config)
    response = await client.post("/v1/jobs", json={"job_id": "job-1"})
    assert response.status == 201
    return client


def preflight(origin: str, method: str = "GET") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,content-type,last-event-id",
    }


async def test_preflight_from_a_listed_origin(client: TestClient[Any, Any]) -> None:
    """OPTIONS from a listed origin: 204 allowing GET/POST and the Authorization,
    Content-Type and Last-Event-ID headers, with no credential needed."""
    response = await client.options("/v1/jobs/job-1/stream", headers=preflight(APP))
    assert response.status == 204
    headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == APP
    assert {"GET", "POST"} <= {
        m.strip() for m in headers["Access-Control-Allow-Methods"].split(",")
    }
    allowed = {h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id"} <= allowed
    assert "Origin" in headers.getall("Vary")


async def test_preflight_from_another_origin_allows_nothing(client: TestClient[Any, Any]) -> None:
    response = await client.options("/v1/jobs", headers=preflight(EVIL, "POST"))
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Methods" not in response.headers


async def test_answers_carry_cors_headers_only_for_listed_origins(
    client: TestClient[Any, Any],
) -> None:
    """A listed origin gets Allow-Origin and the exposed headers on answers, errors (401) and
    streams alike; another origin gets none."""
    ok = await client.get("/v1/jobs/job-1", headers={"Origin": APP})
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    exposed = {h.strip() for h in ok.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"X-Request-ID", "WWW-Authenticate", "Retry-After"} <= exposed
    refused = await client.get(
        "/v1/jobs/job-1", headers={"Origin": APP, "Authorization": "Bearer nope"}
    )
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == APP
    async with client.get(
        "/v1/jobs/job-1/stream", headers={"Origin": APP, "Accept": "text/event-stream"}
    ) as stream:
        assert stream.status == 200
        assert stream.headers["Access-Control-Allow-Origin"] == APP
    other = await client.get("/v1/jobs/job-1", headers={"Origin": EVIL})
    assert other.status == 200  # CORS is the browser's business; the token is ours
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_websocket_from_another_origin_is_403_before_the_upgrade(
    client: TestClient[Any, Any],
) -> None:
    """An upgrade whose Origin is not listed is refused with 403 (no WebSocket at all); a
    listed origin, the server's own origin, and no Origin (non-browser) are upgraded."""
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/jobs/job-1/stream", headers={"Origin": EVIL})
    assert refused.value.status == 403
    own = f"http://{client.host}:{client.port}"
    for headers in ({"Origin": APP}, {"Origin": own}, {}):
        async with client.ws_connect("/v1/jobs/job-1/stream", headers=headers) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "hello"


async def test_websocket_origin_is_checked_with_authentication_off(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """The Origin check does not depend on authentication: with it off (any page could
    otherwise read every job), a foreign page's upgrade is still 403."""
    client = await make_client(make_config())
    assert (await client.post("/v1/jobs", json={"job_id": "job-1"})).status == 201
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/jobs/job-1/stream", headers={"Origin": EVIL})
    assert refused.value.status == 403


async def test_wildcard_origin_needs_authentication(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """cors_origins = ["*"] is refused with authentication off, and with it on answers
    every origin with `*`."""
    with pytest.raises(ConfigError, match="only with authentication on"):
        make_config(http__cors_origins='["*"]')
    client = await make_client(make_config(**auth_settings(http__cors_origins='["*"]')))
    response = await client.get("/v1/jobs", headers={"Origin": EVIL, **bearer(token())})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_an_origin_with_a_path_is_a_config_error(make_config: ConfigFactory) -> None:
    with pytest.raises(ConfigError, match="cors_origins"):
        make_config(http__cors_origins='["https://app.example.com/path"]')
