"""What the SQLite writer runs: opening and migrating the file, the group-committed accept
batch, and every other operation as a module-level function of plain values.

Module-level so that the writer process (``process.py``) receives them pickled; each runs
in a transaction of its own (``writer.transaction``), except the accept batch, one
statement that commits itself. The statements are the named queries of
``store/sql/sqlite/queries.sql``; rows are mapped to records by column name
(``sqlite3.Row``, ``store/rows.py``) inside the writer, so only records travel back.
Times are epoch seconds (REAL) in the file.

Supported: SQLite 3.35 or later with its JSON functions (``RETURNING`` and ``json_each``
are used throughout; built in since 3.38, compiled in by every common distribution
before). ``connect`` refuses anything less with one clear line.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple

import orjson

from ...errors import EventNotFound, StoreUnavailable
from ...models import Delivery
from .. import rows
from ..base import (
    AttemptRecord,
    DeliveryRecord,
    EventFilter,
    EventPage,
    EventRecord,
    HandlerActivity,
    HandlerState,
    QueueStats,
    ScanBudget,
    TaskRecord,
)
from ..queries import load
from ..searchsql import next_cursor, register_sqlite_functions, windowed_search
from .writer import transaction

BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
PRUNE_CHUNK = 500
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


def epoch(value: datetime) -> float:
    """A store time as epoch seconds; ``ValueError`` for a naive datetime."""
    if value.tzinfo is None:
        raise ValueError("store times must be timezone-aware (UTC)")
    return value.timestamp()


def at(value: float) -> datetime:
    """An epoch-seconds column as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


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


def _statements(script: str) -> list[str]:
    """Split a script into statements (executescript would commit our transaction)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip() and not pending.strip().startswith("--"):
        statements.append(pending.strip())
    return statements


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
            for statement in _statements(script):
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
    # counter, its deliveries, and one for the task (upserted, or the event marked
    # superseded). A duplicate makes only its outcome row, so any duplicate shows as a
    # shortfall; then read the outcomes.
    if conn.total_changes - before == sum(
        3 + len(r.handlers) + (r.task_id is not None) for r in batch
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
    file keeps the mode its operator gave it."""
    try:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
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
        conn = sqlite3.connect(where, isolation_level=None, cached_statements=256)
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
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"Cannot use the SQLite database {where}: {exc}") from exc
    except StoreUnavailable:
        conn.close()
        raise
    return conn


# --- the operations, run by the writer ------------------------------------------------------
# Module-level functions of plain arguments: a writer process receives them pickled.


def ping(c: sqlite3.Connection) -> None:
    c.execute(Q["ping"]).fetchone()


def probe_write(c: sqlite3.Connection, now: float) -> None:
    c.execute(Q["write_probe"], {"now": now})


def diagnostics(c: sqlite3.Connection) -> dict[str, object]:
    values: dict[str, object] = {
        name: c.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "busy_timeout", "page_size")
    }
    (values["schema_version"],) = c.execute(Q["ping"]).fetchone()
    return values


def claim(
    c: sqlite3.Connection,
    handler: str,
    limit: int,
    now: float,
    until: float,
    after: tuple[str, ...] = (),
) -> list[Delivery]:
    """The claimed deliveries, oldest due first (RETURNING gives no order: sorted here);
    ``after`` holds back those whose event has a pending delivery of one of those handlers."""
    args = {
        "handler": handler,
        "limit": limit,
        "now": now,
        "until": until,
        "after": orjson.dumps(list(after)).decode() if after else "[]",
    }
    claimed = [rows.claimed_delivery(row, at) for row in c.execute(Q["claim"], args)]
    claimed.sort(key=lambda d: (d.next_attempt_at, d.id))
    return claimed


def finish(c: sqlite3.Connection, update: dict[str, Any], attempt: dict[str, Any]) -> bool:
    """Record an outcome and its attempt, if the claim is still the live one."""
    if c.execute(Q["finish"], update).rowcount != 1:
        # The lease was taken over, released or reset: not ours. Reset (replayed) while it
        # ran, the lease was kept so nobody ran it beside this attempt: end it now.
        c.execute(Q["end_revoked"], {"id": update["id"], "lease_token": update["lease_token"]})
        return False
    c.execute(Q["insert_attempt"], attempt)
    return True


