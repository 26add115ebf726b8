"""``POST /api/v1/replays`` (admin/api_bulk.py, admin/bulk.py) over every store backend (the
``store`` fixture: memory, SQLite, SQLite with its writer process, PostgreSQL): each filter
selects what ``GET /events`` selects, a dry run writes nothing, a handler added after the
events arrived is backfilled, ``missing_only`` touches nothing that exists, several batches,
one operation at a time (409), and a 400 naming the field for every bad one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from lacuna_webhooks.admin import AdminContext, bulk, create_admin_app
from lacuna_webhooks.admin.bulk import BulkOperation, run_bulk
from lacuna_webhooks.errors import StoreUnavailable
from lacuna_webhooks.models import Attempt, AttemptOutcome, DeliveryStatus
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.base import EventFilter, ScanBudget
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import admin_context_for
from tests.integration.test_admin_api import AUTH, ENVIRON, event, refused, seed

#: ``late`` is configured now but was not when the seeded events arrived.
LATE_ENVIRON = {**ENVIRON, "LACUNA_HANDLERS": "audit=log,hook=log,late=log"}


def bulk_context(store: Store) -> AdminContext:
    return admin_context_for(store, LATE_ENVIRON)


@pytest.fixture
async def client(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(bulk_context(store))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin/api/v1",
        headers=AUTH,
        timeout=120,
    ) as c:
        yield c


async def replays(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/replays", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"matched", "created", "reset", "dry_run"}
    return dict(answer)


async def handlers_of(store: Store, event_id: str) -> dict[str, Any]:
    return {d.handler: d for d in await store.list_deliveries(event_id=event_id)}


# --- backfill and replay -----------------------------------------------------------------------


async def test_backfill_of_a_handler_added_later(client: httpx.AsyncClient, store: Store) -> None:
    """``late`` gets a pending delivery, due now, on every stored event (one with no delivery
    at all included); a second backfill creates nothing; the other handlers' deliveries are
    untouched (e1's audit stays done, e2's stays dead)."""
    await seed(store)
    assert await store.accept(event("e5", task_id="task_5"), [], now=store_now())
    answer = await replays(client, {"all": True, "handlers": ["late"], "missing_only": True})
    assert answer == {"matched": 5, "created": 5, "reset": 0, "dry_run": False}
    for event_id in ("e1", "e2", "e3", "e4", "e5"):
        late = (await handlers_of(store, event_id))["late"]
        assert (late.status, late.attempts, late.last_error) == (DeliveryStatus.PENDING, 0, None)
    assert (await handlers_of(store, "e1"))["audit"].status is DeliveryStatus.DONE
    assert (await handlers_of(store, "e2"))["audit"].status is DeliveryStatus.DEAD
    again = await replays(client, {"all": True, "handlers": ["late"], "missing_only": True})
    assert again == {"matched": 5, "created": 0, "reset": 0, "dry_run": False}


async def test_dry_run_counts_and_writes_nothing(client: httpx.AsyncClient, store: Store) -> None:
    await seed(store)
    answer = await replays(
        client, {"type": "job.completed", "handlers": ["late", "audit"], "dry_run": True}
    )
    assert answer == {"matched": 2, "created": 0, "reset": 0, "dry_run": True}
    for event_id in ("e1", "e3"):
        assert "late" not in await handlers_of(store, event_id)
    assert (await handlers_of(store, "e1"))["audit"].status is DeliveryStatus.DONE


async def test_replay_resets_and_creates(client: httpx.AsyncClient, store: Store) -> None:
    """With handlers and without missing_only, existing deliveries of those handlers are made
    due again (attempts 0, error cleared) and missing ones created; without handlers every
    existing delivery of each event is reset and none is created."""
    await seed(store)
    answer = await replays(client, {"task_id": "task_1", "handlers": ["audit", "late"]})
    assert answer == {"matched": 2, "created": 2, "reset": 2, "dry_run": False}
    for event_id in ("e1", "e2"):
        rows = await handlers_of(store, event_id)
        assert rows["audit"].status is DeliveryStatus.PENDING
        assert (rows["audit"].attempts, rows["audit"].last_error) == (0, None)
        assert rows["late"].status is DeliveryStatus.PENDING

    answer = await replays(client, {"match": ["data.title:Morning"]})
    assert answer == {"matched": 1, "created": 0, "reset": 2, "dry_run": False}
    assert set(await handlers_of(store, "e4")) == {"audit", "hook"}


async def test_replay_of_the_dead(client: httpx.AsyncClient, store: Store) -> None:
    """handler + status select e2 (audit dead): its dead delivery is due again."""
    await seed(store)
    answer = await replays(client, {"handler": "audit", "status": "dead", "handlers": ["audit"]})
    assert answer == {"matched": 1, "created": 0, "reset": 1, "dry_run": False}
    assert (await handlers_of(store, "e2"))["audit"].status is DeliveryStatus.PENDING
    assert await store.list_deliveries(status=DeliveryStatus.DEAD) == []


FILTERS: list[dict[str, Any]] = [
    {"type": "job.completed"},
    {"task_id": "task_1"},
    {"handler": "audit"},
    {"status": "done"},
    {"status": "dead"},
    {"handler": "hook", "status": "due"},
    {"match": ["data.title:Late Night Study"]},
    {"match": ["data.title:Late Night Study", "data.n:2"]},
    {"q": "Morning"},
    {"q": "no such text"},
]


@pytest.mark.parametrize("where", FILTERS, ids=lambda w: ",".join(w))
async def test_each_filter_matches_what_search_finds(
    client: httpx.AsyncClient, store: Store, where: dict[str, Any]
) -> None:
    """Every filter of the body selects exactly the events GET /events finds with it."""
    await seed(store)
    found = await client.get("/events", params={**where, "limit": "500"})
    assert found.status_code == 200, found.text
    expected = len(found.json()["data"])
    answer = await replays(client, {**where, "dry_run": True})
    assert answer["matched"] == expected


async def test_time_bounds_as_text_and_numbers(client: httpx.AsyncClient, store: Store) -> None:
    """since / until as RFC 3339 text or Unix seconds (a JSON number): e2 and e3 only."""
    t0 = await seed(store)
    since, until = t0 + timedelta(seconds=1), t0 + timedelta(seconds=3)
    for body in (
        {"since": since.isoformat(), "until": until.isoformat()},
        {"since": since.timestamp(), "until": until.timestamp()},
        {"since": str(since.timestamp()), "until": until.timestamp()},
    ):
        answer = await replays(client, {**body, "handlers": ["late"], "missing_only": True})
        assert answer["matched"] == 2, body
    assert "late" in await handlers_of(store, "e2")
    assert "late" in await handlers_of(store, "e3")
    assert "late" not in await handlers_of(store, "e1")
    assert "late" not in await handlers_of(store, "e4")


async def test_many_batches(client: httpx.AsyncClient, store: Store) -> None:
    """1,100 events (three batches of at most 500): each gets exactly one new delivery."""
    now = store_now()
    for i in range(1100):
        assert await store.accept(event(f"b{i:04}", task_id=f"t{i}"), ["audit"], now=now)
    answer = await replays(client, {"all": True, "handlers": ["late"], "missing_only": True})
    assert answer == {"matched": 1100, "created": 1100, "reset": 0, "dry_run": False}
    late = await store.list_deliveries(handler="late", limit=5000)
    assert len(late) == 1100
    assert len({d.event_id for d in late}) == 1100


async def test_the_walk_survives_its_own_writes(store: Store) -> None:
    """Batches of 2 over 7 events whose dead deliveries the walk itself resets (so the filter
    no longer selects the pages already done): the cursor still reaches every event, once."""
    now = store_now()
    for i in range(7):
        assert await store.accept(event(f"w{i}", task_id=f"t{i}"), ["audit"], now=now)
    for d in await store.claim(handler="audit", limit=10, lease=timedelta(minutes=1), now=now):
        assert await store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, "x"))
    operation = BulkOperation(EventFilter(status="dead"), handlers=("audit", "late"))
    result = await run_bulk(store, operation, batch_size=2, min_pause_seconds=0)
    assert (result.matched, result.reset, result.created, result.batches) == (7, 7, 7, 4)
    assert await store.list_deliveries(status=DeliveryStatus.DEAD) == []
    assert len(await store.list_deliveries(handler="late", limit=100)) == 7


async def test_the_walk_goes_on_through_pages_the_budget_cut(store: Store) -> None:
    """A payload filter under a budget that stops every page after one window of 4 events:
    pages with fewer events than the batch, and empty ones, carry a cursor and the walk
    goes on; every matching event gets its delivery once, no other event one. The API's
    runner uses the admin's budget the same way."""
    now = store_now()
    for i in range(30):
        title = "Late Night Study" if i % 6 == 2 else "Other"
        assert await store.accept(event(f"g{i:02}", task_id=f"t{i}", title=title), [], now=now)
    wanted = {f"g{i:02}" for i in range(30) if i % 6 == 2}
    where = EventFilter(match=(("data.title", "Late Night Study"),))
    budget = ScanBudget(0, first_window=4)
    first = await store.search_events(where, limit=3, budget=budget)
    assert not first.complete  # the budget does cut these pages
    assert first.next_cursor is not None
    operation = BulkOperation(where, handlers=("late",), missing_only=True)
    result = await run_bulk(store, operation, batch_size=3, min_pause_seconds=0, budget=budget)
    assert (result.matched, result.created) == (len(wanted), len(wanted))
    late = await store.list_deliveries(handler="late", limit=100)
    assert sorted(d.event_id for d in late) == sorted(wanted)
    # Through the API, with the context's budget: the audit backfill reaches them all too.
    ctx = bulk_context(store)
    ctx.search_budget = budget
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(ctx)),
        base_url="http://admin/api/v1",
        headers=AUTH,
        timeout=120,
    ) as c:
        body = {"q": "Late Night", "handlers": ["audit"], "missing_only": True}
        answer = await replays(c, body)
    assert answer == {"matched": 5, "created": 5, "reset": 0, "dry_run": False}
    audit = await store.list_deliveries(handler="audit", limit=100)
    assert sorted(d.event_id for d in audit) == sorted(wanted)


