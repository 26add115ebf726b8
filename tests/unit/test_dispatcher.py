"""The dispatcher on the in-memory store: outcomes, retries, isolation, leases, stop and drain.

Time that matters (retry due dates, lease expiry) runs on a fake clock; the
only real waits are bounded (``drain``, ``wait_until``), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from lacuna_webhooks.dispatch import LEASE_MARGIN, Retention
from lacuna_webhooks.errors import PermanentError, RetryLater, StoreUnavailable
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.metrics import Metrics
from lacuna_webhooks.models import Attempt, AttemptOutcome, DeliveryStatus, Event
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import make_event
from tests.dispatching import FakeClock, make_dispatcher, only_delivery, running, wait_until

T0 = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=5, base_delay_seconds=5.0, max_delay_seconds=3600.0)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


dispatcher = functools.partial(make_dispatcher, policy=POLICY, poll_interval_seconds=0.02)


def new_event(**kwargs: object) -> Event:
    return Event.from_body(orjson.dumps(make_event(**kwargs)))  # type: ignore[arg-type]


async def accept(store: MemoryStore, clock: FakeClock, *handlers: str, **kwargs: object) -> Event:
    event = new_event(**kwargs)
    assert await store.accept(event, list(handlers) or ["recorder"], now=clock())
    return event


# -- outcomes ----------------------------------------------------------------------------------


async def test_success_completes_the_delivery(store: MemoryStore, clock: FakeClock) -> None:
    """A handler that returns marks the delivery done after one attempt, recorded as ok."""
    handler = RecordingHandler()
    d = dispatcher(store, [handler], clock)
    event = await accept(store, clock)
    async with running(d):
        await d.drain()
    assert [e.id for e in handler.calls] == [event.id]
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DONE
    assert row.attempts == 1
    (attempt,) = await store.list_attempts(row.id)
    assert attempt.outcome is AttemptOutcome.OK
    assert attempt.error is None
    assert attempt.attempt == 1
    assert attempt.started_at == T0  # by the clock; its length by the monotonic one
    assert T0 <= attempt.finished_at < T0 + timedelta(seconds=1)


class FlakyRecords(MemoryStore):
    """A memory store whose first ``failures`` outcome writes fail as a locked or full
    database's do."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def complete(self, *args: object, **kwargs: object) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("database is locked")
        return await super().complete(*args, **kwargs)  # type: ignore[arg-type]


async def test_an_outcome_the_store_fails_to_record_is_recorded_once_it_can(
    clock: FakeClock,
) -> None:
    """A finished attempt whose outcome could not be written (a lock held for seconds, a
    restarting writer, a full disk) was forgotten: the handler ran again once the lease
    ran out, and the first run was recorded nowhere. The outcome is tried again while the
    lease lasts: one run, one recorded attempt."""
    store = FlakyRecords(failures=3)
    await store.open()
    try:
        handler = RecordingHandler()
        d = dispatcher(store, [handler], clock)
        await accept(store, clock)
        with capture_logs() as logs:
            async with running(d):
                await wait_until(lambda: store.failures == 0, 30)
                await d.drain()
        assert len(handler.calls) == 1
        row = await only_delivery(store)
        assert (row.status, row.attempts) == (DeliveryStatus.DONE, 1)
        (attempt,) = await store.list_attempts(row.id)
        assert attempt.outcome is AttemptOutcome.OK
        retries = [e for e in logs if e["event"] == "delivery.record_retry"]
        assert len(retries) == 3
        assert [e for e in logs if e["event"] == "delivery.record_failed"] == []
    finally:
        await store.close()


class ClaimsDown(MemoryStore):
    """A memory store whose claims fail while ``down``."""

    down = False

    async def claim(self, *args: object, **kwargs: object) -> Any:
        if self.down:
            raise StoreUnavailable("database is locked")
        return await super().claim(*args, **kwargs)  # type: ignore[arg-type]


