"""Rate and ETA where users look, in a real Chromium against a real ``jobfeed serve``: the
``<jobfeed-progress>`` card (text and aria-valuetext), the dashboard's ETA column and the job
page; and the card's own fold (clients/js/jobfeed.js) keeping the server's numbers live.

The jobs' first events are written into the database before the server starts, with chosen
timestamps (as the writer would have stored them, snapshots by the server's reducer), so the
estimate on screen is known exactly without waiting for the clock.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from server.migrate import apply_migrations
from server.snapshot import JobState, apply_event, progress_in_context
from tests.procs import Launcher, launching
from tests.test_browser import CHROMIUM, WAIT_MS
from tests.test_browser_client import (
    SETTINGS,
    SHOTS,
    Served,
    append,
    chromium,
    open_page,
    snapshot,
)

pytestmark = [
    pytest.mark.process,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (.ci/run installs it)"
    ),
]

# An hour ago: the server's own appends come later, as they would.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
# job_id -> (kind, [(seconds after T0, event fields)]): 100 rows in 10 s of 520 = 10/s, 42 s
# left; a job reporting only percentages (no rate, an ETA); one finished (no estimate).
JOBS: dict[str, tuple[str, list[tuple[float, dict[str, Any]]]]] = {
    "etl-7": (
        "etl",
        [
            (1, {"type": "progress", "current": 0, "total": 520, "phase": "load"}),
            (11, {"type": "progress", "current": 100, "message": "rows 1-100"}),
        ],
    ),
    "render-2": (
        "render",
        [(1, {"type": "progress", "progress": 10}), (5, {"type": "progress", "progress": 30})],
    ),
    "done-1": (
        "etl",
        [
            (1, {"type": "progress", "current": 0, "total": 4}),
            (3, {"type": "progress", "current": 4}),
            (4, {"type": "completed"}),
        ],
    ),
}


def stamp(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def write_jobs(db: Path) -> None:
    """The JOBS as the writer stores them: events, and each job's folded snapshot."""
    apply_migrations(db)
    event_id = 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for job_id, (kind, body) in JOBS.items():
            state: JobState | None = None
            timed = [(0.0, {"type": "created", "kind": kind}), *body]
            for seq, (seconds, fields) in enumerate(timed, start=1):
                event_id += 1
                if state is not None and fields["type"] == "progress":
                    fields = progress_in_context(fields, state)  # as the writer stores it
                event = {"job_id": job_id, "seq": seq, "id": event_id, "ts": stamp(seconds)}
                state = apply_event(state, {**event, **fields})
                event.update(fields)
                conn.execute(
                    "INSERT INTO events (id, tenant, job_id, seq, type, ts, key, body)"
                    " VALUES (?, 'default', ?, ?, ?, ?, NULL, ?)",
                    (
                        event_id,
                        job_id,
                        seq,
                        event["type"],
                        event["ts"],
                        orjson.dumps(event).decode(),
                    ),
                )
            assert state is not None
            conn.execute(
                "INSERT INTO jobs (tenant, job_id, kind, status, last_seq, created_at, updated_at,"
                " finished_at, snapshot) VALUES ('default', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    kind,
                    state.status,
                    state.last_seq,
                    state.created_at,
                    state.updated_at,
                    state.finished_at,
                    state.to_json().decode(),
                ),
            )


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with launching(tmp_path_factory.mktemp("jobfeed")) as launcher:
        yield launcher


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(launcher: Launcher) -> Served:
    write_jobs(launcher.db_path)
    return Served(launcher, await launcher.start(**SETTINGS))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    async with chromium(tmp_path_factory.mktemp("profile"), width=1100, height=520) as context:
        yield context


