"""Shared fixtures: a real jobfeed app on a real SQLite file in ``tmp_path``, on a real socket.

``make_config(**overrides)`` builds a Config whose database lives in the test's tmp_path;
overrides are ``section__key=value`` (e.g. ``stream__heartbeat_seconds=0.2``).
``client`` is an aiohttp TestClient for ``create_app(config)`` (pytest-aiohttp runs it on
a real loopback socket); ``make_client(config)`` starts more, e.g. a second app on one file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config, load_config

ConfigFactory = Callable[..., Config]
ClientFactory = Callable[[Config], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    def factory(**overrides: Any) -> Config:
        environ = {"JOBFEED_STORAGE__PATH": str(tmp_path / "jobfeed.db")}
        for name, value in overrides.items():
            environ[f"JOBFEED_{name.upper()}"] = str(value)
        return load_config(None, environ=environ)

    return factory


@pytest.fixture
def config(make_config: ConfigFactory) -> Config:
    return make_config()


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def factory(config: Config) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(create_app(config))
        return client

    return factory


@pytest.fixture
async def client(make_client: ClientFactory, config: Config) -> TestClient[Any, Any]:
    return await make_client(config)


async def create_job(client: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    """POST /v1/jobs and return the snapshot; fails the test on anything but 201."""
    response = await client.post("/v1/jobs", json=body)
    assert response.status == 201, await response.text()
    snapshot: dict[str, Any] = await response.json()
    return snapshot


async def append(
    client: TestClient[Any, Any], job_id: str, *events: dict[str, Any]
) -> dict[str, Any]:
    """Append events (one, or a batch when several) and return the 201 body."""
    body: dict[str, Any] = events[0] if len(events) == 1 else {"events": list(events)}
    response = await client.post(f"/v1/jobs/{job_id}/events", json=body)
    assert response.status == 201, await response.text()
    result: dict[str, Any] = await response.json()
    return result