class Gated(RecordingHandler):
    """Each attempt waits for the next ``gate.release()``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Semaphore(0)

    async def handle(self, event: Event) -> None:
        await self.gate.acquire()
        await super().handle(event)


async def test_attempts_ending_in_an_outage_do_not_stretch_the_backoff(clock: FakeClock) -> None:
    """Each attempt that ended during a store outage woke the loop, and each failed claim
    doubled the backoff: six of them took it from 0.05 s to 1.6 s (to its 30 s maximum
    within 100 ms in a real outage), and deliveries stood still that long after the store
    came back. Only a wait that runs its course doubles it now."""
    store = ClaimsDown()
    await store.open()
    try:
        handler = Gated()
        d = dispatcher(store, [handler], clock, concurrency=6)
        for n in range(6):
            await accept(store, clock, event_id=f"evt_gated_{n}")
        with capture_logs() as logs:
            async with running(d):
                await wait_until(lambda: d.in_flight == 6, 10)
                store.down = True
                for n in range(6):
                    handler.gate.release()
                    await wait_until(lambda n=n: d.in_flight == 5 - n, 10)  # type: ignore[misc]
                    await asyncio.sleep(0.01)
                await wait_until(lambda: d.in_flight == 0, 10)
                store.down = False
        retry_in = [
            e["retry_in_seconds"] for e in logs if e["event"] == "dispatcher.store_unavailable"
        ]
        assert len(retry_in) >= 3
        assert max(retry_in) <= 0.2, retry_in
    finally:
        await store.close()


async def test_failures_retry_on_a_doubling_schedule(store: MemoryStore, clock: FakeClock) -> None:
    """After failure n the delivery is due base * 2**(n-1) seconds later (rand at midpoint)."""
    handler = RecordingHandler(script=[ValueError("boom")] * 3)
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    async with running(d):
        for n, expected in enumerate([5.0, 10.0, 20.0], start=1):
            await d.drain()
            row = await only_delivery(store)
            assert row.status is DeliveryStatus.PENDING
            assert row.attempts == n
            assert row.next_attempt_at == clock() + timedelta(seconds=expected)
            assert row.last_error == "ValueError: boom"
            clock.advance(expected)
        await d.drain()
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DONE
    assert len(handler.calls) == 4


async def test_retry_delays_are_jittered_within_bounds(
    store: MemoryStore, clock: FakeClock
) -> None:
    """With real randomness each delay stays within [0.8, 1.2] x base * 2**(n-1)."""
    handler = RecordingHandler(script=[ValueError("boom")] * 3)
    d = dispatcher(store, [handler], clock, rand=random.random)
    await accept(store, clock)
    async with running(d):
        for n in (1, 2, 3):
            await d.drain()
            row = await only_delivery(store)
            assert row.attempts == n
            delay = (row.next_attempt_at - clock()).total_seconds()
            nominal = 5.0 * 2 ** (n - 1)
            assert 0.8 * nominal <= delay <= 1.2 * nominal
            clock.advance(delay)


async def test_dead_after_max_attempts_with_every_attempt_recorded(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A handler that always fails is tried max_attempts times, then the delivery is dead."""
    handler = RecordingHandler(script=[ValueError("boom")] * 10)
    d = dispatcher(store, [handler], clock, policy=RetryPolicy(max_attempts=3))
    await accept(store, clock)
    async with running(d):
        for _ in range(3):
            await d.drain()
            clock.advance(3600)
        await d.drain()
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DEAD
    assert row.attempts == 3
    assert len(handler.calls) == 3
    attempts = await store.list_attempts(row.id)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert [a.outcome for a in attempts] == [
        AttemptOutcome.RETRY,
        AttemptOutcome.RETRY,
        AttemptOutcome.DEAD,
    ]
    assert all(a.error == "ValueError: boom" for a in attempts)
    assert all(a.finished_at >= a.started_at for a in attempts)


