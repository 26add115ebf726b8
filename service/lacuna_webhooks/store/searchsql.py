"""``EventFilter`` as SQL, for SQLite and PostgreSQL: the rules of ``search.py`` in each
dialect's JSON functions.

``search_sql(dialect, where, cursor=, limit=, now=)`` returns the statement and its
parameters; the statement's frame is the named query ``search_events`` of the dialect
(``store/sql/<dialect>/queries.sql``), whose ``/* where */`` marker receives the conditions.
Its rows have the ``event_record`` columns plus ``seq`` (arrival order: SQLite's ``rowid``,
PostgreSQL's ``seq``); the cursor is ``[received_at, seq]`` of the last row of a page
(epoch seconds on SQLite, RFC 3339 text on PostgreSQL), made and checked here.

``match`` never raises on a stored payload the database's JSON cannot read: SQLite reads
it only when ``json_valid`` says it can, PostgreSQL through ``lacuna_payload(raw)``
(migration 0005: ``NULL`` for a body ``jsonb`` refuses, such as one holding ``\\u0000``).
Such a row simply does not match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from .base import EventFilter
from .queries import load
from .search import decode_cursor, encode_cursor

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


def _sqlite_path(path: str) -> str | None:
    """A dotted path as an SQLite JSON path of quoted labels, or ``None`` when a key holds a
    ``"`` or a NUL (a path label cannot; ``_match_sqlite`` then walks with ``json_each``)."""
    keys = path.split(".")
    if any('"' in key or "\x00" in key for key in keys):
        return None
    return "$." + ".".join(f'"{key}"' for key in keys)


def _literal(wanted: str) -> bytes | None:
    """The bytes any stored body holding a field equal to ``wanted`` must contain, when that
    is knowable: the JSON text of an equal number, boolean or null is ``wanted`` itself, and
    a JSON encoder writes a string of printable ASCII other than ``"``, ``\\`` and ``/``
    (which some escape) as it is. Else ``None`` (no pre-filter). Parsing a body costs ten
    times scanning it for bytes, so this keeps a ``match`` search near the cost of ``q``."""
    if wanted and all(" " <= c <= "~" and c not in '"\\/' for c in wanted):
        return wanted.encode("ascii")
    return None


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
    # json_valid first (CASE evaluates lazily): json_extract raises on a malformed document,
    # which would fail the whole search. A string is compared decoded, but SQLite's text
    # stops at a NUL, so a string holding an escaped NUL is kept out; a number, boolean or
    # null by its JSON text.
    j = "CAST(e.raw AS TEXT)"
    w = p(wanted)
    json_path = _sqlite_path(path)
    if json_path is None:
        return f"(CASE WHEN json_valid({j}) THEN {_walk_sqlite(j, path, w, p)} ELSE 0 END)"
    at = p(json_path)
    return (
        f"(CASE WHEN json_valid({j}) THEN (CASE json_type({j}, {at})"
        f" WHEN 'text' THEN ({j} ->> {at}) = {w} AND instr({j} -> {at}, '\\u0000') = 0"
        f" WHEN 'object' THEN 0 WHEN 'array' THEN 0"
        f" ELSE ({j} -> {at}) = {w} END) ELSE 0 END)"
    )


def _walk_sqlite(j: str, path: str, w: str, p: _Params) -> str:
    """The same condition through ``json_each``, one object level at a time (its ``key`` is
    the decoded label, whatever characters it holds). Slower: only for such paths."""
    *parents, last = path.split(".")
    node = j
    for key in parents:
        node = (
            f"(SELECT value FROM json_each({node}) WHERE key = {p(key)}"
            f" AND type = 'object' AND json_type({node}) = 'object')"
        )
    return (
        f"EXISTS (SELECT 1 FROM json_each({node}) AS f WHERE json_type({node}) = 'object'"
        f" AND f.key = {p(last)} AND CASE f.type"
        f" WHEN 'text' THEN f.value = {w} AND instr(json_quote(f.value), '\\u0000') = 0"
        f" WHEN 'object' THEN 0 WHEN 'array' THEN 0"
        f" ELSE (CASE f.type WHEN 'true' THEN 'true' WHEN 'false' THEN 'false'"
        f" WHEN 'null' THEN 'null' ELSE CAST(f.value AS TEXT) END) = {w} END)"
    )


def _match_postgres(path: str, wanted: str, p: _Params) -> str:
    # payload is lacuna_payload(e.raw), evaluated once per row (a LATERAL subquery): NULL when
    # jsonb refuses the body, and then nothing matches.
    keys = path.split(".")
    v = f"(j.payload #> {p(keys, '::text[]')})"  # the same placeholder twice
    w = p(wanted, "::text")
    # #> also indexes arrays with integer-like keys; the rule walks objects only.
    objects = "".join(
        f"jsonb_typeof(j.payload #> {p(keys[:i], '::text[]')}) = 'object' AND "
        for i, key in enumerate(keys)
        if re.fullmatch(r"\s*[-+]?[0-9]+\s*", key)
    )
    return (
        f"{objects}(CASE jsonb_typeof({v}) WHEN 'null' THEN {w} = 'null'"
        f" WHEN 'object' THEN false WHEN 'array' THEN false"
        f" ELSE ({v} #>> '{{}}') = {w} END) IS TRUE"
    )


def _cursor(dialect: Dialect, cursor: str) -> tuple[Any, int]:
    """``(received_at, seq)`` of a cursor this dialect made; ``ValueError`` otherwise."""
    received, seq = decode_cursor(cursor, 2)
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("not a cursor this service made")
    if dialect == "sqlite":
        if not isinstance(received, int | float) or isinstance(received, bool):
            raise ValueError("not a cursor this service made")
        return float(received), seq
    if not isinstance(received, str):
        raise ValueError("not a cursor this service made")
    try:
        at = datetime.fromisoformat(received)
    except ValueError:
        raise ValueError("not a cursor this service made") from None
    if at.tzinfo is None:
        raise ValueError("not a cursor this service made")
    return at, seq


def next_cursor(dialect: Dialect, received_at: Any, seq: int) -> str:
    """The cursor after a row with these ``received_at`` (as the driver returns it) and
    ``seq``."""
    if dialect == "sqlite":
        return encode_cursor(float(received_at), int(seq))
    assert isinstance(received_at, datetime)
    return encode_cursor(received_at.astimezone(UTC).isoformat(), int(seq))


def search_sql(
    dialect: Dialect, where: EventFilter, *, cursor: str | None, limit: int, now: datetime
) -> tuple[str, list[Any]]:
    """The search statement (newest first, ``limit + 1`` rows so the caller knows whether a
    next page exists) and its parameters. ``ValueError`` for a bad cursor."""
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
    if where.type is not None:
        conds.append(f"e.type = {p(where.type, '::text')}")
    if where.task_id is not None:
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
                conds.append(f"instr(e.raw, {p(literal)}) > 0")
            else:
                conds.append(f"position({p(literal, '::bytea')} in e.raw) > 0")
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


__all__ = ["Dialect", "next_cursor", "search_sql"]