def release(c: sqlite3.Connection, now: float | None, delivery_id: int, lease_token: int) -> bool:
    args = {"now": now, "id": delivery_id, "lease_token": lease_token}
    if c.execute(Q["release"], args).rowcount == 1:
        return True
    # Revoked by a reset while it was held: end the lease the reset kept (see finish).
    c.execute(Q["end_revoked"], {"id": delivery_id, "lease_token": lease_token})
    return False


def stats(c: sqlite3.Connection, now: float) -> QueueStats:
    by_handler: dict[str, QueueStats] = {}
    for row in c.execute(Q["stats"], {"now": now}):
        oldest = row["oldest_due"]
        part = QueueStats(
            pending=row["pending"],
            due=row["due"],
            running=row["running"],
            dead=row["dead"],
            oldest_due_age_seconds=max(0.0, now - oldest) if oldest is not None else 0.0,
        )
        seen = by_handler.get(row["handler"])
        if seen is not None:  # its dead count, after its pending counts: one of them is 0
            part = replace(seen, dead=seen.dead + part.dead)
        by_handler[row["handler"]] = part
    return QueueStats.combine(dict(sorted(by_handler.items())))


def prune_chunk(c: sqlite3.Connection, cutoff: float) -> int:
    ids = [row["id"] for row in c.execute(Q["prunable"], {"cutoff": cutoff, "limit": PRUNE_CHUNK})]
    if ids:
        args = {"ids": orjson.dumps(ids).decode()}
        for name in ("prune_attempts", "prune_deliveries", "prune_events"):
            c.execute(Q[name], args)
    return len(ids)


def list_events(c: sqlite3.Connection, event_type: str | None, limit: int) -> list[EventRecord]:
    args = {"type": event_type, "limit": limit}
    return [rows.event_record(row, at) for row in c.execute(Q["list_events"], args)]


def get_event(c: sqlite3.Connection, event_id: str) -> EventRecord | None:
    row = c.execute(Q["get_event"], {"id": event_id}).fetchone()
    return None if row is None else rows.event_record(row, at)


def search_events(
    c: sqlite3.Connection, sql: str, params: list[Any], limit: int
) -> tuple[list[EventRecord], str | None]:
    """One page of ``searchsql.search_sql``'s statement (it asks for ``limit + 1`` rows) and
    the cursor of the next page, or ``None``."""
    found = c.execute(sql, params).fetchall()
    page = found[:limit]
    cursor = None
    if len(found) > limit and page:
        cursor = next_cursor("sqlite", page[-1]["received_at"], page[-1]["seq"])
    return [rows.event_record(row, at) for row in page], cursor


def stream_after(c: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, EventRecord]]:
    """(stream position, event) of the events after position ``after``, oldest first."""
    return [
        (row["stream_seq"], rows.event_record(row, at))
        for row in c.execute(Q["stream_after"], {"after": after, "limit": limit})
    ]


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
) -> EventPage:
    """One page of ``searchsql.windowed_search``: its windows run in this one read
    transaction (one snapshot), on the reader thread."""
    scan = windowed_search("sqlite", where, cursor=cursor, limit=limit, now=now, budget=budget)
    try:
        statement = next(scan)
        while True:
            statement = scan.send(c.execute(*statement).fetchall())
    except StopIteration as stop:
        found, cursor_next, complete, reached = stop.value
    return EventPage(
        [rows.event_record(row, at) for row in found],
        cursor_next,
        complete=complete,
        searched_to=None if reached is None else at(reached),
    )


def list_deliveries(c: sqlite3.Connection, args: dict[str, Any]) -> list[DeliveryRecord]:
    return [rows.delivery_record(row, at) for row in c.execute(Q["list_deliveries"], args)]


def handler_activity(c: sqlite3.Connection, now: float, since: float) -> list[HandlerActivity]:
    """Every handler's queue and recent attempts (three statements in one read snapshot)."""
    found: dict[str, dict[str, Any]] = {}
    for row in c.execute(Q["handler_queue"], {"now": now}):
        counts = found.setdefault(row["handler"], {})
        for name in ("running", "due", "waiting", "dead"):
            counts[name] = counts.get(name, 0) + row[name]
    for row in c.execute(Q["handler_attempts"], {"since": since}):
        found.setdefault(row["handler"], {}).update(
            attempts=row["attempts"],
            succeeded=row["succeeded"],
            p50_seconds=row["p50_seconds"],
            p95_seconds=row["p95_seconds"],
        )
    for row in c.execute(Q["handler_last_errors"], {"since": since}):
        found.setdefault(row["handler"], {}).update(
            last_error=row["last_error"], last_error_at=at(row["last_error_at"])
        )
    return [HandlerActivity(handler=name, **found[name]) for name in sorted(found)]


