"""The dispatcher on a real SQLite file: the unit tests' key scenarios, against durable state.

Time that matters runs on a fake clock (starting at the real present, so the
store sees ordinary timestamps); real waits are bounded, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import orjson
import pytest

from lacuna_webhooks.dispatch import LEASE_MARGIN
from lacuna_webhooks.errors import PermanentError, RetryLater
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.models import AttemptOutcome, DeliveryStatus, Event
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store import Store, open_store
from tests.conftest import make_event
from tests.dispatching import FakeClock, make_dispatcher, only_delivery, running, wait_until

POLICY = RetryPolicy(max_attempts=3, base_delay_seconds=5.0, max_delay_seconds=3600.0)


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    s = open_store(sqlite_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


dispatcher = functools.partial(make_dispatcher, policy=POLICY, poll_interval_seconds=0.05)


def same_time(a: datetime, b: datetime) -> bool:
    """Equal to the millisecond (a backend may store coarser than microseconds)."""
    return abs((a - b).total_seconds()) < 0.001


async def accept(store: Store, clock: FakeClock, *handlers: str) -> Event:
    event = Event.from_body(orjson.dumps(make_event()))
    assert await store.accept(event, list(handlers) or ["recorder"], now=clock())
    return event


async def test_success_is_recorded(store: Store, clock: FakeClock) -> None:
    """A handler that returns leaves the delivery done with one ok attempt on disk."""
    handler = RecordingHandler()
    event = await accept(store, clock)
    d = dispatcher(store, [handler], clock)
    async with running(d):
        await d.drain()
    assert [e.id for e in handler.calls] == [event.id]
    assert handler.calls[0].raw == event.raw  # the exact bytes survive the round trip
    row = await only_delivery(store)
    assert (row.status, row.attempts) == (DeliveryStatus.DONE, 1)
    (attempt,) = await store.list_attempts(row.id)
    assert attempt.outcome is AttemptOutcome.OK
    assert attempt.attempt == 1


async def test_retries_then_dead_after_max_attempts(store: Store, clock: FakeClock) -> None:
    """Failures are retried at base * 2**(n-1) s; after max_attempts the delivery is dead,
    with every attempt recorded."""
    handler = RecordingHandler(script=[ValueError("boom")] * 5)
    await accept(store, clock)
    d = dispatcher(store, [handler], clock)
    async with running(d):
        for n, delay in enumerate([5.0, 10.0], start=1):
            await d.drain()
            row = await only_delivery(store)
            assert (row.status, row.attempts) == (DeliveryStatus.PENDING, n)
            assert same_time(row.next_attempt_at, clock() + timedelta(seconds=delay))
            clock.advance(delay)
        await d.drain()
    row = await only_delivery(store)
    assert (row.status, row.attempts) == (DeliveryStatus.DEAD, 3)
    assert row.last_error == "ValueError: boom"
    attempts = await store.list_attempts(row.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, AttemptOutcome.RETRY),
        (2, AttemptOutcome.RETRY),
        (3, AttemptOutcome.DEAD),
    ]


async def test_permanent_error_and_retry_later(store: Store, clock: FakeClock) -> None:
    """PermanentError is dead at once; RetryLater(delay) is due exactly that much later."""
    dead_end = RecordingHandler("dead_end", script=[PermanentError("gone")])
    later = RecordingHandler("later", script=[RetryLater(delay_seconds=120)])
    await accept(store, clock, "dead_end", "later")
    d = dispatcher(store, [dead_end, later], clock)
    async with running(d):
        await d.drain()
    dead = await only_delivery(store, handler="dead_end")
    assert (dead.status, dead.attempts, dead.last_error) == (
        DeliveryStatus.DEAD,
        1,
        "PermanentError: gone",
    )
    pending = await only_delivery(store, handler="later")
    assert pending.status is DeliveryStatus.PENDING
    assert same_time(pending.next_attempt_at, clock() + timedelta(seconds=120))


async def test_slow_handler_does_not_block_another(store: Store, clock: FakeClock) -> None:
    """A handler whose every slot hangs does not hold up another handler's deliveries."""
    slow, fast = RecordingHandler("slow"), RecordingHandler("fast")
    slow.block = asyncio.Event()
    for _ in range(3):
        await accept(store, clock, "slow", "fast")
    d = dispatcher(store, [slow, fast], clock, concurrency=1)
    async with running(d):

        async def fast_done() -> bool:
            rows = await store.list_deliveries(handler="fast", status=DeliveryStatus.DONE)
            return len(rows) == 3

        await wait_until(fast_done)
        assert len(slow.calls) == 1
        slow.block.set()
        await d.drain()
    assert len(await store.list_deliveries(status=DeliveryStatus.DONE)) == 6


async def test_accepted_event_is_dispatched_at_once(store: Store, clock: FakeClock) -> None:
    """An accept in this process wakes the idle loop, long before its (hour-long) poll."""
    handler = RecordingHandler()
    d = dispatcher(store, [handler], clock, poll_interval_seconds=3600)
    async with running(d):
        await wait_until(lambda: d.idle)
        await accept(store, clock)
        await d.drain(timeout_seconds=10)
    assert len(handler.calls) == 1