async def test_permanent_error_is_dead_at_once(store: MemoryStore, clock: FakeClock) -> None:
    """PermanentError skips the remaining budget; its message is the recorded reason."""
    handler = RecordingHandler(script=[PermanentError("recipient rejected")])
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    async with running(d):
        await d.drain()
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DEAD
    assert row.attempts == 1
    assert row.last_error == "PermanentError: recipient rejected"
    (attempt,) = await store.list_attempts(row.id)
    assert attempt.outcome is AttemptOutcome.DEAD


async def test_retry_later_delay_is_honoured(store: MemoryStore, clock: FakeClock) -> None:
    """RetryLater(delay_seconds=120) makes the next attempt due 120 s later, not on the schedule."""
    handler = RecordingHandler(script=[RetryLater("rate limited", delay_seconds=120)])
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    async with running(d):
        await d.drain()
        row = await only_delivery(store)
        assert row.status is DeliveryStatus.PENDING
        assert row.next_attempt_at == T0 + timedelta(seconds=120)
        assert row.last_error == "RetryLater: rate limited"
        clock.advance(119)
        await d.drain()
        assert len(handler.calls) == 1
        clock.advance(1)
        await d.drain()
    assert len(handler.calls) == 2
    assert (await only_delivery(store)).status is DeliveryStatus.DONE


async def test_retry_later_without_delay_uses_the_schedule(
    store: MemoryStore, clock: FakeClock
) -> None:
    """RetryLater() with no delay waits the policy's delay for that attempt."""
    handler = RecordingHandler(script=[RetryLater()])
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    async with running(d):
        await d.drain()
    assert (await only_delivery(store)).next_attempt_at == T0 + timedelta(seconds=5)


async def test_retry_later_on_the_last_attempt_is_dead(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A handler cannot extend the budget: RetryLater on the last attempt ends dead."""
    handler = RecordingHandler(script=[RetryLater(delay_seconds=1)])
    d = dispatcher(store, [handler], clock, policy=RetryPolicy(max_attempts=1))
    await accept(store, clock)
    async with running(d):
        await d.drain()
    assert (await only_delivery(store)).status is DeliveryStatus.DEAD


async def test_timeout_is_retried(store: MemoryStore, clock: FakeClock) -> None:
    """A handler that outlives its timeout is cut off and the delivery retried on the schedule."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()  # never set: the handler hangs
    handlers = HandlerSet({"recorder": handler}, {"recorder": None}, {"recorder": 0.05})
    d = dispatcher(store, handlers, clock)
    await accept(store, clock)
    async with running(d):
        await d.drain()
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.PENDING
    assert row.attempts == 1
    assert row.next_attempt_at == T0 + timedelta(seconds=5)
    assert row.last_error == "TimeoutError: handler exceeded 0.05s"


@pytest.mark.parametrize(
    "exc", [SystemExit(0), KeyboardInterrupt(), GeneratorExit(), asyncio.CancelledError()]
)
async def test_base_exceptions_are_recorded_and_retried(
    store: MemoryStore, clock: FakeClock, exc: BaseException
) -> None:
    """A handler raising any BaseException gets an attempt recorded (retry) and the loop
    goes on: the next event is delivered."""
    handler = RecordingHandler(script=[exc])
    d = dispatcher(store, [handler], clock)
    first = await accept(store, clock)
    async with running(d) as task:
        await d.drain()
        second = await accept(store, clock)
        await d.drain()
        assert not task.done()
    row = await only_delivery(store, event_id=first.id)
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 1)
    (attempt,) = await store.list_attempts(row.id)
    assert attempt.outcome is AttemptOutcome.RETRY
    assert (attempt.error or "").startswith(type(exc).__name__)
    assert (await only_delivery(store, event_id=second.id)).status is DeliveryStatus.DONE


