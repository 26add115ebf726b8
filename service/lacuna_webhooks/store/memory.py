"""An in-memory ``Store``: the reference implementation of the contract, and a test double.

Dicts guarded by one ``asyncio.Lock``; no I/O, nothing survives the process,
so it is never used in production and ``open_store`` does not know it. It
keeps every rule of ``store.base`` (read that docstring first); where the
contract leaves a choice open, this module's choice is stated in the method.

For tests it has two switches: set ``unavailable = True`` and every operation
raises ``StoreUnavailable``, as a backend does when its database is down; set
``failing_commits = True`` and every write raises it (reads still answer), as
on a full disk, and ``ping`` fails until a write commits again.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..errors import EventNotFound, StoreUnavailable
from ..models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from .base import (
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
    attempt_error,
)
from .rules import as_utc, nearest_rank, task_order
from .search import body_matches, decode_cursor, delivery_state, encode_cursor, fitting
from .stream import StreamSignal, make_cursor, read_cursor

if TYPE_CHECKING:
    from .base import Store


@dataclass(slots=True)
class _DeliveryRow:
    """The mutable row behind a ``DeliveryRecord``; ``lease_token`` counts claims."""

    id: int
    event_id: str
    handler: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    lease_until: datetime | None = None
    lease_token: int = 0
    last_error: str | None = None
    result: dict[str, Any] | None = None
    history: list[AttemptRecord] = field(default_factory=list)

    def due(self, now: datetime) -> bool:
        """Pending, due, and not held by a live lease."""
        return (
            self.status is DeliveryStatus.PENDING
            and self.next_attempt_at <= now
            and (self.lease_until is None or self.lease_until <= now)
        )


_ACTIVITY_FIELDS = frozenset(
    {"due", "running", "waiting", "dead", "attempts", "succeeded", "last_error", "last_error_at"}
)


def _order(event: Event, received_at: datetime) -> float:
    """What orders a task's events: ``rules.task_order``."""
    return task_order(event.created, received_at.timestamp())


