"""The admin search over a million stored events (docs/admin.md, docs/performance.md).

Fills a fresh store directly (SQLite: executemany into the file after the store migrated it;
PostgreSQL: COPY), then times representative ``Store.search_events`` calls through the store,
as the admin API makes them (SQLite's on its read-only reader connection):

    .venv/bin/python bench/search_bench.py sqlite [--events 1000000] [--path /tmp/x.db]
    .venv/bin/python bench/search_bench.py postgres --dsn postgresql://postgres@127.0.0.1/test

The events: ``--events`` spread over 30 days, 10 event types (one of them 1%), a task per
10 events, a delivery of ``audit`` per event (0.1% dead, 1% pending, the rest done). Each
search runs 3 times as ``GET /events`` runs it, under the admin's ``ScanBudget``
(``--budget``, default 0.5 s): the first and the median time to the first answer, its rows
and whether it was complete are printed. Then, once: the time to follow ``next_cursor``
until 50 rows are found or the events run out (and how many pages that took), and the
time of the same search without a budget (one statement, as before the budget).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from lacuna_webhooks.samples import sample_event
from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.base import DEFAULT_SEARCH_BUDGET_SECONDS, EventFilter, ScanBudget

DAYS = 30
TYPES = [f"job.kind{i}" for i in range(9)]
RARE_TYPE = "job.rare"
START = datetime(2026, 10, 1, tzinfo=UTC)


def rows(count: int) -> Iterator[tuple[Any, ...]]:
    """(id, type, created, received_at, task_id, raw, status) per event, oldest first."""
    span = DAYS * 86400
    for i in range(count):
        event_type = RARE_TYPE if i % 100 == 7 else TYPES[i % len(TYPES)]
        event = sample_event("job.completed", event_id=f"evt_{i:08d}", task_id=f"task_{i // 10}")
        event["type"] = event_type
        event["data"]["title"] = f"Track {i}"
        received = START.timestamp() + span * i / count
        status = "dead" if i % 1000 == 3 else ("pending" if i % 100 == 5 else "done")
        yield (
            f"evt_{i:08d}",
            event_type,
            event.get("created"),
            received,
            f"task_{i // 10}",
            orjson.dumps(event),
            status,
        )


async def fill_sqlite(path: str, count: int) -> None:
    store = open_store(f"sqlite:///{path}")
    await store.open()  # creates and migrates the file
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous = OFF")
    batch_e: list[tuple[Any, ...]] = []
    batch_d: list[tuple[Any, ...]] = []

    def flush() -> None:
        with conn:
            conn.executemany(
                "INSERT INTO events (id, type, created, received_at, task_id, superseded, raw)"
                " VALUES (?, ?, ?, ?, ?, 0, ?)",
                batch_e,
            )
            conn.executemany(
                "INSERT INTO deliveries (event_id, handler, status, attempts, next_attempt_at,"
                " created_at, updated_at) VALUES (?, 'audit', ?, 1, ?, ?, ?)",
                batch_d,
            )
        batch_e.clear()
        batch_d.clear()

    for event_id, event_type, created, received, task, raw, status in rows(count):
        batch_e.append((event_id, event_type, created, received, task, raw))
        batch_d.append((event_id, status, received, received, received))
        if len(batch_e) == 50_000:
            flush()
    flush()
    with conn:
        # As accepts leave them: a row per task, and each event numbered by its task's row
        # (task_seq, which the search by task reads: migration 0009).
        conn.execute(
            "INSERT INTO tasks (task_id, status, event_id, event_type, event_order, updated_at)"
            " SELECT task_id, 'ready', max(id), 'job.completed', 0, 0 FROM events"
            " WHERE task_id IS NOT NULL GROUP BY task_id"
        )
        conn.execute(
            "UPDATE events SET task_seq = (SELECT t.rowid FROM tasks AS t"
            " WHERE t.task_id = events.task_id) WHERE task_id IS NOT NULL"
        )
    conn.execute("ANALYZE")
    conn.close()


async def fill_postgres(dsn: str, count: int) -> None:
    import asyncpg

    store = open_store(dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        events: list[tuple[Any, ...]] = []
        deliveries: list[tuple[Any, ...]] = []

        async def flush() -> None:
            await conn.copy_records_to_table(
                "events",
                records=events,
                columns=["id", "type", "created", "received_at", "task_id", "superseded", "raw"],
            )
            await conn.copy_records_to_table(
                "deliveries",
                records=deliveries,
                columns=[
                    "event_id",
                    "handler",
                    "status",
                    "attempts",
                    "next_attempt_at",
                    "created_at",
                    "updated_at",
                ],
            )
            events.clear()
            deliveries.clear()

        for event_id, event_type, created, received, task, raw, status in rows(count):
            at = datetime.fromtimestamp(received, UTC)
            events.append((event_id, event_type, created, at, task, False, raw))
            deliveries.append((event_id, "audit", status, 1, at, at, at))
            if len(events) == 50_000:
                await flush()
        await flush()
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def searches(count: int) -> list[tuple[str, EventFilter]]:
    middle = START + timedelta(days=DAYS / 2)
    rare_title = f"Track {count // 3}"
    return [
        ("newest page, no filter", EventFilter()),
        ("type (10% of events)", EventFilter(type=TYPES[3])),
        ("type (1% of events)", EventFilter(type=RARE_TYPE)),
        ("task_id", EventFilter(task_id=f"task_{count // 20}")),
        ("since/until: one hour", EventFilter(since=middle, until=middle + timedelta(hours=1))),
        ("handler + status=dead (0.1%)", EventFilter(handler="audit", status="dead")),
        ("handler + status=done", EventFilter(handler="audit", status="done")),
        ("status=due (1%)", EventFilter(status="due")),
        ("match, frequent value", EventFilter(match=(("data.status", "ready"),))),
        ("match, one event (full scan)", EventFilter(match=(("data.title", rare_title),))),
        ("q, one event (full scan)", EventFilter(q=f'"{rare_title}"')),
        (
            "type 1% + match one event",
            EventFilter(type=RARE_TYPE, match=(("data.title", "Track 507"),)),
        ),
        ("q, no event (full scan)", EventFilter(q="no such text")),
    ]


Row = tuple[str, float, float, int, bool, float, int, int, float]


async def measure(store: Store, count: int, budget: ScanBudget) -> list[Row]:
    """Per search: (label, first, median, rows, complete, to 50 rows or the end, pages,
    rows then, without a budget)."""
    found: list[Row] = []
    for label, where in searches(count):
        times = []
        matched = 0
        complete = True
        for _ in range(3):
            started = time.perf_counter()
            page = await store.search_events(where, limit=50, budget=budget)
            times.append(time.perf_counter() - started)
            matched, complete = len(page.records), page.complete
        started = time.perf_counter()
        rows, pages, cursor = 0, 0, None
        while True:
            page = await store.search_events(where, cursor=cursor, limit=50 - rows, budget=budget)
            rows, pages = rows + len(page.records), pages + 1
            if page.next_cursor is None or rows >= 50:
                break
            cursor = page.next_cursor
        walked = time.perf_counter() - started
        started = time.perf_counter()
        await store.search_events(where, limit=50)
        unbudgeted = time.perf_counter() - started
        found.append(
            (
                label,
                times[0],
                statistics.median(times),
                matched,
                complete,
                walked,
                pages,
                rows,
                unbudgeted,
            )
        )
    # The second page of the frequent listing, through its cursor.
    page = await store.search_events(EventFilter(type=TYPES[3]), limit=50)
    assert page.next_cursor is not None
    started = time.perf_counter()
    await store.search_events(EventFilter(type=TYPES[3]), cursor=page.next_cursor, limit=50)
    took = time.perf_counter() - started
    found.append(("type (10%), second page by cursor", took, took, 50, True, took, 1, 50, took))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=["sqlite", "postgres"])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--path", default=None, help="SQLite file (default: a temporary one)")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_SEARCH_BUDGET_SECONDS,
        help="the search's time budget, seconds (LACUNA_ADMIN_SEARCH_BUDGET)",
    )
    args = parser.parse_args()
    path = args.path or os.path.join(tempfile.mkdtemp(prefix="lacuna-search-"), "bench.db")
    if args.backend == "sqlite" and os.path.exists(path):
        raise SystemExit(f"{path} exists: give a new --path")
    return asyncio.run(run(args, path))


async def run(args: argparse.Namespace, path: str) -> int:
    started = time.perf_counter()
    if args.backend == "sqlite":
        await fill_sqlite(path, args.events)
        url = f"sqlite:///{path}"
    else:
        import asyncpg

        name = f"lw_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(args.dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        url = f"{args.dsn.rpartition('/')[0]}/{name}"
        await fill_postgres(url, args.events)
    print(f"filled {args.events} events in {time.perf_counter() - started:.0f} s ({url})")
    store = open_store(url)
    await store.open()
    try:
        results = await measure(store, args.events, ScanBudget(args.budget))
    finally:
        await store.close()
    print(
        f"| search ({args.backend}, {args.events} events, budget {args.budget:g} s)"
        " | first answer: first / median of 3 | rows | complete"
        " | to 50 rows or the end (pages, rows) | without a budget |"
    )
    print("|---|---|---|---|---|---|")
    for label, first, median, matched, complete, walked, pages, rows, unbudgeted in results:
        print(
            f"| {label} | {first * 1000:.0f} ms / {median * 1000:.0f} ms | {matched}"
            f" | {'yes' if complete else 'no'} | {walked * 1000:.0f} ms ({pages}, {rows})"
            f" | {unbudgeted * 1000:.0f} ms |"
        )
    if args.backend == "postgres":
        import asyncpg

        admin = await asyncpg.connect(args.dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    else:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
