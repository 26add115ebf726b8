"""What an admin read holds in memory does not grow with ``limit`` nor with the stored
bodies' sizes (docs/admin.md, "Memory: a page is bounded"): the admin listener runs inside
``serve`` beside intake, and a listing of 500 events of 1 MiB once took the process to its
container's limit, intake with it.

Every backend (``store`` fixture: memory, SQLite, SQLite with its writer process,
PostgreSQL) holds 60 events of about 1 MiB. The bound is measured with ``tracemalloc``
around the read (it sees every Python allocation, the SQLite reader's thread and asyncpg's
buffers included): the peak of what the read allocated, never a time.
"""

from __future__ import annotations

import functools
import re
import tracemalloc
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import httpx
import orjson
import pytest

from lacuna_webhooks.admin import AdminContext, create_admin_app
from lacuna_webhooks.admin.bulk import BulkOperation, run_bulk
from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.base import PAGE_BODY_BYTES, EventFilter, ScanBudget
from tests.conftest import TEST_SECRET, admin_context_for, make_event

T = TypeVar("T")
MiB = 1024 * 1024
COUNT = 60
BLOB = 1 * MiB
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
SECOND = timedelta(seconds=1)
TOKEN = "adm_memory_test_" + "k" * 32
#: What a read that holds no body may allocate at its peak (rows, JSON, the app).
SMALL = 4 * MiB
#: What a read of one page of bodies may allocate at its peak: the page's bodies, a copy
#: of them in the driver's buffers, and the rest.
PAGE = 2 * PAGE_BODY_BYTES + 2 * BLOB + SMALL
#: What every stored body together is (the read before the fix held all of them).
ALL = COUNT * BLOB


@functools.cache
def big_event(i: int) -> Event:
    return Event.from_body(
        orjson.dumps(
            make_event(f"evt_{i:02}", task_id="task_big", title=f"Big {i}", blob="x" * BLOB)
        )
    )


def newest_first() -> list[str]:
    return [f"evt_{i:02}" for i in reversed(range(COUNT))]


@pytest.fixture
async def big(store: Store) -> Store:
    """``store`` with COUNT events of about 1 MiB, a second apart, each with a delivery."""
    for i in range(COUNT):
        assert await store.accept(big_event(i), ["audit"], now=T0 + i * SECOND)
    return store


async def peak(read: Awaitable[T]) -> tuple[T, int]:
    """``read``'s result and the most memory it held at once (bytes, ``tracemalloc``)."""
    tracemalloc.start()
    try:
        result = await read
        _, most = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, most


def admin_context(store: Store) -> AdminContext:
    env = {
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_ADMIN_TOKEN": TOKEN,
        "LACUNA_HANDLERS": "audit=log",
    }
    return admin_context_for(store, env)


@pytest.fixture
async def api(big: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(admin_context(big))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin",
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as c:
        yield c


# --- the store --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "budget"),
    [(EventFilter(), None), (EventFilter(q='"title":"Big'), ScanBudget())],
    ids=["all", "q-budgeted"],
)
async def test_a_page_of_bodies_stops_at_its_byte_budget_and_its_cursor_goes_on(
    big: Store, where: EventFilter, budget: ScanBudget | None
) -> None:
    """``limit=500`` over 60 MiB of bodies: each page holds what fits ``PAGE_BODY_BYTES``
    (at least one) with a cursor; following it gives every event once, newest first, each
    with its body, and no page held more than about one page of bodies."""
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, most = await peak(big.search_events(where, cursor=cursor, limit=500, budget=budget))
        pages += 1
        assert page.records, "a page of bodies always holds at least one event"
        assert page.complete
        assert sum(r.size for r in page.records) <= max(PAGE_BODY_BYTES, page.records[0].size)
        assert most < PAGE, f"page {pages} held {most / MiB:.1f} MiB at its peak"
        for record in page.records:
            assert record.has_body
            assert record.raw == big_event(int(record.id[4:])).raw
            assert record.size == len(record.raw)
        seen += [r.id for r in page.records]
        if page.next_cursor is None:
            break
        assert len(page.records) < 500  # cut by bytes, not by limit
        cursor = page.next_cursor
    assert seen == newest_first()  # nothing skipped, nothing repeated
    assert pages >= COUNT * BLOB // PAGE_BODY_BYTES


@pytest.mark.parametrize(("max_bytes", "per_page"), [(1, 1), (25_000, 2), (None, 5)])
async def test_a_page_holds_what_fits_and_always_its_first_event(
    store: Store, max_bytes: int | None, per_page: int
) -> None:
    """Five bodies of about 10 KB: a budget smaller than one still gives one event a page
    (a cursor always makes progress), 25 KB gives two, ``None`` no bound."""
    for i in range(5):
        body = orjson.dumps(make_event(f"evt_s{i}", pad="p" * 10_000))
        assert await store.accept(Event.from_body(body), ["audit"], now=T0 + i * SECOND)
    seen: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = await store.search_events(
            EventFilter(), cursor=cursor, limit=500, max_bytes=max_bytes
        )
        seen.append([r.id for r in page.records])
        assert all(r.has_body and r.size == len(r.raw) for r in page.records)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [i for ids in seen for i in ids] == [f"evt_s{i}" for i in reversed(range(5))]
    assert [len(ids) for ids in seen[:-1]] == [per_page] * (len(seen) - 1)
    assert 1 <= len(seen[-1]) <= per_page


