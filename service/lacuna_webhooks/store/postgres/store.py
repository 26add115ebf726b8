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
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from ...errors import ConfigError, StoreUnavailable
from ...models import Attempt, Delivery, DeliveryStatus, Event
from .. import outbox
from ..base import (
    PAGE_BODY_BYTES,
    AttemptRecord,
    DeliveryRecord,
    EventFilter,
    EventPage,
    EventRecord,
    HandlerActivity,
    HandlerState,
    QueueStats,
    Recorded,
    ReplayCounts,
    ScanBudget,
    Tally,
    TaskRecord,
)
from ..outbox import PRUNE_LOCK_KEY, Flow, Nudge, Query
from ..queries import load, parameters
from ..rows import event_heads, event_record
from ..rules import CommitHealth, as_utc, task_order
from ..searchsql import (
    WindowedPage,
    fit_page,
    next_cursor,
    search_sql,
    windowed,
    windowed_search,
)
from ..stream import StreamSignal, make_cursor, read_cursor

log = logging.getLogger(__name__)

#: ``pg_advisory_lock`` key held while migrating (any fixed bigint unique to this service).
MIGRATE_LOCK_KEY = 0x6C61_6375_6E61_0001
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
#: Per query, its ``:name`` parameters in ``$n`` order (``queries.compile_named``).
P = parameters("postgres")
T = TypeVar("T")


_CREDENTIALS = re.compile(r"://[^/@\s]+@")


def _driver_refusal(exc: BaseException) -> str:
    """What the driver says of an option it refuses, any URL userinfo masked."""
    return "the PostgreSQL driver refuses an option of it: " + _CREDENTIALS.sub(
        "://***@", str(exc) or type(exc).__name__
    )


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


