"""What the SQLite store adds to the contract: a real file, WAL, migrations, group commit.

The shared behaviour is in ``test_store_contract.py``. Here a second, plain
``sqlite3`` connection to the same file plays the other peer: it inspects the
file, holds the write lock (so that a batch is known to form while the writer
waits), or breaks the schema underneath the store.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from lacuna_webhooks.errors import StoreUnavailable
from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.store import open_store
from lacuna_webhooks.store.sqlite import SQLiteStore, migrate, migrations
from lacuna_webhooks.store.sqlite import process as sqlite_process
from lacuna_webhooks.store.sqlite import store as sqlite_store
from tests.conftest import make_event, process_exited

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
SECOND = timedelta(seconds=1)
# A bound for something that should happen promptly; a failure if exceeded, never a measurement.
PROMPT = 10.0


def event(event_id: str | None = None, **kwargs: Any) -> Event:
    return Event.from_body(orjson.dumps(make_event(event_id, **kwargs)))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "events.db"


@pytest.fixture(params=["thread", "process"])
async def store(db_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[SQLiteStore]:
    """The store, with its writer in a thread and, as ``serve`` runs it, in a child process."""
    s = SQLiteStore(str(db_path), process=request.param == "process")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# The writer in a thread (the library default) and in a child process (what ``serve`` runs).
WRITERS = pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])


@contextmanager
def peer(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to the store's file, outside the store."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=PROMPT)
    try:
        yield conn
    finally:
        conn.close()


async def until(condition: Callable[[], bool]) -> None:
    """Poll until ``condition()`` holds; fail after ``PROMPT`` seconds."""
    async with asyncio.timeout(PROMPT):
        # The writer thread's queue has no awaitable to wait on: polling is the honest way.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def stored_ids(path: Path) -> set[str]:
    with peer(path) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM events")}


# --- the file -------------------------------------------------------------------------------


async def test_wal_synchronous_and_busy_timeout_are_set(store: SQLiteStore, db_path: Path) -> None:
    """The store runs in WAL mode with synchronous=FULL by default and a busy timeout."""
    settings = await store.diagnostics()
    assert settings["journal_mode"] == "wal"
    assert settings["synchronous"] == 2  # FULL
    assert isinstance(settings["busy_timeout"], int)
    assert settings["busy_timeout"] > 0
    with peer(db_path) as conn:  # WAL is a property of the file, seen by any connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@WRITERS
async def test_synchronous_normal_on_request(tmp_path: Path, process: bool) -> None:
    """``open_store(..., sqlite_synchronous="normal")`` runs with synchronous=NORMAL."""
    s = open_store(
        f"sqlite:///{tmp_path / 'n.db'}", sqlite_synchronous="normal", sqlite_process=process
    )
    assert isinstance(s, SQLiteStore)
    await s.open()
    try:
        assert (await s.diagnostics())["synchronous"] == 1  # NORMAL
    finally:
        await s.close()


def test_unknown_synchronous_level_is_refused() -> None:
    """Only ``full`` and ``normal`` are accepted."""
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore("x.db", synchronous="off")


@WRITERS
async def test_one_missing_folder_is_created(tmp_path: Path, process: bool) -> None:
    """``open()`` creates a missing data folder (one level)."""
    path = tmp_path / "data" / "events.db"
    s = SQLiteStore(str(path), process=process)
    await s.open()
    await s.close()
    assert path.is_file()


@WRITERS
async def test_a_mistyped_deep_path_is_refused_not_created(tmp_path: Path, process: bool) -> None:
    """Two or more missing levels are a mistyped URL (three slashes for an absolute path):
    refused with the rule in the message, and no folder is left behind."""
    path = tmp_path / "var" / "lib" / "lacuna" / "events.db"
    s = SQLiteStore(str(path), process=process)
    with pytest.raises(StoreUnavailable, match="four slashes"):
        await s.open()
    await s.close()
    assert not (tmp_path / "var").exists()


async def test_data_survives_close_and_reopen(store: SQLiteStore, db_path: Path) -> None:
    """Events, deliveries, attempts and task state are in the file after a reopen."""
    original = event("evt_keep", task_id="cm_keep")
    assert await store.accept(original, ["a"], now=NOW)
    (delivery,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    await store.complete(delivery, Attempt(NOW, NOW + SECOND, AttemptOutcome.OK))
    await store.close()

    again = SQLiteStore(str(db_path))
    await again.open()
    try:
        record = await again.get_event("evt_keep")
        assert record is not None
        assert record.raw == original.raw
        assert record.received_at == NOW
        (row,) = await again.list_deliveries(event_id="evt_keep")
        assert row.status.value == "done"
        assert len(await again.list_attempts(row.id)) == 1
        task = await again.get_task("cm_keep")
        assert task is not None
        assert task.event_id == "evt_keep"
        assert await again.accept(event("evt_keep"), ["a"], now=NOW) is False
    finally:
        await again.close()


# --- migrations -----------------------------------------------------------------------------


async def test_migrations_are_recorded_and_applied_once(store: SQLiteStore, db_path: Path) -> None:
    """Each packaged migration is recorded once in schema_version; reopening applies nothing."""
    known = migrations()
    assert known[0][:2] == (1, "0001_init.sql")
    await store.close()
    reopened = SQLiteStore(str(db_path))
    await reopened.open()
    assert (await reopened.diagnostics())["schema_version"] == known[-1][0]
    await reopened.close()
    with peer(db_path) as conn:
        rows = conn.execute("SELECT version, name FROM schema_version ORDER BY version").fetchall()
        assert rows == [(version, name) for version, name, _ in known]
        assert migrate(conn) == []
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "deliveries", "attempts", "tasks", "schema_version"} <= tables


@WRITERS
async def test_a_newer_schema_is_refused(db_path: Path, process: bool) -> None:
    """A file migrated by a newer release is refused with a clear error, not altered."""
    s = SQLiteStore(str(db_path))
    await s.open()
    await s.close()
    with peer(db_path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (9999, '9999_future.sql', 0)")
    newer = SQLiteStore(str(db_path), process=process)
    with pytest.raises(StoreUnavailable, match="newer"):
        await newer.open()
    await newer.close()


# --- group commit ---------------------------------------------------------------------------


async def test_many_concurrent_accepts_are_group_committed(
    store: SQLiteStore, db_path: Path
) -> None:
    """300 concurrent accepts all resolve True, all are stored, in fewer transactions."""
    events = [event(f"evt_many_{i}") for i in range(300)]
    before = store.writer_stats
    results = await asyncio.gather(*(store.accept(e, ["a"], now=NOW) for e in events))
    assert results == [True] * 300
    after = store.writer_stats
    assert after.accepts - before.accepts == 300
    assert after.batches - before.batches < 300
    assert stored_ids(db_path) == {e.id for e in events}


async def _queue_one_batch(
    store: SQLiteStore,
    db_path: Path,
    rest: list[tuple[Event, list[str]]],
    *,
    underneath: str | None = None,
) -> tuple[asyncio.Task[bool], list[asyncio.Task[bool]]]:
    """Hold the file's write lock from a peer connection (first running ``underneath`` in
    its transaction), get an ``evt_head`` accept taken by the writer, which then waits for
    the lock, queue ``rest`` behind it, so that ``rest`` is known to be one batch, and let go.
    """
    with peer(db_path) as lock:
        lock.execute("BEGIN IMMEDIATE")
        if underneath is not None:
            lock.execute(underneath)
        head = asyncio.create_task(store.accept(event("evt_head"), [], now=NOW))
        await asyncio.sleep(0)
        await until(lambda: store.writer_stats.queued == 0)
        tail = [asyncio.create_task(store.accept(e, h, now=NOW)) for e, h in rest]
        await until(lambda: store.writer_stats.queued == len(rest))
        lock.execute("COMMIT")
    return head, tail


async def test_duplicates_inside_one_batch(store: SQLiteStore, db_path: Path) -> None:
    """Two copies of an id in the same batch: exactly one True, one delivery."""
    rest = [(event(f"evt_b_{i}"), ["a"]) for i in range(20)]
    rest += [(event("evt_twin"), ["a"]), (event("evt_twin"), ["a"])]
    before = store.writer_stats
    head, tail = await _queue_one_batch(store, db_path, rest)
    assert await head is True
    results = await asyncio.gather(*tail)
    assert store.writer_stats.batches - before.batches == 2  # the head, then all the rest
    assert results[:20] == [True] * 20
    assert sorted(results[20:]) == [False, True]
    assert len(await store.list_deliveries(event_id="evt_twin")) == 1


async def test_a_row_failing_in_a_batch_fails_alone(store: SQLiteStore, db_path: Path) -> None:
    """When one row of a batch is refused by the database (here a trigger from underneath the
    store), only its accept raises StoreUnavailable: the batch is retried row by row and
    the other events of the same group commit are stored with their deliveries."""
    good = [(event(f"evt_fine_{i}"), ["a"] if i % 2 else []) for i in range(9)]
    batch = [*good[:5], (event("evt_doomed"), ["a"]), *good[5:]]
    doom = (
        "CREATE TRIGGER doom BEFORE INSERT ON events WHEN NEW.id = 'evt_doomed'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    before = store.writer_stats
    head, tail = await _queue_one_batch(store, db_path, batch, underneath=doom)
    assert await head is True
    results = await asyncio.gather(*tail, return_exceptions=True)
    assert store.writer_stats.batches - before.batches == 2  # the head, then all the rest
    assert isinstance(results[5], StoreUnavailable), results
    assert results[:5] + results[6:] == [True] * 9
    assert stored_ids(db_path) == {"evt_head"} | {e.id for e, _ in good}
    with peer(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries").fetchone() == (4,)
    await store.ping()
    assert await store.accept(event("evt_after"), ["a"], now=NOW) is True


async def test_poison_event_fails_alone_in_its_batch(store: SQLiteStore, db_path: Path) -> None:
    """An event with a value SQLite cannot bind (``created`` beyond 64 bits, which
    ``Event.from_body`` refuses, built here directly) in one group commit with 20 good ones:
    only it fails; the good ones are stored and the writer keeps serving."""
    good = [(event(f"evt_good_{i}"), ["a"]) for i in range(20)]
    plain = event("evt_poison")
    poison = Event(
        id=plain.id, type=plain.type, payload=plain.payload, raw=plain.raw, created=2**63
    )
    batch = [*good[:10], (poison, ["a"]), *good[10:]]
    before = store.writer_stats
    head, tail = await _queue_one_batch(store, db_path, batch)
    assert await head is True
    results = await asyncio.gather(*tail, return_exceptions=True)
    assert store.writer_stats.batches - before.batches == 2
    assert isinstance(results[10], StoreUnavailable), results
    assert results[:10] + results[11:] == [True] * 20
    assert stored_ids(db_path) == {"evt_head"} | {e.id for e, _ in good}
    assert await store.accept(event("evt_after"), ["a"], now=NOW) is True


@WRITERS
async def test_corrupted_file_gives_store_unavailable(db_path: Path, process: bool) -> None:
    """A damaged page surfaces as StoreUnavailable on accept (never a hang or a crash)."""
    s = SQLiteStore(str(db_path), process=process)
    await s.open()
    await s.accept(event("evt_before"), [], now=NOW)
    await s.close()
    with peer(db_path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_events_1'"
        ).fetchone()
    with db_path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)

    damaged = SQLiteStore(str(db_path), process=process)
    try:
        await damaged.open()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(damaged.accept(event("evt_new"), [], now=NOW), PROMPT)
    finally:
        await damaged.close()


@WRITERS
async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path, process: bool) -> None:
    """open() of a non-database file raises StoreUnavailable naming the path."""
    path = tmp_path / "notes.db"
    path.write_text("this is not a database\n" * 100)
    s = SQLiteStore(str(path), process=process)
    with pytest.raises(StoreUnavailable, match=re.escape(str(path))):
        await asyncio.wait_for(s.open(), PROMPT)
    with pytest.raises(StoreUnavailable):
        await s.accept(event(), [], now=NOW)
    await s.close()


@WRITERS
async def test_an_uncreatable_folder_is_refused(tmp_path: Path, process: bool) -> None:
    """open() below a regular file raises StoreUnavailable naming the path."""
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "events.db"
    s = SQLiteStore(str(path), process=process)
    with pytest.raises(StoreUnavailable, match=re.escape(str(path.parent))):
        await asyncio.wait_for(s.open(), PROMPT)


@WRITERS
async def test_close_with_accepts_in_flight(db_path: Path, process: bool) -> None:
    """Accepts racing close() each end as True (and stored) or StoreUnavailable; none hangs."""
    s = SQLiteStore(str(db_path), process=process)
    await s.open()
    events = [event(f"evt_close_{i}") for i in range(100)]
    tasks = [asyncio.create_task(s.accept(e, ["a"], now=NOW)) for e in events[:50]]
    await asyncio.sleep(0)
    closing = asyncio.create_task(s.close())
    tasks += [asyncio.create_task(s.accept(e, ["a"], now=NOW)) for e in events[50:]]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), PROMPT)
    await asyncio.wait_for(closing, PROMPT)
    confirmed = {e.id for e, r in zip(events, results, strict=True) if r is True}
    assert all(r is True or isinstance(r, StoreUnavailable) for r in results), results
    assert confirmed  # those queued before close() are still served
    assert stored_ids(db_path) == confirmed


# --- a crash --------------------------------------------------------------------------------

_WRITER_SCRIPT = """
import asyncio, sys
from datetime import datetime, UTC
from lacuna_webhooks.models import Event
from lacuna_webhooks.store.sqlite import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1], process=sys.argv[2] == "process")
    await store.open()
    sys.stdout.write(f"writer {store._writer.pid if store.process else 0}\\n")
    counter = iter(range(10**9))

    async def loop():
        for i in counter:
            event_id = f"evt_crash_{i}"
            body = ('{"id":"%s","type":"job.completed","data":{"id":"cm%d"},"pad":"%s"}'
                    % (event_id, i, "x" * int(sys.argv[3])))
            if await store.accept(Event.from_body(body.encode()), ["a"], now=datetime.now(UTC)):
                sys.stdout.write(event_id + "\\n")
                sys.stdout.flush()

    await asyncio.gather(*(loop() for _ in range(32)))

