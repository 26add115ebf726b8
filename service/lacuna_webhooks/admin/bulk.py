"""Bulk replay and backfill (SPEC §9 ``POST /replays``, the CLI's ``replay`` / ``backfill``).

``run_bulk(store, operation)`` walks the events an ``EventFilter`` selects with
``search_events`` and its cursor, ``BATCH_SIZE`` at a time, and hands each batch to
``Store.replay_many``: one short transaction per batch. Between batches it pauses at least as
long as the batch took (search and write), so on SQLite the single writer spends at most half
its time on the operation and intake's accepts queue behind one batch, never behind the
whole operation. A ``StoreUnavailable`` (a busy or restarting database) is retried with
backoff for up to ``RETRY_SECONDS`` per step before the operation gives up with it.

The walk goes newest first from the moment it starts: events that arrive during the
operation are newer than its first page and are not part of it (they get their deliveries
from intake). A batch is atomic; an operation stopped half way (a store that stayed away)
leaves the batches before it applied, and running it again is safe (a backfill creates only
what is still missing).

The pages are searched under a ``ScanBudget`` (the admin API's, ``LACUNA_ADMIN_SEARCH_BUDGET``),
so a filter that reads payloads (``match``, ``q``) never runs into the store's read deadline
on a large store: a page the budget cut (``complete`` false, fewer than ``batch_size`` events,
even none) is written like any and the walk goes on from its cursor; only a page without a
cursor ends it.

``BulkRunner`` lets one operation run at a time in a process: a second ``start`` while one
runs raises ``OperationInProgress`` (the admin API answers 409). ``BulkRunner.stop`` (``serve``
stopping) ends the running operation at its next batch, with ``OperationStopped``: the
batches before stay written, and a stop never waits for the whole operation.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from ..errors import StoreUnavailable
from ..store import Store
from ..store.base import EventFilter, ReplayCounts, ScanBudget

logger = structlog.get_logger("lacuna_webhooks.admin")

#: Events per batch: one ``search_events`` page and one ``replay_many`` transaction.
BATCH_SIZE = 500
#: The shortest pause between batches, in seconds (the pause is at least the batch's time).
MIN_PAUSE_SECONDS = 0.01
#: How long one step (a page or a batch) is retried while the store is unavailable, seconds.
RETRY_SECONDS = 30.0
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 2.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BulkOperation:
    """What to do to the events ``where`` selects.

    ``handlers``: ``None`` resets every existing delivery of each event (a replay) whose
    handler is in ``configured`` (``None``: every one); names create each one's missing
    delivery (backfill) and reset its existing one, or with ``missing_only`` only create.
    ``dry_run`` only counts the events. ``configured`` is the configured handler names: a
    delivery of a handler since removed from the configuration is left as it is, since
    made pending again nothing would ever run it (and its event could never be pruned).
    ``filters``: see below."""

    where: EventFilter
    handlers: tuple[str, ...] | None = None
    missing_only: bool = False
    dry_run: bool = False
    configured: tuple[str, ...] | None = None
    #: The event types each handler gets (``LACUNA_<NAME>_EVENTS``; ``None`` or absent: every
    #: type). ``handlers`` act only on the events of types they get, as intake does: a
    #: backfill never hands a handler an event it does not subscribe to.
    filters: Mapping[str, frozenset[str] | None] = field(default_factory=dict)

    def wants(self, handler: str, event_type: str) -> bool:
        """``handler`` gets events of ``event_type`` (its filter, as intake applies it)."""
        types = self.filters.get(handler)
        return types is None or event_type in types

    def __post_init__(self) -> None:
        if self.missing_only and not self.handlers:
            raise ValueError("missing_only needs handlers: it creates their missing deliveries")


@dataclass(frozen=True, slots=True)
class BulkResult:
    """``matched`` events (all of them counted, even in a dry run); deliveries ``created``
    and ``reset`` (both 0 in a dry run); ``batches`` written; ``seconds`` it took."""

    matched: int
    created: int
    reset: int
    dry_run: bool
    batches: int = 0
    seconds: float = 0.0

    def json(self) -> dict[str, Any]:
        """The answer of ``POST /replays``."""
        return {
            "matched": self.matched,
            "created": self.created,
            "reset": self.reset,
            "dry_run": self.dry_run,
        }


class OperationInProgress(Exception):
    """Another bulk operation runs in this process."""


class OperationStopped(Exception):
    """The process is stopping: the operation ended between two batches. ``done`` counts
    what was written before (``dry_run`` as the operation's)."""

    def __init__(self, done: BulkResult) -> None:
        super().__init__(
            f"The service is stopping: the operation stopped after {done.matched} events "
            f"({done.created} deliveries created, {done.reset} made due again, all written). "
            "Running it again is safe."
        )
        self.done = done


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def _retrying(
    step: Callable[[], Awaitable[T]],
    *,
    retry_seconds: float,
    what: str,
    on_retry: Callable[[str, StoreUnavailable], None] | None,
    stopping: Callable[[], bool] = lambda: False,
) -> T:
    """``step()``, again after a backoff while it raises ``StoreUnavailable``, for at most
    ``retry_seconds`` and while not ``stopping()``; then that error."""
    deadline = time.monotonic() + retry_seconds
    backoff = _FIRST_BACKOFF_SECONDS
    while True:
        try:
            return await step()
        except StoreUnavailable as exc:
            if time.monotonic() + backoff > deadline or stopping():
                raise
            if on_retry is not None:
                on_retry(what, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)


async def _replay_batch(
    store: Store,
    events: list[tuple[str, str]],
    operation: BulkOperation,
    clock: Callable[[], datetime],
) -> ReplayCounts:
    """``events`` as ``(id, type)``."""
    # ``now`` read on each try: a batch retried later is due from then.
    ids = [event_id for event_id, _ in events]
    if operation.handlers is None:
        if operation.configured is not None:
            # A replay of the existing deliveries, those of configured handlers only.
            return await store.replay_many(ids, operation.configured, now=clock(), create=False)
        return await store.replay_many(ids, None, now=clock(), create=False)
    # The events by the named handlers that get their type (one group in the usual case).
    groups: dict[tuple[str, ...], list[str]] = {}
    for event_id, event_type in events:
        names = tuple(h for h in operation.handlers if operation.wants(h, event_type))
        if names:
            groups.setdefault(names, []).append(event_id)
    created = reset = 0
    for names, group in groups.items():
        counts = await store.replay_many(
            group, names, now=clock(), create=True, reset=not operation.missing_only
        )
        created += counts.created
        reset += counts.reset
    return ReplayCounts(created=created, reset=reset)


async def replay_configured(
    store: Store, event_id: str, configured: Sequence[str], *, now: datetime
) -> int:
    """``store.replay(event_id, None)`` limited to the deliveries of ``configured`` handlers:
    one of a handler since removed from the configuration is left as it is (pending again,
    nothing would ever run it). ``EventNotFound`` as ``replay``; how many were reset."""
    existing = await store.list_deliveries(event_id=event_id, limit=1000)
    names = [n for n in dict.fromkeys(d.handler for d in existing) if n in configured]
    return await store.replay(event_id, names, now=now)


def not_taking(
    filters: Mapping[str, frozenset[str] | None], event_type: str, names: Sequence[str]
) -> list[str]:
    """Those of ``names`` whose ``LACUNA_<NAME>_EVENTS`` (``filters``: ``HandlerSet.filters``)
    leaves out ``event_type``: intake makes no delivery of such an event for them, so neither
    does a replay naming them (as a backfill acts only on the types a handler gets)."""
    return [n for n in names if (types := filters.get(n)) is not None and event_type not in types]


async def retry_dead_configured(
    store: Store, configured: Sequence[str] | None, *, handler: str | None, now: datetime
) -> int:
    """``store.retry_dead`` of ``handler``, or of every handler in ``configured`` when it is
    ``None``: the dead deliveries of a handler since removed from the configuration stay
    dead (made pending, nothing would ever run them, and their events would never be
    pruned). ``configured`` ``None``: no configuration to go by (the CLI without
    LACUNA_HANDLERS), every handler. How many are due again."""
    if handler is None and configured is None:
        return await store.retry_dead(handler=None, now=now)
    names = [handler] if handler is not None else list(dict.fromkeys(configured or ()))
    count = 0
    for name in names:
        count += await store.retry_dead(handler=name, now=now)
    return count


async def run_bulk(
    store: Store,
    operation: BulkOperation,
    *,
    clock: Callable[[], datetime] = _utcnow,
    batch_size: int = BATCH_SIZE,
    min_pause_seconds: float = MIN_PAUSE_SECONDS,
    retry_seconds: float | None = None,
    on_retry: Callable[[str, StoreUnavailable], None] | None = None,
    budget: ScanBudget | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> BulkResult:
    """Run ``operation`` in batches (module docstring); ``StoreUnavailable`` when the store
    stayed away for ``retry_seconds`` (default ``RETRY_SECONDS``); ``OperationStopped``
    when ``stopping()`` turns true (checked before each batch and each retry). ``clock``
    stamps each batch's ``now``; ``on_retry(step, error)`` hears of each retry (``step`` is
    ``search`` or ``replay``); ``budget`` bounds each page's scan (default ``ScanBudget()``,
    0.5 s). It logs nothing itself: the CLI prints its result, the API logs it."""
    scan_budget = ScanBudget() if budget is None else budget
    retry_for = RETRY_SECONDS if retry_seconds is None else retry_seconds
    started = time.monotonic()
    matched = created = reset = batches = 0
    cursor: str | None = None
    while True:
        if stopping():
            raise OperationStopped(
                BulkResult(matched, created, reset, operation.dry_run, batches=batches)
            )
        batch_started = time.monotonic()
        try:
            page = await _retrying(
                functools.partial(
                    store.search_events,
                    operation.where,
                    cursor=cursor,
                    limit=batch_size,
                    budget=scan_budget,
                    bodies=False,  # ids and types only: a batch holds no body
                ),
                retry_seconds=retry_for,
                what="search",
                on_retry=on_retry,
                stopping=stopping,
            )
        except ValueError:
            # The cursor's event was pruned under the walk (only the memory store keys its
            # cursor by event); the batches so far stay applied.
            raise StoreUnavailable(
                "The events being replayed changed under the operation (pruned); run it again."
            ) from None
        events = [(record.id, record.type) for record in page.records]
        matched += len(events)
        if events and not operation.dry_run:
            counts = await _retrying(
                functools.partial(_replay_batch, store, events, operation, clock),
                retry_seconds=retry_for,
                what="replay",
                on_retry=on_retry,
                stopping=stopping,
            )
            created += counts.created
            reset += counts.reset
            batches += 1
        # A page the budget cut (fewer events, even none) is not the end: only no cursor is.
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # Yield the store (and the loop) at least as long as this batch held them; a page
        # that wrote nothing held only a read (the reader, or one pooled connection).
        held = time.monotonic() - batch_started if events and not operation.dry_run else 0.0
        await asyncio.sleep(max(min_pause_seconds, held))
    return BulkResult(
        matched=matched,
        created=created,
        reset=reset,
        dry_run=operation.dry_run,
        batches=batches,
        seconds=time.monotonic() - started,
    )


def _log_retry(step: str, exc: StoreUnavailable) -> None:
    logger.warning("admin.bulk_store_unavailable", step=step, error=exc.message)


class BulkRunner:
    """One bulk operation at a time over ``store``: ``start`` raises ``OperationInProgress``
    while one runs. The operation runs as a task of its own, so a client that hangs up does
    not cancel it half way (it finishes, and logs its result)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = _utcnow,
        budget: ScanBudget | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.budget = budget
        self._running: asyncio.Task[BulkResult] | None = None
        self._stopping = False

    @property
    def busy(self) -> bool:
        return self._running is not None and not self._running.done()

    async def _run(self, operation: BulkOperation) -> BulkResult:
        shape = {
            "handlers": operation.handlers,
            "missing_only": operation.missing_only,
            "dry_run": operation.dry_run,
        }
        try:
            result = await run_bulk(
                self.store,
                operation,
                clock=self.clock,
                on_retry=_log_retry,
                budget=self.budget,
                stopping=lambda: self._stopping,
            )
        except OperationStopped as exc:
            logger.warning(
                "admin.bulk_stopped",
                matched=exc.done.matched,
                created=exc.done.created,
                reset=exc.done.reset,
                batches=exc.done.batches,
                **shape,
            )
            raise
        except Exception as exc:
            # Any failure (StoreUnavailable, or a bug) is logged here: a client that hung up
            # never reads it. Re-raised for the route, which answers it.
            logger.warning("admin.bulk_failed", error=str(exc), **shape)
            raise
        logger.info(
            "admin.bulk_done",
            matched=result.matched,
            created=result.created,
            reset=result.reset,
            batches=result.batches,
            seconds=round(result.seconds, 3),
            **shape,
        )
        return result

    async def stop(self) -> None:
        """End the running operation at its next batch (``OperationStopped``) and wait for
        it; refuse new ones. ``serve`` calls it when it stops, before the admin listener
        waits for its connections: a graceful stop never waits for a whole operation."""
        self._stopping = True
        task = self._running
        if task is not None and not task.done():
            await asyncio.wait([task])

    def start(self, operation: BulkOperation) -> asyncio.Task[BulkResult]:
        """The running operation's task; ``OperationInProgress`` when one already runs,
        ``OperationStopped`` once ``stop`` was called."""
        if self._stopping:
            raise OperationStopped(BulkResult(0, 0, 0, operation.dry_run))
        if self.busy:
            raise OperationInProgress("Another bulk replay or backfill is running.")
        task = asyncio.create_task(self._run(operation))
        task.add_done_callback(_retrieved)
        self._running = task
        return task


def _retrieved(task: asyncio.Task[BulkResult]) -> None:
    # Mark the outcome read: when the client hung up nobody awaits it, and asyncio would warn
    # "exception was never retrieved" about a failure ``_run`` has already logged.
    if not task.cancelled():
        task.exception()


__all__ = [
    "BATCH_SIZE",
    "BulkOperation",
    "BulkResult",
    "BulkRunner",
    "OperationInProgress",
    "OperationStopped",
    "replay_configured",
    "run_bulk",
]
