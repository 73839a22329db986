"""The browser module (clients/js/jobfeed.js, served at /client/) and ``<jobfeed-progress>``
in a real Chromium against a real ``jobfeed serve`` process: watchJob over WebSocket and over
Server-Sent Events, and watchFeed, resume across a SIGKILL and a restart with no hole and no
duplicate; the module's fold equals the server's, on the server's own vectors and on a live
job; a log_reset starts over; a reload resumes from sessionStorage; the card's states and its
accessibility tree.

One Chromium and one server for the module (tests/test_browser.py has the launch flags); the
server's address stays the same across the restart, so pages keep their origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from server.fold_vectors import vectors
from tests.conftest import auth_settings, bearer, token
from tests.procs import Launcher, ServerProcess, launching
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

pytestmark = [
    pytest.mark.process,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (.ci/run installs it)"
    ),
]

# Where screenshots are kept for a person to look at (docs/screenshots has the chosen ones).
SHOTS = Path(os.environ.get("JOBFEED_SCREENSHOT_DIR", "/tmp"))
SETTINGS = {"stream__heartbeat_seconds": 1}
BLANK = "<head><title>t</title></head><body></body>"
# Short backoff: the test waits for the resume, not for a production-sized window.
BACKOFF = {"base": 50, "cap": 500}


@dataclass
class Served:
    """The module's server; replaced in place when a test restarts it on the same port."""

    launcher: Launcher
    process: ServerProcess

    @property
    def url(self) -> str:
        return self.process.url


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with launching(tmp_path_factory.mktemp("jobfeed")) as launcher:
        yield launcher


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(launcher: Launcher) -> Served:
    return Served(launcher, await launcher.start(**SETTINGS))


