"""The ``Store`` contract, run unchanged against every backend (the ``store`` fixture).

Written only against the protocol in ``store/base.py``: what one backend does
here, every backend does. Time is injected (``now=``), so due times and leases
are tested without waiting.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from lacuna_webhooks.errors import EventNotFound, StoreUnavailable
from lacuna_webhooks.models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.base import EventFilter, Recorded, ReplayCounts, ScanBudget, Tally
from tests.conftest import make_event

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)
SECOND = timedelta(seconds=1)
# A bound for something that should happen promptly; a failure if exceeded, never a measurement.
PROMPT = 10.0


def event(event_id: str | None = None, event_type: str = "job.completed", **kwargs: Any) -> Event:
    return Event.from_body(orjson.dumps(make_event(event_id, event_type, **kwargs)))


def attempt(outcome: AttemptOutcome, at: datetime = NOW, error: str | None = None) -> Attempt:
    return Attempt(at, at + SECOND, outcome, error)


async def claim_one(store: Store, handler: str = "a", now: datetime = NOW) -> Delivery:
    claimed = await store.claim(handler=handler, limit=10, lease=LEASE, now=now)
    assert len(claimed) == 1, claimed
    return claimed[0]


# --- accept ---------------------------------------------------------------------------------


async def test_accept_new_then_duplicate(store: Store) -> None:
    """A new id is stored (True) with one pending delivery per handler; the same id again is a
    duplicate (False) that writes nothing, whatever handlers it names."""
    first = event("evt_dup")
    assert await store.accept(first, ["a", "b"], now=NOW) is True
    assert await store.accept(event("evt_dup"), ["a", "b", "c"], now=NOW + SECOND) is False

    deliveries = await store.list_deliveries(event_id="evt_dup")
    assert sorted(d.handler for d in deliveries) == ["a", "b"]
    assert {d.status for d in deliveries} == {DeliveryStatus.PENDING}
    assert {d.attempts for d in deliveries} == {0}
    assert {d.next_attempt_at for d in deliveries} == {NOW}
    stored = await store.get_event("evt_dup")
    assert stored is not None
    assert stored.raw == first.raw
    assert stored.received_at == NOW
    assert stored.to_event() == first


async def test_a_naive_time_is_utc_on_every_backend(store: Store) -> None:
    """A naive datetime handed to the library is read as UTC, never as local time: SQLite
    used to raise ValueError where PostgreSQL took it as UTC."""
    naive = NOW.replace(tzinfo=None)
    assert await store.accept(event("evt_naive"), ["a"], now=naive) is True
    stored = await store.get_event("evt_naive")
    assert stored is not None
    assert stored.received_at == NOW
    claimed = await store.claim(handler="a", limit=10, lease=LEASE, now=naive)
    assert [d.event.id for d in claimed] == ["evt_naive"]


async def test_accept_names_each_handler_once(store: Store) -> None:
    """A handler named twice still gets one delivery."""
    assert await store.accept(event("evt_twice"), ["a", "a"], now=NOW)
    assert len(await store.list_deliveries(event_id="evt_twice")) == 1


async def test_concurrent_accepts_of_one_id(store: Store) -> None:
    """50 concurrent accepts of one id: exactly one True, exactly one delivery per handler."""
    results = await asyncio.gather(
        *(store.accept(event("evt_race"), ["a", "b"], now=NOW) for _ in range(50))
    )
    assert results.count(True) == 1
    assert results.count(False) == 49
    deliveries = await store.list_deliveries(event_id="evt_race")
    assert sorted(d.handler for d in deliveries) == ["a", "b"]


async def test_accept_with_no_handlers_stores_the_event_only(store: Store) -> None:
    """With no handlers the event is recorded (and deduplicated) with no delivery."""
    assert await store.accept(event("evt_quiet"), [], now=NOW)
    assert await store.get_event("evt_quiet") is not None
    assert await store.list_deliveries(event_id="evt_quiet") == []
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW) == []
    assert await store.accept(event("evt_quiet"), ["a"], now=NOW) is False


# --- claim ----------------------------------------------------------------------------------


async def test_claim_returns_the_event_and_leases_it(store: Store) -> None:
    """A claim gives the delivery with its event rebuilt, attempts 1, and a lease."""
    original = event("evt_claim")
    await store.accept(original, ["a"], now=NOW)
    delivery = await claim_one(store)
    assert delivery.event == original
    assert delivery.event.raw == original.raw
    assert delivery.event.payload == original.payload
    assert delivery.handler == "a"
    assert delivery.status is DeliveryStatus.PENDING
    assert delivery.attempts == 1
    assert delivery.next_attempt_at == NOW
    assert delivery.created_at == NOW
    (record,) = await store.list_deliveries(event_id="evt_claim")
    # now + lease, or on PostgreSQL the database's now() + lease (store/base.py)
    assert record.lease_until is not None
    assert record.lease_until >= NOW + LEASE
    assert record.running(NOW)
    assert record.attempts == 1


async def test_claim_respects_due_time(store: Store) -> None:
    """A delivery is not claimable before it is due."""
    await store.accept(event("evt_due"), ["a"], now=NOW)
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW - SECOND) == []
    assert len(await store.claim(handler="a", limit=10, lease=LEASE, now=NOW)) == 1


def wall_now() -> datetime:
    """The real time: lease expiry is tested with short real leases, because on PostgreSQL
    leases follow the database's clock, not the injected ``now`` (store/base.py)."""
    return datetime.now(UTC)


SHORT_LEASE = timedelta(seconds=1)


async def take_over(store: Store, event_id: str) -> tuple[Delivery, Delivery]:
    """Accept ``event_id`` now, claim it with a short lease, and claim it again once that
    lease has expired; (first claim, second claim)."""
    start = wall_now()
    await store.accept(event(event_id), ["a"], now=start)
    (first,) = await store.claim(handler="a", limit=10, lease=SHORT_LEASE, now=start)
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=wall_now()) == []
    await asyncio.sleep(SHORT_LEASE.total_seconds() + 0.2)
    second = await claim_one(store, now=wall_now())
    return first, second


async def test_claim_respects_the_lease_and_takes_over_an_expired_one(store: Store) -> None:
    """A live lease hides the delivery; once expired it is claimable again with a new token."""
    first, second = await take_over(store, "evt_lease")
    assert second.id == first.id
    assert second.lease_token != first.lease_token
    assert second.attempts == 2


async def test_claim_filters_by_handler(store: Store) -> None:
    """A handler only ever claims its own deliveries."""
    await store.accept(event("evt_h"), ["a", "b"], now=NOW)
    got_a = await claim_one(store, "a")
    assert got_a.handler == "a"
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW) == []
    assert await store.claim(handler="c", limit=10, lease=LEASE, now=NOW) == []
    assert (await claim_one(store, "b")).handler == "b"


async def test_claim_takes_oldest_due_first_up_to_the_limit(store: Store) -> None:
    """``limit`` bounds a claim, and the oldest due delivery comes first."""
    for i in (2, 0, 1, 3):
        await store.accept(event(f"evt_order_{i}"), ["a"], now=NOW + i * SECOND)
    later = NOW + timedelta(minutes=1)
    first = await store.claim(handler="a", limit=2, lease=LEASE, now=later)
    assert [d.event.id for d in first] == ["evt_order_0", "evt_order_1"]
    rest = await store.claim(handler="a", limit=10, lease=LEASE, now=later)
    assert [d.event.id for d in rest] == ["evt_order_2", "evt_order_3"]
    assert await store.claim(handler="a", limit=0, lease=LEASE, now=later) == []


class ClockTime(datetime):
    """A ``datetime`` subclass, as a frozen or mocked clock in a user's tests hands out."""


async def test_store_times_may_be_a_datetime_subclass(store: Store) -> None:
    """Any aware ``datetime`` is a store time, a subclass too: the same instant, never
    refused (a 503 for a caller's clock) nor stored in a form that compares wrongly."""
    at = ClockTime(2025, 11, 21, 12, 0, tzinfo=UTC)
    assert await store.accept(event("evt_clock"), ["a"], now=at)
    (claimed,) = await store.claim(handler="a", limit=1, lease=LEASE, now=at)
    later = at + 10 * SECOND  # still a ClockTime
    assert isinstance(later, ClockTime)
    assert await store.retry(claimed, attempt(AttemptOutcome.RETRY, at, "boom"), at=later)
    assert await store.claim(handler="a", limit=1, lease=LEASE, now=NOW + 5 * SECOND) == []
    assert (await store.stats(now=at)).pending == 1
    (record,) = await store.list_deliveries(event_id="evt_clock")
    assert record.next_attempt_at == NOW + 10 * SECOND
    (again,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW + 10 * SECOND)
    assert again.id == claimed.id


# --- outcomes -------------------------------------------------------------------------------


async def test_complete_records_the_outcome_and_the_attempt(store: Store) -> None:
    """complete: status done, lease cleared, the attempt appended; no longer claimable."""
    await store.accept(event("evt_ok"), ["a"], now=NOW)
    delivery = await claim_one(store)
    assert await store.complete(delivery, attempt(AttemptOutcome.OK)) == Recorded(True)
    (record,) = await store.list_deliveries(event_id="evt_ok")
    assert record.status is DeliveryStatus.DONE
    assert record.lease_until is None
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW + LEASE * 2) == []
    (row,) = await store.list_attempts(delivery.id)
    assert row.outcome is AttemptOutcome.OK
    assert row.attempt == 1
    assert row.started_at == NOW
    assert row.duration_seconds == 1.0
    assert row.error is None


async def test_stale_token_cannot_record_an_outcome(store: Store) -> None:
    """After a takeover, the old claim's complete/retry/dead/release return False and change
    nothing; the new claim still can."""
    old, new = await take_over(store, "evt_stale")
    assert await store.complete(old, attempt(AttemptOutcome.OK)) == Recorded(False)
    assert await store.retry(old, attempt(AttemptOutcome.RETRY), at=NOW) == Recorded(False)
    assert await store.dead(old, attempt(AttemptOutcome.DEAD, error="x")) == Recorded(False)
    assert await store.release(old) is False
    (record,) = await store.list_deliveries(event_id="evt_stale")
    assert record.status is DeliveryStatus.PENDING
    assert record.attempts == 2
    assert record.running(wall_now())
    assert await store.list_attempts(old.id) == []
    assert await store.complete(new, attempt(AttemptOutcome.OK, at=wall_now())) == Recorded(True)


async def test_retry_schedules_the_next_attempt(store: Store) -> None:
    """retry: due at ``at``, lease cleared, error kept; claimable then, not before."""
    await store.accept(event("evt_retry"), ["a"], now=NOW)
    delivery = await claim_one(store)
    at = NOW + timedelta(seconds=60)
    assert await store.retry(delivery, attempt(AttemptOutcome.RETRY, error="HTTP 502"), at=at)
    (record,) = await store.list_deliveries(event_id="evt_retry")
    assert record.status is DeliveryStatus.PENDING
    assert record.next_attempt_at == at
    assert record.lease_until is None
    assert record.last_error == "HTTP 502"
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=at - SECOND) == []
    again = await claim_one(store, now=at)
    assert again.attempts == 2
    assert again.next_attempt_at == at


async def test_refunded_retry_records_the_attempt_but_not_its_count(store: Store) -> None:
    """retry(refund=True) (a 429): the attempt row is written with the claim's number, the
    delivery is due at ``at``, and ``attempts`` is back where it was before the claim, so the
    next claim carries the same number; a plain retry after it counts as usual."""
    await store.accept(event("evt_refund"), ["a"], now=NOW)
    first = await claim_one(store)
    assert first.attempts == 1
    at = NOW + timedelta(seconds=5)
    limited = attempt(AttemptOutcome.RETRY, error="HTTP 429")
    assert await store.retry(first, limited, at=at, refund=True)
    (record,) = await store.list_deliveries(event_id="evt_refund")
    assert (record.attempts, record.next_attempt_at, record.lease_until) == (0, at, None)
    assert [a.attempt for a in await store.list_attempts(first.id)] == [1]
    again = await claim_one(store, now=at)
    assert again.attempts == 1
    assert await store.retry(again, attempt(AttemptOutcome.RETRY, error="HTTP 502"), at=at)
    third = await claim_one(store, now=at)
    assert third.attempts == 2
    rows = await store.list_attempts(first.id)
    assert [(a.attempt, a.error) for a in rows] == [(1, "HTTP 429"), (1, "HTTP 502")]
    assert await store.retry(first, limited, at=at, refund=True) == Recorded(False)  # a stale claim


async def test_dead_stops_the_delivery(store: Store) -> None:
    """dead: status dead with its error, never claimed again, counted in stats."""
    await store.accept(event("evt_dead"), ["a"], now=NOW)
    delivery = await claim_one(store)
    assert await store.dead(delivery, attempt(AttemptOutcome.DEAD, error="410 Gone"))
    (record,) = await store.list_deliveries(status=DeliveryStatus.DEAD)
    assert record.event_id == "evt_dead"
    assert record.last_error == "410 Gone"
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW + LEASE * 2) == []
    assert (await store.stats(now=NOW)).dead == 1


