"""Job grants (``server.grants``) and the tenant grant of streams that span jobs
(``server.auth.TenantGrant``): what a credential's ``jobs`` selectors cover, how a ticket may
narrow them, and the SQL that selects the same rows as the Python check."""

from __future__ import annotations

import sqlite3

import pytest

from server.auth import Principal, TenantGrant
from server.frames import Frame
from server.grants import BadSelector, JobGrants

JOBS = ["build-1", "build-12", "build", "deploy-7", "deploy-70", "other", "b"]


def test_exact_ids_and_prefixes() -> None:
    grants = JobGrants.parse(["build-*", "deploy-7"])
    assert [job for job in JOBS if grants.covers(job)] == ["build-1", "build-12", "deploy-7"]
    assert all(JobGrants.parse(["*"]).covers(job) for job in JOBS)
    assert not any(JobGrants.parse([]).covers(job) for job in JOBS)


@pytest.mark.parametrize("selector", ["", "bad id", "a*b", "**", "x" * 200, 7, None])
def test_bad_selectors_are_refused(selector: object) -> None:
    with pytest.raises(BadSelector):
        JobGrants.parse([selector])


def test_narrowing_is_never_widening() -> None:
    """A ticket's selectors must be covered by the token's: ids by any selector, prefixes
    only by a shorter-or-equal prefix of theirs."""
    token = JobGrants.parse(["build-*", "deploy-7"])
    assert token.covers_all_of(JobGrants.parse(["build-1", "build-1*", "deploy-7"]))
    assert not token.covers_all_of(JobGrants.parse(["deploy-*"]))
    assert not token.covers_all_of(JobGrants.parse(["deploy-70"]))
    assert not token.covers_all_of(JobGrants.parse(["*"]))


@pytest.mark.parametrize(
    "selectors", [["build-*", "deploy-7"], ["*"], [], ["b*"], ["other", "b"], None]
)
def test_sql_selects_what_covers_selects(selectors: list[str] | None) -> None:
    """The SQL filter of a tenant grant selects exactly the rows its Python check permits,
    for the tenant's jobs, and none of another tenant's with the same ids."""
    principal = Principal(
        "acme",
        None,
        frozenset({"jobs:read"}),
        None if selectors is None else JobGrants.parse(selectors),
    )
    grant = TenantGrant(principal)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE events (tenant TEXT, job_id TEXT)")
    rows = [(tenant, job) for tenant in ("acme", "globex") for job in JOBS]
    conn.executemany("INSERT INTO events VALUES (?, ?)", rows)
    clause, params = grant.sql_filter("tenant", "job_id")
    selected = conn.execute(f"SELECT tenant, job_id FROM events WHERE {clause}", params)
    frames = {
        (tenant, job): Frame(job, 1, 1, "log", "t", b"{}", tenant=tenant) for tenant, job in rows
    }
    permitted = {row for row, frame in frames.items() if grant.permits(frame)}
    assert set(selected.fetchall()) == permitted
    assert all(tenant == "acme" for tenant, _ in permitted)
    assert not grant.everything


def test_grant_keys_tell_credentials_apart() -> None:
    def key(tenant: str, selectors: list[str] | None) -> str:
        grants = None if selectors is None else JobGrants.parse(selectors)
        return TenantGrant(Principal(tenant, None, frozenset(), grants)).key

    assert key("acme", ["b*", "a"]) == key("acme", ["a", "b*"])
    assert len({key("acme", None), key("globex", None), key("acme", ["a"])}) == 3
