"""``EventFilter`` as SQL, for SQLite and PostgreSQL: the rules of ``search.py`` in each
dialect's JSON functions.

``search_sql(dialect, where, cursor=, limit=, now=)`` returns the statement and its
parameters; the statement's frame is the named query ``search_events`` of the dialect
(``store/sql/<dialect>/queries.sql``), whose ``/* where */`` marker receives the conditions.
Its rows have the ``event_record`` columns plus ``seq`` (arrival order: SQLite's ``rowid``,
PostgreSQL's ``seq``); the cursor is ``[received_at, seq]`` of the last row of a page
(epoch seconds on SQLite, RFC 3339 text on PostgreSQL), made here and checked by
``search.decode_cursor`` / ``search.cursor_time`` (out of range: ``ValueError``).

``match`` follows ``search.matches_value`` (strings exactly, numbers as exact decimals,
keys and strings decoded from their escapes) and never raises on a stored payload the
database's JSON cannot read: SQLite reads it only when ``json_valid`` says it can,
PostgreSQL through ``lacuna_payload(raw)`` (migrations 0005 and 0010: a body ``jsonb``
refuses for a ``\\u0000`` or lone surrogate escape is read again with each written as
``\\ufffd``, as ``search.body_matches`` reads them; ``NULL`` when it still refuses it).
Such a row simply does not match. A path is one
parameter per key, and the statement grows linearly with it. SQLite statements call two
Python functions, ``lacuna_match`` and ``lacuna_number_equal``: every connection that runs
them needs ``register_sqlite_functions``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from .base import EventFilter, ScanBudget
from .queries import load
from .search import (
    body_matches,
    cursor_time,
    decode_cursor,
    encode_cursor,
    fitting,
    json_number,
)

Dialect = Literal["sqlite", "postgres"]
_MARKER = "/* where */"
_DELIVERIES = "/* deliveries */"
# Delivery states few deliveries are in (a healthy outbox is almost all done): on SQLite the
# deliveries in such a state drive the search (queries.sql search_events_by_delivery).
_RARE_STATES = frozenset({"dead", "pending", "due", "running", "waiting"})


class _Params:
    """Numbered placeholders (SQLite ``?N``, PostgreSQL ``$N``) with their values in order; a
    placeholder may appear several times in the statement."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any, cast: str = "") -> str:
        self.values.append(value)
        if self.dialect == "sqlite":
            return f"?{len(self.values)}"
        return f"${len(self.values)}{cast}"


def _literal(wanted: str) -> bytes | None:
    """Bytes that every stored body holding a field ``wanted`` matches contains, unless the
    body holds a backslash; ``None`` when there are none to require. Without a backslash a
    JSON string is written as its own UTF-8 text and ``true``/``false``/``null`` as
    themselves, so the test ``contains the bytes or contains a backslash`` never drops a
    match (``searchsql`` adds the backslash half). A number literal has none: ``1`` also
    matches ``1e0``. Parsing a body costs ten times scanning it for bytes, so this keeps a
    ``match`` search near the cost of ``q`` wherever bodies are written without escapes."""
    if not wanted or json_number(wanted) is not None:
        return None
    return wanted.encode("utf-8", "surrogatepass")


def _state(dialect: Dialect, status: str, p: _Params, now: datetime) -> str:
    """The condition on delivery ``d`` for one ``DELIVERY_STATES`` name (``search.py``
    ``delivery_state``). PostgreSQL times leases by the database's clock, as ``claim``."""
    if status in ("done", "dead"):
        return f"d.status = {p(status, '::text')}"
    pending = "d.status = 'pending'"
    if status == "pending":
        return pending
    lease_at = p(now.timestamp()) if dialect == "sqlite" else "now()"
    if status == "running":
        return f"{pending} AND d.lease_until > {lease_at}"
    at = lease_at if dialect == "sqlite" else p(now, "::timestamptz")
    lease_free = f"(d.lease_until IS NULL OR d.lease_until <= {lease_at})"
    compare = "<=" if status == "due" else ">"
    return f"{pending} AND d.next_attempt_at {compare} {at} AND {lease_free}"