@contextlib.asynccontextmanager
async def chromium(profile: Path, width: int = 900, height: int = 600) -> AsyncIterator[Any]:
    """Debian's Chromium with a fresh user-data-dir: one per test module, pages reused."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context
        finally:
            await context.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    async with chromium(tmp_path_factory.mktemp("profile")) as context:
        yield context


async def open_page(browser: Any, served: Served, html: str = BLANK, module: str = "") -> Any:
    """A page at the server's origin showing ``html`` with ``module`` imported, and its
    uncaught errors collected in ``page.errors``.

    The document comes from the real server and its content is then replaced: a page made
    up by Playwright's router has no address, so Chromium counts it as public and blocks its
    WebSockets to 127.0.0.1 (Local Network Access); and elements written by ``set_content``
    (document.write) were never upgraded to custom elements."""
    page = await browser.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    await page.goto(f"{served.url}/healthz")
    await page.evaluate(
        """async ([html, module]) => {
          document.documentElement.innerHTML = html;
          if (module) await import(module);
        }""",
        [html, module],
    )
    return page


async def create(session: aiohttp.ClientSession, job_id: str, kind: str = "demo") -> None:
    async with session.post("/v1/jobs", json={"job_id": job_id, "kind": kind}) as response:
        assert response.status == 201, await response.text()


async def append(session: aiohttp.ClientSession, job_id: str, *events: dict[str, Any]) -> None:
    body: dict[str, Any] = events[0] if len(events) == 1 else {"events": list(events)}
    async with session.post(f"/v1/jobs/{job_id}/events", json=body) as response:
        assert response.status == 201, await response.text()


async def snapshot(session: aiohttp.ClientSession, job_id: str) -> dict[str, Any]:
    async with session.get(f"/v1/jobs/{job_id}") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


WATCH_ALL = """async ({job, backoff}) => {
  const m = await import("/client/jobfeed.js");
  window.runs = {};
  for (const transport of ["websocket", "sse"]) {
    const got = window.runs[transport] = {events: [], snapshots: [], states: [], errors: []};
    got.watch = m.watchJob(m.jobStreamUrl(job), {
      transport, backoff,
      onEvent: (event, snapshot) => { got.events.push(event); got.snapshots.push(snapshot); },
      onStatus: (state) => got.states.push(state),
      onError: (error) => got.errors.push(error.code),
    });
  }
  const feed = window.runs.feed = {events: [], snapshots: {}, states: []};
  feed.watch = m.watchFeed("/v1/feed", {
    after: 0, filters: {job}, backoff,
    onEvent: (event) => feed.events.push(event),
    onSnapshot: (snapshot) => { feed.snapshots[snapshot.job_id] = snapshot; },
    onStatus: (state) => feed.states.push(state),
  });
}"""


def run_state(name: str) -> str:
    return (
        f"({{events: runs.{name}.events, snapshots: runs.{name}.snapshots, "
        f"states: runs.{name}.states, errors: runs.{name}.errors, "
        f"resumes: runs.{name}.watch.resumes, state: runs.{name}.watch.state, "
        f"transport: runs.{name}.watch.transport, after: runs.{name}.watch.after}})"
    )


async def test_watches_resume_across_a_sigkill_and_stop_at_the_end(
    served: Served, browser: Any
) -> None:
    """watchJob over WebSocket and over SSE, and watchFeed: every event exactly once, in
    order, across a SIGKILL and a restart; both job watches end "done" after the terminal
    event; the folded snapshot equals the server's."""
    job = "mod-1"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
        await append(session, job, {"type": "progress", "progress": 10, "phase": "fetch"})
        await append(session, job, {"type": "stage_done", "message": "a custom type"})
    page = await open_page(browser, served)
    await page.evaluate(WATCH_ALL, {"job": job, "backoff": BACKOFF})
    await page.wait_for_function(
        "runs.websocket.events.length === 3 && runs.sse.events.length === 3"
        " && runs.feed.events.length === 3",
        timeout=WAIT_MS,
    )

    served.process.kill()  # SIGKILL, mid-stream
    await served.process.wait_async(10)
    await page.wait_for_function(
        "runs.websocket.states.includes('waiting') && runs.sse.states.includes('waiting')"
        " && runs.feed.states.includes('waiting')",
        timeout=WAIT_MS,
    )
    served.process = await served.launcher.start(server__port=served.process.port, **SETTINGS)
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, job, {"type": "log", "message": "after the restart"})
        await append(
            session,
            job,
            {"type": "progress", "current": 3, "total": 4, "message": "three of four"},
            {"type": "notification", "data": {"to": "ops"}},
        )
        await append(session, job, {"type": "completed", "result": {"ok": True}})
        expected = await snapshot(session, job)
    await page.wait_for_function(
        "runs.websocket.watch.state === 'done' && runs.sse.watch.state === 'done'"
        " && runs.feed.events.length === 7",
        timeout=WAIT_MS,
    )
    results = {name: await page.evaluate(run_state(name)) for name in ("websocket", "sse")}
    feed = await page.evaluate("({events: runs.feed.events, snapshots: runs.feed.snapshots})")
    assert page.errors == []
    await page.close()

    for name, got in results.items():
        assert [event["seq"] for event in got["events"]] == list(range(1, 8)), name
        assert got["events"][-1]["type"] == "completed", name
        assert got["transport"] == name, name
        assert got["resumes"] >= 1, name
        assert got["errors"] == [], name
        assert got["states"][-1] == "done", name
        assert got["snapshots"][-1] == expected, name  # the module's fold = the server's
    assert feed["events"] == results["websocket"]["events"]
    ids = [event["id"] for event in feed["events"]]
    assert ids == sorted(set(ids))
    assert feed["snapshots"][job] == expected