async def test_release_gives_the_claim_back_without_an_attempt(store: Store) -> None:
    """release: lease cleared, the claim's attempt undone, due at once, no attempt row."""
    await store.accept(event("evt_release"), ["a"], now=NOW)
    delivery = await claim_one(store)
    assert await store.release(delivery) is True
    (record,) = await store.list_deliveries(event_id="evt_release")
    assert record.attempts == 0
    assert record.lease_until is None
    assert await store.list_attempts(delivery.id) == []
    again = await claim_one(store)
    assert again.attempts == 1


async def test_attempts_are_listed_oldest_first(store: Store) -> None:
    """Every finished attempt is recorded with its number, outcome and error."""
    await store.accept(event("evt_attempts"), ["a"], now=NOW)
    first = await claim_one(store)
    await store.retry(first, attempt(AttemptOutcome.RETRY, error="timeout"), at=NOW)
    second = await claim_one(store)
    await store.dead(second, attempt(AttemptOutcome.DEAD, at=NOW + SECOND, error="e" * 5000))
    rows = await store.list_attempts(first.id)
    assert [(r.attempt, r.outcome) for r in rows] == [
        (1, AttemptOutcome.RETRY),
        (2, AttemptOutcome.DEAD),
    ]
    assert rows[0].error == "timeout"
    assert rows[1].error is not None
    assert 0 < len(rows[1].error) <= 2000  # bounded, so a huge message cannot bloat rows
    assert await store.list_attempts(9_999_999) == []


# --- replay and retry_dead ------------------------------------------------------------------


async def test_replay_all_resets_existing_deliveries(store: Store) -> None:
    """replay(None): every delivery of the event pending, due now, attempts 0."""
    await store.accept(event("evt_replay"), ["a", "b"], now=NOW)
    await store.complete(await claim_one(store, "a"), attempt(AttemptOutcome.OK))
    await store.dead(await claim_one(store, "b"), attempt(AttemptOutcome.DEAD, error="x"))
    later = NOW + timedelta(hours=1)
    assert await store.replay("evt_replay", None, now=later) == 2
    records = await store.list_deliveries(event_id="evt_replay")
    assert {r.status for r in records} == {DeliveryStatus.PENDING}
    assert {r.attempts for r in records} == {0}
    assert {r.next_attempt_at for r in records} == {later}
    assert len(await store.claim(handler="a", limit=10, lease=LEASE, now=later)) == 1


async def test_replay_named_handlers_resets_or_creates(store: Store) -> None:
    """replay(handlers): resets those that exist, creates the missing, leaves the others."""
    await store.accept(event("evt_replay2"), ["a", "b"], now=NOW)
    done = await claim_one(store, "b")
    await store.complete(done, attempt(AttemptOutcome.OK))
    assert await store.replay("evt_replay2", ["b", "c"], now=NOW) == 2
    by_handler = {r.handler: r for r in await store.list_deliveries(event_id="evt_replay2")}
    assert set(by_handler) == {"a", "b", "c"}
    assert by_handler["b"].status is DeliveryStatus.PENDING
    assert by_handler["c"].status is DeliveryStatus.PENDING
    assert (await claim_one(store, "c")).event.id == "evt_replay2"


async def test_replay_of_an_event_without_deliveries(store: Store) -> None:
    """An event stored with no handlers replays to zero with None, and to new deliveries."""
    await store.accept(event("evt_replay3"), [], now=NOW)
    assert await store.replay("evt_replay3", None, now=NOW) == 0
    assert await store.replay("evt_replay3", ["a"], now=NOW) == 1


async def test_replay_of_an_unknown_event_raises(store: Store) -> None:
    """replay of an id the store does not hold raises EventNotFound."""
    with pytest.raises(EventNotFound):
        await store.replay("evt_missing", None, now=NOW)
    with pytest.raises(EventNotFound):
        await store.replay("evt_missing", ["a"], now=NOW)


async def test_replay_many_backfills_and_resets(store: Store) -> None:
    """replay_many(handlers): creates each missing delivery of the named handlers (pending,
    due now, attempts 0), resets the existing ones like replay (error cleared, attempts 0,
    live claim revoked), leaves other handlers alone, skips ids the store does not hold."""
    await store.accept(event("evt_rm_1"), ["a", "b"], now=NOW)
    await store.accept(event("evt_rm_2"), ["b"], now=NOW)
    await store.accept(event("evt_rm_3"), [], now=NOW)
    dead = await claim_one(store, "a")
    await store.dead(dead, attempt(AttemptOutcome.DEAD, error="gone"))
    running = await store.claim(handler="b", limit=10, lease=LEASE, now=NOW)
    assert len(running) == 2
    later = NOW + timedelta(hours=1)

    counts = await store.replay_many(
        ["evt_rm_1", "evt_rm_2", "evt_rm_3", "evt_missing", "evt_rm_1"], ["a"], now=later
    )
    assert counts == ReplayCounts(created=2, reset=1)
    by_event = {
        i: {r.handler: r for r in await store.list_deliveries(event_id=i)}
        for i in ("evt_rm_1", "evt_rm_2", "evt_rm_3")
    }
    assert {i: sorted(rows) for i, rows in by_event.items()} == {
        "evt_rm_1": ["a", "b"],
        "evt_rm_2": ["a", "b"],
        "evt_rm_3": ["a"],
    }
    for i in ("evt_rm_1", "evt_rm_2", "evt_rm_3"):
        row = by_event[i]["a"]
        assert (row.status, row.attempts, row.last_error) == (DeliveryStatus.PENDING, 0, None)
        assert row.next_attempt_at == later
        assert row.lease_until is None
    assert by_event["evt_rm_1"]["b"].attempts == 1  # not named: untouched, still leased
    assert await store.get_event("evt_missing") is None
    claimed = await store.claim(handler="a", limit=10, lease=LEASE, now=later)
    assert sorted(d.event.id for d in claimed) == ["evt_rm_1", "evt_rm_2", "evt_rm_3"]


async def test_replay_many_missing_only_and_all(store: Store) -> None:
    """reset=False creates only what is missing and touches nothing that exists (a second
    backfill creates nothing); handlers=None resets every existing delivery, creates none;
    create=False with handlers resets only."""
    await store.accept(event("evt_rmo_1"), ["a"], now=NOW)
    await store.accept(event("evt_rmo_2"), ["b"], now=NOW)
    await store.complete(await claim_one(store, "a"), attempt(AttemptOutcome.OK))
    ids = ["evt_rmo_1", "evt_rmo_2"]
    later = NOW + timedelta(minutes=5)

    assert await store.replay_many(ids, ["a"], now=later, reset=False) == ReplayCounts(1, 0)
    (done,) = await store.list_deliveries(event_id="evt_rmo_1")
    assert done.status is DeliveryStatus.DONE
    assert await store.replay_many(ids, ["a"], now=later, reset=False) == ReplayCounts(0, 0)

    assert await store.replay_many(ids, ["b", "c"], now=later, create=False) == ReplayCounts(0, 1)
    assert sorted(d.handler for d in await store.list_deliveries(event_id="evt_rmo_1")) == ["a"]

    assert await store.replay_many(ids, None, now=later) == ReplayCounts(created=0, reset=3)
    records = [r for i in ids for r in await store.list_deliveries(event_id=i)]
    assert {r.status for r in records} == {DeliveryStatus.PENDING}
    assert await store.replay_many([], ["a"], now=later) == ReplayCounts(0, 0)
    assert await store.replay_many(["evt_none"], None, now=later) == ReplayCounts(0, 0)


async def test_replay_many_wakes_a_waiter(store: Store) -> None:
    """A backfill makes work: a dispatcher waiting for it wakes."""
    await store.accept(event("evt_rmw"), [], now=NOW)
    await store.wait_for_work(0)
    waiter = asyncio.create_task(store.wait_for_work(3600))
    await asyncio.sleep(0)
    assert await store.replay_many(["evt_rmw"], ["a"], now=NOW) == ReplayCounts(1, 0)
    await asyncio.wait_for(waiter, PROMPT)


async def test_retry_dead_by_handler_then_all(store: Store) -> None:
    """retry_dead(handler) revives only that handler's dead deliveries; None revives all."""
    for i in range(2):
        await store.accept(event(f"evt_rd_{i}"), ["a", "b"], now=NOW)
    for handler in ("a", "b"):
        for delivery in await store.claim(handler=handler, limit=10, lease=LEASE, now=NOW):
            await store.dead(delivery, attempt(AttemptOutcome.DEAD, error="boom"))
    later = NOW + timedelta(hours=1)
    assert await store.retry_dead(handler="a", now=later) == 2
    assert len(await store.list_deliveries(status=DeliveryStatus.DEAD)) == 2
    revived = await store.claim(handler="a", limit=10, lease=LEASE, now=later)
    assert [d.attempts for d in revived] == [1, 1]
    assert await store.retry_dead(handler=None, now=later) == 2
    assert await store.list_deliveries(status=DeliveryStatus.DEAD) == []
    assert await store.retry_dead(handler=None, now=later) == 0


# --- stats and prune ------------------------------------------------------------------------


async def test_stats_counts_the_outbox(store: Store) -> None:
    """pending (all), due (unleased and due), running (live lease), dead, oldest due age."""
    assert await store.stats(now=NOW) == await store.stats(now=NOW)
    empty = await store.stats(now=NOW)
    assert (empty.pending, empty.due, empty.running, empty.dead) == (0, 0, 0, 0)
    assert empty.oldest_due_age_seconds == 0.0

    for i in range(4):
        await store.accept(event(f"evt_stats_{i}"), ["a"], now=NOW + i * SECOND)
    now = NOW + timedelta(seconds=30)
    running = await store.claim(handler="a", limit=1, lease=LEASE, now=now)  # evt_stats_0
    scheduled = (await store.claim(handler="a", limit=1, lease=LEASE, now=now))[0]
    await store.retry(scheduled, attempt(AttemptOutcome.RETRY), at=now + timedelta(minutes=10))
    dead = (await store.claim(handler="a", limit=1, lease=LEASE, now=now))[0]
    await store.dead(dead, attempt(AttemptOutcome.DEAD, error="x"))

    stats = await store.stats(now=now)
    assert len(running) == 1
    assert stats.pending == 3  # running + scheduled + due
    assert stats.running == 1
    assert stats.dead == 1
    assert stats.due == 1  # evt_stats_3, accepted at NOW + 3s
    assert stats.oldest_due_age_seconds == pytest.approx(27.0)


async def test_stats_counts_a_delivery_held_by_after_as_waiting(store: Store) -> None:
    """A due delivery held back by ``LACUNA_<NAME>_AFTER`` (a prerequisite handler's delivery
    of the same event still pending: ``claim`` will not take it) is not due: it counts as
    pending-not-due (the ``waiting`` gauge) and not in the oldest due age, until the
    prerequisite is done. Without ``after`` nothing is held."""
    await store.accept(event("evt_held"), ["a", "b"], now=NOW)
    await store.accept(event("evt_free"), ["b"], now=NOW + 10 * SECOND)
    now = NOW + timedelta(seconds=60)
    after = {"b": ("a",)}
    stats = await store.stats(now=now, after=after)
    b = stats.by_handler["b"]
    assert (b.pending, b.due, b.running) == (2, 1, 0)  # evt_held's b waits for its a
    assert b.oldest_due_age_seconds == pytest.approx(50.0)  # evt_free, not evt_held
    assert (stats.pending, stats.due) == (3, 2)
    assert (await store.stats(now=now)).by_handler["b"].due == 2
    assert [
        d.event.id
        for d in await store.claim(handler="b", limit=5, lease=LEASE, now=now, after=("a",))
    ] == ["evt_free"]
    prerequisite = await claim_one(store, "a", now)
    held = await store.stats(now=now, after=after)
    assert held.by_handler["b"].due == 0  # evt_free is running, evt_held still held
    await store.complete(prerequisite, attempt(AttemptOutcome.OK, at=now))
    assert (await store.stats(now=now, after=after)).by_handler["b"].due == 1


