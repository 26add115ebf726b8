"""What the PostgreSQL store adds to the contract: several replicas sharing one database.

Each test gets a fresh database (``postgres_dsn``); several ``PostgresStore``
instances on it are several replicas (one pool each). The behaviour every
backend shares is in ``test_store_contract.py``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from lacuna_webhooks.errors import StoreUnavailable
from lacuna_webhooks.models import Attempt, AttemptOutcome, DeliveryStatus, Event
from lacuna_webhooks.store import open_store
from lacuna_webhooks.store.base import Recorded
from lacuna_webhooks.store.postgres import PRUNE_LOCK_KEY, PostgresStore
from lacuna_webhooks.store.postgres.store import _migrations
from tests.conftest import make_event

pytestmark = pytest.mark.postgres

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
# Bounds for waiting on something that should happen promptly; never asserted as a duration.
PROMPT = 10.0


def event(event_id: str | None = None, **kwargs: Any) -> Event:
    return Event.from_body(orjson.dumps(make_event(event_id, **kwargs)))


def ok(started: datetime = NOW) -> Attempt:
    return Attempt(started, started + timedelta(seconds=1), AttemptOutcome.OK)


@pytest.fixture
async def stores(postgres_dsn: str) -> AsyncIterator[Callable[..., Awaitable[PostgresStore]]]:
    """A factory of opened stores on the test database (closed at the end)."""
    opened: list[PostgresStore] = []

    async def make(**kwargs: Any) -> PostgresStore:
        store = PostgresStore(postgres_dsn, **kwargs)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def admin(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, outside any store."""
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


async def until(condition: Callable[[], Awaitable[bool]], *, attempts: int = 200) -> None:
    """Poll ``condition`` (every 50 ms, bounded) until it holds; fail if it never does."""
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.05)
    pytest.fail("condition never held")


# -- migrations ----------------------------------------------------------------------------


async def test_migrate_applies_every_file_once_and_is_idempotent(
    postgres_dsn: str, admin: asyncpg.Connection
) -> None:
    """migrate() on a fresh database applies every shipped file, then finds nothing to do."""
    shipped = [version for version, _, _ in _migrations()]
    store = PostgresStore(postgres_dsn)
    assert await store.migrate() == len(shipped)
    assert await store.migrate() == 0
    await store.open()  # open() migrates too: nothing left
    try:
        assert await store.migrate() == 0
    finally:
        await store.close()
    rows = await admin.fetch("SELECT version FROM schema_version ORDER BY version")
    assert [row["version"] for row in rows] == shipped


async def test_a_schema_newer_than_this_release_is_refused(
    postgres_dsn: str, admin: asyncpg.Connection
) -> None:
    """A database a newer release migrated (a rolled-back upgrade): migrate() and open()
    refuse it with one StoreUnavailable naming both versions, as the SQLite store does;
    before, an old replica ran on tables it did not know and `migrate` said "up to date"."""
    newest = _migrations()[-1][0]
    store = PostgresStore(postgres_dsn)
    await store.migrate()
    await admin.execute(
        "INSERT INTO schema_version (version, name) VALUES ($1, 'from_the_future')", newest + 90
    )
    expected = (
        f"The database schema (version {newest + 90}) is newer than this release knows "
        f"(version {newest}); upgrade lacuna-webhooks."
    )
    with pytest.raises(StoreUnavailable) as raised:
        await store.migrate()
    assert str(raised.value) == expected
    with pytest.raises(StoreUnavailable, match="is newer than this release knows"):
        await store.open()
    await store.close()


async def test_concurrent_migrations_apply_each_file_exactly_once(
    postgres_dsn: str, admin: asyncpg.Connection
) -> None:
    """Replicas migrating the same fresh database together: one applies, the others wait
    on the advisory lock and find nothing left (without it they would collide on CREATE)."""
    replicas = [PostgresStore(postgres_dsn) for _ in range(4)]
    applied = await asyncio.gather(*(r.migrate() for r in replicas))
    assert sorted(applied) == [0, 0, 0, len(_migrations())]
    assert await admin.fetchval("SELECT count(*) FROM schema_version") == len(_migrations())


