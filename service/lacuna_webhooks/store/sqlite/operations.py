"""What the SQLite writer runs besides the outbox's flows: opening and migrating the file,
the group-committed accept batch, the probes, the admin search and the live stream.

The store's operations themselves are the flows of ``store/outbox.py``, run by
``driver.drive``. Everything here is module-level so that the writer process
(``process.py``) receives it pickled; each runs in a transaction of its own
(``writer.transaction``), except the accept batch, one statement that commits itself. The
statements are the named queries of ``store/sql/sqlite/queries.sql``; rows are mapped to
records by column name (``sqlite3.Row``, ``store/rows.py``) inside the writer, so only
records travel back. Times are epoch seconds (REAL) in the file.

Supported: SQLite 3.35 or later with its JSON functions (``RETURNING`` and ``json_each``
are used throughout; built in since 3.38, compiled in by every common distribution
before). ``connect`` refuses anything less with one clear line.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from datetime import datetime
from importlib import resources
from typing import Any, NamedTuple

import orjson

from ...errors import StoreUnavailable
from .. import rows
from ..base import EventFilter, EventPage, EventRecord, ScanBudget
from ..queries import load
from ..searchsql import (
    WindowedPage,
    fit_page,
    next_cursor,
    register_sqlite_functions,
    windowed_search,
)
from .driver import at, split_script
from .writer import WatchedConnection, transaction

BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
MIN_SQLITE_VERSION = (3, 35)
_MIGRATION_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
Q = load("sqlite")


class AcceptRow(NamedTuple):
    """What the writer needs of one ``accept`` (computed on the loop, not by the writer).

    A named tuple: built once per request, and cheap to send to a writer process."""

    event_id: str
    event_type: str
    created: int | None
    received_at: float
    task_id: str | None
    task_status: str | None
    raw: bytes
    handlers: tuple[str, ...]
    order: float  # rules.task_order of the event
    trace_context: str | None = None  # the request's traceparent, while tracing is on


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every packaged migration, in order."""
    folder = resources.files("lacuna_webhooks.store").joinpath("sql", "sqlite")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations ``conn`` lacks; return the versions applied now."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    known = migrations()
    newest_known = known[-1][0] if known else 0
    (newest_applied,) = conn.execute(
        "SELECT coalesce(max(version), 0) FROM schema_version"
    ).fetchone()
    if newest_applied > newest_known:
        raise StoreUnavailable(
            f"The database schema (version {newest_applied}) is newer than this release "
            f"knows (version {newest_known}); upgrade lacuna-webhooks."
        )
    applied = []
    for version, name, script in known:

        def apply(
            c: sqlite3.Connection, version: int = version, name: str = name, script: str = script
        ) -> bool:
            # Checked inside the write transaction: another process may have just applied it.
            row = c.execute("SELECT 1 FROM schema_version WHERE version = ?", (version,))
            if row.fetchone() is not None:
                return False
            for statement in split_script(script):
                c.execute(statement)
            c.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, time.time()),
            )
            return True

        if transaction(conn, apply, write=True):
            applied.append(version)
    return applied