asyncio.run(main())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@WRITERS
@pytest.mark.parametrize(
    ("padding", "count"),
    [(0, 300), (4000, 6000)],
    # 6000 events of 4 KB, about 12,000 WAL pages: several checkpoints meanwhile (the writer
    # process's checkpoint thread starts the WAL over every 1000 pages), and in the writer
    # process the kill reaches the writer itself too, wherever its thread is.
    ids=["small", "checkpointing"],
)
async def test_sigkill_mid_batch_loses_nothing_confirmed(
    db_path: Path, process: bool, padding: int, count: int
) -> None:
    """A process killed while accepts are being committed (and, with enough data, while
    checkpoints copy the WAL into the file) loses no accept it confirmed, and the file
    opens cleanly afterwards; a writer process of its own exits with it, or is killed
    first."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WRITER_SCRIPT,
        str(db_path),
        "process" if process else "thread",
        str(padding),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    head = await asyncio.wait_for(proc.stdout.readline(), 60)
    writer_pid = int(head.split()[1])
    assert (writer_pid != 0) is process
    confirmed: set[str] = set()
    try:
        async with asyncio.timeout(60):
            while len(confirmed) < count:
                line = await proc.stdout.readline()
                assert line, "the writer process ended early"
                confirmed.add(line.decode().strip())
    finally:
        if process and padding:
            os.kill(writer_pid, signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
    rest = await asyncio.wait_for(proc.stdout.read(), PROMPT)
    confirmed |= {line for line in rest.decode().splitlines() if line}
    await asyncio.wait_for(proc.wait(), PROMPT)
    if process:
        await until(lambda: process_exited(writer_pid))

    s = SQLiteStore(str(db_path))
    await s.open()
    await s.close()
    with peer(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert confirmed <= stored_ids(db_path)


# --- the writer process --------------------------------------------------------------------


async def test_a_killed_writer_process_fails_its_waiters_and_is_replaced(db_path: Path) -> None:
    """SIGKILL of the writer child: each accept in flight ends True (and stored) or
    StoreUnavailable, never hangs; a new child takes over and the store works again."""
    s = SQLiteStore(str(db_path), process=True)
    await s.open()
    try:
        first = s._writer.pid
        assert isinstance(first, int)
        events = [event(f"evt_kill_{i}") for i in range(400)]
        tasks = [asyncio.create_task(s.accept(e, ["a"], now=NOW)) for e in events]
        await asyncio.sleep(0)
        os.kill(first, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), PROMPT)
        assert all(r is True or isinstance(r, StoreUnavailable) for r in results), results
        assert any(isinstance(r, StoreUnavailable) for r in results)
        confirmed = {e.id for e, r in zip(events, results, strict=True) if r is True}

        async def works() -> bool:
            try:
                return await s.accept(event("evt_after_kill"), ["a"], now=NOW)
            except StoreUnavailable:
                await asyncio.sleep(0.05)
                return False

        async with asyncio.timeout(PROMPT):
            while not await works():
                pass
        assert s._writer.pid not in (None, first)
        assert confirmed | {"evt_after_kill"} <= stored_ids(db_path)
        assert await s.accept(event("evt_after_kill"), ["a"], now=NOW) is False
    finally:
        await s.close()
    assert process_exited(first)


async def test_a_stuck_writer_process_is_killed_and_replaced(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that stops answering (here SIGSTOP) is killed after STALL_SECONDS: its waiters
    get StoreUnavailable instead of hanging, and a new child serves the next accepts."""
    monkeypatch.setattr(sqlite_process, "STALL_SECONDS", 0.5)
    monkeypatch.setattr(sqlite_process, "WATCH_INTERVAL_SECONDS", 0.1)
    s = SQLiteStore(str(db_path), process=True)
    await s.open()
    try:
        stuck = s._writer.pid
        assert isinstance(stuck, int)
        os.kill(stuck, signal.SIGSTOP)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.accept(event("evt_stuck"), [], now=NOW), PROMPT)
        await until(lambda: process_exited(stuck))
        async with asyncio.timeout(PROMPT):
            while True:
                try:
                    assert await s.accept(event("evt_unstuck"), [], now=NOW) is True
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.05)
        assert s._writer.pid not in (None, stuck)
    finally:
        await s.close()


