"""The admin's read path: a read-only connection on a thread of its own, beside the writer.

The writer (``writer.py``, ``process.py``) is one queue: a search that scans a million rows
there would hold every accept queued behind it, and intake waits on those commits. In WAL
mode readers and the writer do not block each other, so the admin's reads (search, listings,
one event, health) run here instead, on a connection that cannot write (``mode=ro`` and
``query_only``). SQLite releases the GIL while it steps through rows, so the scan itself does
not stall the event loop either.

A read that runs longer than ``READ_DEADLINE_SECONDS`` is interrupted (a progress handler)
and fails with ``StoreUnavailable``, so a pathological search ends instead of running on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ...errors import StoreUnavailable
from ..searchsql import register_sqlite_functions
from .operations import BUSY_TIMEOUT_MS
from .writer import run_job

T = TypeVar("T")
#: The longest one admin read may run before SQLite is told to stop it (seconds).
READ_DEADLINE_SECONDS = 20.0
# The progress handler runs every this many virtual-machine steps (cheap: a clock read).
_PROGRESS_STEPS = 10_000


def connect_reader(path: str) -> sqlite3.Connection:
    """A read-only connection to an existing database file (the writer created and migrated
    it), usable from the reader thread."""
    uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = 1")
        register_sqlite_functions(conn)  # search_sql's match calls them
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"Cannot open the SQLite database {path} to read: {exc}") from exc
    conn.row_factory = sqlite3.Row
    return conn


class Reader:
    """One read-only connection served by one thread; ``run(fn, *args)`` runs
    ``fn(conn, *args)`` in a read transaction there. Reads queue behind each other, never
    behind the writer."""

    def __init__(self, path: str, *, deadline_seconds: float = READ_DEADLINE_SECONDS) -> None:
        self.path = path
        self.deadline_seconds = deadline_seconds
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._deadline = 0.0

    async def start(self) -> None:
        """Open the connection on the reader thread."""
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lacuna-sqlite-reader")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(
                pool, connect_reader, self.path
            )
        except BaseException:
            pool.shutdown(wait=False)
            raise
        self._conn.set_progress_handler(self._past_deadline, _PROGRESS_STEPS)
        self._pool = pool

    async def stop(self) -> None:
        """Interrupt a running read (it fails with ``StoreUnavailable``), then close."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.interrupt()  # thread-safe: ends the statement the reader thread is stepping
            await asyncio.get_running_loop().run_in_executor(pool, conn.close)
        pool.shutdown(wait=True)

    def _past_deadline(self) -> int:
        # Non-zero makes SQLite interrupt the statement (sqlite3.OperationalError).
        return 1 if time.monotonic() > self._deadline else 0

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable("The event store (SQLite) is closed.")
        self._deadline = time.monotonic() + self.deadline_seconds
        return run_job(conn, fn, args, write=False)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in a read transaction on the reader thread; ``StoreUnavailable``
        when closed, on a database error, or past the deadline."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable("The event store (SQLite) is not open.")
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._call, fn, args)
        except RuntimeError as exc:  # the pool was shut down by a concurrent stop()
            raise StoreUnavailable("The event store (SQLite) is closed.") from exc


__all__ = ["READ_DEADLINE_SECONDS", "Reader", "connect_reader"]