def list_attempts(c: sqlite3.Connection, delivery_id: int) -> list[AttemptRecord]:
    cursor = c.execute(Q["list_attempts"], {"delivery_id": delivery_id})
    return [rows.attempt_record(row, at) for row in cursor]


def get_task(c: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    row = c.execute(Q["get_task"], {"task_id": task_id}).fetchone()
    return None if row is None else rows.task_record(row, at)


def replay(c: sqlite3.Connection, event_id: str, names: tuple[str, ...] | None, now: float) -> int:
    if c.execute(Q["event_exists"], {"event_id": event_id}).fetchone() is None:
        raise EventNotFound(f"No event {event_id!r} in the store.")
    if names is None:
        return int(c.execute(Q["replay_all"], {"now": now, "event_id": event_id}).rowcount)
    count = 0
    for name in names:
        args = {"now": now, "event_id": event_id, "handler": name}
        count += c.execute(Q["replay_handler"], args).rowcount
    return count


def replay_many(
    c: sqlite3.Connection,
    event_ids: tuple[str, ...],
    names: tuple[str, ...] | None,
    create: bool,
    reset: bool,
    now: float,
) -> tuple[int, int]:
    """``(created, reset)``: reset first, so the deliveries created next are not counted
    twice; a plain tuple crosses the writer process's pipe."""
    ids = orjson.dumps(list(event_ids)).decode()
    reset_count = created = 0
    if names is None:
        if reset:
            reset_count = c.execute(Q["replay_many_all"], {"now": now, "ids": ids}).rowcount
        return 0, int(reset_count)
    handlers = orjson.dumps(list(names)).decode()
    args = {"now": now, "ids": ids, "handlers": handlers}
    if reset:
        reset_count = c.execute(Q["replay_many_reset"], args).rowcount
    if create:
        created = c.execute(Q["replay_many_create"], args).rowcount
    return int(created), int(reset_count)


def retry_dead(c: sqlite3.Connection, handler: str | None, now: float) -> int:
    return int(c.execute(Q["retry_dead"], {"now": now, "handler": handler}).rowcount)


def set_paused(
    c: sqlite3.Connection, handler: str, paused: bool, reason: str | None, now: float
) -> bool:
    if paused:
        cursor = c.execute(Q["pause"], {"handler": handler, "reason": reason, "now": now})
    else:
        cursor = c.execute(Q["resume"], {"handler": handler, "now": now})
    return cursor.fetchone() is not None


def handler_states(c: sqlite3.Connection, paused_only: bool) -> list[HandlerState]:
    query = Q["paused_handlers"] if paused_only else Q["handler_states"]
    return [rows.handler_state(row, at) for row in c.execute(query)]


def count_failure(
    c: sqlite3.Connection, handler: str, pause_after: int | None, reason: str, now: float
) -> bool:
    """Count a failure; pause the handler when the count reaches ``pause_after``."""
    failures, paused = c.execute(Q["count_failure"], {"handler": handler, "now": now}).fetchone()
    if paused or pause_after is None or failures < pause_after:
        return False
    return set_paused(c, handler, True, reason, now)


def count_success(c: sqlite3.Connection, handler: str, now: float) -> None:
    c.execute(Q["count_success"], {"handler": handler, "now": now})


def take_tokens(
    c: sqlite3.Connection, handler: str, want: int, capacity: float, per_second: float, now: float
) -> int:
    """Refill the bucket, then take up to ``want`` whole tokens, in one transaction."""
    args = {"handler": handler, "capacity": capacity, "rate": per_second, "now": now}
    (tokens,) = c.execute(Q["refill_tokens"], args).fetchone()
    taken: int = max(0, min(want, math.floor(float(tokens))))
    if taken:
        c.execute(Q["spend_tokens"], {"handler": handler, "capacity": capacity, "count": taken})
    return taken


def give_back_tokens(c: sqlite3.Connection, handler: str, count: int, capacity: float) -> None:
    c.execute(Q["spend_tokens"], {"handler": handler, "capacity": capacity, "count": -count})
