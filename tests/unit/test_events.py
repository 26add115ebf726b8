"""lacuna_webhooks.events: typed, frozen models; strict where readers depend, lenient elsewhere."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lacuna_webhooks import MalformedEvent, PermanentError
from lacuna_webhooks.errors import InvalidJSON, InvalidPayload
from lacuna_webhooks.events import (
    GenerationTask,
    JobCompleted,
    JobFailed,
    ProviderError,
    Track,
    UnknownEvent,
    is_job_completed,
    is_job_failed,
    parse_event,
)
from lacuna_webhooks.models import Event
from tests.conftest import make_event

# The SPEC §1 test vector's body: the provider's own job.completed example.
SPEC_BODY = (
    b'{"id":"evt_1QmZ8xLacuna0001","object":"event","type":"job.completed","created":1763731200,'
    b'"data":{"id":"cm123abc","object":"music.generation","status":"ready","title":"Late Night '
    b'Study","style":"lofi hip hop, mellow piano, 70 bpm","instrumental":true,"tracks":[{"id":'
    b'"trk_01","audio_url":"https://cdn.lacuna.example/tracks/trk_01.mp3","duration":182.4,'
    b'"lyrics":null}]}}'
)


def as_event(payload: dict[str, Any]) -> Event:
    return Event.from_body(orjson.dumps(payload))


def test_the_spec_example_reads_fully_typed() -> None:
    """The SPEC's job.completed example: every documented field lands in its typed place."""
    typed = parse_event(Event.from_body(SPEC_BODY))
    assert is_job_completed(typed)
    assert not is_job_failed(typed)
    assert (typed.id, typed.type, typed.created, typed.object) == (
        "evt_1QmZ8xLacuna0001",
        "job.completed",
        1763731200,
        "event",
    )
    assert typed.data == GenerationTask(
        id="cm123abc",
        object="music.generation",
        status="ready",
        title="Late Night Study",
        style="lofi hip hop, mellow piano, 70 bpm",
        instrumental=True,
        tracks=(
            Track(
                id="trk_01",
                audio_url="https://cdn.lacuna.example/tracks/trk_01.mp3",
                duration_seconds=182.4,
            ),
        ),
    )
    assert (typed.task_id, typed.task_status, typed.task_title) == (
        "cm123abc",
        "ready",
        "Late Night Study",
    )


def test_a_failed_job_reads_its_error_envelope() -> None:
    """job.failed: data.error is a ProviderError, credits_refunded a number."""
    typed = parse_event(as_event(make_event(event_type="job.failed")))
    assert is_job_failed(typed)
    assert not is_job_completed(typed)
    assert typed.data.error == ProviderError(
        type="api_error", code="provider_error", message="Upstream failure."
    )
    assert typed.data.credits_refunded == 10
    assert typed.data.tracks == ()


def test_unknown_fields_stay_reachable() -> None:
    """Fields the models do not know are kept, at every level, in ``extra``."""
    payload = make_event(mood="calm", error=None)
    payload["livemode"] = False
    payload["data"]["tracks"][0]["bpm"] = 70
    payload["data"]["tracks"][0]["stems"] = {"vocals": "https://x.example/v.wav"}
    typed = parse_event(as_event(payload))
    assert isinstance(typed, JobCompleted)
    assert typed.extra == {"livemode": False}
    assert typed.data.extra == {"mood": "calm"}
    assert typed.data.tracks[0].extra == {"bpm": 70, "stems": {"vocals": "https://x.example/v.wav"}}
    assert typed.payload["livemode"] is False
    with pytest.raises(TypeError):
        typed.extra["livemode"] = True  # type: ignore[index]  # read-only view