def _match_sqlite(path: str, wanted: str, p: _Params) -> str:
    """One ``match`` condition on SQLite. A body without a backslash is read through a JSON
    path of quoted labels, which is exact for it: none of its keys or strings holds an
    escape, and none of its keys a ``"`` (no such path is built). SQLite 3.40 compares path
    labels to keys as written, escapes and all, so a body holding a backslash is read by
    ``_walk_sqlite`` instead (decoded keys). Both grow linearly with the path, which is only
    ever a parameter, never SQL text."""
    # json_valid first (CASE evaluates lazily): json_extract and json_each raise on a
    # malformed document, which would fail the whole search.
    j = "CAST(e.raw AS TEXT)"
    w = p(wanted)
    number = json_number(wanted)
    keys = path.split(".")
    walk = (
        f"(CASE WHEN json_valid({j}) THEN {_walk_sqlite(j, keys, path, w, number, p)} ELSE 0 END)"
    )
    # `match` reads NUL and lone surrogates in strings and keys as U+FFFD (search.py
    # body_matches, PostgreSQL's lacuna_payload). json_each stops a string or key at an
    # escaped NUL, so a body holding \u0000 is read by the reference. It reads a lone
    # surrogate as bytes no UTF-8 text equals, which is right unless the path or value holds
    # U+FFFD: only then do surrogate escapes (pairs too, the cheap test) need the reference.
    unreadable = "instr(e.raw, '\\u0000') > 0"
    if "\ufffd" in path or "\ufffd" in wanted:
        unreadable += " OR instr(e.raw, '\\ud') > 0 OR instr(e.raw, '\\uD') > 0"
    walk = f"(CASE WHEN {unreadable} THEN lacuna_match(e.raw, {p(path)}, {w}) ELSE {walk} END)"
    if any(c in key for key in keys for c in '"\\\x00'):
        return f"(CASE WHEN instr(e.raw, X'5C') > 0 THEN {walk} ELSE 0 END)"
    at = p("$" + "".join(f'."{key}"' for key in keys))
    equal_number = "0"
    if number is not None:
        # Equal decimals are equal doubles: the cheap test in SQL first, the exact one only
        # for the rows that pass it (on the number's text as written: ``->``).
        equal_number = (
            f"(CAST(json_extract({j}, {at}) AS REAL) = {p(float(number))}"
            f" AND lacuna_number_equal({j} -> {at}, {w}))"
        )
    plain = (
        f"(CASE WHEN json_valid({j}) THEN (CASE json_type({j}, {at})"
        f" WHEN 'text' THEN ({j} ->> {at}) = {w}"
        f" WHEN 'integer' THEN {equal_number} WHEN 'real' THEN {equal_number}"
        f" WHEN 'true' THEN {w} = 'true' WHEN 'false' THEN {w} = 'false'"
        f" WHEN 'null' THEN {w} = 'null' ELSE 0 END) ELSE 0 END)"
    )
    return f"(CASE WHEN instr(e.raw, X'5C') > 0 THEN {walk} ELSE {plain} END)"