async def test_the_module_fold_reproduces_the_server_vectors(served: Served, browser: Any) -> None:
    """applyEvent, run in Chromium on every case of server.fold_vectors, gives the server's
    snapshot after every event (timestamps' microseconds, epochs, rate and eta included);
    and folding on from any of the server's snapshots (as a watch given a snapshot does)
    reaches the same last snapshot: the rate_window a snapshot carries is all it needs."""
    cases = vectors()["cases"]
    page = await open_page(browser, served)
    folded = await page.evaluate(
        """async (cases) => {
          const m = await import("/client/jobfeed.js");
          return cases.map((c) => {
            let state = null;
            const steps = c.events.map((event) => (state = m.applyEvent(state, event)));
            const resumed = c.snapshots.map((snapshot, i) => m.fold(c.events.slice(i + 1),
              structuredClone(snapshot)));
            return {steps, resumed};
          });
        }""",
        cases,
    )
    await page.close()
    assert len(folded) == len(cases) > 10
    for case, got in zip(cases, folded, strict=True):
        assert got["steps"] == case["snapshots"], case["name"]
        assert got["resumed"] == [case["snapshots"][-1]] * len(case["snapshots"]), case["name"]


async def test_log_reset_starts_over_and_a_reload_resumes(served: Served, browser: Any) -> None:
    """A watch given another epoch (the job was re-created, or this is another database) is
    told log_reset (onReset, onError with final false) and starts over from seq 1; with
    ``persist`` a reloaded page resumes after the last seq it had, with its snapshot."""
    job = "mod-2"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
        await append(session, job, {"type": "progress", "progress": 20})
    page = await open_page(browser, served)
    watch = """async ({job, epoch, backoff}) => {
      const m = await import("/client/jobfeed.js");
      const got = window.got = {events: [], resets: [], errors: []};
      got.watch = m.watchJob(m.jobStreamUrl(job), {
        after: epoch ? 2 : undefined, epoch, persist: true, backoff,
        onEvent: (event) => got.events.push(event.seq),
        onReset: (error) => got.resets.push(error.code),
        onError: (error) => got.errors.push([error.code, error.final]),
      });
    }"""
    await page.evaluate(watch, {"job": job, "epoch": "1-0", "backoff": BACKOFF})
    await page.wait_for_function("got.events.length === 2", timeout=WAIT_MS)
    got = await page.evaluate("({events: got.events, resets: got.resets, errors: got.errors})")
    assert got == {"events": [1, 2], "resets": ["log_reset"], "errors": [["log_reset", False]]}

    await page.reload()
    await page.evaluate(watch, {"job": job, "epoch": None, "backoff": BACKOFF})
    await page.wait_for_function("got.watch.state === 'live'", timeout=WAIT_MS)
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, job, {"type": "completed"})
        expected = await snapshot(session, job)
    await page.wait_for_function("got.watch.state === 'done'", timeout=WAIT_MS)
    assert await page.evaluate("got.events") == [3]  # resumed after 2: nothing twice
    assert await page.evaluate("got.watch.snapshot") == expected
    assert page.errors == []
    await page.close()


async def test_a_feed_resumes_with_its_epoch_and_a_stale_one_is_reset(
    served: Served, browser: Any
) -> None:
    """watchFeed keeps the epoch of the feed's hello (and persists it with the position); a
    watch given an epoch that is not the server's (its database was restored or replaced)
    is told log_reset (onReset, onError with final false) and starts again from now, with
    the server's epoch, and then follows live events."""
    job = "mod-feed-epoch"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
    page = await open_page(browser, served)
    watch = """async ({job, epoch, backoff}) => {
      const m = await import("/client/jobfeed.js");
      const got = window.got = {events: [], resets: [], errors: []};
      got.watch = m.watchFeed("/v1/feed", {
        after: 1, epoch, filters: {job}, backoff, persist: "feed-epoch",
        onEvent: (event) => got.events.push(event.id),
        onReset: (error) => got.resets.push(error.code),
        onError: (error) => got.errors.push([error.code, error.final]),
      });
    }"""
    await page.evaluate(watch, {"job": job, "epoch": "g0-00000000", "backoff": BACKOFF})
    await page.wait_for_function("got.watch.state === 'live'", timeout=WAIT_MS)
    got = await page.evaluate(
        "({resets: got.resets, errors: got.errors, epoch: got.watch.epoch,"
        " stored: JSON.parse(sessionStorage.getItem('feed-epoch'))})"
    )
    assert got["resets"] == ["log_reset"]
    assert got["errors"] == [["log_reset", False]]
    assert got["epoch"].startswith("g0-")
    assert got["epoch"] != "g0-00000000"
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, job, {"type": "log", "message": "after the reset"})
    await page.wait_for_function("got.events.length === 1", timeout=WAIT_MS)
    stored = await page.evaluate("JSON.parse(sessionStorage.getItem('feed-epoch'))")
    assert stored == {"after": (await page.evaluate("got.events[0]")), "epoch": got["epoch"]}
    await page.evaluate("got.watch.stop()")
    assert page.errors == []
    await page.close()