class MemoryStore:
    """A ``Store`` kept in dicts. Operations raise ``StoreUnavailable`` when it is not open."""

    def __init__(self) -> None:
        self.unavailable = False
        self.failing_commits = False
        self._open = False
        self._lock = asyncio.Lock()
        # Set by anything that may make work due; stays set until ``wait_for_work`` consumes
        # it, so a nudge that arrives while the dispatcher is busy claiming is not lost.
        self._nudge = asyncio.Event()
        self._ids = itertools.count(1)
        self._events: dict[str, EventRecord] = {}
        # event id -> the receiving request's traceparent (only events accepted with one)
        self._trace_contexts: dict[str, str] = {}
        # Arrival order of each stored event (never reused): ties of ``received_at`` and
        # search cursors.
        self._arrivals = itertools.count(1)
        self._arrival: dict[str, int] = {}
        # The live stream's order is the arrival order; the head is the last arrival given.
        self._last_arrival = 0
        self.stream_signal = StreamSignal(poll_seconds=1.0)
        self._deliveries: dict[int, _DeliveryRow] = {}
        self._tasks: dict[str, TaskRecord] = {}
        self._task_order: dict[str, float] = {}
        self._handler_states: dict[str, HandlerState] = {}
        self._buckets: dict[str, tuple[float, datetime]] = {}  # handler -> (tokens, updated)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to connect to or migrate: mark the store usable."""
        self._open = True

    async def close(self) -> None:
        """Mark the store closed; the data stays, for a test that reopens it."""
        self._open = False

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` when closed, unavailable, or writes do not commit (the
        probe write of the real backends is the ``failing_commits`` switch here)."""
        self._check()
        if self.failing_commits:
            raise StoreUnavailable("The memory store's writes are marked failing.")

    def _check(self, *, write: bool = False) -> None:
        if self.unavailable:
            raise StoreUnavailable("The memory store is marked unavailable.")
        if not self._open:
            raise StoreUnavailable("The memory store is not open.")
        if write and self.failing_commits:
            raise StoreUnavailable("The memory store's writes are marked failing.")

    # -- inbox -----------------------------------------------------------------------------

    async def accept(
        self,
        event: Event,
        handlers: Sequence[str],
        *,
        now: datetime,
        trace_context: str | None = None,
    ) -> bool:
        """Record a new event and one due delivery per handler; ``False`` for a duplicate id.

        The event is recorded as ``superseded`` (and the task state left alone)
        when it is older than the event the task state came from (ordered by
        ``created``, or by the received time when it has none).
        """
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            if event.id in self._events:
                return False
            superseded = False
            task_id = event.task_id
            if task_id is not None:
                order = _order(event, now)
                if task_id in self._tasks and order < self._task_order[task_id]:
                    superseded = True
                else:
                    self._task_order[task_id] = order
                    self._tasks[task_id] = TaskRecord(
                        task_id=task_id,
                        status=event.task_status,
                        event_id=event.id,
                        event_type=event.type,
                        event_created=event.created,
                        updated_at=now,
                    )
            self._last_arrival = next(self._arrivals)
            self._arrival[event.id] = self._last_arrival
            self._events[event.id] = EventRecord(
                id=event.id,
                type=event.type,
                created=event.created,
                received_at=now,
                task_id=task_id,
                superseded=superseded,
                raw=event.raw,
            )
            if trace_context is not None:
                self._trace_contexts[event.id] = trace_context
            for name in dict.fromkeys(handlers):
                self._new_delivery(event.id, name, now)
            if handlers:
                self._nudge.set()
            self.stream_signal.notify()
            return True

    def _new_delivery(self, event_id: str, handler: str, now: datetime) -> _DeliveryRow:
        row = _DeliveryRow(
            id=next(self._ids),
            event_id=event_id,
            handler=handler,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        self._deliveries[row.id] = row
        return row

    # -- outbox ----------------------------------------------------------------------------

    async def claim(
        self,
        *,
        handler: str,
        limit: int,
        lease: timedelta,
        now: datetime,
        after: Sequence[str] = (),
    ) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries of ``handler``, oldest due first (then by id),
        skipping those held by a pending delivery of an ``after`` handler of their event."""
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            if limit <= 0:
                return []
            held = {
                r.event_id
                for r in self._deliveries.values()
                if r.handler in after and r.status is DeliveryStatus.PENDING
            }
            due = sorted(
                (
                    r
                    for r in self._deliveries.values()
                    if r.handler == handler and r.due(now) and r.event_id not in held
                ),
                key=lambda r: (r.next_attempt_at, r.id),
            )[:limit]
            claimed = []
            for row in due:
                row.attempts += 1
                row.lease_token += 1
                row.lease_until = now + lease
                row.updated_at = now
                claimed.append(self._snapshot(row))
            return claimed

    def _snapshot(self, row: _DeliveryRow) -> Delivery:
        return Delivery(
            id=row.id,
            event=self._events[row.event_id].to_event(),
            handler=row.handler,
            status=row.status,
            attempts=row.attempts,
            lease_token=row.lease_token,
            next_attempt_at=row.next_attempt_at,
            created_at=row.created_at,
            trace_context=self._trace_contexts.get(row.event_id),
        )

    def _end_revoked(self, delivery: Delivery) -> None:
        """The claim's attempt ended unrecorded: a reset right after the claim (token moved
        on by one, fresh budget) kept its lease; end it, the delivery is due at once."""
        row = self._deliveries.get(delivery.id)
        if (
            row is not None
            and row.lease_token == delivery.lease_token + 1
            and row.attempts == 0
            and row.status is DeliveryStatus.PENDING
            and row.lease_until is not None
        ):
            row.lease_until = None
            self._nudge.set()

    def _held(self, delivery: Delivery) -> _DeliveryRow | None:
        """The row, if this claim still holds it: same token, still pending and leased.

        A released row has no lease, so a late outcome from a cancelled
        attempt is refused even though no one has claimed it since.
        """
        row = self._deliveries.get(delivery.id)
        if (
            row is None
            or row.lease_token != delivery.lease_token
            or row.status is not DeliveryStatus.PENDING
            or row.lease_until is None
        ):
            return None
        return row

    def _finish(
        self, row: _DeliveryRow, attempt: Attempt, status: DeliveryStatus, at: datetime
    ) -> None:
        error = attempt_error(attempt)
        row.history.append(
            AttemptRecord(
                delivery_id=row.id,
                attempt=row.attempts,
                started_at=attempt.started_at,
                finished_at=attempt.finished_at,
                outcome=attempt.outcome,
                error=error,
            )
        )
        row.status = status
        row.next_attempt_at = at
        row.lease_until = None
        row.last_error = error
        row.result = attempt.result if status is DeliveryStatus.DONE else None
        row.updated_at = attempt.finished_at

    async def complete(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        async with self._lock:
            self._check(write=True)
            row = self._held(delivery)
            if row is None:
                self._end_revoked(delivery)
                return Recorded(False)
            self._finish(row, attempt, DeliveryStatus.DONE, row.next_attempt_at)
            return self._tally(row.handler, tally, attempt.finished_at)

    async def retry(
        self,
        delivery: Delivery,
        attempt: Attempt,
        *,
        at: datetime,
        refund: bool = False,
        tally: Tally | None = None,
    ) -> Recorded:
        at = as_utc(at)
        async with self._lock:
            self._check(write=True)
            row = self._held(delivery)
            if row is None:
                self._end_revoked(delivery)
                return Recorded(False)
            self._finish(row, attempt, DeliveryStatus.PENDING, at)
            if refund:
                row.attempts = max(row.attempts - 1, 0)
            return self._tally(row.handler, tally, attempt.finished_at)

    async def dead(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        async with self._lock:
            self._check(write=True)
            row = self._held(delivery)
            if row is None:
                self._end_revoked(delivery)
                return Recorded(False)
            self._finish(row, attempt, DeliveryStatus.DEAD, row.next_attempt_at)
            return self._tally(row.handler, tally, attempt.finished_at)

    def _tally(self, handler: str, tally: Tally | None, now: datetime) -> Recorded:
        """Apply a recorded outcome's ``tally`` to ``handler``'s row (under the lock that
        recorded it: one step); whether this paused the handler."""
        old = self._handler_states.get(handler)
        paused = old is not None and old.paused
        failures = 0 if old is None else old.consecutive_failures
        if (
            tally is None
            or (tally.kind == "success" and not failures)
            or (tally.kind == "pause" and paused)
        ):
            return Recorded(True)  # nothing to write, as the SQL stores write nothing
        pause = False
        if tally.kind == "success":
            failures = 0
        elif tally.kind == "failure":
            failures += 1
            pause = not paused and tally.pause_after is not None and failures >= tally.pause_after
        else:
            pause = True
        self._handler_states[handler] = HandlerState(
            handler,
            paused or pause,
            tally.reason if pause else (None if old is None else old.reason),
            failures,
            now,
        )
        return Recorded(True, paused=pause)

    async def release(self, delivery: Delivery, *, now: datetime | None = None) -> bool:
        """Drop the lease, move the token on and undo the claim's attempt; ``next_attempt_at``
        (already due) stays; ``updated_at`` becomes ``now`` when given."""
        now = None if now is None else as_utc(now)
        async with self._lock:
            self._check(write=True)
            row = self._held(delivery)
            if row is None:
                self._end_revoked(delivery)
                return False
            row.lease_until = None
            row.lease_token += 1
            row.attempts = max(0, row.attempts - 1)
            if now is not None:
                row.updated_at = now
            self._nudge.set()
            return True

    async def clock_offset(self) -> timedelta | None:
        """``None``: the caller's clock is this store's (``Store.clock_offset``)."""
        self._check()
        return None

    async def clock_stepped_back(
        self, *, by: timedelta, now: datetime, written_since: datetime | None = None
    ) -> int:
        """Pending deliveries due after ``now`` (and written after ``written_since``) brought
        forward by ``by``, never before ``now``; how many (``Store.clock_stepped_back``)."""
        now = as_utc(now)
        since = None if written_since is None else as_utc(written_since)
        moved = 0
        async with self._lock:
            self._check(write=True)
            for row in self._deliveries.values():
                if (
                    row.status is DeliveryStatus.PENDING
                    and row.next_attempt_at > now
                    and (since is None or row.updated_at > since)
                ):
                    row.next_attempt_at = max(row.next_attempt_at - by, now)
                    moved += 1
            if moved:
                self._nudge.set()
        return moved

    async def wait_for_work(self, timeout_seconds: float) -> None:
        """Return at once if work was nudged since the last call, else on a nudge or timeout."""
        self._check()
        try:
            async with asyncio.timeout(timeout_seconds):
                await self._nudge.wait()
        except TimeoutError:
            return
        self._nudge.clear()

    async def stats(
        self, *, now: datetime, after: Mapping[str, Sequence[str]] | None = None
    ) -> QueueStats:
        now = as_utc(now)
        async with self._lock:
            self._check()
            rows = list(self._deliveries.values())
        by_handler: dict[str, list[_DeliveryRow]] = {}
        for row in rows:
            if row.status is not DeliveryStatus.DONE:
                by_handler.setdefault(row.handler, []).append(row)
        pending = {(r.event_id, r.handler) for r in rows if r.status is DeliveryStatus.PENDING}
        prerequisites = after or {}

        def held(row: _DeliveryRow) -> bool:
            return any((row.event_id, p) in pending for p in prerequisites.get(row.handler, ()))

        return QueueStats.combine(
            {handler: _queue_stats(mine, now, held) for handler, mine in sorted(by_handler.items())}
        )

    async def prune(self, *, received_before: datetime, keep: timedelta | None = None) -> int:
        """Delete old events whose deliveries are all finished; task states are kept.
        ``keep`` is not read (one clock)."""
        received_before = as_utc(received_before)
        async with self._lock:
            self._check(write=True)
            by_event: dict[str, list[_DeliveryRow]] = {}
            for row in self._deliveries.values():
                by_event.setdefault(row.event_id, []).append(row)
            doomed = [
                event_id
                for event_id, record in self._events.items()
                if record.received_at < received_before
                and all(r.status is not DeliveryStatus.PENDING for r in by_event.get(event_id, []))
            ]
            for event_id in doomed:
                del self._events[event_id]
                self._trace_contexts.pop(event_id, None)
                self._arrival.pop(event_id, None)
                for row in by_event.get(event_id, []):
                    del self._deliveries[row.id]
            return len(doomed)

    # -- admin -----------------------------------------------------------------------------

    async def list_events(
        self, *, limit: int = 50, event_type: str | None = None
    ) -> list[EventRecord]:
        """Newest first (by ``received_at``, then by arrival)."""
        async with self._lock:
            self._check()
            ordered = list(enumerate(self._events.values()))
        ordered.sort(key=lambda pair: (pair[1].received_at, pair[0]), reverse=True)
        records = [r for _, r in ordered if event_type is None or r.type == event_type]
        return records[: max(0, limit)]

    async def get_event(self, event_id: str) -> EventRecord | None:
        async with self._lock:
            self._check()
            return self._events.get(event_id)

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
        """The reference search (``store/search.py`` rules); the cursor is the arrival index
        of the last event returned, or of the oldest event a budgeted scan reached. With a
        ``budget`` it scans in windows as the SQL stores do (``ScanBudget``): windows of the
        events ``type``, ``since`` and ``until`` keep, so the same budget cuts the same
        pages here and there. The page is cut to ``max_bytes`` of bodies
        (``search.fitting``) or given without them as the SQL stores do."""
        found, next_cursor, complete, reached = await self._search(where, cursor, limit, budget)
        if bodies:
            kept = fitting([record.size for _, record in found], max_bytes)
            if kept < len(found):
                found = found[:kept]
                next_cursor, complete, reached = encode_cursor(found[-1][0]), True, None
        return EventPage(
            [record if bodies else record.without_body() for _, record in found],
            next_cursor,
            complete=complete,
            searched_to=reached,
        )

    async def _search(
        self, where: EventFilter, cursor: str | None, limit: int, budget: ScanBudget | None
    ) -> tuple[list[tuple[int, EventRecord]], str | None, bool, datetime | None]:
        """``search_events``' page before its byte budget: (arrival, record) pairs, the next
        cursor, whether complete, and the ``received_at`` a budgeted scan reached."""
        before = None if cursor is None else decode_cursor(cursor, 1)[0]
        if before is not None and not isinstance(before, int):
            raise ValueError("not a cursor this service made")
        now = datetime.now(UTC)
        started = time.monotonic()
        async with self._lock:
            self._check()
            events = [(self._arrival[r.id], r) for r in self._events.values()]
            by_event: dict[str, list[_DeliveryRow]] = {}
            for row in self._deliveries.values():
                by_event.setdefault(row.event_id, []).append(row)
        events.sort(key=lambda pair: (pair[1].received_at, pair[0]), reverse=True)
        cut = (
            None
            if before is None
            else next((i for i, (a, _) in enumerate(events) if a == before), None)
        )
        if before is not None and cut is None:
            raise ValueError("the cursor's event is no longer stored")
        left = events[0 if cut is None else cut + 1 :]
        windows = budget is not None and limit > 0 and budget.windowed(where)
        if budget is None or not windows:
            found = self._scan(left, where, by_event, now, limit)
            more = len(found) > limit
            page = found[: max(0, limit)]
            next_cursor = encode_cursor(page[-1][0]) if more and page else None
            return page, next_cursor, True, None
        # The windows count the events the SQL stores' index walk counts.
        indexed = EventFilter(type=where.type, since=where.since, until=where.until)
        candidates = [pair for pair in left if self._selected(pair[1], [], indexed, now)]
        found = []
        window, scanned = max(1, budget.first_window), 0
        while True:
            part = candidates[scanned : scanned + window]
            found += self._scan(part, where, by_event, now, limit - len(found))
            scanned += len(part)
            if len(found) > limit:
                page = found[:limit]
                return page, encode_cursor(page[-1][0]), True, None
            if scanned >= len(candidates):
                return found, None, True, None
            elapsed = time.monotonic() - started
            if budget.spent(elapsed):
                reached = candidates[scanned - 1]
                return found, encode_cursor(reached[0]), False, reached[1].received_at
            window = budget.next_window(window, scanned, elapsed)

    def _scan(
        self,
        events: list[tuple[int, EventRecord]],
        where: EventFilter,
        by_event: dict[str, list[_DeliveryRow]],
        now: datetime,
        limit: int,
    ) -> list[tuple[int, EventRecord]]:
        """The first ``limit + 1`` of ``events`` that ``where`` selects."""
        found: list[tuple[int, EventRecord]] = []
        for arrival, record in events:
            if self._selected(record, by_event.get(record.id, []), where, now):
                found.append((arrival, record))
                if len(found) > limit:
                    break
        return found

    @staticmethod
    def _selected(
        record: EventRecord, rows: list[_DeliveryRow], where: EventFilter, now: datetime
    ) -> bool:
        if where.type is not None and record.type != where.type:
            return False
        if where.task_id is not None and record.task_id != where.task_id:
            return False
        if where.since is not None and record.received_at < where.since:
            return False
        if where.until is not None and record.received_at >= where.until:
            return False
        if (where.handler is not None or where.status is not None) and not any(
            (where.handler is None or row.handler == where.handler)
            and (
                where.status is None
                or where.status
                in delivery_state(row.status, row.next_attempt_at, row.lease_until, now)
            )
            for row in rows
        ):
            return False
        if where.q is not None and where.q not in record.raw.decode("utf-8", "replace"):
            return False
        # A body the JSON parser cannot read matches no field.
        return all(body_matches(record.raw, path, wanted) for path, wanted in where.match)

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
        async with self._lock:
            self._check()
            rows = sorted(self._deliveries.values(), key=lambda r: r.id, reverse=True)
            return [
                self._record(r)
                for r in rows
                if (status is None or r.status is status)
                and (handler is None or r.handler == handler)
                and (event_id is None or r.event_id == event_id)
                and (before is None or r.id < before)
            ][: max(0, limit)]

    def _record(self, row: _DeliveryRow) -> DeliveryRecord:
        return DeliveryRecord(
            id=row.id,
            event_id=row.event_id,
            event_type=self._events[row.event_id].type,
            handler=row.handler,
            status=row.status,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            lease_until=row.lease_until,
            last_error=row.last_error,
            created_at=row.created_at,
            result=copy.deepcopy(row.result),
            updated_at=row.updated_at,
        )

    async def list_attempts(self, delivery_id: int) -> list[AttemptRecord]:
        async with self._lock:
            self._check()
            row = self._deliveries.get(delivery_id)
            return list(row.history) if row is not None else []

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with self._lock:
            self._check()
            return self._tasks.get(task_id)

    async def stream_after(
        self, cursor: str | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[str, EventRecord]]:
        """The arrival order; the cursor holds the last arrival handed out."""
        after = 0 if cursor is None else read_cursor(cursor, "m", 1)[0]
        async with self._lock:
            self._check()
            found = sorted(
                (arrival, self._events[event_id])
                for event_id, arrival in self._arrival.items()
                if arrival > after
            )
        taken: list[tuple[str, EventRecord]] = []
        total = 0
        for arrival, record in found[: max(0, limit)]:
            total += len(record.raw)
            if taken and max_bytes is not None and total > max_bytes:
                break
            taken.append((make_cursor("m", arrival), record))
        return taken

    async def stream_head(self) -> str:
        async with self._lock:
            self._check()
            return make_cursor("m", self._last_arrival)

    def _reset(self, row: _DeliveryRow, now: datetime) -> None:
        """Pending, due now, fresh attempt budget; a live claim is revoked (token moved on)
        so an attempt still running cannot record over the reset. Its live lease is kept:
        nobody may run the delivery beside that attempt; it ends with it (``_end_revoked``)
        or expires."""
        row.lease_token += 1
        if row.lease_until is not None and row.lease_until <= now:
            row.lease_until = None
        row.status = DeliveryStatus.PENDING
        row.attempts = 0
        row.next_attempt_at = now
        row.last_error = None
        row.updated_at = now

    async def replay(self, event_id: str, handlers: Sequence[str] | None, *, now: datetime) -> int:
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            if event_id not in self._events:
                raise EventNotFound(f"No event {event_id!r} in the store.")
            existing = {r.handler: r for r in self._deliveries.values() if r.event_id == event_id}
            names = list(existing) if handlers is None else list(dict.fromkeys(handlers))
            for name in names:
                row = existing.get(name)
                if row is None:
                    self._new_delivery(event_id, name, now)
                else:
                    self._reset(row, now)
            if names:
                self._nudge.set()
            return len(names)

    async def replay_many(
        self,
        event_ids: Sequence[str],
        handlers: Sequence[str] | None,
        *,
        now: datetime,
        create: bool = True,
        reset: bool = True,
    ) -> ReplayCounts:
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            wanted = {i for i in event_ids if i in self._events}
            existing: dict[str, dict[str, _DeliveryRow]] = {}
            for row in self._deliveries.values():
                if row.event_id in wanted:
                    existing.setdefault(row.event_id, {})[row.handler] = row
            names = None if handlers is None else list(dict.fromkeys(handlers))
            created = reset_count = 0
            for event_id in dict.fromkeys(i for i in event_ids if i in wanted):
                rows = existing.get(event_id, {})
                for name in list(rows) if names is None else names:
                    found = rows.get(name)
                    if found is None:
                        if create and names is not None:
                            self._new_delivery(event_id, name, now)
                            created += 1
                    elif reset:
                        self._reset(found, now)
                        reset_count += 1
            if created or reset_count:
                self._nudge.set()
            return ReplayCounts(created=created, reset=reset_count)

    async def retry_dead(self, *, handler: str | None, now: datetime) -> int:
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            rows = [
                r
                for r in self._deliveries.values()
                if r.status is DeliveryStatus.DEAD and (handler is None or r.handler == handler)
            ]
            for row in rows:
                self._reset(row, now)
            if rows:
                self._nudge.set()
            return len(rows)

    # -- flow control ----------------------------------------------------------------------

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str | None, now: datetime
    ) -> bool:
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            state = self._handler_states.get(handler)
            if (state is not None and state.paused) == paused:
                return False
            failures = state.consecutive_failures if state is not None and paused else 0
            self._handler_states[handler] = HandlerState(
                handler, paused, reason if paused else None, failures, now
            )
            if not paused:
                self._nudge.set()
            return True

    async def paused_handlers(self) -> dict[str, HandlerState]:
        async with self._lock:
            self._check()
            return {n: s for n, s in self._handler_states.items() if s.paused}

    async def handler_states(self) -> list[HandlerState]:
        async with self._lock:
            self._check()
            return [self._handler_states[n] for n in sorted(self._handler_states)]

    async def handler_activity(self, *, now: datetime, since: datetime) -> list[HandlerActivity]:
        now = as_utc(now)
        since = as_utc(since)
        async with self._lock:
            self._check()
            rows = list(self._deliveries.values())
        found: dict[str, dict[str, Any]] = {}
        durations: dict[str, list[float]] = {}
        for row in rows:
            if row.status is not DeliveryStatus.DONE:
                counts = found.setdefault(row.handler, {})
                for state in delivery_state(row.status, row.next_attempt_at, row.lease_until, now):
                    if state != "pending":
                        counts[state] = counts.get(state, 0) + 1
            for attempt in row.history:
                if attempt.finished_at < since:
                    continue
                counts = found.setdefault(row.handler, {})
                counts["attempts"] = counts.get("attempts", 0) + 1
                ok = attempt.outcome is AttemptOutcome.OK
                counts["succeeded"] = counts.get("succeeded", 0) + ok
                durations.setdefault(row.handler, []).append(attempt.duration_seconds)
                if attempt.error is not None and (
                    counts.get("last_error_at") is None
                    or attempt.finished_at >= counts["last_error_at"]
                ):
                    counts["last_error"] = attempt.error
                    counts["last_error_at"] = attempt.finished_at
        result = []
        for name in sorted(found):
            counts = {k: v for k, v in found[name].items() if k in _ACTIVITY_FIELDS}
            ordered = sorted(durations.get(name, []))
            if ordered:
                counts["p50_seconds"] = nearest_rank(ordered, 50)
                counts["p95_seconds"] = nearest_rank(ordered, 95)
            result.append(HandlerActivity(handler=name, **counts))
        return result

    async def take_tokens(
        self, handler: str, *, want: int, capacity: float, per_second: float, now: datetime
    ) -> int:
        now = as_utc(now)
        async with self._lock:
            self._check(write=True)
            tokens, updated = self._buckets.get(handler, (capacity, now))
            elapsed = max(0.0, (now - updated).total_seconds())
            tokens = min(capacity, tokens + per_second * elapsed)
            taken = max(0, min(want, math.floor(tokens)))
            self._buckets[handler] = (tokens - taken, now)  # also when the clock went back
            return taken

    async def give_back_tokens(self, handler: str, count: int, *, capacity: float) -> None:
        async with self._lock:
            self._check(write=True)
            if handler in self._buckets:
                tokens, updated = self._buckets[handler]
                self._buckets[handler] = (min(capacity, tokens + count), updated)


def _conforms(store: MemoryStore) -> Store:
    """Never called: makes mypy prove that ``MemoryStore`` satisfies the ``Store`` protocol."""
    return store


__all__ = ["MemoryStore"]


def _queue_stats(
    rows: list[_DeliveryRow], now: datetime, held: Callable[[_DeliveryRow], bool]
) -> QueueStats:
    """``stats`` of one handler's pending and dead deliveries (``held``: by AFTER)."""
    pending = [r for r in rows if r.status is DeliveryStatus.PENDING]
    due = [r for r in pending if r.due(now) and not held(r)]
    running = [r for r in pending if r.lease_until is not None and r.lease_until > now]
    oldest = min((r.next_attempt_at for r in due), default=now)
    return QueueStats(
        pending=len(pending),
        due=len(due),
        running=len(running),
        dead=sum(r.status is DeliveryStatus.DEAD for r in rows),
        oldest_due_age_seconds=max(0.0, (now - oldest).total_seconds()),
    )
