"""The embedded backend: one SQLite file in WAL mode, written by one writer with group commit.

Every operation runs on the writer, each in a transaction of its own;
``accept`` calls are batched into one transaction and one fsync. The writer is
a thread of this process (``writer.Writer``, the default) or, for
``serve``, a child process (``process.ProcessWriter``). The operations are the
flows of ``store/outbox.py`` (shared with PostgreSQL), run on the writer by
``driver.drive``; flows and driver are module-level so that either writer can
run them. With ``synchronous=full`` (the default) a 2xx is only ever sent
for an event whose commit reached the disk; ``normal`` trades the last commits
before a power loss (never corruption) for fewer fsyncs.

The admin's reads (search, listings, one event, its attempts, a task, handler health) run
on a read-only connection of their own (``reader.py``): WAL lets them read beside the
writer, so a long search never delays a group commit.

Times are UTC-aware ``datetime`` at the API and epoch seconds (REAL) in the
file. The schema is migrated on ``open()`` from the numbered ``.sql`` files in
``store/sql/sqlite``, each applied once, in order, in a transaction, and
recorded in ``schema_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from ...errors import StoreUnavailable
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
from ..outbox import Flow
from ..rules import CommitHealth, task_order
from ..searchsql import search_sql, windowed
from ..stream import StreamSignal, make_cursor, read_cursor
from . import operations as ops
from .driver import drive, epoch, read
from .operations import AcceptRow
from .process import ProcessWriter
from .reader import Reader
from .writer import RowRefused, Writer

_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
#: How late a stream follower sees an event another process stored in the same file (this
#: process's own accepts wake it at once).
STREAM_POLL_SECONDS = 1.0
#: Pending deliveries brought forward per transaction after a clock step back (about 50 ms
#: of the writer each): accepts go in between chunks.
BRING_FORWARD_CHUNK = 5000
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Group-commit figures since ``open()``: committed batches, the accepts in them, and
    the requests queued for the writer right now."""

    batches: int
    accepts: int
    queued: int


