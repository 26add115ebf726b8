"""The sync driver of the outbox's flows (``store/outbox.py``) on an SQLite connection.

``drive(conn, flow, *args)`` runs one flow to its end on the connection it is given: the
writer's (thread or child process, inside the writer's transaction: ``writer.run_job``) or
the reader's. It is module-level, like the flows, so the writer process receives
``(drive, (flow, *args))`` pickled and builds the generator itself.

Values are converted to what the file holds: an aware ``datetime`` to epoch seconds (REAL),
a ``timedelta`` to seconds, a list or tuple to JSON text (the queries read it with
``json_each``). A query block of several statements runs them in order; its count is the
last one's.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson

from ..outbox import Flow, Query
from ..queries import load
from ..rules import as_utc

T = TypeVar("T")
Q = load("sqlite")


def epoch(value: datetime) -> float:
    """A store time as epoch seconds (``rules.as_utc``: a naive datetime is UTC)."""
    return as_utc(value).timestamp()


def at(value: float) -> datetime:
    """An epoch-seconds column as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


def _json(value: list[Any] | tuple[Any, ...]) -> str:
    return orjson.dumps(value).decode()


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


# By exact type (a dict lookup per value: the dispatcher's hot path runs this for every
# parameter); ``None``: taken as it is. A type not listed (a subclass) goes through
# ``_convert_subclass``.
_CONVERT: dict[type, Callable[[Any], Any] | None] = {
    datetime: epoch,
    timedelta: _seconds,
    list: _json,
    tuple: _json,
    str: None,
    int: None,
    float: None,
    bytes: None,
    bool: None,
    type(None): None,
}


def split_script(script: str) -> list[str]:
    """The statements of a script, in order (``executescript`` would commit the caller's
    transaction); a trailing comment is not a statement."""
    found, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    if any(line.strip() and not line.lstrip().startswith("--") for line in pending.splitlines()):
        found.append(pending.strip())
    return found


@functools.cache
def statements(name: str) -> tuple[str, ...]:
    """The statements of the named query, in order (most blocks hold one)."""
    return tuple(split_script(Q[name]))


def _convert_subclass(value: Any) -> Any:
    """``value`` converted by the first of its base classes in ``_CONVERT`` (a ``datetime``
    subclass such as a frozen test clock's, a ``list`` subclass), else as it is: sqlite3
    would refuse the subclass, or store a ``datetime`` as ISO text, which compares above
    every epoch-seconds REAL (a lease that never expires)."""
    for base in type(value).__mro__[1:]:
        if base in _CONVERT:
            to = _CONVERT[base]
            return value if to is None else to(value)
    return value


def run_query(conn: sqlite3.Connection, query: Query) -> Any:
    """One query's result, in the shape it asked for."""
    convert = _CONVERT.get
    params = {
        key: value if (to := convert(type(value), _convert_subclass)) is None else to(value)
        for key, value in query.params.items()
    }
    *first, last = statements(query.name)
    for statement in first:
        conn.execute(statement, params)
    cursor = conn.execute(last, params)
    shape, mapper = query.shape, query.row
    if shape == "rowcount":
        return cursor.rowcount
    if shape == "rows":
        found = cursor.fetchall()
        return found if mapper is None else [mapper(row, at) for row in found]
    row = cursor.fetchone()
    if row is None:
        return None
    if shape == "value":
        return row[0]
    return row if mapper is None else mapper(row, at)


def drive(conn: sqlite3.Connection, flow: Callable[..., Flow[T]], *args: Any) -> tuple[T, bool]:
    """Run ``flow(*args)`` on ``conn``: its result, and whether it nudged (made work due)."""
    steps = flow(*args)
    nudged = False
    try:
        step = next(steps)
        while True:
            if isinstance(step, Query):
                step = steps.send(run_query(conn, step))
            else:  # NUDGE
                nudged = True
                step = steps.send(None)
    except StopIteration as stop:
        return stop.value, nudged


def read(conn: sqlite3.Connection, flow: Callable[..., Flow[T]], *args: Any) -> T:
    """``drive`` for a flow that only reads (on the reader): its result."""
    return drive(conn, flow, *args)[0]


__all__ = ["at", "drive", "epoch", "read", "run_query", "split_script", "statements"]