#: The -wal file's bound (docs/internals.md, "Durability"): the writer process's checkpoint
#: thread starts the WAL over once it holds 1000 pages (RESTART past 16384), and the file stays
#: near that size; 64 MiB is also journal_size_limit.
WAL_BOUND_BYTES = 64 * 1024 * 1024


async def test_the_wal_stays_bounded_while_the_writer_process_commits(db_path: Path) -> None:
    """While about 100 MB of WAL frames are committed in group commits by ``serve``'s writer
    process, its checkpoint thread keeps the -wal file under ``WAL_BOUND_BYTES`` (with the
    thread's rounds taken out it reaches 73 MB here)."""
    s = SQLiteStore(str(db_path), process=True)
    await s.open()
    wal = f"{db_path}-wal"
    largest = 0
    try:
        lyrics = "la " * 1300  # about 4 KB of body: about two WAL pages an event, indexes aside
        for round_ in range(120):
            batch = [event(f"evt_wal_{round_}_{i}", lyrics=lyrics) for i in range(100)]
            assert await asyncio.gather(*(s.accept(e, [], now=NOW) for e in batch)) == [True] * 100
            largest = max(largest, os.path.getsize(wal))  # noqa: ASYNC240 (a stat, between batches)
    finally:
        await s.close()
    assert 0 < largest <= WAL_BOUND_BYTES, largest


