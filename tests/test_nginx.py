"""jobfeed behind Debian's nginx with the configuration the docs show
(``docs/nginx/jobfeed.conf``, only its two addresses replaced): events pass unbuffered, a
WebSocket upgrades, and while jobfeed is down an ``EventSource`` gets an answer that keeps it
retrying (200, ``retry:``, ``event: error``); after the restart it resumes exactly.

``.ci/run`` installs nginx when missing; the test skips, saying so, only where it is absent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.feedclient import feed_url, read_feed_sse, read_feed_ws
from tests.procs import Launcher, launching
from tests.streams import SseParser
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

pytestmark = pytest.mark.process

CONF = Path(__file__).resolve().parent.parent / "docs" / "nginx" / "jobfeed.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
START_TIMEOUT = 20.0
_POLL = 0.02  # nginx has no readiness signal but its listening socket: poll it until a deadline


@pytest.fixture
def jobfeed_process(tmp_path: Path) -> Iterator[Launcher]:
    with launching(tmp_path) as launcher:
        yield launcher


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Any]:
    """A factory: ``start(upstream_port) -> base URL`` of an nginx running the docs' file."""
    if NGINX is None:
        pytest.skip("nginx is absent (.ci/run installs Debian's nginx-light)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(upstream_port: int) -> str:
        port = free_port()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        site = CONF.read_text(encoding="utf-8")
        assert "server 127.0.0.1:8080;" in site
        assert "listen 80;" in site
        site = site.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream_port};")
        site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
        (prefix / "site.conf").write_text(site, encoding="utf-8")
        temp = " ".join(
            f"{name}_temp_path {prefix / name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            "daemon off; master_process off; worker_processes 1;\n"
            f"pid {prefix / 'nginx.pid'}; error_log {prefix / 'error.log'} info;\n"
            "events { worker_connections 512; }\n"
            f"http {{ access_log {prefix / 'access.log'}; {temp}\n"
            f"include {prefix / 'site.conf'}; }}\n",
            encoding="utf-8",
        )
        assert NGINX is not None
        process = subprocess.Popen(
            [
                NGINX,
                "-p",
                str(prefix),
                "-c",
                str(prefix / "nginx.conf"),
                "-e",
                str(prefix / "error.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"nginx exited: {process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(_POLL)
        pytest.fail("nginx never listened")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


async def append(session: aiohttp.ClientSession, base: str, job_id: str, **event: Any) -> int:
    async with session.post(f"{base}/v1/jobs/{job_id}/events", json=event) as response:
        assert response.status == 201, await response.text()
        body = await response.json()
    event_id: int = body["events"][-1]["id"]
    return event_id


async def test_event_source_resumes_through_nginx_across_a_restart(
    jobfeed_process: Launcher, nginx_in_front: Any
) -> None:
    """Through nginx: a live event arrives while the response is open (no buffering); with
    jobfeed killed, an EventSource request gets 200 + retry + `event: error`; restarted,
    the feed resumes from Last-Event-ID with nothing lost or repeated; WebSocket works."""
    server = await jobfeed_process.start(stream__heartbeat_seconds=0.5)
    proxy = nginx_in_front(server.port)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy}/v1/jobs", json={"job_id": "px-1"}) as response:
            assert response.status == 201
        first = await append(session, proxy, "px-1", type="log", message="one")

        # Unbuffered: an event appended while the stream is open arrives through nginx.
        headers = {"Accept": "text/event-stream"}
        async with session.get(f"{proxy}/v1/jobs/px-1/stream", headers=headers) as response:
            assert response.status == 200
            parser = SseParser()
            seqs: list[int] = []
            appended = False
            async with asyncio.timeout(20):
                while len(seqs) < 3:
                    line = (await response.content.readline()).decode().rstrip("\n")
                    item = parser.feed_line(line)
                    if item is None or not hasattr(item, "data"):
                        continue
                    payload = json.loads(item.data)
                    if "seq" in payload:
                        seqs.append(payload["seq"])
                    if len(seqs) == 2 and not appended:
                        await append(session, proxy, "px-1", type="log", message="live")
                        appended = True
            assert seqs == [1, 2, 3]

        ws = await read_feed_ws(session, feed_url(proxy.replace("http", "ws"), 0), count=3)
        assert [event["seq"] for event in ws.events] == [1, 2, 3]

        before = await read_feed_sse(session, feed_url(proxy, 0), count=3)
        position = before.position
        server.kill()
        await server.wait_async(10)

        down = await read_feed_sse(session, feed_url(proxy), last_event_id=position)
        assert down.status == 200  # not 502: EventSource keeps retrying
        assert down.retry == 2000
        assert down.errors == [
            {
                "type": "error",
                "code": "upstream_unavailable",
                "message": "jobfeed is not answering; retrying",
            }
        ]
        async with session.get(f"{proxy}/v1/jobs") as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "upstream_unavailable"

        server = await jobfeed_process.start(
            server__port=server.port, stream__heartbeat_seconds=0.5
        )
        last = await append(session, proxy, "px-1", type="completed")
        after = await read_feed_sse(session, feed_url(proxy), last_event_id=position, until_id=last)
    assert after.hello is not None
    assert after.hello["after"] == position
    assert [event["id"] for event in before.events + after.events] == list(range(1, last + 1))
    assert first == 2


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>feed via nginx</title></head>
<body><h1>px-2 feed through nginx</h1><p id="state">connecting</p><ol id="log"></ol>
<script>
window.got = {events: [], opens: 0, errors: 0, down: 0};
const source = new EventSource("/v1/feed?after=0&job=px-2");
source.onopen = () => { got.opens++; };
source.onerror = () => { got.errors++; };
source.addEventListener("error", (e) => { if (e.data) got.down++; });
source.onmessage = (m) => {
  const event = JSON.parse(m.data);
  got.events.push({lastEventId: m.lastEventId, event});
  const li = document.createElement("li");
  li.textContent = `#${m.lastEventId} ${event.type} ${event.message || ""}`;
  document.getElementById("log").appendChild(li);
  document.getElementById("state").textContent = `${got.events.length} events, ` +
    `${got.opens} opens, ${got.down} upstream-down answers`;
};
</script></body></html>
"""


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (.ci/run installs it)"
)
async def test_a_page_resumes_through_nginx_after_jobfeed_restarts(
    jobfeed_process: Launcher, nginx_in_front: Any, tmp_path: Path
) -> None:
    """A Chromium page on native EventSource, behind nginx: while jobfeed is down it gets
    nginx's 200 `event: error` answer and keeps retrying; after the restart it resumes from
    its Last-Event-ID with no hole and no duplicate."""
    from playwright.async_api import async_playwright

    server = await jobfeed_process.start()
    proxy = nginx_in_front(server.port)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy}/v1/jobs", json={"job_id": "px-2"}) as response:
            assert response.status == 201
        await append(session, proxy, "px-2", type="log", message="before")
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                await page.route(
                    f"{proxy}/page.html",
                    lambda route: route.fulfill(status=200, content_type="text/html", body=PAGE),
                )
                await page.goto(f"{proxy}/page.html")
                await page.wait_for_function("got.events.length >= 2", timeout=WAIT_MS)
                server.kill()
                await server.wait_async(10)
                # nginx answers for the dead upstream; the page keeps retrying.
                await page.wait_for_function("got.down >= 1", timeout=WAIT_MS)
                server = await jobfeed_process.start(server__port=server.port)
                await append(session, proxy, "px-2", type="notification", message="after")
                await page.wait_for_function("got.events.length >= 3", timeout=WAIT_MS)
                got = await page.evaluate("got")
                await page.screenshot(path=str(tmp_path / "nginx-page.png"))
            finally:
                await context.close()
    assert [item["event"]["seq"] for item in got["events"]] == [1, 2, 3]
    assert [item["event"]["type"] for item in got["events"]] == ["created", "log", "notification"]
    assert got["opens"] >= 3  # the first, at least one upstream-down answer, after the restart
