"""Readiness follows commits (issue 9, item 5): ``ping`` (what ``/readyz`` asks) fails once a
write failed for a reason of the database and while writes keep failing, and passes again as
soon as a write commits, with no traffic needed (a probe write).

Each backend's failure is real: a peer holding SQLite's write lock past the busy timeout, a
PostgreSQL database switched to read-only, the memory store's ``failing_commits`` switch.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from lacuna_webhooks.app import create_app
from lacuna_webhooks.config import Settings
from lacuna_webhooks.errors import StoreUnavailable
from lacuna_webhooks.models import Event
from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.memory import MemoryStore
from lacuna_webhooks.store.postgres import PostgresStore
from tests.conftest import TEST_SECRET, make_event, signed

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)


def event(event_id: str) -> Event:
    return Event.from_body(orjson.dumps(make_event(event_id)))


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_sqlite_ping_fails_while_commits_fail(tmp_path: Path, process: bool) -> None:
    """A peer holds the write lock: reads still answer, but the accept fails (503) and from
    then on ping fails too; once the lock is gone, ping's probe write commits and passes."""
    path = tmp_path / "events.db"
    store = open_store(f"sqlite:///{path}", sqlite_process=process)
    await store.open()
    try:
        await store.ping()
        peer = sqlite3.connect(path, isolation_level=None)
        try:
            peer.execute("BEGIN IMMEDIATE")
            await store.ping()  # a read: the held lock does not show (why a probe is needed)
            with pytest.raises(StoreUnavailable):
                await store.accept(event("evt_locked_out"), ["a"], now=NOW)
            with pytest.raises(StoreUnavailable):
                await store.ping()
            peer.execute("ROLLBACK")
        finally:
            peer.close()
        await store.ping()
        await store.ping()
        assert await store.accept(event("evt_after"), ["a"], now=NOW) is True
    finally:
        await store.close()


async def _read_only(dsn: str, on: bool) -> None:
    """Switch the test database's default to read-only transactions (or back), and cut its
    connections so that new ones take the setting."""
    base, _, name = dsn.rpartition("/")
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        value = "on" if on else "off"
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await admin.close()


async def _passes(store: Store) -> bool:
    try:
        await store.ping()
    except StoreUnavailable:
        return False
    return True


@pytest.fixture
async def pg_store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(postgres_dsn)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
        await _read_only(postgres_dsn, False)


@pytest.mark.postgres
async def test_postgres_ping_fails_while_commits_fail(
    pg_store: PostgresStore, postgres_dsn: str
) -> None:
    """The database turns read-only: accepts fail, and ping fails while a probe write cannot
    commit, though ``SELECT 1`` still answers; writable again, ping passes and accepts work."""
    assert await pg_store.accept(event("evt_before"), ["a"], now=NOW) is True
    await _read_only(postgres_dsn, True)
    for attempt in range(3):  # the first may meet a cut connection; then read-only ones
        with pytest.raises(StoreUnavailable):
            await pg_store.accept(event(f"evt_refused_{attempt}"), ["a"], now=NOW)
    assert not await _passes(pg_store)
    assert not await _passes(pg_store)
    await _read_only(postgres_dsn, False)
    # the pool may still hand out a cut connection once: a bounded few tries
    assert any([await _passes(pg_store) for _ in range(3)])
    assert await _passes(pg_store)
    assert await pg_store.accept(event("evt_after"), ["a"], now=NOW) is True


async def test_readyz_follows_failing_commits(tmp_path: Path) -> None:
    """Through the app: ``/readyz`` is 200, 503 while the store's writes fail (a webhook gets
    503 ``store_unavailable``), and 200 again once they commit."""
    store = MemoryStore()
    await store.open()
    settings = Settings.from_env(
        {"LACUNA_WEBHOOK_SECRET": TEST_SECRET, "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    )
    app = create_app(settings, store=store, dispatch=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/readyz")).status_code == 200
        store.failing_commits = True
        body, headers = signed(make_event("evt_full_disk"))
        response = await c.post("/webhooks/lacuna", content=body, headers=headers)
        assert response.status_code == 503
        assert (await c.get("/readyz")).status_code == 503
        store.failing_commits = False
        assert (await c.get("/readyz")).status_code == 200
        response = await c.post("/webhooks/lacuna", content=body, headers=headers)
        assert response.status_code == 200
