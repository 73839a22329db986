"""Unit tests of ``server.models``: the wire models, ``parse_event`` and ``parse_append_body``.

These pin the type policy written at the top of models.py (strict types, integral floats as
integers, null as absent, unknown fields refused) and the exact ``loc`` of each field error,
without a server in the way.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.models import (
    CancelledIn,
    CompletedIn,
    CreateJobIn,
    CustomIn,
    FailedIn,
    LogIn,
    ProgressIn,
    field_errors,
    parse_append_body,
    parse_event,
)

MAX_EVENTS = 1000


def parsed(obj: Any) -> Any:
    """``parse_event`` at the top level, failing the test on field errors."""
    result = parse_event(obj, ())
    assert not isinstance(result, list), result
    return result


def errors_of(obj: Any, loc: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    result = parse_event(obj, loc)
    assert isinstance(result, list), result
    return result


def locs(errors: list[dict[str, Any]]) -> list[list[Any]]:
    return [error["loc"] for error in errors]


# -- parse_event: which model ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "model"),
    [
        ({"type": "progress", "progress": 1}, ProgressIn),
        ({"type": "log", "message": "m"}, LogIn),
        ({"type": "completed"}, CompletedIn),
        ({"type": "failed", "error": {"message": "m"}}, FailedIn),
        ({"type": "cancelled"}, CancelledIn),
        ({"type": "notification"}, CustomIn),
        ({"type": "stage_completed", "message": "m", "data": {}}, CustomIn),
    ],
)
def test_parse_event_picks_the_model_for_the_type(obj: dict[str, Any], model: type) -> None:
    """Each built-in type gets its own model; any other valid name is a custom event."""
    assert type(parsed(obj)) is model


@pytest.mark.parametrize("event_type", ["created", "hello", "heartbeat", "ping", "pong", "error"])
def test_reserved_types_are_refused(event_type: str) -> None:
    """Reserved words that are not appendable are refused on ``type`` as reserved_type."""
    (error,) = errors_of({"type": event_type}, ("events", 3))
    assert error["loc"] == ["events", 3, "type"]
    assert error["type"] == "reserved_type"


@pytest.mark.parametrize("event_type", ["Upper", "9lives", "a b", "x" * 65, "", "é"])
def test_custom_type_must_match_pattern(event_type: str) -> None:
    """A custom type must match ``^[a-z][a-z0-9_.-]{0,63}$``."""
    (error,) = errors_of({"type": event_type})
    assert error["loc"] == ["type"]


def test_custom_type_of_64_characters_is_accepted() -> None:
    """The longest custom type name (64 characters) is accepted."""
    assert parsed({"type": "a" * 64}).type == "a" * 64


@pytest.mark.parametrize("obj", [{}, {"type": None}, {"type": 3}, {"type": ["log"]}])
def test_missing_or_non_string_type_is_an_error_on_type(obj: dict[str, Any]) -> None:
    """An event without a string ``type`` has one error, at ``type``."""
    assert locs(errors_of(obj, (0,))) == [[0, "type"]]


@pytest.mark.parametrize("obj", [[], "log", 5, None, True])
def test_non_object_event_is_an_error_at_its_loc(obj: Any) -> None:
    """An event that is not a JSON object is one error at the event's own loc."""
    assert locs(errors_of(obj, ("events", 2))) == [["events", 2]]


# -- field types ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "loc"),
    [
        ({"type": "progress", "progress": "50"}, ["progress"]),
        ({"type": "progress", "progress": True}, ["progress"]),
        ({"type": "progress", "current": "3"}, ["current"]),
        ({"type": "progress", "current": True}, ["current"]),
        ({"type": "progress", "total": False}, ["total"]),
        ({"type": "progress", "current": 1.5}, ["current"]),
        ({"type": "log", "message": 5}, ["message"]),
        ({"type": "log", "message": b"bytes"}, ["message"]),
        ({"type": "log", "message": "m", "data": [1]}, ["data"]),
    ],
)
def test_types_are_strict(obj: dict[str, Any], loc: list[Any]) -> None:
    """No coercion: "50" is not a number, a bool is not an integer, 5 is not a string."""
    assert loc in locs(errors_of(obj))


@pytest.mark.parametrize("value", [885.0, 0.0, 2.0**53])
def test_integral_float_becomes_int(value: float) -> None:
    """An integral float is accepted for current/total and becomes an ``int``."""
    event = parsed({"type": "progress", "current": value, "total": value})
    assert event.current == int(value)
    assert type(event.current) is int
    assert type(event.total) is int