async def test_auto_transport_falls_back_to_sse_and_passes_the_ticket(
    served: Served, browser: Any
) -> None:
    """With WebSockets failing before they open (a proxy that drops upgrades), the default
    transport gives way to Server-Sent Events and the job is followed to its end; every
    attempt carries getTicket's ticket as ``?ticket=`` (auth.md)."""
    job = "mod-3"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
    page = await open_page(browser, served)
    await page.evaluate(
        """async ({job, backoff}) => {
          window.WebSocket = class {  // every upgrade fails, as behind such a proxy
            static CONNECTING = 0; static OPEN = 1; static CLOSING = 2; static CLOSED = 3;
            constructor(url) {
              (window.tried ??= []).push(String(url));
              this.readyState = 3;
              setTimeout(() => this.onclose?.({code: 1006, reason: ""}), 0);
            }
            close() {}
          };
          const Fetch = window.fetch;
          window.fetch = (url, init) => {
            (window.tried ??= []).push(String(url));
            return Fetch(url, init);
          };
          const m = await import("/client/jobfeed.js");
          const got = window.got = {events: []};
          got.watch = m.watchJob(m.jobStreamUrl(job), {
            backoff, getTicket: () => "t-1",
            onEvent: (event) => got.events.push(event.seq),
          });
        }""",
        {"job": job, "backoff": BACKOFF},
    )
    await page.wait_for_function("got.events.length === 1", timeout=WAIT_MS)
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, job, {"type": "cancelled", "reason": "not needed"})
    await page.wait_for_function("got.watch.state === 'done'", timeout=WAIT_MS)
    assert await page.evaluate("got.events") == [1, 2]
    assert await page.evaluate("got.watch.transport") == "sse"
    tried = await page.evaluate("tried")
    assert tried[0].startswith("ws://")
    assert "/v1/jobs/mod-3/stream?" in tried[0]
    assert any(url.startswith("http://") for url in tried)
    assert all("ticket=t-1" in url for url in tried), tried
    assert page.errors == []
    await page.close()


async def test_sse_error_records_are_retried_like_nginx_upstream_down(
    served: Served, browser: Any
) -> None:
    """An SSE answer of 200 with an ``event: error`` record is a refusal to retry, whatever
    its code: the one docs/nginx/jobfeed.conf sends while jobfeed is down
    (``upstream_unavailable``) included. The watch resumes and follows the job to its end."""
    job = "mod-4"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
    page = await open_page(browser, served)
    answered: list[str] = []

    async def upstream_down_once(route: Any) -> None:
        answered.append(route.request.url)
        if len(answered) > 1:
            await route.continue_()
            return
        await route.fulfill(
            status=200,
            content_type="text/event-stream",
            body='retry: 50\n\nevent: error\ndata: {"type":"error",'
            '"code":"upstream_unavailable","message":"jobfeed is not answering; retrying"}\n\n',
        )

    await page.route(f"{served.url}/v1/jobs/{job}/stream*", upstream_down_once)
    await page.evaluate(
        """async ({job, backoff}) => {
          const m = await import("/client/jobfeed.js");
          const got = window.got = {events: [], errors: []};
          got.watch = m.watchJob(m.jobStreamUrl(job), {
            transport: "sse", backoff,
            onEvent: (event) => got.events.push(event.seq),
            onError: (error) => got.errors.push(error.code),
          });
        }""",
        {"job": job, "backoff": BACKOFF},
    )
    await page.wait_for_function("got.events.length === 1", timeout=WAIT_MS)
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, job, {"type": "completed"})
    await page.wait_for_function("got.watch.state === 'done'", timeout=WAIT_MS)
    assert await page.evaluate("got.events") == [1, 2]
    assert await page.evaluate("got.errors") == []
    assert await page.evaluate("got.watch.resumes") == 1
    assert len(answered) == 2
    assert page.errors == []
    await page.close()


