"""Authentication as an operator meets it, through real ``jobfeed`` processes: secure by
default (no anonymous clients off loopback), the ``jobfeed token`` command, and logs that
carry ``tenant`` and ``sub`` on every request and stream line but never a secret, a token
or a ticket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from server.__main__ import is_loopback
from tests.conftest import SECRET
from tests.procs import Launcher, launching
from tests.test_migrate import run_cli, write_config

pytestmark = pytest.mark.process

WAIT = 20.0


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "jobfeed.example.com"])
def test_anonymous_on_a_non_loopback_address_refuses_to_start(tmp_path: Path, host: str) -> None:
    """auth.mode = none on a non-loopback host: exit 2 with one line naming the two ways out
    (a secret, or auth.allow_anonymous_remote); nothing is listening."""
    config = write_config(tmp_path, "jobfeed.db")
    config.write_text(config.read_text() + f'\n[server]\nhost = "{host}"\n', encoding="utf-8")
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "JOBFEED_AUTH__SECRETS" in lines[0]
    assert "allow_anonymous_remote" in lines[0]
    assert not (tmp_path / "jobfeed.db").exists()


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "10.0.0.1", "example.com"):
        assert not is_loopback(host), host


async def test_allow_anonymous_remote_lets_it_start(launcher: Launcher) -> None:
    """The explicit choice starts it (on 0.0.0.0, reached through loopback here)."""
    process = await launcher.start(server__host="0.0.0.0", auth__allow_anonymous_remote="true")
    assert process.log.find("listening")["auth"] == "none"  # type: ignore[index]


def test_token_command_mints_a_verifiable_token(tmp_path: Path) -> None:
    """`jobfeed token` prints one HS256 token from the first configured secret, with the
    given tenant, scope, jobs and lifetime, for audience jobfeed."""
    config = write_config(tmp_path, "jobfeed.db")
    config.write_text(
        config.read_text() + f'\n[auth]\nmode = "jwt"\nsecrets = ["{SECRET}"]\n',
        encoding="utf-8",
    )
    result = run_cli(
        "token",
        "--config",
        str(config),
        "--tenant",
        "acme",
        "--scope",
        "jobs:read",
        "--jobs",
        "build-*",
        "--jobs",
        "deploy-7",
        "--ttl",
        "600",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    claims = jwt.decode(printed, SECRET, algorithms=["HS256"], audience="jobfeed")
    assert claims["tenant"] == "acme"
    assert claims["scope"] == "jobs:read"
    assert claims["jobs"] == ["build-*", "deploy-7"]
    assert claims["exp"] - claims["iat"] == 600


def test_token_command_without_a_secret_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, "jobfeed.db")
    result = run_cli("token", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "auth.secrets" in result.stderr
    assert SECRET not in result.stderr


async def test_logs_carry_tenant_and_sub_and_no_credential(launcher: Launcher) -> None:
    """With authentication on, every request and stream line names tenant and sub; the
    token, the ticket and the secret appear in no line (query strings are not logged, and
    refusals do not echo what was sent)."""
    process = await launcher.start(auth__mode="jwt", auth__secrets=json.dumps([SECRET]))
    token = jwt.encode(
        {
            "tenant": "acme",
            "sub": "svc-1",
            "scope": "jobs:read jobs:write",
            "aud": "jobfeed",
            "exp": 4_000_000_000,
            "iat": 1_700_000_000,
        },
        SECRET,
    )
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(process.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "job-1"}, headers=auth) as r:
            assert r.status == 201
        async with session.post("/v1/tickets", json={}, headers=auth) as r:
            ticket = (await r.json())["ticket"]
        async with session.post(
            "/v1/jobs/job-1/events", json={"type": "completed"}, headers=auth
        ) as r:
            assert r.status == 201
        async with session.get(
            f"/v1/jobs/job-1/stream?ticket={ticket}", headers={"Accept": "text/event-stream"}
        ) as r:
            assert r.status == 200
            await r.read()
        async with session.ws_connect("/v1/jobs/job-1/stream", headers=auth) as ws:
            async with asyncio.timeout(WAIT):
                async for _ in ws:
                    pass
        wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        async with session.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong}"}) as r:
            assert r.status == 401
        async with session.get(f"/v1/jobs?ticket={ticket[:-3]}xyz") as r:
            assert r.status == 401
    await asyncio.to_thread(process.log.wait_for, "stream_closed", WAIT)
    process.kill(15)
    await process.wait_async(WAIT)
    text = process.log.text()
    for secret in (token, ticket, SECRET, wrong, token.split(".")[2], ticket.split(".")[2]):
        assert secret not in text
    # Probes (/readyz, polled by the launcher) carry no credential, hence no tenant.
    requests_seen = [
        r for r in process.lines if r.get("event") == "request" and r["path"] != "/readyz"
    ]
    streams = [r for r in process.lines if r.get("event") == "stream_closed"]
    assert len(streams) == 2
    authenticated: list[dict[str, Any]] = [
        r for r in requests_seen + streams if r.get("status") != 401
    ]
    assert len(authenticated) >= 6
    for record in authenticated:
        assert record.get("tenant") == "acme", record
        assert "sub" in record, record
    assert {r["sub"] for r in streams} == {"svc-1"}


def test_an_unusable_public_key_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """A public key file that is missing or not PEM: exit 2 with one line naming it."""
    (tmp_path / "not-a-key.pem").write_text("hello", encoding="utf-8")
    for name in ("missing.pem", "not-a-key.pem"):
        config = write_config(tmp_path / name.split(".")[0], "jobfeed.db")
        config.write_text(
            config.read_text() + f'\n[auth]\nmode = "jwt"\npublic_keys = ["{tmp_path / name}"]\n',
            encoding="utf-8",
        )
        result = run_cli("serve", "--config", str(config), cwd=tmp_path)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "auth.public_keys" in lines[0]
        assert name in lines[0]