@pytest.mark.parametrize("value", [-1, 2**53 + 1, -0.5, math.inf, math.nan])
def test_counts_outside_range_are_refused(value: float) -> None:
    """current must be a finite integer in 0..2**53."""
    assert ["current"] in locs(errors_of({"type": "progress", "current": value}))


@pytest.mark.parametrize("value", [-0.001, 100.001, math.inf, -math.inf, math.nan])
def test_progress_outside_0_100_or_not_finite_is_refused(value: float) -> None:
    """progress is a finite number in 0..100."""
    assert ["progress"] in locs(errors_of({"type": "progress", "progress": value}))


@pytest.mark.parametrize("value", [0, 100, 0.0, 100.0, 37.5])
def test_progress_accepts_ints_and_floats_in_range(value: float) -> None:
    """progress takes JSON integers and floats, 0 and 100 included."""
    assert parsed({"type": "progress", "progress": value}).progress == value


def test_current_over_total_is_refused() -> None:
    """current > total is an error of the whole event (loc at the event)."""
    assert locs(errors_of({"type": "progress", "current": 8, "total": 7}, ("events", 0))) == [
        ["events", 0]
    ]


def test_current_equal_to_total_is_accepted() -> None:
    """current == total is fine (the job's last step)."""
    assert parsed({"type": "progress", "current": 7, "total": 7}).current == 7


def test_progress_needs_a_field() -> None:
    """A progress event with none of its fields is refused."""
    assert errors_of({"type": "progress"})


def test_progress_with_only_nulls_needs_a_field() -> None:
    """null means absent, so a progress event of nulls is as empty as one with no fields."""
    assert errors_of({"type": "progress", "progress": None, "phase": None})


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "log", "message": "m", "extra": 1},
        {"type": "notification", "progress": 5},
        {"type": "completed", "seq": 3},
        {"type": "failed", "error": {"message": "m", "stack": []}},
    ],
)
def test_unknown_fields_are_refused(obj: dict[str, Any]) -> None:
    """Unknown fields are refused, in events and in the failed event's error object."""
    assert errors_of(obj)


def test_log_needs_a_message() -> None:
    """A log event without a message is refused at ``message``."""
    assert ["message"] in locs(errors_of({"type": "log"}))


def test_log_level_must_be_known() -> None:
    """A log level outside debug/info/warning/error is refused at ``level``."""
    assert ["level"] in locs(errors_of({"type": "log", "message": "m", "level": "fatal"}))


def test_failed_needs_an_error_with_a_message() -> None:
    """failed needs ``error``, and the error needs its ``message``."""
    assert ["error"] in locs(errors_of({"type": "failed"}))
    assert ["error", "message"] in locs(errors_of({"type": "failed", "error": {"code": "E"}}))


@pytest.mark.parametrize("key", ["", "k" * 201, 5])
def test_key_must_be_a_string_of_1_to_200(key: Any) -> None:
    """``key`` is a string of 1..200 characters."""
    assert ["key"] in locs(errors_of({"type": "log", "message": "m", "key": key}))


def test_key_of_200_characters_is_accepted() -> None:
    """A key of exactly 200 characters is accepted."""
    assert parsed({"type": "log", "message": "m", "key": "k" * 200}).key == "k" * 200


def test_text_over_65536_characters_is_refused() -> None:
    """Text fields hold at most 65,536 characters."""
    assert ["message"] in locs(errors_of({"type": "log", "message": "x" * 65_537}))


# -- stored_fields -----------------------------------------------------------------------------


def test_stored_fields_drop_type_key_and_nulls() -> None:
    """An event's stored fields omit ``type``, ``key`` and every absent (or null) field."""
    event = parsed({"type": "progress", "progress": 5, "phase": None, "key": "k"})
    assert event.stored_fields() == {"progress": 5}


def test_stored_fields_keep_falsy_values() -> None:
    """Falsy values that are not null (0, "", {}, false) are stored."""
    event = parsed({"type": "completed", "result": False, "message": "", "data": {}})
    assert event.stored_fields() == {"result": False, "message": "", "data": {}}


def test_stored_fields_derive_progress_from_current_and_total() -> None:
    """Without progress and with total > 0, stored progress = 100*current/total."""
    event = parsed({"type": "progress", "current": 3, "total": 7})
    assert event.stored_fields() == {"progress": 100 * 3 / 7, "current": 3, "total": 7}


