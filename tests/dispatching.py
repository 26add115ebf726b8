"""Helpers shared by the dispatcher tests (unit, on MemoryStore; integration, on SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

from lacuna_webhooks.dispatch import Dispatcher
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.base import DeliveryRecord


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC).replace(microsecond=0)
        self.start = self.now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def make_dispatcher(
    store: Store,
    handlers: Iterable[RecordingHandler] | HandlerSet,
    clock: FakeClock,
    *,
    policy: RetryPolicy,
    poll_interval_seconds: float,
    **kwargs: object,
) -> Dispatcher:
    """A dispatcher on ``clock`` whose jitter is the midpoint: delays equal their nominal value."""
    handler_set = handlers if isinstance(handlers, HandlerSet) else HandlerSet.of(handlers)
    options: dict[str, object] = {
        "policy": policy,
        "poll_interval_seconds": poll_interval_seconds,
        "clock": clock,
        "rand": lambda: 0.5,
    }
    options.update(kwargs)
    return Dispatcher(store, handler_set, **options)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(d: Dispatcher, stop_timeout: float = 1.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run the dispatcher for the block; stop it (gracefully, bounded) afterwards."""
    task = asyncio.create_task(d.run())
    try:
        yield task
    finally:
        await asyncio.wait_for(d.stop(stop_timeout), 10)
        await asyncio.wait_for(task, 10)


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], within_seconds: float = 10.0
) -> None:
    """Poll ``check`` until it holds; fail the test after ``within_seconds``."""
    async with asyncio.timeout(within_seconds):
        while True:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(0.005)


async def only_delivery(store: Store, **filters: object) -> DeliveryRecord:
    rows = await store.list_deliveries(**filters)  # type: ignore[arg-type]
    assert len(rows) == 1, rows
    return rows[0]
