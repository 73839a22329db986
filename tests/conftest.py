"""Shared fixtures: a real jobfeed app on a real SQLite file in ``tmp_path``, on a real socket.

``make_config(**overrides)`` builds a Config whose database lives in the test's tmp_path;
overrides are ``section__key=value`` (e.g. ``stream__heartbeat_seconds=0.2``).
``client`` is an aiohttp TestClient for ``create_app(config)`` (pytest-aiohttp runs it on
a real loopback socket); ``make_client(config)`` starts more, e.g. a second app on one file.

Authentication: a module that sets ``AUTH_MODES = ("off", "on")`` runs each of its tests
that builds a config twice: as today, and with ``auth.mode = "jwt"``, where every client
sends a token of tenant ``acme`` with every scope (``make_client(config, token=...)`` sends
another, or none with ``credential=None``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.auth import mint_token
from server.config import Config, load_config

ConfigFactory = Callable[..., Config]
ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

# Test secrets: 32+ characters, as auth.secrets requires.
SECRET = "test-secret-0123456789-abcdefghijklmnop"
OTHER_SECRET = "test-secret-rotated-9876543210-zyxwvuts"
ALL_SCOPES = "jobs:read jobs:write jobs:admin"
AUTH_TENANT = "acme"
_AUTO = "auto"


def token(
    tenant: str = AUTH_TENANT, scope: str = ALL_SCOPES, secret: str = SECRET, **claims: Any
) -> str:
    """A token as a backend would issue it (HS256), valid for an hour unless told."""
    return mint_token(secret, tenant=tenant, scope=scope, **claims)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


def auth_settings(**more: Any) -> dict[str, Any]:
    """make_config overrides that turn authentication on with ``SECRET``."""
    return {"auth__mode": "jwt", "auth__secrets": f'["{SECRET}"]', **more}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    modes = getattr(metafunc.module, "AUTH_MODES", None)
    if modes and "auth_mode" in metafunc.fixturenames:
        metafunc.parametrize("auth_mode", modes, indirect=True)


@pytest.fixture
def auth_mode(request: pytest.FixtureRequest) -> str:
    """ "on": configs made by make_config have authentication on (see the module docstring)."""
    return str(getattr(request, "param", "off"))


@pytest.fixture
def make_config(tmp_path: Path, auth_mode: str) -> ConfigFactory:
    def factory(**overrides: Any) -> Config:
        environ = {"JOBFEED_STORAGE__PATH": str(tmp_path / "jobfeed.db")}
        if auth_mode == "on":
            overrides = {**auth_settings(), **overrides}
        for name, value in overrides.items():
            environ[f"JOBFEED_{name.upper()}"] = str(value)
        return load_config(None, environ=environ)

    return factory


@pytest.fixture
def config(make_config: ConfigFactory) -> Config:
    return make_config()


@pytest.fixture
def make_client(aiohttp_client: Any) -> ClientFactory:
    async def factory(
        config: Config, credential: str | None = _AUTO, config_path: Path | None = None
    ) -> TestClient[Any, Any]:
        """A client of a new app; with authentication on it sends ``credential`` on every
        request (by default a token of tenant acme with every scope; None: nothing)."""
        if credential == _AUTO:
            credential = token() if config.auth.mode == "jwt" else None
        headers = {} if credential is None else bearer(credential)
        client: TestClient[Any, Any] = await aiohttp_client(
            create_app(config, config_path), headers=headers
        )
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