def test_stored_fields_keep_given_progress() -> None:
    """A given progress is stored as given, not replaced by the derived one."""
    event = parsed({"type": "progress", "progress": 1, "current": 1, "total": 2})
    assert event.stored_fields()["progress"] == 1


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "progress", "current": 0, "total": 0},
        {"type": "progress", "current": 5},
        {"type": "progress", "total": 5},
    ],
)
def test_stored_fields_do_not_derive_without_current_and_positive_total(
    obj: dict[str, Any],
) -> None:
    """progress is derived only with both current and a total > 0."""
    assert "progress" not in parsed(obj).stored_fields()


def test_log_stores_default_level() -> None:
    """A log event without level stores ``level: "info"``."""
    assert parsed({"type": "log", "message": "m"}).stored_fields() == {
        "message": "m",
        "level": "info",
    }


def test_failed_stores_error_without_nulls() -> None:
    """The failed event's error is stored without its absent parts."""
    event = parsed({"type": "failed", "error": {"message": "m", "code": None}})
    assert event.stored_fields() == {"error": {"message": "m"}}


def test_failed_stores_error_details() -> None:
    """The error's code and details (any JSON) are stored."""
    error = {"message": "m", "code": "E1", "details": [1, {"a": None}]}
    assert parsed({"type": "failed", "error": error}).stored_fields() == {"error": error}


def test_custom_stores_message_and_data() -> None:
    """A custom event stores its message and data."""
    event = parsed({"type": "notification", "message": "hi", "data": {"n": 1}})
    assert event.stored_fields() == {"message": "hi", "data": {"n": 1}}


# -- parse_append_body -------------------------------------------------------------------------


def test_append_body_single_event() -> None:
    """An object with ``type`` is one event."""
    events, errors = parse_append_body({"type": "log", "message": "m"}, MAX_EVENTS)
    assert errors == []
    assert [e.type for e in events] == ["log"]


def test_append_body_batch_keeps_order() -> None:
    """``{"events": [...]}`` is a batch, kept in order."""
    body = {"events": [{"type": "log", "message": str(i)} for i in range(5)]}
    events, errors = parse_append_body(body, MAX_EVENTS)
    assert errors == []
    assert [e.stored_fields()["message"] for e in events] == ["0", "1", "2", "3", "4"]


def test_append_body_with_events_and_type_is_a_single_event() -> None:
    """An object with both ``type`` and ``events`` is an event with an unknown field."""
    events, errors = parse_append_body({"type": "log", "message": "m", "events": []}, MAX_EVENTS)
    assert events == []
    assert ["events"] in locs(errors)


def test_append_body_batch_with_extra_field_is_refused() -> None:
    """A batch envelope holds only ``events``."""
    events, errors = parse_append_body({"events": [], "zz": 1, "aa": 2}, MAX_EVENTS)
    assert events == []
    assert locs(errors) == [["aa"]]


@pytest.mark.parametrize("items", [{}, "x", None, 3])
def test_append_body_events_must_be_a_list(items: Any) -> None:
    """``events`` must be an array."""
    assert locs(parse_append_body({"events": items}, MAX_EVENTS)[1]) == [["events"]]


def test_append_body_empty_batch_is_refused() -> None:
    """An empty batch is an error at ``events``."""
    events, errors = parse_append_body({"events": []}, MAX_EVENTS)
    assert events == []
    assert locs(errors) == [["events"]]


def test_append_body_batch_size_limit() -> None:
    """A batch holds at most ``max_events`` events; exactly that many is fine."""
    body = {"events": [{"type": "log", "message": "m"} for _ in range(4)]}
    assert locs(parse_append_body(body, 3)[1]) == [["events"]]
    assert len(parse_append_body(body, 4)[0]) == 4


def test_append_body_errors_carry_batch_index() -> None:
    """Field errors inside a batch are located at ``["events", index, field]``."""
    body = {
        "events": [
            {"type": "log", "message": "ok"},
            {"type": "progress", "progress": "50"},
            {"type": "log", "message": 5},
        ]
    }
    events, errors = parse_append_body(body, MAX_EVENTS)
    assert events == []
    assert locs(errors) == [["events", 1, "progress"], ["events", 2, "message"]]


def test_append_body_single_event_errors_have_no_prefix() -> None:
    """Field errors of a single event are located at the field itself."""
    _, errors = parse_append_body({"type": "progress", "progress": "50"}, MAX_EVENTS)
    assert locs(errors) == [["progress"]]


