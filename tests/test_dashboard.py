"""The dashboard (/ui/, server/static/ui) in a real Chromium against a real ``jobfeed serve``
with 10,000 jobs: the first page of the table, the counts by status, rows that move live as
jobs progress and new jobs that appear, the quiet highlight, the filters (status, kind, id
prefix) as URLs, paging, and a job's page with its live timeline, card, NDJSON download and
``jobfeed tail`` command.

One Chromium and one server for the module (tests/test_browser_client.py has the helpers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.procs import Launcher, launching
from tests.test_browser import CHROMIUM, WAIT_MS
from tests.test_browser_client import SETTINGS, SHOTS, Served, append, chromium, create

pytestmark = [
    pytest.mark.process,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (.ci/run installs it)"
    ),
]

BULK_JOBS = 10_000
BULK_CONCURRENCY = 32


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    with launching(tmp_path_factory.mktemp("jobfeed")) as launcher:
        yield launcher


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(launcher: Launcher) -> Served:
    """A server holding BULK_JOBS queued jobs of kind "bulk" (created over HTTP, 32 at a
    time), then a handful of jobs in every state, created last so they head the list."""
    served = Served(launcher, await launcher.start(**SETTINGS))
    async with aiohttp.ClientSession(served.url) as session:
        slots = asyncio.Semaphore(BULK_CONCURRENCY)

        async def bulk(n: int) -> None:
            async with slots:
                await create(session, f"bulk-{n:05d}", kind="bulk")

        await asyncio.gather(*(bulk(n) for n in range(BULK_JOBS)))
        for job_id, kind in (
            ("build-41", "build"),
            ("deploy-3", "deploy"),
            ("import-9", "import"),
            ("report-7", "report"),
            ("build-42", "build"),
        ):
            await create(session, job_id, kind=kind)
        await append(session, "build-41", {"type": "completed", "result": {"artifacts": 3}})
        await append(
            session,
            "deploy-3",
            {"type": "failed", "error": {"message": "health check timed out", "code": "timeout"}},
        )
        await append(
            session,
            "import-9",
            {"type": "log", "message": "waiting for a lock", "level": "warning"},
        )
        await append(session, "report-7", {"type": "progress", "progress": 80, "phase": "render"})
        await append(
            session,
            "build-42",
            {"type": "progress", "current": 3, "total": 8, "phase": "compile", "message": "cc"},
        )
    return served


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    async with chromium(tmp_path_factory.mktemp("profile"), width=1100, height=640) as context:
        yield context


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page(browser: Any, served: Served) -> AsyncIterator[Any]:
    """The one page the module's tests share, its uncaught errors in ``page.errors``."""
    page = await browser.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    assert page.errors == []
    await page.close()


async def rows(page: Any) -> list[str]:
    ids: list[str] = await page.eval_on_selector_all(
        "#jobs tbody tr", "rows => rows.map(row => row.dataset.job)"
    )
    return ids


async def count(page: Any, status: str) -> str:
    text: str = await page.locator(f"#counts [data-status={status}] .chip-count").inner_text()
    return text