CARDS = """<head><meta charset="utf-8"><title>cards</title>
<style>body{font:14px system-ui,sans-serif;margin:16px;display:grid;gap:12px;width:420px}
#custom{--jobfeed-bar-color:#8250df;--jobfeed-radius:2px}</style>
</head><body>
<jobfeed-progress job="build-42"></jobfeed-progress>
<jobfeed-progress job="report-7"></jobfeed-progress>
<jobfeed-progress id="custom" job="deploy-3"></jobfeed-progress>
</body>"""


async def test_progress_card_states_and_accessibility(served: Served, browser: Any) -> None:
    """<jobfeed-progress> shows a running job's bar, percent, phase and message, a completed
    job's result and a failed job's error; its bar is a progressbar with aria-valuenow,
    min, max and a valuetext a screen reader reads; it follows the job live."""
    async with aiohttp.ClientSession(served.url) as session:
        for job in ("build-42", "report-7", "deploy-3"):
            await create(session, job, kind="build")
        await append(
            session,
            "build-42",
            {
                "type": "progress",
                "current": 2,
                "total": 5,
                "phase": "compile",
                "message": "cc src/main.c",
            },
        )
        await append(session, "report-7", {"type": "progress", "progress": 70})
        await append(
            session, "report-7", {"type": "completed", "result": {"rows": 1200, "pdf": "/r/7.pdf"}}
        )
        await append(
            session, "deploy-3", {"type": "progress", "progress": 55, "phase": "smoke tests"}
        )
        await append(
            session,
            "deploy-3",
            {"type": "failed", "error": {"message": "3 smoke tests failed", "code": "smoke_tests"}},
        )
    page = await open_page(browser, served, CARDS, "/client/progress.js")
    running = page.locator("jobfeed-progress[job=build-42]")
    completed = page.locator("jobfeed-progress[job=report-7]")
    failed = page.locator("jobfeed-progress[job=deploy-3]")
    await running.locator("[role=progressbar][aria-valuenow='40']").wait_for(timeout=WAIT_MS)
    await completed.locator("[role=progressbar][aria-valuenow='100']").wait_for(timeout=WAIT_MS)
    await failed.locator("[role=progressbar][aria-valuenow='55']").wait_for(timeout=WAIT_MS)

    bar = running.get_by_role("progressbar", name="Progress of build-42")
    assert await bar.get_attribute("aria-valuemin") == "0"
    assert await bar.get_attribute("aria-valuemax") == "100"
    assert await bar.get_attribute("aria-valuetext") == "40 percent, compile, cc src/main.c"
    assert await running.get_attribute("status") == "running"
    assert await running.locator("[part=percent]").inner_text() == "40%"
    assert await running.locator("[part=phase]").inner_text() == "compile · 2 of 5"
    assert await running.locator("[part=message]").inner_text() == "cc src/main.c"
    aria = await running.aria_snapshot()
    assert '- progressbar "Progress of build-42"' in aria, aria
    assert "- status: running" in aria, aria

    assert await completed.get_attribute("status") == "completed"
    assert '"rows": 1200' in await completed.locator("[part=outcome]").inner_text()
    assert "100 percent, completed" in (
        await completed.get_by_role("progressbar").get_attribute("aria-valuetext") or ""
    )
    assert await failed.get_attribute("status") == "failed"
    assert (
        "Failed (smoke_tests): 3 smoke tests failed"
        in await failed.locator("[part=outcome]").inner_text()
    )
    assert "- status: failed" in await failed.aria_snapshot()
    await page.locator("body").screenshot(path=str(SHOTS / "jobfeed-progress.png"))

    # Live: the running card follows its job to the end.
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, "build-42", {"type": "progress", "current": 4, "message": "link"})
        await running.locator("[role=progressbar][aria-valuenow='80']").wait_for(timeout=WAIT_MS)
        await append(session, "build-42", {"type": "completed", "message": "built"})
    await page.wait_for_function(
        "document.querySelector('jobfeed-progress[job=build-42]')"
        ".getAttribute('status') === 'completed'",
        timeout=WAIT_MS,
    )
    assert await running.locator("[part=message]").inner_text() == "built"
    assert "- status: completed" in await running.aria_snapshot()
    assert page.errors == []
    await page.close()


