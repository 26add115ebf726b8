"""Faults a hostile tester found in the admin API (issue 13), each kept as the example of its
kind, over every store backend (``store`` fixture: memory, SQLite, SQLite with its writer
process, PostgreSQL): forged cursors out of range, NUL in stored body fields, event ids
holding ``/``, match paths past the bounds, and the dispatcher's failure count for every
handler. The store-level search rules (hostile keys, escapes, numbers) are in
test_store_contract.py."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest

from lacuna_webhooks.admin import create_admin_app
from lacuna_webhooks.admin.bodies import MAX_BODY_BYTES
from lacuna_webhooks.admin.filters import MAX_MATCH_DEPTH, MAX_MATCH_KEY
from lacuna_webhooks.dispatch.flow import FlowControl
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.models import Event
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store import Store
from tests.conftest import make_event
from tests.dispatching import FakeClock, make_dispatcher, running, wait_until
from tests.integration.test_admin_api import AUTH, admin_context, refused, seed


@pytest.fixture
async def client(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(admin_context(store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin/api/v1", headers=AUTH
    ) as c:
        yield c


# --- 1. forged cursors ---------------------------------------------------------------------


def forge(*parts: object) -> str:
    """A cursor as the service encodes one (URL-safe base64 of a JSON list), holding any
    numbers (orjson, which the service uses, cannot write integers past 64 bits)."""
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


BIG = 2**63  # one past the largest signed 64-bit integer
FORGED_CURSORS = [
    # Every arity a store makes (memory: [arrival]; SQLite: [epoch, rowid]; PostgreSQL:
    # [RFC 3339, seq]; deliveries: [id]), with numbers past 64 bits or below zero.
    forge(BIG),
    forge(2**64 + 5),
    forge(-1),
    forge(-(2**70)),
    forge(1.0e300),
    forge(1.0, BIG),
    forge(1.0, -1),
    forge(-1.0, 1),
    forge(1e300, 1),
    forge(BIG, 1),
    # SQLite's epoch times past year 9999 (read as "no cursor": the newest page, a 200).
    forge(BIG - 1, 10),
    forge(253_402_300_800.0, 1),
    forge("2026-11-30T12:00:00+00:00", BIG),
    forge("2026-11-30T12:00:00+00:00", -(2**63) - 1),
    forge("2026-11-30T12:00:00+00:00", -1),
    # Times whose UTC instant falls outside what a datetime holds.
    forge("0001-01-01T00:00:00+01:00", 1),
    forge("9999-12-31T23:59:59-01:00", 1),
    forge("2026-11-30T12:00:00+00:00\u0000", 1),
]


@pytest.mark.parametrize("route", ["/events", "/deliveries"])
async def test_forged_cursors_out_of_range_are_400(
    client: httpx.AsyncClient, store: Store, route: str
) -> None:
    """A cursor decoding to numbers past 64 bits or negative is a 400 naming `cursor` on
    every cursor-taking route and backend, never an integer overflow (500)."""
    await seed(store)
    for cursor in FORGED_CURSORS:
        refused(await client.get(route, params={"cursor": cursor}), 400, "cursor")
    # The service's own cursors still work.
    first = await client.get(route, params={"limit": "1"})
    cursor = first.json()["next_cursor"]
    assert cursor is not None
    assert (await client.get(route, params={"limit": "1", "cursor": cursor})).status_code == 200


# --- 2. NUL in stored text ------------------------------------------------------------------


async def test_nul_in_body_text_is_refused(client: httpx.AsyncClient, store: Store) -> None:
    """PostgreSQL text cannot hold NUL: any body string holding one (a value, nested, or a
    key) is a 400 naming the field, on every backend, and nothing is stored."""
    await seed(store)
    for body, param in [
        ({"reason": "Slack\u0000outage"}, "reason"),
        ({"reason": "\u0000"}, "reason"),
    ]:
        refused(await client.post("/handlers/hook/pause", json=body), 400, param)
    assert await store.paused_handlers() == {}
    refused(await client.post("/events/e1/replay", json={"handlers": ["a\u0000"]}), 400, "handlers")
    refused(await client.post("/deliveries/retry-dead", json={"handler": "\u0000"}), 400, "handler")
    refused(await client.post("/handlers/hook/resume", json={"x\u0000": 1}), 400, "x\u0000")
    ok = await client.post("/handlers/hook/pause", json={"reason": "fine"})
    assert ok.status_code == 200, ok.text


# --- 3. event ids with "/" ------------------------------------------------------------------


async def test_event_ids_holding_slashes_are_reachable(
    client: httpx.AsyncClient, store: Store
) -> None:
    """An id may hold `/` (models.py allows it): GET and replay reach it, written plainly or
    percent-encoded; an id ending in `/replay` is still an id."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    for event_id in ("org/a/b", "x/replay", "/lead", "trail/"):
        stored = Event.from_body(orjson.dumps(make_event(event_id, "job.completed")))
        assert await store.accept(stored, ["audit"], now=now)
    for event_id in ("org/a/b", "x/replay", "/lead", "trail/"):
        for path in (event_id, event_id.replace("/", "%2F")):
            got = await client.get(f"/events/{path}")
            assert got.status_code == 200, (path, got.text)
            assert got.json()["id"] == event_id
            replayed = await client.post(f"/events/{path}/replay")
            assert replayed.status_code == 200, (path, replayed.text)
            assert replayed.json() == {"event_id": event_id, "replayed": 1}
    refused(await client.get("/events/org/a"), 404, "event_id")
    refused(await client.post("/events/org/a/replay"), 404, "event_id")
    refused(await client.post("/events/org/a/b"), 405)