async def test_table_counts_and_live_updates(served: Served, page: Any) -> None:
    """/ shows the newest 50 jobs and the counts over all 10,005; a progress event moves its
    row, a new job appears at the top and in the counts, all without a reload; a running job
    that reports nothing for the quiet threshold is highlighted."""
    started = time.monotonic()
    await page.goto(f"{served.url}/?quiet=1")
    await page.wait_for_selector("#jobs tbody tr[data-job=build-42]", timeout=WAIT_MS)
    await page.wait_for_selector("#live[data-state=live]", timeout=WAIT_MS)
    print(f"first page of {BULK_JOBS + 5} jobs: {time.monotonic() - started:.2f} s")
    assert page.url == f"{served.url}/ui/?quiet=1"
    shown = await rows(page)
    assert len(shown) == 50
    assert shown[:5] == ["build-42", "report-7", "import-9", "deploy-3", "build-41"]
    await page.wait_for_selector("#counts [data-status=all]", timeout=WAIT_MS)
    assert await count(page, "all") == f"{BULK_JOBS + 5:,}"
    assert await count(page, "running") == "3"
    assert await count(page, "failed") == "1"
    assert not await page.locator("#older").is_disabled()

    row = page.locator("tr[data-job=report-7]")
    assert await row.locator(".pct").inner_text() == "80%"
    async with aiohttp.ClientSession(served.url) as session:
        await append(session, "report-7", {"type": "progress", "progress": 90, "message": "p9"})
        await page.wait_for_selector("tr[data-job=report-7] .pct:text-is('90%')", timeout=WAIT_MS)
        assert await row.locator(".detail").inner_text() == "render · p9"
        await create(session, "build-43", kind="build")
        await page.wait_for_selector("#jobs tbody tr:first-child[data-job=build-43]")
        await page.wait_for_selector(
            f"#counts [data-status=all] .chip-count:text-is('{BULK_JOBS + 6:,}')", timeout=WAIT_MS
        )
        # build-42 says nothing more: quiet after a second.
        await page.wait_for_selector("tr.quiet[data-job=build-42]", timeout=WAIT_MS)
        await page.screenshot(path=str(SHOTS / "jobfeed-dashboard.png"))
        # A longer threshold (no timing involved): nothing running is quiet for an hour.
        await page.fill("#filters input[name=quiet]", "3600")
        await page.press("#filters input[name=quiet]", "Enter")
        await page.wait_for_url("**/ui/?quiet=3600", timeout=WAIT_MS)
        await page.wait_for_function(
            "document.querySelectorAll('tr.quiet').length === 0", timeout=WAIT_MS
        )
        await append(session, "build-42", {"type": "progress", "current": 5})
        await page.wait_for_selector("tr[data-job=build-42] .pct:text-is('62%')", timeout=WAIT_MS)


async def test_filters_are_urls_and_pages_walk_the_list(served: Served, page: Any) -> None:
    """Status (also by its count), kind and id prefix narrow the table and the counts, each
    a URL whose JSON twin is /v1/jobs with the same query; Older and Newer walk the pages."""
    await page.goto(f"{served.url}/ui/")
    await page.wait_for_selector("#jobs tbody tr", timeout=WAIT_MS)
    await page.select_option("#filters select[name=status]", "failed")
    await page.wait_for_url("**/ui/?status=failed", timeout=WAIT_MS)
    await page.wait_for_function(
        "[...document.querySelectorAll('#jobs tbody tr')].map(r => r.dataset.job).join() "
        "=== 'deploy-3'",
        timeout=WAIT_MS,
    )
    assert await page.get_attribute("#json-twin", "href") == "/v1/jobs?limit=50&status=failed"

    await page.click("#counts [data-status=all]")
    await page.wait_for_url("**/ui/", timeout=WAIT_MS)
    await page.fill("#filters input[name=kind]", "build")
    await page.press("#filters input[name=kind]", "Enter")  # commits the field: "change"
    await page.wait_for_url("**/ui/?kind=build", timeout=WAIT_MS)
    # build-41 and build-42, and build-43 when the test before this one made it.
    await page.wait_for_function(
        "(() => { const ids = [...document.querySelectorAll('#jobs tbody tr')]"
        ".map(r => r.dataset.job); return ids.at(-1) === 'build-41' "
        "&& ids.every(id => id.startsWith('build-')); })()",
        timeout=WAIT_MS,
    )
    shown = await rows(page)
    await page.wait_for_selector(
        f"#counts [data-status=all] .chip-count:text-is('{len(shown)}')", timeout=WAIT_MS
    )

    # 100 jobs: two pages, in the list's order (newest first; the bulk jobs were created 32
    # at a time, so that is not the order of their names): the pages the API gives.
    newer, older = await api_pages(served, "bulk-099")
    assert sorted(newer + older) == [f"bulk-0{n}" for n in range(9900, 10000)]
    await page.goto(f"{served.url}/ui/?prefix=bulk-099")
    await page.wait_for_selector(f"#jobs tbody tr[data-job={newer[-1]}]", timeout=WAIT_MS)
    assert await page.input_value("#filters input[name=prefix]") == "bulk-099"
    assert await rows(page) == newer
    assert await page.locator("#newer").is_disabled()
    await page.click("#older")
    await page.wait_for_selector(f"#jobs tbody tr[data-job={older[-1]}]", timeout=WAIT_MS)
    assert await rows(page) == older
    assert await page.locator("#older").is_disabled()
    await page.click("#newer")
    await page.wait_for_selector(f"#jobs tbody tr[data-job={newer[-1]}]", timeout=WAIT_MS)
    assert await page.locator("#newer").is_disabled()
    await page.go_back()  # the browser's own history walks the pages too
    await page.wait_for_selector(f"#jobs tbody tr[data-job={older[-1]}]", timeout=WAIT_MS)