VENDOR = Path(__file__).resolve().parent / "vendor" / "react"
# "react" for the hooks module's bare import, from the UMD build's global (no bundler here).
REACT_SHIM = """const React = window.React;
export default React;
export const { useEffect, useRef, useState } = React;
"""
REACT_PAGE = """async ({job}) => {
  const Native = window.WebSocket;
  window.sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) { super(...args); window.sockets.push(this); }
  };
  const map = document.createElement("script");
  map.type = "importmap";
  map.textContent = JSON.stringify({imports: {react: "/vendor/react-shim.js"}});
  document.head.append(map);
  for (const name of ["react", "react-dom"]) {
    await new Promise((loaded, failed) => {
      const script = document.createElement("script");
      script.src = `/vendor/${name}.production.min.js`;
      script.onload = loaded;
      script.onerror = failed;
      document.head.append(script);
    });
  }
  const { useJob } = await import("/client/react.js");
  const h = React.createElement;
  window.renders = 0;
  function Job({ id, tick }) {
    const { snapshot, events, status } = useJob(id, { backoff: { base: 50, cap: 500 } });
    window.renders++;
    window.seen = { status, seqs: events.map((e) => e.seq), snapshot, tick };
    return h("p", { id: "job" }, `${status}: ${snapshot?.progress ?? "?"}% (render ${tick})`);
  }
  function App() {
    const [tick, setTick] = React.useState(0);
    window.bump = () => setTick((t) => t + 1);
    return h(Job, { id: job, tick });
  }
  window.root = ReactDOM.createRoot(document.body.appendChild(document.createElement("div")));
  window.root.render(h(App));
}"""


async def test_react_hook_rerenders_without_reconnecting(served: Served, browser: Any) -> None:
    """useJob (clients/js/react.js) in a React 18 page (vendored from npm): the component
    re-renders on every event and on its parent's state changes over one WebSocket; its
    snapshot is the server's; unmounting closes the socket."""
    job = "react-1"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
    page = await open_page(browser, served)

    async def vendored(route: Any) -> None:
        name = route.request.url.rsplit("/", 1)[1]
        if name == "react-shim.js":
            await route.fulfill(content_type="text/javascript", body=REACT_SHIM)
        else:
            body = await asyncio.to_thread((VENDOR / name).read_bytes)
            await route.fulfill(content_type="text/javascript", body=body)

    await page.route(f"{served.url}/vendor/*", vendored)
    await page.evaluate(REACT_PAGE, {"job": job})
    await page.wait_for_function("window.seen?.status === 'live'", timeout=WAIT_MS)
    for _ in range(5):
        await page.evaluate("bump()")
    await page.wait_for_function("seen.tick === 5", timeout=WAIT_MS)
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, job, {"type": "progress", "progress": 30})
        await page.wait_for_selector("#job:text('live: 30% (render 5)')", timeout=WAIT_MS)
        await page.evaluate("bump()")
        await append(session, job, {"type": "completed", "result": 7})
        expected = await snapshot(session, job)
    await page.wait_for_function("seen.status === 'done'", timeout=WAIT_MS)
    seen = await page.evaluate("seen")
    assert seen["seqs"] == [1, 2, 3]
    assert seen["snapshot"] == expected
    assert seen["tick"] == 6
    assert await page.evaluate("renders") >= 9  # mount, hello, 3 events, 6 bumps (batched)
    assert await page.evaluate("sockets.length") == 1  # re-renders never reconnected

    # Unmounted while live: the hook's cleanup stops the watch, which closes its socket.
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, "react-2")
    await page.evaluate(
        """async (job) => {
          const { useJob } = await import("/client/react.js");
          function Live() { window.second = useJob(job).status; return null; }
          const slot = document.body.appendChild(document.createElement("div"));
          window.root2 = ReactDOM.createRoot(slot);
          window.root2.render(React.createElement(Live));
        }""",
        "react-2",
    )
    await page.wait_for_function("window.second === 'live'", timeout=WAIT_MS)
    assert await page.evaluate("sockets.length") == 2
    await page.evaluate("root2.unmount()")
    await page.wait_for_function("sockets[1].readyState === WebSocket.CLOSED", timeout=WAIT_MS)
    assert page.errors == []
    await page.close()


