"""A real Chromium page that uses nothing but the browser's own ``EventSource`` (feed.md,
"Browser-ready Server-Sent Events"): ``onmessage`` gets every event, custom types included;
the server is SIGKILLed and restarted mid-stream and the page resumes with no hole and no
duplicate; after the terminal event the page stops reconnecting (204).

Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``), driven by Playwright
for Python; the page is served at the server's own origin by Playwright's router, so the
page's streams are same-origin requests to the real server process.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Launcher, launching
from tests.test_overload import wait_for_records

pytestmark = pytest.mark.process

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
WAIT_MS = 30_000
# Where the last screenshot is kept for a person to look at (also in the test's tmp_path).
SCREENSHOT = Path(os.environ.get("JOBFEED_SCREENSHOT_DIR", "/tmp")) / "jobfeed-browser.png"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>jobfeed EventSource</title>
<style>body{font:14px sans-serif;margin:16px} li{font-family:monospace}
.s{display:inline-block;min-width:9em}</style></head>
<body>
<h1>web-1 via EventSource</h1>
<p><span class="s">job stream:</span> <b id="job-state">connecting</b>,
   <span id="job-count">0</span> events, <span id="job-opens">0</span> opens</p>
<p><span class="s">feed:</span> <b id="feed-state">connecting</b>,
   <span id="feed-count">0</span> events, <span id="feed-opens">0</span> opens</p>
<ol id="log"></ol>
<script>
const STATES = ["connecting", "open", "closed"];
function follow(name, url) {
  const got = {events: [], opens: 0, errors: 0};
  const source = new EventSource(url);
  source.onopen = () => { got.opens++; show(); };
  source.onerror = () => { got.errors++; show(); };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    got.events.push({lastEventId: message.lastEventId, event});
    if (name === "job") {
      const li = document.createElement("li");
      li.textContent = `#${message.lastEventId} ${event.type} ${event.message || ""}`;
      document.getElementById("log").appendChild(li);
    }
    show();
  };
  function show() {
    document.getElementById(`${name}-state`).textContent = STATES[source.readyState];
    document.getElementById(`${name}-count`).textContent = got.events.length;
    document.getElementById(`${name}-opens`).textContent = got.opens;
  }
  got.state = () => source.readyState;
  return got;
}
window.job = follow("job", "/v1/jobs/web-1/stream");
window.feed = follow("feed", "/v1/feed?after=0&job=web-1");
</script></body></html>
"""


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


async def append(session: aiohttp.ClientSession, *events: dict[str, Any]) -> None:
    body: dict[str, Any] = events[0] if len(events) == 1 else {"events": list(events)}
    async with session.post("/v1/jobs/web-1/events", json=body) as response:
        assert response.status == 201, await response.text()


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (.ci/run installs it)"
)
async def test_event_source_page_survives_a_restart_and_stops_after_the_end(
    jobfeed_process: Launcher, tmp_path: Path
) -> None:
    """onmessage sees every event (custom types too) exactly once across a SIGKILL and a
    restart; after the terminal event the job stream is CLOSED (the 204 stopped it)."""
    from playwright.async_api import async_playwright

    settings = {"stream__sse_retry_ms": 200, "stream__heartbeat_seconds": 1}
    server = await jobfeed_process.start(**settings)
    async with aiohttp.ClientSession(server.url) as session:
        async with session.post("/v1/jobs", json={"job_id": "web-1", "kind": "demo"}) as response:
            assert response.status == 201
        await append(session, {"type": "progress", "progress": 10, "message": "starting"})
        await append(session, {"type": "stage_completed", "message": "custom type"})

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            await page.route(
                f"{server.url}/page.html",
                lambda route: route.fulfill(status=200, content_type="text/html", body=PAGE),
            )
            await page.goto(f"{server.url}/page.html")
            await page.wait_for_function(
                "job.events.length >= 3 && feed.events.length >= 3", timeout=WAIT_MS
            )

            server.kill()  # SIGKILL, mid-stream
            await server.wait_async(10)
            await page.wait_for_function("job.errors >= 1 && feed.errors >= 1", timeout=WAIT_MS)
            server = await jobfeed_process.start(server__port=server.port, **settings)
            async with aiohttp.ClientSession(server.url) as session:
                await append(session, {"type": "log", "message": "after the restart"})
                await append(
                    session,
                    {"type": "notification", "message": "custom again"},
                    {"type": "progress", "progress": 90},
                )
                await append(session, {"type": "completed", "result": {"ok": True}})
            await page.wait_for_function(
                "job.events.length >= 7 && feed.events.length >= 7 && job.state() === 2",
                timeout=WAIT_MS,
            )
            job = await page.evaluate("job")
            feed = await page.evaluate("feed")
            await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            shutil.copyfile(tmp_path / "page.png", SCREENSHOT)
        finally:
            await context.close()

    types = [item["event"]["type"] for item in job["events"]]
    assert types == [
        "created",
        "progress",
        "stage_completed",
        "log",
        "notification",
        "progress",
        "completed",
    ]
    assert [item["event"]["seq"] for item in job["events"]] == list(range(1, 8))
    assert [item["lastEventId"] for item in job["events"]] == [str(n) for n in range(1, 8)]
    assert job["opens"] == 2  # the first connection and one after the restart: then 204
    assert [item["event"] for item in feed["events"]] == [item["event"] for item in job["events"]]
    assert [item["lastEventId"] for item in feed["events"]] == [
        str(item["event"]["id"]) for item in feed["events"]
    ]
    # The server saw the job stream's last reconnect and answered 204 (its request line is
    # written as the response goes out, and read from the child's stderr by a thread).
    found = await asyncio.to_thread(
        wait_for_records,
        server,
        1,
        20,
        event="request",
        path="/v1/jobs/web-1/stream",
        status=204,
    )
    assert found == 1, server.describe()
