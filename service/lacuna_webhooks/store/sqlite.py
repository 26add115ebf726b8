"""The embedded backend: one SQLite file in WAL mode, written by one writer with group commit.

Every operation runs on the writer, each in a transaction of its own;
``accept`` calls are batched into one transaction and one fsync. The writer is
a thread of this process (``sqlite_writer.Writer``, the default) or, for
``serve``, a child process (``sqlite_process.ProcessWriter``); the operations
are module-level functions of plain values so that either can run them. With
``synchronous=full`` (the default) a 2xx is only ever sent for an event whose
commit reached the disk; ``normal`` trades the last commits before a power
loss (never corruption) for fewer fsyncs.

Times are UTC-aware ``datetime`` at the API and epoch seconds (REAL) in the
file. The schema is migrated on ``open()`` from the numbered ``.sql`` files in
``store/sql/sqlite``, each applied once, in order, in a transaction, and
recorded in ``schema_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, NamedTuple, TypeVar

import orjson

from ..errors import EventNotFound, StoreUnavailable
from ..models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from .base import (
    AttemptRecord,
    DeliveryRecord,
    EventRecord,
    QueueStats,
    TaskRecord,
    attempt_error,
)
from .rules import CommitHealth, task_order
from .sqlite_process import ProcessWriter
from .sqlite_writer import RowRefused, Writer, transaction

BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
PRUNE_CHUNK = 500
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Group-commit figures since ``open()``: committed batches, the accepts in them, and
    the requests queued for the writer right now."""

    batches: int
    accepts: int
    queued: int


class _AcceptRow(NamedTuple):
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


def _epoch(value: datetime) -> float:
    if value.tzinfo is None:
        raise ValueError("store times must be timezone-aware (UTC)")
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _dt_or_none(value: float | None) -> datetime | None:
    return None if value is None else _dt(value)


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every packaged migration, in order."""
    folder = resources.files("lacuna_webhooks.store").joinpath("sql", "sqlite")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
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


# --- the hot path: one group-committed batch of accepts ----------------------------------------

_INSERT_EVENT = (
    "INSERT INTO events (id, type, created, received_at, task_id, raw)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)"
    " VALUES (?, ?, 'pending', ?, ?, ?) ON CONFLICT (event_id, handler) DO NOTHING"
)
# The WHERE keeps a newer state: an older event (late retry, out-of-order delivery) changes
# nothing, and rowcount 0 tells the caller to mark it superseded. Ties go to the later arrival.
_UPSERT_TASK = (
    "INSERT INTO tasks (task_id, status, event_id, event_type, event_created, event_order,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (task_id) DO UPDATE SET status = excluded.status,"
    " event_id = excluded.event_id, event_type = excluded.event_type,"
    " event_created = excluded.event_created, event_order = excluded.event_order,"
    " updated_at = excluded.updated_at"
    " WHERE tasks.event_order <= excluded.event_order"
)


def _accept_batch_rowwise(conn: sqlite3.Connection, rows: list[_AcceptRow]) -> list[bool]:
    """Write a batch inside the writer's transaction, one row at a time (SQLite < 3.35);
    the unique key on ``events.id`` decides new versus duplicate, also between two copies
    inside the same batch."""
    execute = conn.execute
    stored = []
    for row in rows:
        now = row.received_at
        if (
            execute(
                _INSERT_EVENT,
                (row.event_id, row.event_type, row.created, now, row.task_id, row.raw),
            ).rowcount
            != 1
        ):
            stored.append(False)
            continue
        if row.handlers:
            conn.executemany(
                _INSERT_DELIVERY, [(row.event_id, name, now, now, now) for name in row.handlers]
            )
        if row.task_id is not None:
            order = row.order
            task = (
                row.task_id,
                row.task_status,
                row.event_id,
                row.event_type,
                row.created,
                order,
                now,
            )
            if execute(_UPSERT_TASK, task).rowcount == 0:
                execute("UPDATE events SET superseded = 1 WHERE id = ?", (row.event_id,))
        stored.append(True)
    return stored


# The batch as one statement. Each SQLite call releases and retakes the GIL, and under load
# the request path holds it: the writer then waits up to a switch interval at every retake.
# So a whole batch is one multi-row INSERT into a TEMP view whose INSTEAD OF trigger does, for
# each row in order, exactly what ``_accept_batch_rowwise`` does, and records whether the
# event was new; in autocommit that one statement is its own transaction (commit and fsync
# included). One more statement reads the outcomes back. Created per connection, on the
# writer's connection only; nothing of it is stored in the database file.
_BATCH_SCHEMA = (
    "CREATE TEMP TABLE IF NOT EXISTS accept_outcome"
    " (slot INTEGER PRIMARY KEY, stored INTEGER NOT NULL)",
    "CREATE TEMP VIEW IF NOT EXISTS accept_batch AS SELECT NULL AS slot, NULL AS id,"
    " NULL AS type, NULL AS created, NULL AS received_at, NULL AS task_id,"
    " NULL AS task_status, NULL AS raw, NULL AS handlers, NULL AS event_order",
    """CREATE TEMP TRIGGER IF NOT EXISTS accept_batch_row INSTEAD OF INSERT ON accept_batch