# --- 5. match path bounds -------------------------------------------------------------------


async def test_match_paths_past_the_bounds_are_400(client: httpx.AsyncClient) -> None:
    deep = ".".join(["k"] * MAX_MATCH_DEPTH)
    assert (await client.get("/events", params={"match": f"{deep}:v"})).status_code == 200
    long_key = "k" * MAX_MATCH_KEY
    assert (await client.get("/events", params={"match": f"a.{long_key}:v"})).status_code == 200
    for match in (f"{deep}.k:v", f"a.{long_key}k:v", "a..b:v", ".a:v", "a.:v"):
        refused(await client.get("/events", params={"match": match}), 400, "match")


# --- 4. consecutive failures of every handler -------------------------------------------------


async def test_failures_are_counted_for_every_handler(store: Store) -> None:
    """Without PAUSE_AFTER_FAILURES a handler's failures are still counted (GET /handlers
    shows them) and never pause it; a success resets the count; with the setting the
    breaker still pauses."""
    clock = FakeClock()
    policy = RetryPolicy(max_attempts=10, base_delay_seconds=5.0, max_delay_seconds=5.0)
    boom = ValueError("boom")
    plain = RecordingHandler("plain", script=[boom, boom, boom, None])
    guarded = RecordingHandler("guarded", script=[boom, boom])
    flow = {"guarded": FlowControl(pause_after_failures=2)}
    d = make_dispatcher(
        store, [plain, guarded], clock, policy=policy, poll_interval_seconds=0.02, flow=flow
    )

    async def failures() -> dict[str, tuple[int, bool]]:
        return {s.handler: (s.consecutive_failures, s.paused) for s in await store.handler_states()}

    event = Event.from_body(orjson.dumps(make_event()))
    assert await store.accept(event, ["plain", "guarded"], now=clock())
    async with running(d):
        for n in (1, 2, 3):
            await wait_until(lambda n=n: len(plain.calls) == n)  # type: ignore[misc]
            await wait_until(
                lambda n=n: failures_are(store, "plain", n)  # type: ignore[misc]
            )
            clock.advance(5)
        assert (await failures())["plain"] == (3, False)

        async def guarded_paused() -> bool:
            if await failures_are(store, "guarded", 2):
                return True
            # Under load its first claim may come after some of the advances above, so its
            # retry falls due later than plain's: move the clock on until it has run. Running
            # ahead is harmless: the failure that pauses it is written with its retry, and this
            # dispatcher starts no attempt of it while that write is on its way (its count and
            # pause were once a second write, and a retry run in between reset the count).
            if len(guarded.calls) < 2:
                clock.advance(1)
            return False

        await wait_until(guarded_paused, within_seconds=30)
        assert (await failures())["guarded"] == (2, True)
        clock.advance(3600)  # its retry is long due: still not attempted (plain's last is)
        await wait_until(lambda: len(plain.calls) == 4)
        await wait_until(lambda: failures_are(store, "plain", 0))
    assert "plain" not in await store.paused_handlers()
    assert len(guarded.calls) == 2
    assert (await failures())["guarded"] == (2, True)


async def failures_are(store: Store, handler: str, count: int) -> bool:
    return any(
        s.handler == handler and s.consecutive_failures == count
        for s in await store.handler_states()
    )


# --- 6. a Content-Length written with thousands of leading zeros ------------------------------


async def test_a_content_length_with_thousands_of_leading_zeros_is_its_number(
    client: httpx.AsyncClient, store: Store
) -> None:
    """``1*DIGIT`` allows leading zeros at any length (llhttp passes them); ``int()`` refused
    more than 4300 digits, so a body whose Content-Length was written so got a 500. It is
    read as its number: a body within the cap is served, one over it is a 413."""
    await seed(store)
    body = b'{"handler": "hook"}'
    zeros = "0" * 5000
    ok = await client.post(
        "/deliveries/retry-dead",
        content=body,
        headers={"content-type": "application/json", "content-length": zeros + str(len(body))},
    )
    assert ok.status_code == 200, ok.text
    big = await client.post(
        "/deliveries/retry-dead",
        content=body,
        headers={"content-length": zeros + str(MAX_BODY_BYTES + 1)},
    )
    assert refused(big, 413)["code"] == "body_too_large"