async def test_with_authentication_a_ticket_is_renewed_after_4401(
    browser: Any, tmp_path: Path
) -> None:
    """Authentication on (auth.md), tickets valid for one second: the watch's stream is
    closed 4401 when its ticket expires, asks getTicket for a new one (POST /v1/tickets with
    the page's token) and resumes with no hole or duplicate. The dashboard, given the token
    in its Token field's storage, lists and follows the tenant's jobs."""
    with launching(tmp_path) as launcher:
        process = await launcher.start(**auth_settings(auth__ticket_seconds=1), **SETTINGS)
        served = Served(launcher, process)
        secret = token()
        async with aiohttp.ClientSession(served.url, headers=bearer(secret)) as session:
            await create(session, "sec-1")
            await append(session, "sec-1", {"type": "progress", "progress": 10})
        page = await open_page(browser, served)
        await page.evaluate(
            """async ({token, backoff}) => {
              const m = await import("/client/jobfeed.js");
              const got = window.got = {events: [], errors: [], tickets: 0};
              got.watch = m.watchJob(m.jobStreamUrl("sec-1"), {
                backoff,
                getTicket: async () => {
                  got.tickets++;
                  const response = await fetch("/v1/tickets", {
                    method: "POST", body: "{}",
                    headers: {Authorization: `Bearer ${token}`, "Content-Type": "application/json"},
                  });
                  return (await response.json()).ticket;
                },
                onEvent: (event) => got.events.push(event.seq),
                onError: (error) => got.errors.push(error.code),
              });
            }""",
            {"token": secret, "backoff": BACKOFF},
        )
        await page.wait_for_function("got.events.length === 2", timeout=WAIT_MS)
        await page.wait_for_function("got.tickets >= 3", timeout=WAIT_MS)  # two renewals
        async with aiohttp.ClientSession(served.url, headers=bearer(secret)) as session:
            await append(session, "sec-1", {"type": "log", "message": "after renewals"})
            await append(session, "sec-1", {"type": "completed"})
        await page.wait_for_function("got.watch.state === 'done'", timeout=WAIT_MS)
        assert await page.evaluate("got.events") == [1, 2, 3, 4]
        assert await page.evaluate("got.errors") == []

        await page.evaluate("token => sessionStorage.setItem('jobfeed:token', token)", secret)
        await page.goto(f"{served.url}/ui/")
        await page.wait_for_selector("tr[data-job=sec-1]", timeout=WAIT_MS)
        await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
        await page.wait_for_selector("#counts [data-status=completed] .chip-count:text-is('1')")
        assert page.errors == []
        await page.close()