async def test_one_operation_at_a_time(client: httpx.AsyncClient, store: Store) -> None:
    """Two operations at once: one runs (200), the other is refused with 409
    operation_in_progress; once it is done another one runs."""
    now = store_now()
    for i in range(1500):
        assert await store.accept(event(f"c{i:04}", task_id=f"t{i}"), [], now=now)
    body = {"all": True, "handlers": ["late"], "missing_only": True}
    first, second = await asyncio.gather(
        client.post("/replays", json=body), client.post("/replays", json=body)
    )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 409], (first.text, second.text)
    (done,) = [r for r in (first, second) if r.status_code == 200]
    (busy,) = [r for r in (first, second) if r.status_code == 409]
    assert done.json()["created"] == 1500
    assert refused(busy, 409)["code"] == "operation_in_progress"
    assert (await replays(client, body))["created"] == 0


async def test_a_client_that_hangs_up_does_not_stop_it(
    client: httpx.AsyncClient, store: Store
) -> None:
    """The request cancelled after the first batch: the operation still finishes (every
    event gets its delivery), and the next one is not refused as in progress."""
    now = store_now()
    for i in range(1500):
        assert await store.accept(event(f"h{i:04}", task_id=f"t{i}"), [], now=now)
    body = {"all": True, "handlers": ["late"], "missing_only": True}
    request = asyncio.create_task(client.post("/replays", json=body))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not await store.list_deliveries(handler="late", limit=1):
        assert loop.time() < deadline, "the operation never started"
        await asyncio.sleep(0.001)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    while len(await store.list_deliveries(handler="late", limit=2000)) < 1500:
        assert loop.time() < deadline, "the operation stopped with its client"
        await asyncio.sleep(0.05)
    while True:
        response = await client.post("/replays", json=body)
        if response.status_code != 409:
            break
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 0