async def test_stats_by_handler(store: Store) -> None:
    """``by_handler``: the same figures per handler, summing to the totals; a handler with
    only done deliveries does not appear; one with only dead ones does."""
    for i in range(3):
        await store.accept(event(f"evt_bh_{i}"), ["a", "b"], now=NOW + i * SECOND)
    await store.accept(event("evt_bh_c"), ["c"], now=NOW)
    await store.accept(event("evt_bh_d"), ["d"], now=NOW)
    now = NOW + timedelta(seconds=60)
    running = await store.claim(handler="a", limit=1, lease=LEASE, now=now)
    dead = (await store.claim(handler="b", limit=1, lease=LEASE, now=now))[0]
    await store.dead(dead, attempt(AttemptOutcome.DEAD, error="x"))
    done = (await store.claim(handler="c", limit=1, lease=LEASE, now=now))[0]
    await store.complete(done, attempt(AttemptOutcome.OK))
    only_dead = (await store.claim(handler="d", limit=1, lease=LEASE, now=now))[0]
    await store.dead(only_dead, attempt(AttemptOutcome.DEAD, error="x"))

    stats = await store.stats(now=now)
    assert len(running) == 1
    assert set(stats.by_handler) == {"a", "b", "d"}
    a, b, d = stats.by_handler["a"], stats.by_handler["b"], stats.by_handler["d"]
    assert (a.pending, a.due, a.running, a.dead) == (3, 2, 1, 0)
    assert a.oldest_due_age_seconds == pytest.approx(59.0)  # evt_bh_1, accepted at NOW + 1s
    assert (b.pending, b.due, b.running, b.dead) == (2, 2, 0, 1)
    assert b.oldest_due_age_seconds == pytest.approx(59.0)
    assert (d.pending, d.due, d.running, d.dead) == (0, 0, 0, 1)
    assert d.oldest_due_age_seconds == 0.0
    assert (stats.pending, stats.due, stats.running, stats.dead) == (5, 4, 1, 2)
    assert stats.oldest_due_age_seconds == pytest.approx(59.0)


async def test_trace_context_travels_from_accept_to_claim(store: Store) -> None:
    """``accept(trace_context=)`` (the request's traceparent, tracing on) comes back as
    ``Delivery.trace_context`` with each claimed delivery of the event, also after a replay;
    an event accepted without one has none."""
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await store.accept(event("evt_traced"), ["a", "b"], now=NOW, trace_context=traceparent)
    await store.accept(event("evt_untraced"), ["a"], now=NOW + SECOND)
    # a duplicate's trace context is not stored: the original request's trace stays
    other_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert not await store.accept(event("evt_traced"), ["a"], now=NOW, trace_context=other_parent)
    claimed = await store.claim(handler="a", limit=5, lease=LEASE, now=NOW + 5 * SECOND)
    by_id = {d.event.id: d.trace_context for d in claimed}
    assert by_id == {"evt_traced": traceparent, "evt_untraced": None}
    (other,) = await store.claim(handler="b", limit=5, lease=LEASE, now=NOW + 5 * SECOND)
    assert other.trace_context == traceparent
    await store.complete(other, attempt(AttemptOutcome.OK))
    await store.replay("evt_traced", ["b"], now=NOW + 6 * SECOND)
    (again,) = await store.claim(handler="b", limit=5, lease=LEASE, now=NOW + 7 * SECOND)
    assert again.trace_context == traceparent


async def test_prune_deletes_only_finished_old_events(store: Store) -> None:
    """prune: old events whose deliveries are all done/dead (or none) go, with their
    deliveries and attempts; old events with pending work and recent events stay."""
    await store.accept(event("evt_done"), ["a"], now=NOW)
    await store.accept(event("evt_pending"), ["a", "b"], now=NOW)
    await store.accept(event("evt_bare"), [], now=NOW)
    await store.accept(event("evt_recent"), [], now=NOW + timedelta(days=2))
    done = next(
        d
        for d in await store.claim(handler="a", limit=10, lease=LEASE, now=NOW)
        if d.event.id == "evt_done"
    )
    await store.complete(done, attempt(AttemptOutcome.OK))
    for delivery in await store.claim(handler="b", limit=10, lease=LEASE, now=NOW):
        await store.dead(delivery, attempt(AttemptOutcome.DEAD, error="x"))  # b of evt_pending

    assert await store.prune(received_before=NOW + timedelta(days=1)) == 2
    assert await store.get_event("evt_done") is None
    assert await store.get_event("evt_bare") is None
    assert await store.list_deliveries(event_id="evt_done") == []
    assert await store.list_attempts(done.id) == []
    assert await store.get_event("evt_pending") is not None
    assert len(await store.list_deliveries(event_id="evt_pending")) == 2
    assert await store.get_event("evt_recent") is not None
    assert await store.prune(received_before=NOW + timedelta(days=1)) == 0
    # A pruned id is forgotten: the same id is new again.
    assert await store.accept(event("evt_done"), [], now=NOW + timedelta(days=3)) is True


async def test_prune_by_a_clock_days_ahead_keeps_recent_events_on_postgres(store: Store) -> None:
    """A pruning replica's clock two days ahead asks for the events received more than a day
    ago (``received_before`` a day ahead of the real time), ``keep`` one day. On PostgreSQL
    the database's clock must agree they are a day old: the event received a moment ago (by
    the database's clock, as an intake on time stamps it) stays, and so does its dedupe.
    Elsewhere one clock stamps and prunes, and ``keep`` is not read."""
    received = wall_now()
    assert await store.accept(event("evt_fresh"), [], now=received)
    ahead = received + timedelta(days=2)
    pruned = await store.prune(received_before=ahead - timedelta(days=1), keep=timedelta(days=1))
    if type(store).__name__ == "PostgresStore":
        assert pruned == 0
        assert await store.accept(event("evt_fresh"), [], now=received) is False
    else:
        assert pruned == 1
    # What both clocks agree is old goes on every backend.
    assert await store.accept(event("evt_old"), [], now=received - timedelta(days=3))
    assert await store.prune(received_before=ahead - timedelta(days=1), keep=timedelta(days=1)) >= 1
    assert await store.get_event("evt_old") is None


# --- per-task state -------------------------------------------------------------------------


async def test_task_state_follows_the_newest_event(store: Store) -> None:
    """A newer event updates the task; an older one does not, is marked superseded, and is
    still dispatched."""
    await store.accept(event("evt_t2", created=2000, task_id="cm_t"), ["a"], now=NOW)
    task = await store.get_task("cm_t")
    assert task is not None
    assert (task.event_id, task.status, task.event_created) == ("evt_t2", "ready", 2000)

    older = event("evt_t1", "job.failed", created=1000, task_id="cm_t")
    assert await store.accept(older, ["a"], now=NOW + SECOND)
    task = await store.get_task("cm_t")
    assert task is not None
    assert task.event_id == "evt_t2"
    assert task.status == "ready"
    superseded = await store.get_event("evt_t1")
    assert superseded is not None
    assert superseded.superseded is True
    current = await store.get_event("evt_t2")
    assert current is not None
    assert current.superseded is False
    assert len(await store.list_deliveries(event_id="evt_t1")) == 1

    newer = event("evt_t3", "job.failed", created=3000, task_id="cm_t")
    assert await store.accept(newer, [], now=NOW + 2 * SECOND)
    task = await store.get_task("cm_t")
    assert task is not None
    assert (task.event_id, task.event_type, task.status, task.event_created) == (
        "evt_t3",
        "job.failed",
        "failed",
        3000,
    )


async def test_events_without_a_task_id_leave_tasks_alone(store: Store) -> None:
    """No ``data.id``: no task row, not superseded."""
    await store.accept(Event.from_body(b'{"id":"evt_nt","type":"ping"}'), [], now=NOW)
    record = await store.get_event("evt_nt")
    assert record is not None
    assert record.task_id is None
    assert record.superseded is False
    assert await store.get_task("evt_nt") is None


# --- admin queries --------------------------------------------------------------------------


async def test_list_and_get_events(store: Store) -> None:
    """list_events is newest first, filters by type and honours the limit; get_event misses
    give None."""
    await store.accept(event("evt_l1"), [], now=NOW)
    await store.accept(event("evt_l2", "job.failed"), [], now=NOW + SECOND)
    await store.accept(event("evt_l3"), [], now=NOW + 2 * SECOND)
    assert [e.id for e in await store.list_events()] == ["evt_l3", "evt_l2", "evt_l1"]
    assert [e.id for e in await store.list_events(limit=1)] == ["evt_l3"]
    assert [e.id for e in await store.list_events(event_type="job.failed")] == ["evt_l2"]
    assert await store.list_events(event_type="nope") == []
    record = await store.get_event("evt_l2")
    assert record is not None
    assert (record.type, record.task_id, record.created) == (
        "job.failed",
        "cm123abc",
        record.to_event().created,
    )
    assert await store.get_event("evt_nope") is None
    assert await store.get_task("cm_nope") is None


async def test_list_deliveries_filters(store: Store) -> None:
    """list_deliveries is newest first and filters by status, handler and event."""
    await store.accept(event("evt_d1"), ["a", "b"], now=NOW)
    await store.accept(event("evt_d2", "job.failed"), ["a"], now=NOW + SECOND)
    await store.dead(await claim_one(store, "b"), attempt(AttemptOutcome.DEAD, error="x"))
    all_rows = await store.list_deliveries()
    assert len(all_rows) == 3
    assert [r.id for r in all_rows] == sorted((r.id for r in all_rows), reverse=True)
    assert [r.event_id for r in await store.list_deliveries(handler="a")] == ["evt_d2", "evt_d1"]
    (dead,) = await store.list_deliveries(status=DeliveryStatus.DEAD)
    assert (dead.event_id, dead.handler) == ("evt_d1", "b")
    assert await store.list_deliveries(status=DeliveryStatus.DONE) == []
    (only,) = await store.list_deliveries(event_id="evt_d2")
    assert only.event_type == "job.failed"
    assert len(await store.list_deliveries(limit=1)) == 1
    assert await store.list_deliveries(handler="a", status=DeliveryStatus.DEAD) == []


# --- waking and lifecycle -------------------------------------------------------------------


async def test_wait_for_work_wakes_on_accept(store: Store) -> None:
    """An accept that creates deliveries wakes a waiting dispatcher before its timeout."""
    waiter = asyncio.create_task(store.wait_for_work(3600))
    await asyncio.sleep(0)
    await store.accept(event("evt_wake"), ["a"], now=NOW)
    await asyncio.wait_for(waiter, PROMPT)


async def test_wait_for_work_wakes_on_replay_and_retry_dead(store: Store) -> None:
    """replay and retry_dead make work too, and wake a waiter."""
    await store.accept(event("evt_wake2"), ["a"], now=NOW)
    await store.wait_for_work(0)  # consume the accept's wake-up
    waiter = asyncio.create_task(store.wait_for_work(3600))
    await asyncio.sleep(0)
    await store.replay("evt_wake2", None, now=NOW)
    await asyncio.wait_for(waiter, PROMPT)

    await store.dead(await claim_one(store), attempt(AttemptOutcome.DEAD, error="x"))
    await store.wait_for_work(0)
    waiter = asyncio.create_task(store.wait_for_work(3600))
    await asyncio.sleep(0)
    await store.retry_dead(handler=None, now=NOW)
    await asyncio.wait_for(waiter, PROMPT)


async def test_wait_for_work_returns_after_its_timeout(store: Store) -> None:
    """With nothing new, wait_for_work returns by itself after the timeout."""
    await store.wait_for_work(0)
    await asyncio.wait_for(store.wait_for_work(0.01), PROMPT)


async def test_ping_answers_and_a_closed_store_refuses(store: Store) -> None:
    """ping returns while open; once closed, calls raise StoreUnavailable (never hang)."""
    await store.ping()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.accept(event(), [], now=NOW), PROMPT)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(store.ping(), PROMPT)


# --- operator actions win over running attempts; ordering without `created` ------------------