def _walk_sqlite(
    j: str, keys: list[str], path: str, w: str, number: Decimal | None, p: _Params
) -> str:
    """The condition through ``json_each``, one object level per join (its ``key`` is the
    decoded label, whatever characters it holds): each level names the one before once, so
    the statement grows linearly with the path. A number is compared as a double in SQL and
    exactly, for the rows where that holds, by ``lacuna_match`` (``json_each`` gives no
    number's text)."""
    sources = []
    conds = [f"json_type({j}) = 'object'"]
    parent = j
    for i, key in enumerate(keys):
        sources.append(f"json_each({parent}) AS l{i}")
        conds.append(f"l{i}.key = {p(key)}")
        if i < len(keys) - 1:
            conds.append(f"l{i}.type = 'object'")  # objects only, never list indexes
        parent = f"l{i}.value"
    f = f"l{len(keys) - 1}"
    exact = f"lacuna_match(e.raw, {p(path)}, {w})"
    equal_number = "0"
    if number is not None:
        equal_number = f"(CAST({f}.value AS REAL) = {p(float(number))} AND {exact})"
    # Only bodies without an escaped NUL get here (_match_sqlite): json_each's text would
    # stop at one ("a\\u0000b" reads "a").
    conds.append(
        f"CASE {f}.type"
        f" WHEN 'text' THEN {f}.value = {w}"
        f" WHEN 'integer' THEN {equal_number} WHEN 'real' THEN {equal_number}"
        f" WHEN 'true' THEN {w} = 'true' WHEN 'false' THEN {w} = 'false'"
        f" WHEN 'null' THEN {w} = 'null' ELSE 0 END"
    )
    return f"EXISTS (SELECT 1 FROM {', '.join(sources)} WHERE {' AND '.join(conds)})"


def _sqlite_match(raw: bytes | str | None, path: str | None, wanted: str | None) -> int:
    """``lacuna_match(raw, path, wanted)``: ``search.body_matches`` (never raises: an error
    in an SQLite function would fail the whole search)."""
    if raw is None or path is None or wanted is None:
        return 0
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        return int(body_matches(raw, path, wanted))
    except Exception:  # a body no rule foresaw matches nothing, as the parser's refusals
        return 0


def _sqlite_number_equal(text: str | None, wanted: str | None) -> int:
    """``lacuna_number_equal(number_text, wanted)``: the JSON number ``text`` equals the
    JSON number literal ``wanted`` exactly, as decimals."""
    if text is None or wanted is None:
        return 0
    number = json_number(wanted)
    if number is None:
        return 0
    try:
        return int(Decimal(text) == number)
    except (ArithmeticError, ValueError):
        return 0


def register_sqlite_functions(conn: sqlite3.Connection) -> None:
    """Add the functions ``search_sql``'s SQLite statements call to a connection: every
    connection that may run a search must have them."""
    conn.create_function("lacuna_match", 3, _sqlite_match, deterministic=True)
    conn.create_function("lacuna_number_equal", 2, _sqlite_number_equal, deterministic=True)


#: The finite ``numeric`` values PostgreSQL holds (at most 131072 digits before the point,
#: 16383 after): a value beyond them cannot equal any ``jsonb`` number, and binding it
#: would fail the statement.
_PG_NUMERIC_MAX_ADJUSTED = 131071
_PG_NUMERIC_MIN_EXPONENT = -16383


def _match_postgres(path: str, wanted: str, p: _Params) -> str:
    """One ``match`` condition on PostgreSQL's ``jsonb`` (keys and strings decoded, numbers
    exact ``numeric``). The path is one ``text[]`` parameter: any key, any length, linear."""
    # payload is lacuna_payload(e.raw), evaluated once per row (a LATERAL subquery): NULL when
    # jsonb refuses the body, and then nothing matches.
    keys = path.split(".")
    k = p(keys, "::text[]")
    v = f"(j.payload #> {k})"
    w = p(wanted, "::text")
    # #> also indexes arrays with integer-like keys; the rule walks objects only.
    objects = "".join(
        f"jsonb_typeof(j.payload #> ({k})[1:{i}]) = 'object' AND "
        for i, key in enumerate(keys)
        if re.fullmatch(r"\s*[-+]?[0-9]+\s*", key)
    )
    equal_number = "false"
    number = json_number(wanted)
    if number is not None:
        if number == 0:
            number = Decimal(0)
        exponent = number.as_tuple().exponent
        if number == 0 or (
            isinstance(exponent, int)
            and exponent >= _PG_NUMERIC_MIN_EXPONENT
            and number.adjusted() <= _PG_NUMERIC_MAX_ADJUSTED
        ):
            equal_number = f"({v})::numeric = {p(number, '::numeric')}"
    return (
        f"{objects}(CASE jsonb_typeof({v}) WHEN 'string' THEN ({v} #>> '{{}}') = {w}"
        f" WHEN 'number' THEN {equal_number}"
        f" WHEN 'boolean' THEN ({v} #>> '{{}}') = {w}"
        f" WHEN 'null' THEN {w} = 'null' ELSE false END) IS TRUE"
    )


