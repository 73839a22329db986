"""The browser's side of jobfeed, served by jobfeed itself with no build step: the ES module
and the ``<jobfeed-progress>`` element at ``/client/`` (clients/js, also the npm package), and
the dashboard at ``/ui/`` (server/static/ui) and its counts (``/ui/counts.json``).
``GET /`` redirects to the dashboard.

The files ship in the wheel as package data (``server.static.client`` is a symlink to
clients/js, as ``server.migrations`` is to migrations/). They are read once, at the first
request, and answered from memory with an ETag; only the names listed here are served.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import orjson
from aiohttp import web

from ..auth import READ, require
from ..errors import NotFound
from ..keys import STORE
from ..models import JOB_STATUSES
from .jobs import parse_prefix
from .request import json_response

# What /client/ serves: the module, the element, their types (npm's package.json lists the
# same files).
CLIENT_FILES = (
    "jobfeed.js",
    "jobfeed.d.ts",
    "progress.js",
    "progress.d.ts",
    # Imports "react" by its bare name: for bundlers, or a page with an import map.
    "react.js",
    "react.d.ts",
)
# The dashboard's own files; every job page is the same document (job.html reads its id from
# the URL).
UI_FILES = ("index.html", "job.html", "dashboard.js", "job.js", "ui.css", "common.js")
_TYPES = {
    ".js": "text/javascript",
    ".ts": "text/plain",  # a .d.ts is read by people and tools, never run by a browser
    ".css": "text/css",
    ".html": "text/html",
}


def is_public(path: str) -> bool:
    """The pages and scripts need no credential (auth.md): they hold no data, and a browser
    cannot put a token on a navigation or a ``<script src>``. What they fetch does
    (``/v1/...``, and ``/ui/counts.json``, the one JSON answer here)."""
    if path.endswith(".json"):
        return False
    return path in ("/", "/ui", "/ui/") or path.startswith(("/ui/", "/client/"))


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


@cache
def static_file(package: str, name: str) -> StaticFile:
    body = resources.files(package).joinpath(name).read_bytes()
    content_type = next(t for suffix, t in _TYPES.items() if name.endswith(suffix))
    etag = hashlib.sha256(body).hexdigest()[:20]
    return StaticFile(body, content_type, f'"{etag}"')


def _answer(request: web.Request, package: str, name: str) -> web.Response:
    found = static_file(package, name)
    # no-cache: revalidated on every load (an upgraded server's files are seen at once),
    # answered 304 while unchanged.
    headers = {"ETag": found.etag, "Cache-Control": "no-cache"}
    if found.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=found.body, content_type=found.content_type, charset="utf-8", headers=headers
    )


async def client_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in CLIENT_FILES:
        raise NotFound(f"no client file {name[:80]!r}; there are {', '.join(CLIENT_FILES)}")
    return _answer(request, "server.static.client", name)


async def ui_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in UI_FILES:
        raise NotFound(f"no dashboard file {name[:80]!r}")
    return _answer(request, "server.static.ui", name)


async def dashboard(request: web.Request) -> web.Response:
    return _answer(request, "server.static.ui", "index.html")


async def job_page(request: web.Request) -> web.Response:
    return _answer(request, "server.static.ui", "job.html")


async def job_counts(request: web.Request) -> web.Response:
    """``/ui/counts.json?kind=&prefix=``: jobs per status, for the dashboard's counts (one
    GROUP BY over the jobs table; the dashboard asks again, at most every few seconds, while
    the feed shows jobs changing)."""
    principal = require(request, READ)  # the credential's own jobs, as GET /v1/jobs lists them
    kind = request.query.get("kind") or None
    counts = await request.app[STORE].count_jobs(
        principal.tenant, kind, parse_prefix(request), principal.grants
    )
    body = {"counts": {status: counts.get(status, 0) for status in JOB_STATUSES}}
    return json_response(orjson.dumps(body))


async def to_dashboard(request: web.Request) -> web.Response:
    """``/`` and ``/ui`` to ``/ui/``, with the query (the dashboard's filters) kept."""
    query = request.query_string
    raise web.HTTPFound(f"/ui/?{query}" if query else "/ui/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", to_dashboard)
    app.router.add_get("/ui", to_dashboard)
    app.router.add_get("/ui/", dashboard)
    app.router.add_get("/ui/jobs/{job_id}", job_page)
    app.router.add_get("/ui/counts.json", job_counts)
    app.router.add_get("/ui/{name}", ui_file)
    app.router.add_get("/client/{name}", client_file)