def _value(value: Any) -> Any:
    """A flow's value as asyncpg takes it: tuples as lists (arrays), naive times as UTC."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, datetime):
        return as_utc(value)
    return value


def _count(status: str) -> int:
    """The row count of a command status (``UPDATE 3``, ``INSERT 0 1``, ``SELECT 2``)."""
    count = status.rpartition(" ")[2]
    return int(count) if count.isdigit() else 0


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
        except asyncpg.ClientConfigurationError as exc:
            # The driver refuses an option of the URL (`?sslmode=requre`) before it connects:
            # a bad setting (exit 2), not a store that is down (exit 1), however often retried.
            raise ConfigError(f"LACUNA_DATABASE_URL: {_driver_refusal(exc)}") from None
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
                newest_known = migrations[-1][0] if migrations else 0
                newest_applied = max(applied, default=0)
                if newest_applied > newest_known:
                    # A rolled-back release on a database a newer one migrated: its queries
                    # would run against tables it does not know (as SQLite refuses it).
                    raise StoreUnavailable(
                        f"The database schema (version {newest_applied}) is newer than this "
                        f"release knows (version {newest_known}); upgrade lacuna-webhooks."
                    )
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
            await conn.execute(Q["write_probe"])  # no parameters

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
        stored = await self._run(
            outbox.accept,
            outbox.AcceptValues(
                event_id=event.id,
                event_type=event.type,
                created=event.created,
                task_id=event.task_id,
                task_status=event.task_status,
                raw=event.raw,
                trace_context=trace_context,
                received_at=as_utc(now),
                order=task_order(event.created, as_utc(now).timestamp()),
                handlers=tuple(dict.fromkeys(handlers)),
            ),
        )
        if stored:
            # A NOTIFY went out only when it made deliveries (the nudge); streams of this
            # process wake at once either way, other replicas' within STREAM_POLL_SECONDS.
            self.stream_signal.notify()
        return stored

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
        return await self._run(outbox.claim, handler, limit, lease, now, after)

    async def complete(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        """Mark the claimed delivery done and log the attempt; ``Recorded(False)`` if the
        claim is stale. With no tally or a success: one statement, no BEGIN/COMMIT."""
        params = outbox.finish_params(DeliveryStatus.DONE, delivery, attempt)
        return await self._finish(params, tally)

    async def retry(
        self,
        delivery: Delivery,
        attempt: Attempt,
        *,
        at: datetime,
        refund: bool = False,
        tally: Tally | None = None,
    ) -> Recorded:
        """Make the claimed delivery due again at ``at`` and log the attempt (``refund``: see
        ``Store.retry``); a failure's count and pause in the same transaction."""
        params = outbox.finish_params(
            DeliveryStatus.PENDING, delivery, attempt, next_attempt_at=at, refund=refund
        )
        return await self._finish(params, tally)

    async def dead(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        """Give the claimed delivery up (``dead``) and log the attempt."""
        params = outbox.finish_params(DeliveryStatus.DEAD, delivery, attempt)
        return await self._finish(params, tally)

    async def _finish(self, params: dict[str, Any], tally: Tally | None) -> Recorded:
        # A failure's count and pause: one transaction with the outcome (finish_counted),
        # the upsert's row lock ordering replicas, so exactly one of them pauses.
        flow, args = outbox.finish_call(params, tally)
        return await self._run(flow, *args)

    async def release(self, delivery: Delivery, *, now: datetime | None = None) -> bool:
        """Give an unfinished claim back: lease cleared, ``attempts`` undone, due at once.

        ``next_attempt_at`` is left as it was (it was due when claimed), so the
        delivery keeps its place in the queue; the token moves on, so a late outcome of
        the released claim is refused. ``False`` if the claim is stale.
        """
        return await self._run(outbox.release, delivery.id, delivery.lease_token, now)

    async def clock_offset(self) -> timedelta | None:
        """The database's clock minus this process's wall clock, read around one query (its
        round trip halved): what ``Dispatcher.clock`` adds, so every replica schedules and
        claims by the database's clock (``Store.clock_offset``)."""
        async with self._connection() as conn:
            before = time.time()
            database = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
            after = time.time()
        return timedelta(seconds=float(database) - (before + after) / 2)

    async def clock_stepped_back(
        self, *, by: timedelta, now: datetime, written_since: datetime | None = None
    ) -> int:
        """Nothing moves (0): the schedules here were written by every replica, whose clocks
        did not step with this one's (``Store.clock_stepped_back``)."""
        return 0

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

    async def stats(
        self, *, now: datetime, after: Mapping[str, Sequence[str]] | None = None
    ) -> QueueStats:
        """Due times against ``now``, leases against the database's clock (as ``claim``)."""
        return await self._run(outbox.stats, as_utc(now), outbox.held_by(after), write=False)

    async def prune(self, *, received_before: datetime, keep: timedelta | None = None) -> int:
        """Delete events received before the cutoff whose deliveries are all done or dead.

        Their deliveries and attempts go with them (``ON DELETE CASCADE``); task
        state stays. In chunks (``outbox.PRUNE_CHUNK``), each a transaction. Only one
        replica prunes at a time: when another holds the prune lock this returns at once.
        Candidate events are locked (skipping any a replay is touching) and re-checked in
        a fresh statement, so a delivery made pending by a concurrent replay is never
        deleted. With ``keep``, an event must also be older than that by the database's
        clock: a replica whose clock runs ahead does not prune early.
        """
        return await outbox.prune(self._run, received_before, keep)

    async def list_events(
        self, *, limit: int = 50, event_type: str | None = None
    ) -> list[EventRecord]:
        """Newest first (by ``received_at``, then by arrival order)."""
        return await self._run(outbox.list_events, event_type, limit, write=False)

    async def get_event(self, event_id: str) -> EventRecord | None:
        return await self._run(outbox.get_event, event_id, write=False)

    async def search_events(
        self,
        where: EventFilter,
        *,
        cursor: str | None = None,
        limit: int = 50,
        budget: ScanBudget | None = None,
        bodies: bool = True,
        max_bytes: int | None = PAGE_BODY_BYTES,
    ) -> EventPage:
        """``searchsql`` rules; the cursor is ``[received_at, seq]`` of the page's last row,
        or of the oldest event a budgeted scan reached (``searchsql.windowed_search``: its
        windows in one read-only snapshot). Each statement runs under ``SEARCH_TIMEOUT_MS``
        so a search never holds one of the pool's connections (which intake shares) for
        long. The search reads the bodies' lengths; the bodies the page keeps (within
        ``max_bytes``) are read after it, in the same snapshot."""
        now = datetime.now(UTC)
        if budget is not None and limit > 0 and windowed("postgres", where, budget):
            scan = windowed_search(
                "postgres", where, cursor=cursor, limit=limit, now=now, budget=budget
            )
            statement = next(scan)  # a bad cursor raises here, before a connection is taken
        else:
            scan = None
            statement = search_sql("postgres", where, cursor=cursor, limit=limit, now=now)
        async with (
            self._search_slots,
            self._connection() as conn,
            conn.transaction(readonly=True, isolation="repeatable_read"),
        ):
            await conn.execute(f"SET LOCAL statement_timeout = {SEARCH_TIMEOUT_MS}")
            if scan is None:
                found = await conn.fetch(statement[0], *statement[1])
                rows = found[: max(limit, 0)]
                next_page = None
                if len(found) > limit and rows:
                    next_page = next_cursor("postgres", rows[-1]["received_at"], rows[-1]["seq"])
                page: WindowedPage = (rows, next_page, True, None)
            else:
                try:
                    while True:
                        statement = scan.send(await conn.fetch(statement[0], *statement[1]))
                except StopIteration as stop:
                    page = stop.value
            if bodies:
                page = fit_page("postgres", page, max_bytes)
            found, next_page, complete, reached = page
            raw = None
            if bodies and found:
                # One repeatable-read snapshot: every row of the page still has its body.
                raw = {
                    r["seq"]: bytes(r["raw"])
                    for r in await conn.fetch(Q["event_bodies"], [row["seq"] for row in found])
                }
            records = event_heads(found, _at, raw)
        return EventPage(
            records,
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
        dispatching: bool = False,
    ) -> list[DeliveryRecord]:
        """Newest first (by id, which follows creation). ``dispatching`` changes nothing
        here (see ``Store.list_deliveries``)."""
        return await self._run(
            outbox.list_deliveries, status, handler, event_id, limit, before, write=False
        )

    async def list_attempts(self, delivery_id: int) -> list[AttemptRecord]:
        """Oldest first."""
        return await self._run(outbox.list_attempts, delivery_id, write=False)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._run(outbox.get_task, task_id, write=False)

    async def stream_after(
        self, cursor: str | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[str, EventRecord]]:
        """``(xid, seq)`` order, only rows below the snapshot's xmin (``0008_stream.sql``);
        the byte budget is applied in the query (a running sum of the body sizes), so the
        bodies past it are not sent here."""
        xid, seq = (0, 0) if cursor is None else read_cursor(cursor, "p", 2)
        budget = 2**62 if max_bytes is None else max_bytes
        async with self._connection() as conn:
            rows = await self._fetch(
                conn,
                "stream_after",
                {"xid": str(xid), "seq": seq, "limit": max(0, limit), "max_bytes": budget},
            )
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
        return await self._run(outbox.replay, event_id, handlers, now)

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
        return ReplayCounts(
            *await self._run(outbox.replay_many, event_ids, handlers, create, reset, now)
        )

    async def retry_dead(self, *, handler: str | None, now: datetime) -> int:
        """Make every dead delivery (of ``handler``) pending, due at ``now``, with a fresh budget.

        Return how many; NOTIFY when any.
        """
        return await self._run(outbox.retry_dead, handler, now)

    # -- flow control ---------------------------------------------------------------------------

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str | None, now: datetime
    ) -> bool:
        """Pause or resume; a resume NOTIFYs so every replica claims the backlog at once."""
        return await self._run(outbox.set_paused, handler, paused, reason, now)

    async def paused_handlers(self) -> dict[str, HandlerState]:
        states = await self._run(outbox.handler_states, True, write=False)
        return {state.handler: state for state in states}

    async def handler_states(self) -> list[HandlerState]:
        return await self._run(outbox.handler_states, False, write=False)

    async def handler_activity(self, *, now: datetime, since: datetime) -> list[HandlerActivity]:
        return await self._run(outbox.handler_activity, now, since, write=False)

    async def take_tokens(
        self, handler: str, *, want: int, capacity: float, per_second: float, now: datetime
    ) -> int:
        """The bucket is refilled by the database's clock (``now`` unused): replicas whose
        clocks disagree still share one rate."""
        return await self._run(outbox.take_tokens, handler, want, capacity, per_second, now)

    async def give_back_tokens(self, handler: str, count: int, *, capacity: float) -> None:
        await self._run(outbox.give_back_tokens, handler, count, capacity)

    # -- the flows' driver ---------------------------------------------------------------------

    async def _run(self, flow: Callable[..., Flow[T]], *args: Any, write: bool = True) -> T:
        """Run the flow ``flow(*args)`` (``store/outbox.py``) on one pooled connection, in one
        transaction (read-only unless ``write``), or statement by statement for the flows in
        ``outbox.AUTOCOMMIT``. Its nudges NOTIFY in that transaction (sent only on commit)
        and wake this replica's dispatcher after it."""
        steps = flow(*args)
        nudged = False
        async with self._connection(write=write) as conn:
            scope = (
                contextlib.nullcontext()
                if flow in outbox.AUTOCOMMIT
                else conn.transaction(readonly=not write)
            )
            async with scope:
                try:
                    step = next(steps)
                    while True:
                        if isinstance(step, Nudge):
                            if not nudged:
                                await self._notify(conn)
                            nudged = True
                            step = steps.send(None)
                        else:
                            step = steps.send(await self._query(conn, step))
                except StopIteration as stop:
                    result: T = stop.value
        if nudged:
            self._nudge()  # after the commit: the claim it wakes must see the rows
        return result

    @staticmethod
    async def _query(conn: Any, query: Query) -> Any:
        """One query's result, in the shape it asked for."""
        sql = Q[query.name]
        params = query.params
        args = [_value(params[name]) for name in P[query.name]]
        shape, mapper = query.shape, query.row
        if shape == "rowcount":
            return _count(await conn.execute(sql, *args))
        if shape == "rows":
            found = await conn.fetch(sql, *args)
            return found if mapper is None else [mapper(row, _at) for row in found]
        if shape == "value":
            return await conn.fetchval(sql, *args)
        row = await conn.fetchrow(sql, *args)
        return row if row is None or mapper is None else mapper(row, _at)

    async def _fetch(self, conn: Any, name: str, params: dict[str, Any]) -> list[Any]:
        """The rows of one named query outside a flow (the live stream)."""
        found: list[Any] = await self._query(conn, Query(name, params, "rows"))
        return found

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
        await self._query(conn, Query("notify", {"channel": self._channel}, "value"))

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
