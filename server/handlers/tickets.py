"""``POST /v1/tickets``: a short-lived, read-only stream ticket for a browser (auth.md,
"Stream tickets"). A backend holding a token asks; the page gets only the ticket, for
``?ticket=`` on GET requests. Never more than the asking token: its tenant, at most its
grants (narrowed by ``jobs``), only ``jobs:read``, and never past its ``exp``."""

from __future__ import annotations

import time
from typing import Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..auth import ADMIN, READ, require, rfc3339
from ..errors import Forbidden, InvalidJson, ValidationFailed
from ..grants import MAX_SELECTORS, BadSelector, JobGrants
from ..keys import AUTH
from ..models import field_errors
from .request import json_response, read_json


class TicketIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    jobs: list[str] | None = Field(None, max_length=MAX_SELECTORS)
    scope: Literal["jobs:read"] = "jobs:read"  # a ticket grants only jobs:read
    sub: str | None = Field(None, min_length=1, max_length=200)


async def create_ticket(request: web.Request) -> web.Response:
    principal = require(request, READ)
    body = await read_json(request, allow_empty=True)
    if not isinstance(body, dict):
        raise InvalidJson("the body must be a JSON object")
    try:
        spec = TicketIn.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed("the ticket request is not valid", field_errors(exc)) from None
    grants = principal.grants
    if spec.jobs is not None:
        try:
            asked = JobGrants.parse(spec.jobs)
        except BadSelector as exc:
            detail = {"loc": ["jobs"], "msg": str(exc), "type": "selector"}
            raise ValidationFailed("the ticket request is not valid", [detail]) from None
        if grants is not None and not grants.covers_all_of(asked):
            raise Forbidden("the ticket would grant jobs this credential does not")
        grants = asked
    sub = principal.sub
    if spec.sub is not None and spec.sub != principal.sub:
        if not principal.allows(ADMIN):
            raise Forbidden(f"only a {ADMIN} credential mints tickets for another sub")
        sub = spec.sub
    ticket, exp = request.app[AUTH].mint_ticket(principal, grants, sub, time.time())
    body_out = {"ticket": ticket, "expires_at": rfc3339(exp)}
    return json_response(orjson.dumps(body_out), status=201)
