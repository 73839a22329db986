"""The client's credentials (``credentials.py``) against a real server with authentication on
and tokens that live 2-3 seconds: a watcher and a feed, on both transports, cross several
token expiries and see every event once, in order (4401 / SSE ``token_expired`` → the token
provider → resume from the position held); the reporter keeps reporting across an expiry
(401 → the provider → the same request again); a credential that lacks a scope, or is
revoked while a stream is open, raises ``Forbidden`` without asking the provider; a provider
whose fresh token is refused too ends in ``Unauthorized`` instead of a loop.

Nothing waits on a clock: the tests wait for the provider to be asked (the stream expired
and renewed) and for events to arrive, each with a generous timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest

from jobfeed_client import (
    AsyncClient,
    AsyncFeed,
    AsyncWatch,
    Client,
    Event,
    Forbidden,
    RetryPolicy,
    Unauthorized,
)
from tests.procs import ServerProcess, launching

pytestmark = pytest.mark.process

SECRET = "sdk-credentials-test-secret-0123456789abcdef"
FAST_RETRY = RetryPolicy(base=0.02, cap=0.2)
WAIT = 60.0
TRANSPORTS = ["websocket", "sse"]
EXPIRIES = 2  # token expiries each stream crosses (2-3 s each)
_unique = itertools.count()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with JWT authentication, no clock leeway (a stream ends at its token's
    ``exp``), and revocations re-read from its config file every 0.2 s."""
    with launching(tmp_path_factory.mktemp("jobfeed-auth")) as launcher:
        yield asyncio.run(
            launcher.start(
                auth__mode="jwt",
                auth__secrets=json.dumps([SECRET]),
                auth__leeway_seconds=0,
                auth__recheck_seconds=0.2,
            )
        )


def mint(
    tenant: str,
    scope: str = "jobs:read jobs:write",
    *,
    lifetime: int = 3600,
    secret: str = SECRET,
) -> str:
    """A token of ``tenant`` valid from now for ``lifetime`` - 1 to ``lifetime`` seconds
    (``exp`` is whole seconds); each one different (``jti``), so none is another's copy."""
    now = time.time()
    claims = {
        "tenant": tenant,
        "scope": scope,
        "aud": "jobfeed",
        "sub": "sdk-test",
        "iat": int(now),
        "exp": int(now) + lifetime,
        "jti": str(next(_unique)),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def new_tenant() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


class ShortLivedTokens:
    """An async token provider of tokens that expire ``lifetime`` - 1 to ``lifetime`` s after
    they are made (2-3 s by default); ``asked``
    counts its calls and ``until_asked(n)`` waits for the n-th."""

    def __init__(self, tenant: str, scope: str = "jobs:read", lifetime: int = 3) -> None:
        self.tenant = tenant
        self.scope = scope
        self.lifetime = lifetime
        self.asked = 0
        self._changed = asyncio.Condition()

    async def __call__(self) -> str:
        async with self._changed:
            self.asked += 1
            self._changed.notify_all()
        return mint(self.tenant, self.scope, lifetime=self.lifetime)

    async def until_asked(self, count: int) -> None:
        async def condition() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.asked >= count)

        await asyncio.wait_for(condition(), WAIT)


async def drain(stream: AsyncWatch) -> None:
    """Iterate ``stream`` to its end (or what it raises), within ``WAIT``."""
    async with asyncio.timeout(WAIT):
        async for _ in stream:
            pass