BEGIN
    INSERT INTO events (id, type, created, received_at, task_id, raw)
        VALUES (NEW.id, NEW.type, NEW.created, NEW.received_at, NEW.task_id, NEW.raw)
        ON CONFLICT (id) DO NOTHING;
    -- changes() is the count of the trigger's latest statement: 1 stored, 0 duplicate
    INSERT OR REPLACE INTO accept_outcome (slot, stored) VALUES (NEW.slot, changes());
    INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)
        SELECT NEW.id, value, 'pending', NEW.received_at, NEW.received_at, NEW.received_at
        FROM json_each(NEW.handlers)
        WHERE (SELECT stored FROM accept_outcome WHERE slot = NEW.slot)
        ON CONFLICT (event_id, handler) DO NOTHING;
    INSERT INTO tasks (task_id, status, event_id, event_type, event_created, event_order,
                       updated_at)
        SELECT NEW.task_id, NEW.task_status, NEW.id, NEW.type, NEW.created,
               NEW.event_order, NEW.received_at
        WHERE NEW.task_id IS NOT NULL
          AND (SELECT stored FROM accept_outcome WHERE slot = NEW.slot)
        ON CONFLICT (task_id) DO UPDATE SET status = excluded.status,
            event_id = excluded.event_id, event_type = excluded.event_type,
            event_created = excluded.event_created, event_order = excluded.event_order,
            updated_at = excluded.updated_at
        WHERE tasks.event_order <= excluded.event_order;
    -- the upsert changed nothing: a newer state of the task was already stored
    UPDATE events SET superseded = 1
        WHERE changes() = 0 AND id = NEW.id AND NEW.task_id IS NOT NULL
          AND (SELECT stored FROM accept_outcome WHERE slot = NEW.slot);
