"""The one thread that owns the SQLite connection, and group commit.

SQLite has one writer at a time and each durable commit costs an fsync, so the
store funnels every operation through one thread:

- ``accept`` requests are *group-committed*: the thread takes everything
  queued (up to ``MAX_BATCH``), writes it in one transaction (one fsync for
  the whole batch) and then settles all the waiting
  futures with a single ``call_soon_threadsafe``. Under load the batch grows
  with the number of concurrent requests, so the fsync cost per request falls.
- any other operation is a callable run in a transaction of its own.

A failed batch fails every waiter in it with ``StoreUnavailable``: no caller
is ever told an event is stored when its transaction did not commit. A batch
that fails on one row's values is split, so only that row fails
(``write_batch``). Once the
store is closed, or the thread has died, every call raises
``StoreUnavailable`` at once instead of waiting forever.

The writer belongs to the event loop that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ...errors import StoreUnavailable

logger = logging.getLogger(__name__)

MAX_BATCH = 512

RowT = TypeVar("RowT")
T = TypeVar("T")

#: (future, result, exception): how one request ended, settled on the event loop.
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


@dataclass(slots=True, eq=False)
class _Accept(Generic[RowT]):
    row: RowT
    future: asyncio.Future[bool]


@dataclass(slots=True, eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    write: bool
    future: asyncio.Future[Any]


class _Stop:
    """Queued by ``stop()``: everything queued before it is still served."""


_STOP = _Stop()


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


def unavailable(exc: BaseException, what: str) -> StoreUnavailable:
    """The ``StoreUnavailable`` a caller sees for a database failure (the cause is chained)."""
    error = StoreUnavailable(f"The event store is unavailable ({what}: {exc}); retry later.")
    error.__cause__ = exc
    return error


def _settle(outcomes: Sequence[_Outcome]) -> None:
    """Resolve futures on their loop. A waiter that was cancelled meanwhile is skipped."""
    for future, result, exc in outcomes:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class Writer(Generic[RowT]):
    """Runs ``connect`` once, then serves ``accept`` batches and jobs until ``stop()``.

    ``accept_batch(conn, rows)`` writes the rows in one transaction of its own,
    committed before it returns, and returns one ``bool`` per row (``True``:
    stored, ``False``: duplicate). If it raises, nothing of the batch is stored.
    """

    def __init__(
        self,
        *,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        accept_batch: Callable[[sqlite3.Connection, list[RowT]], list[bool]],
    ) -> None:
        self._name = name
        self._connect = connect
        self._accept_batch = accept_batch
        self._queue: queue.SimpleQueue[_Accept[RowT] | _Job | _Stop] = queue.SimpleQueue()
        # Guards _state and the queue together: nothing is queued after _STOP, and nothing
        # is queued once the thread has drained the queue for the last time.
        self._lock = threading.Lock()
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self.batches = 0  # committed accept batches, for measurements and tests
        self.batched = 0  # accepts in them

    @property
    def queued(self) -> int:
        """Requests waiting for the thread right now (approximate, as any queue size)."""
        return self._queue.qsize()

    async def start(self) -> None:
        """Start the thread; return once ``connect`` succeeded, or raise what it raised."""
        with self._lock:
            if self._state is not _State.NEW:
                raise StoreUnavailable("The event store was already opened once.")
            self._state = _State.RUNNING
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopped = loop.create_future()
        ready: asyncio.Future[None] = loop.create_future()
        thread = threading.Thread(target=self._main, args=(ready,), name=self._name, daemon=True)
        thread.start()
        await ready

    async def stop(self) -> None:
        """Serve what is already queued, close the connection and end the thread."""
        with self._lock:
            if self._state is _State.RUNNING:
                self._state = _State.STOPPED
                self._queue.put(_STOP)
        if self._stopped is not None:
            await asyncio.shield(self._stopped)

    async def accept(self, row: RowT) -> bool:
        """Write ``row`` in the next group commit; ``True`` if it was new."""
        return await self.accept_soon(row)

    def accept_soon(self, row: RowT) -> asyncio.Future[bool]:
        """``accept`` as a future (``ProcessWriter.accept_soon``)."""
        future: asyncio.Future[bool] = self._future()
        self._put(_Accept(row, future))
        return future

    async def run(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """Run ``fn(conn, *args)`` on the writer thread in a transaction of its own."""
        future: asyncio.Future[T] = self._future()
        self._put(_Job(fn, args, write, future))
        return await future

    # --- the event-loop side ---------------------------------------------------------------

    def _future(self) -> asyncio.Future[Any]:
        if self._loop is None:
            raise StoreUnavailable("The event store is not open.")
        return self._loop.create_future()

    def _put(self, item: _Accept[RowT] | _Job) -> None:
        with self._lock:
            if self._state is not _State.RUNNING:
                raise StoreUnavailable("The event store is closed.")
            self._queue.put(item)

    # --- the writer thread -----------------------------------------------------------------

    def _post(self, outcomes: Sequence[_Outcome]) -> None:
        """Hand outcomes to the loop in one wake-up."""
        if not outcomes or self._loop is None:
            return
        # RuntimeError: the loop is closed, so nobody is left waiting.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, outcomes)

    def _main(self, ready: asyncio.Future[None]) -> None:
        conn: sqlite3.Connection | None = None
        reported = False
        try:
            try:
                conn = self._connect()
            except StoreUnavailable as exc:
                reported = True
                self._post([(ready, None, exc)])
                return
            reported = True
            self._post([(ready, None, None)])
            self._serve(conn)
        finally:
            if not reported:
                # connect() died of something unexpected: open() must not wait forever.
                self._post([(ready, None, StoreUnavailable("The event store failed to open."))])
            with self._lock:
                self._state = _State.STOPPED
                leftovers: list[_Outcome] = []
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(item, _Stop):
                        leftovers.append(
                            (item.future, None, StoreUnavailable("The event store is closed."))
                        )
            self._post(leftovers)
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    logger.warning("store.sqlite.close_failed: %s", exc)
            if self._stopped is not None:
                self._post([(self._stopped, None, None)])

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < MAX_BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            accepts = [item for item in items if isinstance(item, _Accept)]
            if accepts:
                self._post(self._commit_accepts(conn, accepts))
            outcomes: list[_Outcome] = []
            stop = False
            for item in items:
                if isinstance(item, _Job):
                    outcomes.append(self._run_job(conn, item))
                elif isinstance(item, _Stop):
                    stop = True
            self._post(outcomes)
            if stop:
                return

    def _commit_accepts(
        self, conn: sqlite3.Connection, accepts: list[_Accept[RowT]]
    ) -> list[_Outcome]:
        try:
            stored = write_batch(conn, self._accept_batch, [item.row for item in accepts])
        except StoreUnavailable as error:
            logger.error("store.sqlite.batch_failed: %d accepts: %s", len(accepts), error.__cause__)
            return [(item.future, None, _copy(error)) for item in accepts]
        self.batches += 1
        self.batched += len(accepts)
        return [
            (item.future, None, RowRefused(new))
            if isinstance(new, str)
            else (item.future, new, None)
            for item, new in zip(accepts, stored, strict=True)
        ]

    def _run_job(self, conn: sqlite3.Connection, job: _Job) -> _Outcome:
        try:
            return (job.future, run_job(conn, job.fn, job.args, write=job.write), None)
        # Forwarded to the awaiting coroutine and raised there, as concurrent.futures does
        # (StoreUnavailable, EventNotFound from a job, or a bug): the thread keeps serving.
        except Exception as exc:
            return (job.future, None, exc)


def _copy(error: StoreUnavailable) -> StoreUnavailable:
    """One exception object per waiter (a shared one would collect every waiter's traceback)."""
    copy = StoreUnavailable(error.message)
    copy.__cause__ = error.__cause__
    return copy


# How one batch and one job end, for either writer (the thread here, or the child process).


#: Errors that belong to one row's values (a value the column or the driver refuses), not to
#: the database: a batch failing with one of these is retried row by row.
ROW_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    OverflowError,
    ValueError,
    TypeError,
)