def _check_features(conn: sqlite3.Connection, where: str) -> None:
    """Refuse an SQLite older than ``MIN_SQLITE_VERSION`` or without JSON functions."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise StoreUnavailable(
            f"SQLite {sqlite3.sqlite_version} is too old for {where}: lacuna-webhooks needs "
            f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or later."
        )
    try:
        conn.execute("SELECT json_valid('[]')").fetchone()
    except sqlite3.OperationalError:
        raise StoreUnavailable(
            f"SQLite {sqlite3.sqlite_version} was built without its JSON functions, which "
            "lacuna-webhooks needs."
        ) from None


# --- the hot path: one group-committed batch of accepts ----------------------------------------
# The batch is one statement. Each SQLite call releases and retakes the GIL, and under load
# the request path holds it: the writer then waits up to a switch interval at every retake.
# So a whole batch is one multi-row INSERT into a TEMP view whose INSTEAD OF trigger writes
# each row in order (queries.sql: accept_batch_trigger); in autocommit that one statement is
# its own transaction (commit and fsync included). One more statement reads the outcomes
# back, only when some row was a duplicate.

_BATCH_SCHEMA = ("accept_outcome_table", "accept_batch_view", "accept_batch_trigger")
_BATCH_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# 11 parameters a row: the largest batch the writer forms stays under SQLite's variable limit.
BATCH_MAX_ROWS = 2900


def create_batch_schema(conn: sqlite3.Connection) -> None:
    """The TEMP table, view and trigger of the group commit, on this connection."""
    for name in _BATCH_SCHEMA:
        conn.execute(Q[name])


def accept_batch(conn: sqlite3.Connection, batch: list[AcceptRow]) -> list[bool]:
    """Write a batch as one statement (it commits, and fsyncs, by itself); per row ``True``
    (stored) or ``False`` (a duplicate, also of an earlier copy in the same batch)."""
    if len(batch) > BATCH_MAX_ROWS:
        raise ValueError(f"at most {BATCH_MAX_ROWS} accepts per batch")
    params: list[Any] = []
    for slot, r in enumerate(batch):
        params += (
            slot,
            r.event_id,
            r.event_type,
            r.created,
            r.received_at,
            r.task_id,
            r.task_status,
            r.raw,
            _handlers_json(r.handlers),
            r.order,
            r.trace_context,
        )
    before = conn.total_changes
    conn.execute(Q["accept_batch_insert"] + " " + ",".join([_BATCH_ROW] * len(batch)), params)
    # The trigger's changes when every row is new: the event, its outcome, the stream
    # counter, its deliveries, and with a task two more (the task upserted, the event's
    # task_seq set). A duplicate makes only its outcome row and a superseded event leaves the
    # task as it was, so either shows as a shortfall; then read the outcomes.
    if conn.total_changes - before == sum(
        3 + len(r.handlers) + 2 * (r.task_id is not None) for r in batch
    ):
        return [True] * len(batch)
    (outcomes,) = conn.execute(Q["accept_batch_outcomes"], (len(batch),)).fetchone()
    stored = orjson.loads(outcomes)
    return [bool(stored[str(slot)]) for slot in range(len(batch))]


_HANDLERS_JSON: dict[tuple[str, ...], str] = {}


def _handlers_json(handlers: tuple[str, ...]) -> str:
    """The JSON array of a handler list (there are only a few different lists: cached)."""
    text = _HANDLERS_JSON.get(handlers)
    if text is None:
        text = orjson.dumps(list(handlers)).decode()
        if len(_HANDLERS_JSON) < 1024:
            _HANDLERS_JSON[handlers] = text
    return text


def row_size(row: AcceptRow) -> int:
    """A row's weight for the writer process's batch byte cap."""
    return len(row.raw)


FILE_MODE = 0o600


def _create_owner_only(where: str) -> None:
    """Create a new database file readable and writable by its owner only (``FILE_MODE``),
    whatever the umask (issue 10: events hold customer data). SQLite gives its ``-wal`` and
    ``-shm`` files the mode of the database file, so they are owner-only too. An existing
    file keeps the mode its operator gave it. A symbolic link to a file not there yet (a
    data folder linked elsewhere) has its target created owner-only the same way; SQLite
    would have created it with the umask's mode."""
    try:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        if os.path.exists(where):
            return
        try:  # a dangling link (O_EXCL refuses any link): create its target, following it
            fd = os.open(os.path.realpath(where), os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return  # created meanwhile by someone else: theirs
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have taken bits off; never adds any
    finally:
        os.close(fd)


def connect(path: str, synchronous: str) -> sqlite3.Connection:
    """Create (owner-only), open, tune and migrate the file: run by the writer (thread or
    process), once."""
    where = os.path.abspath(path)
    folder = os.path.dirname(where)
    # One missing folder level is created (a fresh data folder); more than one is refused:
    # it is nearly always a mistyped URL, e.g. `sqlite:///var/lib/x.db` (three slashes:
    # relative to the working directory) meant as `sqlite:////var/lib/x.db`.
    if not os.path.isdir(folder) and not os.path.isdir(os.path.dirname(folder)):
        raise StoreUnavailable(
            f"Cannot create the SQLite database {where}: neither its folder nor the folder "
            "above exists (sqlite:///relative/path.db is relative to the working directory; "
            "an absolute path takes four slashes: sqlite:////absolute/path.db)"
        )
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(
            f"Cannot create the folder of the SQLite database {where}: {exc}"
        ) from exc
    try:
        _create_owner_only(where)
    except OSError as exc:
        raise StoreUnavailable(f"Cannot create the SQLite database {where}: {exc}") from exc
    try:
        conn = sqlite3.connect(
            where, isolation_level=None, cached_statements=256, factory=WatchedConnection
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"Cannot open the SQLite database {where}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreUnavailable(
                f"The SQLite database {where} cannot use WAL journal mode (got {mode})."
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
        conn.execute("PRAGMA temp_store = MEMORY")
        _check_features(conn, where)
        migrate(conn)
        create_batch_schema(conn)
        register_sqlite_functions(conn)  # a search may run on the writer too (bulk work)
        conn.row_factory = sqlite3.Row
        conn.watch(where)  # the WAL exists now: migrate() read through it
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"Cannot use the SQLite database {where}: {exc}") from exc
    except StoreUnavailable:
        conn.close()
        raise
    return conn


# --- what the writer and the reader run besides the flows (store/outbox.py, driver.py) ------
# Module-level functions of plain arguments: a writer process receives them pickled.


def ping(c: sqlite3.Connection) -> None:
    c.execute(Q["ping"]).fetchone()


def probe_write(c: sqlite3.Connection, now: float) -> None:
    c.execute(Q["write_probe"], {"now": now})


def bring_forward(
    c: sqlite3.Connection, by: float, now: float, since: float | None, after: int, limit: int
) -> tuple[int, int | None]:
    """One chunk of ``SQLiteStore.clock_stepped_back``: up to ``limit`` pending deliveries
    due after ``now`` (written after ``since`` when given) with an id above ``after`` moved;
    ``(found, last id)`` (``found`` below ``limit``: the last chunk)."""
    params = {"by": by, "now": now, "since": since, "after": after, "limit": limit}
    moved = [int(row[0]) for row in c.execute(Q["bring_forward"], params)]
    return len(moved), max(moved, default=None)


def diagnostics(c: sqlite3.Connection) -> dict[str, object]:
    values: dict[str, object] = {
        name: c.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "busy_timeout", "page_size")
    }
    (values["schema_version"],) = c.execute(Q["ping"]).fetchone()
    return values


