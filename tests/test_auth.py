"""Credentials (auth.md): every 401 and 403 of the spec over HTTP, WebSocket and SSE; key
rotation and public keys; job grants; tickets; expiry and in-band refresh during a stream;
revocation of open streams; and a hypothesis run over arbitrary credentials.

Real app on a real socket (pytest-aiohttp), real tokens made with PyJWT and real keys made
with cryptography. Expired and not-yet-valid credentials are minted with a past or future
``now``, so no test waits for a clock except the ones about a stream outliving its token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.auth import Authenticator, Principal
from server.config import load_config
from server.errors import Unauthorized
from server.keys import AUTH
from tests.conftest import (
    ALL_SCOPES,
    OTHER_SECRET,
    SECRET,
    ClientFactory,
    ConfigFactory,
    auth_settings,
    bearer,
    token,
)
from tests.streams import receive_json, sse_items
from tests.test_openapi import _Server

WAIT = 15.0  # bound on any one wait; a healthy server answers in milliseconds
SSE = {"Accept": "text/event-stream"}
HOUR = 3600


async def expect_close(ws: ClientWebSocketResponse, code: int) -> None:
    async with asyncio.timeout(WAIT):
        message = await ws.receive()
    assert message.type == WSMsgType.CLOSE, message
    assert ws.close_code == code


@pytest.fixture
async def anon(make_config: ConfigFactory, make_client: ClientFactory) -> TestClient[Any, Any]:
    """A client of an app with authentication on (leeway 0) that sends no credential."""
    return await make_client(make_config(**auth_settings(auth__leeway_seconds=0)), None)


async def seed(client: TestClient[Any, Any], tenant: str, *job_ids: str) -> None:
    """Create jobs in ``tenant`` with a token of its own."""
    for job_id in job_ids:
        response = await client.post(
            "/v1/jobs", json={"job_id": job_id}, headers=bearer(token(tenant))
        )
        assert response.status == 201, await response.text()


# -- 401: the credential itself --------------------------------------------------------

NOW = time.time()
BAD_CREDENTIALS: dict[str, tuple[Callable[[], dict[str, str]], str]] = {
    "missing": (dict, "missing"),
    "empty bearer": (lambda: {"Authorization": "Bearer "}, "missing"),
    "not bearer": (lambda: {"Authorization": f"Basic {token()}"}, "malformed"),
    "not a jwt": (lambda: bearer("not.a.token"), "malformed"),
    "bad signature": (lambda: bearer(token(secret=OTHER_SECRET)), "bad signature"),
    "expired": (lambda: bearer(token(now=NOW - 2 * HOUR)), "expired"),
    "not yet valid": (
        lambda: bearer(jwt.encode({**claims(), "nbf": int(NOW) + HOUR}, SECRET)),
        "not yet valid",
    ),
    "wrong audience": (lambda: bearer(token(audience="elsewhere")), "wrong audience"),
    "no audience": (lambda: bearer(token(audience=None)), "malformed"),
    "alg none": (lambda: bearer(jwt.encode(claims(), "", algorithm="none")), "malformed"),
    "alg not configured": (lambda: bearer(rs256_token()), "malformed"),
    "no tenant": (lambda: bearer(jwt.encode(claims(tenant=None), SECRET)), "malformed"),
    "bad tenant": (lambda: bearer(jwt.encode(claims(tenant="a/b"), SECRET)), "malformed"),
    "no scope": (lambda: bearer(jwt.encode(claims(scope=None), SECRET)), "malformed"),
    "no exp": (lambda: bearer(jwt.encode(claims(exp=None), SECRET)), "malformed"),
    "bad jobs": (lambda: bearer(jwt.encode(claims(jobs="build-*"), SECRET)), "malformed"),
    "ticket in header": (lambda: bearer("jft1.e30.AAAA"), "malformed"),
}


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tenant": "acme",
        "scope": ALL_SCOPES,
        "aud": "jobfeed",
        "iat": int(NOW),
        "exp": int(NOW) + HOUR,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rs256_token(private_key: Any = _RSA, algorithm: str = "RS256", **changes: Any) -> str:
    return jwt.encode(claims(**changes), private_key, algorithm=algorithm)


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
async def test_http_refuses_a_bad_credential_with_401(
    anon: TestClient[Any, Any], case: str
) -> None:
    """Each bad credential gets 401 unauthorized with a WWW-Authenticate Bearer challenge,
    and a message that starts with the reason and never contains the credential."""
    headers, reason = BAD_CREDENTIALS[case]
    sent = headers()
    response = await anon.get("/v1/jobs", headers=sent)
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="jobfeed"')
    body = await response.json()
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["message"].startswith(f"{reason}:"), body
    for value in sent.values():
        credential = value.partition(" ")[2]
        if credential:
            assert credential not in await response.text()
            assert credential not in challenge


@pytest.mark.parametrize("case", ["missing", "bad signature", "expired", "wrong audience"])
async def test_sse_refuses_a_bad_credential_with_401(anon: TestClient[Any, Any], case: str) -> None:
    """An SSE subscription with a bad credential is 401 before any stream starts."""
    await seed(anon, "acme", "job-1")
    headers, reason = BAD_CREDENTIALS[case]
    response = await anon.get("/v1/jobs/job-1/stream", headers={**SSE, **headers()})
    assert response.status == 401
    assert response.content_type == "application/json"
    assert (await response.json())["error"]["message"].startswith(f"{reason}:")


@pytest.mark.parametrize("case", ["missing", "bad signature", "expired", "alg none"])
async def test_websocket_refuses_a_bad_credential_with_4401(
    anon: TestClient[Any, Any], case: str
) -> None:
    """A WebSocket with a bad credential is upgraded, sent an error frame naming the reason,
    and closed with 4401 (a browser can read a close code, not a refused handshake)."""
    await seed(anon, "acme", "job-1")
    headers, reason = BAD_CREDENTIALS[case]
    async with anon.ws_connect("/v1/jobs/job-1/stream", headers=headers()) as ws:
        error = await receive_json(ws)
        await expect_close(ws, 4401)
    assert error["type"] == "error"
    assert error["code"] == "unauthorized"
    assert error["message"].startswith(f"{reason}:")


async def test_probes_and_the_document_need_no_credential(anon: TestClient[Any, Any]) -> None:
    """/healthz, /readyz and /v1/openapi.json answer without a credential."""
    for path in ("/healthz", "/readyz", "/v1/openapi.json"):
        assert (await anon.get(path)).status == 200, path


async def test_unknown_routes_stay_404(anon: TestClient[Any, Any]) -> None:
    """A path with no route is 404 not_found whatever the credential (nothing to protect)."""
    assert (await anon.get("/v2/nothing")).status == 404


# -- 403: scopes -----------------------------------------------------------------------


async def test_a_missing_scope_is_403_over_http(anon: TestClient[Any, Any]) -> None:
    """A read-only token cannot create or append (403 forbidden naming the scope); a
    write-only token cannot read; admin can do both."""
    await seed(anon, "acme", "job-1")
    reader = bearer(token(scope="jobs:read"))
    writer = bearer(token(scope="jobs:write"))
    admin = bearer(token(scope="jobs:admin"))
    refused = [
        await anon.post("/v1/jobs", json={}, headers=reader),
        await anon.post(
            "/v1/jobs/job-1/events", json={"type": "log", "message": "x"}, headers=reader
        ),
        await anon.get("/v1/jobs", headers=writer),
        await anon.get("/v1/jobs/job-1", headers=writer),
        await anon.get("/v1/jobs/job-1/events", headers=writer),
    ]
    for response in refused:
        assert response.status == 403
        body = await response.json()
        assert body["error"]["code"] == "forbidden"
        assert "jobs:" in body["error"]["message"]
    assert (await anon.get("/v1/jobs/job-1", headers=reader)).status == 200
    assert (await anon.post("/v1/jobs", json={}, headers=writer)).status == 201
    assert (await anon.get("/v1/jobs/job-1", headers=admin)).status == 200
    appended = await anon.post(
        "/v1/jobs/job-1/events", json={"type": "log", "message": "x"}, headers=admin
    )
    assert appended.status == 201


async def test_a_missing_scope_is_403_on_streams(anon: TestClient[Any, Any]) -> None:
    """A write-only token subscribing: SSE 403, WebSocket error frame `forbidden` and 4403."""
    await seed(anon, "acme", "job-1")
    writer = bearer(token(scope="jobs:write"))
    response = await anon.get("/v1/jobs/job-1/stream", headers={**SSE, **writer})
    assert response.status == 403
    async with anon.ws_connect("/v1/jobs/job-1/stream", headers=writer) as ws:
        error = await receive_json(ws)
        await expect_close(ws, 4403)
    assert error["code"] == "forbidden"


# -- keys: rotation and public keys ----------------------------------------------------


async def test_any_configured_secret_verifies(
    make_config: ConfigFactory, make_client: ClientFactory
) -> None:
    """With two secrets (rotation), tokens signed with either are accepted; a third is not."""
    config = make_config(auth__mode="jwt", auth__secrets=json.dumps([OTHER_SECRET, SECRET]))
    client = await make_client(config, None)
    for secret in (SECRET, OTHER_SECRET):
        response = await client.get("/v1/jobs", headers=bearer(token(secret=secret)))
        assert response.status == 200
    stranger = bearer(token(secret="x" * 40))
    assert (await client.get("/v1/jobs", headers=stranger)).status == 401


def write_public_key(path: Path, private_key: Any) -> Path:
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


async def test_public_keys_verify_rs256_es256_and_eddsa(
    make_config: ConfigFactory, make_client: ClientFactory, tmp_path: Path
) -> None:
    """RS256, ES256 and EdDSA tokens verify against configured PEM public keys; an HS256
    token "signed" with a public key's PEM (algorithm confusion) does not."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    paths = [
        write_public_key(tmp_path / "rsa.pem", _RSA),
        write_public_key(tmp_path / "ec.pem", ec_key),
        write_public_key(tmp_path / "ed.pem", ed_key),
    ]
    config = make_config(
        auth__mode="jwt", auth__public_keys=json.dumps([str(path) for path in paths])
    )
    client = await make_client(config, None)
    for key, algorithm in ((_RSA, "RS256"), (ec_key, "ES256"), (ed_key, "EdDSA")):
        response = await client.get("/v1/jobs", headers=bearer(rs256_token(key, algorithm)))
        assert response.status == 200, (algorithm, await response.text())
    # PyJWT itself refuses to sign HS256 with a PEM: forge the token by hand.
    pem = paths[0].read_text()
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    payload = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    signing_input = header + b"." + payload
    signature = jwt.utils.base64url_encode(
        hmac.new(pem.encode(), signing_input, hashlib.sha256).digest()
    )
    confused = (signing_input + b"." + signature).decode()
    response = await client.get("/v1/jobs", headers=bearer(confused))
    assert response.status == 401