async def test_big_events_are_spread_over_several_batches(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer process sends at most MAX_BATCH_BYTES of rows per batch (at least one row):
    queued big events become several commits, every one stored."""
    monkeypatch.setattr(sqlite_process, "MAX_BATCH_BYTES", 10_000)
    s = SQLiteStore(str(db_path), process=True)
    await s.open()
    try:
        lyrics = "la " * 1400  # about 4.2 KB of body each: two fit in 10 KB, three do not
        rest = [(event(f"evt_big_{i}", lyrics=lyrics), ["a"]) for i in range(10)]
        before = s.writer_stats
        head, tail = await _queue_one_batch(s, db_path, rest)
        assert await head is True
        assert await asyncio.gather(*tail) == [True] * 10
        assert s.writer_stats.batches - before.batches == 1 + 5
    finally:
        await s.close()
    assert stored_ids(db_path) == {"evt_head"} | {e.id for e, _ in rest}


async def test_the_writer_process_ignores_sigterm_and_sigint(db_path: Path) -> None:
    """A service manager's SIGTERM or a terminal's Ctrl-C reach the whole process group: the
    writer keeps serving (the parent still drains through it) and leaves when closed."""
    s = SQLiteStore(str(db_path), process=True)
    await s.open()
    pid = s._writer.pid
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    assert await s.accept(event("evt_after_signals"), [], now=NOW) is True
    assert s._writer.pid == pid
    await s.close()
    await until(lambda: process_exited(pid))


# --- the one-statement batch writes exactly what row-by-row writes --------------------------


async def test_a_batch_is_its_rows_one_by_one(tmp_path: Path) -> None:
    """Random batches with in-batch duplicates, several events per task and stale ones give
    the same answers and the same tables as the same rows committed one at a time."""
    import random

    from lacuna_webhooks.store.rules import task_order
    from lacuna_webhooks.store.sqlite.operations import (
        AcceptRow,
        accept_batch,
        create_batch_schema,
    )

    def one_by_one(conn: sqlite3.Connection, rows: list[AcceptRow]) -> list[bool]:
        return [accept_batch(conn, [row])[0] for row in rows]

    paths = [tmp_path / "multi.db", tmp_path / "rows.db"]
    for path in paths:
        s = SQLiteStore(str(path))
        await s.open()
        await s.close()
    conns = [sqlite3.connect(path, isolation_level=None) for path in paths]
    for conn in conns:
        create_batch_schema(conn)
    rng = random.Random(7)
    try:
        for batch_no in range(60):
            rows = []
            for _ in range(rng.randrange(1, 250)):
                created = rng.choice([None, *range(1000, 1010)])
                rows.append(
                    AcceptRow(
                        event_id=f"evt_{rng.randrange(40)}",
                        event_type=rng.choice(["job.completed", "job.failed"]),
                        created=created,
                        received_at=2000.0 + batch_no,
                        task_id=rng.choice([None, "cm_a", "cm_b", "cm_c"]),
                        task_status=rng.choice(["ready", "failed"]),
                        raw=b"{}",
                        handlers=tuple(rng.sample(["a", "b", "c"], rng.randrange(3))),
                        order=task_order(created, 2000.0 + batch_no),
                    )
                )
            answers = []
            for conn, write in zip(conns, (accept_batch, one_by_one), strict=True):
                answers.append(write(conn, rows))
                assert not conn.in_transaction  # each commits its batch itself
            assert answers[0] == answers[1]
        for table, order in (
            ("events", "id"),
            ("deliveries", "event_id, handler"),
            ("tasks", "task_id"),
        ):
            dumps = [
                conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall() for conn in conns
            ]
            if table == "deliveries":  # ids differ by insertion order; compare the content
                dumps = [[row[1:] for row in dump] for dump in dumps]
            assert dumps[0] == dumps[1], table
            assert dumps[0], table
    finally:
        for conn in conns:
            conn.close()


@WRITERS
@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_database_wal_and_shm_are_owner_only(
    tmp_path: Path, process: bool, umask: int
) -> None:
    """A new database and its -wal and -shm files are created 0600 whatever the umask, and a
    new folder for it 0700 (issue 10: the events are customer data)."""
    path = tmp_path / "new" / "events.db"
    previous = os.umask(umask)
    try:
        s = SQLiteStore(str(path), process=process)
        await s.open()
    finally:
        os.umask(previous)
    try:
        await s.accept(event("evt_mode"), ["a"], now=NOW)
        modes = {
            name: (tmp_path / "new" / name).stat().st_mode & 0o777
            for name in ("events.db", "events.db-wal", "events.db-shm")
        }
        assert modes == dict.fromkeys(modes, 0o600)
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    finally:
        await s.close()


async def test_a_database_behind_a_dangling_link_is_created_owner_only(tmp_path: Path) -> None:
    """The path is a symbolic link to a file not created yet (a data folder kept on another
    disk): the file is created 0600 through the link, as a plain path's is (it was created
    with the umask's 0644, the link taken for an existing file)."""
    (tmp_path / "disk").mkdir()
    link = tmp_path / "events.db"
    link.symlink_to(tmp_path / "disk" / "events.db")
    previous = os.umask(0o022)
    try:
        s = SQLiteStore(str(link), process=True)
        await s.open()
    finally:
        os.umask(previous)
    try:
        assert await s.accept(event("evt_linked"), ["a"], now=NOW) is True
    finally:
        await s.close()
    assert link.is_symlink()
    assert (tmp_path / "disk" / "events.db").stat().st_mode & 0o777 == 0o600


async def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    """A file the operator created (here 0640) is opened as it is, not re-moded."""
    path = tmp_path / "events.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    s = SQLiteStore(str(path))
    await s.open()
    await s.close()
    assert path.stat().st_mode & 0o777 == 0o640


async def test_an_sqlite_older_than_supported_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below ``MIN_SQLITE_VERSION`` (3.35: ``RETURNING``) the store refuses to open with one
    line naming the version found and the one needed, instead of failing at the first claim.
    (The library reports an older version here; the file and the checks are real.)"""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    store = SQLiteStore(str(tmp_path / "old.db"))
    with pytest.raises(StoreUnavailable, match=r"SQLite 3\.34\.1 is too old .* needs 3\.35"):
        await store.open()


async def test_a_finish_failing_half_way_keeps_neither_its_attempt_nor_its_outcome(
    store: SQLiteStore, db_path: Path
) -> None:
    """SQLite's ``finish`` is two statements (the attempt row, then the outcome): when the
    second fails, the writer's transaction takes the first back with it, the caller hears
    StoreUnavailable, the claim is still live and the writer serves on."""
    await store.accept(event("evt_half"), ["a"], now=NOW)
    (claimed,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    with peer(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_done BEFORE UPDATE OF status ON deliveries"
            " WHEN NEW.status = 'done' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(StoreUnavailable, match="refused"):
        await store.complete(claimed, Attempt(NOW, NOW + SECOND, AttemptOutcome.OK))
    assert await store.list_attempts(claimed.id) == []
    (record,) = await store.list_deliveries(event_id="evt_half")
    assert (record.status.value, record.lease_until) == ("pending", NOW + LEASE)
    with peer(db_path) as conn:
        conn.execute("DROP TRIGGER refuse_done")
    assert await store.complete(claimed, Attempt(NOW, NOW + SECOND, AttemptOutcome.OK))
    assert len(await store.list_attempts(claimed.id)) == 1


async def test_a_clock_step_back_moves_a_backlog_in_chunks_letting_intake_through(
    store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bringing a backlog forward after a step back is written chunk by chunk, each its own
    transaction: an accept queued meanwhile commits between two chunks. In one UPDATE it
    waited for all of them (300,000 pending deliveries held the single writer, and every
    webhook, 3.3 s; a million, 15 s, past a sender's timeout)."""
    monkeypatch.setattr(sqlite_store, "BRING_FORWARD_CHUNK", 10)
    for i in range(30):
        assert await store.accept(event(f"evt_{i:02}"), ["a"], now=NOW)
    claimed = await store.claim(handler="a", limit=30, lease=LEASE, now=NOW)
    later = NOW + timedelta(hours=2)
    for delivery in claimed:
        assert await store.retry(
            delivery, Attempt(NOW, NOW + SECOND, AttemptOutcome.RETRY, "x"), at=later
        )
    stepped = NOW - timedelta(hours=1)

    def moved() -> int:
        with peer(db_path) as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM deliveries WHERE event_id != 'evt_new'"
                " AND next_attempt_at < ?",
                (later.timestamp(),),
            ).fetchone()
        return int(count)

    step = asyncio.create_task(store.clock_stepped_back(by=timedelta(hours=1), now=stepped))
    await asyncio.sleep(0)  # its first write is queued on the writer
    deadline = time.monotonic() + PROMPT
    while not moved():  # without yielding to the loop: no next chunk is queued meanwhile
        assert time.monotonic() < deadline, "nothing was moved"
        time.sleep(0.01)  # noqa: ASYNC251 - blocking on purpose, see above
    assert await store.accept(event("evt_new"), ["a"], now=stepped)
    assert moved() < 30  # the accept went in before the rest of the backlog
    assert await step == 30
    records = await store.list_deliveries()
    assert {r.event_id: r.next_attempt_at for r in records} == {
        **{f"evt_{i:02}": NOW + timedelta(hours=1) for i in range(30)},
        "evt_new": stepped,
    }
