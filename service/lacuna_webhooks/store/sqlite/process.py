"""The SQLite writer in a process of its own: what ``serve`` runs.

Same contract as the thread of ``writer.Writer`` (group-committed
accepts, any other operation in a transaction of its own, ``StoreUnavailable``
for every waiter of a failed batch), with the connection in a child process.
The request path and the writer then never wait for each other's GIL, which on
the intake path measured about a fifth more accepted events per second
(``make bench``, README).

- Group commit: while the child commits one batch, accepts gather here; the
  next batch (up to ``MAX_BATCH``) leaves as soon as the previous one is
  answered. An accept is answered only from the child's reply, sent after
  its commit returned.
- Wire: frames of a 4-byte big-endian length and a pickle, over a private
  socket pair. Operations are module-level functions and plain values; the
  child answers every request in the order received.
- The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a service
  manager reaches the whole process group, and the parent still needs the
  store while it drains); it exits when the socket closes, and the kernel kills
  it when the parent dies (a stopped or stuck child never reads the socket's end).
- If the child dies, everything in flight fails with ``StoreUnavailable``
  (a 503, never a 2xx for an event whose commit was not confirmed), the parent
  logs it and starts a new child, retrying with backoff; calls made meanwhile
  raise ``StoreUnavailable`` at once. A child that leaves a request unanswered
  for ``STALL_SECONDS`` (stopped, or stuck on a hung disk) is killed, to the same
  effect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import os
import pickle
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ... import logs
from ...child import die_with_parent, frame, read_frame, read_frame_blocking, start_child
from ...errors import StoreUnavailable
from ...redact import secret_values
from .checkpoint import Checkpointer, is_disk_full
from .writer import MAX_BATCH, RowRefused, run_job, write_batch

logger = logging.getLogger(__name__)

RowT = TypeVar("RowT", bound=tuple[Any, ...])
T = TypeVar("T")

#: A batch also stops growing at this many bytes of rows (large bodies are copied into the
#: frame and again in the child): a burst of big events makes several commits, not one huge one.
MAX_BATCH_BYTES = 16 * 1024 * 1024
RESTART_DELAYS_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A child that has left a request unanswered this long is stuck (a stopped process, a hung
#: disk): it is killed, its waiters get StoreUnavailable and a new child starts. No store
#: operation comes near it: a batch commits in milliseconds, SQLite's busy timeout is 5 s.
STALL_SECONDS = 60.0
WATCH_INTERVAL_SECONDS = 5.0
#: At stop, what is queued gets this long to be written (SQLite's busy timeout, 5 s, and a
#: batch's commit); a child that has not answered by then is killed, its waiters answered
#: unavailable, so a stalled writer cannot hold a stop past LACUNA_SHUTDOWN_TIMEOUT's bound.
STOP_WAIT_SECONDS = 6.0
#: No request or reply comes near this (a batch is at most MAX_BATCH_BYTES of rows, or one
#: event of at most LACUNA_MAX_BODY_BYTES; a job's answer is one page of a listing): a larger
#: length prefix means the stream is corrupt.
MAX_FRAME_BYTES = 1024 * 1024 * 1024

#: What a write gets at once while the disk is full (``Checkpointer.full``).
DISK_FULL = (
    "The event store is unavailable (the disk is full: writes resume once a checkpoint has "
    "room to complete); retry later."
)

#: A reply: ("ok", value) | ("unavailable", message) | ("error", exception)
_Reply = tuple[str, Any]


def _frame(message: object) -> bytes:
    return frame(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Link:
    """One child process and the socket to it."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer

    async def read(self) -> _Reply:
        # Our own child, over a socket pair nobody else holds: not untrusted data.
        reply: _Reply = pickle.loads(await read_frame(self.reader, MAX_FRAME_BYTES))  # noqa: S301
        return reply

    async def close(self) -> int:
        """Close the socket (the child exits on EOF) and reap the child; its exit code. A
        child that has not exited ``STOP_WAIT_SECONDS`` later (stopped, stuck in a hung
        disk's fsync) is killed: it held the stop of `serve` without end."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        try:
            async with asyncio.timeout(STOP_WAIT_SECONDS):
                return await self.proc.wait()
        except TimeoutError:
            self.kill_stalled(f"still running {STOP_WAIT_SECONDS:.0f} s after its end")
            return await self.proc.wait()

    def kill_stalled(self, why: str) -> None:
        """Log ``store.sqlite.writer_stalled`` with ``why`` and SIGKILL the child (stopped, or
        stuck in a hung disk's fsync): its reader then sees the socket close."""
        logger.error("store.sqlite.writer_stalled: %s; killing pid %s", why, self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class ProcessWriter(Generic[RowT]):
    """``connect(*connect_args)`` runs once in the child; then accepts and jobs until
    ``stop()``. ``connect``, ``accept_batch`` and ``row_type`` (a named tuple's ``_make``)
    must be module-level; rows travel as plain tuples, the cheapest thing to pickle.
    ``row_size(row)`` is a row's weight in bytes for ``MAX_BATCH_BYTES``."""

    def __init__(
        self,
        *,
        name: str,
        connect: Callable[..., sqlite3.Connection],
        connect_args: tuple[Any, ...],
        accept_batch: Callable[[sqlite3.Connection, list[RowT]], list[bool]],
        row_type: Callable[[tuple[Any, ...]], RowT],
        row_size: Callable[[RowT], int],
    ) -> None:
        self._name = name
        self._hello = ("hello", connect, connect_args, accept_batch, row_type)
        self._row_size = row_size
        self._state = _State.NEW
        self._link: _Link | None = None
        self._pending: list[tuple[RowT, asyncio.Future[bool]]] = []
        # (what to do with the reply, when the request was sent), in the order sent
        self._replies: collections.deque[tuple[Callable[[_Reply], None], float]] = (
            collections.deque()
        )
        self._batch_in_flight = False
        self._idle = asyncio.Event()
        self._stopped = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._restarter: asyncio.Task[None] | None = None
        # The loop that started the writer, which it belongs to: asyncio.get_running_loop()
        # costs a getpid() system call on every call before Python 3.12.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0  # committed accept batches, for measurements and tests
        self.batched = 0  # accepts in them

    @property
    def queued(self) -> int:
        """Accepts waiting for the next batch right now."""
        return len(self._pending)

    @property
    def pid(self) -> int | None:
        """The child's process id (for tests and diagnostics)."""
        return self._link.proc.pid if self._link is not None else None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child; return once ``connect`` succeeded there, or raise what it raised."""
        if self._state is not _State.NEW:
            raise StoreUnavailable("The event store was already opened once.")
        self._state = _State.RUNNING
        self._loop = asyncio.get_running_loop()
        try:
            await self._spawn()
        except BaseException:
            self._state = _State.STOPPED
            self._stopped.set()
            raise

    async def stop(self) -> None:
        """Serve what is already queued, then close the connection and end the child."""
        if self._state in (_State.STOPPING, _State.STOPPED):
            await self._stopped.wait()
            return
        self._state = _State.STOPPING
        if self._restarter is not None:
            self._restarter.cancel()
        self._check_idle()
        try:
            async with asyncio.timeout(STOP_WAIT_SECONDS):
                await self._idle.wait()
        except TimeoutError:
            # A child that does not answer (stopped, a hung disk) held the stop until the
            # stall watch killed it, a minute on, past any orchestrator's grace period.
            if self._link is not None:  # its reader sees the end: _lost answers the waiters
                self._link.kill_stalled(f"no answer at stop for {STOP_WAIT_SECONDS:.0f} s")
            await self._idle.wait()
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        if self._watcher is not None:
            self._watcher.cancel()
        tasks = [t for t in (self._reader, self._watcher, self._restarter) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._state = _State.STOPPED
        self._stopped.set()

    async def _spawn(self) -> None:
        parent, child = socket.socketpair()
        try:
            proc = await start_child("lacuna_webhooks.store.sqlite.process", child)
        except OSError as exc:
            parent.close()
            raise StoreUnavailable(f"Cannot start the SQLite writer process: {exc}") from exc
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        link = _Link(proc, reader, writer)
        writer.write(_frame((*self._hello, logs.configured())))
        try:
            kind, value = await link.read()
        except asyncio.CancelledError:
            link.writer.close()  # stopped while the child was opening: it exits on EOF
            raise
        except (asyncio.IncompleteReadError, ConnectionError):
            code_ = await link.close()
            raise StoreUnavailable(
                f"The SQLite writer process exited while opening the database ({code_})."
            ) from None
        if kind != "ok":
            await link.close()
            raise StoreUnavailable(str(value))
        self._link = link
        self._reader = asyncio.create_task(self._read_replies(link), name=f"{self._name}-reader")
        self._watcher = asyncio.create_task(self._watch(link), name=f"{self._name}-watch")

    # --- requests --------------------------------------------------------------------------

    def _check(self) -> _Link:
        if self._state is _State.RUNNING and self._link is not None:
            return self._link
        if self._state is _State.RESTARTING:
            raise StoreUnavailable("The SQLite writer is restarting; retry later.")
        if self._state is _State.NEW:
            raise StoreUnavailable("The event store is not open.")
        raise StoreUnavailable("The event store is closed.")

    async def accept(self, row: RowT) -> bool:
        """Write ``row`` in the next group commit; ``True`` if it was new."""
        return await self.accept_soon(row)

    def accept_soon(self, row: RowT) -> asyncio.Future[bool]:
        """``accept`` as a future, for a caller without a task of its own: its result is
        ``True`` if the row was new; ``StoreUnavailable`` is raised at once when the writer
        is not running. Cancelling the future gives up waiting, not the write."""
        self._check()
        assert self._loop is not None  # set by start(), which _check() says has run
        future: asyncio.Future[bool] = self._loop.create_future()
        self._pending.append((row, future))
        if not self._batch_in_flight:
            self._send_batch()
        return future

    async def run(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        """Run ``fn(conn, *args)`` in the child, in a transaction of its own."""
        link = self._check()
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._send(link, ("job", fn, args, write), functools.partial(_settle_job, future))
        return await future

    def _send(
        self, link: _Link, request: tuple[Any, ...], on_reply: Callable[[_Reply], None]
    ) -> None:
        link.writer.write(_frame(request))
        self._replies.append((on_reply, time.monotonic()))
        self._idle.clear()

    def _send_batch(self) -> None:
        link = self._link
        if link is None or not self._pending:
            return
        count = size = 0
        for row, _ in self._pending:
            size += self._row_size(row)
            if count == MAX_BATCH or (count and size > MAX_BATCH_BYTES):
                break
            count += 1
        items = self._pending[:count]
        del self._pending[:count]
        self._batch_in_flight = True
        self._send(
            link,
            ("accept", [tuple(row) for row, _ in items]),
            functools.partial(self._batch_done, items),
        )

    def _batch_done(self, items: list[tuple[RowT, asyncio.Future[bool]]], reply: _Reply) -> None:
        self._batch_in_flight = False
        kind, value = reply
        if kind == "ok":
            self.batches += 1
            self.batched += len(items)
            for (_, future), new in zip(items, value, strict=True):
                if future.done():
                    continue
                if isinstance(new, str):  # this row alone failed (write_batch)
                    future.set_exception(RowRefused(new))
                else:
                    future.set_result(new)
        else:
            logger.error("store.sqlite.batch_failed: %d accepts: %s", len(items), value)
            for _, future in items:
                if not future.done():
                    future.set_exception(_error(reply))
        if self._state in (_State.RUNNING, _State.STOPPING):
            self._send_batch()

    def _check_idle(self) -> None:
        if not self._replies and not self._pending:
            self._idle.set()

    async def _read_replies(self, link: _Link) -> None:
        try:
            while True:
                reply = await link.read()
                self._replies.popleft()[0](reply)
                self._check_idle()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the child exited (or was stopped)
        except Exception as exc:  # a reply that makes no sense: treat the child as lost
            logger.error("store.sqlite.writer_protocol_error: %r", exc)
            with contextlib.suppress(ProcessLookupError):
                link.proc.kill()
        if self._link is link:  # the child died under us (not a stop)
            await self._lost(link)

    async def _watch(self, link: _Link) -> None:
        while self._link is link:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            if self._link is link and self._replies:
                waited = time.monotonic() - self._replies[0][1]
                if waited > STALL_SECONDS:
                    # The reader then sees the socket close: _lost, then a restart.
                    link.kill_stalled(f"no answer for {waited:.0f} s")
                    return

    async def _lost(self, link: _Link) -> None:
        self._link = None
        gone: _Reply = (
            "unavailable",
            "The event store is unavailable (the SQLite writer process exited); retry later.",
        )
        replies, self._replies = self._replies, collections.deque()
        pending, self._pending = self._pending, []
        self._batch_in_flight = False
        for on_reply, _ in replies:
            on_reply(gone)
        for _, future in pending:
            if not future.done():
                future.set_exception(_error(gone))
        self._check_idle()
        code = await link.close()
        if self._state is _State.RUNNING:
            logger.error("store.sqlite.writer_exited: exit code %s; starting a new one", code)
            self._state = _State.RESTARTING
            self._restarter = asyncio.create_task(self._restart(), name=f"{self._name}-restart")

    async def _restart(self) -> None:
        for attempt in range(sys.maxsize):
            delay = RESTART_DELAYS_SECONDS[min(attempt, len(RESTART_DELAYS_SECONDS) - 1)]
            await asyncio.sleep(delay)
            if self._state is not _State.RESTARTING:
                return
            try:
                await self._spawn()
            except StoreUnavailable as exc:
                logger.error("store.sqlite.writer_restart_failed: %s", exc)
                continue
            if self._state is not _State.RESTARTING:  # stopped meanwhile
                link, self._link = self._link, None
                if link is not None:
                    await link.close()
                return
            self._state = _State.RUNNING
            logger.warning("store.sqlite.writer_restarted: pid %s", self.pid)
            return


def _error(reply: _Reply) -> BaseException:
    kind, value = reply
    if kind == "error" and isinstance(value, BaseException):
        return value
    return StoreUnavailable(str(value))


def _settle_job(future: asyncio.Future[Any], reply: _Reply) -> None:
    if future.done():
        return
    if reply[0] == "ok":
        future.set_result(reply[1])
    else:
        future.set_exception(_error(reply))


# --- the child ---------------------------------------------------------------------------------


def child_main(fd: int) -> int:
    """Serve one parent over the socket ``fd`` until it closes, or until the parent dies.

    The kernel kills this process when its parent dies (``die_with_parent``): the socket's
    end is not enough. A writer stopped (SIGSTOP, a debugger) or stuck in its own code when
    ``serve`` was SIGKILLed never read that end and lived on, holding SQLite's write lock if
    it was stopped inside a transaction, so the restarted ``serve`` answered every webhook
    503 until someone found and killed the orphan."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    sock = socket.socket(fileno=fd)
    stream = sock.makefile("rb")

    def read() -> Any:
        data = read_frame_blocking(stream, MAX_FRAME_BYTES)
        return None if data is None else pickle.loads(data)  # noqa: S301 (our parent)

    def answer(reply: _Reply) -> None:
        try:
            data = _frame(reply)
        except Exception as exc:  # a result or an exception that does not pickle: a bug
            data = _frame(("error", RuntimeError(f"unpicklable reply: {exc}")))
        sock.sendall(data)

    try:
        hello = read()
        if hello is None:
            return 0
        _, connect, connect_args, accept_batch, row_type, log_config = hello
        if log_config is not None:
            # The parent's format and level: its lines (a checkpoint that failed, then
            # recovered) were plain text on stderr, and nothing below WARNING showed.
            log_format, level = log_config
            logs.configure(log_format=log_format, level=level, secrets=secret_values(os.environ))
        try:
            conn = connect(*connect_args)
        except StoreUnavailable as exc:
            answer(("unavailable", exc.message))
            return 0
        except Exception as exc:
            answer(("unavailable", f"The event store failed to open: {exc}"))
            return 1
        try:
            checkpointer = Checkpointer(conn)
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            answer(("unavailable", f"The event store failed to open: {exc}"))
            return 1
        answer(("ok", None))
        try:
            while (request := read()) is not None:
                if checkpointer.full and _writes(request):
                    # The disk is full: a write would take the space the checkpoint needs.
                    answer(("unavailable", DISK_FULL))
                    continue
                with checkpointer.commit_lock:
                    reply, full = _serve(conn, request, accept_batch, row_type)
                if full:
                    checkpointer.disk_full()
                checkpointer.committed()
                answer(reply)
        finally:
            # In this order: the checkpointer's close() closes its descriptor of the file,
            # which drops every POSIX lock this process holds on it (the writer's too).
            conn.close()
            checkpointer.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nobody is left to answer
    except ValueError as exc:  # a corrupt frame (read_frame_blocking): the parent restarts us
        print(f"lacuna-webhooks: SQLite writer process: {exc}", file=sys.stderr)
        return 1
    finally:
        stream.close()
        sock.close()
    return 0


def _writes(request: tuple[Any, ...]) -> bool:
    """Whether ``request`` is a write (an accept batch, or a job in a write transaction)."""
    return request[0] == "accept" or bool(request[3])


def _serve(
    conn: sqlite3.Connection, request: tuple[Any, ...], accept_batch: Any, row_type: Any
) -> tuple[_Reply, bool]:
    """The reply to ``request``, and whether it failed on a full disk."""
    try:
        if request[0] == "accept":
            rows = [row_type(row) for row in request[1]]
            return ("ok", write_batch(conn, accept_batch, rows)), False
        _, fn, args, write = request
        return ("ok", run_job(conn, fn, args, write=write)), False
    except StoreUnavailable as exc:
        return ("unavailable", exc.message), is_disk_full(exc.__cause__)
    except Exception as exc:  # EventNotFound, or a bug: raised in the awaiting coroutine
        return ("error", exc), False