# -- grants ----------------------------------------------------------------------------


async def test_jobs_outside_the_grants_are_not_found(anon: TestClient[Any, Any]) -> None:
    """A token granted `build-*` and `deploy-7`: other jobs of its tenant answer exactly as
    missing ones (404 job_not_found, WebSocket 4004), lists hold only granted jobs, and it
    may create only granted ids (403 otherwise)."""
    await seed(anon, "acme", "build-1", "build-2", "deploy-7", "deploy-8", "other")
    narrow = bearer(token(jobs=["build-*", "deploy-7"]))
    listed = await (await anon.get("/v1/jobs", headers=narrow)).json()
    assert sorted(job["job_id"] for job in listed["jobs"]) == ["build-1", "build-2", "deploy-7"]
    hidden = await anon.get("/v1/jobs/deploy-8", headers=narrow)
    missing = await anon.get("/v1/jobs/deploy-9", headers=narrow)
    assert hidden.status == missing.status == 404
    hidden_body = (await hidden.json())["error"]
    missing_body = (await missing.json())["error"]
    assert hidden_body["code"] == missing_body["code"] == "job_not_found"
    assert hidden_body["message"].replace("8", "9") == missing_body["message"]
    for path in ("/v1/jobs/other/events", "/v1/jobs/other/stream"):
        headers = {**narrow, **SSE} if path.endswith("stream") else narrow
        assert (await anon.get(path, headers=headers)).status == 404
    append = await anon.post(
        "/v1/jobs/other/events", json={"type": "log", "message": "x"}, headers=narrow
    )
    assert append.status == 404
    async with anon.ws_connect("/v1/jobs/other/stream", headers=narrow) as ws:
        error = await receive_json(ws)
        await expect_close(ws, 4004)
    assert error["code"] == "job_not_found"
    assert (await anon.post("/v1/jobs", json={"job_id": "build-3"}, headers=narrow)).status == 201
    refused = await anon.post("/v1/jobs", json={"job_id": "nope"}, headers=narrow)
    assert refused.status == 403