async def test_concurrent_open_on_a_fresh_database(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """Several replicas starting together all open, and the schema is there once."""
    opened = await asyncio.gather(*(stores() for _ in range(3)))
    for store in opened:
        await store.ping()
    assert await admin.fetchval("SELECT count(*) FROM schema_version") == len(_migrations())


@pytest.mark.parametrize(
    ("raw", "read"),
    [
        # jsonb takes these as they are: the plain cast.
        (rb'{"s":"\\u0000"}', {"s": "\\u0000"}),  # an escaped backslash, then text
        (rb'{"s":"\ud83d\ude00"}', {"s": "\U0001f600"}),
        # A NUL or an unpaired surrogate escape (hex in either case) reads as U+FFFD.
        (rb'{"s":"a\u0000b","n":1}', {"s": "a\ufffdb", "n": 1}),
        (rb'{"s":"\\\u0000"}', {"s": "\\\ufffd"}),  # an escaped backslash, then a NUL
        (rb'{"s":"\\\\u0000\u0000"}', {"s": "\\\\u0000\ufffd"}),
        (rb'{"s":"\uD800"}', {"s": "\ufffd"}),
        (rb'{"s":"\udfff\ud800"}', {"s": "\ufffd\ufffd"}),  # a low then a high
        (rb'{"s":"\ud800\ud83d\ude00"}', {"s": "\ufffd\U0001f600"}),
        (rb'{"s":"\\ud800\udc00"}', {"s": "\\ud800\ufffd"}),  # text, then a lone low
        (rb'{"k\u0000":["\udbff"]}', {"k\ufffd": ["\ufffd"]}),
        # Still refused: NULL.
        (b'{"s":"\\u0000"', None),
        (b'{"s":"\xff\\u0000"}', None),
        (b'{"s":"\\u0000"}\\', None),
    ],
)
async def test_lacuna_payload_reads_nul_and_lone_surrogates_as_replacement_characters(
    postgres_dsn: str, admin: asyncpg.Connection, raw: bytes, read: Any
) -> None:
    """Migration 0010: lacuna_payload, the body `match` reads, writes each real \\u0000 and
    unpaired surrogate escape as \\ufffd when jsonb refuses the body (never an escaped
    backslash followed by "u0000"), and is NULL only when jsonb still refuses it."""
    assert await PostgresStore(postgres_dsn).migrate() == len(_migrations())
    text = await admin.fetchval("SELECT lacuna_payload($1::bytea)::text", raw)
    assert (None if text is None else orjson.loads(text)) == read


async def test_postgres_scheme_is_accepted(postgres_dsn: str) -> None:
    """open_store takes postgres:// as well as postgresql://."""
    url = "postgres://" + postgres_dsn.split("://", 1)[1]
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    await store.open()
    try:
        await store.ping()
    finally:
        await store.close()


# -- dedupe and claiming across replicas ----------------------------------------------------


async def test_concurrent_accepts_of_one_id_across_replicas(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """50 concurrent accepts of one event id over 3 replicas: exactly one is new, and each
    handler gets exactly one delivery."""
    replicas = [await stores() for _ in range(3)]
    evt = event("evt_raced")
    results = await asyncio.gather(
        *(replicas[i % 3].accept(evt, ["a", "b"], now=NOW) for i in range(50))
    )
    assert results.count(True) == 1
    assert results.count(False) == 49
    rows = await admin.fetch(
        "SELECT handler, count(*) AS n FROM deliveries GROUP BY handler ORDER BY handler"
    )
    assert [(row["handler"], row["n"]) for row in rows] == [("a", 1), ("b", 1)]


async def test_concurrent_claims_never_share_a_delivery(
    stores: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """Two replicas claiming the same handler's queue together split it without overlap."""
    one, two = await stores(), await stores()
    for i in range(30):
        await one.accept(event(f"evt_{i:02d}"), ["h"], now=NOW)

    async def drain(store: PostgresStore) -> list[int]:
        got: list[int] = []
        while batch := await store.claim(handler="h", limit=2, lease=LEASE, now=NOW):
            got.extend(d.id for d in batch)
        return got

    first, second = await asyncio.gather(drain(one), drain(two))
    assert not set(first) & set(second)
    assert len(first) + len(second) == 30


async def test_claim_skips_rows_locked_by_another_transaction(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """A row locked by another replica's claim in flight is skipped, not waited for."""
    store = await stores()
    await store.accept(event("evt_locked"), ["h"], now=NOW)
    await store.accept(event("evt_free"), ["h"], now=NOW + timedelta(seconds=1))
    async with admin.transaction():
        await admin.execute("SELECT 1 FROM deliveries WHERE event_id = 'evt_locked' FOR UPDATE")
        claimed = await asyncio.wait_for(
            store.claim(handler="h", limit=10, lease=LEASE, now=NOW + timedelta(seconds=2)),
            timeout=PROMPT,
        )
    assert [d.event.id for d in claimed] == ["evt_free"]


async def test_expired_lease_is_taken_over_by_another_replica(
    stores: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """A lease that ran out is claimable by any replica; the first claimant's outcome is
    then refused (its lease_token is stale)."""
    one, two = await stores(), await stores()
    await one.accept(event("evt_lease"), ["h"], now=NOW)
    short = timedelta(seconds=1)
    [first] = await one.claim(handler="h", limit=1, lease=short, now=NOW)
    # leases follow the database's clock: a replica whose `now` is far ahead still waits
    assert await two.claim(handler="h", limit=1, lease=LEASE, now=NOW + LEASE * 2) == []
    await asyncio.sleep(short.total_seconds() + 0.2)
    [second] = await two.claim(handler="h", limit=1, lease=LEASE, now=NOW)
    assert second.id == first.id
    assert (second.attempts, second.lease_token) == (2, first.lease_token + 1)
    assert await one.complete(first, ok()) == Recorded(False)
    assert await two.complete(second, ok()) == Recorded(True)
    [record] = await one.list_deliveries(event_id="evt_lease")
    assert record.status is DeliveryStatus.DONE


# -- LISTEN/NOTIFY --------------------------------------------------------------------------


async def test_accept_on_one_replica_wakes_another(
    stores: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """An accept on replica A wakes replica B's wait_for_work through NOTIFY, long before
    B's own (very long) poll timeout."""
    a, b = await stores(), await stores()
    assert b.listening
    await b.wait_for_work(0)  # consume any nudge left over from open()
    waiter = asyncio.create_task(b.wait_for_work(3600))
    await asyncio.sleep(0)  # let the waiter start waiting
    assert not waiter.done()
    await a.accept(event("evt_nudge"), ["h"], now=NOW)
    await asyncio.wait_for(waiter, timeout=PROMPT)


async def test_only_writes_that_make_work_send_a_notify(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """A duplicate accept and a retry_dead with nothing dead write nothing and NOTIFY nothing;
    a new event does. (PostgreSQL delivers notifications in commit order, so the admin
    connection's own "fence" NOTIFY, sent last, proves nothing else is still coming.)"""
    store = await stores()
    await store.accept(event("evt_once"), ["h"], now=NOW)
    payloads: list[str] = []
    fence = asyncio.Event()

    def received(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        payloads.append(str(payload))
        if payload == "fence":
            fence.set()

    await admin.add_listener("lacuna_webhooks", received)
    assert await store.accept(event("evt_once"), ["h"], now=NOW) is False
    assert await store.retry_dead(handler=None, now=NOW) == 0
    assert await store.accept(event("evt_new"), [], now=NOW) is True  # no handler, no work
    await admin.execute("NOTIFY lacuna_webhooks, 'fence'")
    await asyncio.wait_for(fence.wait(), timeout=PROMPT)
    assert payloads == ["fence"]

    fence.clear()
    await store.accept(event("evt_work"), ["h"], now=NOW)
    await admin.execute("NOTIFY lacuna_webhooks, 'fence'")
    await asyncio.wait_for(fence.wait(), timeout=PROMPT)
    assert payloads == ["fence", "", "fence"]


async def _woken(store: PostgresStore) -> bool:
    """Whether a nudge is pending (consumes it)."""
    task = asyncio.create_task(store.wait_for_work(3600))
    await asyncio.sleep(0.01)
    if task.done():
        return True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return False


async def test_replay_and_retry_dead_wake_other_replicas(
    stores: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """replay and retry_dead NOTIFY too, so another replica picks the work up at once."""
    a, b = await stores(), await stores()
    await a.accept(event("evt_r"), ["h"], now=NOW)
    [d] = await a.claim(handler="h", limit=1, lease=LEASE, now=NOW)
    assert await a.dead(d, Attempt(NOW, NOW, AttemptOutcome.DEAD, "boom"))
    await until(lambda: _woken(b))

    waiter = asyncio.create_task(b.wait_for_work(3600))
    assert await a.retry_dead(handler="h", now=NOW) == 1
    await asyncio.wait_for(waiter, timeout=PROMPT)

    waiter = asyncio.create_task(b.wait_for_work(3600))
    assert await a.replay("evt_r", None, now=NOW) == 1
    await asyncio.wait_for(waiter, timeout=PROMPT)


async def test_listener_reconnects_after_its_connection_is_killed(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """When the listening connection is terminated, the store reconnects it in the background
    and NOTIFYs wake it again."""
    a, b = await stores(), await stores()
    killed = await admin.fetch(
        """
        SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity
        WHERE datname = current_database() AND application_name = 'lacuna-webhooks-listener'
        """
    )
    assert len(killed) == 2  # one listener per replica
    old = {row["pid"] for row in killed}

    async def relistening() -> bool:
        pids = await admin.fetch(
            """
            SELECT pid FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = 'lacuna-webhooks-listener'
            """
        )
        return b.listening and bool({row["pid"] for row in pids} - old)

    await until(relistening)
    await b.wait_for_work(0)  # the reconnect nudges the store itself: consume that
    waiter = asyncio.create_task(b.wait_for_work(3600))
    await asyncio.sleep(0)
    await a.accept(event("evt_after"), ["h"], now=NOW)
    await asyncio.wait_for(waiter, timeout=PROMPT)


# -- pruning --------------------------------------------------------------------------------


async def _finished_events(store: PostgresStore, count: int) -> None:
    for i in range(count):
        await store.accept(event(f"evt_old_{i}"), ["h"], now=NOW)
    for d in await store.claim(handler="h", limit=count, lease=LEASE, now=NOW):
        assert await store.complete(d, ok())


async def test_prune_runs_on_one_replica_at_a_time(
    stores: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """Two replicas pruning together: the events are deleted once, all by one of them."""
    one, two = await stores(), await stores()
    await _finished_events(one, 20)
    cutoff = NOW + timedelta(days=1)
    results = await asyncio.gather(
        one.prune(received_before=cutoff), two.prune(received_before=cutoff)
    )
    assert sorted(results) == [0, 20]
    assert await one.list_events() == []


async def test_prune_returns_zero_while_another_replica_holds_the_lock(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """While the prune advisory lock is held elsewhere, prune() returns 0 at once and deletes
    nothing; once it is free, the same call prunes."""
    store = await stores()
    await _finished_events(store, 3)
    cutoff = NOW + timedelta(days=1)
    async with admin.transaction():
        assert await admin.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNE_LOCK_KEY)
        assert await asyncio.wait_for(store.prune(received_before=cutoff), PROMPT) == 0
        assert len(await store.list_events()) == 3
    assert await store.prune(received_before=cutoff) == 3


async def test_prune_counts_the_events_it_deleted_not_its_candidates(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """``prune`` returns how many events went (``Store.prune``): a candidate the delete
    statement leaves (its re-check found it no longer prunable, here a trigger that keeps
    one event) is not counted."""
    store = await stores()
    await _finished_events(store, 3)
    (kept, *_) = [e.id for e in await store.list_events()]
    await admin.execute(
        "CREATE FUNCTION keep_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF OLD.id = '{kept}' THEN RETURN NULL; END IF; RETURN OLD; END $$"
    )
    await admin.execute(
        "CREATE TRIGGER keep_one BEFORE DELETE ON events FOR EACH ROW EXECUTE FUNCTION keep_one()"
    )
    assert await store.prune(received_before=NOW + timedelta(days=1)) == 2
    assert [e.id for e in await store.list_events()] == [kept]


async def test_prune_keeps_events_with_pending_deliveries(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """Only events whose deliveries are all done or dead go, with their deliveries and
    attempts; the task state stays."""
    store = await stores()
    await _finished_events(store, 1)
    await store.accept(event("evt_pending", task_id="cm_other"), ["h"], now=NOW)
    assert await store.prune(received_before=NOW + timedelta(days=1)) == 1
    assert [e.id for e in await store.list_events()] == ["evt_pending"]
    assert await admin.fetchval("SELECT count(*) FROM attempts") == 0
    assert await store.get_task("cm123abc") is not None


# -- availability ---------------------------------------------------------------------------


async def test_store_survives_its_connections_being_terminated(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """After the server kills every store connection, each operation either succeeds (a
    fresh connection) or raises StoreUnavailable, never anything else, and only the first
    one can fail; then the store works again by itself."""
    store = await stores(min_size=2, max_size=2)
    await store.accept(event("evt_before"), ["h"], now=NOW)
    pids = await admin.fetch(
        """
        SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
        """
    )
    terminated = await admin.fetchval(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM unnest($1::int[]) AS pid",
        [row["pid"] for row in pids],
    )
    assert terminated >= 2  # the pool's connections and the listener

    operations: list[Callable[[], Awaitable[object]]] = [
        store.ping,
        lambda: store.accept(event("evt_during"), ["h"], now=NOW),
        lambda: store.stats(now=NOW),
        lambda: store.claim(handler="h", limit=1, lease=LEASE, now=NOW),
        store.list_events,
    ]
    outcomes = []
    for operation in operations:
        try:
            await operation()
            outcomes.append("ok")
        except StoreUnavailable:
            outcomes.append("unavailable")
    assert set(outcomes) <= {"ok", "unavailable"}
    # The first failure makes the pool replace its other stale connections: one failure at most.
    assert outcomes.count("unavailable") <= 1

    async def answers() -> bool:
        try:
            await store.ping()
        except StoreUnavailable:
            return False
        return True

    await until(answers)
    assert await store.accept(event("evt_after"), ["h"], now=NOW) is True
    ids = {e.id for e in await store.list_events()}
    assert {"evt_before", "evt_after"} <= ids


async def test_a_hung_statement_raises_store_unavailable(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """A statement that cannot finish (here: blocked by a table lock) is cut at the command
    timeout and reported as StoreUnavailable instead of hanging the caller."""
    store = await stores(command_timeout_seconds=0.5)
    async with admin.transaction():
        await admin.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.accept(event(), ["h"], now=NOW), timeout=PROMPT)
    assert await store.accept(event(), ["h"], now=NOW) is True


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_server_raises_store_unavailable() -> None:
    """A store pointed at a closed port raises StoreUnavailable from open(), ping() and
    migrate(), within its connect timeout (bounded here by wait_for), holds nothing open,
    and never puts the DSN's password in the error."""
    store = PostgresStore(
        f"postgresql://postgres:s3cret-pw@127.0.0.1:{_closed_port()}/nothing",
        connect_timeout_seconds=2,
    )
    with pytest.raises(StoreUnavailable) as raised:
        await asyncio.wait_for(store.open(), timeout=PROMPT)
    assert "s3cret-pw" not in str(raised.value)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.ping(), timeout=PROMPT)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.migrate(), timeout=PROMPT)
    with pytest.raises(StoreUnavailable):
        await store.wait_for_work(0)
    await store.close()


def test_repr_hides_the_dsn() -> None:
    """The DSN (which may carry a password) never shows in the store's repr."""
    store = PostgresStore("postgresql://user:s3cret-pw@db.example/x")
    assert "s3cret-pw" not in repr(store)


async def test_a_replay_or_retry_from_a_replica_whose_clock_runs_ahead_is_due_at_once(
    stores: Callable[..., Awaitable[PostgresStore]],
) -> None:
    """admin.md: a replayed or retried delivery is "pending and due now". Through a replica
    whose clock ran 2 minutes ahead it was due 2 minutes later for every other replica:
    it is due at the earlier of the caller's clock and the database's."""
    a, b = await stores(), await stores()
    real = datetime.now(UTC)
    ahead = real + timedelta(minutes=2)
    await a.accept(event("evt_skewed_replay"), ["h"], now=real)
    [d] = await a.claim(handler="h", limit=1, lease=LEASE, now=real)
    assert await a.dead(d, Attempt(real, real, AttemptOutcome.DEAD, "boom"))
    assert await b.retry_dead(handler="h", now=ahead) == 1
    [retried] = await a.claim(handler="h", limit=1, lease=LEASE, now=datetime.now(UTC))
    assert retried.id == d.id
    assert await a.complete(retried, ok(datetime.now(UTC)))
    assert await b.replay("evt_skewed_replay", None, now=ahead) == 1
    [replayed] = await a.claim(handler="h", limit=1, lease=LEASE, now=datetime.now(UTC))
    assert replayed.id == d.id
    assert await b.replay("evt_skewed_replay", ["h2"], now=ahead) == 1
    [created] = await a.claim(handler="h2", limit=1, lease=LEASE, now=datetime.now(UTC))
    assert created.event.id == "evt_skewed_replay"


async def test_a_rate_bucket_refills_after_the_databases_clock_steps_back(
    stores: Callable[..., Awaitable[PostgresStore]], admin: asyncpg.Connection
) -> None:
    """The database's own clock stepped back (a VM restored, NTP stepping its host) after a
    take: the bucket kept the later time and refilled nothing until the clock caught up, a
    rate-limited handler frozen on every replica for as long as the step. It refills from
    the new time on, as SQLite's does after its clock steps back."""
    store = await stores()

    async def take() -> int:
        return await store.take_tokens(
            "h", want=3, capacity=3, per_second=1000.0, now=datetime.now(UTC)
        )

    assert await take() == 3
    # What a step back of the database's clock by two hours leaves behind.
    await admin.execute(
        "UPDATE rate_buckets SET tokens = 0, updated_at = now() + interval '2 hours'"
        " WHERE handler = 'h'"
    )
    await take()  # the step back itself refills nothing
    await asyncio.sleep(0.05)  # 50 tokens' worth at 1000/s: the bucket is full again
    assert await take() >= 1