class SQLiteStore:
    """The ``Store`` on one SQLite file; ``open()`` it on the event loop that will use it.

    With ``process=True`` the connection lives in a writer process of its own (``serve``
    uses it: the request path and the writer then never wait for each other's GIL);
    otherwise in a thread of this process. Both behave the same.
    """

    def __init__(self, path: str, *, synchronous: str = "full", process: bool = False) -> None:
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = path
        self.synchronous = _SYNCHRONOUS[synchronous.lower()]
        self.process = process
        self._writer: Writer[AcceptRow] | ProcessWriter[AcceptRow]
        if process:
            self._writer = ProcessWriter(
                name="lacuna-sqlite-writer",
                connect=ops.connect,
                connect_args=(path, self.synchronous),
                accept_batch=ops.accept_batch,
                row_type=AcceptRow._make,
                row_size=ops.row_size,
            )
        else:
            self._writer = Writer(
                name="lacuna-sqlite-writer",
                connect=functools.partial(ops.connect, path, self.synchronous),
                accept_batch=ops.accept_batch,
            )
        self._work = asyncio.Event()
        self._health = CommitHealth()
        # Until a write has committed, ping proves one (a probe write, once): opened on a
        # full disk, the reads answer while every commit fails.
        self._health.failure = "no write has committed since the store opened"
        # The admin's reads (search, listings, health): never queued behind the writer.
        self._reader = Reader(path)
        self.stream_signal = StreamSignal(poll_seconds=STREAM_POLL_SECONDS)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, synchronous={self.synchronous.lower()!r})"

    @property
    def writer_stats(self) -> WriterStats:
        w = self._writer
        return WriterStats(batches=w.batches, accepts=w.batched, queued=w.queued)

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the folder if needed, open the file, migrate; ``StoreUnavailable`` names the
        path when it is not a usable database."""
        await self._writer.start()
        try:
            await self._reader.start()
        except BaseException:
            await self._writer.stop()
            raise

    async def close(self) -> None:
        """Finish what is queued, then close the file. Later calls raise ``StoreUnavailable``."""
        await self._reader.stop()
        await self._writer.stop()

    async def ping(self) -> None:
        """Return when the writer answers and writes commit; raise ``StoreUnavailable``.

        Before the first write committed, and after a write failed for a reason of the
        database (``CommitHealth``: locked too long, full disk, read-only or broken file), a
        probe write must commit first.
        """
        if self._health.failure is None:
            await self._writer.run(ops.ping, write=False)
        else:
            await self._write(ops.probe_write, time.time())

    async def _tracked(self, write: Awaitable[T]) -> T:
        """Await a write; its outcome is what ``ping`` reports (``CommitHealth``). A row
        refused for its own values says nothing about the database."""
        try:
            result = await write
        except RowRefused:
            raise
        except StoreUnavailable as exc:
            self._health.failed(exc)
            raise
        self._health.committed()
        return result

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` on the writer in a write transaction of its own."""
        return await self._tracked(self._writer.run(fn, *args))

    async def _run(self, flow: Callable[..., Flow[T]], *args: Any) -> T:
        """The flow ``flow(*args)`` on the writer in a write transaction of its own; a nudge
        of the flow wakes this process's dispatcher."""
        outcome: tuple[T, bool] = await self._write(drive, flow, *args)
        result, nudged = outcome
        if nudged:
            self._work.set()
        return result

    async def _read(self, flow: Callable[..., Flow[T]], *args: Any) -> T:
        """A reading flow on the writer (the dispatcher's reads: never behind an admin
        search on the reader)."""
        outcome: tuple[T, bool] = await self._writer.run(drive, flow, *args, write=False)
        return outcome[0]

    async def diagnostics(self) -> dict[str, object]:
        """What the connection actually runs with (for ``doctor``-style output and tests):
        journal mode, synchronous level (0 off, 1 normal, 2 full), busy timeout, page size and
        the schema version."""
        return await self._writer.run(ops.diagnostics, write=False)

    # --- intake ----------------------------------------------------------------------------------

    async def accept(
        self,
        event: Event,
        handlers: Sequence[str],
        *,
        now: datetime,
        trace_context: str | None = None,
    ) -> bool:
        return await self.accept_soon(event, handlers, now=now, trace_context=trace_context)

    def accept_soon(
        self,
        event: Event,
        handlers: Sequence[str],
        *,
        now: datetime,
        trace_context: str | None = None,
    ) -> asyncio.Future[bool]:
        """``accept`` as a future (its result: ``True`` if the event was new), for the
        intake's direct path, which answers from the future's callback instead of a task
        per request (``WebhookEndpoint.answer_soon``). Raises ``StoreUnavailable`` at once
        when the writer is not running; cancelling the future gives up waiting, not the
        write."""
        received_at = epoch(now)
        row = AcceptRow(
            event.id,
            event.type,
            event.created,
            received_at,
            event.task_id,
            event.task_status,
            event.raw,
            tuple(dict.fromkeys(handlers)),
            task_order(event.created, received_at),
            trace_context,
        )
        try:
            future = self._writer.accept_soon(row)
        except StoreUnavailable as exc:
            self._health.failed(exc)
            raise
        future.add_done_callback(functools.partial(self._accepted, bool(row.handlers)))
        return future

    def _accepted(self, has_handlers: bool, future: asyncio.Future[bool]) -> None:
        """An accept's commit ended: the commit health, and the work and stream signals."""
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self._health.failure = None
            if future.result():
                if has_handlers:
                    self._work.set()
                self.stream_signal.notify()
        elif isinstance(error, StoreUnavailable) and not isinstance(error, RowRefused):
            self._health.failed(error)

    async def wait_for_work(self, timeout_seconds: float) -> None:
        """Return when an accept, replay or retry_dead of this process made work, or after the
        timeout. Other processes writing the same file are only seen through the timeout."""
        if not self._work.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), timeout_seconds)
        self._work.clear()

    # --- the dispatcher's side -------------------------------------------------------------

    async def claim(
        self,
        *,
        handler: str,
        limit: int,
        lease: timedelta,
        now: datetime,
        after: Sequence[str] = (),
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        return await self._run(outbox.claim, handler, limit, lease, now, tuple(after))

    async def _finish(self, params: dict[str, Any], tally: Tally | None) -> Recorded:
        flow, args = outbox.finish_call(params, tally)
        return await self._run(flow, *args)

    async def complete(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
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
        params = outbox.finish_params(
            DeliveryStatus.PENDING, delivery, attempt, next_attempt_at=at, refund=refund
        )
        return await self._finish(params, tally)

    async def dead(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        params = outbox.finish_params(DeliveryStatus.DEAD, delivery, attempt)
        return await self._finish(params, tally)

    async def release(self, delivery: Delivery, *, now: datetime | None = None) -> bool:
        """Lease cleared, token moved on, the claim's attempt undone. ``next_attempt_at`` is left
        as it was: it was due when claimed, so it is due at once and keeps its place in line."""
        return await self._run(outbox.release, delivery.id, delivery.lease_token, now)

    async def clock_offset(self) -> timedelta | None:
        """``None``: one machine's clock stamps and reads everything (``Store.clock_offset``)."""
        return None

    async def clock_stepped_back(
        self, *, by: timedelta, now: datetime, written_since: datetime | None = None
    ) -> int:
        """Pending deliveries due after ``now`` (and written after ``written_since``) brought
        forward by ``by``, never before ``now``; how many (``Store.clock_stepped_back``: this
        machine's clock wrote them)."""
        since = None if written_since is None else epoch(written_since)
        moved, after = 0, 0
        while True:
            # A chunk per transaction: a backlog of a million moved in one held the single
            # writer, and every accept behind it, for 15 s.
            found, upto = await self._write(
                ops.bring_forward,
                by.total_seconds(),
                epoch(now),
                since,
                after,
                BRING_FORWARD_CHUNK,
            )
            moved += found
            if found:
                self._work.set()
            if found < BRING_FORWARD_CHUNK or upto is None:
                return moved
            after = upto

    async def stats(
        self, *, now: datetime, after: Mapping[str, Sequence[str]] | None = None
    ) -> QueueStats:
        return await self._read(outbox.stats, now, outbox.held_by(after))

    # --- maintenance and admin ---------------------------------------------------------------

    async def prune(self, *, received_before: datetime, keep: timedelta | None = None) -> int:
        """Deleted in chunks, each its own transaction, so accepts are never held up long.
        ``keep`` is not read: one machine's clock stamped and prunes every event."""
        return await outbox.prune(self._run, received_before, keep)

    async def list_events(
        self, *, limit: int = 50, event_type: str | None = None
    ) -> list[EventRecord]:
        return await self._reader.run(read, outbox.list_events, event_type, limit)

    async def get_event(self, event_id: str) -> EventRecord | None:
        return await self._reader.run(read, outbox.get_event, event_id)

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
        """``searchsql`` rules; the cursor is ``[received_at, rowid]`` of the page's last row,
        or of the oldest event a budgeted scan reached (``searchsql.windowed_search``). The
        search reads the bodies' lengths; the bodies the page keeps are read after it, in its
        read transaction."""
        now = datetime.now(UTC)
        if budget is not None and limit > 0 and windowed("sqlite", where, budget):
            return await self._reader.run(
                ops.search_windowed, where, cursor, limit, now, budget, bodies, max_bytes
            )
        sql, params = search_sql("sqlite", where, cursor=cursor, limit=limit, now=now)
        return await self._reader.run(
            ops.search_events, sql, params, max(limit, 0), bodies, max_bytes
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
        args = (status, handler, event_id, limit, before)
        if dispatching:
            # The dispatcher's lookup of one event's AFTER results: it must not wait behind
            # an admin search on the reader.
            return await self._read(outbox.list_deliveries, *args)
        # Everyone else's (the admin API's one event, task and listings, the console's rows):
        # on the reader, never a job in the writer's queue ahead of intake's accepts.
        return await self._reader.run(read, outbox.list_deliveries, *args)

    async def list_attempts(self, delivery_id: int) -> list[AttemptRecord]:
        return await self._reader.run(read, outbox.list_attempts, delivery_id)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._reader.run(read, outbox.get_task, task_id)

    async def stream_after(
        self, cursor: str | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[str, EventRecord]]:
        """``events.stream_seq`` order, read on the reader (never queued behind the writer);
        the cursor holds the last position handed out."""
        after = 0 if cursor is None else read_cursor(cursor, "s", 1)[0]
        found = await self._reader.run(ops.stream_after, after, max(0, limit), max_bytes)
        return [(make_cursor("s", position), record) for position, record in found]

    async def stream_head(self) -> str:
        return make_cursor("s", await self._reader.run(ops.stream_head))

    async def replay(self, event_id: str, handlers: Sequence[str] | None, *, now: datetime) -> int:
        return await self._run(outbox.replay, event_id, _names(handlers), now)

    async def replay_many(
        self,
        event_ids: Sequence[str],
        handlers: Sequence[str] | None,
        *,
        now: datetime,
        create: bool = True,
        reset: bool = True,
    ) -> ReplayCounts:
        """One job on the writer: a batch of a few hundred ids is a few index lookups each,
        so intake's accepts queue behind it for milliseconds, not for the whole operation."""
        created, reset_count = await self._run(
            outbox.replay_many, tuple(event_ids), _names(handlers), create, reset, now
        )
        return ReplayCounts(created=created, reset=reset_count)

    async def retry_dead(self, *, handler: str | None, now: datetime) -> int:
        return await self._run(outbox.retry_dead, handler, now)

    # --- flow control ------------------------------------------------------------------------

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str | None, now: datetime
    ) -> bool:
        return await self._run(outbox.set_paused, handler, paused, reason, now)

    async def paused_handlers(self) -> dict[str, HandlerState]:
        states = await self._read(outbox.handler_states, True)
        return {state.handler: state for state in states}

    async def handler_states(self) -> list[HandlerState]:
        # An admin read (GET /handlers, `handlers`): on the reader. The dispatcher's own
        # read, paused_handlers, stays on the writer.
        return await self._reader.run(read, outbox.handler_states, False)

    async def handler_activity(self, *, now: datetime, since: datetime) -> list[HandlerActivity]:
        return await self._reader.run(read, outbox.handler_activity, now, since)

    async def take_tokens(
        self, handler: str, *, want: int, capacity: float, per_second: float, now: datetime
    ) -> int:
        return await self._run(outbox.take_tokens, handler, want, capacity, per_second, now)

    async def give_back_tokens(self, handler: str, count: int, *, capacity: float) -> None:
        await self._run(outbox.give_back_tokens, handler, count, capacity)


def _names(handlers: Sequence[str] | None) -> tuple[str, ...] | None:
    """A handler list as a plain tuple (it crosses the writer process's pipe)."""
    return None if handlers is None else tuple(handlers)


__all__ = ["SQLiteStore", "WriterStats"]
