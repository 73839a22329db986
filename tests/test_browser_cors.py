"""CORS and the WebSocket Origin check from a real browser: Debian's chromium driven by
Playwright for Python (never ``playwright install``: .ci/run installs chromium with apt-get).

A small page server gives the browser two origins: ``http://127.0.0.1:P`` (listed in
``http.cors_origins``) and ``http://localhost:P`` (not listed). jobfeed runs with
authentication on. From the listed origin a page reads a job with a bearer token (a CORS
preflight), follows it with ``EventSource`` and ``WebSocket`` using a ticket; from the other
origin the browser refuses the read and jobfeed refuses the WebSocket upgrade.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from aiohttp import web

from server.config import load_config
from tests.conftest import auth_settings, token
from tests.test_openapi import _Server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000

if shutil.which(CHROMIUM) is None:
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it", pytrace=False)
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


class PageServer:
    """An empty HTML page on 127.0.0.1, in a thread: the browser's origin."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> int:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self.port

    async def _start(self) -> None:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<!doctype html><title>page</title>", content_type="text/html")

        app = web.Application()
        app.router.add_get("/", page)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(jobfeed's base URL, the page server's port), jobfeed listing http://127.0.0.1:PORT."""
    pages = PageServer()
    port = pages.start()
    environ = {
        "JOBFEED_STORAGE__PATH": str(tmp_path_factory.mktemp("browser") / "jobfeed.db"),
        "JOBFEED_LOG__ACCESS": "false",
        "JOBFEED_HTTP__CORS_ORIGINS": f'["http://127.0.0.1:{port}"]',
        **{f"JOBFEED_{k.upper()}": v for k, v in auth_settings().items()},
    }
    jobfeed = _Server(load_config(None, environ=environ))
    try:
        base = jobfeed.start()
        headers = {"Authorization": f"Bearer {token()}"}
        created = requests.post(f"{base}/v1/jobs", json={"job_id": "job-1"}, headers=headers)
        assert created.status_code == 201, created.text
        done = requests.post(
            f"{base}/v1/jobs/job-1/events", json={"type": "completed"}, headers=headers
        )
        assert done.status_code == 201, done.text
        yield base, port
    finally:
        jobfeed.stop()
        pages.stop()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    user_data = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            context.close()


READ_WITH_TOKEN = """async ([base, token]) => {
  try {
    const response = await fetch(base + "/v1/jobs/job-1", {
      headers: {Authorization: "Bearer " + token},
    });
    return {status: response.status, body: await response.json(),
            requestId: response.headers.get("X-Request-ID")};
  } catch (error) {
    return {blocked: String(error)};
  }
}"""

FOLLOW_SSE = """([base, ticket]) => new Promise((resolve) => {
  const seen = [];
  const source = new EventSource(base + "/v1/jobs/job-1/stream?ticket=" + ticket);
  const onEvent = (e) => {
    seen.push(JSON.parse(e.data).type);
    if (seen.includes("completed")) { source.close(); resolve({seen}); }
  };
  source.addEventListener("hello", () => seen.push("hello"));
  // Events come as unnamed messages, or named by their type: follow both.
  source.onmessage = onEvent;
  source.addEventListener("created", onEvent);
  source.addEventListener("completed", onEvent);
  source.onerror = () => { source.close(); resolve({seen, error: true}); };
})"""

FOLLOW_WS = """([base, ticket]) => new Promise((resolve) => {
  const seen = [];
  const ws = new WebSocket(base.replace("http", "ws") + "/v1/jobs/job-1/stream?ticket=" + ticket);
  ws.onmessage = (e) => seen.push(JSON.parse(e.data).type);
  ws.onclose = (e) => resolve({seen, code: e.code});
})"""


def ticket(base: str) -> str:
    response = requests.post(
        f"{base}/v1/tickets", json={}, headers={"Authorization": f"Bearer {token()}"}
    )
    assert response.status_code == 201, response.text
    value: str = response.json()["ticket"]
    return value


def test_a_listed_origin_reads_and_follows_a_job(
    servers: tuple[str, int], browser_page: Any
) -> None:
    """From http://127.0.0.1:P: fetch with Authorization passes the preflight and reads
    the snapshot (and X-Request-ID, an exposed header); EventSource and WebSocket with a
    ticket receive hello, created and completed; the WebSocket closes 1000."""
    base, port = servers
    browser_page.goto(f"http://127.0.0.1:{port}/")
    read = browser_page.evaluate(READ_WITH_TOKEN, [base, token()])
    assert read.get("status") == 200, read
    assert read["body"]["job_id"] == "job-1"
    assert read["requestId"]
    sse = browser_page.evaluate(FOLLOW_SSE, [base, ticket(base)])
    assert sse["seen"] == ["hello", "created", "completed"], sse
    ws = browser_page.evaluate(FOLLOW_WS, [base, ticket(base)])
    assert ws == {"seen": ["hello", "created", "completed"], "code": 1000}


def test_another_origin_is_refused(servers: tuple[str, int], browser_page: Any) -> None:
    """From http://localhost:P (not listed): the browser blocks the read (no CORS answer to
    its preflight) and jobfeed refuses the WebSocket upgrade (the page sees 1006, nothing
    received)."""
    base, port = servers
    browser_page.goto(f"http://localhost:{port}/")
    read = browser_page.evaluate(READ_WITH_TOKEN, [base, token()])
    assert "blocked" in read, read
    ws = browser_page.evaluate(FOLLOW_WS, [base, ticket(base)])
    assert ws == {"seen": [], "code": 1006}