#: The last second a datetime holds (9999-12-31T23:59:59Z), as SQLite's epoch times.
_MAX_CURSOR_EPOCH = 253_402_300_799


def _cursor(dialect: Dialect, cursor: str) -> tuple[Any, int]:
    """``(received_at, seq)`` of a cursor this dialect made; ``ValueError`` otherwise."""
    received, seq = decode_cursor(cursor, 2)
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("not a cursor this service made")
    if dialect == "sqlite":
        if (
            not isinstance(received, int | float)
            or isinstance(received, bool)
            # Out of range as PostgreSQL's RFC 3339 times are (cursor_time): past year 9999
            # it read as "no cursor" and answered the newest page (docs/admin.md says 400).
            or not 0 <= received <= _MAX_CURSOR_EPOCH
        ):
            raise ValueError("not a cursor this service made")
        return float(received), seq
    return cursor_time(received), seq


def next_cursor(dialect: Dialect, received_at: Any, seq: int) -> str:
    """The cursor after a row with these ``received_at`` (as the driver returns it) and
    ``seq``."""
    if dialect == "sqlite":
        return encode_cursor(float(received_at), int(seq))
    assert isinstance(received_at, datetime)
    return encode_cursor(received_at.astimezone(UTC).isoformat(), int(seq))


def search_sql(
    dialect: Dialect,
    where: EventFilter,
    *,
    cursor: str | None,
    limit: int,
    now: datetime,
    lower: tuple[Any, int] | None = None,
) -> tuple[str, list[Any]]:
    """The search statement (newest first, ``limit + 1`` rows so the caller knows whether a
    next page exists) and its parameters. ``lower``: ``(received_at, seq)`` as the driver
    returns them, the oldest event of a scan window (inclusive). ``ValueError`` for a bad
    cursor."""
    p = _Params(dialect)
    conds: list[str] = []
    ts: Callable[[datetime], Any]
    if dialect == "sqlite":
        seq, ts, t_cast = "e.rowid", (lambda d: d.timestamp()), ""
    else:
        seq, ts, t_cast = "e.seq", (lambda d: d), "::timestamptz"
    texts = [where.type, where.task_id, where.handler, *(w for pair in where.match for w in pair)]
    if dialect == "postgres" and any(t is not None and "\x00" in t for t in texts):
        # PostgreSQL text cannot hold NUL, and no stored column or jsonb string holds one:
        # such a filter matches nothing (and binding it would fail the statement).
        where = EventFilter()
        conds.append("false")
    if cursor is not None:
        received, last = _cursor(dialect, cursor)
        conds.append(f"(e.received_at, {seq}) < ({p(received, t_cast)}, {p(last, '::bigint')})")
    if lower is not None:
        conds.append(
            f"(e.received_at, {seq}) >= ({p(lower[0], t_cast)}, {p(int(lower[1]), '::bigint')})"
        )
    if where.type is not None:
        conds.append(f"e.type = {p(where.type, '::text')}")
    if where.task_id is not None:
        if dialect == "sqlite":
            # Through the task's row, whose rowid numbers its events (0009_task_seq.sql).
            task_row = f"SELECT t.rowid FROM tasks AS t WHERE t.task_id = {p(where.task_id)}"
            conds.append(f"e.task_seq = ({task_row})")
        conds.append(f"e.task_id = {p(where.task_id, '::text')}")
    if where.since is not None:
        conds.append(f"e.received_at >= {p(ts(where.since), t_cast)}")
    if where.until is not None:
        conds.append(f"e.received_at < {p(ts(where.until), t_cast)}")
    by_delivery = ""
    if where.handler is not None or where.status is not None:
        inner = []
        if where.handler is not None:
            inner.append(f"d.handler = {p(where.handler, '::text')}")
        if where.status is not None:
            inner.append(_state(dialect, where.status, p, now))
        if dialect == "sqlite" and where.status in _RARE_STATES:
            by_delivery = " AND ".join(inner)
        else:
            inner.insert(0, "d.event_id = e.id")
            conds.append(f"EXISTS (SELECT 1 FROM deliveries AS d WHERE {' AND '.join(inner)})")
    if where.q is not None:
        needle = where.q.encode("utf-8", "surrogatepass")
        if dialect == "sqlite":
            conds.append(f"instr(e.raw, {p(needle)}) > 0")
        else:
            conds.append(f"position({p(needle, '::bytea')} in e.raw) > 0")
    for path, wanted in where.match:
        literal = _literal(wanted)
        if literal is not None:  # cheap first: most bodies never hold the value at all
            if dialect == "sqlite":
                conds.append(f"(instr(e.raw, {p(literal)}) > 0 OR instr(e.raw, X'5C') > 0)")
            else:
                backslash = p(b"\\", "::bytea")
                conds.append(
                    f"(position({p(literal, '::bytea')} in e.raw) > 0"
                    f" OR position({backslash} in e.raw) > 0)"
                )
        if dialect == "sqlite":
            conds.append(_match_sqlite(path, wanted, p))
        else:
            conds.append(_match_postgres(path, wanted, p))
    if by_delivery:
        frame = load(dialect)["search_events_by_delivery"].replace(_DELIVERIES, by_delivery)
    elif dialect == "sqlite" or not where.match:
        frame = load(dialect)["search_events"]
    else:
        frame = load(dialect)["search_events_payload"]
    text = frame.replace(_MARKER, " AND ".join(conds) or "true")
    limit_sql = p(limit + 1, "::bigint")
    return f"{text} LIMIT {limit_sql}", p.values