END""",
)
_BATCH_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_BATCH_INSERT = (
    "INSERT INTO accept_batch"
    " (slot, id, type, created, received_at, task_id, task_status, raw, handlers, event_order)"
    " VALUES "
)
_BATCH_OUTCOMES = "SELECT json_group_object(slot, stored) FROM accept_outcome WHERE slot < ?"
# 10 parameters a row: the largest batch the writer forms stays under SQLite's variable limit.
_BATCH_MAX_ROWS = 3000


def _create_batch_schema(conn: sqlite3.Connection) -> None:
    for statement in _BATCH_SCHEMA:
        conn.execute(statement)


def _accept_batch_one_statement(conn: sqlite3.Connection, rows: list[_AcceptRow]) -> list[bool]:
    """Write a batch as one statement; in autocommit it commits (and fsyncs) by itself."""
    if len(rows) > _BATCH_MAX_ROWS:
        raise ValueError(f"at most {_BATCH_MAX_ROWS} accepts per batch")
    params: list[Any] = []
    for slot, r in enumerate(rows):
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
        )
    before = conn.total_changes
    conn.execute(_BATCH_INSERT + ",".join([_BATCH_ROW] * len(rows)), params)
    # The trigger's changes when every row is new: the event, its outcome, its deliveries,
    # and one for the task (upserted, or the event marked superseded). A duplicate makes
    # only its outcome row, so any duplicate shows as a shortfall; then read the outcomes.
    if conn.total_changes - before == sum(
        2 + len(r.handlers) + (r.task_id is not None) for r in rows
    ):
        return [True] * len(rows)
    (outcomes,) = conn.execute(_BATCH_OUTCOMES, (len(rows),)).fetchone()
    stored = orjson.loads(outcomes)
    return [bool(stored[str(slot)]) for slot in range(len(rows))]


_HANDLERS_JSON: dict[tuple[str, ...], str] = {}


def _handlers_json(handlers: tuple[str, ...]) -> str:
    """The JSON array of a handler list (there are only a few different lists: cached)."""
    text = _HANDLERS_JSON.get(handlers)
    if text is None:
        text = orjson.dumps(list(handlers)).decode()
        if len(_HANDLERS_JSON) < 1024:
            _HANDLERS_JSON[handlers] = text
    return text


def _accept_batch_in_transaction(conn: sqlite3.Connection, rows: list[_AcceptRow]) -> list[bool]:
    """The row-by-row twin, for SQLite builds without JSON functions (before 3.38)."""
    return transaction(conn, _accept_batch_rowwise, rows, write=True)


#: ``accept_batch(conn, rows)``: commits the batch itself, returns stored/duplicate per row.
def _row_size(row: _AcceptRow) -> int:
    return len(row.raw)


_HAS_JSON = sqlite3.sqlite_version_info >= (3, 38)
_accept_batch = _accept_batch_one_statement if _HAS_JSON else _accept_batch_in_transaction


# --- the rest of the statements ------------------------------------------------------------------

_CLAIM = (
    "UPDATE deliveries SET lease_until = ?, attempts = attempts + 1,"
    " lease_token = lease_token + 1, updated_at = ?"
    " WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending' AND handler = ?"
    " AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
    " ORDER BY next_attempt_at, id LIMIT ?)"
    " RETURNING id, event_id, handler, attempts, lease_token, next_attempt_at, created_at"
)
_FINISH = (
    "UPDATE deliveries SET status = ?, lease_until = NULL, next_attempt_at = ?,"
    " last_error = ?, updated_at = ?"
    " WHERE id = ? AND lease_token = ? AND status = 'pending' AND lease_until IS NOT NULL"
)
_INSERT_ATTEMPT = (
    "INSERT INTO attempts (delivery_id, attempt, started_at, finished_at, outcome, error,"
    " duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# Replay and retry_dead: pending, due now, a fresh attempt budget, and a new lease token so
# that a worker still running an old claim cannot record its outcome over the reset.
_REPLAY_ALL = (
    "UPDATE deliveries SET status = 'pending', attempts = 0, lease_token = lease_token + 1,"
    " lease_until = NULL, last_error = NULL, next_attempt_at = :now, updated_at = :now"
    " WHERE event_id = :event_id"
)
_REPLAY_ONE = (
    "INSERT INTO deliveries (event_id, handler, status, next_attempt_at, created_at, updated_at)"
    " VALUES (:event_id, :handler, 'pending', :now, :now, :now)"
    " ON CONFLICT (event_id, handler) DO UPDATE SET status = 'pending', attempts = 0,"
    " lease_token = lease_token + 1, lease_until = NULL, last_error = NULL,"
    " next_attempt_at = :now, updated_at = :now"
)
_RETRY_DEAD = (
    "UPDATE deliveries SET status = 'pending', attempts = 0, lease_token = lease_token + 1,"
    " lease_until = NULL, last_error = NULL, next_attempt_at = :now, updated_at = :now"
    " WHERE status = 'dead' AND (:handler IS NULL OR handler = :handler)"
)
_RAWS = "SELECT id, raw FROM events WHERE id IN (SELECT value FROM json_each(?))"
_PRUNABLE = (
    "SELECT id FROM events AS e WHERE received_at < ? AND NOT EXISTS"
    " (SELECT 1 FROM deliveries AS d WHERE d.event_id = e.id AND d.status = 'pending') LIMIT ?"
)
_PRUNE = (
    "DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id IN"
    " (SELECT value FROM json_each(:ids)))",
    "DELETE FROM deliveries WHERE event_id IN (SELECT value FROM json_each(:ids))",
    "DELETE FROM events WHERE id IN (SELECT value FROM json_each(:ids))",
)
_SELECT_EVENTS = "SELECT id, type, created, received_at, task_id, superseded, raw FROM events"
_LIST_EVENTS = _SELECT_EVENTS + " ORDER BY received_at DESC, rowid DESC LIMIT ?"
_LIST_EVENTS_OF_TYPE = (
    _SELECT_EVENTS + " WHERE type = ? ORDER BY received_at DESC, rowid DESC LIMIT ?"
)
_GET_EVENT = _SELECT_EVENTS + " WHERE id = ?"
_SELECT_DELIVERIES = (
    "SELECT d.id, d.event_id, e.type, d.handler, d.status, d.attempts, d.next_attempt_at,"
    " d.lease_until, d.last_error, d.created_at, d.updated_at"
    " FROM deliveries AS d JOIN events AS e ON e.id = d.event_id"
)
_STATS = (
    "SELECT count(*),"
    " count(*) FILTER (WHERE next_attempt_at <= :now AND coalesce(lease_until, 0) <= :now),"
    " count(*) FILTER (WHERE lease_until > :now),"
    " min(next_attempt_at) FILTER"
    " (WHERE next_attempt_at <= :now AND coalesce(lease_until, 0) <= :now)"
    " FROM deliveries WHERE status = 'pending'"
)

_EventRow = tuple[str, str, int | None, float, str | None, int, bytes]
_DeliveryRow = tuple[int, str, str, str, str, int, float, float | None, str | None, float, float]


def _event_record(row: _EventRow) -> EventRecord:
    event_id, event_type, created, received_at, task_id, superseded, raw = row
    return EventRecord(
        id=event_id,
        type=event_type,
        created=created,
        received_at=_dt(received_at),
        task_id=task_id,
        superseded=bool(superseded),
        raw=bytes(raw),
    )


def _delivery_record(row: _DeliveryRow) -> DeliveryRecord:
    return DeliveryRecord(
        id=row[0],
        event_id=row[1],
        event_type=row[2],
        handler=row[3],
        status=DeliveryStatus(row[4]),
        attempts=row[5],
        next_attempt_at=_dt(row[6]),
        lease_until=_dt_or_none(row[7]),
        last_error=row[8],
        created_at=_dt(row[9]),
        updated_at=_dt(row[10]),
    )


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
    try:
        os.makedirs(os.path.dirname(where), mode=0o700, exist_ok=True)
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
        migrate(conn)
        if _HAS_JSON:
            _create_batch_schema(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"Cannot use the SQLite database {where}: {exc}") from exc
    except StoreUnavailable:
        conn.close()
        raise
    return conn


# --- the operations, run by the writer ------------------------------------------------------
# Module-level functions of plain arguments: a writer process receives them pickled.


def _ping(c: sqlite3.Connection) -> None:
    c.execute("SELECT max(version) FROM schema_version").fetchone()


def _probe_write(c: sqlite3.Connection, at: float) -> None:
    c.execute("INSERT OR REPLACE INTO write_probe (id, written_at) VALUES (1, ?)", (at,))


def _diagnostics(c: sqlite3.Connection) -> dict[str, object]:
    values: dict[str, object] = {
        name: c.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("journal_mode", "synchronous", "busy_timeout", "page_size")
    }
    (values["schema_version"],) = c.execute("SELECT max(version) FROM schema_version").fetchone()
    return values


_ClaimedRow = tuple[tuple[int, str, str, int, int, float, float], bytes]


def _claim(
    c: sqlite3.Connection, handler: str, limit: int, at: float, until: float
) -> list[_ClaimedRow]:
    rows = c.execute(_CLAIM, (until, at, handler, at, at, limit)).fetchall()
    if not rows:
        return []
    ids = orjson.dumps(sorted({row[1] for row in rows})).decode()
    raws: dict[str, bytes] = dict(c.execute(_RAWS, (ids,)))
    return [(row, raws[row[1]]) for row in rows]


def _finish(c: sqlite3.Connection, update: tuple[Any, ...], record: tuple[Any, ...]) -> bool:
    if c.execute(_FINISH, update).rowcount != 1:
        return False  # the lease was taken over (or the delivery reset): not ours
    c.execute(_INSERT_ATTEMPT, record)
    return True


def _release(c: sqlite3.Connection, at: float | None, delivery_id: int, lease_token: int) -> bool:
    cursor = c.execute(
        "UPDATE deliveries SET lease_until = NULL, attempts = max(attempts - 1, 0),"
        " lease_token = lease_token + 1, updated_at = coalesce(?, updated_at)"
        " WHERE id = ? AND lease_token = ? AND status = 'pending' AND lease_until IS NOT NULL",
        (at, delivery_id, lease_token),
    )
    return cursor.rowcount == 1


def _stats(c: sqlite3.Connection, at: float) -> QueueStats:
    pending, due, running, oldest = c.execute(_STATS, {"now": at}).fetchone()
    (dead,) = c.execute("SELECT count(*) FROM deliveries WHERE status = 'dead'").fetchone()
    return QueueStats(
        pending=pending,
        due=due,
        running=running,
        dead=dead,
        oldest_due_age_seconds=max(0.0, at - oldest) if oldest is not None else 0.0,
    )


def _prune_chunk(c: sqlite3.Connection, cutoff: float) -> int:
    ids = [row[0] for row in c.execute(_PRUNABLE, (cutoff, PRUNE_CHUNK))]
    if ids:
        args = {"ids": orjson.dumps(ids).decode()}
        for statement in _PRUNE:
            c.execute(statement, args)
    return len(ids)


def _list_events(c: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[EventRecord]:
    return [_event_record(row) for row in c.execute(sql, args)]


def _get_event(c: sqlite3.Connection, event_id: str) -> EventRecord | None:
    row = c.execute(_GET_EVENT, (event_id,)).fetchone()
    return None if row is None else _event_record(row)


def _list_deliveries(
    c: sqlite3.Connection, sql: str, args: tuple[Any, ...]
) -> list[DeliveryRecord]:
    return [_delivery_record(row) for row in c.execute(sql, args)]


def _list_attempts(c: sqlite3.Connection, delivery_id: int) -> list[AttemptRecord]:
    rows = c.execute(
        "SELECT delivery_id, attempt, started_at, finished_at, outcome, error"
        " FROM attempts WHERE delivery_id = ? ORDER BY id",
        (delivery_id,),
    )
    return [
        AttemptRecord(
            delivery_id=row[0],
            attempt=row[1],
            started_at=_dt(row[2]),
            finished_at=_dt(row[3]),
            outcome=AttemptOutcome(row[4]),
            error=row[5],
        )
        for row in rows
    ]


def _get_task(c: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    row = c.execute(
        "SELECT task_id, status, event_id, event_type, event_created, updated_at"
        " FROM tasks WHERE task_id = ?",
        (task_id,),
    ).fetchone()
    if row is None:
        return None
    return TaskRecord(
        task_id=row[0],
        status=row[1],
        event_id=row[2],
        event_type=row[3],
        event_created=row[4],
        updated_at=_dt(row[5]),
    )


def _replay(c: sqlite3.Connection, event_id: str, names: tuple[str, ...] | None, at: float) -> int:
    if c.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone() is None:
        raise EventNotFound(f"No event {event_id!r} in the store.")
    if names is None:
        return int(c.execute(_REPLAY_ALL, {"now": at, "event_id": event_id}).rowcount)
    count = 0
    for name in names:
        args = {"now": at, "event_id": event_id, "handler": name}
        count += c.execute(_REPLAY_ONE, args).rowcount
    return count


def _retry_dead(c: sqlite3.Connection, handler: str | None, at: float) -> int:
    return int(c.execute(_RETRY_DEAD, {"now": at, "handler": handler}).rowcount)


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
        self._writer: Writer[_AcceptRow] | ProcessWriter[_AcceptRow]
        if process:
            self._writer = ProcessWriter(
                name="lacuna-sqlite-writer",
                connect=connect,
                connect_args=(path, self.synchronous),
                accept_batch=_accept_batch,
                row_type=_AcceptRow._make,
                row_size=_row_size,
            )
        else:
            self._writer = Writer(
                name="lacuna-sqlite-writer",
                connect=functools.partial(connect, path, self.synchronous),
                accept_batch=_accept_batch,
            )
        self._work = asyncio.Event()
        self._health = CommitHealth()

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

    async def close(self) -> None:
        """Finish what is queued, then close the file. Later calls raise ``StoreUnavailable``."""
        await self._writer.stop()

    async def ping(self) -> None:
        """Return when the writer answers and writes commit; raise ``StoreUnavailable``.

        After a write failed for a reason of the database (``CommitHealth``: locked too
        long, full disk, read-only or broken file), a probe write must commit first.
        """
        if self._health.failure is None:
            await self._writer.run(_ping, write=False)
        else:
            await self._write(_probe_write, time.time())

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in a write transaction; its outcome is what ``ping`` reports."""
        try:
            result = await self._writer.run(fn, *args)
        except RowRefused:
            raise
        except StoreUnavailable as exc:
            self._health.failed(exc)
            raise
        self._health.committed()
        return result

    async def diagnostics(self) -> dict[str, object]:
        """What the connection actually runs with (for ``doctor``-style output and tests):
        journal mode, synchronous level (0 off, 1 normal, 2 full), busy timeout, page size and
        the schema version."""
        return await self._writer.run(_diagnostics, write=False)

    # --- intake ----------------------------------------------------------------------------------

    async def accept(self, event: Event, handlers: Sequence[str], *, now: datetime) -> bool:
        received_at = _epoch(now)
        row = _AcceptRow(
            event.id,
            event.type,
            event.created,
            received_at,
            event.task_id,
            event.task_status,
            event.raw,
            tuple(dict.fromkeys(handlers)),
            task_order(event.created, received_at),
        )
        try:
            stored = await self._writer.accept(row)
        except RowRefused:
            raise  # this event's own values: says nothing about the database
        except StoreUnavailable as exc:
            self._health.failed(exc)
            raise
        self._health.committed()
        if stored and row.handlers:
            self._work.set()
        return stored

    async def wait_for_work(self, timeout_seconds: float) -> None:
        """Return when an accept, replay or retry_dead of this process made work, or after the
        timeout. Other processes writing the same file are only seen through the timeout."""
        if not self._work.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), timeout_seconds)
        self._work.clear()

    # --- the dispatcher's side -------------------------------------------------------------

    async def claim(
        self, *, handler: str, limit: int, lease: timedelta, now: datetime
    ) -> list[Delivery]:
        if limit <= 0:
            return []
        claimed = await self._write(_claim, handler, limit, _epoch(now), _epoch(now + lease))
        # RETURNING gives no order: restore "oldest due first".
        claimed.sort(key=lambda item: (item[0][5], item[0][0]))
        return [
            Delivery(
                id=row[0],
                event=Event.from_body(bytes(raw)),
                handler=row[2],
                status=DeliveryStatus.PENDING,
                attempts=row[3],
                lease_token=row[4],
                next_attempt_at=_dt(row[5]),
                created_at=_dt(row[6]),
            )
            for row, raw in claimed
        ]

    async def _finish(
        self,
        delivery: Delivery,
        attempt: Attempt,
        *,
        status: DeliveryStatus,
        next_attempt_at: datetime,
    ) -> bool:
        started, finished = _epoch(attempt.started_at), _epoch(attempt.finished_at)
        error = attempt_error(attempt)
        update = (
            status.value,
            _epoch(next_attempt_at),
            error,
            finished,
            delivery.id,
            delivery.lease_token,
        )
        record = (
            delivery.id,
            delivery.attempts,
            started,
            finished,
            attempt.outcome.value,
            error,
            (finished - started) * 1000.0,
        )
        return await self._write(_finish, update, record)

    async def complete(self, delivery: Delivery, attempt: Attempt) -> bool:
        return await self._finish(
            delivery, attempt, status=DeliveryStatus.DONE, next_attempt_at=delivery.next_attempt_at
        )

    async def retry(self, delivery: Delivery, attempt: Attempt, *, at: datetime) -> bool:
        return await self._finish(
            delivery, attempt, status=DeliveryStatus.PENDING, next_attempt_at=at
        )

    async def dead(self, delivery: Delivery, attempt: Attempt) -> bool:
        return await self._finish(
            delivery, attempt, status=DeliveryStatus.DEAD, next_attempt_at=delivery.next_attempt_at
        )

    async def release(self, delivery: Delivery, *, now: datetime | None = None) -> bool:
        """Lease cleared, token moved on, the claim's attempt undone. ``next_attempt_at`` is left
        as it was: it was due when claimed, so it is due at once and keeps its place in line."""
        at = None if now is None else _epoch(now)
        released = await self._write(_release, at, delivery.id, delivery.lease_token)
        if released:
            self._work.set()
        return released

    async def stats(self, *, now: datetime) -> QueueStats:
        return await self._writer.run(_stats, _epoch(now), write=False)

    # --- maintenance and admin ---------------------------------------------------------------

    async def prune(self, *, received_before: datetime) -> int:
        """Deleted in chunks, each its own transaction, so accepts are never held up long."""
        cutoff = _epoch(received_before)
        total = 0
        while True:
            deleted = await self._write(_prune_chunk, cutoff)
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def list_events(
        self, *, limit: int = 50, event_type: str | None = None
    ) -> list[EventRecord]:
        sql, args = (
            (_LIST_EVENTS, (limit,))
            if event_type is None
            else (_LIST_EVENTS_OF_TYPE, (event_type, limit))
        )
        return await self._writer.run(_list_events, sql, args, write=False)

    async def get_event(self, event_id: str) -> EventRecord | None:
        return await self._writer.run(_get_event, event_id, write=False)

    async def list_deliveries(
        self,
        *,
        status: DeliveryStatus | None = None,
        handler: str | None = None,
        event_id: str | None = None,
        limit: int = 50,
    ) -> list[DeliveryRecord]:
        filters = (("d.status", status), ("d.handler", handler), ("d.event_id", event_id))
        where = " AND ".join(f"{column} = ?" for column, value in filters if value is not None)
        args = [str(value) for _, value in filters if value is not None]
        # Only the fixed column names above are spliced in; every value is a parameter.
        sql = (
            _SELECT_DELIVERIES
            + (f" WHERE {where}" if where else "")
            + " ORDER BY d.id DESC LIMIT ?"
        )
        return await self._writer.run(_list_deliveries, sql, (*args, limit), write=False)

    async def list_attempts(self, delivery_id: int) -> list[AttemptRecord]:
        return await self._writer.run(_list_attempts, delivery_id, write=False)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._writer.run(_get_task, task_id, write=False)

    async def replay(self, event_id: str, handlers: Sequence[str] | None, *, now: datetime) -> int:
        names = None if handlers is None else tuple(dict.fromkeys(handlers))
        count = await self._write(_replay, event_id, names, _epoch(now))
        if count:
            self._work.set()
        return count

    async def retry_dead(self, *, handler: str | None, now: datetime) -> int:
        count = await self._write(_retry_dead, handler, _epoch(now))
        if count:
            self._work.set()
        return count


__all__ = ["SQLiteStore", "WriterStats", "connect", "migrate", "migrations"]