async def test_a_deleted_job_ends_the_watch_for_good(served: Served, browser: Any) -> None:
    """DELETE while a job is watched: over WebSocket (4410) and SSE (event: error
    job_deleted) the watch reports job_deleted as final and does not reconnect."""
    job = "mod-deleted"
    async with aiohttp.ClientSession(served.url) as session:
        await create(session, job)
        await append(session, job, {"type": "progress", "progress": 10})
    page = await open_page(browser, served)
    await page.evaluate(
        """async ({job, backoff}) => {
          const m = await import("/client/jobfeed.js");
          window.runs = {};
          for (const transport of ["websocket", "sse"]) {
            const got = window.runs[transport] = {events: [], errors: []};
            got.watch = m.watchJob(m.jobStreamUrl(job), {
              transport, backoff,
              onEvent: (event) => got.events.push(event.seq),
              onError: (error) => got.errors.push([error.code, error.final]),
            });
          }
        }""",
        {"job": job, "backoff": BACKOFF},
    )
    await page.wait_for_function(
        "runs.websocket.watch.state === 'live' && runs.sse.watch.state === 'live'", timeout=WAIT_MS
    )
    async with (
        aiohttp.ClientSession(served.url) as session,
        session.delete(f"/v1/jobs/{job}") as response,
    ):
        assert response.status == 204
    await page.wait_for_function(
        "runs.websocket.watch.state === 'failed' && runs.sse.watch.state === 'failed'",
        timeout=WAIT_MS,
    )
    for transport in ("websocket", "sse"):
        got = await page.evaluate(
            f"({{events: runs.{transport}.events, errors: runs.{transport}.errors,"
            f" resumes: runs.{transport}.watch.resumes}})"
        )
        assert got == {"events": [1, 2], "errors": [["job_deleted", True]], "resumes": 0}
    assert page.errors == []
    await page.close()


async def test_a_feed_folds_a_restored_databases_job_epochs(tmp_path: Path, browser: Any) -> None:
    """After ``jobfeed restore`` a job's epoch ends with the database's generation: the
    snapshot watchFeed folds from a job's created event carries it, as the server's does
    (the created event alone does not name the generation; the feed's hello does)."""
    with launching(tmp_path) as launcher:
        first = await launcher.start(**SETTINGS)
        first.kill(signal.SIGTERM)
        assert await first.wait_async(30) == 0
        backup = tmp_path / "backup.db"
        for command in (["backup", str(backup)], ["restore", str(backup)]):
            done = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "server",
                *command,
                env={**os.environ, "JOBFEED_STORAGE__PATH": str(launcher.db_path)},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(done.communicate(), 60)
            assert done.returncode == 0, stderr.decode()
        restored = Served(launcher, await launcher.start(**SETTINGS))
        page = await open_page(browser, restored)
        await page.evaluate(
            """async ({backoff}) => {
              const m = await import("/client/jobfeed.js");
              const got = window.got = {snapshots: {}};
              got.watch = m.watchFeed("/v1/feed", {
                backoff,
                onEvent: (event, snapshot) => { got.snapshots[event.job_id] = snapshot; },
              });
            }""",
            {"backoff": BACKOFF},
        )
        await page.wait_for_function("got.watch.state === 'live'", timeout=WAIT_MS)
        job = "mod-restored"
        async with aiohttp.ClientSession(restored.url) as session:
            await create(session, job)
            await append(session, job, {"type": "progress", "progress": 50})
            expected = await snapshot(session, job)
        await page.wait_for_function(f"got.snapshots[{job!r}]?.last_seq === 2", timeout=WAIT_MS)
        folded = await page.evaluate(f"got.snapshots[{job!r}]")
        feed_epoch = await page.evaluate("got.watch.epoch")
        await page.evaluate("got.watch.stop()")
        assert page.errors == []
        await page.close()
    assert feed_epoch.startswith("g1-"), feed_epoch
    assert expected["epoch"].endswith(f"-{feed_epoch}"), expected["epoch"]
    assert folded == expected
