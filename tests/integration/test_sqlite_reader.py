"""SQLite's admin read path (store/sqlite/reader.py): admin reads run on a read-only
connection of their own, so they never wait for the writer, the writer never waits for them,
and they cannot write."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import orjson
import pytest

from lacuna_webhooks.errors import StoreUnavailable
from lacuna_webhooks.models import Event
from lacuna_webhooks.store.base import EventFilter, ScanBudget
from lacuna_webhooks.store.sqlite import SQLiteStore
from lacuna_webhooks.store.sqlite.reader import Reader
from tests.conftest import make_event
from tests.integration.test_store_contract import wall_now


def _hold_writer(conn: sqlite3.Connection, seconds: float) -> None:
    """A writer job that keeps the writer busy inside a write transaction."""
    conn.execute("UPDATE events SET superseded = superseded")
    time.sleep(seconds)


def _insert(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO write_probe (id, written_at) VALUES (1, 0)")


def _slow_scan(conn: sqlite3.Connection) -> int:
    """A read that scans far longer than any deadline in these tests."""
    row = conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000)"
        " SELECT count(*) FROM n"
    ).fetchone()
    return int(row[0])


@pytest.fixture
async def sqlite_store(tmp_path: Path):
    store = SQLiteStore(str(tmp_path / "events.db"))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _seed(store: SQLiteStore, count: int) -> None:
    for i in range(count):
        body = orjson.dumps(make_event(f"evt_{i}", title=f"t{i}"))
        assert await store.accept(Event.from_body(body), ["a"], now=wall_now())


async def test_admin_reads_do_not_wait_for_the_writer(sqlite_store: SQLiteStore) -> None:
    """With the writer busy for 2 s inside a write transaction, a search, the listings and one
    event all answer at once (they would queue behind it on the writer)."""
    await _seed(sqlite_store, 20)
    hold = asyncio.create_task(sqlite_store._writer.run(_hold_writer, 2.0))
    await asyncio.sleep(0.2)  # the writer is inside its transaction now
    started = time.monotonic()
    page = await sqlite_store.search_events(EventFilter(q="t1"), limit=5)
    events = await sqlite_store.list_events(limit=5)
    one = await sqlite_store.get_event("evt_3")
    deliveries = await sqlite_store.list_deliveries(handler="a", limit=1)
    took = time.monotonic() - started
    assert not hold.done()
    await hold
    assert [r.id for r in page.records][:1] == ["evt_19"]
    assert len(events) == 5
    assert one is not None
    assert [d.event_id for d in deliveries] == ["evt_19"]
    assert took < 1.0, f"admin reads took {took:.2f}s behind a busy writer"


async def test_the_writer_does_not_wait_for_admin_reads(sqlite_store: SQLiteStore) -> None:
    """While a long read runs on the reader, accepts commit promptly."""
    reader = sqlite_store._reader
    scan = asyncio.create_task(reader.run(_slow_scan))
    scan.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await _seed(sqlite_store, 5)
    took = time.monotonic() - started
    assert not scan.done(), "the scan ended before the accepts were measured"
    assert took < 1.0, f"5 accepts took {took:.2f}s beside a long read"
    started = time.monotonic()
    await sqlite_store.close()  # interrupts the read still running
    assert time.monotonic() - started < 3


def _fill(conn: sqlite3.Connection, count: int, at: float) -> None:
    """``count`` events, one millisecond apart before ``at`` (bench/search_bench.py's way)."""
    conn.executemany(
        "INSERT INTO events (id, type, created, received_at, task_id, superseded, raw)"
        " VALUES (?, 'job.completed', 0, ?, ?, 0, ?)",
        (
            (
                f"bulk_{i}",
                at - (count - i) / 1000,
                f"task_{i}",
                orjson.dumps(make_event(f"bulk_{i}", title=f"Track {i}", n=i)),
            )
            for i in range(count)
        ),
    )


async def test_a_budgeted_search_runs_beside_intake(sqlite_store: SQLiteStore) -> None:
    """A payload search over 40,000 events under a budget (a number: every body is parsed)
    answers in pages on the reader while events keep being accepted: every accept commits
    promptly, the event loop keeps ticking, and the pages together find the one matching
    event the unbounded search finds. The budget is a quarter of what the unbounded scan
    took on this run (at most 0.2 s), so it cuts the scan on a fast machine too."""
    await sqlite_store._writer.run(_fill, 40_000, time.time() - 60)
    where = EventFilter(match=(("data.n", "137.0"),))
    started = time.monotonic()
    unbounded = await sqlite_store.search_events(where, limit=50)
    assert [r.id for r in unbounded.records] == ["bulk_137"]
    budget = ScanBudget(min(0.2, (time.monotonic() - started) / 4), first_window=200)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - (last + 0.01))
            last = time.monotonic()

    ticking = asyncio.create_task(heartbeat())
    accepts: list[float] = []
    found: list[str] = []
    pages = incomplete = 0
    cursor: str | None = None
    while True:
        search = asyncio.create_task(
            sqlite_store.search_events(where, cursor=cursor, limit=50, budget=budget)
        )
        while not search.done():
            started = time.monotonic()
            body = orjson.dumps(make_event(f"live_{len(accepts)}"))
            assert await sqlite_store.accept(Event.from_body(body), ["a"], now=wall_now())
            accepts.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        page = await search
        pages += 1
        incomplete += not page.complete
        found += [r.id for r in page.records]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    stop.set()
    await ticking
    assert found == ["bulk_137"]
    assert incomplete >= 1, f"{pages} pages: the budget never cut the scan"
    assert accepts
    assert max(accepts) < 1.0, f"an accept took {max(accepts):.2f}s beside the search"
    assert max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f}s"


async def test_reader_cannot_write(sqlite_store: SQLiteStore) -> None:
    """The reader's connection refuses writes (mode=ro, query_only)."""
    with pytest.raises(StoreUnavailable, match=r"readonly|read-only|attempt to write"):
        await sqlite_store._reader.run(_insert)


async def test_a_read_past_its_deadline_is_interrupted(tmp_path: Path) -> None:
    """A read running past the deadline fails with StoreUnavailable, and the reader serves the
    next read."""
    store = SQLiteStore(str(tmp_path / "events.db"))
    await store.open()
    await store.close()
    reader = Reader(str(tmp_path / "events.db"), deadline_seconds=0.3)
    await reader.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="interrupted"):
            await reader.run(_slow_scan)
        assert time.monotonic() - started < 5
        assert await reader.run(lambda c: c.execute("SELECT 1").fetchone()[0]) == 1
    finally:
        await reader.stop()
    with pytest.raises(StoreUnavailable):
        await reader.run(lambda c: 1)
