"""Rows to records, by column name, for every SQL dialect.

A row is anything indexable by column name (``sqlite3.Row``, ``asyncpg.Record``); ``at``
turns a stored time into an aware UTC ``datetime`` (SQLite stores epoch seconds,
PostgreSQL ``timestamptz``). The column names are those of the ``SHARED`` queries
(``queries.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import orjson

from ..models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from .base import AttemptRecord, DeliveryRecord, EventRecord, HandlerState, TaskRecord


class Row(Protocol):
    def __getitem__(self, column: str, /) -> Any: ...


ToDatetime = Callable[[Any], datetime]


def _event(row: Row, at: ToDatetime, raw: bytes, size: int) -> EventRecord:
    return EventRecord(
        id=row["id"],
        type=row["type"],
        created=row["created"],
        received_at=at(row["received_at"]),
        task_id=row["task_id"],
        superseded=bool(row["superseded"]),
        raw=raw,
        size=size,
    )


def event_record(row: Row, at: ToDatetime) -> EventRecord:
    """Columns: id, type, created, received_at, task_id, superseded, raw."""
    raw = bytes(row["raw"])
    return _event(row, at, raw, len(raw))


def event_head(row: Row, at: ToDatetime) -> EventRecord:
    """Columns: id, type, created, received_at, task_id, superseded, size (the body's length:
    the body itself is not read; ``raw`` is left empty, see ``EventRecord``)."""
    return _event(row, at, b"", int(row["size"]))


def event_heads(
    found: Sequence[Row], at: ToDatetime, bodies: Mapping[int, bytes] | None
) -> list[EventRecord]:
    """A search page's records (``event_head`` columns and ``seq``), each with its body from
    ``bodies`` (by ``seq``, read in the search's snapshot) unless that is ``None``."""
    if bodies is None:
        return [event_head(row, at) for row in found]
    records = []
    for row in found:
        raw = bodies[int(row["seq"])]
        records.append(_event(row, at, raw, len(raw)))
    return records


def delivery_record(row: Row, at: ToDatetime) -> DeliveryRecord:
    """Columns: id, event_id, event_type, handler, status, attempts, next_attempt_at,
    lease_until, last_error, created_at, updated_at, result (JSON text or NULL)."""
    lease_until = row["lease_until"]
    result = row["result"]
    return DeliveryRecord(
        id=row["id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        handler=row["handler"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=at(row["next_attempt_at"]),
        lease_until=None if lease_until is None else at(lease_until),
        last_error=row["last_error"],
        created_at=at(row["created_at"]),
        updated_at=at(row["updated_at"]),
        result=None if result is None else orjson.loads(result),
    )


def result_text(attempt: Attempt) -> str | None:
    """The attempt's result as the JSON text both dialects store, or None."""
    return None if attempt.result is None else orjson.dumps(attempt.result).decode()


def attempt_record(row: Row, at: ToDatetime) -> AttemptRecord:
    """Columns: delivery_id, attempt, started_at, finished_at, outcome, error."""
    return AttemptRecord(
        delivery_id=row["delivery_id"],
        attempt=row["attempt"],
        started_at=at(row["started_at"]),
        finished_at=at(row["finished_at"]),
        outcome=AttemptOutcome(row["outcome"]),
        error=row["error"],
    )


def task_record(row: Row, at: ToDatetime) -> TaskRecord:
    """Columns: task_id, status, event_id, event_type, event_created, updated_at."""
    return TaskRecord(
        task_id=row["task_id"],
        status=row["status"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        event_created=row["event_created"],
        updated_at=at(row["updated_at"]),
    )


def handler_state(row: Row, at: ToDatetime) -> HandlerState:
    """Columns: handler, paused, reason, consecutive_failures, updated_at."""
    return HandlerState(
        handler=row["handler"],
        paused=bool(row["paused"]),
        reason=row["reason"],
        consecutive_failures=row["consecutive_failures"],
        updated_at=at(row["updated_at"]),
    )


def claimed_delivery(row: Row, at: ToDatetime) -> Delivery:
    """Columns of ``claim``: id, event_id, handler, attempts, lease_token, next_attempt_at,
    created_at, raw (the event's body, parsed again here), trace_context (or NULL)."""
    return Delivery(
        id=row["id"],
        # No depth check: a body stored before MAX_JSON_DEPTH existed must still deliver.
        event=Event.from_stored(bytes(row["raw"])),
        handler=row["handler"],
        status=DeliveryStatus.PENDING,
        attempts=row["attempts"],
        lease_token=row["lease_token"],
        next_attempt_at=at(row["next_attempt_at"]),
        created_at=at(row["created_at"]),
        trace_context=row["trace_context"],
    )


class QueueRow(NamedTuple):
    """One row of ``stats``: a handler's counts (a handler may come in several rows)."""

    handler: str
    pending: int
    due: int
    running: int
    dead: int
    oldest_due: datetime | None


def queue_row(row: Row, at: ToDatetime) -> QueueRow:
    """Columns of ``stats``: handler, pending, due, running, dead, oldest_due (or NULL)."""
    oldest = row["oldest_due"]
    return QueueRow(
        row["handler"],
        row["pending"],
        row["due"],
        row["running"],
        row["dead"],
        None if oldest is None else at(oldest),
    )


def last_error(row: Row, at: ToDatetime) -> tuple[str, str, datetime]:
    """Columns of ``handler_last_errors``: handler, last_error, last_error_at."""
    return row["handler"], row["last_error"], at(row["last_error_at"])


__all__ = [
    "QueueRow",
    "attempt_record",
    "claimed_delivery",
    "delivery_record",
    "event_head",
    "event_heads",
    "event_record",
    "handler_state",
    "last_error",
    "queue_row",
    "task_record",
]