# -- tickets ---------------------------------------------------------------------------


async def mint(
    client: TestClient[Any, Any], body: dict[str, Any] | None = None, **token_claims: Any
) -> dict[str, Any]:
    response = await client.post(
        "/v1/tickets", json=body or {}, headers=bearer(token(**token_claims))
    )
    assert response.status == 201, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def test_a_ticket_reads_snapshots_pages_and_both_streams_many_times(
    anon: TestClient[Any, Any],
) -> None:
    """A ticket works as ?ticket= on GET: snapshot, list, events page, SSE and WebSocket,
    reused several times (a browser's reconnect reuses the URL)."""
    await seed(anon, "acme", "job-1")
    done = await anon.post(
        "/v1/jobs/job-1/events", json={"type": "completed"}, headers=bearer(token())
    )
    assert done.status == 201
    ticket = (await mint(anon))["ticket"]
    for _ in range(3):
        assert (await anon.get(f"/v1/jobs/job-1?ticket={ticket}")).status == 200
        assert (await anon.get(f"/v1/jobs?ticket={ticket}")).status == 200
        assert (await anon.get(f"/v1/jobs/job-1/events?ticket={ticket}")).status == 200
    async with anon.get(f"/v1/jobs/job-1/stream?ticket={ticket}", headers=SSE) as response:
        assert response.status == 200
        items = [item async for item in sse_items(response)]
    assert len(items) == 3  # hello, created, completed
    async with anon.ws_connect(f"/v1/jobs/job-1/stream?ticket={ticket}") as ws:
        assert (await receive_json(ws))["type"] == "hello"


