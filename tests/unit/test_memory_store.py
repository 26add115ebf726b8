"""MemoryStore, the in-memory reference Store: direct checks of the contract's sharper rules.

(The shared contract suite runs over the real backends; these pin down the
reference implementation the dispatcher's unit tests rely on.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from lacuna_webhooks.errors import EventNotFound, StoreUnavailable
from lacuna_webhooks.models import Attempt, AttemptOutcome, DeliveryStatus, Event
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import make_event

T0 = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=90)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


def event(event_id: str, event_type: str = "job.completed", **kwargs: object) -> Event:
    body = make_event(event_id, event_type, **kwargs)  # type: ignore[arg-type]
    return Event.from_body(orjson.dumps(body))


def attempt(outcome: AttemptOutcome = AttemptOutcome.OK, error: str | None = None) -> Attempt:
    return Attempt(
        started_at=T0, finished_at=T0 + timedelta(seconds=1), outcome=outcome, error=error
    )


async def test_accept_deduplicates_on_event_id(store: MemoryStore) -> None:
    """A second accept of the same id returns False and adds no delivery."""
    assert await store.accept(event("evt_1"), ["a", "b", "a"], now=T0)
    assert not await store.accept(event("evt_1"), ["c"], now=T0)
    rows = await store.list_deliveries()
    assert sorted(r.handler for r in rows) == ["a", "b"]
    assert all(r.status is DeliveryStatus.PENDING and r.next_attempt_at == T0 for r in rows)


async def test_claim_takes_oldest_due_first_and_counts_the_attempt(store: MemoryStore) -> None:
    """claim: only due, unleased deliveries of the handler, oldest due first, up to limit."""
    for i in range(3):
        await store.accept(event(f"evt_{i}"), ["a", "b"], now=T0 + timedelta(seconds=i))
    now = T0 + timedelta(seconds=10)
    first = await store.claim(handler="a", limit=2, lease=LEASE, now=now)
    assert [d.event.id for d in first] == ["evt_0", "evt_1"]
    assert all(d.handler == "a" and d.attempts == 1 and d.lease_token == 1 for d in first)
    rest = await store.claim(handler="a", limit=5, lease=LEASE, now=now)
    assert [d.event.id for d in rest] == ["evt_2"]
    assert await store.claim(handler="a", limit=5, lease=LEASE, now=now) == []
    assert len(await store.claim(handler="b", limit=5, lease=LEASE, now=now)) == 3


async def test_not_yet_due_is_not_claimed(store: MemoryStore) -> None:
    """A delivery whose retry is in the future stays put until then."""
    await store.accept(event("evt_1"), ["a"], now=T0)
    (d,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
    later = T0 + timedelta(seconds=30)
    assert await store.retry(d, attempt(AttemptOutcome.RETRY, "x"), at=later)
    assert await store.claim(handler="a", limit=1, lease=LEASE, now=later - timedelta(0, 1)) == []
    (again,) = await store.claim(handler="a", limit=1, lease=LEASE, now=later)
    assert again.attempts == 2


async def test_expired_lease_is_claimable_and_old_claim_loses_its_say(store: MemoryStore) -> None:
    """After the lease expires another claim takes over; the first claim's outcome is refused."""
    await store.accept(event("evt_1"), ["a"], now=T0)
    (old,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
    assert await store.claim(handler="a", limit=1, lease=LEASE, now=T0 + LEASE / 2) == []
    (new,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0 + LEASE)
    assert new.lease_token == old.lease_token + 1
    assert not await store.complete(old, attempt())
    assert not await store.dead(old, attempt(AttemptOutcome.DEAD, "x"))
    assert not await store.release(old)
    assert await store.complete(new, attempt())
    (row,) = await store.list_deliveries()
    assert row.status is DeliveryStatus.DONE
    assert len(await store.list_attempts(row.id)) == 1


async def test_release_undoes_the_attempt(store: MemoryStore) -> None:
    """release: due again at once, attempts back to before the claim, nothing recorded."""
    await store.accept(event("evt_1"), ["a"], now=T0)
    (d,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
    assert await store.release(d)
    assert not await store.complete(d, attempt())  # a released claim has no say any more
    (row,) = await store.list_deliveries()
    assert (row.attempts, row.lease_until, row.status) == (0, None, DeliveryStatus.PENDING)
    assert await store.list_attempts(row.id) == []
    assert (await store.stats(now=T0)).due == 1


async def test_outcomes_record_attempts_oldest_first(store: MemoryStore) -> None:
    """Each outcome appends its attempt; the stored error is bounded to 2000 characters."""
    await store.accept(event("evt_1"), ["a"], now=T0)
    (d,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
    await store.retry(d, attempt(AttemptOutcome.RETRY, "E" * 5000), at=T0)
    (d,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
    await store.dead(d, attempt(AttemptOutcome.DEAD, "PermanentError: no"))
    (row,) = await store.list_deliveries()
    assert row.status is DeliveryStatus.DEAD
    assert row.last_error == "PermanentError: no"
    attempts = await store.list_attempts(row.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, AttemptOutcome.RETRY),
        (2, AttemptOutcome.DEAD),
    ]
    assert len(attempts[0].error or "") == 2000


async def test_stats(store: MemoryStore) -> None:
    """pending counts every pending row; due excludes leased and future ones; running is leased."""
    for i in range(4):
        await store.accept(event(f"evt_{i}"), ["a"], now=T0)
    now = T0 + timedelta(seconds=60)
    running, waiting, dying = await store.claim(handler="a", limit=3, lease=LEASE, now=now)
    await store.retry(waiting, attempt(AttemptOutcome.RETRY, "x"), at=now + timedelta(hours=1))
    await store.dead(dying, attempt(AttemptOutcome.DEAD, "x"))
    stats = await store.stats(now=now)
    assert (stats.pending, stats.due, stats.running, stats.dead) == (3, 1, 1, 1)
    assert stats.oldest_due_age_seconds == 60.0
    assert running.attempts == 1


async def test_task_state_ignores_an_older_event(store: MemoryStore) -> None:
    """The per-task state follows the newest `created`; an older late event is superseded."""
    await store.accept(event("evt_new", "job.failed", task_id="cm1", created=200), [], now=T0)
    await store.accept(event("evt_old", "job.completed", task_id="cm1", created=100), [], now=T0)
    task = await store.get_task("cm1")
    assert task is not None
    assert (task.event_id, task.status) == ("evt_new", "failed")
    old = await store.get_event("evt_old")
    assert old is not None
    assert old.superseded
    await store.accept(event("evt_newer", task_id="cm1", created=300), [], now=T0)
    task = await store.get_task("cm1")
    assert task is not None
    assert task.event_id == "evt_newer"


async def test_prune_keeps_recent_and_unfinished_events(store: MemoryStore) -> None:
    """prune deletes only events older than the cutoff whose deliveries are all done or dead."""
    await store.accept(event("evt_done"), ["a"], now=T0)
    await store.accept(event("evt_pending"), ["a"], now=T0)
    await store.accept(event("evt_recent"), [], now=T0 + timedelta(days=2))
    (d, _) = await store.claim(handler="a", limit=2, lease=LEASE, now=T0)
    await store.complete(d, attempt())
    assert await store.prune(received_before=T0 + timedelta(days=1)) == 1
    assert await store.get_event(d.event.id) is None
    assert [e.id for e in await store.list_events()] == ["evt_recent", "evt_pending"]
    assert len(await store.list_deliveries()) == 1


async def test_replay_and_retry_dead_give_a_fresh_budget(store: MemoryStore) -> None:
    """replay resets (or creates) deliveries; retry_dead revives dead ones; both due now."""
    await store.accept(event("evt_1"), ["a"], now=T0)
    (d,) = await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
    await store.dead(d, attempt(AttemptOutcome.DEAD, "x"))
    later = T0 + timedelta(hours=1)
    assert await store.retry_dead(handler="b", now=later) == 0
    assert await store.retry_dead(handler="a", now=later) == 1
    (row,) = await store.list_deliveries()
    assert (row.status, row.attempts, row.next_attempt_at) == (DeliveryStatus.PENDING, 0, later)
    assert await store.replay("evt_1", ["a", "b"], now=later) == 2
    assert sorted(r.handler for r in await store.list_deliveries(event_id="evt_1")) == ["a", "b"]
    assert await store.replay("evt_1", None, now=later) == 2
    with pytest.raises(EventNotFound):
        await store.replay("evt_nope", None, now=later)


async def test_wait_for_work_returns_on_accept(store: MemoryStore) -> None:
    """wait_for_work returns as soon as an accept happens, and times out otherwise."""
    await store.wait_for_work(0.001)  # nothing pending: returns after its timeout
    waiter = asyncio.create_task(store.wait_for_work(3600))
    await asyncio.sleep(0)
    assert not waiter.done()
    await store.accept(event("evt_1"), ["a"], now=T0)
    await asyncio.wait_for(waiter, 5)
    # A nudge that arrives while nobody waits is kept for the next wait.
    await store.accept(event("evt_2"), ["a"], now=T0)
    await asyncio.wait_for(store.wait_for_work(3600), 5)


async def test_unavailable_or_closed_raises_store_unavailable(store: MemoryStore) -> None:
    """The test switch and a closed store both surface as StoreUnavailable."""
    store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.accept(event("evt_1"), ["a"], now=T0)
    store.unavailable = False
    await store.ping()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.claim(handler="a", limit=1, lease=LEASE, now=T0)
