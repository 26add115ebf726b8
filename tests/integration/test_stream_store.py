"""The live stream's store methods (``stream_after``, ``stream_head``, ``stream_signal``), run
unchanged over every backend (the ``store`` fixture), plus what only PostgreSQL must prove:
a transaction that commits after a later one never lands behind a cursor already handed out.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.search import decode_cursor, encode_cursor
from lacuna_webhooks.store.stream import StreamSignal, follow
from tests.integration.test_store_contract import NOW, PROMPT, SECOND, event


async def drain(
    store: Store, cursor: str | None, expect: int, page: int = 2
) -> tuple[list[str], str | None]:
    """The ``expect`` events after ``cursor``, read ``page`` at a time, then proof that no
    more follow: (ids, last cursor). On PostgreSQL an event is handed out only once every
    older write transaction of the server has ended (another test's CREATE DATABASE counts),
    so an empty read is retried until ``PROMPT``."""
    seen: list[str] = []
    deadline = asyncio.get_running_loop().time() + PROMPT
    while len(seen) < expect:
        batch = await store.stream_after(cursor, page)
        if not batch:
            assert asyncio.get_running_loop().time() < deadline, f"only {seen} came"
            await asyncio.sleep(0.05)
        else:
            cursor = batch[-1][0]
            seen += [record.id for _, record in batch]
    assert await store.stream_after(cursor, page) == []
    return seen, cursor


async def after(store: Store, cursor: str | None, expect: int) -> list[str]:
    return (await drain(store, cursor, expect, page=100))[0]


async def test_every_event_once_in_order_and_resumable(store: Store) -> None:
    """From the beginning, page by page, each stored event comes once in commit order (a
    duplicate accept adds nothing); resuming after any cursor gives exactly the rest."""
    for i in range(5):
        assert await store.accept(event(f"evt_s{i}"), ["a"], now=NOW + i * SECOND)
    assert not await store.accept(event("evt_s2"), ["a"], now=NOW)
    seen, last = await drain(store, None, 5)
    assert seen == [f"evt_s{i}" for i in range(5)]
    everything = await store.stream_after(None, 100)
    for position, (cursor, _) in enumerate(everything):
        rest, _ = await drain(store, cursor, 4 - position, page=3)
        assert rest == [f"evt_s{i}" for i in range(position + 1, 5)]
    await store.accept(event("evt_s5"), [], now=NOW)
    assert await after(store, last, 1) == ["evt_s5"]


async def test_head_is_now(store: Store) -> None:
    """``stream_head`` skips what is stored already and nothing stored after it."""
    await store.accept(event("evt_old"), ["a"], now=NOW)
    head = await store.stream_head()
    assert await store.stream_after(head, 10) == []
    await store.accept(event("evt_new"), ["a"], now=NOW)
    assert await after(store, head, 1) == ["evt_new"]


async def test_bad_cursors_are_refused(store: Store) -> None:
    """Garbage, a search cursor, another backend's cursor, a negative position: ValueError."""
    kind, size = _kind(await store.stream_head())
    others = {"m": encode_cursor("m", 1), "s": encode_cursor("s", 1), "p": encode_cursor("p", 1, 1)}
    bad = ["", "x", "!!!", encode_cursor(1, 2), encode_cursor("z", 1), "A" * 300]
    bad += [cursor for name, cursor in others.items() if name != kind]
    bad += [encode_cursor(kind, *[-1] * size), encode_cursor(kind, *["1"] * size)]
    bad += [
        encode_cursor(kind, *[True] * size),
        encode_cursor(kind, *[2**63] * size),
        encode_cursor(kind, *[1.5] * size),
    ]
    for cursor in bad:
        with pytest.raises(ValueError, match="cursor"):
            await store.stream_after(cursor, 10)


def _kind(cursor: str) -> tuple[str, int]:
    """The backend tag of a stream cursor and how many positions it holds."""
    for size in (1, 2):
        try:
            parts = decode_cursor(cursor, size + 1)
        except ValueError:
            continue
        return str(parts[0]), size
    raise AssertionError(cursor)


async def test_positions_survive_pruning_every_event(store: Store) -> None:
    """Pruning every event never lets a position be handed out twice: an event stored after
    the prune is still after the cursor of the pruned ones."""
    await store.accept(event("evt_p1"), [], now=NOW)
    await store.accept(event("evt_p2"), [], now=NOW)
    _, cursor = await drain(store, None, 2)
    assert await store.prune(received_before=NOW + timedelta(days=1)) == 2
    await store.accept(event("evt_p3"), [], now=NOW + timedelta(days=2))
    assert await after(store, cursor, 1) == ["evt_p3"]


async def test_signal_wakes_a_follower_on_accept(store: Store) -> None:
    """``follow`` hands out what is stored, then wakes on an accept well before its poll."""
    stopping = asyncio.Event()
    got: list[str] = []

    async def run() -> None:
        async for batch in follow(store, None, stopping=stopping, idle_seconds=60):
            got.extend(record.id for _, record in batch)
            if len(got) == 2:
                return

    await store.accept(event("evt_f1"), [], now=NOW)
    task = asyncio.create_task(run())
    await asyncio.sleep(0.2)
    await store.accept(event("evt_f2"), [], now=NOW)
    await asyncio.wait_for(task, PROMPT)
    assert got == ["evt_f1", "evt_f2"]


async def test_follow_ends_when_stopping() -> None:
    """A follower waiting for events ends at once when ``stopping`` is set."""
    from lacuna_webhooks.store.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    stopping = asyncio.Event()

    async def run() -> int:
        count = 0
        async for batch in follow(
            store, await store.stream_head(), stopping=stopping, idle_seconds=60
        ):
            count += len(batch)
        return count

    task = asyncio.create_task(run())
    await asyncio.sleep(0.1)
    stopping.set()
    assert await asyncio.wait_for(task, PROMPT) == 0


async def test_signal_mark_taken_before_a_notify_is_not_lost() -> None:
    signal = StreamSignal(poll_seconds=60)
    mark = signal.mark()
    signal.notify()
    await asyncio.wait_for(signal.wait(mark, 60), PROMPT)


async def test_sqlite_positions_survive_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The SQLite counter is in the file: after a reopen, a cursor of before still resumes
    exactly after its event, and new events follow the old ones."""
    path = tmp_path / "events.db"
    first = open_store(f"sqlite:///{path}")
    await first.open()
    await first.accept(event("evt_r1"), [], now=NOW)
    ((cursor, _),) = await first.stream_after(None, 10)
    await first.accept(event("evt_r2"), [], now=NOW)
    await first.close()
    second = open_store(f"sqlite:///{path}", sqlite_process=True)
    await second.open()
    try:
        await second.accept(event("evt_r3"), [], now=NOW)
        assert await after(second, cursor, 2) == ["evt_r2", "evt_r3"]
    finally:
        await second.close()


# --- PostgreSQL: commits out of order -----------------------------------------------------------


@pytest.mark.postgres
async def test_postgres_holds_back_rows_behind_an_open_transaction(postgres_dsn: str) -> None:
    """Transaction A inserts an event and stays open; B inserts a later event and commits.
    B's event is not handed out while A is open (else a cursor after B would skip A's event
    for good); once A commits, both come, A's first. Repeated from a cursor taken between."""
    store = open_store(postgres_dsn)
    await store.open()
    holder = await asyncpg.connect(postgres_dsn)
    try:
        await store.accept(event("evt_before"), [], now=NOW)
        _, cursor = await drain(store, None, 1)
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(
            "INSERT INTO events (id, type, received_at, raw) VALUES ($1, 't', now(), '{}')",
            "evt_held",
        )
        assert await store.accept(event("evt_later"), [], now=NOW)
        # B is committed and visible, yet held back behind A.
        assert await store.get_event("evt_later") is not None
        assert await store.stream_after(cursor, 10) == []
        head = await store.stream_head()
        await transaction.commit()
        assert await after(store, cursor, 2) == ["evt_held", "evt_later"]
        # "Now" taken while A was open was below A: nothing after it is skipped.
        assert await after(store, head, 2) == ["evt_held", "evt_later"]
    finally:
        await holder.close()
        await store.close()