class WatchedConnection(sqlite3.Connection):
    """The writer's connection, which can tell whether the files it writes are still the
    ones at their paths. Deleted (or replaced) under a running `serve`, the database went on
    taking commits into an unlinked file: every event answered 200 and lost at the next
    start, which created a new, empty database (the `rm -rf` of a data folder, a cleanup
    job, a volume swapped). ``check_files`` after each write turns that into 503s."""

    files: tuple[tuple[str, int, int], ...] = ()
    gone_logged = False

    def watch(self, path: str) -> None:
        """Remember the identity (device, inode) of ``path`` and of its WAL (when it exists:
        it does once a transaction has run, and lives as long as this connection)."""
        files = []
        # The WAL is named after the database's real path (SQLite resolves a symbolic link;
        # `<link>-wal` does not exist), the database itself by the path serve was given.
        for name in (path, os.path.realpath(path) + "-wal"):
            with contextlib.suppress(OSError):
                files.append((name, *_identity(name)))
        self.files = tuple(files)

    def check_files(self) -> None:
        """``StoreUnavailable`` when the database or its WAL no longer is the file at its
        path (removed, or another put there): what was committed since is in a file that
        no other process can open, and goes with this one."""
        for name, device, inode in self.files:
            try:
                same = _identity(name) == (device, inode)
            except OSError:
                same = False
            if not same:
                if not self.gone_logged:
                    self.gone_logged = True
                    logger.error("store.sqlite.file_gone: %s was removed or replaced", name)
                # The path is in the log line, not in the answer a sender reads.
                raise StoreUnavailable(
                    "The event store's database file was removed or replaced while it was "
                    "open: nothing written since is kept; it needs a restart."
                )


