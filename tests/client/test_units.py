"""The client's pure parts: backoff with full jitter, the SSE parser, the error mapping, the
CLI's rendering of a snapshot's rate and ETA."""

from __future__ import annotations

import itertools
import math
import random

import jwt
from hypothesis import given
from hypothesis import strategies as st

from jobfeed_client.backoff import Backoff, RetryPolicy, parse_retry_after
from jobfeed_client.credentials import refresh_delay, token_expiry
from jobfeed_client.errors import (
    Forbidden,
    InvalidRequest,
    JobDeleted,
    JobNotFound,
    LogReset,
    StreamClosed,
    Unauthorized,
    error_from_body,
    error_from_close,
)
from jobfeed_client.sse import Record, SSEParser


@given(
    failures=st.integers(0, 40),
    retry_after=st.none() | st.floats(0, 120),
    seed=st.integers(0, 2**32),
)
def test_backoff_draws_within_the_window_and_never_before_retry_after(
    failures: int, retry_after: float | None, seed: int
) -> None:
    """Full jitter: the n-th delay is uniform in [Retry-After, Retry-After + min(cap, base*2^n)]."""
    policy = RetryPolicy(base=0.5, cap=8.0)
    backoff = Backoff(policy, failures=failures, rng=random.Random(seed))
    delay = backoff.next_delay(retry_after)
    floor = retry_after or 0.0
    assert floor <= delay <= floor + min(8.0, 0.5 * 2**failures)
    assert backoff.failures == failures + 1


def test_backoff_reset_starts_the_window_over() -> None:
    """After a success, the next failure waits within the first window again."""
    backoff = Backoff(RetryPolicy(base=1.0, cap=64.0), rng=random.Random(1))
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None


STREAM = (
    b'event: hello\ndata: {"type":"hello"}\n\n'
    b": heartbeat\n\n"
    b'id: 1\ndata: {"seq":1}\n\n'
    b'event: progress\r\nid: 2\r\ndata: {"seq":2}\r\n\r\n'
    b"retry: 1500\rdata: a\rdata: b\r\r\n"
)
EXPECTED = [
    Record("hello", '{"type":"hello"}', None),
    Record("", '{"seq":1}', "1"),
    Record("progress", '{"seq":2}', "2"),
    Record("", "a\nb", None),
]


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_sse_parser_is_indifferent_to_chunk_boundaries(cuts: list[int]) -> None:
    """However the bytes are split (CRLF split in two included), the same records come out."""
    bounds = [0, *sorted(cuts), len(STREAM)]
    parser = SSEParser()
    records = [r for a, b in itertools.pairwise(bounds) for r in parser.feed(STREAM[a:b])]
    assert records == EXPECTED
    assert parser.retry_seconds == 1.5


def test_http_errors_map_to_their_classes() -> None:
    """Each protocol error code (or, lacking one, the status) has its exception class."""
    body = {"error": {"code": "validation_error", "message": "bad", "details": [{"loc": ["x"]}]}}
    error = error_from_body(422, body)
    assert isinstance(error, InvalidRequest)
    assert error.details == [{"loc": ["x"]}]
    assert isinstance(error_from_body(409, {"error": {"code": "log_reset"}}), LogReset)
    assert isinstance(error_from_body(404, "not json"), JobNotFound)
    assert isinstance(error_from_body(401, None), Unauthorized)


def test_final_close_codes_map_to_their_classes() -> None:
    """4004, 4400, 4401, 4403, 4409, 4410 raise typed errors; others a StreamClosed."""
    cases = {
        4004: JobNotFound,
        4400: InvalidRequest,
        4401: Unauthorized,
        4403: Forbidden,
        4409: LogReset,
        4410: JobDeleted,
        1009: StreamClosed,
    }
    for code, cls in cases.items():
        error = error_from_close(code, None)
        assert type(error) is cls, code
        assert error.status == code
    framed = error_from_close(4409, {"code": "log_reset", "message": "epoch differs"})
    assert framed.message == "epoch differs"


def test_token_expiry_reads_a_jwts_exp_without_verifying() -> None:
    """``exp`` from any JWT's payload (signature unchecked); None for a ticket or garbage."""
    token = jwt.encode({"exp": 1796000000, "tenant": "acme"}, "x" * 32, algorithm="HS256")
    assert token_expiry(token) == 1796000000.0
    assert token_expiry(jwt.encode({"tenant": "acme"}, "x" * 32, algorithm="HS256")) is None
    assert token_expiry("not.a.jwt") is None
    assert token_expiry("opaque-ticket") is None
    assert token_expiry(None) is None


@given(left=st.floats(-10, 100_000))
def test_refresh_delay_is_before_the_expiry_and_at_most_30_s_ahead(left: float) -> None:
    """A stream refreshes a third of the way before ``exp``, never more than 30 s ahead, and
    at once when the token is already (nearly) expired."""
    delay = refresh_delay(1000.0 + left, 1000.0)
    assert delay >= 0.0
    if left <= 0:
        assert delay == 0.0
    else:
        ahead = left - delay  # how long before the expiry it refreshes
        assert math.isclose(ahead, min(30.0, left / 3), rel_tol=1e-9, abs_tol=1e-6)


def test_tail_shows_the_servers_estimate_of_a_running_job() -> None:
    """``jobfeed tail``'s bar shows eta_seconds and rate as the browser
    card does ("0:42 left · 10/s"), slow rates per minute or hour, nothing when the job is
    not running or the server has no estimate."""
    from jobfeed_client import Snapshot
    from jobfeed_client.cli import estimate_text, format_eta, format_rate

    def snapshot(status: str, **estimate: float) -> Snapshot:
        return Snapshot("j", None, status, 3, "t", "t", **estimate)  # type: ignore[arg-type]

    assert estimate_text(snapshot("running", rate=10.0, eta_seconds=42.0)) == "0:42 left · 10/s"
    assert estimate_text(snapshot("running", eta_seconds=0.2)) == "0:01 left"
    assert estimate_text(snapshot("running", rate=0.5)) == "30/min"
    assert estimate_text(snapshot("running")) == ""
    assert estimate_text(snapshot("completed", rate=1.0, eta_seconds=1.0)) == ""
    assert [format_eta(s) for s in (0, 151, 3900, 200_000)] == ["0:00", "2:31", "1:05:00", "2 days"]
    assert [format_rate(r) for r in (0, 12.345, 1234.5, 0.01)] == [
        "0/s",
        "12.3/s",
        "1,234/s",
        "36/h",
    ]
