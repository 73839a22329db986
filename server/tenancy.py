"""Tenants: the ``JobKey`` that names a job inside the server, and the tenant name rules.

A client names a job by its ``job_id``; the tenant comes from its credential (``server.auth``)
and never from the URL. Inside the server a job is ``JobKey(tenant, job_id)``: the writer's
cache, the hub's channels, the per-job stream slots and every storage read are keyed by it,
so two tenants' ``build-42`` are two jobs that share nothing. Event bodies and snapshots
carry only the public ``job_id``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# With authentication off, everything belongs to this tenant (auth.md, "Model").
DEFAULT_TENANT = "default"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class JobKey(NamedTuple):
    """One job of one tenant. A tuple: cheap to hash, compare and build on the hot path."""

    tenant: str
    job_id: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.job_id}"