async def test_replay_cuts_off_a_running_claim(store: Store) -> None:
    """A claim running when its delivery is replayed can no longer record its outcome, and
    the delivery is not claimed again while that attempt may still run (its lease is kept):
    once the attempt ends (its outcome refused), it is due at once."""
    await store.accept(event("evt_replay"), ["a"], now=NOW)
    (running,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    assert await store.replay("evt_replay", None, now=NOW) == 1
    assert await store.claim(handler="a", limit=1, lease=LEASE, now=NOW) == []
    assert await store.complete(running, Attempt(NOW, NOW, AttemptOutcome.OK)) == Recorded(False)
    (again,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    assert again.attempts == 1


RESETS: dict[str, Callable[[Store, datetime], Awaitable[object]]] = {
    "replay": lambda s, now: s.replay("evt_cut", None, now=now),
    "replay_handlers": lambda s, now: s.replay("evt_cut", ["a"], now=now),
    "replay_many": lambda s, now: s.replay_many(["evt_cut"], None, now=now),
    "replay_many_handlers": lambda s, now: s.replay_many(["evt_cut"], ["a"], now=now),
}
ENDINGS: dict[str, Callable[[Store, Delivery], Awaitable[object]]] = {
    "complete": lambda s, d: s.complete(d, Attempt(NOW, NOW, AttemptOutcome.OK)),
    "retry": lambda s, d: s.retry(d, Attempt(NOW, NOW, AttemptOutcome.RETRY, "x"), at=NOW),
    "dead": lambda s, d: s.dead(d, Attempt(NOW, NOW, AttemptOutcome.DEAD, "x")),
    "release": lambda s, d: s.release(d, now=NOW),
}


@pytest.mark.parametrize("reset", sorted(RESETS))
@pytest.mark.parametrize("ending", sorted(ENDINGS))
async def test_a_reset_never_lets_a_delivery_run_beside_its_live_attempt(
    store: Store, reset: str, ending: str
) -> None:
    """Every reset (replay, bulk replay, with or without handlers) of a delivery whose attempt
    is running revokes that attempt but keeps its lease: no claim gets the delivery while
    the attempt may still run (two runs of one delivery at once). However the attempt ends,
    its outcome is refused and the delivery is due at once, claimed exactly once."""
    await store.accept(event("evt_cut"), ["a"], now=NOW)
    (running,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    await RESETS[reset](store, NOW)
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW) == []
    (record,) = await store.list_deliveries(event_id="evt_cut")
    assert (record.status, record.attempts) == (DeliveryStatus.PENDING, 0)
    assert not await ENDINGS[ending](store, running)
    (again,) = await store.claim(handler="a", limit=10, lease=LEASE, now=NOW)
    assert (again.attempts, again.lease_token) != (running.attempts, running.lease_token)
    assert await store.claim(handler="a", limit=10, lease=LEASE, now=NOW) == []
    assert await store.complete(again, Attempt(NOW, NOW, AttemptOutcome.OK)) == Recorded(True)


@pytest.mark.parametrize("ending", sorted(ENDINGS))
async def test_the_end_of_a_revoked_attempt_wakes_wait_for_work(store: Store, ending: str) -> None:
    """When a replayed delivery's running attempt ends (its outcome refused), the lease the
    replay kept ends and the delivery is due at once: the dispatcher is woken (on
    PostgreSQL every replica, by NOTIFY), not left to its poll interval."""
    await store.accept(event("evt_cut"), ["a"], now=NOW)
    (running,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    await store.replay("evt_cut", None, now=NOW)
    for _ in range(2):  # consume the accept's and the replay's nudges (and their NOTIFYs)
        await store.wait_for_work(0.2)
    assert not await ENDINGS[ending](store, running)
    async with asyncio.timeout(PROMPT):
        await store.wait_for_work(PROMPT * 3)


async def test_a_reset_twice_leaves_the_kept_lease_to_expire(store: Store) -> None:
    """Reset twice while its attempt runs, the ended attempt cannot tell its kept lease from
    a later claim's, so it leaves it to expire: still no second run beside it."""
    await store.accept(event("evt_cut"), ["a"], now=NOW)
    (running,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    await store.replay("evt_cut", None, now=NOW)
    await store.replay_many(["evt_cut"], None, now=NOW)
    assert await store.complete(running, Attempt(NOW, NOW, AttemptOutcome.OK)) == Recorded(False)
    assert await store.claim(handler="a", limit=1, lease=LEASE, now=NOW) == []
    (record,) = await store.list_deliveries(event_id="evt_cut")
    assert record.lease_until is not None


async def test_task_state_without_created_compares_by_receipt_time(store: Store) -> None:
    """An event without ``created`` counts as created when received: an event created before
    that does not overwrite the task."""
    payload = make_event("evt_nc", task_id="cm_nc")
    del payload["created"]
    await store.accept(Event.from_body(orjson.dumps(payload)), [], now=NOW)
    stale = event("evt_nc_old", created=int(NOW.timestamp()) - 60, task_id="cm_nc")
    await store.accept(stale, [], now=NOW + SECOND)
    task = await store.get_task("cm_nc")
    assert task is not None
    assert (task.event_id, task.event_created) == ("evt_nc", None)
    record = await store.get_event("evt_nc_old")
    assert record is not None
    assert record.superseded is True


async def test_retry_dead_cuts_off_a_running_claim(store: Store) -> None:
    """retry-dead, like replay, revokes a claim on the delivery it brings back."""
    await store.accept(event("evt_rd_cut"), ["a"], now=NOW)
    (first,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    assert await store.dead(first, Attempt(NOW, NOW, AttemptOutcome.DEAD, "x")) == Recorded(True)
    assert await store.retry_dead(handler="a", now=NOW) == 1
    # the old claim's token is stale: a late "retry" from it must change nothing
    assert await store.retry(first, Attempt(NOW, NOW, AttemptOutcome.RETRY), at=NOW) == Recorded(
        False
    )
    (again,) = await store.claim(handler="a", limit=1, lease=LEASE, now=NOW)
    assert again.attempts == 1


# --- rules the backends once disagreed on (issue 9, item 2) ----------------------------------


async def test_a_later_success_clears_the_last_error(store: Store) -> None:
    """A delivery's ``last_error`` is that of its latest attempt: a success clears it."""
    await store.accept(event("evt_err_cleared"), ["a"], now=NOW)
    first = await claim_one(store)
    assert await store.retry(first, attempt(AttemptOutcome.RETRY, error="503 busy"), at=NOW)
    (record,) = await store.list_deliveries(event_id="evt_err_cleared")
    assert record.last_error == "503 busy"
    second = await claim_one(store)
    assert await store.complete(second, attempt(AttemptOutcome.OK, at=NOW + SECOND))
    (record,) = await store.list_deliveries(event_id="evt_err_cleared")
    assert record.status is DeliveryStatus.DONE
    assert record.last_error is None


async def test_replay_and_retry_dead_clear_the_old_error(store: Store) -> None:
    """A reset delivery starts clean: ``replay`` and ``retry_dead`` clear ``last_error``."""
    for event_id in ("evt_err_replay", "evt_err_retry_dead"):
        await store.accept(event(event_id), ["a"], now=NOW)
        delivery = await claim_one(store)
        assert await store.dead(delivery, attempt(AttemptOutcome.DEAD, error="410 Gone"))
    assert await store.replay("evt_err_replay", None, now=NOW + SECOND) == 1
    (replayed,) = await store.list_deliveries(event_id="evt_err_replay")
    assert (replayed.status, replayed.last_error) == (DeliveryStatus.PENDING, None)
    assert await store.retry_dead(handler="a", now=NOW + SECOND) == 1
    (revived,) = await store.list_deliveries(event_id="evt_err_retry_dead")
    assert (revived.status, revived.last_error) == (DeliveryStatus.PENDING, None)


async def test_an_outcome_after_release_is_refused(store: Store) -> None:
    """``release`` moves the lease token on: a late outcome of the released claim (an attempt
    cancelled at stop that still reports) returns False and changes nothing."""
    await store.accept(event("evt_late_outcome"), ["a"], now=NOW)
    delivery = await claim_one(store)
    assert await store.release(delivery) is True
    assert await store.complete(delivery, attempt(AttemptOutcome.OK)) == Recorded(False)
    assert await store.retry(delivery, attempt(AttemptOutcome.RETRY), at=NOW) == Recorded(False)
    assert await store.dead(delivery, attempt(AttemptOutcome.DEAD)) == Recorded(False)
    assert await store.release(delivery) is False
    (record,) = await store.list_deliveries(event_id="evt_late_outcome")
    assert (record.status, record.attempts, record.lease_until) == (
        DeliveryStatus.PENDING,
        0,
        None,
    )
    assert await store.list_attempts(delivery.id) == []
    again = await claim_one(store)
    assert again.lease_token != delivery.lease_token


async def test_release_uses_the_given_time_and_nudges(store: Store) -> None:
    """``release(delivery, now=...)`` stamps ``updated_at`` with the injected time (never the
    wall clock), and wakes ``wait_for_work`` so the delivery is claimed again at once."""
    await store.accept(event("evt_release_now"), ["a"], now=NOW)
    delivery = await claim_one(store)
    for _ in range(2):  # consume the accept's nudge (on PostgreSQL also its NOTIFY)
        await store.wait_for_work(0.2)
    released_at = NOW + 7 * SECOND
    assert await store.release(delivery, now=released_at) is True
    (record,) = await store.list_deliveries(event_id="evt_release_now")
    assert record.updated_at == released_at
    async with asyncio.timeout(PROMPT):
        await store.wait_for_work(PROMPT * 3)


async def test_created_in_milliseconds_orders_as_seconds(store: Store) -> None:
    """``created`` above 10^11 is read as milliseconds for ordering a task's events: a
    ``job.started`` stamped now in ms does not outrank a ``job.completed`` stamped a minute
    later in seconds, whichever arrives first (``created`` itself is stored as sent)."""
    now_s = 1763731200
    started = event(
        "evt_ms_started", "job.started", created=now_s * 1000, task_id="cm_ms", status="running"
    )
    completed = event("evt_ms_done", created=now_s + 60, task_id="cm_ms", status="ready")
    assert await store.accept(started, ["a"], now=NOW)
    assert await store.accept(completed, ["a"], now=NOW + SECOND)
    task = await store.get_task("cm_ms")
    assert task is not None
    assert (task.event_id, task.status) == ("evt_ms_done", "ready")
    done = await store.get_event("evt_ms_done")
    assert done is not None
    assert done.superseded is False
    first = await store.get_event("evt_ms_started")
    assert first is not None
    assert first.created == now_s * 1000

    # the other arrival order: the late ms-stamped start is the superseded one
    late_start = event(
        "evt_ms_late", "job.started", created=(now_s + 1) * 1000, task_id="cm_ms2", status="running"
    )
    assert await store.accept(
        event("evt_ms_first", created=now_s + 60, task_id="cm_ms2"), [], now=NOW
    )
    assert await store.accept(late_start, [], now=NOW + SECOND)
    record = await store.get_event("evt_ms_late")
    assert record is not None
    assert record.superseded is True
    task = await store.get_task("cm_ms2")
    assert task is not None
    assert task.event_id == "evt_ms_first"


# --- results (SPEC §6) ----------------------------------------------------------------------


async def test_complete_records_the_handlers_result(store: Store) -> None:
    """A completion stores the JSON object handle() returned (nested values, unicode kept);
    retry and dead store none; a later failure after a replay clears the old result."""
    result = {
        "location": "file:///srv/audio/task_1/",
        "tracks": [{"id": "trk_1", "size": 3, "sha256": "ab", "content_type": "audio/mpeg"}],
        "note": "é ✓",
        "n": 1.5,
        "ok": True,
        "none": None,
    }
    assert await store.accept(event("evt_result"), ["a", "b"], now=NOW)
    a = await claim_one(store, "a")
    assert await store.complete(a, Attempt(NOW, NOW + SECOND, AttemptOutcome.OK, None, result))
    b = await claim_one(store, "b")
    failed = Attempt(NOW, NOW + SECOND, AttemptOutcome.RETRY, "boom", {"ignored": True})
    assert await store.retry(b, failed, at=NOW + SECOND)
    rows = {d.handler: d for d in await store.list_deliveries(event_id="evt_result")}
    assert rows["a"].result == result
    assert rows["b"].result is None

    assert await store.replay("evt_result", ["a"], now=NOW + SECOND) == 1
    again = await claim_one(store, "a", now=NOW + SECOND)
    assert await store.dead(again, attempt(AttemptOutcome.DEAD, NOW + SECOND, "gone"))
    (row,) = await store.list_deliveries(event_id="evt_result", handler="a")
    assert row.result is None


async def test_a_completion_without_a_result_stores_none(store: Store) -> None:
    assert await store.accept(event("evt_noresult"), ["a"], now=NOW)
    assert await store.complete(await claim_one(store), attempt(AttemptOutcome.OK))
    (row,) = await store.list_deliveries(event_id="evt_noresult")
    assert row.status is DeliveryStatus.DONE
    assert row.result is None


# --- ordering: claim(after=...) (SPEC §6) ---------------------------------------------------


async def test_claim_after_holds_a_delivery_until_its_prerequisites_end(store: Store) -> None:
    """``c`` after ``a`` and ``b``: held while either is pending (due or leased), claimable
    once both have ended, done or dead; other events and handlers are unaffected."""
    assert await store.accept(event("evt_after_1"), ["a", "b", "c"], now=NOW)
    assert await store.accept(event("evt_after_2"), ["c"], now=NOW)  # no a/b: not held
    claimed = await store.claim(handler="c", limit=10, lease=LEASE, now=NOW, after=["a", "b"])
    assert [d.event.id for d in claimed] == ["evt_after_2"]

    a = await claim_one(store, "a")
    assert await store.complete(a, attempt(AttemptOutcome.OK))
    assert await store.claim(handler="c", limit=10, lease=LEASE, now=NOW, after=["a", "b"]) == []
    b = await claim_one(store, "b")  # leased: still pending, still holds c
    assert await store.claim(handler="c", limit=10, lease=LEASE, now=NOW, after=["a", "b"]) == []
    assert await store.retry(b, attempt(AttemptOutcome.RETRY), at=NOW + SECOND)
    later = NOW + 2 * SECOND
    assert await store.claim(handler="c", limit=10, lease=LEASE, now=later, after=["a", "b"]) == []
    b = await claim_one(store, "b", now=later)
    assert await store.dead(b, attempt(AttemptOutcome.DEAD, later, "gone"))
    (c,) = await store.claim(handler="c", limit=10, lease=LEASE, now=later, after=["a", "b"])
    assert c.event.id == "evt_after_1"
    assert c.handler == "c"


async def test_claim_after_a_replayed_prerequisite_holds_again(store: Store) -> None:
    """A replay makes the prerequisite pending again: the later handler waits for it again."""
    assert await store.accept(event("evt_after_r"), ["a", "c"], now=NOW)
    assert await store.complete(await claim_one(store, "a"), attempt(AttemptOutcome.OK))
    assert await store.complete(
        (await store.claim(handler="c", limit=1, lease=LEASE, now=NOW, after=["a"]))[0],
        attempt(AttemptOutcome.OK),
    )
    assert await store.replay("evt_after_r", None, now=NOW + SECOND) == 2
    held = await store.claim(handler="c", limit=1, lease=LEASE, now=NOW + SECOND, after=["a"])
    assert held == []


# --- flow control: pause / resume and the consecutive-failure count -------------------------


async def test_pause_and_resume_are_kept_and_reported(store: Store) -> None:
    """set_paused pauses once (a second pause is no change), paused_handlers names the paused
    handler with its reason, and resume clears it; resuming a running handler changes nothing."""
    assert await store.paused_handlers() == {}
    assert await store.set_paused("a", False, reason=None, now=NOW) is False
    assert await store.set_paused("a", True, reason="operator", now=NOW) is True
    assert await store.set_paused("a", True, reason="again", now=NOW + SECOND) is False
    paused = await store.paused_handlers()
    assert list(paused) == ["a"]
    assert paused["a"].paused is True
    assert paused["a"].reason == "operator"
    assert paused["a"].updated_at == NOW
    assert [s.handler for s in await store.handler_states()] == ["a"]
    assert await store.set_paused("a", False, reason=None, now=NOW + SECOND) is True
    assert await store.paused_handlers() == {}
    (state,) = await store.handler_states()
    assert (state.paused, state.reason, state.updated_at) == (False, None, NOW + SECOND)


async def test_resume_nudges_wait_for_work(store: Store) -> None:
    """A resume makes the paused backlog claimable at once: it wakes wait_for_work."""
    await store.wait_for_work(0)
    await store.set_paused("a", True, reason="operator", now=NOW)
    await store.set_paused("a", False, reason=None, now=NOW)
    await asyncio.wait_for(store.wait_for_work(PROMPT), PROMPT / 2)


async def outcome(
    store: Store, handler: str, ending: str, tally: Tally | None, event_id: str | None = None
) -> Recorded:
    """Accept an event for ``handler``, claim its delivery and end the attempt with
    ``ending`` (complete, retry or dead) and ``tally``."""
    await store.accept(event(event_id), [handler], now=NOW)
    delivery = await claim_one(store, handler)
    if ending == "complete":
        return await store.complete(delivery, attempt(AttemptOutcome.OK), tally=tally)
    if ending == "retry":
        failed = attempt(AttemptOutcome.RETRY, error="boom")
        return await store.retry(delivery, failed, at=NOW + LEASE, tally=tally)
    return await store.dead(delivery, attempt(AttemptOutcome.DEAD, error="boom"), tally=tally)


def failure(pause_after: int | None, reason: str = "r") -> Tally:
    return Tally.failure(pause_after=pause_after, reason=reason)


async def failures(store: Store) -> dict[str, tuple[int, bool, str | None]]:
    return {
        s.handler: (s.consecutive_failures, s.paused, s.reason)
        for s in await store.handler_states()
    }


async def test_failures_pause_at_the_threshold_and_a_success_resets(store: Store) -> None:
    """An outcome's tally is counted with it: a failure (retried or dead) counts one more,
    the one that reaches pause_after pauses the handler and says so (and only that one), a
    success in between starts the count again, and a resume clears it."""
    assert await outcome(store, "a", "retry", failure(3)) == Recorded(True, paused=False)
    assert await outcome(store, "a", "dead", failure(3)) == Recorded(True, paused=False)
    assert (await failures(store))["a"] == (2, False, None)
    assert await outcome(store, "a", "complete", Tally.success()) == Recorded(True)
    assert (await failures(store))["a"] == (0, False, None)
    assert await outcome(store, "a", "retry", failure(3)) == Recorded(True, paused=False)
    assert await outcome(store, "a", "retry", failure(3)) == Recorded(True, paused=False)
    paused = await outcome(store, "a", "dead", failure(3, "3 failures"))
    assert paused == Recorded(True, paused=True)
    assert (await store.paused_handlers())["a"].reason == "3 failures"
    # Already paused: counted, never "paused now" again, the reason kept.
    assert await outcome(store, "a", "retry", failure(3)) == Recorded(True, paused=False)
    assert (await failures(store))["a"] == (4, True, "3 failures")
    assert await store.set_paused("a", False, reason=None, now=NOW) is True
    assert (await failures(store))["a"] == (0, False, None)
    # Without a threshold failures are only counted; another handler is apart.
    assert await outcome(store, "b", "retry", failure(None)) == Recorded(True, paused=False)
    assert await outcome(store, "b", "retry", failure(1)) == Recorded(True, paused=True)
    assert list(await store.paused_handlers()) == ["b"]
    assert (await failures(store))["b"] == (2, True, "r")
    # No row: a success has nothing to reset and writes nothing; no tally writes nothing.
    assert await outcome(store, "c", "complete", Tally.success()) == Recorded(True)
    assert await outcome(store, "c", "retry", None) == Recorded(True)
    assert list(await failures(store)) == ["a", "b"]


async def test_a_success_with_nothing_to_reset_writes_nothing(store: Store) -> None:
    """The success of the hot path leaves the handler's row alone when its count is 0 (not
    even updated_at); with a count it resets it, stamped with the attempt's end."""
    await store.set_paused("a", True, reason="operator", now=NOW)
    assert await outcome(store, "a", "complete", Tally.success()) == Recorded(True)
    (state,) = await store.handler_states()
    assert (state.consecutive_failures, state.paused, state.updated_at) == (0, True, NOW)
    assert await outcome(store, "a", "retry", failure(None)) == Recorded(True)
    assert await outcome(store, "a", "complete", Tally.success()) == Recorded(True)
    (state,) = await store.handler_states()
    assert (state.consecutive_failures, state.paused, state.reason) == (0, True, "operator")
    assert state.updated_at == NOW + SECOND  # attempt(): finished a second after NOW


async def test_a_pause_tally_pauses_once_and_leaves_the_count(store: Store) -> None:
    """Tally.pause (an endpoint gone): the dead outcome and the pause land together, the
    count as it was; a second one finds the handler paused and keeps the first reason."""
    assert await outcome(store, "a", "retry", failure(None)) == Recorded(True)
    assert await outcome(store, "a", "dead", Tally.pause("gone: 410")) == Recorded(True, True)
    assert (await failures(store))["a"] == (1, True, "gone: 410")
    assert await outcome(store, "a", "dead", Tally.pause("again")) == Recorded(True, False)
    assert (await failures(store))["a"] == (1, True, "gone: 410")


@pytest.mark.parametrize("ending", ["complete", "retry", "dead"])
async def test_a_stale_outcome_is_not_counted(store: Store, ending: str) -> None:
    """An outcome refused (its claim taken over) writes no count and no pause: its tally
    goes with it, whatever it says."""
    assert await outcome(store, "a", "retry", failure(None)) == Recorded(True)
    await store.accept(event("evt_stale"), ["a"], now=NOW)
    stale = await claim_one(store, "a")
    assert await store.replay("evt_stale", None, now=NOW) == 1  # revokes the claim
    tallies = [Tally.success(), failure(1), Tally.pause("gone")]
    for tally in tallies:
        if ending == "complete":
            done = await store.complete(stale, attempt(AttemptOutcome.OK), tally=tally)
        elif ending == "retry":
            failed = attempt(AttemptOutcome.RETRY, error="x")
            done = await store.retry(stale, failed, at=NOW, tally=tally)
        else:
            done = await store.dead(stale, attempt(AttemptOutcome.DEAD, error="x"), tally=tally)
        assert done == Recorded(False)
        assert not done
    assert await failures(store) == {"a": (1, False, None)}
    assert await store.paused_handlers() == {}


async def test_the_retry_is_claimed_only_with_its_count_and_pause(store: Store) -> None:
    """The outcome and its tally are one write: once a retry is due and claimable, the
    count and the pause its attempt made are already there (the dispatcher once wrote them
    after the outcome, and the retry could run, and succeed, in between)."""
    await store.accept(event("evt_retried"), ["a"], now=NOW)
    first = await claim_one(store, "a")
    failed = attempt(AttemptOutcome.RETRY, error="boom")
    done = await store.retry(first, failed, at=NOW, tally=failure(2, "2 failures"))
    assert done == Recorded(True, paused=False)
    second = await claim_one(store, "a")
    assert second.id == first.id
    assert (await failures(store))["a"] == (1, False, None)
    done = await store.retry(second, failed, at=NOW, tally=failure(2, "2 failures"))
    assert done == Recorded(True, paused=True)
    assert (await failures(store))["a"] == (2, True, "2 failures")
    third = await claim_one(store, "a")  # claim ignores pauses: the dispatcher skips them
    assert await store.complete(third, attempt(AttemptOutcome.OK), tally=Tally.success())
    assert (await failures(store))["a"] == (0, True, "2 failures")
    (record,) = await store.list_deliveries(event_id="evt_retried")
    assert (record.status, record.attempts) == (DeliveryStatus.DONE, 3)


async def test_concurrent_failures_pause_exactly_once(store: Store) -> None:
    """Many failures recorded at once (as from several replicas): each counted, exactly one
    pauses."""
    for n in range(20):
        await store.accept(event(f"evt_many_{n}"), ["a"], now=NOW)
    claimed = await store.claim(handler="a", limit=20, lease=LEASE, now=NOW)
    assert len(claimed) == 20
    failed = attempt(AttemptOutcome.RETRY, error="boom")
    results = await asyncio.gather(
        *(store.retry(d, failed, at=NOW, tally=failure(5)) for d in claimed)
    )
    assert all(results)
    assert [r.paused for r in results].count(True) == 1
    assert (await failures(store))["a"] == (20, True, "r")


# --- flow control: the rate-limit token bucket ----------------------------------------------


async def test_token_bucket_starts_full_and_refills_continuously(store: Store) -> None:
    """A new bucket holds `capacity`; tokens taken are gone, given back ones return (never
    above capacity), and it refills at `per_second` as time passes (whole tokens only)."""
    take = functools.partial(store.take_tokens, "a", capacity=3, per_second=1.0)
    assert await take(want=2, now=NOW) == 2
    assert await take(want=5, now=NOW) == 1
    assert await take(want=5, now=NOW) == 0
    await store.give_back_tokens("a", 1, capacity=3)
    assert await take(want=5, now=NOW) == 1
    # Another handler has its own bucket.
    assert await store.take_tokens("b", want=9, capacity=3, per_second=1.0, now=NOW) == 3


async def test_token_bucket_refills_by_the_stores_clock(store: Store) -> None:
    """Spent, the bucket refills: with a fast rate a few real milliseconds give a token back
    (on PostgreSQL the database's clock refills it, so `now` cannot be used to fake time)."""
    assert await store.take_tokens("a", want=5, capacity=5, per_second=1000.0, now=wall_now()) == 5
    await asyncio.sleep(0.05)
    got = await store.take_tokens("a", want=5, capacity=5, per_second=1000.0, now=wall_now())
    assert 1 <= got <= 5
    await store.give_back_tokens("a", 100, capacity=5)
    assert await store.take_tokens("a", want=100, capacity=5, per_second=0.001, now=wall_now()) == 5


async def test_token_bucket_refills_again_after_the_clock_steps_back(store: Store) -> None:
    """Spent at a time the clock then stepped back from (2 h): the bucket refills from the
    new time on. It kept the later time and refilled nothing until the clock caught up, a
    rate-limited handler frozen for 2 h, also across restarts. (PostgreSQL refills by the
    database's own clock: there, `now` is not read.)"""
    later = NOW + timedelta(hours=2)
    if type(store).__name__ == "PostgresStore":
        # The database's clock refills it: a `now` that steps back cannot freeze it.
        fast = functools.partial(store.take_tokens, "a", capacity=3, per_second=1000.0)
        assert await fast(want=3, now=later) == 3
        await asyncio.sleep(0.05)
        assert await fast(want=3, now=NOW) >= 1
        return
    take = functools.partial(store.take_tokens, "a", capacity=3, per_second=1.0)
    assert await take(want=3, now=later) == 3
    assert await take(want=3, now=NOW) == 0  # the step back itself refills nothing
    assert await take(want=3, now=NOW + 2 * SECOND) == 2


async def test_clock_offset_is_the_databases_clock_against_ours(store: Store) -> None:
    """PostgreSQL reports its clock's offset from this process's wall clock (here one machine:
    within a second); stores whose clock is the caller's report none."""
    offset = await store.clock_offset()
    if type(store).__name__ == "PostgresStore":
        assert offset is not None
        assert abs(offset.total_seconds()) < 1
    else:
        assert offset is None


async def test_a_clock_step_back_brings_later_schedules_forward(store: Store) -> None:
    """The machine's clock stepped back an hour: a retry scheduled 5 s ahead before the step
    is 5 s ahead of the new time, one 2 h ahead 1 h ahead, and a delivery due at once before
    the step is due at once after it (not in an hour); done deliveries and leases are left
    alone. (PostgreSQL moves nothing: its schedules are written by replicas whose clocks did
    not step.)"""
    for name in ("evt_soon", "evt_later", "evt_due", "evt_done", "evt_held"):
        assert await store.accept(event(name), ["a"], now=NOW)
    claimed = {
        d.event.id: d for d in await store.claim(handler="a", limit=10, lease=LEASE, now=NOW)
    }
    assert await store.retry(
        claimed["evt_soon"], attempt(AttemptOutcome.RETRY), at=NOW + 5 * SECOND
    )
    assert await store.retry(
        claimed["evt_later"], attempt(AttemptOutcome.RETRY), at=NOW + timedelta(hours=2)
    )
    assert await store.release(claimed["evt_due"])
    assert await store.complete(claimed["evt_done"], attempt(AttemptOutcome.OK))
    before = {d.event_id: d for d in await store.list_deliveries()}
    stepped = NOW - timedelta(hours=1)
    moved = await store.clock_stepped_back(by=timedelta(hours=1), now=stepped)
    after = {d.event_id: d for d in await store.list_deliveries()}
    if type(store).__name__ == "PostgresStore":
        assert moved == 0
        assert after == before
        return
    assert moved == 4
    assert after["evt_soon"].next_attempt_at == stepped + 5 * SECOND
    assert after["evt_later"].next_attempt_at == NOW + timedelta(hours=1)
    assert after["evt_due"].next_attempt_at == stepped
    assert after["evt_held"].next_attempt_at == stepped
    assert after["evt_held"].lease_until == before["evt_held"].lease_until
    assert after["evt_done"] == before["evt_done"]
    (due,) = await store.claim(handler="a", limit=10, lease=LEASE, now=stepped)
    assert due.event.id == "evt_due"
    (soon,) = await store.claim(handler="a", limit=10, lease=LEASE, now=stepped + 5 * SECOND)
    assert soon.event.id == "evt_soon"


async def test_a_step_back_after_a_step_forward_moves_only_what_was_written_since(
    store: Store,
) -> None:
    """The clock stepped an hour forward (to ``written_since``), then back: a retry written
    before the step forward (of the true clock) stays where it is; one written by the clock
    ahead comes an hour earlier. (PostgreSQL moves nothing.)"""
    assert await store.accept(event("evt_old"), ["a"], now=NOW)
    (old,) = await store.claim(handler="a", limit=10, lease=LEASE, now=NOW)
    assert await store.retry(old, attempt(AttemptOutcome.RETRY), at=NOW + timedelta(hours=2))
    ahead = NOW + timedelta(hours=1)
    assert await store.accept(event("evt_new"), ["a"], now=ahead)
    (new,) = await store.claim(handler="a", limit=10, lease=LEASE, now=ahead)
    assert await store.retry(new, attempt(AttemptOutcome.RETRY, at=ahead), at=ahead + 5 * SECOND)
    moved = await store.clock_stepped_back(
        by=timedelta(hours=1), now=NOW, written_since=NOW + timedelta(seconds=2)
    )
    after = {d.event_id: d.next_attempt_at for d in await store.list_deliveries()}
    if type(store).__name__ == "PostgresStore":
        assert moved == 0
        assert after == {"evt_old": NOW + timedelta(hours=2), "evt_new": ahead + 5 * SECOND}
        return
    assert moved == 1
    assert after == {"evt_old": NOW + timedelta(hours=2), "evt_new": NOW + 5 * SECOND}


async def test_concurrent_takers_never_exceed_the_bucket(store: Store) -> None:
    """Many takers at once (as several replicas): together they get at most capacity."""
    got = await asyncio.gather(
        *(
            store.take_tokens("a", want=3, capacity=10, per_second=0.001, now=wall_now())
            for _ in range(20)
        )
    )
    assert sum(got) == 10


# --- search_events (the admin search, SPEC §9 GET /events) ----------------------------------
# Leases on PostgreSQL run by the database's clock and due-ness by the caller's `now`, and a
# search judges both by the present: these tests place their events around the real time.


def body_event(event_id: str, raw: bytes, event_type: str = "job.completed") -> Event:
    """An event stored with ``raw`` as its body as is (bodies stored before today's checks, or
    written by another tool, may hold what intake now refuses)."""
    return Event(id=event_id, type=event_type, payload={}, raw=raw)


async def search_ids(store: Store, where: EventFilter | None = None, **kwargs: Any) -> list[str]:
    page = await store.search_events(where or EventFilter(**kwargs), limit=500)
    assert page.next_cursor is None
    return [r.id for r in page.records]


async def seed_search(store: Store) -> datetime:
    """Six events one second apart (e1 oldest) with deliveries of `a` and `b` in known states;
    returns the received time of e1."""
    t0 = wall_now() - timedelta(hours=1)
    specs: list[tuple[str, str, str, dict[str, Any]]] = [
        ("e1", "job.completed", "task_1", {"title": "Late Night Study", "n": 1}),
        ("e2", "job.failed", "task_1", {"title": "Late Night Study", "n": 2, "ok": False}),
        ("e3", "job.completed", "task_2", {"title": "Morning", "n": 1.5, "ok": True}),
        ("e4", "job.completed", "task_3", {"title": "1", "n": None, "meta": {"k": {"x": "y"}}}),
        ("e5", "job.progress", "task_3", {"title": "Evening", "n": 1, "tags": ["a"]}),
        ("e6", "job.completed", "task_4", {"title": "Late Night Study x", "n": 10}),
    ]
    for i, (event_id, event_type, task_id, data) in enumerate(specs):
        handlers = ["a"] if event_id != "e6" else ["a", "b"]
        stored = event(event_id, event_type, task_id=task_id, **data)
        assert await store.accept(stored, handlers, now=t0 + i * SECOND)
    # a: e1 done, e2 dead, e3 waiting (retry in an hour), e4 running (leased now), e5/e6 due.
    now = wall_now()
    for _ in range(4):
        claimed = await store.claim(handler="a", limit=1, lease=LEASE, now=now)
        (d,) = claimed
        at = Attempt(now, now + SECOND, AttemptOutcome.OK, None)
        if d.event.id == "e1":
            assert await store.complete(d, at)
        elif d.event.id == "e2":
            assert await store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, "boom"))
        elif d.event.id == "e3":
            retry = Attempt(now, now, AttemptOutcome.RETRY, "later")
            assert await store.retry(d, retry, at=now + timedelta(hours=1))
        else:
            assert d.event.id == "e4"  # left leased: running
    return t0


async def test_search_filters(store: Store) -> None:
    """Each filter alone and together selects what EventFilter's docstring says, newest
    first."""
    t0 = await seed_search(store)
    assert await search_ids(store) == ["e6", "e5", "e4", "e3", "e2", "e1"]
    assert await search_ids(store, type="job.completed") == ["e6", "e4", "e3", "e1"]
    assert await search_ids(store, type="job.nothing") == []
    assert await search_ids(store, task_id="task_3") == ["e5", "e4"]
    assert await search_ids(store, since=t0 + 2 * SECOND) == ["e6", "e5", "e4", "e3"]
    assert await search_ids(store, until=t0 + 2 * SECOND) == ["e2", "e1"]
    assert await search_ids(store, since=t0 + SECOND, until=t0 + 3 * SECOND) == ["e3", "e2"]
    assert await search_ids(store, handler="b") == ["e6"]
    assert await search_ids(store, handler="zz") == []
    assert await search_ids(store, handler="a", status="done") == ["e1"]
    assert await search_ids(store, handler="a", status="dead") == ["e2"]
    assert await search_ids(store, handler="a", status="waiting") == ["e3"]
    assert await search_ids(store, handler="a", status="running") == ["e4"]
    assert await search_ids(store, handler="a", status="due") == ["e6", "e5"]
    assert await search_ids(store, handler="a", status="pending") == ["e6", "e5", "e4", "e3"]
    assert await search_ids(store, handler="b", status="due") == ["e6"]
    assert await search_ids(store, handler="b", status="dead") == []
    assert await search_ids(store, status="dead") == ["e2"]
    assert await search_ids(store, q="Late Night") == ["e6", "e2", "e1"]
    assert await search_ids(store, q="late night") == []  # case-sensitive
    assert await search_ids(store, q='"n":1.5') == ["e3"]
    both = EventFilter(type="job.completed", q="Late Night", handler="a", status="pending")
    assert await search_ids(store, both) == ["e6"]


async def test_search_match(store: Store) -> None:
    """match: a string equal to the value, or a number/boolean/null whose JSON text equals it;
    dotted paths through objects only; several conditions all hold."""
    await seed_search(store)

    async def match(*pairs: tuple[str, str]) -> list[str]:
        return await search_ids(store, match=pairs)

    assert await match(("data.title", "Late Night Study")) == ["e2", "e1"]
    assert await match(("data.title", "Late Night")) == []  # equality, not substring
    assert await match(("data.title", "1")) == ["e4"]  # the string "1"
    assert await match(("data.n", "1")) == ["e5", "e1"]  # the number 1
    assert await match(("data.n", "1.5")) == ["e3"]
    assert await match(("data.n", "null")) == ["e4"]
    assert await match(("data.ok", "false")) == ["e2"]
    assert await match(("data.ok", "true")) == ["e3"]
    assert await match(("data.meta.k.x", "y")) == ["e4"]
    assert await match(("data.meta.k", '{"x":"y"}')) == []  # objects never match
    assert await match(("data.tags", '["a"]')) == []  # nor arrays
    assert await match(("data.tags.0", "a")) == []  # no list indexing
    assert await match(("data.missing", "null")) == []  # missing is not null
    assert await match(("type", "job.failed")) == ["e2"]
    assert await match(("data.title", "Late Night Study"), ("data.n", "2")) == ["e2"]
    assert await match(("data.title", "Late Night Study"), ("data.n", "10")) == []


async def test_search_match_odd_keys(store: Store) -> None:
    """Keys holding characters that JSON path syntaxes use ($ [ ] " * space) are plain
    labels."""
    data = {"a[0]": "bracket", 'q"uote': "quote", "$ *": "dollar", "é": "accent"}
    assert await store.accept(event("odd", **data), [], now=wall_now())
    assert await store.accept(event("plain"), [], now=wall_now())
    for key, value in data.items():
        assert await search_ids(store, match=((f"data.{key}", value),)) == ["odd"], key
        assert await search_ids(store, match=((f"data.{key}", "other"),)) == []
    # Values a sender wrote with escapes still equal their decoded text.
    escaped = b'{"id":"esc","type":"t","data":{"u":"a\\/b","v":"\\u00e9t\\u00e9","w":"\\u0041"}}'
    assert await store.accept(body_event("esc", escaped), [], now=wall_now())
    assert await search_ids(store, match=(("data.u", "a/b"),)) == ["esc"]
    assert await search_ids(store, match=(("data.v", "été"),)) == ["esc"]


HOSTILE_BODIES: dict[str, bytes] = {
    "nul": b'{"id":"nul","type":"t","data":{"title":"a\\u0000b","x\\u0000y":1}}',
    "nul_key": b'{"id":"nul_key","type":"t","data":{"\\u0000":"v"}}',
    "surrogate": b'{"id":"surrogate","type":"t","data":{"title":"\\ud800"}}',
    "big_float": b'{"id":"big_float","type":"t","data":{"n":1e400}}',
    "big_int": b'{"id":"big_int","type":"t","data":{"n":' + b"9" * 5000 + b"}}",
    "deep": b'{"id":"deep","type":"t","data":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    "huge": b'{"id":"huge","type":"t","data":{"title":"' + b"x" * 2_000_000 + b'"}}',
    "not_json": b"this is not JSON at all",
}


async def test_search_never_fails_on_hostile_bodies(store: Store) -> None:
    """Bodies a database's JSON cannot read as they are (NUL escapes, lone surrogates, numbers
    beyond a double, nesting past any parser's limit, megabytes of text, not JSON) never fail
    a search: a `match` skips what it cannot read (NULs and lone surrogates it reads: see
    test_match_reads_nul_and_lone_surrogates_as_replacement_characters), `q` still reads
    their bytes, and the other events are found."""
    now = wall_now()
    for event_id, raw in HOSTILE_BODIES.items():
        assert await store.accept(body_event(event_id, raw), ["a"], now=now)
    assert await store.accept(event("normal", title="Late Night Study", n=1), ["a"], now=now)
    everything = ["normal", *reversed(HOSTILE_BODIES)]
    assert await search_ids(store) == everything
    assert await search_ids(store, match=(("data.title", "Late Night Study"),)) == ["normal"]
    assert await search_ids(store, match=(("data.n", "1"),)) == ["normal"]
    for path, wanted in [
        ("data.title", "a"),
        ("data.title", "a\x01b"),
        ("data.n", "1e400"),
        ("data.n", "9" * 50),
        ("data.a.a.a", "1"),
        ("data.title", "x" * 20),
        ("data.x", "1"),
    ]:
        found = await search_ids(store, match=((path, wanted),))
        assert "normal" not in found
    # Strings with an escaped NUL never equal a value without one (values cannot hold NUL).
    assert "nul" not in await search_ids(store, match=(("data.title", "a"),))
    assert await search_ids(store, q="\\u0000") == ["nul_key", "nul"]
    assert await search_ids(store, q="is not JSON") == ["not_json"]
    assert await search_ids(store, q="\ud800") == []  # no stored text holds a lone surrogate
    # Columns never hold NUL: such filter values (the API refuses them; other callers may
    # not) find nothing, and never fail. (A `match` value with NUL is left to each backend.)
    for nul in [
        EventFilter(type="t\x00"),
        EventFilter(task_id="\x00"),
        EventFilter(handler="a\x00"),
    ]:
        assert await search_ids(store, nul) == []
    for path, wanted in [("data.title", "a\x00b"), ("data.\x00", "v")]:
        await search_ids(store, match=((path, wanted),))
    assert await search_ids(store, q="x" * 1000) == ["huge"]
    assert await search_ids(store, handler="a", status="due") == everything


def titled(event_id: str, data: bytes) -> Event:
    """A stored body ``{"id":…,"type":"t","data":{"title":"Night","n":7,"ok":true,<data>}}``
    (``data``: raw JSON members, escapes as a sender wrote them)."""
    raw = b'{"id":"%s","type":"t","data":{"title":"Night","n":7,"ok":true,%s}}'
    return body_event(event_id, raw % (event_id.encode(), data))


#: Bodies holding what PostgreSQL's jsonb cannot hold (a NUL, unpaired surrogates; a key
#: too), a valid pair, and escaped backslashes followed by "u0000": b"\\u0000" below is the
#: JSON escape \u0000, b"\\\\u0000" an escaped backslash and the text u0000.
UNREADABLE_BODIES: dict[str, bytes] = {
    "nul": b'"note":"a\\u0000b"',
    "lone": b'"note":"\\ud800"',
    "lone_upper": b'"note":"\\uDC00\\uD8FF"',  # a low then a high: both unpaired
    "nul_key": b'"k\\u0000":"v"',
    "pair": b'"note":"\\ud83d\\ude00"',  # a valid pair: one character
    "escaped": b'"note":"\\\\u0000"',  # a backslash, then the text u0000
    "odd": b'"note":"\\\\\\u0000"',  # a backslash, then a NUL
    "plain": b'"note":"a\xef\xbf\xbdb"',  # U+FFFD as UTF-8, no escape
}


async def test_match_finds_bodies_holding_a_nul_or_a_lone_surrogate(store: Store) -> None:
    """A body holding a \\u0000 or an unpaired surrogate escape in one field is found by a
    `match` on its other fields on every backend (PostgreSQL's jsonb refuses the whole body:
    lacuna_payload read it as NULL and backfill --match, replays and GET /events missed it
    there only)."""
    now = wall_now()
    for event_id, data in UNREADABLE_BODIES.items():
        assert await store.accept(titled(event_id, data), ["a"], now=now)
    everything = list(reversed(UNREADABLE_BODIES))
    assert await search_ids(store, match=(("data.title", "Night"),)) == everything
    assert await search_ids(store, match=(("data.n", "7"),)) == everything
    assert await search_ids(store, match=(("data.ok", "true"),)) == everything
    assert await search_ids(store, match=(("data.title", "Night"), ("data.n", "7.0"))) == (
        everything
    )
    # The budgeted scan (GET /events, backfill) reads them the same way.
    budget = ScanBudget(seconds=10.0)
    page = await store.search_events(EventFilter(match=(("type", "t"),)), budget=budget)
    assert [r.id for r in page.records] == everything


async def test_match_reads_nul_and_lone_surrogates_as_replacement_characters(
    store: Store,
) -> None:
    """In a string or key, each NUL and each unpaired surrogate reads as U+FFFD on every
    backend (what PostgreSQL compares, docs/admin.md); a valid pair is its character, and an
    escaped backslash before "u0000" is text, as before."""
    now = wall_now()
    for event_id, data in UNREADABLE_BODIES.items():
        assert await store.accept(titled(event_id, data), [], now=now)

    async def match(path: str, wanted: str) -> list[str]:
        return await search_ids(store, match=((path, wanted),))

    assert await match("data.note", "a\ufffdb") == ["plain", "nul"]
    for other in ["a", "ab", "a\x00b", "a\ufffd", "\ufffdb"]:
        assert await match("data.note", other) == [], other
    assert await match("data.note", "\ufffd") == ["lone"]
    assert await match("data.note", "\ufffd\ufffd") == ["lone_upper"]
    assert await match("data.k\ufffd", "v") == ["nul_key"]
    assert await match("data.k", "v") == []
    assert await match("data.note", "\U0001f600") == ["pair"]
    assert await match("data.note", "\\u0000") == ["escaped"]  # read as before
    assert await match("data.note", "\\\ufffd") == ["odd"]
    assert await match("data.note", "\\") == []


async def test_search_pages_follow_cursors(store: Store) -> None:
    """Pages of `limit` follow each other newest first with no gap or repeat, also across
    events received at the same instant; the last page has no cursor. Events stored after
    the first page do not shift the following pages."""
    now = wall_now()
    for i in range(7):
        at = now if i in (2, 3, 4) else now + i * SECOND  # three ties
        assert await store.accept(event(f"p{i}", n=i), [], now=at)
    expected = ["p6", "p5", "p1", "p4", "p3", "p2", "p0"]  # ties: later arrival first
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.search_events(EventFilter(), cursor=cursor, limit=3)
        seen += [r.id for r in page.records]
        pages += 1
        if pages == 1:
            assert await store.accept(event("late"), [], now=now + 10 * SECOND)
        if page.next_cursor is None:
            break
        assert isinstance(page.next_cursor, str)
        cursor = page.next_cursor
    assert seen == expected
    assert pages == 3
    # A filtered listing pages the same way; exactly `limit` results leave no cursor.
    page = await store.search_events(EventFilter(match=(("data.n", "3"),)), limit=1)
    assert [r.id for r in page.records] == ["p3"]
    assert page.next_cursor is None
    exact = await store.search_events(EventFilter(until=now + 10 * SECOND), limit=7)
    assert len(exact.records) == 7
    assert exact.next_cursor is None


async def test_search_refuses_cursors_it_did_not_make(store: Store) -> None:
    """A cursor that is not one this store made is a ValueError (the API's 400), never a
    database error or an empty page."""
    from lacuna_webhooks.store.search import encode_cursor

    for bad in [
        "",
        "garbage!",
        "bm90IGpzb24",
        encode_cursor("x"),
        encode_cursor(1, 2, 3),
        encode_cursor("2025-01-01", "x"),
        encode_cursor(None, None),
        encode_cursor(True, 1),
        encode_cursor(1.5, 2.5),
        encode_cursor({"a": 1}, 1),
        "\ud800",
    ]:
        with pytest.raises(ValueError, match="cursor"):
            await store.search_events(EventFilter(), cursor=bad)


# --- budgeted search (ScanBudget: GET /events answers within a time budget) ----------------


async def seed_spread(store: Store) -> datetime:
    """40 events over 30 s, three pairs received at the same instant; every seventh has
    ``data.title`` ``hit`` (and ``needle`` in its body), the others ``miss``; types alternate."""
    now = wall_now()
    for i in range(40):
        at = now + (i - i % 2 * (i % 5 == 1)) * SECOND  # ties: 1 with 0, 11 with 10, ...
        kind = "job.completed" if i % 2 else "job.failed"
        title = "hit needle" if i % 7 == 3 else "miss"
        assert await store.accept(event(f"s{i:02d}", kind, title=title), ["a"], now=at)
    return now


async def follow(
    store: Store, where: EventFilter, budget: ScanBudget | None, limit: int
) -> tuple[list[list[str]], list[bool]]:
    """Every page's ids and ``complete``, following ``next_cursor`` to the end."""
    pages: list[list[str]] = []
    complete: list[bool] = []
    cursor: str | None = None
    while True:
        page = await store.search_events(where, cursor=cursor, limit=limit, budget=budget)
        pages.append([r.id for r in page.records])
        complete.append(page.complete)
        assert len(page.records) <= limit
        if not page.complete:
            assert page.next_cursor is not None
            assert page.searched_to is not None
        else:
            assert page.searched_to is None
        if page.next_cursor is None:
            return pages, complete
        cursor = page.next_cursor
        assert len(pages) < 100, "the cursors do not progress"


def simulate(candidates: list[str], matches: set[str], window: int, limit: int) -> list[list[str]]:
    """The pages ``ScanBudget(seconds=0, first_window=window)`` cuts (one window per call):
    a page stops after its window, or after one match past ``limit`` (next page from the
    last row returned)."""
    pages: list[list[str]] = []
    start = 0
    while True:
        found: list[int] = []
        end = min(start + window, len(candidates))
        for i in range(start, end):
            if candidates[i] in matches:
                found.append(i)
                if len(found) > limit:
                    break
        if len(found) > limit:
            pages.append([candidates[i] for i in found[:limit]])
            start = found[limit - 1] + 1
        else:
            pages.append([candidates[i] for i in found])
            if end >= len(candidates):
                return pages
            start = end


@pytest.mark.parametrize(
    "where",
    [
        EventFilter(match=(("data.title", "hit needle"),)),
        EventFilter(q="needle"),
        EventFilter(type="job.completed", q="needle"),
        EventFilter(handler="a", status="pending", match=(("data.title", "hit needle"),)),
    ],
    ids=["match", "q", "type+q", "status+match"],
)
async def test_budgeted_search_pages_see_every_match_once(store: Store, where: EventFilter) -> None:
    """Following next_cursor with a budget that stops the scan after every window (seconds
    0, windows of 3 events) gives exactly the ids of one unbounded search, in order, through
    incomplete and empty pages; the pages are the ones the window rule predicts, on every
    backend; the scan resumes where it stopped, not after the last row returned."""
    now = await seed_spread(store)
    where = replace(where, since=now - SECOND, until=now + 40 * SECOND)
    unbounded = await store.search_events(where, limit=500)
    assert unbounded.complete
    assert unbounded.next_cursor is None
    expected = [r.id for r in unbounded.records]
    assert len(expected) >= 3
    for limit in (1, 2, 500):
        pages, complete = await follow(store, where, ScanBudget(0, first_window=3), limit)
        assert [i for page in pages for i in page] == expected, limit
        if where.status is not None and store_kind(store) == "sqlite":
            assert all(complete)  # a rare delivery state drives it from its deliveries
            continue
        assert not all(complete)
        assert [] in pages  # a window without a match: an empty page, and go on
        everything = await store.search_events(
            EventFilter(type=where.type, since=where.since, until=where.until), limit=500
        )
        candidates = [r.id for r in everything.records]
        assert pages == simulate(candidates, set(expected), 3, limit)
    # A generous budget answers as an unbounded search: one complete page.
    pages, complete = await follow(store, where, ScanBudget(60), 500)
    assert pages == [expected]
    assert complete == [True]


async def test_budgeted_search_cursors_are_cursors(store: Store) -> None:
    """The cursor of an incomplete page is validated like any (a forged one is a
    ValueError with or without a budget), resumes an unbudgeted search exactly where the
    scan stopped, and an indexed search ignores the budget (complete pages as before)."""
    from lacuna_webhooks.store.search import encode_cursor

    now = await seed_spread(store)
    where = EventFilter(q="needle", since=now - SECOND)
    expected = [r.id for r in (await store.search_events(where, limit=500)).records]
    first = await store.search_events(where, limit=50, budget=ScanBudget(0, first_window=5))
    assert not first.complete
    assert first.next_cursor is not None
    rest = await store.search_events(where, cursor=first.next_cursor, limit=500)
    assert [r.id for r in first.records + rest.records] == expected
    assert first.searched_to is not None
    assert all(r.received_at >= first.searched_to for r in first.records)
    assert all(r.received_at <= first.searched_to for r in rest.records)
    for bad in ["", "garbage!", encode_cursor(1.5, 2.5), encode_cursor(None, None), "\ud800"]:
        with pytest.raises(ValueError, match="cursor"):
            await store.search_events(where, cursor=bad, budget=ScanBudget(0, first_window=5))
    # A NUL in a match value matches nothing anywhere (PostgreSQL: in one statement).
    nul = EventFilter(match=(("data.title", "hit\x00"),), since=now - SECOND)
    pages, _ = await follow(store, nul, ScanBudget(0, first_window=8), 5)
    assert all(page == [] for page in pages)
    indexed = await store.search_events(
        EventFilter(type="job.failed"), limit=3, budget=ScanBudget(0, first_window=1)
    )
    assert indexed.complete
    assert len(indexed.records) == 3
    assert indexed.next_cursor is not None


def store_kind(store: Store) -> str:
    name = type(store).__module__
    return "sqlite" if ".sqlite" in name else ("postgres" if ".postgres" in name else "memory")


async def test_list_deliveries_before_pages_by_id(store: Store) -> None:
    """`before` lists only deliveries with a smaller id, newest first (the API's cursor)."""
    for i in range(5):
        assert await store.accept(event(f"d{i}"), ["a"], now=NOW)
    everything = await store.list_deliveries(limit=10)
    assert [d.event_id for d in everything] == ["d4", "d3", "d2", "d1", "d0"]
    older = await store.list_deliveries(limit=2, before=everything[1].id)
    assert [d.event_id for d in older] == ["d2", "d1"]
    assert await store.list_deliveries(before=everything[-1].id) == []
    assert [
        d.event_id for d in await store.list_deliveries(handler="a", before=everything[3].id)
    ] == ["d0"]


async def test_handler_activity(store: Store) -> None:
    """Per handler: pending split into due / running / waiting, dead, and the window's attempts
    with their success count, nearest-rank p50/p95 durations and latest error; attempts before
    the window do not count; handlers with only done deliveries and no recent attempt are
    absent."""
    now = wall_now()
    since = now - timedelta(hours=1)
    for i in range(6):
        assert await store.accept(event(f"h{i}"), ["a", "b"], now=now - timedelta(hours=2))
    assert await store.accept(event("old"), ["c"], now=now - timedelta(hours=3))
    # c: one delivery completed three hours ago: outside the window, so c is absent.
    (c,) = await store.claim(handler="c", limit=1, lease=LEASE, now=now)
    three_hours = now - timedelta(hours=3)
    assert await store.complete(c, Attempt(three_hours, three_hours, AttemptOutcome.OK, None))
    claimed = await store.claim(handler="a", limit=5, lease=LEASE, now=now)
    assert len(claimed) == 5
    durations = [0.1, 0.2, 0.3, 0.4]
    for d, seconds in zip(claimed[:3], durations, strict=False):
        assert await store.complete(
            d, Attempt(now, now + timedelta(seconds=seconds), AttemptOutcome.OK, None)
        )
    retry = Attempt(now, now + timedelta(seconds=0.4), AttemptOutcome.RETRY, "first")
    assert await store.retry(claimed[3], retry, at=now + timedelta(hours=1))
    dead = Attempt(now + SECOND, now + 3 * SECOND, AttemptOutcome.DEAD, "latest")
    assert await store.dead(claimed[4], dead)
    # a: 1 left due (h5); b: 6 due; the running one: claim one of b.
    (running,) = await store.claim(handler="b", limit=1, lease=LEASE, now=now)
    activity = {h.handler: h for h in await store.handler_activity(now=now, since=since)}
    assert sorted(activity) == ["a", "b"]
    a, b = activity["a"], activity["b"]
    assert (a.due, a.running, a.waiting, a.dead) == (1, 0, 1, 1)
    assert (b.due, b.running, b.waiting, b.dead) == (5, 1, 0, 0)
    assert (a.attempts, a.succeeded) == (5, 3)
    # durations 0.1 0.2 0.3 0.4 2.0: p50 is rank 3, p95 rank 5
    assert a.p50_seconds == pytest.approx(0.3, abs=1e-3)
    assert a.p95_seconds == pytest.approx(2.0, abs=1e-3)
    assert a.last_error == "latest"
    assert a.last_error_at is not None
    assert abs((a.last_error_at - (now + 3 * SECOND)).total_seconds()) < 0.01
    assert (b.attempts, b.succeeded, b.p50_seconds, b.p95_seconds) == (0, 0, None, None)
    assert b.last_error is None
    assert running.handler == "b"


# --- match: hostile keys, escapes, numbers (issue 13's hostile tester) ---------------------


def raw_event(event_id: str, data: bytes) -> Event:
    """An event whose body's ``data`` is ``data`` exactly as written (escapes kept)."""
    return body_event(
        event_id, b'{"id":"' + event_id.encode() + b'","type":"t","data":' + data + b"}"
    )


HOSTILE_KEYS = ['q"uote', "back\\slash", 'both\\"', "\\u0041", "'", "$[*]", "é", " "]


async def test_search_match_hostile_keys(store: Store) -> None:
    """Keys holding `"`, `\\`, escapes and path syntax, written plainly or with escapes, at
    depth 1 and at the deepest path the API allows, match exactly the right events."""
    from lacuna_webhooks.admin.filters import MAX_MATCH_DEPTH

    now = wall_now()
    for i, key in enumerate(HOSTILE_KEYS):
        body = orjson.dumps({key: f"v{i}", "other": "x"})
        assert await store.accept(raw_event(f"k{i}", body), [], now=now)
    # The same key written with \u escapes (no encoder does for ASCII; a sender may).
    assert await store.accept(raw_event("esc", b'{"\\u0071\\"uote":"v0"}'), [], now=now)
    deep_keys = [f'k"{n}\\' for n in range(MAX_MATCH_DEPTH - 1)]
    nested: Any = "deep"
    for key in reversed(deep_keys[1:]):
        nested = {key: nested}
    assert await store.accept(raw_event("deep", orjson.dumps({deep_keys[0]: nested})), [], now=now)
    for i, key in enumerate(HOSTILE_KEYS):
        want = ["esc", f"k{i}"] if i == 0 else [f"k{i}"]
        assert await search_ids(store, match=((f"data.{key}", f"v{i}"),)) == want, key
        assert await search_ids(store, match=((f"data.{key}", "x"),)) == [], key
    path = "data." + ".".join(deep_keys)
    assert len(path.split(".")) == MAX_MATCH_DEPTH
    assert await search_ids(store, match=((path, "deep"),)) == ["deep"]
    assert await search_ids(store, match=((path, "deeper"),)) == []
    assert await search_ids(store, match=((path, "deep"),) * 10) == ["deep"]


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_search_sql_grows_linearly_with_the_path(dialect: str) -> None:
    """The statement for a match path grows with its length, not 2**depth: it is built on
    the event loop, and a crafted `match` must not block intake."""
    from lacuna_webhooks.store.searchsql import search_sql

    def size(depth: int) -> int:
        path = ".".join(['k"\\'] * depth)
        where = EventFilter(match=((path, "v"),) * 10)
        sql, params = search_sql(dialect, where, cursor=None, limit=50, now=wall_now())  # type: ignore[arg-type]
        return len(sql) + sum(len(str(p)) for p in params)

    assert size(16) < 3 * size(8) < 9 * size(4)


async def test_search_match_sees_through_escapes(store: Store) -> None:
    """A value or key written with JSON escapes equals its decoded text (the memory backend
    is the reference); `q` stays a substring of the raw body."""
    now = wall_now()
    bodies = {
        "plain": b'{"title":"Late"}',
        "value_escaped": b'{"title":"\\u004cate"}',
        "key_escaped": b'{"\\u0074itle":"Late"}',
        "slash": b'{"title":"Late","url":"a\\/b"}',
        "later": b'{"title":"Later"}',
        "other": b'{"name":"Late"}',
        "quote": b'{"title":"a\\"b"}',
        "solidus": b'{"title":"a\\/b"}',
        "emoji": b'{"title":"\\ud83d\\ude00"}',
        "emoji_raw": '{"title":"\U0001f600"}'.encode(),
    }
    for event_id, data in bodies.items():
        assert await store.accept(raw_event(event_id, data), [], now=now)
    found = set(await search_ids(store, match=(("data.title", "Late"),)))
    assert found == {"plain", "value_escaped", "key_escaped", "slash"}
    assert await search_ids(store, match=(("data.title", 'a"b'),)) == ["quote"]
    assert await search_ids(store, match=(("data.title", "a/b"),)) == ["solidus"]
    assert set(await search_ids(store, match=(("data.title", "\U0001f600"),))) == {
        "emoji",
        "emoji_raw",
    }
    assert set(await search_ids(store, q="Late")) == {
        "plain",
        "key_escaped",
        "slash",
        "later",
        "other",
    }


NUMBER_BODIES = {
    "int": "1",
    "fraction": "1.0",
    "exponent": "1e0",
    "exponent_fraction": "10E-1",
    "negative_zero": "-0",
    "zero": "0.0",
    "huge": "10000000000000000000001",
    "huge_exp": "1e22",
    "beyond_double": "1e400",
    "hundred": "100",
    "half": "1.5",
    "string_1": '"1"',
    "string_1.0": '"1.0"',
    "true": "true",
    "string_true": '"true"',
    "null": "null",
    "string_null": '"null"',
    "big_int": "9223372036854775809",
}
NUMBER_VALUES = [
    "1",
    "1.0",
    "1e0",
    "0",
    "-0",
    "10000000000000000000001",
    "1e22",
    "1e400",
    "100",
    "1e2",
    "1.5",
    "15e-1",
    "true",
    "null",
    "01",
    "+1",
    "1.",
    "9223372036854775809",
    "9223372036854775808",
    "abc",
]


def number_rule(raw: str, wanted: str) -> bool:
    """docs/admin.md's rule, written independently of the service: a JSON string equal to
    the value; a number numerically equal (exact decimals) when the value is a JSON number;
    true/false/null when the value is that literal."""
    import re
    from decimal import Decimal

    if raw.startswith('"'):
        return bool(orjson.loads(raw) == wanted)
    if raw in ("true", "false", "null"):
        return raw == wanted
    number = re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", wanted)
    return number is not None and Decimal(raw) == Decimal(wanted)


async def test_search_match_numbers_one_rule(store: Store) -> None:
    """Every backend applies the one rule of docs/admin.md to numbers, strings and literals,
    comparing numbers exactly as decimals (not as doubles, not as text)."""
    now = wall_now()
    for event_id, raw in NUMBER_BODIES.items():
        assert await store.accept(raw_event(event_id, b'{"n":' + raw.encode() + b"}"), [], now=now)
    for wanted in NUMBER_VALUES:
        expected = {e for e, raw in NUMBER_BODIES.items() if number_rule(raw, wanted)}
        assert set(await search_ids(store, match=(("data.n", wanted),))) == expected, wanted


def drawn_number_pairs(count: int) -> list[tuple[str, str]]:
    """``count`` (payload number, match value) pairs drawn by hypothesis: one decimal written
    two ways (plain, exponent, ``str``; trailing zeros; beyond a double's 17 digits), or two
    decimals one unit of the last digit apart, or the value a JSON string. Collected first:
    the store lives on this test's event loop, which a ``@given`` coroutine would not share."""
    from decimal import Decimal

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    def render(number: Decimal, form: int, zeros: int) -> str:
        if form == 0:
            text = format(number, "f")
            if zeros and "." not in text:
                text += "." + "0" * zeros
            return text
        if form == 1:
            return format(number, "e")
        return str(number)

    decimals = st.builds(
        lambda digits, exponent, negative: Decimal(f"{'-' if negative else ''}{digits}e{exponent}"),
        st.integers(0, 10**25),
        st.integers(-30, 30),
        st.booleans(),
    )
    found: list[tuple[str, str]] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        decimals,
        st.integers(0, 2),
        st.integers(0, 2),
        st.integers(0, 3),
        st.sampled_from(["same", "next", "string"]),
    )
    def collect(number: Decimal, form_a: int, form_b: int, zeros: int, how: str) -> None:
        payload = render(number, form_a, zeros)
        other = number.next_plus() if how == "next" else number
        wanted = render(other, form_b, 0)
        if how == "string":
            payload = orjson.dumps(wanted).decode()
        found.append((payload, wanted))

    collect()
    return found


async def test_search_match_numbers_drawn(store: Store) -> None:
    """Drawn numbers and values: every backend agrees with the rule of docs/admin.md
    (``number_rule``), so with each other."""
    import re

    pairs = drawn_number_pairs(40)
    now = wall_now()
    for i, (payload, _) in enumerate(pairs):
        assert re.fullmatch(r'-?[0-9][0-9.eE+-]*|".*"', payload), payload
        assert await store.accept(
            raw_event(f"d{i}", b'{"n":' + payload.encode() + b"}"), [], now=now
        )
    for wanted in sorted({w for _, w in pairs}):
        expected = {f"d{i}" for i, (payload, _) in enumerate(pairs) if number_rule(payload, wanted)}
        assert set(await search_ids(store, match=(("data.n", wanted),))) == expected, wanted