class Collector:
    """Runs a watch or a feed in a task, keeping its events; ``holding(n)`` waits for n."""

    def __init__(self, stream: AsyncWatch | AsyncFeed) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncWatch | AsyncFeed) -> None:
        async for item in stream:
            assert isinstance(item, Event)
            async with self._changed:
                self.events.append(item)
                self._changed.notify_all()

    async def holding(self, count: int) -> None:
        async def condition() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.events) >= count or self.task.done())

        await asyncio.wait_for(condition(), WAIT)
        if self.task.done():
            self.task.result()  # raises what ended the stream
        assert len(self.events) >= count

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_watcher_and_a_feed_cross_token_expiries_without_loss_or_repeat(
    auth_server: ServerProcess, transport: Any
) -> None:
    """A watcher and a feed, each on its own short-lived tokens, cross several expiries (close
    4401 / SSE ``token_expired``): each time they get a new token from the provider and
    resume, and together they see every event once, in order; the job's end ends the watch."""
    tenant = new_tenant()
    job_id = f"build-{uuid.uuid4().hex[:8]}"
    producer = AsyncClient(auth_server.url, token=mint(tenant), retry=FAST_RETRY)
    watch_tokens, feed_tokens = ShortLivedTokens(tenant), ShortLivedTokens(tenant)
    # Without in-band refresh (the next test), the streams must run to each expiry.
    watcher = AsyncClient(
        auth_server.url, token_provider=watch_tokens, retry=FAST_RETRY, refresh_in_band=False
    )
    reader = AsyncClient(
        auth_server.url, token_provider=feed_tokens, retry=FAST_RETRY, refresh_in_band=False
    )
    async with producer, watcher, reader:
        await producer.create_job(job_id, kind="build")
        watch = watcher.watch(job_id, transport=transport)
        feed = reader.feed(after=0, transport=transport)
        watched, fed = Collector(watch), Collector(feed)
        appended = 1  # created
        await watched.holding(1)
        await feed_tokens.until_asked(1)
        for expiry in range(1, EXPIRIES + 1):
            for step in range(3):
                await producer.append(job_id, {"type": "log", "message": f"{expiry}.{step}"})
            appended += 3
            await watched.holding(appended)
            await fed.holding(appended)
            # Both streams' tokens expire: each must ask for a new one and resume.
            await watch_tokens.until_asked(expiry + 1)
            await feed_tokens.until_asked(expiry + 1)
        await producer.append(job_id, {"type": "completed", "result": {"ok": True}})
        appended += 1
        await asyncio.wait_for(watched.task, WAIT)  # the terminal event ends the watch
        await fed.holding(appended)
        await fed.stop()

        stored = [event async for event in producer.events(job_id)]
    assert [e.seq for e in watched.events] == list(range(1, appended + 1))
    assert [e.id for e in fed.events] == [e.id for e in stored]
    assert [e.seq for e in fed.events] == list(range(1, appended + 1))
    assert watch.resumes >= EXPIRIES
    assert feed.resumes >= EXPIRIES
    assert watcher.credentials.renewals == watch_tokens.asked >= EXPIRIES + 1


async def test_a_websocket_refreshes_its_token_in_band_before_it_expires(
    auth_server: ServerProcess,
) -> None:
    """With ``refresh_in_band`` (the default), a WebSocket watcher and feed send the
    provider's next token in an ``auth`` frame before the held one's ``exp``: they cross
    several token lifetimes on one connection each (no resume), every event once."""
    tenant = new_tenant()
    job_id = f"build-{uuid.uuid4().hex[:8]}"
    producer = AsyncClient(auth_server.url, token=mint(tenant), retry=FAST_RETRY)
    watch_tokens = ShortLivedTokens(tenant, lifetime=4)
    feed_tokens = ShortLivedTokens(tenant, lifetime=4)
    watcher = AsyncClient(auth_server.url, token_provider=watch_tokens, retry=FAST_RETRY)
    reader = AsyncClient(auth_server.url, token_provider=feed_tokens, retry=FAST_RETRY)
    async with producer, watcher, reader:
        await producer.create_job(job_id, kind="build")
        watch, feed = watcher.watch(job_id), reader.feed(after=0)
        watched, fed = Collector(watch), Collector(feed)
        appended = 1
        for lifetime in range(1, EXPIRIES + 1):
            await producer.append(job_id, {"type": "log", "message": f"token {lifetime}"})
            appended += 1
            await watched.holding(appended)
            await fed.holding(appended)
            await watch_tokens.until_asked(lifetime + 1)
            await feed_tokens.until_asked(lifetime + 1)
        await producer.append(job_id, {"type": "completed"})
        appended += 1
        await asyncio.wait_for(watched.task, WAIT)
        await fed.holding(appended)
        await fed.stop()
    assert [e.seq for e in watched.events] == list(range(1, appended + 1))
    assert [e.seq for e in fed.events] == list(range(1, appended + 1))
    assert watch.in_band_refreshes >= EXPIRIES
    assert feed.in_band_refreshes >= EXPIRIES
    assert watch.resumes == 0
    assert feed.resumes == 0


async def wait_until_expired(url: str, job_id: str, token: str) -> None:
    """Return once ``token`` has expired, as the server says it: a watch on it (no
    provider) ends in ``Unauthorized`` ``token_expired``."""
    async with AsyncClient(url, token=token, retry=FAST_RETRY) as probe:
        with pytest.raises(Unauthorized) as refused:
            await drain(probe.watch(job_id))
    assert refused.value.code == "token_expired"