async def test_a_ticket_is_read_only_and_refused_off_get(anon: TestClient[Any, Any]) -> None:
    """A ticket never writes: on POST (as ?ticket=) it is 401, in an Authorization header
    401; asking for a write scope is 422; a token without jobs:read gets none (403)."""
    await seed(anon, "acme", "job-1")
    ticket = (await mint(anon))["ticket"]
    post = await anon.post(
        f"/v1/jobs/job-1/events?ticket={ticket}", json={"type": "log", "message": "x"}
    )
    assert post.status == 401
    assert (await anon.get("/v1/jobs/job-1", headers=bearer(ticket))).status == 401
    write = await anon.post("/v1/tickets", json={"scope": "jobs:write"}, headers=bearer(token()))
    assert write.status == 422
    writer_only = await anon.post("/v1/tickets", json={}, headers=bearer(token(scope="jobs:write")))
    assert writer_only.status == 403
    assert ticket not in await post.text()


async def test_a_ticket_narrows_and_never_widens(anon: TestClient[Any, Any]) -> None:
    """A ticket asked for `build-1` reads only build-1; asking beyond the token's own grants
    is 403; a narrowed token's ticket keeps the token's grants."""
    await seed(anon, "acme", "build-1", "build-2", "deploy-1")
    ticket = (await mint(anon, {"jobs": ["build-1"]}))["ticket"]
    assert (await anon.get(f"/v1/jobs/build-1?ticket={ticket}")).status == 200
    assert (await anon.get(f"/v1/jobs/build-2?ticket={ticket}")).status == 404
    listed = await (await anon.get(f"/v1/jobs?ticket={ticket}")).json()
    assert [job["job_id"] for job in listed["jobs"]] == ["build-1"]
    wider = await anon.post(
        "/v1/tickets", json={"jobs": ["deploy-*"]}, headers=bearer(token(jobs=["build-*"]))
    )
    assert wider.status == 403
    inherited = (await mint(anon, jobs=["build-*"]))["ticket"]
    assert (await anon.get(f"/v1/jobs/build-2?ticket={inherited}")).status == 200
    assert (await anon.get(f"/v1/jobs/deploy-1?ticket={inherited}")).status == 404


async def test_a_ticket_never_outlives_its_token(anon: TestClient[Any, Any]) -> None:
    """expires_at is at most ticket_seconds away, and never past the asking token's exp."""
    long = await mint(anon)
    short = await mint(anon, ttl_seconds=60)
    now = time.time()
    long_exp = _epoch(long["expires_at"])
    short_exp = _epoch(short["expires_at"])
    assert now + 250 < long_exp <= now + 301
    assert short_exp <= now + 61


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