def window_bound_sql(
    dialect: Dialect, where: EventFilter, *, cursor: str | None, size: int
) -> tuple[str, list[Any]]:
    """The statement of a scan window's oldest event: ``(received_at, seq)`` of the
    ``size``-th event older than ``cursor`` that ``where``'s indexed conditions (``type``,
    ``since``, ``until``) keep, newest first, and of the one after it (none or one row:
    the window holds every event left, none older remains beyond it). It reads only an
    index (``received_at``, or ``type, received_at``; the arrival order is its last
    column), never a body. ``ValueError`` for a bad cursor."""
    p = _Params(dialect)
    ts: Callable[[datetime], Any]
    if dialect == "sqlite":
        seq, ts, t_cast = "e.rowid", (lambda d: d.timestamp()), ""
    else:
        seq, ts, t_cast = "e.seq", (lambda d: d), "::timestamptz"
    conds: list[str] = []
    if cursor is not None:
        received, last = _cursor(dialect, cursor)
        conds.append(f"(e.received_at, {seq}) < ({p(received, t_cast)}, {p(last, '::bigint')})")
    if where.type is not None and not (dialect == "postgres" and "\x00" in where.type):
        conds.append(f"e.type = {p(where.type, '::text')}")
    if where.since is not None:
        conds.append(f"e.received_at >= {p(ts(where.since), t_cast)}")
    if where.until is not None:
        conds.append(f"e.received_at < {p(ts(where.until), t_cast)}")
    text = (
        f"SELECT e.received_at, {seq} AS seq FROM events AS e WHERE {' AND '.join(conds) or 'true'}"
        f" ORDER BY e.received_at DESC, {seq} DESC"
        f" LIMIT 2 OFFSET {p(max(size, 1) - 1, '::bigint')}"
    )
    return text, p.values