@pytest.mark.postgres
async def test_postgres_other_replicas_events_reach_a_follower(postgres_dsn: str) -> None:
    """Two stores on one database (two replicas): a follower on one sees the other's accepts
    promptly, in order, each once."""
    one, two = open_store(postgres_dsn), open_store(postgres_dsn)
    await one.open()
    await two.open()
    stopping = asyncio.Event()
    got: list[str] = []

    async def run() -> None:
        async for batch in follow(one, await one.stream_head(), stopping=stopping, idle_seconds=60):
            got.extend(record.id for _, record in batch)
            if len(got) == 20:
                return

    try:
        task = asyncio.create_task(run())
        await asyncio.sleep(0.2)
        writers = [
            asyncio.gather(*(store.accept(event(f"evt_x{n}_{i}"), [], now=NOW) for i in range(5)))
            for n, store in enumerate((one, two, one, two))
        ]
        await asyncio.gather(*writers)
        await asyncio.wait_for(task, PROMPT)
        assert sorted(got) == sorted(f"evt_x{n}_{i}" for n in range(4) for i in range(5))
        assert len(set(got)) == 20
    finally:
        stopping.set()
        await one.close()
        await two.close()


@pytest.mark.postgres
async def test_postgres_orders_by_transaction_id_as_a_number(postgres_dsn: str) -> None:
    """Rows written by transactions 9999 and 10000 come in that order (a sort of the ids as
    text would put 10000 first); within one transaction, by seq."""
    store = open_store(postgres_dsn)
    await store.open()
    writer = await asyncpg.connect(postgres_dsn)
    try:
        # A fresh server has handed out fewer ids than that: use some up (a transaction each).
        current = int(await writer.fetchval("SELECT pg_current_xact_id()::text"))
        if current <= 10_000:
            await writer.execute(
                f"DO $$ BEGIN FOR i IN 1..{10_001 - current} LOOP"
                " PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
            )
        assert int(await writer.fetchval("SELECT pg_current_xact_id()::text")) > 10_000
        for event_id, xid in [
            ("evt_10000_a", "10000"),
            ("evt_9999", "9999"),
            ("evt_10000_b", "10000"),
        ]:
            await writer.execute(
                "INSERT INTO events (id, type, received_at, raw, xid)"
                " VALUES ($1, 't', now(), '{}', $2::text::xid8)",
                event_id,
                xid,
            )
        assert await after(store, None, 3) == ["evt_9999", "evt_10000_a", "evt_10000_b"]
    finally:
        await writer.close()
        await store.close()