def test_the_reporter_keeps_reporting_across_an_expiry(auth_server: ServerProcess) -> None:
    """A sync reporter whose token expires between two flushes: the append answered 401 gets
    a new token from the (sync) provider and goes again; the log holds every event once."""
    tenant = new_tenant()
    job_id = f"report-{uuid.uuid4().hex[:8]}"
    first = mint(tenant, "jobs:read jobs:write", lifetime=3)
    given: list[str] = []

    def provider() -> str:
        given.append(first if not given else mint(tenant, "jobs:read jobs:write"))
        return given[-1]

    with Client(auth_server.url, token_provider=provider, retry=FAST_RETRY) as client:
        with client.job(job_id, kind="build") as job:
            job.log("before the expiry")
            job.flush()
            asyncio.run(wait_until_expired(auth_server.url, job_id, first))
            job.log("after the expiry")
            job.progress(1, 1)
        log = list(client.events(job_id))
    assert len(given) == 2  # the first token, and one more after the 401
    assert [(e.type, e.message) for e in log] == [
        ("created", None),
        ("log", "before the expiry"),
        ("log", "after the expiry"),
        ("progress", None),
        ("completed", None),
    ]
    assert job.stats.retries == 0  # a renewed token is not a failed attempt
    assert job.stats.duplicates == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_credential_without_the_scope_is_forbidden_and_not_renewed(
    auth_server: ServerProcess, transport: Any
) -> None:
    """A token without ``jobs:read``: the request and the stream raise ``Forbidden`` (403,
    close 4403 / HTTP 403 for SSE); the provider is not asked again."""
    tokens = ShortLivedTokens(new_tenant(), scope="jobs:write")
    async with AsyncClient(auth_server.url, token_provider=tokens, retry=FAST_RETRY) as client:
        await client.create_job("build-1")
        with pytest.raises(Forbidden):
            await client.get_job("build-1")
        with pytest.raises(Forbidden):
            await drain(client.watch("build-1", transport=transport))
    assert tokens.asked == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_stream_revoked_while_open_raises_forbidden(
    auth_server: ServerProcess, transport: Any
) -> None:
    """``auth.tenants.<t>.not_before`` set in the server's config file while a watch runs:
    the stream closes with 4403 / SSE ``forbidden``, and the watch raises ``Forbidden``
    without asking the provider for another token."""
    tenant = new_tenant()
    config_path = auth_server.db_path.parent / "jobfeed-test.toml"
    asked = 0

    def provider() -> str:
        nonlocal asked
        asked += 1
        return mint(tenant)

    async with AsyncClient(auth_server.url, token_provider=provider, retry=FAST_RETRY) as client:
        await client.create_job("build-1")
        watched = Collector(client.watch("build-1", transport=transport))
        await watched.holding(1)  # live: the hello and the created event
        not_before = datetime.fromtimestamp(time.time() + 1, UTC).isoformat()
        with config_path.open("a", encoding="utf-8") as config:
            config.write(f'\n[auth.tenants.{tenant}]\nnot_before = "{not_before}"\n')
        with pytest.raises(Forbidden) as refused:
            await asyncio.wait_for(watched.task, WAIT)
    assert refused.value.code == "forbidden"
    assert "revoked" in refused.value.message
    assert asked == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_provider_whose_token_is_refused_too_raises_unauthorized(
    auth_server: ServerProcess, transport: Any
) -> None:
    """Tokens the server cannot verify (another secret): the provider is asked once more
    after the first refusal, then ``Unauthorized`` is raised, for a request and a stream."""
    asked = 0

    async def provider() -> str:
        nonlocal asked
        asked += 1
        return mint("acme", secret="not-the-servers-secret-0123456789abcdef")

    async with AsyncClient(auth_server.url, token_provider=provider, retry=FAST_RETRY) as client:
        with pytest.raises(Unauthorized):
            await client.get_job("build-1")
        assert asked == 2
        # The watch starts with the token held (refused), asks once, and gives up.
        with pytest.raises(Unauthorized):
            await drain(client.watch("build-1", transport=transport))
        assert asked == 3


def test_the_cli_runs_token_command_when_its_token_is_refused(
    auth_server: ServerProcess,
) -> None:
    """``jobfeed tail --token <expired> --token-command CMD``: the stream is refused (4401),
    CMD (here ``jobfeed token``) prints a new token, and tail resumes and exits 0."""
    tenant = new_tenant()
    with Client(auth_server.url, token=mint(tenant)) as client, client.job("build-1") as job:
        job.log("one line")
    expired = mint(tenant, lifetime=-10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFEED_")}
    env.update(JOBFEED_AUTH__MODE="jwt", JOBFEED_AUTH__SECRETS=json.dumps([SECRET]))
    command = shlex.join(
        [sys.executable, "-m", "server", "token", "--tenant", tenant, "--scope", "jobs:read"]
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "server", "tail", "build-1", "--json"),
            *("--url", auth_server.url, "--token", expired, "--token-command", command),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["type"] for line in result.stdout.splitlines()] == [
        "created",
        "log",
        "completed",
    ]