def _identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def check_files(conn: sqlite3.Connection) -> None:
    """``conn.check_files()`` for the writer's connection (see ``WatchedConnection``)."""
    if isinstance(conn, WatchedConnection):
        conn.check_files()


class RowRefused(StoreUnavailable):
    """One accept failed on its own values while the rest of its batch committed (a 503: the
    store could not keep it). ``Event.from_body`` refuses every value known to do this."""


def write_batch(
    conn: sqlite3.Connection,
    accept_batch: Callable[[sqlite3.Connection, list[RowT]], list[bool]],
    rows: list[RowT],
) -> list[bool | str]:
    """``accept_batch(conn, rows)``: per row ``True`` (stored), ``False`` (duplicate) or the
    message of why that row alone failed.

    When the batch fails on one row's values (``ROW_ERRORS``), it is rolled back and each row
    is written in a transaction of its own, so that one unstorable event never fails the
    events group-committed with it. Any other failure (locked, full, read-only or broken
    file) fails the whole batch: roll back and raise ``StoreUnavailable``; nobody may hear
    "stored" for an uncommitted event, and the writer must survive.
    """
    try:
        outcomes: list[bool | str] = list(accept_batch(conn, rows))
    except ROW_ERRORS as exc:
        rollback(conn)
        if len(rows) == 1:
            logger.error("store.sqlite.row_refused: %s", exc)
            return [f"The event store cannot keep this event ({type(exc).__name__}: {exc})."]
        first_error: BaseException = exc
    except Exception as exc:
        rollback(conn)
        raise unavailable(exc, "SQLite") from exc
    else:
        check_files(conn)  # committed, but into the file at the path? else nobody hears 200
        return outcomes
    logger.warning("store.sqlite.batch_split: %d accepts: %s", len(rows), first_error)
    outcomes = []
    for row in rows:
        outcomes += write_batch(conn, accept_batch, [row])
    return outcomes


def run_job(
    conn: sqlite3.Connection, fn: Callable[..., T], args: tuple[Any, ...], *, write: bool
) -> T:
    """``fn(conn, *args)`` in a transaction of its own; a database error is
    ``StoreUnavailable``, anything else (``EventNotFound``, a bug) is raised as it is."""
    try:
        result = transaction(conn, fn, *args, write=write)
    except sqlite3.Error as exc:
        raise unavailable(exc, "SQLite") from exc
    if write:
        check_files(conn)
    return result


def transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any, write: bool) -> T:
    """Run ``fn(conn, *args)`` between ``BEGIN`` and ``COMMIT``; roll back if anything fails.

    Writes take the write lock up front (``IMMEDIATE``) so they never fail half-way on a
    lock upgrade; another process holding it is waited for up to the busy timeout.
    """
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return result


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.warning("store.sqlite.rollback_failed: %s", exc)