def test_append_body_same_key_twice_is_refused() -> None:
    """The same key twice in one batch is an error at the second one's key."""
    body = {
        "events": [
            {"type": "log", "message": "a", "key": "k"},
            {"type": "log", "message": "b", "key": "other"},
            {"type": "log", "message": "c", "key": "k"},
        ]
    }
    events, errors = parse_append_body(body, MAX_EVENTS)
    assert events == []
    assert locs(errors) == [["events", 2, "key"]]
    assert errors[0]["type"] == "duplicate_key"


def test_append_body_unkeyed_events_may_repeat() -> None:
    """Identical unkeyed events in one batch are all kept."""
    body = {"events": [{"type": "log", "message": "same"}] * 3}
    events, errors = parse_append_body(body, MAX_EVENTS)
    assert errors == []
    assert len(events) == 3


@pytest.mark.parametrize("body", [[{"type": "log", "message": "m"}], "log", None, 1])
def test_append_body_not_an_object_is_one_error_at_the_root(body: Any) -> None:
    """A body that is not an object is one error at loc ``[]``."""
    events, errors = parse_append_body(body, MAX_EVENTS)
    assert events == []
    assert locs(errors) == [[]]


# -- CreateJobIn and field_errors --------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["a", "A1", "build-42", "x:y.z_w-v", "0" * 128])
def test_create_job_accepts_valid_ids(job_id: str) -> None:
    """job_ids matching the protocol's pattern are accepted."""
    assert CreateJobIn.model_validate({"job_id": job_id}).job_id == job_id


@pytest.mark.parametrize("job_id", ["", "-a", "_a", "a b", "a/b", "0" * 129, "a\n"])
def test_create_job_refuses_invalid_ids(job_id: str) -> None:
    """job_ids outside the pattern (including a trailing newline) are refused."""
    with pytest.raises(ValidationError):
        CreateJobIn.model_validate({"job_id": job_id})


def test_create_job_all_fields_optional() -> None:
    """An empty object is a valid creation request."""
    spec = CreateJobIn.model_validate({})
    assert (spec.job_id, spec.kind, spec.metadata) == (None, None, None)


def test_field_errors_prefix_locs() -> None:
    """``field_errors`` puts the prefix before pydantic's loc and keeps msg and type."""
    with pytest.raises(ValidationError) as caught:
        CreateJobIn.model_validate({"kind": 5})
    (error,) = field_errors(caught.value, ("body",))
    assert error["loc"] == ["body", "kind"]
    assert isinstance(error["msg"], str)
    assert isinstance(error["type"], str)
    assert set(error) == {"loc", "msg", "type"}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
event_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["progress", "log", "completed", "failed", "cancelled", "note", "created", "X"]
        )
    },
    optional={
        name: json_values
        for name in (
            "progress",
            "phase",
            "message",
            "current",
            "total",
            "data",
            "level",
            "result",
            "error",
            "reason",
            "key",
            "extra",
        )
    },
)


@settings(max_examples=300, deadline=None)
@given(
    body=json_values
    | event_like
    | st.fixed_dictionaries({"events": st.lists(event_like, max_size=4)})
)
def test_any_json_body_gives_events_or_field_errors(body: Any) -> None:
    """For any JSON value, parse_append_body returns valid events or field errors (never an
    exception); valid events' stored fields serialize to JSON, with no null among them."""
    events, errors = parse_append_body(body, 1_000)
    assert bool(events) != bool(errors)
    for error in errors:
        assert isinstance(error["loc"], list)
        assert isinstance(error["msg"], str)
    for event in events:
        fields = event.stored_fields()
        assert None not in fields.values()
        orjson.dumps(fields)


# -- the fast path (check_event) against the models ----------------------------------------------