def format_span(seconds: float) -> str:
    """server/static/ui/common.js's formatSpan of ceil(seconds), for what fits in an hour."""
    whole = math.ceil(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m {whole % 60:02}s"


async def test_dashboard_and_job_page_show_the_servers_estimate(
    served: Served, browser: Any
) -> None:
    """The dashboard's ETA column shows each running job's eta_seconds (with its rate below
    when it has one), blank for finished jobs; the job page lists Started, Time left and
    Rate. (Before the card's test appends to etl-7.)"""
    async with aiohttp.ClientSession(served.url) as session:
        estimates = {job: await snapshot(session, job) for job in JOBS}
    page = await browser.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    await page.goto(f"{served.url}/ui/")
    await page.wait_for_selector("#jobs tbody tr[data-job=etl-7]", timeout=WAIT_MS)
    assert (estimates["etl-7"]["rate"], estimates["etl-7"]["eta_seconds"]) == (10.0, 42.0)
    eta_cell = page.locator("#jobs tr[data-job=etl-7] .eta")
    assert await eta_cell.inner_text() == "~42s\n10/s"
    render_eta = estimates["render-2"]["eta_seconds"]
    render_cell = page.locator("#jobs tr[data-job=render-2] .eta")
    assert await render_cell.inner_text() == f"~{format_span(render_eta)}"
    assert await page.locator("#jobs tr[data-job=done-1] .eta").inner_text() == ""
    await page.locator("main").screenshot(path=str(SHOTS / "jobfeed-dashboard-eta.png"))

    await page.goto(f"{served.url}/ui/jobs/render-2")
    facts = page.locator("#facts")
    await facts.get_by_text("Time left").wait_for(timeout=WAIT_MS)
    text = await facts.inner_text()
    assert f"Started\n{estimates['render-2']['started_at']}" in text, text
    assert "Time left\n~0:14" in text, text
    assert "Rate\n—" in text, text  # percentages only: no rate in units
    await page.screenshot(path=str(SHOTS / "jobfeed-job-eta.png"))
    assert page.errors == []
    await page.close()


async def test_the_card_shows_time_left_and_rate_and_follows_the_server(
    served: Served, browser: Any
) -> None:
    """A running job's card says "0:42 left · 10/s" (the server's estimate: 100 rows in
    10 s, 420 left) and its aria-valuetext says it in words; a job with only percentages
    shows time left without a rate; a finished job shows neither. A new event moves the
    card's estimate to exactly the server's snapshot (the module folds it the same way)."""
    async with aiohttp.ClientSession(served.url) as session:
        stored = await snapshot(session, "etl-7")
    assert (stored["rate"], stored["eta_seconds"]) == (10.0, 42.0)
    cards = "".join(f'<jobfeed-progress job="{job}"></jobfeed-progress>' for job in JOBS)
    page = await open_page(browser, served, f"<body>{cards}</body>", "/client/progress.js")
    etl = page.locator("jobfeed-progress[job=etl-7]")
    render = page.locator("jobfeed-progress[job=render-2]")
    done = page.locator("jobfeed-progress[job=done-1]")
    await etl.locator("[role=progressbar][aria-valuenow='19.2']").wait_for(timeout=WAIT_MS)
    await done.locator("[role=progressbar][aria-valuenow='100']").wait_for(timeout=WAIT_MS)
    await render.locator("[role=progressbar][aria-valuenow='30']").wait_for(timeout=WAIT_MS)
    assert await etl.locator("[part=eta]").inner_text() == "0:42 left · 10/s"
    assert await etl.get_by_role("progressbar").get_attribute("aria-valuetext") == (
        "19 percent, about 42 seconds left, 10 per second, load, rows 1-100"
    )
    # 20 points in 4 s: 5 %/s, 70 % left.
    assert await render.locator("[part=eta]").inner_text() == "0:14 left"
    assert await done.locator("[part=eta]").inner_text() == ""
    assert (
        await page.evaluate("document.querySelector('jobfeed-progress[job=etl-7]').snapshot")
        == stored
    )
    await page.locator("body").screenshot(path=str(SHOTS / "jobfeed-progress-eta.png"))

    # Live, an hour later by the server's clock: 60 more rows, the rate decays, the ETA grows.
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, "etl-7", {"type": "progress", "current": 160})
        live = await snapshot(session, "etl-7")
    await etl.locator("[role=progressbar][aria-valuenow='30.8']").wait_for(timeout=WAIT_MS)
    assert live["rate"] < 1
    assert live["eta_seconds"] > 42
    assert (
        await page.evaluate("document.querySelector('jobfeed-progress[job=etl-7]').snapshot")
        == live
    )
    assert "left · " in await etl.locator("[part=eta]").inner_text()
    assert page.errors == []
    await page.close()