async def test_a_listing_without_bodies_holds_none(big: Store) -> None:
    """``bodies=False`` (every listing): the whole 500-page in one, each record's size, and
    not one body read."""
    page, most = await peak(big.search_events(EventFilter(), limit=500, bodies=False))
    assert [r.id for r in page.records] == newest_first()
    assert page.next_cursor is None
    assert all(r.raw == b"" and not r.has_body for r in page.records)
    assert [r.size for r in page.records] == [
        len(big_event(int(r.id[4:])).raw) for r in page.records
    ]
    assert most < SMALL, f"held {most / MiB:.1f} MiB of {ALL / MiB:.0f} MiB stored"


async def test_bulk_dry_run_holds_no_body(big: Store) -> None:
    """``POST /replays`` and the CLI's ``replay --dry-run`` walk 500 events a batch: ids and
    types only."""
    result, most = await peak(run_bulk(big, BulkOperation(EventFilter(), dry_run=True)))
    assert result.matched == COUNT
    assert most < SMALL, f"held {most / MiB:.1f} MiB"


# --- the admin API -------------------------------------------------------------------------


async def test_get_events_at_limit_500_reads_no_body(api: httpx.AsyncClient) -> None:
    """``GET /api/v1/events?limit=500`` (and with ``q``): every summary with its size, in one
    page, holding next to nothing."""
    for query in ("limit=500", "limit=500&q=Big"):
        answer, most = await peak(api.get(f"/api/v1/events?{query}"))
        assert answer.status_code == 200, answer.text
        doc = answer.json()
        assert [e["id"] for e in doc["data"]] == newest_first()
        assert doc["next_cursor"] is None
        assert all(e["size"] > BLOB for e in doc["data"])
        assert most < SMALL, f"{query}: held {most / MiB:.1f} MiB"


async def test_get_task_with_many_big_events_reads_no_body(api: httpx.AsyncClient) -> None:
    answer, most = await peak(api.get("/api/v1/tasks/task_big"))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["events"]) == COUNT
    assert most < SMALL, f"held {most / MiB:.1f} MiB"


async def test_get_deliveries_stops_at_the_results_budget(store: Store) -> None:
    """Results of up to 64 KiB each: a page of 500 stops before its results pass
    ``PAGE_BODY_BYTES``, with a cursor that goes on without skipping or repeating."""
    result = {"tracks": ["y" * 1000] * 60}  # about 60 KiB
    count = 120
    for i in range(count):
        event = Event.from_body(orjson.dumps(make_event(f"evt_r{i:03}")))
        assert await store.accept(event, ["audit"], now=T0 + i * SECOND)
    now = T0 + count * SECOND
    for _ in range(count):
        (delivery,) = await store.claim(
            handler="audit", limit=1, lease=timedelta(minutes=5), now=now
        )
        done = Attempt(now, now, AttemptOutcome.OK, result=result)
        assert await store.complete(delivery, done)
    app = create_admin_app(admin_context(store))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://admin",
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as api:
        seen: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            query = "limit=500" + ("" if cursor is None else f"&cursor={cursor}")
            answer = await api.get(f"/api/v1/deliveries?{query}")
            assert answer.status_code == 200, answer.text
            doc = answer.json()
            pages += 1
            assert doc["data"]
            assert all(d["result"] == result for d in doc["data"])
            held = sum(len(orjson.dumps(d["result"])) for d in doc["data"])
            assert held <= PAGE_BODY_BYTES
            seen += [d["id"] for d in doc["data"]]
            cursor = doc["next_cursor"]
            if cursor is None:
                break
    assert len(seen) == count
    assert seen == sorted(set(seen), reverse=True)  # newest first, none repeated
    assert pages >= 2


# --- the console ---------------------------------------------------------------------------


async def test_console_events_page_stops_at_its_byte_budget(big: Store) -> None:
    """The events page shows titles (it reads bodies): at ``limit=500`` it holds what fits
    ``PAGE_BODY_BYTES`` and its "Older events" link goes on from there, every event once."""
    app = create_admin_app(admin_context(big))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://console.test"
    ) as http:
        signed_in = await http.post("/sign-in", data={"token": TOKEN, "next": "/events"})
        assert signed_in.status_code == 303, signed_in.text
        seen: list[str] = []
        url: str | None = "/events?limit=500"
        while url is not None:
            answer, most = await peak(http.get(url))
            assert answer.status_code == 200, answer.text
            shown = re.findall(r'href="/event\?id=(evt_[0-9]+)"', answer.text)
            assert shown
            assert all(f"Big {int(i[4:])}" in answer.text for i in shown)
            assert most < PAGE, f"held {most / MiB:.1f} MiB"
            seen += shown
            older = re.search(r'href="([^"]+)" rel="next"', answer.text)
            url = None if older is None else older.group(1).replace("&amp;", "&")
    assert seen == newest_first()