# --- bad requests ------------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], str]] = [
    ({}, "all"),
    ({"all": False}, "all"),
    ({"dry_run": True}, "all"),
    ({"handlers": ["late"]}, "all"),
    ({"all": "yes"}, "all"),
    ({"all": True, "type": "job.completed"}, "all"),
    ({"type": 1}, "type"),
    ({"type": ""}, "type"),
    ({"task_id": "x" * 1001}, "task_id"),
    ({"since": "yesterday"}, "since"),
    ({"since": True}, "since"),
    ({"until": -5}, "until"),
    ({"since": "2026-01-02", "until": "2026-01-01"}, "since"),
    ({"handler": "Not-A-Name"}, "handler"),
    ({"status": "lost"}, "status"),
    ({"match": "nocolon"}, "match"),
    ({"match": ["nocolon"]}, "match"),
    ({"match": [1]}, "match"),
    ({"match": {"a": "b"}}, "match"),
    ({"match": ["data.n:1"] * 11}, "match"),
    ({"q": ""}, "q"),
    ({"q": "a\x00b"}, "q"),
    ({"all": True, "handlers": []}, "handlers"),
    ({"all": True, "handlers": "late"}, "handlers"),
    ({"all": True, "handlers": [1]}, "handlers"),
    ({"all": True, "handlers": ["Late!"]}, "handlers"),
    ({"all": True, "handlers": ["nope"]}, "handlers"),
    ({"all": True, "handlers": ["late"] * 101}, "handlers"),
    ({"all": True, "missing_only": True}, "missing_only"),
    ({"all": True, "handlers": ["late"], "missing_only": "yes"}, "missing_only"),
    ({"all": True, "dry_run": 1}, "dry_run"),
    # null is not false for a flag that guards writes: this body once backfilled for real
    ({"all": True, "handlers": ["late"], "dry_run": None}, "dry_run"),
    ({"all": True, "handlers": ["late"], "missing_only": None}, "missing_only"),
    ({"all": None, "handlers": ["late"]}, "all"),
    ({"all": True, "everything": True}, "everything"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
async def test_bad_bodies(
    client: httpx.AsyncClient, store: Store, body: dict[str, Any], param: str
) -> None:
    """Each bad field: 400 naming it, nothing written."""
    await seed(store)
    error = refused(await client.post("/replays", json=body), 400, param)
    assert error["code"] == "invalid_request"
    for event_id in ("e1", "e2", "e3", "e4"):
        assert "late" not in await handlers_of(store, event_id)


async def test_unknown_handler_is_named(client: httpx.AsyncClient) -> None:
    error = refused(await client.post("/replays", json={"all": True, "handlers": ["nope"]}), 400)
    assert "'nope'" in error["message"]
    assert "audit, hook, late" in error["message"]


async def test_malformed_requests(client: httpx.AsyncClient) -> None:
    """Not JSON, not an object, a query parameter, GET: refused with the envelope."""
    response = await client.post("/replays", content=b"{", headers={"content-type": "x"})
    assert refused(response, 400)["code"] == "invalid_json"
    assert refused(await client.post("/replays", json=[1]), 400)["code"] == "invalid_json"
    refused(await client.post("/replays", params={"all": "true"}, json={"all": True}), 400, "all")
    assert (await client.get("/replays")).status_code == 405
    no_token = await client.post("/replays", json={"all": True}, headers={"authorization": ""})
    refused(no_token, 401)


# --- the store going away ----------------------------------------------------------------------


async def test_a_store_that_comes_back_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store unavailable for a moment is retried (the operation completes); one that stays
    away past the retry time fails with StoreUnavailable (the API's 503)."""
    store = MemoryStore()
    await store.open()
    now = store_now()
    for i in range(3):
        await store.accept(event(f"s{i}"), [], now=now)
    operation = BulkOperation(EventFilter(), handlers=("late",), missing_only=True)
    store.unavailable = True
    running = asyncio.create_task(run_bulk(store, operation, retry_seconds=30))
    await asyncio.sleep(0.3)
    assert not running.done()
    store.unavailable = False
    result = await asyncio.wait_for(running, 30)
    assert (result.matched, result.created) == (3, 3)

    store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await run_bulk(store, operation, retry_seconds=0.3)
    store.unavailable = False
    app = create_admin_app(bulk_context(store))
    store.unavailable = True
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin/api/v1", headers=AUTH
    ) as c:
        monkeypatch.setattr(bulk, "RETRY_SECONDS", 0.2)
        response = await c.post("/replays", json={"all": True, "dry_run": True})
    assert refused(response, 503)["code"] == "store_unavailable"
    await store.close()


def store_now() -> datetime:
    return datetime.now(UTC)


async def test_a_replay_leaves_the_deliveries_of_a_removed_handler(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A handler removed from LACUNA_HANDLERS (``gone``) keeps its old deliveries; a replay
    without ``handlers`` (bulk, and of one event) resets only the configured handlers' ones.
    Made pending again, ``gone``'s would never run (no dispatcher claims them) and would keep
    their events from ever being pruned."""
    now = store_now()
    assert await store.accept(event("r1"), ["audit", "gone"], now=now)
    assert await store.accept(event("r2"), ["gone"], now=now)
    for name in ("audit", "gone"):
        for d in await store.claim(handler=name, limit=10, lease=timedelta(minutes=1), now=now):
            assert await store.complete(d, Attempt(now, now, AttemptOutcome.OK, None))
    answer = await replays(client, {"all": True})
    assert answer == {"matched": 2, "created": 0, "reset": 1, "dry_run": False}
    one = await client.post("/events/r2/replay", json={})
    assert one.json() == {"event_id": "r2", "replayed": 0}, one.text
    for event_id in ("r1", "r2"):
        assert (await handlers_of(store, event_id))["gone"].status is DeliveryStatus.DONE
    assert (await handlers_of(store, "r1"))["audit"].status is DeliveryStatus.PENDING
    one = await client.post("/events/r1/replay", json={})
    assert one.json() == {"event_id": "r1", "replayed": 1}, one.text
    missing = await client.post("/events/nope/replay", json={})
    assert missing.status_code == 404, missing.text


async def test_a_backfill_creates_only_what_intake_would_have(store: Store) -> None:
    """``late`` gets only job.failed and job.progress (LACUNA_LATE_EVENTS): a backfill (and a replay
    naming it) over every event creates and resets its deliveries of those events only, as
    intake would have; it used to hand it every stored event, whatever its type."""
    ctx = admin_context_for(
        store, {**LATE_ENVIRON, "LACUNA_LATE_EVENTS": "job.failed,job.progress"}
    )
    await seed(store)  # e1, e3 job.completed; e2 job.failed, e4 job.progress
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(ctx)),
        base_url="http://admin/api/v1",
        headers=AUTH,
        timeout=120,
    ) as client:
        body = {"all": True, "handlers": ["late"], "missing_only": True}
        answer = await replays(client, body)
        assert answer == {"matched": 4, "created": 2, "reset": 0, "dry_run": False}
        answer = await replays(client, {"all": True, "handlers": ["late", "audit"]})
        assert answer == {"matched": 4, "created": 0, "reset": 6, "dry_run": False}
    for event_id, wanted in (("e1", False), ("e2", True), ("e3", False), ("e4", True)):
        assert ("late" in await handlers_of(store, event_id)) is wanted, event_id


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        # JSON true/false are not times (Python's bool is an int: true was second 1)
        (b'{"since": true, "dry_run": true}', "since"),
        (b'{"until": false, "dry_run": true}', "until"),
        # a number past a double is valid JSON (RFC 8259 §6): the field is named, out of range
        (b'{"since": 1e400, "dry_run": true}', "since"),
        (b'{"until": -1e400, "dry_run": true}', "until"),
        (b'{"since": 1' + b"0" * 400 + b', "dry_run": true}', "since"),
        (b'{"all": true, "dry_run": 1e400}', "dry_run"),
        (b'{"all": true, "handlers": [1e400]}', "handlers"),
        (b'{"type": 1e400}', "type"),
    ],
)
async def test_booleans_and_numbers_past_a_double_are_refused_by_name(
    client: httpx.AsyncClient, store: Store, raw: bytes, param: str
) -> None:
    await seed(store)
    answer = await client.post("/replays", content=raw, headers={"content-type": "x"})
    error = refused(answer, 400, param)
    assert error["code"] == "invalid_request"
    if param in ("since", "until") and b"e400" in raw:
        assert "out of range" in error["message"]
    for event_id in ("e1", "e2", "e3", "e4"):
        assert "late" not in await handlers_of(store, event_id)


async def test_what_orjson_refuses_besides_a_big_number_stays_invalid_json(
    client: httpx.AsyncClient,
) -> None:
    """The standard library reads a body holding 1e400; it must not let in what orjson
    refuses for other reasons (a lone surrogate, NaN) in the same body."""
    for raw in (
        b'{"since": 1e400, "type": "\\ud800"}',
        b'{"since": 1e400, "until": NaN}',
        b'{"since": 1e400, "type": "x"',
    ):
        answer = await client.post("/replays", content=raw, headers={"content-type": "x"})
        assert refused(answer, 400)["code"] == "invalid_json", raw
