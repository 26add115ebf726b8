"""Unstorable events: every body ``Event.from_body`` accepts is storable, byte for byte, on
every backend, and one that fails anyway never fails the events committed with it (issue 9).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lacuna_webhooks.errors import InvalidJSON, InvalidPayload
from lacuna_webhooks.models import Event
from lacuna_webhooks.store import Store

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)

# Strings as a sender may escape them: NUL, lone surrogates (json.dumps writes them as \ud800
# escapes), astral characters, and long ones.
_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.sampled_from(["\x00", "\ud800", "\udfff", "a", "é", "\U0001f600"])),
    st.text(min_size=200, max_size=3000),
)
_number = st.one_of(
    st.integers(),
    st.sampled_from([2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 10**11 + 1, 10**40, -1, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_scalar = st.one_of(_text, _number, st.booleans(), st.none())
_nested = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


_field = st.one_of(_scalar, _nested)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A JSON object shaped like an event, any field possibly odd, serialized as a sender may."""
    data: dict[str, Any] = {"id": draw(_field), "status": draw(_field)}
    data.update(draw(st.dictionaries(_text, _field, max_size=3)))
    if draw(st.booleans()):
        data["tracks"] = _deep(draw(st.integers(min_value=1, max_value=300)))
    body: dict[str, Any] = {
        "id": draw(st.one_of(st.just("evt_"), _text, _field)),
        "type": draw(st.one_of(st.just("job.completed"), _text, _field)),
        "created": draw(_field),
        "data": data,
    }
    if isinstance(body["id"], str) and draw(st.booleans()):
        body["id"] = f"evt_{body['id']}"
    body.update(draw(st.dictionaries(_text, _field, max_size=3)))
    return json.dumps(body, ensure_ascii=True).encode()


def _examples(count: int) -> list[bytes]:
    """``count`` bodies drawn by hypothesis (collected first: the store lives on this test's
    event loop, which a ``@given`` coroutine would not share)."""
    found: list[bytes] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(bodies())
    def collect(body: bytes) -> None:
        found.append(body)

    collect()
    return found


async def test_every_accepted_body_is_stored_byte_exact(store: Store) -> None:
    """Each generated body is either refused by ``Event.from_body`` (``InvalidJSON`` or
    ``InvalidPayload`` naming a field) or accepted, stored and read back with its raw bytes
    exact, its derived columns as parsed, and claimable; accepted concurrently, so SQLite
    group-commits them together."""
    accepted: dict[str, bytes] = {}
    refused_params: set[str | None] = set()
    for body in _examples(150):
        try:
            event = Event.from_body(body)
        except InvalidJSON:
            continue
        except InvalidPayload as exc:
            refused_params.add(exc.param)
            continue
        accepted.setdefault(event.id, body)
    assert refused_params <= {"id", "type", "created", "data.id", "data.status"}
    assert accepted, "the generator should produce some valid events"
    events = [Event.from_body(body) for body in accepted.values()]
    results = await asyncio.gather(*(store.accept(e, ["a"], now=NOW) for e in events))
    assert all(results)
    for event in events:
        stored = await store.get_event(event.id)
        assert stored is not None
        assert stored.raw == event.raw
        assert stored.created == event.created
        assert stored.task_id == event.task_id
        assert stored.to_event() == event
    claimed = await store.claim(handler="a", limit=len(events), lease=timedelta(minutes=5), now=NOW)
    assert {d.event.raw for d in claimed} == set(accepted.values())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            b'{"id":"evt_big","type":"job.completed","created":9223372036854775808,"data":{}}',
            "created",
        ),
        (b'{"id":"evt_u64","type":"t","created":18446744073709551615}', "created"),
        (b'{"id":"evt_\\u0000","type":"job.completed"}', "id"),
        (b'{"id":"evt_1","type":"job\\u0000"}', "type"),
        (b'{"id":"evt_1","type":"t","data":{"id":"cm\\u0000"}}', "data.id"),
        (b'{"id":"evt_1","type":"t","data":{"id":"' + b"c" * 256 + b'"}}', "data.id"),
        (b'{"id":"evt_1","type":"t","data":{"id":"cm1","status":"ready\\u0000"}}', "data.status"),
    ],
)
def test_unstorable_values_are_refused_naming_the_field(body: bytes, param: str) -> None:
    """A value no backend can hold in its column is a 400 ``invalid_payload`` with its field."""
    with pytest.raises(InvalidPayload) as caught:
        Event.from_body(body)
    assert caught.value.param == param


def test_values_only_in_raw_are_kept() -> None:
    """Odd values outside the derived columns pass: they live only in ``raw``. A ``created``
    that is not an integer is ignored (orjson reads integers beyond 64 bits as floats, so
    these are too), and a non-string ``data.id`` means no task."""
    body = (
        b'{"id":"evt_ok","type":"t","created":1.5e300,"note":"a\\u0000b",'
        b'"n":123456789012345678901234567890,"data":{"id":7,"status":null}}'
    )
    event = Event.from_body(body)
    assert event.raw == body
    assert event.created is None
    assert Event.from_body(b'{"id":"e","type":"t","created":-9223372036854775809}').created is None
    assert event.task_id is None
    assert event.task_status is None