async def test_handlers_own_timeout_error_is_reported_as_is(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A TimeoutError the handler raises itself is retried with its own message, not blamed
    on the dispatcher's deadline."""
    handler = RecordingHandler(script=[TimeoutError("upstream read timed out")])
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    async with running(d):
        await d.drain()
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.PENDING
    assert row.last_error == "TimeoutError: upstream read timed out"


# -- isolation and wake-ups ----------------------------------------------------------------------


async def test_slow_handler_does_not_block_another(store: MemoryStore, clock: FakeClock) -> None:
    """While one handler's slots are all taken by hung calls, another handler keeps delivering."""
    slow, fast = RecordingHandler("slow"), RecordingHandler("fast")
    slow.block = asyncio.Event()
    d = dispatcher(store, [slow, fast], clock, concurrency=2)
    for _ in range(5):
        await accept(store, clock, "slow", "fast")
    async with running(d):

        async def fast_all_done() -> bool:
            done = await store.list_deliveries(handler="fast", status=DeliveryStatus.DONE)
            return len(done) == 5

        await wait_until(fast_all_done)
        assert len(slow.calls) == 2  # its two slots, no more
        assert d.in_flight == 2
        slow.block.set()
        await d.drain()
    assert len(slow.calls) == 5
    done = await store.list_deliveries(status=DeliveryStatus.DONE)
    assert len(done) == 10


async def test_a_clock_step_past_the_lease_does_not_run_an_attempt_twice(
    store: MemoryStore, clock: FakeClock
) -> None:
    """The clock steps 2 h forward while an attempt runs: its lease has run out, and the next
    claim pass claims the same delivery again. It used to start a second run beside the
    first (the first's outcome then refused); now the running attempt carries on under the
    new lease and its outcome is recorded, once."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()
    d = dispatcher(store, [handler], clock, concurrency=2)
    await accept(store, clock)
    async with running(d):
        await wait_until(lambda: len(handler.calls) == 1)
        clock.advance(2 * 3600)

        async def claimed_again() -> bool:
            (row,) = await store.list_deliveries()
            return row.attempts == 2  # the claim counted its attempt

        await wait_until(claimed_again)
        await asyncio.sleep(0.1)  # more claim passes: none may start a second run
        assert len(handler.calls) == 1
        handler.block.set()
        await d.drain()
    assert len(handler.calls) == 1
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DONE
    (attempt,) = await store.list_attempts(row.id)
    assert attempt.outcome is AttemptOutcome.OK


@pytest.mark.parametrize("watched", [True, False])
async def test_a_clock_step_back_brings_the_schedules_written_before_it_forward(
    store: MemoryStore, clock: FakeClock, watched: bool
) -> None:
    """The first attempt fails: its retry is due at T0 + 5 s. The wall clock then steps back
    an hour (the monotonic one does not). Watching the clock, the dispatcher has the store
    bring that retry forward by the step: it runs 5 s after the step, not an hour and 5 s
    later. Without ``monotonic`` nothing is watched and the retry waits the hour."""
    handler = RecordingHandler(script=[RuntimeError("boom")])
    d = dispatcher(store, [handler], clock, monotonic=(lambda: 0.0) if watched else None)
    await accept(store, clock)
    async with running(d):
        await wait_until(lambda: len(handler.calls) == 1)
        clock.advance(-3600)
        with capture_logs() as logs:
            await asyncio.sleep(0.1)  # claim passes at the stepped clock
            (row,) = await store.list_deliveries()
            assert len(handler.calls) == 1
            clock.advance(5)
            if watched:
                # Still 5 s after the step (the same 5 s, not an hour and 5 s later).
                assert row.next_attempt_at == T0 - timedelta(seconds=3595)
                await wait_until(lambda: len(handler.calls) == 2)
                await d.drain()
            else:
                assert row.next_attempt_at == T0 + timedelta(seconds=5)
                await asyncio.sleep(0.1)
                assert len(handler.calls) == 1
    steps = [e for e in logs if e["event"] == "dispatcher.clock_stepped_back"]
    if watched:
        assert steps == [
            {
                "event": "dispatcher.clock_stepped_back",
                "log_level": "warning",
                "seconds": 3600.0,
                "deliveries_moved": 1,
            }
        ]
        assert (await only_delivery(store)).status is DeliveryStatus.DONE
    else:
        assert steps == []


async def test_a_step_forward_then_back_leaves_the_schedules_written_before_both(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A retry due at T0 + 2 h is written; the wall clock steps an hour forward, then back
    to true time. That retry was written by the true clock: it stays due at T0 + 2 h (it
    was moved to T0 + 1 h, an hour early, as if written during the hour ahead). A retry
    written while the clock was ahead is brought back by the step, as after any step."""
    handler = RecordingHandler(script=[RuntimeError("boom")])
    assert await store.accept(new_event(event_id="evt_before"), ["recorder"], now=T0)
    (before,) = await store.claim(handler="recorder", limit=1, lease=LEASE_MARGIN, now=T0)
    later = T0 + timedelta(hours=2)
    assert await store.retry(before, Attempt(T0, T0, AttemptOutcome.RETRY, "x"), at=later)
    d = dispatcher(store, [handler], clock, monotonic=lambda: 0.0)
    async with running(d):
        await asyncio.sleep(0.05)  # a claim pass reads the clock
        clock.advance(3600)
        await asyncio.sleep(0.05)  # the step forward is seen
        await accept(store, clock, event_id="evt_during")
        await wait_until(lambda: len(handler.calls) == 1)  # its retry: 5 s, by the clock ahead
        await asyncio.sleep(0.05)
        clock.advance(-3600)
        await asyncio.sleep(0.05)  # the step back is seen
        rows = {r.event_id: r for r in await store.list_deliveries()}
        assert rows["evt_before"].next_attempt_at == later
        assert rows["evt_during"].next_attempt_at == T0 + timedelta(seconds=5)
        await d.stop(1.0)


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's boot-time clock")
async def test_serves_dispatcher_watches_the_wall_clock_against_one_that_counts_suspend(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monotonic clock stops while the machine sleeps (a laptop's lid, a VM suspended)
    and the wall clock does not: against it, every resume read as a step forward of the
    wall clock by the sleep, and a later step back then left every schedule written before
    the sleep unmoved. The boot-time clock counts the sleep."""
    from lacuna_webhooks.config import Settings
    from lacuna_webhooks.dispatch.service import build_dispatch

    real = time.clock_gettime
    slept = 3600.0  # the boot-time clock is an hour of sleep ahead of the monotonic one

    def clock_gettime(clock_id: int) -> float:
        return real(clock_id) + (slept if clock_id == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    settings = Settings.from_env({}, require_secret=False)
    service = build_dispatch(settings, store, HandlerSet.of([RecordingHandler()]))
    watch = service.dispatcher.monotonic
    assert watch is not None
    assert watch() - time.monotonic() > slept - 1


class ClockAhead(MemoryStore):
    """A memory store with a clock of its own, ten minutes ahead of the dispatcher's (as
    PostgreSQL's is of a worker whose clock runs behind)."""

    async def clock_offset(self) -> timedelta | None:
        return timedelta(minutes=10)


async def test_a_watching_dispatcher_decides_by_the_stores_clock(clock: FakeClock) -> None:
    """An event stored at the store's time (ten minutes ahead of the dispatcher's wall clock)
    is due at once, and the retry of its failed attempt is scheduled 5 s after it by the
    store's clock: not ten minutes later, as by the dispatcher's own."""
    store = ClockAhead()
    await store.open()
    try:
        handler = RecordingHandler(script=[RuntimeError("boom")])
        d = dispatcher(store, [handler], clock, monotonic=lambda: 0.0)
        ahead = T0 + timedelta(minutes=10)
        assert await store.accept(new_event(), ["recorder"], now=ahead)
        async with running(d):
            await wait_until(lambda: len(handler.calls) == 1)
            await asyncio.sleep(0.05)
            (row,) = await store.list_deliveries()
            assert row.next_attempt_at == ahead + timedelta(seconds=5)
            (attempt,) = await store.list_attempts(row.id)
            assert attempt.started_at == ahead
            clock.advance(5)
            await wait_until(lambda: len(handler.calls) == 2)
            await d.drain()
    finally:
        await store.close()


async def test_concurrency_limits_in_flight_attempts_per_handler(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A handler never runs more than ``concurrency`` attempts at once."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()
    d = dispatcher(store, [handler], clock, concurrency=3)
    for _ in range(7):
        await accept(store, clock)
    async with running(d):
        await wait_until(lambda: len(handler.calls) == 3)
        stats = await store.stats(now=clock())
        assert (stats.running, stats.due) == (3, 4)
        handler.block.set()
        await d.drain()
    assert len(handler.calls) == 7


async def test_accepted_event_is_dispatched_at_once(store: MemoryStore, clock: FakeClock) -> None:
    """With an hour-long poll interval, an accept still wakes the idle loop immediately."""
    handler = RecordingHandler()
    d = dispatcher(store, [handler], clock, poll_interval_seconds=3600)
    async with running(d):
        for n in (1, 2):
            await wait_until(lambda: d.idle)  # parked until the next poll, an hour away
            await accept(store, clock)
            await d.drain(timeout_seconds=5)
            assert len(handler.calls) == n


# -- leases, crashes, stop, drain ---------------------------------------------------------------


async def test_abandoned_claim_is_reclaimed_after_its_lease(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A delivery claimed by a worker that died is untouched until its lease expires, then
    claimed again (its attempt counted)."""
    handler = RecordingHandler()
    await accept(store, clock)
    lease = timedelta(seconds=60) + LEASE_MARGIN
    (claimed,) = await store.claim(handler="recorder", limit=1, lease=lease, now=clock())
    d = dispatcher(store, [handler], clock)
    async with running(d):
        await d.drain()
        assert handler.calls == []
        clock.advance(lease.total_seconds() - 1)
        await d.drain()
        assert handler.calls == []
        clock.advance(1)
        await d.drain()
    assert len(handler.calls) == 1
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DONE
    assert row.attempts == 2
    (attempt,) = await store.list_attempts(row.id)
    assert attempt.attempt == 2
    assert not await store.complete(claimed, attempt_like(clock))  # the dead worker's late word


def attempt_like(clock: FakeClock) -> Attempt:
    return Attempt(started_at=clock(), finished_at=clock(), outcome=AttemptOutcome.OK)


async def test_crashing_handler_ends_dead_after_max_attempts(
    store: MemoryStore, clock: FakeClock
) -> None:
    """Claims that never recorded an outcome (the process died each time) still spend the
    budget: the next claim past it records dead without calling the handler."""
    handler = RecordingHandler()
    await accept(store, clock)
    lease = timedelta(seconds=90)
    for _ in range(POLICY.max_attempts):
        assert await store.claim(handler="recorder", limit=1, lease=lease, now=clock())
        clock.advance(91)
    d = dispatcher(store, [handler], clock)
    async with running(d):
        await d.drain()
    assert handler.calls == []
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DEAD
    assert "spent" in (row.last_error or "")


async def test_stop_releases_a_blocked_delivery(store: MemoryStore, clock: FakeClock) -> None:
    """stop() with a hung handler returns after its bound, and the delivery is given back:
    due again at once, the interrupted attempt neither counted nor recorded."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    task = asyncio.create_task(d.run())
    await wait_until(lambda: len(handler.calls) == 1)
    await asyncio.wait_for(d.stop(0.05), 5)
    await asyncio.wait_for(task, 5)
    assert d.in_flight == 0
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.PENDING
    assert row.attempts == 0
    assert row.lease_until is None
    assert (await store.stats(now=clock())).due == 1
    assert await store.list_attempts(row.id) == []


async def test_cancelling_run_releases_in_flight_deliveries(
    store: MemoryStore, clock: FakeClock
) -> None:
    """Cancelling run() (instead of stop()) still gives in-flight claims back to the store."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    task = asyncio.create_task(d.run())
    await wait_until(lambda: len(handler.calls) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert d.in_flight == 0
    row = await only_delivery(store)
    assert (row.status, row.attempts, row.lease_until) == (DeliveryStatus.PENDING, 0, None)


async def test_stop_lets_in_flight_attempts_finish_within_the_bound(
    store: MemoryStore, clock: FakeClock
) -> None:
    """An attempt that finishes before the stop bound is recorded normally, not released."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    task = asyncio.create_task(d.run())
    await wait_until(lambda: len(handler.calls) == 1)
    stopping = asyncio.create_task(d.stop(30))
    await wait_until(task.done)  # the loop stops claiming at once...
    assert not stopping.done()  # ...while stop() still waits for the attempt
    handler.block.set()
    await asyncio.wait_for(stopping, 5)
    row = await only_delivery(store)
    assert row.status is DeliveryStatus.DONE
    assert row.attempts == 1


async def test_drain_waits_for_in_flight_attempts(store: MemoryStore, clock: FakeClock) -> None:
    """drain() does not return while an attempt runs, and returns once it is recorded."""
    handler = RecordingHandler()
    handler.block = asyncio.Event()
    d = dispatcher(store, [handler], clock)
    await accept(store, clock)
    async with running(d):
        draining = asyncio.create_task(d.drain())
        await wait_until(lambda: len(handler.calls) == 1)
        for _ in range(20):
            await asyncio.sleep(0)  # let drain run as far as it can
        assert not draining.done()
        handler.block.set()
        await asyncio.wait_for(draining, 5)
        assert (await only_delivery(store)).status is DeliveryStatus.DONE


async def test_drain_times_out_when_nothing_dispatches(
    store: MemoryStore, clock: FakeClock
) -> None:
    """With work due and the loop not running, drain() raises TimeoutError at its bound."""
    d = dispatcher(store, [RecordingHandler()], clock)
    await accept(store, clock)
    with pytest.raises(TimeoutError):
        await d.drain(timeout_seconds=0.05)


async def test_drain_returns_at_once_when_idle(store: MemoryStore, clock: FakeClock) -> None:
    """Nothing due and nothing in flight: drain() returns without the loop running."""
    d = dispatcher(store, [RecordingHandler()], clock)
    await d.drain(timeout_seconds=1)
    assert d.in_flight == 0


# -- observability, store failures, retention ----------------------------------------------------


async def test_attempt_log_line_has_the_documented_keys(
    store: MemoryStore, clock: FakeClock
) -> None:
    """Each attempt logs "delivery.attempt" with event_id, event_type, handler, attempt, outcome,
    duration_ms and error; a URL in an error keeps only its host."""
    handler = RecordingHandler(
        script=[ValueError("POST https://hooks.slack.com/services/T0/B0/SECRET failed"), None]
    )
    d = dispatcher(store, [handler], clock)
    with capture_logs() as logs:
        event = await accept(store, clock)
        async with running(d):
            await d.drain()
            clock.advance(5)
            await d.drain()
    lines = [entry for entry in logs if entry["event"] == "delivery.attempt"]
    assert [line["outcome"] for line in lines] == ["retry", "ok"]
    for n, line in enumerate(lines, start=1):
        assert line["event_id"] == event.id
        assert line["event_type"] == "job.completed"
        assert line["handler"] == "recorder"
        assert line["attempt"] == n
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0
    assert lines[0]["error"] == "ValueError: POST https://hooks.slack.com/… failed"
    assert lines[0]["log_level"] == "warning"
    assert lines[1]["error"] is None
    assert lines[1]["log_level"] == "info"
    assert "SECRET" not in repr(logs)
    row = await only_delivery(store)
    assert "SECRET" not in repr(await store.list_attempts(row.id))


async def test_metrics_count_attempts_by_outcome(store: MemoryStore, clock: FakeClock) -> None:
    """deliveries{handler,outcome} counts each attempt; handler_latency observes each one."""
    metrics = Metrics()
    handler = RecordingHandler(script=[ValueError("boom"), None])
    d = dispatcher(store, [handler], clock, metrics=metrics)
    await accept(store, clock)
    async with running(d):
        await d.drain()
        clock.advance(5)
        await d.drain()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("lacuna_webhooks_deliveries_total", handler="recorder", outcome="ok") == 1
    assert sample("lacuna_webhooks_deliveries_total", handler="recorder", outcome="retry") == 1
    assert sample("lacuna_webhooks_handler_duration_seconds_count", handler="recorder") == 2


async def test_loop_survives_an_unavailable_store(store: MemoryStore, clock: FakeClock) -> None:
    """While the store is down the loop logs and backs off; once it is back, work flows."""
    handler = RecordingHandler()
    d = dispatcher(store, [handler], clock)
    with capture_logs() as logs:
        async with running(d) as task:
            store.unavailable = True
            await wait_until(
                lambda: any(e["event"] == "dispatcher.store_unavailable" for e in logs)
            )
            assert not task.done()
            store.unavailable = False
            await accept(store, clock)
            await d.drain()
    assert len(handler.calls) == 1


async def test_retention_prunes_old_delivered_events(store: MemoryStore, clock: FakeClock) -> None:
    """The retention task, beside the dispatcher, prunes events received longer ago than the
    retention once they are delivered, and keeps recent ones."""
    handler = RecordingHandler()
    old = new_event()
    assert await store.accept(old, ["recorder"], now=clock() - timedelta(days=3))
    recent = await accept(store, clock)
    d = dispatcher(store, [handler], clock)
    retention = Retention(store, timedelta(days=1), interval_seconds=0.01, clock=clock)
    with capture_logs() as logs:
        async with running(d):
            pruning = asyncio.create_task(retention.run())
            await d.drain()
            await wait_until(lambda: store_lacks(store, old.id))
            retention.stop()
            await asyncio.wait_for(pruning, 5)
    assert await store.get_event(recent.id) is not None
    assert any(e["event"] == "store.pruned" and e["events"] == 1 for e in logs)


async def test_retention_survives_an_unavailable_store(
    store: MemoryStore, clock: FakeClock
) -> None:
    """A prune that fails is logged and tried again at the next interval; the task goes on."""
    retention = Retention(store, timedelta(days=1), interval_seconds=0.01, clock=clock)
    store.unavailable = True
    with capture_logs() as logs:
        pruning = asyncio.create_task(retention.run())
        await wait_until(lambda: retention.passes >= 2)
        assert not pruning.done()
        retention.stop()
        await asyncio.wait_for(pruning, 5)
    assert any(e["event"] == "store.prune_failed" for e in logs)


async def store_lacks(store: MemoryStore, event_id: str) -> bool:
    return await store.get_event(event_id) is None


async def test_events_only_reach_their_handler(store: MemoryStore, clock: FakeClock) -> None:
    """The dispatcher runs each delivery on the handler it names, and no other."""
    a, b = RecordingHandler("a"), RecordingHandler("b")
    d = dispatcher(store, [a, b], clock)
    only_a = await accept(store, clock, "a")
    both = await accept(store, clock, "a", "b")
    async with running(d):
        await d.drain()
    assert sorted(e.id for e in a.calls) == sorted([only_a.id, both.id])
    assert [e.id for e in b.calls] == [both.id]
