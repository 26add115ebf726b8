"""``Event.from_body``: what a body must be to become an event, and what each rejection says."""

from __future__ import annotations

import pickle

import orjson
import pytest

from lacuna_webhooks.errors import InvalidJSON, InvalidPayload
from lacuna_webhooks.models import MAX_ID_LENGTH, MAX_JSON_DEPTH, MAX_TYPE_LENGTH, Event
from tests.conftest import make_event


def test_valid_event_keeps_raw_bytes_and_fields() -> None:
    """A valid body gives id, type, created, the task fields, and ``raw`` byte for byte."""
    payload = make_event("evt_1", created=1763731200, task_id="cm42")
    raw = orjson.dumps(payload)
    event = Event.from_body(raw)
    assert event.id == "evt_1"
    assert event.type == "job.completed"
    assert event.created == 1763731200
    assert event.raw == raw
    assert event.task_id == "cm42"
    assert event.task_status == "ready"
    assert event.payload == payload


def test_unknown_fields_and_types_are_kept() -> None:
    """New fields and an unknown event type pass through untouched."""
    raw = b'{"id":"evt_2","type":"job.paused","future":{"x":[1,2]},"data":{"id":"cm1","new":1}}'
    event = Event.from_body(raw)
    assert event.type == "job.paused"
    assert event.payload["future"] == {"x": [1, 2]}
    assert event.data["new"] == 1
    assert event.created is None


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b'{"id": "evt_1",', b"\xff\xfe{}", b'{"id":"\xc3\x28","type":"t"}'],
    ids=["empty", "text", "truncated", "bom-like-bytes", "invalid-utf8-in-string"],
)
def test_non_json_or_non_utf8_is_invalid_json(raw: bytes) -> None:
    """Bodies that are not UTF-8 JSON raise ``InvalidJSON``."""
    with pytest.raises(InvalidJSON):
        Event.from_body(raw)


@pytest.mark.parametrize("raw", [b"[]", b'"evt_1"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_invalid_json(raw: bytes) -> None:
    """A JSON array, string, number, null or boolean is not an event."""
    with pytest.raises(InvalidJSON, match="object"):
        Event.from_body(raw)


@pytest.mark.parametrize(
    ("opener", "closer"), [(b"[", b"]"), (b'{"a":', b"}"), (b"[", b"")], ids=["list", "obj", "open"]
)
def test_deeply_nested_json_is_invalid_json_not_recursion_error(
    opener: bytes, closer: bytes
) -> None:
    """100000 levels of nesting are refused as ``InvalidJSON`` (never ``RecursionError``)."""
    raw = b'{"id":"evt_1","type":"t","data":' + opener * 100_000 + b"1" + closer * 100_000 + b"}"
    with pytest.raises(InvalidJSON):
        Event.from_body(raw)


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"type": "job.completed"}, "id"),
        ({"id": None, "type": "job.completed"}, "id"),
        ({"id": 12, "type": "job.completed"}, "id"),
        ({"id": "", "type": "job.completed"}, "id"),
        ({"id": "   ", "type": "job.completed"}, "id"),
        ({"id": ["evt_1"], "type": "job.completed"}, "id"),
        ({"id": "evt_1"}, "type"),
        ({"id": "evt_1", "type": 3}, "type"),
        ({"id": "evt_1", "type": ""}, "type"),
        ({"id": "evt_1", "type": {"name": "x"}}, "type"),
    ],
)
def test_missing_or_ill_typed_id_or_type_names_the_field(
    payload: dict[str, object], param: str
) -> None:
    """A missing, empty or non-string ``id``/``type`` raises ``InvalidPayload`` naming it."""
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(orjson.dumps(payload))
    assert caught.value.param == param
    assert caught.value.status_code == 400


def test_id_at_the_length_limit_is_accepted_and_beyond_refused() -> None:
    """``id`` may be ``MAX_ID_LENGTH`` characters long, not one more."""
    assert Event.from_body(orjson.dumps({"id": "e" * MAX_ID_LENGTH, "type": "t"})).id
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(orjson.dumps({"id": "e" * (MAX_ID_LENGTH + 1), "type": "t"}))
    assert caught.value.param == "id"


def test_overlong_type_is_refused() -> None:
    """A ``type`` longer than ``MAX_TYPE_LENGTH`` raises ``InvalidPayload`` naming ``type``."""
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(orjson.dumps({"id": "evt_1", "type": "t" * (MAX_TYPE_LENGTH + 1)}))
    assert caught.value.param == "type"


@pytest.mark.parametrize("created", ["1763731200", 1.5, True, None, [1], {"t": 1}])
def test_ill_typed_created_is_ignored(created: object) -> None:
    """A ``created`` that is not an integer (booleans included) becomes ``None``."""
    event = Event.from_body(orjson.dumps({"id": "evt_1", "type": "t", "created": created}))
    assert event.created is None


@pytest.mark.parametrize(
    "data",
    [None, "cm1", [], {"id": 5, "status": 3}, {"id": "", "status": ""}],
)
def test_task_fields_absent_when_data_is_unusable(data: object) -> None:
    """``task_id``/``task_status`` are ``None`` unless ``data`` holds non-empty strings."""
    event = Event.from_body(orjson.dumps({"id": "evt_1", "type": "t", "data": data}))
    assert event.task_id is None
    assert event.task_status is None


def _nested(depth: int) -> bytes:
    """An event whose ``x`` holds lists nested so that the whole body is ``depth`` deep."""
    inner = depth - 1
    return b'{"id":"evt_n","type":"a","x":' + b"[" * inner + b"]" * inner + b"}"


