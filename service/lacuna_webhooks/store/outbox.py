"""The rules of the outbox, written once for every SQL backend (sans-IO).

Each store operation is a *flow*: a module-level generator function of plain values that

- yields a ``Query`` (a named query of ``store/sql/<dialect>/queries.sql``, its parameters
  by name, and the ``shape`` of result it wants) and receives that result;
- yields ``NUDGE`` when the operation made work due (the dispatcher should look now);
- returns the operation's result.

A driver runs a flow on one connection in one transaction: ``sqlite/driver.py`` (sync, on
the SQLite writer thread or writer process, which receive the flow function and its
arguments pickled; the generator object never travels) and ``PostgresStore._run`` (async,
asyncpg). The driver converts values to its dialect: aware ``datetime`` to epoch seconds
for SQLite (``timedelta`` to seconds, lists to JSON text for ``json_each``); PostgreSQL
takes them as they are (lists as arrays). It maps rows with the query's ``row`` function
(``rows.py``) and its own time converter. It answers ``NUDGE`` with its dialect's nudge:
SQLite sets the store's work flag, PostgreSQL NOTIFYs in the transaction and wakes its
own dispatcher after the commit.

A parameters dict may carry keys that one dialect's query does not use (``claim`` passes
both ``until`` for SQLite, whose leases follow the caller's clock, and ``lease`` for
PostgreSQL, whose leases follow the database's clock).

What stays per backend: connections and transactions, migrations, SQLite's group-committed
accept batch (its trigger applies ``accept``'s rules row by row), the admin search
(``searchsql.py``) and the live stream's cursors. ``memory.py`` is the reference the
contract suite (``tests/integration/test_store_contract.py``) holds these flows to.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal, NamedTuple, TypeVar

from ..errors import EventNotFound
from ..models import Attempt, AttemptOutcome, Delivery, DeliveryStatus
from . import rows
from .base import (
    AttemptRecord,
    DeliveryRecord,
    EventRecord,
    HandlerActivity,
    HandlerState,
    QueueStats,
    Recorded,
    Tally,
    TaskRecord,
    attempt_error,
)

T = TypeVar("T")

#: What a driver hands back for a query: every row, the first row (or ``None``), the first
#: column of the first row (or ``None``), or the count of rows the (last) statement changed.
Shape = Literal["rows", "row", "value", "rowcount"]


@dataclass(frozen=True, slots=True)
class Query:
    """One named query to run: ``params`` by name, the result as ``shape``; with ``row``,
    each row is mapped by ``row(row, at)`` (``at``: the driver's stored-time converter)."""

    name: str
    params: Mapping[str, Any]
    shape: Shape = "rowcount"
    row: Callable[[rows.Row, rows.ToDatetime], Any] | None = None


class Nudge:
    """The signal that the operation made deliveries due: wake the dispatcher(s)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NUDGE"


NUDGE: Final = Nudge()

#: A flow: yields queries (and nudges), receives each query's result, returns ``T``.
Flow = Generator[Query | Nudge, Any, T]

#: How many events one ``prune_chunk`` deletes at most (each chunk is a transaction).
PRUNE_CHUNK = 500
#: ``pg_try_advisory_xact_lock`` key held by the replica that is pruning (the dialects
#: with one writer answer the lock query with a constant).
PRUNE_LOCK_KEY = 0x6C61_6375_6E61_0002


# --- intake ---------------------------------------------------------------------------------


class AcceptValues(NamedTuple):
    """What ``accept`` stores of one event (``order``: ``rules.task_order``; ``handlers``
    once each)."""

    event_id: str
    event_type: str
    created: int | None
    task_id: str | None
    task_status: str | None
    raw: bytes
    trace_context: str | None
    received_at: datetime
    order: float
    handlers: tuple[str, ...]


def accept(v: AcceptValues) -> Flow[bool]:
    """Store a new event with a pending delivery per handler; ``False`` for a duplicate (the
    primary key decides, never check-then-insert). The task state only moves forward: an
    event ordered before the task's current one is stored ``superseded``. PostgreSQL runs
    this; SQLite's group-committed batch applies the same rules row by row in its trigger
    (``accept_batch_trigger``), kept apart for the intake's speed."""
    event = {
        "id": v.event_id,
        "type": v.event_type,
        "created": v.created,
        "received_at": v.received_at,
        "task_id": v.task_id,
        "raw": v.raw,
        "trace_context": v.trace_context,
    }
    if not (yield Query("accept_event", event, "value")):
        return False
    if v.task_id is not None:
        task = {
            "task_id": v.task_id,
            "status": v.task_status,
            "event_id": v.event_id,
            "event_type": v.event_type,
            "event_created": v.created,
            "event_order": v.order,
            "updated_at": v.received_at,
        }
        if not (yield Query("upsert_task", task, "value")):
            yield Query("mark_superseded", {"id": v.event_id})
    if v.handlers:
        params = {"event_id": v.event_id, "handlers": list(v.handlers), "now": v.received_at}
        yield Query("insert_deliveries", params)
        yield NUDGE
    return True


# --- the dispatcher's side ------------------------------------------------------------------


def claim(
    handler: str, limit: int, lease: timedelta, now: datetime, after: Sequence[str]
) -> Flow[list[Delivery]]:
    """Lease up to ``limit`` due deliveries of ``handler``, oldest due first; ``after`` holds
    back those whose event has a pending delivery of one of those handlers."""
    params = {
        "handler": handler,
        "limit": limit,
        "now": now,
        "until": now + lease,
        "lease": lease,
        "after": list(after),
    }
    claimed: list[Delivery] = yield Query("claim", params, "rows", rows.claimed_delivery)
    claimed.sort(key=lambda d: (d.next_attempt_at, d.id))  # RETURNING promises no order
    return claimed


def finish_params(
    status: DeliveryStatus,
    delivery: Delivery,
    attempt: Attempt,
    *,
    next_attempt_at: datetime | None = None,
    refund: bool = False,
) -> dict[str, Any]:
    """The values of ``finish`` (built on the caller's side: one plain dict to send).
    ``handler`` is for the tally's queries; ``finish`` itself does not use it."""
    return {
        "id": delivery.id,
        "lease_token": delivery.lease_token,
        "handler": delivery.handler,
        "status": status.value,
        "next_attempt_at": next_attempt_at,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "outcome": AttemptOutcome(attempt.outcome).value,
        "error": attempt_error(attempt),
        "result": rows.result_text(attempt) if status is DeliveryStatus.DONE else None,
        "refund": 1 if refund else 0,
    }


def finish_call(
    params: Mapping[str, Any], tally: Tally | None
) -> tuple[Callable[..., Flow[Recorded]], tuple[Any, ...]]:
    """The flow (and its arguments) that records an outcome (``finish_params``) with
    ``tally``, for a store's ``run(flow, *args)``: ``finish`` when that is one statement (no
    tally, or a success), else ``finish_counted``."""
    if tally is None or tally.kind == "success":
        return finish, (params, tally is not None)
    return finish_counted, (params, tally)


def finish(params: Mapping[str, Any], reset_failures: bool = False) -> Flow[Recorded]:
    """Record an outcome and its attempt (``finish_params``) if the claim is still the live
    one; ``Recorded(False)`` when it is stale (taken over, released or reset). With
    ``reset_failures`` (a success, ``Tally.success``) the same statement ends the handler's
    run of failures, writing its row only when the count is not 0 (``finish_success``)."""
    query = "finish_success" if reset_failures else "finish"
    if (yield Query(query, params)) == 1:
        return Recorded(True)
    yield from _end_revoked(params["id"], params["lease_token"])
    return Recorded(False)


def finish_counted(params: Mapping[str, Any], tally: Tally) -> Flow[Recorded]:
    """``finish``, then, in the same transaction and only if the outcome was recorded,
    ``tally`` (a failure or a pause; ``Tally``) on the handler's row at the attempt's
    ``finished_at``: a failure is counted (the upsert's row lock orders replicas) and
    pauses the handler when the count reaches ``pause_after``. ``paused``: this call
    paused it."""
    recorded = yield from finish(params)
    if not recorded:
        return recorded
    handler, now = params["handler"], params["finished_at"]
    if tally.kind == "failure":
        row = yield Query("count_failure", {"handler": handler, "now": now}, "row")
        limit = tally.pause_after
        if row["paused"] or limit is None or row["consecutive_failures"] < limit:
            return Recorded(True)
    elif tally.kind != "pause":
        raise ValueError(f"finish_counted takes a failure or a pause, not {tally.kind!r}")
    return Recorded(True, (yield from set_paused(handler, True, tally.reason, now)))


def release(delivery_id: int, lease_token: int, now: datetime | None) -> Flow[bool]:
    """Give a live claim back: lease cleared, token moved on, its attempt undone, due at once
    (``next_attempt_at`` kept, so it keeps its place in line)."""
    params = {"id": delivery_id, "lease_token": lease_token, "now": now}
    if (yield Query("release", params)) == 1:
        yield NUDGE
        return True
    return (yield from _end_revoked(delivery_id, lease_token))


def _end_revoked(delivery_id: int, lease_token: int) -> Flow[bool]:
    """The claim's attempt has ended unrecorded. If a reset (replay) revoked it, the reset
    kept its lease so nobody ran the delivery beside it: end that lease now, due at once."""
    params = {"id": delivery_id, "lease_token": lease_token}
    if (yield Query("end_revoked", params)) == 1:
        yield NUDGE
    return False


def set_paused(handler: str, paused: bool, reason: str | None, now: datetime) -> Flow[bool]:
    """Pause or resume; ``True`` when the state changed. A resume nudges (the backlog is
    due at once)."""
    if paused:
        params = {"handler": handler, "reason": reason, "now": now}
        return (yield Query("pause", params, "value")) is not None
    changed = (yield Query("resume", {"handler": handler, "now": now}, "value")) is not None
    if changed:
        yield NUDGE
    return changed


def take_tokens(
    handler: str, want: int, capacity: float, per_second: float, now: datetime
) -> Flow[int]:
    """Refill the bucket (up to ``capacity``, ``per_second``; PostgreSQL by the database's
    clock), then take up to ``want`` whole tokens."""
    params = {"handler": handler, "capacity": capacity, "rate": per_second, "now": now}
    tokens = yield Query("refill_tokens", params, "value")
    taken = max(0, min(want, math.floor(float(tokens))))
    if taken:
        yield Query("spend_tokens", {"handler": handler, "capacity": capacity, "count": taken})
    return taken


def give_back_tokens(handler: str, count: int, capacity: float) -> Flow[None]:
    params = {"handler": handler, "capacity": capacity, "count": -count}
    yield Query("spend_tokens", params)


# --- resets ---------------------------------------------------------------------------------


def replay(event_id: str, handlers: Sequence[str] | None, now: datetime) -> Flow[int]:
    """Reset the event's deliveries (``None``: all it has; else those of ``handlers``,
    created when missing): pending, due ``now``, a fresh budget, no error, a live claim
    revoked. ``EventNotFound`` when no such event; the count reset or created."""
    if (yield Query("lock_event", {"event_id": event_id}, "value")) is None:
        raise EventNotFound(f"No event {event_id!r} in the store.")
    if handlers is None:
        count: int = yield Query("replay_all", {"event_id": event_id, "now": now})
    else:
        params = {"event_id": event_id, "handlers": list(dict.fromkeys(handlers)), "now": now}
        count = yield Query("replay_handlers", params)
    if count:
        yield NUDGE
    return count


def replay_many(
    event_ids: Sequence[str],
    handlers: Sequence[str] | None,
    create: bool,
    reset: bool,
    now: datetime,
) -> Flow[tuple[int, int]]:
    """``replay`` of a batch: ``(created, reset)``. Reset first, so the deliveries created
    next are not counted twice; ids no longer stored are skipped."""
    found = yield Query("lock_events", {"ids": list(dict.fromkeys(event_ids))}, "rows")
    ids = [row["id"] for row in found]
    created = reset_count = 0
    if ids and handlers is None:
        if reset:
            reset_count = yield Query("replay_many_all", {"ids": ids, "now": now})
    elif ids and handlers:
        params = {"ids": ids, "handlers": list(dict.fromkeys(handlers)), "now": now}
        if reset:
            reset_count = yield Query("replay_many_reset", params)
        if create:
            created = yield Query("replay_many_create", params)
    if created or reset_count:
        yield NUDGE
    return created, reset_count


def retry_dead(handler: str | None, now: datetime) -> Flow[int]:
    """Reset every dead delivery (of ``handler``); how many."""
    yield Query("lock_dead_events", {"handler": handler})
    count: int = yield Query("retry_dead", {"handler": handler, "now": now})
    if count:
        yield NUDGE
    return count


def prune_chunk(cutoff: datetime, keep: timedelta | None, limit: int) -> Flow[tuple[int, int]]:
    """Delete up to ``limit`` events received before ``cutoff`` (on PostgreSQL also more
    than ``keep`` ago by the database's clock, when given) with no pending delivery
    (their deliveries and attempts too): ``(found, deleted)``, the candidates it found
    (fewer than ``limit``: the last chunk) and the events it deleted (PostgreSQL's delete
    re-checks each candidate, so it may be fewer). ``(0, 0)`` at once when another replica
    holds the prune lock."""
    if not (yield Query("prune_lock", {"key": PRUNE_LOCK_KEY}, "value")):
        return 0, 0
    found = yield Query(
        "prune_candidates", {"cutoff": cutoff, "keep": keep, "limit": limit}, "rows"
    )
    deleted = 0
    if found:
        deleted = yield Query("prune_delete", {"ids": [row["id"] for row in found]})
    return len(found), deleted


async def prune(
    run: Callable[
        [Callable[..., Flow[tuple[int, int]]], datetime, timedelta | None, int],
        Awaitable[tuple[int, int]],
    ],
    received_before: datetime,
    keep: timedelta | None = None,
) -> int:
    """``Store.prune`` on a driver: ``prune_chunk`` after ``prune_chunk``, each its own
    transaction through ``run`` (the backend's ``run(flow, *args)``), so accepts are never
    held up long, until a chunk finds fewer than ``PRUNE_CHUNK``; the events deleted."""
    total = 0
    while True:
        found, deleted = await run(prune_chunk, received_before, keep, PRUNE_CHUNK)
        total += deleted
        if found < PRUNE_CHUNK:
            return total


# --- reads ----------------------------------------------------------------------------------


def held_by(after: Mapping[str, Sequence[str]] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``LACUNA_<NAME>_AFTER`` as two parallel lists, (handler, prerequisite) pairs: what the
    ``stats`` queries take (plain values for the writer process)."""
    pairs = [(h, p) for h, prerequisites in (after or {}).items() for p in prerequisites]
    return tuple(h for h, _ in pairs), tuple(p for _, p in pairs)


def stats(now: datetime, held: tuple[Sequence[str], Sequence[str]]) -> Flow[QueueStats]:
    """The outbox per handler (a handler's rows may come in parts: summed). ``held``
    (``held_by``): a due delivery of a handler waiting for a prerequisite's pending delivery
    of the same event is not due."""
    params = {"now": now, "held_handler": list(held[0]), "held_by": list(held[1])}
    found: list[rows.QueueRow] = yield Query("stats", params, "rows", rows.queue_row)
    by_handler: dict[str, QueueStats] = {}
    for part in found:
        age = 0.0 if part.oldest_due is None else max(0.0, (now - part.oldest_due).total_seconds())
        figures = QueueStats(part.pending, part.due, part.running, part.dead, age)
        seen = by_handler.get(part.handler)
        if seen is not None:
            figures = replace(
                seen,
                pending=seen.pending + figures.pending,
                due=seen.due + figures.due,
                running=seen.running + figures.running,
                dead=seen.dead + figures.dead,
                oldest_due_age_seconds=max(seen.oldest_due_age_seconds, age),
            )
        by_handler[part.handler] = figures
    return QueueStats.combine(dict(sorted(by_handler.items())))


def handler_activity(now: datetime, since: datetime) -> Flow[list[HandlerActivity]]:
    """Every handler's queue now and its attempts since ``since``."""
    found: dict[str, dict[str, Any]] = {}
    for row in (yield Query("handler_queue", {"now": now}, "rows")):
        counts = found.setdefault(row["handler"], {})
        for name in ("running", "due", "waiting", "dead"):
            counts[name] = counts.get(name, 0) + row[name]
    for row in (yield Query("handler_attempts", {"since": since}, "rows")):
        found.setdefault(row["handler"], {}).update(
            attempts=row["attempts"],
            succeeded=row["succeeded"],
            p50_seconds=row["p50_seconds"],
            p95_seconds=row["p95_seconds"],
        )
    errors = yield Query("handler_last_errors", {"since": since}, "rows", rows.last_error)
    for handler, error, at in errors:
        found.setdefault(handler, {}).update(last_error=error, last_error_at=at)
    return [HandlerActivity(handler=name, **found[name]) for name in sorted(found)]


def list_events(event_type: str | None, limit: int) -> Flow[list[EventRecord]]:
    params = {"type": event_type, "limit": max(limit, 0)}
    found: list[EventRecord] = yield Query("list_events", params, "rows", rows.event_record)
    return found


def get_event(event_id: str) -> Flow[EventRecord | None]:
    found: EventRecord | None = yield Query("get_event", {"id": event_id}, "row", rows.event_record)
    return found


def list_deliveries(
    status: DeliveryStatus | None,
    handler: str | None,
    event_id: str | None,
    limit: int,
    before: int | None,
) -> Flow[list[DeliveryRecord]]:
    params = {
        "status": None if status is None else status.value,
        "handler": handler,
        "event_id": event_id,
        "limit": max(limit, 0),
        "before": before,
    }
    found: list[DeliveryRecord] = yield Query(
        "list_deliveries", params, "rows", rows.delivery_record
    )
    return found


def list_attempts(delivery_id: int) -> Flow[list[AttemptRecord]]:
    params = {"delivery_id": delivery_id}
    found: list[AttemptRecord] = yield Query("list_attempts", params, "rows", rows.attempt_record)
    return found


def get_task(task_id: str) -> Flow[TaskRecord | None]:
    found: TaskRecord | None = yield Query(
        "get_task", {"task_id": task_id}, "row", rows.task_record
    )
    return found


def handler_states(paused_only: bool) -> Flow[list[HandlerState]]:
    name = "paused_handlers" if paused_only else "handler_states"
    found: list[HandlerState] = yield Query(name, {}, "rows", rows.handler_state)
    return found


#: Flows whose statements are each right when committed alone (one statement, or a follow-up
#: that checks its own condition): PostgreSQL runs them without BEGIN/COMMIT, saving two
#: round trips on the dispatcher's hot path. Every other flow runs in one transaction.
AUTOCOMMIT: Final[frozenset[Callable[..., Flow[Any]]]] = frozenset(
    {
        claim,
        finish,
        release,
        give_back_tokens,
        stats,
        list_events,
        get_event,
        list_deliveries,
        list_attempts,
        get_task,
        handler_states,
    }
)

__all__ = [
    "AUTOCOMMIT",
    "NUDGE",
    "PRUNE_CHUNK",
    "PRUNE_LOCK_KEY",
    "AcceptValues",
    "Flow",
    "Nudge",
    "Query",
    "Shape",
    "accept",
    "claim",
    "finish",
    "finish_call",
    "finish_counted",
    "finish_params",
    "get_event",
    "get_task",
    "give_back_tokens",
    "handler_activity",
    "handler_states",
    "list_attempts",
    "list_deliveries",
    "list_events",
    "prune_chunk",
    "release",
    "replay",
    "replay_many",
    "retry_dead",
    "set_paused",
    "stats",
    "take_tokens",
]
