"""``server.appends``: the acknowledgement's bytes, formatted by hand for one new event,
are orjson's serialization of the same answer, for any job id (escapes, any Unicode)."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from server.appends import ack_frame, append_ack
from server.writer import AppendedEvent, AppendResult, utc_now

ids = st.integers(min_value=1, max_value=2**63 - 1)


def reference(result: AppendResult) -> bytes:
    return orjson.dumps(
        {
            "job_id": result.job_id,
            "last_seq": result.last_seq,
            "events": [event.to_dict() for event in result.events],
        }
    )


@given(job_id=st.text(min_size=1, max_size=200), seq=ids, event_id=ids)
def test_a_single_event_ack_is_orjsons_bytes(job_id: str, seq: int, event_id: int) -> None:
    result = AppendResult(job_id, seq, [AppendedEvent(seq, event_id, utc_now())])
    assert append_ack(result) == reference(result)
    framed = orjson.loads(ack_frame(7, append_ack(result)))
    assert framed == {"type": "ack", "ref": 7, **orjson.loads(reference(result))}


def test_duplicates_and_batches_are_orjsons_too() -> None:
    ts = utc_now()
    duplicate = AppendResult("j", 3, [AppendedEvent(3, 9, ts, duplicate=True)], True)
    batch = AppendResult("j", 5, [AppendedEvent(4, 10, ts), AppendedEvent(5, 11, ts)])
    for result in (duplicate, batch):
        assert append_ack(result) == reference(result)
