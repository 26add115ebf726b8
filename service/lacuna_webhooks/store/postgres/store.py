"""The PostgreSQL store: one database shared by any number of ``serve`` replicas.

Driver: asyncpg (the only module of the package that imports it). How the
replicas share the work:

- ``accept`` inserts the event with ``INSERT ... ON CONFLICT DO NOTHING
  RETURNING`` (the primary key is the dedupe, never check-then-insert), its
  deliveries and the per-task state in one transaction, and NOTIFYs
  ``channel`` in that transaction, so the nudge is sent only on commit.
- ``claim`` leases due deliveries with ``UPDATE ... WHERE id IN (SELECT ...
  FOR UPDATE SKIP LOCKED) RETURNING``: two replicas never get the same row,
  and neither waits for the other. An expired lease is claimable by anyone.
  Leases are timed by the database's clock (``now()``), never by a replica's:
  a replica whose clock runs ahead cannot take over a lease that is still live.
- Outcome writes (``complete``/``retry``/``dead``/``release``) are one
  statement each, conditional on the claimed ``lease_token``.
- ``wait_for_work`` wakes on a local accept or on a NOTIFY received by a
  dedicated listening connection; if that connection drops it is re-made in
  the background (with backoff) while callers keep polling on their timeout.
- Migrations (``sql/postgres/NNNN_name.sql``) run at ``open()`` under
  ``pg_advisory_lock``, each file in its own transaction, recorded in
  ``schema_version``; ``prune`` runs on one replica at a time
  (``pg_try_advisory_xact_lock``).

Every database failure (refused or dropped connection, timeout, server error)
surfaces as ``StoreUnavailable``. The pool replaces broken connections on the
next acquire, so the store recovers by itself when the server comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ...errors import EventNotFound, StoreUnavailable
from ...models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from ..base import (
    AttemptRecord,
    DeliveryRecord,
    EventFilter,
    EventPage,
    EventRecord,
    HandlerActivity,
    HandlerState,
    QueueStats,
    ReplayCounts,
    ScanBudget,
    TaskRecord,
    attempt_error,
)
from ..queries import load
from ..rows import (
    attempt_record,
    claimed_delivery,
    delivery_record,
    event_record,
    handler_state,
    result_text,
    task_record,
)
from ..rules import CommitHealth, task_order
from ..searchsql import next_cursor, search_sql, windowed, windowed_search
from ..stream import StreamSignal, make_cursor, read_cursor

log = logging.getLogger(__name__)

#: ``pg_advisory_lock`` key held while migrating (any fixed bigint unique to this service).
MIGRATE_LOCK_KEY = 0x6C61_6375_6E61_0001
#: ``pg_try_advisory_xact_lock`` key held by the replica that is pruning.
PRUNE_LOCK_KEY = 0x6C61_6375_6E61_0002
#: The longest an admin search may run (milliseconds): past it the search fails (the admin
#: API answers 503) instead of holding a pooled connection.
SEARCH_TIMEOUT_MS = 20_000
#: How many admin searches may run at once (each holds one pooled connection meanwhile).
SEARCH_SLOTS = 2
#: The NOTIFY channel replicas nudge each other on.
DEFAULT_CHANNEL = "lacuna_webhooks"
#: How late a stream follower may see an event without a NOTIFY: one held back by an older
#: transaction still running (no NOTIFY comes when that one ends), or while the listener
#: reconnects.
STREAM_POLL_SECONDS = 1.0

_MIGRATION_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

# What "the database is unavailable" looks like through asyncpg: OS-level connection errors,
# timeouts (connect, acquire, command), server errors, client-side interface errors such as
# "connection is closed" or "pool is closing", and the protocol-state error a pooled connection
# raises when the server killed it while idle and asyncpg has not yet seen the socket close.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# The subset meaning "this connection is gone" (server restarted or killed it, network cut):
# then every other idle connection in the pool is likely dead too.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)

Q = load("postgres")


def _utc(value: datetime) -> datetime:
    """An aware datetime; a naive one is taken to be UTC (never the machine's local time)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


_CREDENTIALS = re.compile(r"://[^/@\s]+@")


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """The ``StoreUnavailable`` for a driver error, its text kept but any URL userinfo masked."""
    detail = _CREDENTIALS.sub("://***@", str(exc) or type(exc).__name__)
    return StoreUnavailable(f"The event store (PostgreSQL) is unavailable: {detail}")


def _migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every shipped migration, in version order."""
    folder = importlib.resources.files("lacuna_webhooks.store") / "sql" / "postgres"
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate PostgreSQL migration versions: {versions}")
    return found


def _at(value: datetime) -> datetime:
    """``timestamptz`` columns come back aware (UTC) from asyncpg: as they are."""
    return value


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()


def _unique(names: Sequence[str]) -> list[str]:
    """The names once each, in their first order (a handler listed twice gets one delivery)."""
    return list(dict.fromkeys(names))


class PostgresStore:
    """The ``Store`` on PostgreSQL through an asyncpg connection pool.

    ``dsn`` is a ``postgresql://`` or ``postgres://`` URL. ``connect_timeout_seconds``
    bounds each new connection, ``command_timeout_seconds`` each statement and
    ``acquire_timeout_seconds`` the wait for a pooled connection, so a dead
    server turns into ``StoreUnavailable`` within seconds instead of a hang.
    Migrations get their own, longer ``migrate_timeout_seconds`` (a replica may
    wait for another one to finish migrating).
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_seconds: float = 5.0,
        command_timeout_seconds: float = 10.0,
        acquire_timeout_seconds: float = 10.0,
        migrate_timeout_seconds: float = 300.0,
        max_idle_seconds: float = 300.0,
        listener_check_seconds: float = 30.0,
        channel: str = DEFAULT_CHANNEL,
        application_name: str = "lacuna-webhooks",
    ) -> None:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("a PostgreSQL DSN starts with postgresql:// or postgres://")
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", channel):
            raise ValueError("channel must be a plain lowercase SQL identifier")
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout_seconds
        self._command_timeout = command_timeout_seconds
        self._acquire_timeout = acquire_timeout_seconds
        self._migrate_timeout = migrate_timeout_seconds
        self._max_idle = max_idle_seconds
        self._listener_check = listener_check_seconds
        self._channel = channel
        self._application_name = application_name
        self._pool: asyncpg.Pool | None = None
        self._wakeup = asyncio.Event()
        self._listening = False
        self._listener_task: asyncio.Task[None] | None = None
        self._first_listener: asyncpg.Connection | None = None
        self._closing = False
        self._health = CommitHealth()
        # Admin searches share the pool with intake: at most this many hold a connection.
        self._search_slots = asyncio.Semaphore(SEARCH_SLOTS)
        self.stream_signal = StreamSignal(poll_seconds=STREAM_POLL_SECONDS)

    def __repr__(self) -> str:
        # The DSN may carry a password: never show it.
        return f"PostgresStore(channel={self._channel!r}, max_size={self._max_size})"

    @property
    def listening(self) -> bool:
        """Whether the NOTIFY listener is connected (when not, ``wait_for_work`` only polls)."""
        return self._listening

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool, apply pending migrations and start listening for nudges.

        Raise ``StoreUnavailable`` when the server cannot be reached within the
        connect timeout (nothing is left open then).
        """
        if self._pool is not None:
            return
        self._closing = False
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                max_inactive_connection_lifetime=self._max_idle,
                server_settings={"application_name": self._application_name},
            )
        except _DB_ERRORS as exc:
            raise _unavailable(exc) from exc
        self._pool = pool
        try:
            await self.migrate()
            listener = await self._connect_listener()
        except BaseException:
            self._pool = None
            pool.terminate()
            raise
        self._listener_task = asyncio.create_task(
            self._supervise_listener(listener), name="lacuna-webhooks-pg-listener"
        )
        self._first_listener = listener

    async def close(self) -> None:
        """Stop listening and close the pool (connections still busy after a grace are cut)."""
        self._closing = True
        task, self._listener_task = self._listener_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        first, self._first_listener = self._first_listener, None
        if first is not None and not first.is_closed():
            # A task cancelled before its first step never ran its cleanup: a close right
            # after open would leak the listening connection.
            first.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=self._command_timeout)
            except _DB_ERRORS:
                pool.terminate()

    async def migrate(self) -> int:
        """Apply the shipped migrations not yet recorded in ``schema_version``; return how many.

        Safe when several replicas start together: the whole run holds a
        session-level ``pg_advisory_lock``, so one replica migrates and the others
        wait, then find nothing left to do. Each file is applied in its own
        transaction together with its ``schema_version`` row. Works on an
        unopened store too (for a ``migrate`` command) through a one-off connection.
        """
        migrations = _migrations()
        timeout = self._migrate_timeout
        async with self._migration_connection() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_KEY, timeout=timeout)
            try:
                await conn.execute(
                    """
                    CREATE TABLE IF NOT EXISTS schema_version (
                        version    integer     PRIMARY KEY,
                        name       text        NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now()
                    )
                    """,
                    timeout=timeout,
                )
                rows = await conn.fetch("SELECT version FROM schema_version", timeout=timeout)
                applied = {row["version"] for row in rows}
                count = 0
                for version, name, sql in migrations:
                    if version in applied:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql, timeout=timeout)
                        await conn.execute(
                            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                            version,
                            name,
                            timeout=timeout,
                        )
                    log.info("store.migrated version=%d name=%s", version, name)
                    count += 1
                return count
            finally:
                # A dropped connection releases the lock by itself; do not mask the real error.
                if not conn.is_closed():
                    with contextlib.suppress(*_DB_ERRORS):
                        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_KEY)

    async def ping(self) -> None:
        """Return when the server answers a query and writes commit; raise
        ``StoreUnavailable`` otherwise.

        After a write failed (``CommitHealth``), a probe write must commit first: a
        database that answers ``SELECT 1`` but refuses writes (read-only, revoked
        permission, full disk) is not ready.
        """
        if self._health.failure is None:
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")
            return
        async with self._connection(write=True) as conn:
            await conn.execute(Q["write_probe"])

    # -- inbox ---------------------------------------------------------------------------------

    async def accept(
        self,
        event: Event,
        handlers: Sequence[str],
        *,
        now: datetime,
        trace_context: str | None = None,
    ) -> bool:
        """Store a new event with a pending delivery per handler; ``False`` for a duplicate.

        One transaction: the event insert (dedupe on the primary key), the
        per-task upsert (which only moves forward: an event older than the
        task's current one is stored with ``superseded`` and still dispatched),
        the deliveries and the NOTIFY. Returns after the commit.
        """
        now = _utc(now)
        names = _unique(handlers)
        async with self._connection(write=True) as conn, conn.transaction():
            inserted = await conn.fetchval(
                Q["accept_event"],
                event.id,
                event.type,
                event.created,
                now,
                event.task_id,
                event.raw,
                trace_context,
            )
            if not inserted:
                return False
            if event.task_id is not None:
                current = await conn.fetchval(
                    Q["upsert_task"],
                    event.task_id,
                    event.task_status,
                    event.id,
                    event.type,
                    event.created,
                    task_order(event.created, now.timestamp()),
                    now,
                )
                if not current:
                    await conn.execute(Q["mark_superseded"], event.id)
            if names:
                await conn.execute(
                    Q["insert_deliveries"],
                    event.id,
                    names,
                    now,
                )
                await self._notify(conn)
        if names:
            self._nudge()
        else:
            # No work made, so no NOTIFY (other replicas' streams see such an event within
            # STREAM_POLL_SECONDS); this process's streams wake at once.
            self.stream_signal.notify()
        return True

    # -- outbox --------------------------------------------------------------------------------

    async def claim(
        self,
        *,
        handler: str,
        limit: int,
        lease: timedelta,
        now: datetime,
        after: Sequence[str] = (),
    ) -> list[Delivery]:
        """Lease up to ``limit`` due pending deliveries of ``handler``, oldest due first.

        Rows locked by another replica's claim are skipped, never waited for.
        Each claimed row gets one more ``attempts`` and ``lease_token`` and
        ``lease_until = now() + lease`` in the *database's* clock, and a lease counts
        as expired by that same clock: replicas whose clocks disagree never see a
        live lease as expired (issue 9, item 3). ``now`` (the caller's clock) only
        decides which deliveries are due and stamps ``updated_at``.
        """
        if limit <= 0:
            return []
        now = _utc(now)
        async with self._connection(write=True) as conn:
            rows = await conn.fetch(
                Q["claim"],
                handler,
                now,
                lease,
                limit,
                list(after),
            )
        return [claimed_delivery(row, _at) for row in rows]

    async def complete(self, delivery: Delivery, attempt: Attempt) -> bool:
        """Mark the claimed delivery done and log the attempt; ``False`` if the claim is stale."""
        return await self._finish(DeliveryStatus.DONE, delivery, attempt)

    async def retry(
        self, delivery: Delivery, attempt: Attempt, *, at: datetime, refund: bool = False
    ) -> bool:
        """Make the claimed delivery due again at ``at`` and log the attempt (``refund``: see
        ``Store.retry``)."""
        return await self._finish(
            DeliveryStatus.PENDING, delivery, attempt, _utc(at), refund=refund
        )

    async def dead(self, delivery: Delivery, attempt: Attempt) -> bool:
        """Give the claimed delivery up (``dead``) and log the attempt."""
        return await self._finish(DeliveryStatus.DEAD, delivery, attempt)

    async def _finish(
        self,
        status: DeliveryStatus,
        delivery: Delivery,
        attempt: Attempt,
        next_attempt_at: datetime | None = None,
        *,
        refund: bool = False,
    ) -> bool:
        # One statement, so the outcome and its attempt row are written together or not at all.
        async with self._connection(write=True) as conn:
            row = await conn.fetchval(
                Q["finish"],
                delivery.id,
                delivery.lease_token,
                _utc(attempt.started_at),
                _utc(attempt.finished_at),
                AttemptOutcome(attempt.outcome).value,
                attempt_error(attempt),
                status.value,
                next_attempt_at,
                result_text(attempt) if status is DeliveryStatus.DONE else None,
                1 if refund else 0,
            )
            if row is None:
                await self._end_revoked(conn, delivery)
        return row is not None

    async def _end_revoked(self, conn: Any, delivery: Delivery) -> None:
        """The claim's attempt has ended but was not recorded: if a reset (replay) revoked
        it, end the lease the reset kept so that nobody ran the delivery beside it; it is
        due at once. Nudge (and NOTIFY) when it did."""
        if await conn.fetchval(Q["end_revoked"], delivery.id, delivery.lease_token) is not None:
            await self._notify(conn)
            self._nudge()

    async def release(self, delivery: Delivery, *, now: datetime | None = None) -> bool:
        """Give an unfinished claim back: lease cleared, ``attempts`` undone, due at once.

        ``next_attempt_at`` is left as it was (it was due when claimed), so the
        delivery keeps its place in the queue; the token moves on, so a late outcome of
        the released claim is refused. ``False`` if the claim is stale.
        """
        async with self._connection(write=True) as conn:
            row = await conn.fetchval(
                Q["release"],
                delivery.id,
                delivery.lease_token,
                None if now is None else _utc(now),
            )
            if row is None:
                await self._end_revoked(conn, delivery)
        if row is None:
            return False
        self._nudge()
        return True

    async def wait_for_work(self, timeout_seconds: float) -> None:
        """Return when nudged (local accept, or a NOTIFY from any replica), else on timeout.

        A nudge that arrived while nobody was waiting is kept until consumed here,
        so work accepted between a claim and the next wait is not left for the
        poll interval. Raise ``StoreUnavailable`` when the store is not open.
        """
        if self._pool is None:
            raise StoreUnavailable("The event store (PostgreSQL) is not open.")
        if not self._wakeup.is_set():
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(timeout_seconds, 0.0))
            except TimeoutError:
                return  # only a consumed nudge is cleared: one arriving just now stays pending
        self._wakeup.clear()

    # -- admin and metrics ---------------------------------------------------------------------

    async def stats(self, *, now: datetime) -> QueueStats:
        """Due times against ``now``, leases against the database's clock (as ``claim``)."""
        now = _utc(now)
        async with self._connection() as conn:
            rows = await conn.fetch(Q["stats"], now)
        by_handler: dict[str, QueueStats] = {}
        for row in rows:
            oldest: datetime | None = row["oldest_due"]
            by_handler[row["handler"]] = QueueStats(
                pending=row["pending"],
                due=row["due"],
                running=row["running"],
                dead=row["dead"],
                oldest_due_age_seconds=(
                    max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
                ),
            )
        return QueueStats.combine(dict(sorted(by_handler.items())))

    async def prune(self, *, received_before: datetime) -> int:
        """Delete events received before the cutoff whose deliveries are all done or dead.

        Their deliveries and attempts go with them (``ON DELETE CASCADE``); task
        state stays. Only one replica prunes at a time: when another holds the
        prune lock this returns 0 at once. Candidate events are locked (skipping
        any a replay is touching) and re-checked in a fresh statement, so a
        delivery made pending by a concurrent replay is never deleted.
        """
        cutoff = _utc(received_before)
        async with self._connection(write=True) as conn, conn.transaction():
            if not await conn.fetchval(Q["prune_lock"], PRUNE_LOCK_KEY):
                return 0
            locked = await conn.fetch(Q["prune_candidates"], cutoff)
            if not locked:
                return 0
            deleted = await conn.fetch(
                Q["prune_delete"],
                [row["id"] for row in locked],
            )
        return len(deleted)

    async def list_events(
        self, *, limit: int = 50, event_type: str | None = None
    ) -> list[EventRecord]:
        """Newest first (by ``received_at``, then by arrival order)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                Q["list_events"],
                event_type,
                max(limit, 0),
            )
        return [event_record(row, _at) for row in rows]

    async def get_event(self, event_id: str) -> EventRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(Q["get_event"], event_id)
        return event_record(row, _at) if row is not None else None

    async def search_events(
        self,
        where: EventFilter,
        *,
        cursor: str | None = None,
        limit: int = 50,
        budget: ScanBudget | None = None,
    ) -> EventPage:
        """``searchsql`` rules; the cursor is ``[received_at, seq]`` of the page's last row,
        or of the oldest event a budgeted scan reached (``searchsql.windowed_search``: its
        windows in one read-only snapshot). Each statement runs under ``SEARCH_TIMEOUT_MS``
        so a search never holds one of the pool's connections (which intake shares) for
        long."""
        now = datetime.now(UTC)
        if budget is not None and limit > 0 and windowed("postgres", where, budget):
            return await self._search_windowed(where, cursor, limit, now, budget)
        sql, params = search_sql("postgres", where, cursor=cursor, limit=limit, now=now)
        async with (
            self._search_slots,
            self._connection() as conn,
            conn.transaction(readonly=True),
        ):
            await conn.execute(f"SET LOCAL statement_timeout = {SEARCH_TIMEOUT_MS}")
            found = await conn.fetch(sql, *params)
        page = found[: max(limit, 0)]
        next_page = None
        if len(found) > limit and page:
            next_page = next_cursor("postgres", page[-1]["received_at"], page[-1]["seq"])
        return EventPage([event_record(row, _at) for row in page], next_page)

    async def _search_windowed(
        self, where: EventFilter, cursor: str | None, limit: int, now: datetime, budget: ScanBudget
    ) -> EventPage:
        scan = windowed_search(
            "postgres", where, cursor=cursor, limit=limit, now=now, budget=budget
        )
        statement = next(scan)  # a bad cursor raises here, before a connection is taken
        async with (
            self._search_slots,
            self._connection() as conn,
            conn.transaction(readonly=True, isolation="repeatable_read"),
        ):
            await conn.execute(f"SET LOCAL statement_timeout = {SEARCH_TIMEOUT_MS}")
            try:
                while True:
                    statement = scan.send(await conn.fetch(statement[0], *statement[1]))
            except StopIteration as stop:
                found, next_page, complete, reached = stop.value
        return EventPage(
            [event_record(row, _at) for row in found],
            next_page,
            complete=complete,
            searched_to=None if reached is None else _at(reached),
        )

    async def list_deliveries(
        self,
        *,
        status: DeliveryStatus | None = None,
        handler: str | None = None,
        event_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> list[DeliveryRecord]:
        """Newest first (by id, which follows creation)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                Q["list_deliveries"],
                status.value if status is not None else None,
                handler,
                event_id,
                max(limit, 0),
                before,
            )
        return [delivery_record(row, _at) for row in rows]

    async def list_attempts(self, delivery_id: int) -> list[AttemptRecord]:
        """Oldest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(Q["list_attempts"], delivery_id)
        return [attempt_record(row, _at) for row in rows]

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(Q["get_task"], task_id)
        if row is None:
            return None
        return task_record(row, _at)

    async def stream_after(self, cursor: str | None, limit: int) -> list[tuple[str, EventRecord]]:
        """``(xid, seq)`` order, only rows below the snapshot's xmin (``0008_stream.sql``)."""
        xid, seq = (0, 0) if cursor is None else read_cursor(cursor, "p", 2)
        async with self._connection() as conn:
            rows = await conn.fetch(Q["stream_after"], str(xid), seq, max(0, limit))
        return [
            (make_cursor("p", int(row["stream_xid"]), row["seq"]), event_record(row, _at))
            for row in rows
        ]

    async def stream_head(self) -> str:
        async with self._connection() as conn:
            xmin = await conn.fetchval(Q["stream_head"])
        return make_cursor("p", int(xmin), 0)

    async def replay(self, event_id: str, handlers: Sequence[str] | None, *, now: datetime) -> int:
        """Make the event's deliveries pending and due at ``now`` with a fresh attempt budget.

        With ``handlers``: those (created when missing); with ``None``: every
        existing one. A live claim is revoked (its lease is cleared and its token moves on),
        so an attempt still running cannot mark the replayed delivery done. Raise ``EventNotFound``;
        return how many were reset or created, and NOTIFY when any were.
        """
        now = _utc(now)
        async with self._connection(write=True) as conn, conn.transaction():
            # The row lock keeps a concurrent prune from deleting the event under the replay.
            found = await conn.fetchval(Q["lock_event"], event_id)
            if not found:
                raise EventNotFound(f"No event {event_id!r} in the store.")
            if handlers is None:
                rows = await conn.fetch(Q["replay_all"], event_id, now)
            else:
                rows = await conn.fetch(Q["replay_handlers"], event_id, _unique(handlers), now)
            if rows:
                await self._notify(conn)
        if rows:
            self._nudge()  # after the commit: the claim it wakes must see the rows
        return len(rows)

    async def replay_many(
        self,
        event_ids: Sequence[str],
        handlers: Sequence[str] | None,
        *,
        now: datetime,
        create: bool = True,
        reset: bool = True,
    ) -> ReplayCounts:
        """``replay`` of a batch of events in one transaction (store/base.py); NOTIFY when it
        wrote any, so every replica's dispatcher looks now."""
        now = _utc(now)
        async with self._connection(write=True) as conn, conn.transaction():
            # Reset and created rows are counted apart: reset first, then the inserts skip them.
            found = [r["id"] for r in await conn.fetch(Q["lock_events"], _unique(event_ids))]
            reset_rows: list[Any] = []
            created_rows: list[Any] = []
            if found and handlers is None:
                if reset:
                    reset_rows = await conn.fetch(Q["replay_many_all"], found, now)
            elif found and handlers:
                names = _unique(handlers)
                if reset:
                    reset_rows = await conn.fetch(Q["replay_many_reset"], found, names, now)
                if create:
                    created_rows = await conn.fetch(Q["replay_many_create"], found, names, now)
            if reset_rows or created_rows:
                await self._notify(conn)
        if reset_rows or created_rows:
            self._nudge()  # after the commit: the claim it wakes must see the rows
        return ReplayCounts(created=len(created_rows), reset=len(reset_rows))

    async def retry_dead(self, *, handler: str | None, now: datetime) -> int:
        """Make every dead delivery (of ``handler``) pending, due at ``now``, with a fresh budget.

        Return how many; NOTIFY when any.
        """
        now = _utc(now)
        async with self._connection(write=True) as conn, conn.transaction():
            # Lock the events first (in a fixed order), as replay does, so a concurrent prune
            # either sees these deliveries pending or has already deleted them.
            await conn.execute(Q["lock_dead_events"], handler)
            rows = await conn.fetch(Q["retry_dead"], handler, now)
            if rows:
                await self._notify(conn)
        if rows:
            self._nudge()  # after the commit: the claim it wakes must see the rows
        return len(rows)

    # -- flow control ---------------------------------------------------------------------------

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str | None, now: datetime
    ) -> bool:
        """Pause or resume; a resume NOTIFYs so every replica claims the backlog at once."""
        now = _utc(now)
        async with self._connection(write=True) as conn, conn.transaction():
            if paused:
                changed = await conn.fetchval(Q["pause"], handler, reason, now)
            else:
                changed = await conn.fetchval(Q["resume"], handler, now)
                if changed is not None:
                    await self._notify(conn)
        if changed is not None and not paused:
            self._nudge()
        return changed is not None

    async def paused_handlers(self) -> dict[str, HandlerState]:
        async with self._connection() as conn:
            rows = await conn.fetch(Q["paused_handlers"])
        return {row["handler"]: handler_state(row, _at) for row in rows}

    async def handler_states(self) -> list[HandlerState]:
        async with self._connection() as conn:
            rows = await conn.fetch(Q["handler_states"])
        return [handler_state(row, _at) for row in rows]

    async def handler_activity(self, *, now: datetime, since: datetime) -> list[HandlerActivity]:
        found: dict[str, dict[str, Any]] = {}
        async with self._connection() as conn, conn.transaction(readonly=True):
            for row in await conn.fetch(Q["handler_queue"], _utc(now)):
                found[row["handler"]] = {
                    name: row[name] for name in ("running", "due", "waiting", "dead")
                }
            for row in await conn.fetch(Q["handler_attempts"], _utc(since)):
                found.setdefault(row["handler"], {}).update(
                    attempts=row["attempts"],
                    succeeded=row["succeeded"],
                    p50_seconds=row["p50_seconds"],
                    p95_seconds=row["p95_seconds"],
                )
            for row in await conn.fetch(Q["handler_last_errors"], _utc(since)):
                found.setdefault(row["handler"], {}).update(
                    last_error=row["last_error"], last_error_at=row["last_error_at"]
                )
        return [HandlerActivity(handler=name, **found[name]) for name in sorted(found)]

    async def count_failure(
        self, handler: str, *, pause_after: int | None, reason: str, now: datetime
    ) -> bool:
        """Counted and, at ``pause_after``, paused in one transaction (the row lock of the
        upsert orders concurrent replicas, so exactly one of them pauses it)."""
        now = _utc(now)
        async with self._connection(write=True) as conn, conn.transaction():
            row = await conn.fetchrow(Q["count_failure"], handler, now)
            assert row is not None  # an upsert with RETURNING always returns its row
            if row["paused"] or pause_after is None or row["consecutive_failures"] < pause_after:
                return False
            return await conn.fetchval(Q["pause"], handler, reason, now) is not None

    async def count_success(self, handler: str, *, now: datetime) -> None:
        async with self._connection(write=True) as conn:
            await conn.execute(Q["count_success"], handler, _utc(now))

    async def take_tokens(
        self, handler: str, *, want: int, capacity: float, per_second: float, now: datetime
    ) -> int:
        """The bucket is refilled by the database's clock (``now`` unused): replicas whose
        clocks disagree still share one rate."""
        async with self._connection(write=True) as conn, conn.transaction():
            tokens = await conn.fetchval(Q["refill_tokens"], handler, capacity, per_second)
            taken: int = max(0, min(want, math.floor(float(tokens))))
            if taken:
                await conn.execute(Q["spend_tokens"], handler, capacity, taken)
        return taken

    async def give_back_tokens(self, handler: str, count: int, *, capacity: float) -> None:
        async with self._connection(write=True) as conn:
            await conn.execute(Q["spend_tokens"], handler, capacity, -count)

    # -- internals -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(
        self, *, write: bool = False
    ) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A pooled connection; any database failure in the block becomes ``StoreUnavailable``.

        With ``write`` the block is a write: its success or failure is what ``ping`` reports.
        """
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("The event store (PostgreSQL) is not open.")
        try:
            async with pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn
        except _DB_ERRORS as exc:
            if write:
                self._health.failed(exc)
            if isinstance(exc, _CONNECTION_LOST):
                # Replace every pooled connection on its next acquire, so that after a server
                # restart one caller gets StoreUnavailable, not one per stale connection.
                await pool.expire_connections()
            raise _unavailable(exc) from exc
        if write:
            self._health.committed()

    @contextlib.asynccontextmanager
    async def _migration_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of its own for migrating (the pool's when open, else a one-off one)."""
        try:
            if self._pool is not None:
                async with self._pool.acquire(timeout=self._acquire_timeout) as pooled:
                    yield pooled  # type: ignore[misc]  # a proxy behaves as its Connection
                return
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": self._application_name},
            )
            try:
                yield conn
            finally:
                await conn.close(timeout=self._command_timeout)
        except _DB_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def _notify(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        # Inside the caller's transaction: PostgreSQL delivers it only if the transaction commits.
        await conn.execute(Q["notify"], self._channel)

    def _nudge(self, *_: object) -> None:
        self._wakeup.set()
        self.stream_signal.notify()

    async def _connect_listener(self) -> asyncpg.Connection:
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": f"{self._application_name}-listener"},
            )
        except _DB_ERRORS as exc:
            raise _unavailable(exc) from exc
        try:
            await conn.add_listener(self._channel, self._nudge)
        except _DB_ERRORS as exc:
            conn.terminate()
            raise _unavailable(exc) from exc
        self._listening = True
        return conn

    async def _supervise_listener(self, conn: asyncpg.Connection | None) -> None:
        """Keep one LISTEN connection alive until ``close()``; reconnect with backoff.

        A dropped connection is noticed at once (termination callback); a
        silently dead one by the ``SELECT 1`` every ``listener_check_seconds``.
        After each reconnect the store nudges itself, since NOTIFYs sent while
        it was not listening are lost.
        """
        backoff = 0.2
        try:
            while not self._closing:
                if conn is None:
                    try:
                        conn = await self._connect_listener()
                    except StoreUnavailable:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 10.0)
                        continue
                    log.info("store.listener_reconnected channel=%s", self._channel)
                    self._nudge()
                    backoff = 0.2
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                try:
                    while not lost.is_set():
                        try:
                            await asyncio.wait_for(lost.wait(), timeout=self._listener_check)
                        except TimeoutError:
                            await conn.fetchval("SELECT 1")
                except _DB_ERRORS as exc:
                    log.warning("store.listener_lost error=%s", type(exc).__name__)
                else:
                    log.warning("store.listener_lost error=ConnectionClosed")
                self._listening = False
                conn.terminate()
                conn = None
        finally:
            self._listening = False
            if conn is not None:
                conn.terminate()


__all__ = ["DEFAULT_CHANNEL", "MIGRATE_LOCK_KEY", "PRUNE_LOCK_KEY", "PostgresStore"]
