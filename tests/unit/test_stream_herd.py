"""Hundreds of streams and task waits in one process share their store reads.

Each follower of the live stream used to read the store on its own after every accept (and
on its own poll timer): with 300 open streams on PostgreSQL, intake's p50 went from 5 ms to
190 ms (p99 1.4 s), its accepts queued behind 300 reads for the pool's 10 connections. Now
followers at the same cursor share one read per wake-up, task waits for the same task share
theirs, and at most ``SHARED_READS`` run at once whatever the number of waiters.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson

from lacuna_webhooks.models import Event
from lacuna_webhooks.store.base import EventRecord, TaskRecord
from lacuna_webhooks.store.memory import MemoryStore
from lacuna_webhooks.store.stream import SHARED_READS, follow
from tests.conftest import make_event

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
FOLLOWERS = 200


class CountingStore(MemoryStore):
    """A memory store that counts its stream and task reads, and the most run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.running = 0
        self.most_running = 0

    async def _count(self) -> None:
        self.reads += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await asyncio.sleep(0.001)  # a real read takes a while: let the others pile up
        self.running -= 1

    async def stream_after(
        self, cursor: str | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[str, EventRecord]]:
        await self._count()
        return await super().stream_after(cursor, limit, max_bytes)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        await self._count()
        return await super().get_task(task_id)


def _event(event_id: str) -> Event:
    return Event.from_body(orjson.dumps(make_event(event_id)))


async def test_followers_at_one_cursor_share_reads() -> None:
    """200 followers at the head, 5 events stored one by one: every follower gets all 5,
    in order, for far fewer reads than one per follower per event."""
    store = CountingStore()
    await store.open()
    stopping = asyncio.Event()
    head = await store.stream_head()
    got: list[list[str]] = [[] for _ in range(FOLLOWERS)]

    async def one(seen: list[str]) -> None:
        async for batch in follow(store, head, stopping=stopping, idle_seconds=60):
            seen += [record.id for _, record in batch]
            if len(seen) == 5:
                return

    followers = [asyncio.create_task(one(seen)) for seen in got]
    await asyncio.sleep(0.05)
    for i in range(5):
        assert await store.accept(_event(f"evt_herd{i}"), [], now=NOW)
        await asyncio.sleep(0.05)
    async with asyncio.timeout(30):
        await asyncio.gather(*followers)
    assert all(seen == [f"evt_herd{i}" for i in range(5)] for seen in got)
    # One read each at the start, then a handful per event: not 200 per event.
    assert store.reads < FOLLOWERS + 5 * 10, store.reads
    assert store.most_running <= SHARED_READS
    stopping.set()
    await store.close()


async def test_task_waits_share_reads_and_never_exceed_the_bound() -> None:
    """200 waits for one task and 50 for 50 others, woken by 5 accepts: at most
    ``SHARED_READS`` reads at once, and the 200 share theirs."""
    store = CountingStore()
    await store.open()
    signal = store.stream_signal

    async def wait_once(task_id: str) -> None:
        mark = signal.mark()
        await signal.shared(("task", task_id), mark, lambda: store.get_task(task_id))
        await mark.wait()
        mark = signal.mark()
        await signal.shared(("task", task_id), mark, lambda: store.get_task(task_id))

    waits = [asyncio.create_task(wait_once("cm_same")) for _ in range(FOLLOWERS)]
    waits += [asyncio.create_task(wait_once(f"cm_other{i}")) for i in range(50)]
    await asyncio.sleep(0.2)
    assert await store.accept(_event("evt_task"), [], now=NOW)
    async with asyncio.timeout(30):
        await asyncio.gather(*waits)
    assert store.most_running <= SHARED_READS
    assert store.reads <= 2 * (1 + 50) + 4, store.reads
    await store.close()


async def test_a_burst_of_accepts_is_one_batch_per_follower() -> None:
    """20 accepts 5 ms apart: each of 100 followers gets all 20 in order, in a few batches
    (each a store read shared by all and one write per stream), not one per accept fanned
    out to every stream (which kept the loop from intake: 300 streams on PostgreSQL took its
    p50 from 4 to 83 ms even with shared reads)."""
    store = CountingStore()
    await store.open()
    stopping = asyncio.Event()
    head = await store.stream_head()
    batches: list[list[list[str]]] = [[] for _ in range(100)]

    async def one(got: list[list[str]]) -> None:
        async for batch in follow(store, head, stopping=stopping, idle_seconds=60):
            if batch:
                got.append([record.id for _, record in batch])
            if sum(map(len, got)) == 20:
                return

    followers = [asyncio.create_task(one(got)) for got in batches]
    await asyncio.sleep(0.05)
    reads_before = store.reads
    for i in range(20):
        assert await store.accept(_event(f"evt_burst{i:02}"), [], now=NOW)
        await asyncio.sleep(0.005)
    async with asyncio.timeout(30):
        await asyncio.gather(*followers)
    for got in batches:
        assert [i for batch in got for i in batch] == [f"evt_burst{i:02}" for i in range(20)]
        assert len(got) <= 8, got
    assert store.reads - reads_before <= 8 * 3, store.reads - reads_before
    stopping.set()
    await store.close()