_TS = "2026-01-01T00:00:00.000000Z"
# Values at and around every bound the models hold: counts (0, 2**53), percent (0, 100), the
# 64-bit rule (only whole bodies reach it: see test_fast_path_whole_body_as_stored), string
# caps (key 200, text 65,536), integral floats, booleans, nulls.
_edge_numbers = st.sampled_from(
    [
        *(0, 1, 7, 100, 101, -1, 2**53, 2**53 + 1, 2**63 - 1, 2**64 - 1),
        *(0.0, -0.0, 3.0, 42.5, 100.0, 100.00000000000001, -0.5, 1e300),
        *(math.inf, -math.inf, math.nan, True, False),
    ]
)
_edge_texts = st.sampled_from(
    ["", "m", "k" * 200, "k" * 201, "x" * 65_536, "x" * 65_537, "é" * 3, "\x00", "0" * 20]
)
_edge_values = json_values | _edge_numbers | _edge_texts | st.just(None)
_types = (
    st.sampled_from(
        [
            *("progress", "log", "completed", "failed", "cancelled", "created", "heartbeat"),
            *("error", "note", "a", "stage_done", "a.b-c_1", "a" * 64, "a" * 65, "A", "1a"),
            *("", "note\n"),
        ]
    )
    | st.integers()
    | st.none()
)
_fast_event = st.fixed_dictionaries(
    {"type": _types},
    optional={
        **{
            name: _edge_values
            for name in ("progress", "phase", "message", "current", "total", "result", "reason")
        },
        "data": _edge_values | st.dictionaries(st.text(max_size=4), json_values, max_size=3),
        "level": st.sampled_from(["debug", "info", "warning", "error", "INFO", "", None, 1]),
        "key": st.sampled_from([None, "", "k", "k" * 200, "k" * 201, 5, "dup"]),
        "error": _edge_values | st.fixed_dictionaries({"message": _edge_texts}),
        "extra": _edge_values,
    },
)
_fast_body = _fast_event | st.fixed_dictionaries(
    {"events": st.lists(_fast_event | _edge_values, min_size=0, max_size=5)}
)


def _as_stored(event: Any) -> tuple[str, Any, bytes]:
    """What the writer stores of an event: its type, its key, and the serialized fields in
    their order (orjson tells 1 from 1.0 and keeps the order)."""
    return event.type, event.key, orjson.dumps(event.stored_fields())


@settings(max_examples=1500, deadline=None)
@given(body=_fast_body)
def test_fast_path_decides_as_the_models(body: Any) -> None:
    """parse_append_body with the fast path accepts exactly what the models alone accept,
    refuses with the same field errors, and gives each event the same type, key and stored
    fields (values, their types and their order)."""
    fast_events, fast_errors = parse_append_body(body, MAX_EVENTS)
    model_events, model_errors = parse_append_body(body, MAX_EVENTS, fast=False)
    assert fast_errors == model_errors
    assert [_as_stored(e) for e in fast_events] == [_as_stored(e) for e in model_events]


def _outside_int64(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_outside_int64(item) for item in value.values())
    if isinstance(value, list):
        return any(_outside_int64(item) for item in value)
    return type(value) is int and not -(2**63) <= value < 2**63


@settings(max_examples=300, deadline=None)
@given(body=_fast_body, big=st.sampled_from([2**63, 2**64, 2**64 + 5, -(2**63) - 1, 10**30]))
def test_fast_path_whole_body_as_stored(body: Any, big: int) -> None:
    """From the request's bytes to the stored event: the >64-bit integer rule (a body with one
    anywhere is refused before the events are looked at, whichever path follows), then the
    same stored event bytes, so the same size decision (limits.max_event_bytes) either way."""
    import json

    from server.errors import ValidationFailed
    from server.handlers.request import parse_json

    if isinstance(body, dict) and body and isinstance(body.get("data"), dict):
        body = {**body, "data": {**body["data"], "n": big}}
    try:
        raw = json.dumps(body, allow_nan=False).encode()
    except ValueError:
        return  # NaN or infinity: not JSON, never reaches the models
    try:
        parsed_body = parse_json(raw)
    except ValidationFailed:
        assert _outside_int64(body)
        return
    assert not _outside_int64(body)
    stored = []
    for fast in (True, False):
        events, errors = parse_append_body(parsed_body, MAX_EVENTS, fast=fast)
        stored.append(
            (
                errors,
                [
                    orjson.dumps(
                        {"job_id": "j", "seq": 1, "id": 1, "type": e.type, "ts": _TS}
                        | e.stored_fields()
                    )
                    for e in events
                ],
            )
        )
    assert stored[0] == stored[1]


def test_fast_path_takes_the_usual_events() -> None:
    """The events producers send all the time do not go through the models at all."""
    from server.models import CheckedEvent, check_event

    usual: list[dict[str, Any]] = [
        {"type": "progress", "progress": 42.5, "current": 3, "total": 7, "data": {"t": 1}},
        {"type": "progress", "progress": 50},
        {"type": "log", "message": "m", "key": "k1"},
        {"type": "log", "message": "m", "level": "warning"},
        {"type": "completed", "result": {"ok": True}},
        {"type": "cancelled", "reason": "r"},
        {"type": "stage_done", "message": "m", "data": {}},
    ]
    for event in usual:
        assert isinstance(check_event(event), CheckedEvent), event
    assert check_event({"type": "failed", "error": {"message": "m"}}) is None
    assert check_event({"type": "log", "message": "m", "level": None}) is None
