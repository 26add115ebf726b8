"""The live stream's parts every backend shares: cursors, the wake-up signal, and ``follow``.

The stream (admin ``GET /api/v1/stream``, ``docs/admin.md``) hands out every stored event
once, in an order that never changes once an event has been handed out, with a cursor after
each one: a client that resumes after a cursor gets exactly the events it has not seen.
Each backend makes that order its own way (``Store.stream_after``):

- memory: the arrival counter (never reused);
- SQLite: ``events.stream_seq``, taken from ``stream_counter`` in the transaction that
  inserts the event (one writer, so commit order is position order; the counter survives
  the pruning of every event, so a position is never used twice);
- PostgreSQL: ``(xid, seq)``, handing out only rows whose transaction is older than every
  transaction still running, so nothing can commit behind a cursor later, on any replica
  (``sql/postgres/0008_stream.sql``).

A cursor is opaque: URL-safe base64 of a small JSON array whose first item names the
backend, so a cursor of one backend given to another is refused (``ValueError``, the admin
API's 400), never read as a position.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from .search import decode_cursor, encode_cursor

if TYPE_CHECKING:
    from .base import EventRecord, Store

_T = TypeVar("_T")

#: The most events one ``stream_after`` call returns to ``follow``.
FOLLOW_BATCH = 100
#: ... and the most bytes of bodies (one event past it is still read alone): a batch of 100
#: bodies of ``LACUNA_MAX_BODY_BYTES``, encoded with their parsed payload beside them, held
#: by a stream whose client does not read took ``serve`` past 256 MiB with one stream.
FOLLOW_BATCH_BYTES = 1024 * 1024
#: A batch whose bodies stay below this was not cut by ``FOLLOW_BATCH_BYTES`` unless the next
#: body is larger than the rest of the budget: ``follow`` reads on without waiting after a
#: batch above it, and after a small one only at the next wake-up (an accept, or the poll).
BYTES_AT_HEAD = FOLLOW_BATCH_BYTES // 2
#: How many shared reads (``StreamSignal.shared``) run against the store at once: hundreds of
#: streams and task waits must leave the SQLite reader and the PostgreSQL pool to intake and
#: the rest of the service.
SHARED_READS = 2
#: After a wake-up, a follower waits for the next multiple of this (loop time, seconds) before
#: it reads: the live stream's latency for a burst of accepts to be one read and one write.
COALESCE_SECONDS = 0.05
#: The largest number a cursor part may hold (PostgreSQL's xid8 and bigint fit below it).
_MAX_PART = 2**63 - 1


def make_cursor(kind: str, *positions: int) -> str:
    """The opaque cursor of ``positions`` in the order of backend ``kind``."""
    return encode_cursor(kind, *positions)


def read_cursor(cursor: str, kind: str, arity: int) -> list[int]:
    """The ``arity`` positions of a cursor ``make_cursor(kind, ...)`` made; ``ValueError``
    for anything else (another backend's cursor, a search cursor, a forged one)."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > 200:
        raise ValueError("not a stream cursor this service made")
    parts = decode_cursor(cursor, arity + 1)
    if parts[0] != kind:
        raise ValueError("not a stream cursor of this store")
    positions = parts[1:]
    for value in positions:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_PART:
            raise ValueError("not a stream cursor this service made")
    return positions


def beyond_head(cursor: str, head: str) -> bool:
    """Whether ``cursor`` lies after ``head`` (``stream_head()`` of the same store; both
    already accepted by its ``stream_after``): a position no event has reached yet, so no
    cursor this store handed out. Such a cursor (a forged one, or one saved against a
    database that was since replaced by an older backup or a fresh one) would wait in
    silence and then skip every event stored below it."""
    return _positions(cursor) > _positions(head)


def _positions(cursor: str) -> list[int]:
    parts = decode_cursor(cursor, _arity(cursor))
    return [int(part) for part in parts[1:]]


def _arity(cursor: str) -> int:
    for arity in range(2, 5):
        try:
            decode_cursor(cursor, arity)
        except ValueError:
            continue
        return arity
    raise ValueError("not a stream cursor this service made")


class StreamSignal:
    """Wakes everyone following the stream when events may have been stored.

    A backend calls ``notify()`` after an accept commits in this process (and, on
    PostgreSQL, on every NOTIFY from another replica). A follower takes ``mark()`` *before*
    it reads, then ``wait(mark, timeout)``: a notify that came between the read and the wait
    is not lost. ``poll_seconds`` is how long a follower may sleep without a notify: what
    this backend cannot be notified of (another process writing the same SQLite file; on
    PostgreSQL a row held back by an older transaction still running) is picked up by then.
    """

    def __init__(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        self._current = asyncio.Event()
        self._reads: dict[tuple[Hashable, asyncio.Event], asyncio.Future[Any]] = {}
        self._slots: asyncio.Semaphore | None = None

    def mark(self) -> asyncio.Event:
        return self._current

    def notify(self) -> None:
        """Wake every waiter (cheap without any: one object swapped)."""
        fired, self._current = self._current, asyncio.Event()
        fired.set()

    def poll_timeout(self, now: float) -> float:
        """Seconds from ``now`` (loop time) to the next poll: a grid shared by every
        follower, so the polls of hundreds of followers fall together and share reads."""
        return self.poll_seconds - (now % self.poll_seconds)

    async def shared(
        self, key: Hashable, mark: asyncio.Event, read: Callable[[], Awaitable[_T]]
    ) -> _T:
        """``read()``'s answer, shared by every caller asking for the same ``key`` under the
        same ``mark``: after a notify, hundreds of followers at the same cursor cost one
        store read, not one each (which starved intake of the PostgreSQL pool and the event
        loop). A read started under ``mark`` began after every notify before ``mark`` was
        taken, so it sees all that a read of the caller's own would. At most
        ``SHARED_READS`` run at once. A caller cancelled (its client went away) leaves the
        read to the others."""
        slot = (key, mark)
        future = self._reads.get(slot)
        if future is None:
            future = asyncio.ensure_future(self._read(read))
            self._reads[slot] = future
            future.add_done_callback(lambda done: self._forget(slot, done))
        return await asyncio.shield(future)

    async def _read(self, read: Callable[[], Awaitable[_T]]) -> _T:
        if self._slots is None:
            self._slots = asyncio.Semaphore(SHARED_READS)  # made in the loop that uses it
        async with self._slots:
            return await read()

    def _forget(self, slot: tuple[Hashable, asyncio.Event], done: asyncio.Future[Any]) -> None:
        if self._reads.get(slot) is done:
            del self._reads[slot]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone before it failed

    async def wait(self, mark: asyncio.Event, timeout_seconds: float) -> None:
        """Return once a notify came after ``mark`` was taken, or after the timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_seconds)):
                await mark.wait()


async def follow(
    store: Store,
    cursor: str | None,
    *,
    stopping: asyncio.Event,
    idle_seconds: float,
) -> AsyncIterator[list[tuple[str, EventRecord]]]:
    """Every event after ``cursor`` (``None``: from the first stored), in batches of
    ``(cursor, event)`` as ``stream_after`` reads them, then each new one as it commits,
    until ``stopping`` is set. An empty batch is yielded after ``idle_seconds`` without an
    event (the caller's keepalive). ``ValueError`` for a bad cursor (raised by the first
    read); ``StoreUnavailable`` when the store fails."""
    signal = store.stream_signal
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    while not stopping.is_set():
        mark = signal.mark()
        read = functools.partial(store.stream_after, cursor, FOLLOW_BATCH, FOLLOW_BATCH_BYTES)
        batch = await signal.shared(("stream", cursor), mark, read)
        if batch:
            cursor = batch[-1][0]
            yield batch
            quiet_since = loop.time()
            if len(batch) == FOLLOW_BATCH or sum(len(e.raw) for _, e in batch) > BYTES_AT_HEAD:
                continue  # more may be stored (a full batch, or one cut at its bytes)
        idle = loop.time() - quiet_since
        if idle >= idle_seconds:
            yield []
            quiet_since = loop.time()
            idle = 0.0
        timeout = min(signal.poll_timeout(loop.time()), max(0.0, idle_seconds - idle))
        await first_of((mark, stopping), timeout)
        if mark.is_set() and not stopping.is_set():
            # Woken by an accept: gather the others of the same instant, on a grid every
            # follower shares, so a burst of accepts costs each stream one read and one write
            # (not one per accept, each fanned out to every stream) and the reads are shared.
            await asyncio.sleep(COALESCE_SECONDS - loop.time() % COALESCE_SECONDS)


async def first_of(events: tuple[asyncio.Event, ...], timeout_seconds: float) -> None:
    """Return when any of ``events`` is set, or after the timeout."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


__all__ = [
    "COALESCE_SECONDS",
    "FOLLOW_BATCH",
    "FOLLOW_BATCH_BYTES",
    "SHARED_READS",
    "StreamSignal",
    "beyond_head",
    "first_of",
    "follow",
    "make_cursor",
    "read_cursor",
]