async def api_pages(served: Served, prefix: str) -> tuple[list[str], list[str]]:
    """The first two pages of 50 that GET /v1/jobs lists for ``prefix`` (job ids)."""
    pages: list[list[str]] = []
    cursor: str | None = None
    async with aiohttp.ClientSession(served.url) as session:
        for _ in range(2):
            params = {"prefix": prefix, "limit": "50", **({"cursor": cursor} if cursor else {})}
            async with session.get("/v1/jobs", params=params) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
            pages.append([job["job_id"] for job in body["jobs"]])
            cursor = body["next_cursor"]
    assert cursor is None
    return pages[0], pages[1]


async def test_job_page_timeline_follows_the_job(served: Served, page: Any) -> None:
    """A job's page (reached from its row) shows its events as a timeline, adds new ones
    live with their level and data, ends with the result on the card, offers the log as
    NDJSON and a ``jobfeed tail`` command for a terminal."""
    await page.goto(f"{served.url}/ui/?kind=report")
    await page.click("tr[data-job=report-7] a")
    await page.wait_for_url("**/ui/jobs/report-7", timeout=WAIT_MS)
    await page.wait_for_selector("#timeline tr[data-seq='3']", timeout=WAIT_MS)
    assert await page.locator("#tail-command").inner_text() == (
        f"jobfeed tail report-7 --url {served.url}"
    )
    async with aiohttp.ClientSession(served.url) as session:
        await append(
            session,
            "report-7",
            {"type": "log", "message": "slow page", "level": "warning", "data": {"page": 9}},
            {"type": "completed", "result": {"pages": 10}, "message": "rendered"},
        )
    await page.wait_for_selector("#timeline tr[data-seq='5']", timeout=WAIT_MS)
    types = await page.eval_on_selector_all(
        "#timeline tbody tr", "rows => rows.map(row => row.dataset.type)"
    )
    assert types == ["created", "progress", "progress", "log", "completed"]
    log_row = page.locator("#timeline tr[data-seq='4']")
    assert await log_row.locator(".level").inner_text() == "warning"
    assert await log_row.locator(".message").inner_text() == "slow page"
    await log_row.locator("summary").click()
    assert '"page": 9' in await log_row.locator("pre").inner_text()
    card = page.locator("jobfeed-progress[job=report-7]")
    await card.locator("[role=progressbar][aria-valuenow='100']").wait_for(timeout=WAIT_MS)
    await page.wait_for_selector("#live:text-is('finished')", timeout=WAIT_MS)
    assert '"pages": 10' in await card.locator("[part=outcome]").inner_text()
    await page.screenshot(path=str(SHOTS / "jobfeed-job-page.png"), full_page=True)

    async with page.expect_download() as download_info:
        await page.click("#download")
    download = await download_info.value
    assert download.suggested_filename == "report-7.ndjson"
    saved = Path(await download.path())
    lines = (await asyncio.to_thread(saved.read_text)).splitlines()
    assert [line.count('"seq"') for line in lines] == [1] * 5