def search_events(
    c: sqlite3.Connection,
    sql: str,
    params: list[Any],
    limit: int,
    bodies: bool = True,
    max_bytes: int | None = None,
) -> EventPage:
    """One page of ``searchsql.search_sql``'s statement (it asks for ``limit + 1`` rows)
    and the cursor of the next page, or ``None``; with ``bodies``, cut to ``max_bytes``
    (``searchsql.fit_page``) and the kept rows' bodies read after, in this transaction."""
    found = c.execute(sql, params).fetchall()
    page = found[:limit]
    cursor = None
    if len(found) > limit and page:
        cursor = next_cursor("sqlite", page[-1]["received_at"], page[-1]["seq"])
    return _page(c, (page, cursor, True, None), bodies, max_bytes)


def _page(
    c: sqlite3.Connection, page: WindowedPage, bodies: bool, max_bytes: int | None
) -> EventPage:
    """The ``EventPage`` of a search's rows (``event_head`` columns and ``seq``): without
    bodies as they are, else cut to ``max_bytes`` and each kept row with its body."""
    if bodies:
        page = fit_page("sqlite", page, max_bytes)
    found, cursor, complete, reached = page
    raw = None
    if bodies and found:
        seqs = orjson.dumps([int(row["seq"]) for row in found]).decode()
        # One read transaction: every row of the page still has its body.
        raw = {int(r["seq"]): bytes(r["raw"]) for r in c.execute(Q["event_bodies"], {"seqs": seqs})}
    records = rows.event_heads(found, at, raw)
    return EventPage(
        records,
        cursor,
        complete=complete,
        searched_to=None if reached is None else at(reached),
    )


def stream_after(
    c: sqlite3.Connection, after: int, limit: int, max_bytes: int | None = None
) -> list[tuple[int, EventRecord]]:
    """(stream position, event) of the events after position ``after``, oldest first; with
    ``max_bytes``, only as many as keep their bodies within it (at least one)."""
    found: list[tuple[int, EventRecord]] = []
    total = 0
    # Row by row: SQLite steps lazily, so the bodies past the budget are never read.
    for row in c.execute(Q["stream_after"], {"after": after, "limit": limit}):
        total += len(row["raw"])
        if found and max_bytes is not None and total > max_bytes:
            break
        found.append((row["stream_seq"], rows.event_record(row, at)))
    return found


def stream_head(c: sqlite3.Connection) -> int:
    """The position of the newest event ever stored (0 for none), pruned or not."""
    (last,) = c.execute(Q["stream_head"]).fetchone()
    return int(last)


def search_windowed(
    c: sqlite3.Connection,
    where: EventFilter,
    cursor: str | None,
    limit: int,
    now: datetime,
    budget: ScanBudget,
    bodies: bool = True,
    max_bytes: int | None = None,
) -> EventPage:
    """One page of ``searchsql.windowed_search``: its windows run in this one read
    transaction (one snapshot), on the reader thread; bodies as ``search_events``."""
    scan = windowed_search("sqlite", where, cursor=cursor, limit=limit, now=now, budget=budget)
    try:
        statement = next(scan)
        while True:
            statement = scan.send(c.execute(*statement).fetchall())
    except StopIteration as stop:
        page: WindowedPage = stop.value
    return _page(c, page, bodies, max_bytes)