def windowed(dialect: Dialect, where: EventFilter, budget: ScanBudget | None) -> bool:
    """Whether a search of ``where`` under ``budget`` runs in windows (``windowed_search``)
    rather than as one statement: ``ScanBudget.windowed``, except on SQLite when a rare
    delivery state drives the search (it reads only that state's deliveries), and on
    PostgreSQL when a filter holds NUL (it matches nothing)."""
    if budget is None or not budget.windowed(where):
        return False
    if dialect == "postgres":
        # A NUL in a filter matches nothing there (search_sql): one statement says so.
        texts = [where.type, where.handler, *(w for pair in where.match for w in pair)]
        return not any(t is not None and "\x00" in t for t in texts)
    return where.status not in _RARE_STATES


#: What ``windowed_search`` returns: the rows of the page (at most ``limit``), the next
#: cursor, whether the page is complete, and the ``received_at`` the scan reached (as the
#: driver gives it; ``None`` when complete).
WindowedPage = tuple[list[Any], str | None, bool, Any]


def windowed_search(
    dialect: Dialect,
    where: EventFilter,
    *,
    cursor: str | None,
    limit: int,
    now: datetime,
    budget: ScanBudget,
    clock: Callable[[], float] = time.monotonic,
) -> Generator[tuple[str, list[Any]], list[Any], WindowedPage]:
    """A budgeted search (``base.ScanBudget``) as a generator of statements, the same for
    every driver: it yields ``(sql, params)``, is sent the rows each returns (mappings
    with ``received_at`` and ``seq``), and returns a ``WindowedPage``. Windows come from
    ``window_bound_sql``; inside each, ``search_sql`` with the window's bounds and the
    rows still wanted (plus one, to know whether a next page exists). The cursor of an
    incomplete page is the oldest event of the last window scanned, so the next page
    resumes exactly where this one stopped. ``ValueError`` for a bad cursor (before any
    statement)."""
    if cursor is not None:
        _cursor(dialect, cursor)
    started = clock()
    upper = cursor
    found: list[Any] = []
    window = max(1, budget.first_window)
    scanned = 0
    while True:
        bound = yield window_bound_sql(dialect, where, cursor=upper, size=window)
        # One row: the window ends at the oldest event; the last window then (no bound).
        lower = (bound[0]["received_at"], bound[0]["seq"]) if len(bound) > 1 else None
        found += yield search_sql(
            dialect, where, cursor=upper, limit=limit - len(found), now=now, lower=lower
        )
        scanned += window
        if len(found) > limit:
            page = found[:limit]
            return page, next_cursor(dialect, page[-1]["received_at"], page[-1]["seq"]), True, None
        if lower is None:  # the last window held every event left
            return found, None, True, None
        upper = next_cursor(dialect, lower[0], lower[1])
        elapsed = clock() - started
        if budget.spent(elapsed):
            return found, upper, False, lower[0]
        window = budget.next_window(window, scanned, elapsed)


def fit_page(dialect: Dialect, page: WindowedPage, max_bytes: int | None) -> WindowedPage:
    """``page`` (its rows carry ``size``, the body's length) cut to the rows whose bodies
    fit ``max_bytes`` (``search.fitting``). A cut page ends at its last row: the next cursor
    is after it, and the page is complete (every event between the cursor given and that
    row was examined). The caller then reads only the kept rows' bodies
    (``event_bodies``)."""
    found = page[0]
    kept = fitting([int(row["size"]) for row in found], max_bytes)
    if kept == len(found):
        return page
    found = found[:kept]
    last = found[-1]
    return found, next_cursor(dialect, last["received_at"], last["seq"]), True, None


__all__ = [
    "Dialect",
    "WindowedPage",
    "fit_page",
    "next_cursor",
    "register_sqlite_functions",
    "search_sql",
    "window_bound_sql",
    "windowed",
    "windowed_search",
]