async def test_abandoned_claim_is_reclaimed_after_its_lease(store: Store, clock: FakeClock) -> None:
    """A claim whose worker died blocks the delivery only until its lease expires."""
    handler = RecordingHandler()
    await accept(store, clock)
    lease = timedelta(seconds=60) + LEASE_MARGIN
    assert await store.claim(handler="recorder", limit=1, lease=lease, now=clock())
    d = dispatcher(store, [handler], clock)
    async with running(d):
        await d.drain()
        assert handler.calls == []
        clock.advance(lease.total_seconds())
        await d.drain()
    assert len(handler.calls) == 1
    row = await only_delivery(store)
    assert (row.status, row.attempts) == (DeliveryStatus.DONE, 2)


async def test_crash_every_time_still_ends_dead(store: Store, clock: FakeClock) -> None:
    """Attempts are counted at claim: after max_attempts claims without an outcome, the next
    claim records dead and the handler is not called again."""
    handler = RecordingHandler()
    await accept(store, clock)
    for _ in range(POLICY.max_attempts):
        assert await store.claim(
            handler="recorder", limit=1, lease=timedelta(seconds=90), now=clock()
        )
        clock.advance(91)
    d = dispatcher(store, [handler], clock)
    async with running(d):
        await d.drain()
    assert handler.calls == []
    assert (await only_delivery(store)).status is DeliveryStatus.DEAD


async def test_stop_releases_and_the_next_process_delivers(
    store: Store, sqlite_url: str, clock: FakeClock
) -> None:
    """stop() with a hung handler gives the claim back (due, attempts undone); a dispatcher
    on a fresh connection to the same file then delivers it."""
    hung = RecordingHandler()
    hung.block = asyncio.Event()
    event = await accept(store, clock)
    d = dispatcher(store, [hung], clock)
    task = asyncio.create_task(d.run())
    await wait_until(lambda: len(hung.calls) == 1)
    await asyncio.wait_for(d.stop(0.05), 10)
    await asyncio.wait_for(task, 10)
    row = await only_delivery(store)
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 0)
    assert (await store.stats(now=clock())).due == 1
    assert await store.list_attempts(row.id) == []

    reopened = open_store(sqlite_url)
    await reopened.open()
    try:
        handler = RecordingHandler()
        d2 = dispatcher(reopened, [handler], clock)
        async with running(d2):
            await d2.drain()
        assert [e.id for e in handler.calls] == [event.id]
        row = await only_delivery(reopened)
        assert (row.status, row.attempts) == (DeliveryStatus.DONE, 1)
    finally:
        await reopened.close()


async def test_deeply_nested_event_crosses_the_writer_process(
    sqlite_url: str, clock: FakeClock
) -> None:
    """An event nested 1000 levels (orjson parses up to 1024; intake now refuses more than
    MAX_JSON_DEPTH, but older rows hold such bodies) is claimed through the SQLite writer
    *process* and delivered, and the dispatcher goes on with the next event. Pickling the
    parsed tree once failed ("unpicklable reply: maximum recursion depth exceeded") and
    stopped the dispatcher for every event."""
    store = open_store(sqlite_url, sqlite_process=True)
    await store.open()
    try:
        depth = 1000
        raw = b'{"id":"evt_deep","type":"job.completed","x":' + b"[" * depth + b"]" * depth
        deep = Event.from_stored(raw + b"}")
        assert await store.accept(deep, ["recorder"], now=clock())
        plain = await accept(store, clock)
        handler = RecordingHandler()
        d = dispatcher(store, [handler], clock)
        async with running(d):
            await d.drain()
        assert sorted(e.id for e in handler.calls) == sorted(["evt_deep", plain.id])
        assert next(e for e in handler.calls if e.id == "evt_deep").raw == deep.raw
    finally:
        await store.close()


class _ClaimFailsOnce:
    """The real SQLite store, except that its first ``claim`` raises a bug's exception."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.failed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def claim(self, **kwargs: object) -> object:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unpicklable reply: a store bug")
        return await self._store.claim(**kwargs)  # type: ignore[arg-type]


async def test_an_unexpected_claim_error_does_not_stop_dispatching(
    store: Store, clock: FakeClock
) -> None:
    """A claim that raises something other than StoreUnavailable (a store bug) is logged and
    retried after a backoff; the dispatcher goes on and delivers. It once ended the loop
    ("dispatcher.crashed") and nothing was delivered again until a restart."""
    event = await accept(store, clock)
    flaky = _ClaimFailsOnce(store)
    handler = RecordingHandler()
    d = dispatcher(flaky, [handler], clock)  # type: ignore[arg-type]
    async with running(d):
        await wait_until(lambda: bool(handler.calls), within_seconds=10)
    assert flaky.failed
    assert [e.id for e in handler.calls] == [event.id]