async def test_an_expired_or_forged_ticket_is_401(anon: TestClient[Any, Any]) -> None:
    """A ticket past its expiry is 401 "expired"; one with a changed claim, or a token
    passed as ?ticket=, is 401 too."""
    await seed(anon, "acme", "job-1")
    # The app's tickets are signed with a key derived from SECRET: mint one an hour ago.
    authenticator = Authenticator(_auth_config())
    principal = Principal("acme", "s", frozenset({"jobs:read"}), exp=time.time() + HOUR)
    old, _ = authenticator.mint_ticket(principal, None, None, time.time() - HOUR)
    expired = await anon.get(f"/v1/jobs/job-1?ticket={old}")
    assert expired.status == 401
    assert (await expired.json())["error"]["message"].startswith("expired:")
    good = (await mint(anon))["ticket"]
    body, _, signature = good.rpartition(".")
    forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + signature
    assert (await anon.get(f"/v1/jobs/job-1?ticket={forged}")).status == 401
    jwt_in_url = await anon.get(f"/v1/jobs/job-1?ticket={token()}")
    assert jwt_in_url.status == 401
    assert "Authorization header" in (await jwt_in_url.json())["error"]["message"]


def _auth_config() -> Any:
    return load_config(
        None, environ={f"JOBFEED_{k.upper()}": v for k, v in auth_settings().items()}
    ).auth


# -- expiry during a stream ------------------------------------------------------------


async def test_websocket_closes_4401_when_its_token_expires(anon: TestClient[Any, Any]) -> None:
    """A stream opened with a token that expires soon gets `token_expired` then 4401."""
    await seed(anon, "acme", "job-1")
    short = bearer(token(ttl_seconds=2))
    async with anon.ws_connect("/v1/jobs/job-1/stream", headers=short) as ws:
        assert (await receive_json(ws))["type"] == "hello"
        assert (await receive_json(ws))["type"] == "created"
        error = await receive_json(ws)
        await expect_close(ws, 4401)
    assert error["type"] == "error"
    assert error["code"] == "token_expired"


async def test_sse_ends_with_an_error_event_when_its_token_expires(
    anon: TestClient[Any, Any],
) -> None:
    """SSE: `event: error` with code token_expired, then the response ends."""
    await seed(anon, "acme", "job-1")
    short = bearer(token(ttl_seconds=2))
    async with anon.get("/v1/jobs/job-1/stream", headers={**SSE, **short}) as response:
        assert response.status == 200
        async with asyncio.timeout(WAIT):
            items = [item async for item in sse_items(response)]
    events = [item for item in items if getattr(item, "event", None) == "error"]
    assert len(events) == 1
    assert json.loads(events[0].data)["code"] == "token_expired"  # type: ignore[union-attr]


async def test_in_band_auth_keeps_a_websocket_open_past_the_first_exp(
    anon: TestClient[Any, Any],
) -> None:
    """An `auth` frame with a fresh token is answered `auth_ok` with its expiry, and the
    stream goes on delivering events after the first token's exp has passed."""
    await seed(anon, "acme", "job-1")
    first_exp = time.time() + 2
    async with anon.ws_connect("/v1/jobs/job-1/stream", headers=bearer(token(ttl_seconds=2))) as ws:
        assert (await receive_json(ws))["type"] == "hello"
        assert (await receive_json(ws))["type"] == "created"
        await ws.send_json({"type": "auth", "token": token(ttl_seconds=HOUR)})
        ok = await receive_json(ws)
        assert ok["type"] == "auth_ok"
        assert _epoch(ok["expires_at"]) > time.time() + HOUR - 60
        # Past the first token's expiry (a wait for the clock, not for the server).
        await asyncio.sleep(max(0.0, first_exp - time.time()) + 1.0)
        appended = await anon.post(
            "/v1/jobs/job-1/events",
            json={"type": "log", "message": "late"},
            headers=bearer(token()),
        )
        assert appended.status == 201
        event = await receive_json(ws)
        assert (event["type"], event["seq"]) == ("log", 2)