def test_models_are_frozen_and_hashable() -> None:
    typed = parse_event(as_event(make_event()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.id = "evt_other"  # type: ignore[misc]
    assert hash(typed) == hash(parse_event(as_event(make_event(event_id=typed.id))))


def test_an_unknown_type_is_an_unknown_event_with_its_data() -> None:
    """A type this version does not model is kept whole, not refused."""
    typed = parse_event(as_event(make_event(event_type="job.started", progress=40)))
    assert isinstance(typed, UnknownEvent)
    assert typed.type == "job.started"
    assert typed.data["progress"] == 40
    assert typed.problem is None
    assert typed.task_id == "cm123abc"


def test_parse_accepts_a_plain_mapping() -> None:
    """Code that verified a request itself can pass the parsed JSON object."""
    typed = parse_event(make_event(event_id="evt_map"))
    assert isinstance(typed, JobCompleted)
    assert typed.id == "evt_map"


@pytest.mark.parametrize(
    ("change", "param", "reason"),
    [
        ({"data": None}, "data", "data is missing"),
        ({"data": [1, 2]}, "data", "data is not an object"),
        ({"data": {"id": "cm1"}}, "data.tracks", "data.tracks is missing"),
        ({"data": {"tracks": {"0": {}}}}, "data.tracks", "is not a list"),
        ({"data": {"tracks": []}}, "data.tracks", "is empty"),
        ({"data": {"tracks": ["trk"]}}, "data.tracks[0]", "is not an object"),
        ({"data": {"tracks": [{"audio_url": "https://a"}]}}, "data.tracks[0].id", "is missing"),
        (
            {"data": {"tracks": [{"id": "t", "audio_url": "  "}]}},
            "data.tracks[0].audio_url",
            "not a non-empty string",
        ),
        (
            {"data": {"tracks": [{"id": "t", "audio_url": "https://a"}, {"id": 7}]}},
            "data.tracks[1].id",
            "not a non-empty string",
        ),
    ],
)
def test_a_completed_job_without_usable_tracks_is_malformed(
    change: dict[str, Any], param: str, reason: str
) -> None:
    """What readers depend on is strict: MalformedEvent (a PermanentError) naming the field."""
    payload = {**make_event(event_id="evt_bad"), **change}
    with pytest.raises(MalformedEvent, match=reason) as caught:
        parse_event(as_event(payload))
    assert caught.value.param == param
    assert isinstance(caught.value, PermanentError)
    assert "evt_bad" in str(caught.value)


def test_lenient_parsing_turns_a_malformed_known_type_into_an_unknown_event() -> None:
    """strict=False (for readers that only log): the problem is told, nothing raised."""
    typed = parse_event(as_event(make_event(tracks=[])), strict=False)
    assert isinstance(typed, UnknownEvent)
    assert not is_job_completed(typed)
    assert typed.type == "job.completed"
    assert typed.problem is not None
    assert "data.tracks is empty" in typed.problem


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"type": "job.completed"}, "id"),
        ({"id": "", "type": "job.completed"}, "id"),
        ({"id": 12, "type": "job.completed"}, "id"),
        ({"id": "evt_1"}, "type"),
        ({"id": "evt_1", "type": ["job.completed"]}, "type"),
    ],
)
def test_id_and_type_are_required(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(MalformedEvent) as caught:
        parse_event(payload)
    assert caught.value.param == param


@pytest.mark.parametrize(
    "value",
    ["NaN", "Infinity", "-1", "182.4", True, None, -1, -0.5, float("nan"), float("inf"), 10**400],
)
def test_odd_durations_read_as_none(value: Any) -> None:
    """Lenient fields: wrong types, NaN-like strings, negative, non-finite or huge → None."""
    payload = make_event(tracks=[{"id": "t", "audio_url": "https://a", "duration": value}])
    typed = parse_event(payload)
    assert isinstance(typed, JobCompleted)
    assert typed.data.tracks[0].duration_seconds is None


def test_huge_but_finite_numbers_are_kept() -> None:
    payload = make_event(
        tracks=[{"id": "t", "audio_url": "https://a", "duration": 10**300}],
        credits_refunded=1e308,
    )
    payload["created"] = 2**70
    completed = parse_event(payload)
    assert isinstance(completed, JobCompleted)
    assert completed.data.tracks[0].duration_seconds == float(10**300)
    assert completed.created is None  # beyond 64-bit Unix seconds
    failed = parse_event({**payload, "type": "job.failed"})
    assert isinstance(failed, JobFailed)
    assert failed.data.credits_refunded == 1e308


def test_wrongly_typed_optional_fields_read_as_none() -> None:
    payload = make_event(
        event_type="job.failed",
        title=["x"],
        style={"a": 1},
        instrumental="yes",
        status=3,
        error={"code": 500, "message": "  ", "type": None, "param": ["p"]},
        credits_refunded="10",
    )
    payload["created"] = "1763731200"
    typed = parse_event(payload)
    assert isinstance(typed, JobFailed)
    assert typed.created is None
    data = typed.data
    assert (data.title, data.style, data.instrumental, data.status) == (None, None, None, None)
    assert data.error == ProviderError()
    assert data.credits_refunded is None


def test_an_error_given_as_a_string_is_its_message() -> None:
    typed = parse_event(make_event(event_type="job.failed", error="quota exceeded"))
    assert isinstance(typed, JobFailed)
    assert typed.data.error == ProviderError(message="quota exceeded")


# --- hostile input: nothing but MalformedEvent, ever -------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: a Python caller can pass them
    | st.text(max_size=20)
    | st.sampled_from(["NaN", "Infinity", "-1e999", "", " ", "\n", "job.completed"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["id", "type", "data", "tracks", "audio_url", "duration", "error", "code", "x"]
            )
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
tracks = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "audio_url": json_values,
            "duration": json_values,
            "lyrics": json_values,
            "title": json_values,
            "format": json_values,
        },
    )
    | json_values,
    max_size=4,
)
events = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | json_values,
        "type": st.sampled_from(["job.completed", "job.failed", "job.started"]) | json_values,
        "created": json_values,
        "object": json_values,
        "data": st.fixed_dictionaries(
            {},
            optional={
                "id": json_values,
                "tracks": tracks | json_values,
                "error": json_values,
                "credits_refunded": json_values,
                "title": json_values,
                "instrumental": json_values,
            },
        )
        | json_values,
    },
)