# --- migration 0008 over events stored before it --------------------------------------------


async def test_sqlite_migration_numbers_existing_events_in_insert_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file at version 7 with events: 0008 numbers them in insert order, from=beginning
    gives them first, and new events come after them."""
    from lacuna_webhooks.store.sqlite import operations as ops

    path = tmp_path / "events.db"
    everything = ops.migrations()
    monkeypatch.setattr(ops, "migrations", lambda: [m for m in everything if m[0] <= 7])
    conn = sqlite3.connect(path)
    ops.migrate(conn)
    for event_id in ("evt_m2", "evt_m1", "evt_m3"):
        conn.execute(
            "INSERT INTO events (id, type, received_at, raw) VALUES (?, 't', 1, X'7B7D')",
            (event_id,),
        )
    conn.commit()
    conn.close()
    monkeypatch.setattr(ops, "migrations", lambda: everything)
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        await store.accept(event("evt_new"), [], now=NOW)
        assert await after(store, None, 4) == ["evt_m2", "evt_m1", "evt_m3", "evt_new"]
    finally:
        await store.close()


@pytest.mark.postgres
async def test_postgres_migration_puts_existing_events_first(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database at version 7 with events: after 0008 they come first, in seq order, then
    events stored since."""
    from lacuna_webhooks.store.postgres import store as pg

    everything = pg._migrations()
    monkeypatch.setattr(pg, "_migrations", lambda: [m for m in everything if m[0] <= 7])
    old = open_store(postgres_dsn)
    await old.open()
    await old.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        for event_id in ("evt_m2", "evt_m1"):
            await conn.execute(
                "INSERT INTO events (id, type, received_at, raw) VALUES ($1, 't', now(), '{}')",
                event_id,
            )
    finally:
        await conn.close()
    monkeypatch.setattr(pg, "_migrations", lambda: everything)
    store = open_store(postgres_dsn)
    await store.open()
    try:
        await store.accept(event("evt_new"), [], now=NOW)
        assert await after(store, None, 3) == ["evt_m2", "evt_m1", "evt_new"]
    finally:
        await store.close()


async def test_a_read_stops_at_its_byte_budget_and_always_hands_out_one(store: Store) -> None:
    """``max_bytes`` bounds the bodies one read holds (the live stream held 100 bodies of up
    to 1 MiB each, several times that once encoded): the read stops before the body that
    would pass it, and one event larger than the whole budget still comes, alone."""
    sizes = {}
    for i in range(6):
        stored = event(f"evt_b{i}")
        sizes[stored.id] = len(stored.raw)
        assert await store.accept(stored, [], now=NOW + i * SECOND)
    one = max(sizes.values())
    seen: list[str] = []
    cursor = None
    deadline = asyncio.get_running_loop().time() + PROMPT
    while len(seen) < 6:
        batch = await store.stream_after(cursor, 100, max_bytes=2 * one + one // 2)
        if not batch:
            assert asyncio.get_running_loop().time() < deadline, f"only {seen} came"
            await asyncio.sleep(0.05)
            continue
        assert len(batch) <= 2, [record.id for _, record in batch]
        assert len(batch) == 2 or len(seen) + len(batch) == 6
        cursor = batch[-1][0]
        seen += [record.id for _, record in batch]
    assert seen == [f"evt_b{i}" for i in range(6)]
    alone = await store.stream_after(None, 100, max_bytes=1)
    assert [record.id for _, record in alone] == ["evt_b0"]