async def test_in_band_auth_with_a_bad_credential_closes(anon: TestClient[Any, Any]) -> None:
    """An `auth` frame with an invalid token closes 4401; with another tenant's, 4403."""
    await seed(anon, "acme", "job-1")
    for credential, code in (("garbage", 4401), (token("globex"), 4403)):
        async with anon.ws_connect("/v1/jobs/job-1/stream", headers=bearer(token())) as ws:
            assert (await receive_json(ws))["type"] == "hello"
            assert (await receive_json(ws))["type"] == "created"
            await ws.send_json({"type": "auth", "token": credential})
            error = await receive_json(ws)
            await expect_close(ws, code)
        assert error["type"] == "error"


# -- revocation ------------------------------------------------------------------------


async def test_revocation_closes_open_streams_and_refuses_new_requests(
    make_config: ConfigFactory, make_client: ClientFactory, tmp_path: Path
) -> None:
    """Writing auth.not_before into the config file the server runs from: within
    recheck_seconds open WebSocket (4403) and SSE (`event: error` forbidden) streams of
    earlier tokens close, and such tokens get 401 "revoked"; later tokens still work."""
    config_path = tmp_path / "jobfeed.toml"
    config_path.write_text('[auth]\nnot_before = ""\n', encoding="utf-8")
    config = make_config(**auth_settings(auth__recheck_seconds=0.2))
    client = await make_client(config, config_path=config_path)
    await seed(client, "acme", "job-1")
    old = bearer(token(now=time.time() - 60))
    async with (
        client.ws_connect("/v1/jobs/job-1/stream", headers=old) as ws,
        client.get("/v1/jobs/job-1/stream", headers={**SSE, **old}) as sse,
    ):
        assert (await receive_json(ws))["type"] == "hello"
        assert sse.status == 200
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
        config_path.write_text(f'[auth]\nnot_before = "{cutoff}"\n', encoding="utf-8")
        frames = []
        async with asyncio.timeout(WAIT):
            while (frame := await receive_json(ws))["type"] != "error":
                frames.append(frame)
        assert frame["code"] == "forbidden"
        await expect_close(ws, 4403)
        async with asyncio.timeout(WAIT):
            items = [item async for item in sse_items(sse)]
        errors = [item for item in items if getattr(item, "event", None) == "error"]
        assert [json.loads(e.data)["code"] for e in errors] == ["forbidden"]  # type: ignore[union-attr]
    refused = await client.get("/v1/jobs", headers=old)
    assert refused.status == 401
    assert (await refused.json())["error"]["message"].startswith("revoked:")
    assert (await client.get("/v1/jobs", headers=bearer(token()))).status == 200


# -- never a 5xx -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("auth") / "jobfeed.db"
    environ = {
        "JOBFEED_STORAGE__PATH": str(path),
        "JOBFEED_LOG__ACCESS": "false",
        **{f"JOBFEED_{k.upper()}": v for k, v in auth_settings().items()},
    }
    server = _Server(load_config(None, environ=environ))
    base_url = server.start()
    try:
        yield base_url
    finally:
        server.stop()