def _check(typed: Any) -> None:
    assert isinstance(typed.id, str)
    assert typed.id.strip()
    if isinstance(typed, JobCompleted):
        assert typed.data.tracks
        for track in typed.data.tracks:
            assert isinstance(track.id, str)
            assert isinstance(track.audio_url, str)
            d = track.duration_seconds
            assert d is None or (isinstance(d, float) and math.isfinite(d) and d >= 0)


@settings(max_examples=200, deadline=None)
@given(events)
def test_hostile_values_raise_nothing_but_malformed_event(payload: dict[str, Any]) -> None:
    """Wrong types, missing fields, huge numbers, NaN-like strings, nested junk: the result
    is a typed event honouring its guarantees, or MalformedEvent; never anything else."""
    for strict in (True, False):
        try:
            typed = parse_event(payload, strict=strict)
        except MalformedEvent as exc:
            param = exc.param
        else:
            _check(typed)
            continue
        assert param in {"id", "type", "data"} or str(param).startswith("data.")


@settings(max_examples=100, deadline=None)
@given(events)
def test_hostile_bodies_through_event_from_body(payload: dict[str, Any]) -> None:
    """The same through the real path: bytes as orjson parses them into a stored Event."""
    try:
        body = orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError):
        return  # NaN or an int beyond 64 bits: no such body can arrive
    try:
        event = Event.from_body(body)
    except (InvalidJSON, InvalidPayload):
        return  # intake refuses it with a 400 before any reader runs
    with contextlib.suppress(MalformedEvent):
        _check(parse_event(event))


def test_deeply_nested_junk_is_not_walked() -> None:
    """Unknown fields are kept as given, not copied deeply: no recursion limit to hit."""
    junk: Any = []
    for _ in range(100_000):
        junk = [junk]
    typed = parse_event(make_event(junk=junk))
    assert isinstance(typed, JobCompleted)
    assert typed.data.extra["junk"] is junk