def test_nesting_up_to_max_json_depth_is_accepted_and_deeper_is_invalid_json() -> None:
    """MAX_JSON_DEPTH levels (the top-level object is one) pass; one more is ``InvalidJSON``
    (400), so no accepted event is too deep for orjson to write or pickle to copy."""
    assert Event.from_body(_nested(MAX_JSON_DEPTH)).id == "evt_n"
    with pytest.raises(InvalidJSON, match=f"deeper than {MAX_JSON_DEPTH} levels"):
        Event.from_body(_nested(MAX_JSON_DEPTH + 1))
    # Many containers side by side are not depth.
    wide = b'{"id":"evt_w","type":"a","x":[' + b",".join([b'{"a":[]}'] * 500) + b"]}"
    assert Event.from_body(wide).id == "evt_w"
    # Brackets inside strings do not count as nesting.
    quoted = b'{"id":"evt_q","type":"a","x":"' + b"[" * 500 + b'"}'
    assert Event.from_body(quoted).id == "evt_q"


def test_event_pickles_as_its_raw_bytes_at_any_depth() -> None:
    """An event crosses processes (SQLite writer, handler workers) by pickle; a stored body
    nested 1000 levels survives the round trip with every field equal."""
    event = Event.from_stored(_nested(1000))
    copy = pickle.loads(pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: S301
    assert (copy.id, copy.type, copy.raw, copy.created) == (
        event.id,
        event.type,
        event.raw,
        event.created,
    )
    # (== on 1000-deep lists would itself recurse too far: compare the parsed shape's ends)
    assert copy.payload.keys() == event.payload.keys()
    assert isinstance(copy.payload["x"], list)


@pytest.mark.parametrize(
    "event_id", ["evt_1\n", " evt_1", "evt_1\u00a0", "evt\t1", "evt_\x7f", "evt_\x9b1"]
)
def test_a_padded_or_controlled_id_is_refused_not_trimmed(event_id: str) -> None:
    """Whitespace around an id, or a control character (C0, DEL, C1) in it, is a 400 naming
    ``id``: trimmed or not, it would be a dedupe key beside ``evt_1``'s."""
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(orjson.dumps({"id": event_id, "type": "job.completed"}))
    assert caught.value.param == "id"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"id": "cm42\n"}, "data.id"),
        ({"id": " cm42"}, "data.id"),
        ({"id": "cm\u009b42"}, "data.id"),
        ({"id": "cm42", "tracks": [{"id": "t1"}, {"id": "t2\r\n"}]}, "data.tracks[1].id"),
        ({"id": "cm42", "tracks": [{"id": "\u2028t1"}]}, "data.tracks[0].id"),
    ],
)
def test_a_padded_task_or_track_id_is_refused_naming_it(
    data: dict[str, object], param: str
) -> None:
    """The task id keys the task's state and a track id names its file: the same rule."""
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(orjson.dumps({"id": "evt_1", "type": "job.completed", "data": data}))
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"id": "evt_1\u200b"}, "id", 0x200B),  # zero-width space: shown as "evt_1"
        ({"id": "evt_\u202e1cba"}, "id", 0x202E),  # right-to-left override: shown reversed
        ({"id": "evt_\u2066x\u2069"}, "id", 0x2066),  # isolate
        ({"id": "\ufeffevt_1"}, "id", 0xFEFF),  # a BOM inside the JSON string
        ({"id": "evt_1\U000e0041"}, "id", 0xE0041),  # a tag character
        ({"id": "evt_1", "data": {"id": "cm\u200d42"}}, "data.id", 0x200D),
        (
            {"id": "evt_1", "data": {"id": "cm", "tracks": [{"id": "t\u20291"}]}},
            "data.tracks[0].id",
            0x2029,
        ),
    ],
)
def test_an_id_with_invisible_or_bidi_characters_is_refused_naming_it(
    body: dict[str, object], param: str, code: int
) -> None:
    """An id is a key every listing shows: one holding a character that displays as nothing
    or reorders what follows (Trojan Source) would be a second key shown as, or disguised
    as, another. A 400 naming the field and the character."""
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(orjson.dumps({"type": "job.completed", **body}))
    assert caught.value.param == param
    assert f"U+{code:04X}" in str(caught.value)


def test_ids_inside_are_kept_exactly_and_odd_tracks_are_left_to_the_readers() -> None:
    """Inner spaces and non-ASCII are fine; a non-string track id, a track that is not an
    object or ``tracks`` that is not a list are not checked here (``parse_event`` reads them)."""
    data = {"id": "cm 42 é", "tracks": [{"id": 7}, "x", {"id": "t 1"}]}
    event = Event.from_body(orjson.dumps({"id": "evt 1 ü", "type": "job.completed", "data": data}))
    assert (event.id, event.task_id) == ("evt 1 ü", "cm 42 é")
    assert Event.from_body(orjson.dumps({"id": "e", "type": "t", "data": {"tracks": "x"}}))


def test_a_stored_body_with_a_padded_id_still_reads_back() -> None:
    """Bodies stored before the id rule (``Event.from_stored``: what the store reads back)
    parse as they are: a claimed delivery whose event no longer parsed would fail."""
    body = {
        "id": "evt_1\n",
        "type": "job.completed",
        "data": {"id": " cm", "tracks": [{"id": "t "}]},
    }
    event = Event.from_stored(orjson.dumps(body))
    assert (event.id, event.task_id) == ("evt_1\n", " cm")