header_values = st.one_of(
    st.text(max_size=300),
    st.builds(lambda s: f"Bearer {s}", st.text(max_size=300)),
    st.builds(
        lambda a, b, c: f"Bearer {a}.{b}.{c}",
        st.text("abcXYZ019-_=", max_size=60),
        st.text("abcXYZ019-_=", max_size=60),
        st.text("abcXYZ019-_=", max_size=60),
    ),
    st.builds(lambda s: f"Bearer jft1.{s}", st.text(max_size=200)),
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(header=header_values, ticket=st.one_of(st.none(), st.text(max_size=300)))
def test_arbitrary_credentials_never_cause_a_5xx(
    live_auth_server: str, header: str, ticket: str | None
) -> None:
    """Any Authorization header and any ?ticket= value: 401 (or 404 for the job), never
    a 5xx."""
    headers = {}
    try:
        header.encode("latin-1")
        headers["Authorization"] = header
    except UnicodeEncodeError:
        headers["Authorization"] = header.encode("utf-8").decode("latin-1")
    params = {} if ticket is None else {"ticket": ticket}
    for path in ("/v1/jobs", "/v1/jobs/job-1"):
        try:
            response = requests.get(
                f"{live_auth_server}{path}", headers=headers, params=params, timeout=10
            )
        except requests.exceptions.InvalidHeader:
            return  # the client library refuses to send it (e.g. a line break)
        assert response.status_code < 500, (response.status_code, response.text)
        assert response.status_code in (400, 401, 404), response.text


# -- the verification cache ------------------------------------------------------------


async def test_one_token_is_verified_once_for_many_requests(anon: TestClient[Any, Any]) -> None:
    """A producer sending many requests with one token pays for one signature check."""
    await seed(anon, "acme", "job-1")
    authenticator = anon.app[AUTH]
    before = authenticator.verified
    producer = bearer(token(sub="producer-1"))
    for n in range(50):
        response = await anon.post(
            "/v1/jobs/job-1/events", json={"type": "log", "message": f"{n}"}, headers=producer
        )
        assert response.status == 201
    assert authenticator.verified == before + 1


def test_the_cache_is_bounded_and_rechecks_expiry_and_revocation() -> None:
    """At most auth.token_cache_size tokens are remembered; a remembered token is refused
    once it expires, and once a not_before revokes it."""
    config = _auth_config().model_copy(update={"token_cache_size": 2, "leeway_seconds": 0})
    authenticator = Authenticator(config)
    now = time.time()
    tokens = [token(sub=f"s{n}", now=now, ttl_seconds=60) for n in range(3)]
    for value in tokens:
        authenticator.verify_token(value, now=now)
    assert len(authenticator._cache) == 2
    assert authenticator.verified == 3
    authenticator.verify_token(tokens[2], now=now)
    assert authenticator.verified == 3  # a hit
    with pytest.raises(Unauthorized, match=r"^expired:"):
        authenticator.verify_token(tokens[2], now=now + 61)
    fresh = token(sub="s9", now=now, ttl_seconds=60)
    authenticator.verify_token(fresh, now=now)
    revoked = config.model_copy(update={"not_before": datetime.fromtimestamp(now + 1, UTC)})
    authenticator.set_revocations(revoked)
    with pytest.raises(Unauthorized, match=r"^revoked:"):
        authenticator.verify_token(fresh, now=now)


def test_not_before_per_tenant_revokes_only_that_tenant() -> None:
    """auth.tenants.<name>.not_before refuses that tenant's earlier tokens only; the global
    one, when later, applies to every tenant."""
    now = time.time()
    environ = {
        **{f"JOBFEED_{k.upper()}": v for k, v in auth_settings().items()},
        "JOBFEED_AUTH__TENANTS": json.dumps(
            {"acme": {"not_before": datetime.fromtimestamp(now + 10, UTC).isoformat()}}
        ),
    }
    authenticator = Authenticator(load_config(None, environ=environ).auth)
    with pytest.raises(Unauthorized, match=r"^revoked:"):
        authenticator.verify_token(token("acme", now=now), now=now)
    authenticator.verify_token(token("globex", now=now), now=now)
    later = load_config(
        None,
        environ={
            **environ,
            "JOBFEED_AUTH__NOT_BEFORE": datetime.fromtimestamp(now + 20, UTC).isoformat(),
        },
    ).auth
    authenticator.set_revocations(later)
    with pytest.raises(Unauthorized, match=r"^revoked:"):
        authenticator.verify_token(token("globex", sub="x", now=now), now=now)


async def test_feed_streams_end_when_their_token_expires(anon: TestClient[Any, Any]) -> None:
    """The feed's streams end at their credential's expiry as job streams do: WebSocket
    `token_expired` then 4401; SSE `event: error` token_expired and the end."""
    short = bearer(token(ttl_seconds=2))
    async with anon.ws_connect("/v1/feed?after=0", headers=short) as ws:
        assert (await receive_json(ws))["type"] == "hello"
        error = await receive_json(ws)
        await expect_close(ws, 4401)
    assert error["code"] == "token_expired"
    short = bearer(token(ttl_seconds=2))
    async with anon.get("/v1/feed?after=0", headers={**SSE, **short}) as response:
        assert response.status == 200
        async with asyncio.timeout(WAIT):
            items = [item async for item in sse_items(response)]
    errors = [item for item in items if getattr(item, "event", None) == "error"]
    assert [json.loads(e.data)["code"] for e in errors] == ["token_expired"]  # type: ignore[union-attr]
