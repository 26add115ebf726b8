"""Rules of the store that every backend applies the same way, written once.

Each backend computes these in Python and hands the result to its SQL, so no
dialect carries its own copy of a rule.
"""

from __future__ import annotations

from datetime import UTC, datetime

#: ``created`` values above this are read as Unix *milliseconds* for ordering: 10^11
#: seconds is the year 5138, while 10^11 ms is March 1973, before any event of this API.
MILLISECONDS_ABOVE = 10**11


def task_order(created: int | None, received_at: float) -> float:
    """What orders the events of one task (``data.id``), in Unix seconds.

    - ``created`` when the event has one, read as seconds (SPEC §2), except that a
      value above ``MILLISECONDS_ABOVE`` (10^11) is read as milliseconds and divided
      by 1000: some senders put milliseconds there, and read as seconds such an
      event would outrank every later event of its task forever (issue 9, item 4);
    - else ``received_at`` (epoch seconds), the time the receiver stored it.

    An event whose order is below the task's current one is stored ``superseded``
    and leaves the task state alone; ties go to the later arrival. ``created`` itself
    is stored as sent. Documented for users in ``docs/delivery.md``.
    """
    if created is None:
        return received_at
    if created > MILLISECONDS_ABOVE:
        return created / 1000.0
    return float(created)


class CommitHealth:
    """Whether the store's latest write committed: what ``ping`` (``/readyz``) reports.

    A backend calls ``committed()`` after each write that committed and ``failed(exc)``
    after one that failed for a reason of the database (full disk, read-only file or
    database, lost connection, lock held too long), never for one event's own values.
    While a failure is recorded, ``ping`` must prove a write commits (a probe write)
    before it answers; the probe's success clears the failure. So readiness turns 503
    when commits fail and back to 200 once they succeed, even with no traffic (a load
    balancer sends none to an unready replica).
    """

    __slots__ = ("failure",)

    def __init__(self) -> None:
        self.failure: str | None = None

    def committed(self) -> None:
        self.failure = None

    def failed(self, exc: BaseException) -> None:
        self.failure = str(exc) or type(exc).__name__


def nearest_rank(ordered: list[float], percent: int) -> float:
    """The nearest-rank percentile of an ascending, non-empty list: the value at rank
    ``ceil(percent * n / 100)`` (SQLite computes the same rank in integers; PostgreSQL's
    ``percentile_disc`` is this definition)."""
    rank = (len(ordered) * percent + 99) // 100
    return ordered[max(rank, 1) - 1]


__all__ = ["MILLISECONDS_ABOVE", "CommitHealth", "nearest_rank", "task_order"]


def as_utc(value: datetime) -> datetime:
    """A store time as an aware datetime: a naive one is read as UTC, never as the machine's
    local time, by every backend alike (times are stored and shown in UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
