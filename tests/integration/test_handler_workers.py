"""The dispatcher with real handler worker processes (``WorkerPool``) on the memory store:
who is charged when a worker is killed for a timeout, and that a stop leaves no worker.

The plugin is ``tests/e2e/misbehaving_plugin.py`` (its behaviour follows the event id).
Time is the real clock here: the timeouts are short and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from lacuna_webhooks.dispatch import Dispatcher, workers
from lacuna_webhooks.dispatch.attempt import Ending
from lacuna_webhooks.dispatch.workers import WorkerPool, WorkerSpec
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.models import AttemptOutcome, DeliveryStatus, Event
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import make_event, process_exited
from tests.dispatching import only_delivery, running, wait_until
from tests.e2e.misbehaving_plugin import started

NAME = "misbehaving"


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


def pool_dispatcher(
    store: MemoryStore,
    out: Path,
    timeout: float,
    block: float = 60,
    nap: float = 1,
    item: str = "tests.e2e.misbehaving_plugin:Misbehaving",
) -> Dispatcher:
    spec = WorkerSpec(
        name=NAME,
        item=item,
        environ={
            "LACUNA_MISBEHAVING_PATH": str(out),
            "LACUNA_MISBEHAVING_BLOCK": str(block),
            "LACUNA_MISBEHAVING_NAP": str(nap),
        },
        allow_private_urls=False,
        timeout_seconds=timeout,
        log_format="json",
        log_level="warning",
        sys_path=tuple(sys.path),
    )
    # The parent's handler object only names the handler: the pool runs the real one.
    handlers = HandlerSet({NAME: RecordingHandler(NAME)}, {NAME: None}, {NAME: timeout})
    return Dispatcher(
        store,
        handlers,
        policy=RetryPolicy(max_attempts=1, base_delay_seconds=0.1, max_delay_seconds=1),
        runner=WorkerPool([spec]),
        concurrency=4,
        poll_interval_seconds=0.05,
    )


async def accept(store: MemoryStore, event_id: str) -> None:
    event = Event.from_body(orjson.dumps(make_event(event_id)))
    assert await store.accept(event, [NAME], now=datetime.now(UTC))


async def test_blocking_attempt_is_charged_and_its_sibling_released(
    store: MemoryStore, tmp_path: Path
) -> None:
    """A handler that blocks past its timeout gets its worker replaced and records a timeout;
    an attempt that was waiting behind it in that worker is released (its attempt uncounted,
    nothing recorded) and then delivered by the new worker as its first attempt."""
    out = tmp_path / "started.txt"
    d = pool_dispatcher(store, out, timeout=1.0)
    async with running(d, stop_timeout=5):
        await accept(store, "evt_sleep_1")
        await wait_until(lambda: [e for e, _ in started(out)] == ["evt_sleep_1"], 60)
        await accept(store, "evt_ok_sibling")
        await wait_until(lambda: d.in_flight == 2, 10)

        async def both_ended() -> bool:
            rows = await store.list_deliveries()
            return all(r.status is not DeliveryStatus.PENDING for r in rows)

        await wait_until(both_ended, 60)
    blocker = await only_delivery(store, event_id="evt_sleep_1")
    assert blocker.status is DeliveryStatus.DEAD
    (attempt,) = await store.list_attempts(blocker.id)
    assert attempt.outcome is AttemptOutcome.DEAD
    assert attempt.error is not None
    assert attempt.error.startswith("TimeoutError: handler exceeded 1s; it did not yield")
    sibling = await only_delivery(store, event_id="evt_ok_sibling")
    assert (sibling.status, sibling.attempts) == (DeliveryStatus.DONE, 1)
    (ok,) = await store.list_attempts(sibling.id)
    assert (ok.attempt, ok.outcome) == (1, AttemptOutcome.OK)
    pids = dict(started(out))
    assert pids["evt_ok_sibling"] != pids["evt_sleep_1"]  # run by the replacement worker


async def test_a_retry_with_a_delay_that_is_no_number_is_an_attempt_like_any(
    store: MemoryStore, tmp_path: Path
) -> None:
    """``RetryLater(delay_seconds=...)`` with a string, an int past 64 bits or NaN is
    recorded as a retry (the delay ignored or capped), and the worker and the attempt
    beside it carry on. The string broke the outcome's hand-over: the worker was killed,
    the attempt never settled (its delivery running, its slot taken until a restart) and
    the attempt beside it recorded as lost; the huge int left the attempt unanswered until
    the overrun watch killed the worker as a "blocking" handler."""
    out = tmp_path / "started.txt"
    d = pool_dispatcher(store, out, timeout=30.0, nap=1.0)
    async with running(d, stop_timeout=5):
        await accept(store, "evt_nap_sibling")
        await wait_until(lambda: [e for e, _ in started(out)] == ["evt_nap_sibling"], 60)
        for kind in ("text", "huge", "nan"):
            await accept(store, f"evt_delay_{kind}")

        async def all_ended() -> bool:
            rows = await store.list_deliveries()
            return len(rows) == 4 and all(r.status is not DeliveryStatus.PENDING for r in rows)

        await wait_until(all_ended, 30)
    for kind, note in (("text", "'30' ignored"), ("huge", None), ("nan", "nan ignored")):
        delivery = await only_delivery(store, event_id=f"evt_delay_{kind}")
        (attempt,) = await store.list_attempts(delivery.id)
        assert attempt.outcome is AttemptOutcome.DEAD  # a retry, with one attempt allowed
        assert attempt.error is not None
        assert attempt.error.startswith("RetryLater: busy"), attempt.error
        if note is not None:
            assert note in attempt.error
    sibling = await only_delivery(store, event_id="evt_nap_sibling")
    assert (sibling.status, sibling.attempts) == (DeliveryStatus.DONE, 1)
    assert len({pid for _, pid in started(out)}) == 1  # one worker ran all four


def _sigterm_ignored(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


async def test_processes_a_handler_starts_end_with_its_worker(
    store: MemoryStore, tmp_path: Path
) -> None:
    """A program a handler starts takes SIGTERM as programs do, and does not outlive its
    worker: killed with it when the worker is replaced for a timeout, and when the pool
    stops. The worker ignored SIGTERM, which its programs inherited across exec (only
    SIGKILL ended them), and they lived on, one more per retry, after `serve` had
    stopped."""
    out = tmp_path / "started.txt"
    d = pool_dispatcher(store, out, timeout=1.0)
    spawned: list[int] = []
    try:
        async with running(d, stop_timeout=5):
            await accept(store, "evt_spawnhang_1")

            async def ended(event_id: str) -> bool:
                row = await only_delivery(store, event_id=event_id)
                return row.status is not DeliveryStatus.PENDING

            await wait_until(lambda: ended("evt_spawnhang_1"), 60)
            (hung,) = [pid for e, pid in started(out) if e == "spawned_evt_spawnhang_1"]
            spawned.append(hung)
            await wait_until(lambda: process_exited(hung), 10)  # with its replaced worker
            await accept(store, "evt_spawn_1")
            await wait_until(lambda: ended("evt_spawn_1"), 60)
            (helper,) = [pid for e, pid in started(out) if e == "spawned_evt_spawn_1"]
            spawned.append(helper)
            assert not process_exited(helper)
            assert not _sigterm_ignored(helper)
        await wait_until(lambda: process_exited(helper), 10)  # with its worker, at the stop
    finally:
        for pid in spawned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_plain_def_handler_runs_its_attempts_at_once_and_is_cut_off(
    store: MemoryStore, tmp_path: Path
) -> None:
    """A plugin whose ``handle`` is a plain ``def``: its four attempts run at once (each
    waits for the four), each in a thread, not on the worker's event loop, where they ran
    one after another and those that waited past their timeout were recorded as timeouts.
    One that blocks past its timeout is a timeout, and its worker is replaced: a thread
    cannot be stopped, and the retry must not run beside it."""
    out = tmp_path / "started.txt"
    d = pool_dispatcher(
        store, out, timeout=3.0, item="tests.e2e.misbehaving_plugin:SyncMisbehaving"
    )
    async with running(d, stop_timeout=5):
        for n in range(4):
            await accept(store, f"evt_meet_{n}")

        async def ended(*event_ids: str) -> bool:
            rows = [await only_delivery(store, event_id=e) for e in event_ids]
            return all(r.status is not DeliveryStatus.PENDING for r in rows)

        meets = [f"evt_meet_{n}" for n in range(4)]
        await wait_until(lambda: ended(*meets), 60)
        await accept(store, "evt_sleep_1")
        await wait_until(lambda: ended("evt_sleep_1"), 60)
        await accept(store, "evt_ok_after")
        await wait_until(lambda: ended("evt_ok_after"), 60)
    for event_id in meets:
        row = await only_delivery(store, event_id=event_id)
        assert (row.status, row.attempts) == (DeliveryStatus.DONE, 1)
        assert row.result is not None
        assert str(row.result["thread"]).startswith("handle-evt_meet_")
    blocker = await only_delivery(store, event_id="evt_sleep_1")
    assert blocker.status is DeliveryStatus.DEAD
    (attempt,) = await store.list_attempts(blocker.id)
    assert (
        attempt.error
        == "TimeoutError: handler exceeded 3s; it did not yield, so its worker process was replaced"
    )
    pids = dict(started(out))
    assert pids["evt_meet_0"] == pids["evt_sleep_1"] != pids["evt_ok_after"]


async def nap_behind_a_blocker(store: MemoryStore, out: Path) -> None:
    """Timeout 3 s: `evt_sleep_short` blocks its worker's loop 2.5 s, `evt_nap_behind`, sent
    just after it, waits for it and then naps 2.9 s. Returns once neither is pending."""
    d = pool_dispatcher(store, out, timeout=3.0, block=2.5, nap=2.9)
    async with running(d, stop_timeout=5):
        await accept(store, "evt_sleep_short")
        await wait_until(lambda: [e for e, _ in started(out)] == ["evt_sleep_short"], 60)
        await accept(store, "evt_nap_behind")

        async def both_ended() -> bool:
            rows = await store.list_deliveries()
            return len(rows) == 2 and all(r.status is not DeliveryStatus.PENDING for r in rows)

        await wait_until(both_ended, 60)


async def test_an_attempt_that_waited_behind_a_blocking_one_is_not_killed(
    store: MemoryStore, tmp_path: Path
) -> None:
    """Timeout 3 s. One attempt blocks its worker's loop for 2.5 s (within its timeout)
    and succeeds; one sent just after it waits, then naps 2.9 s (within its own timeout,
    which runs from its start) and succeeds. Its kill timer, counted from when it was sent,
    fired at 5 s while it ran: the worker was killed, the attempt recorded as a timeout and
    run again. Now the worker answers a ping, and nothing is killed."""
    out = tmp_path / "started.txt"
    await nap_behind_a_blocker(store, out)
    for event_id in ("evt_sleep_short", "evt_nap_behind"):
        row = await only_delivery(store, event_id=event_id)
        assert row.status is DeliveryStatus.DONE, (event_id, row)
        (attempt,) = await store.list_attempts(row.id)
        assert attempt.outcome is AttemptOutcome.OK, (event_id, attempt)
    assert len({pid for _, pid in started(out)}) == 1  # one worker, never replaced


async def test_a_responsive_overrun_is_still_killed_inside_the_lease(
    store: MemoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same two attempts, with the overrun limit at 1 s past the timeout (20 s in
    production, inside the 30 s lease margin). The one that waited behind the blocker is
    still running when its worker answers the ping at about 5 s: given a whole second timeout
    it would run to 10 s; on PostgreSQL, with a 40 s timeout, it outlived its lease (timeout +
    30 s) and another replica ran it beside it. It is killed at its limit, charged a
    timeout; the blocker that ended in time is not."""
    monkeypatch.setattr(workers, "OVERRUN_LIMIT_SECONDS", 1.0)
    await nap_behind_a_blocker(store, tmp_path / "started.txt")
    behind = await only_delivery(store, event_id="evt_nap_behind")
    (attempt,) = await store.list_attempts(behind.id)
    assert attempt.outcome is AttemptOutcome.DEAD
    assert attempt.error is not None
    assert attempt.error.startswith("TimeoutError"), attempt.error
    blocker = await only_delivery(store, event_id="evt_sleep_short")
    (first,) = await store.list_attempts(blocker.id)
    assert first.outcome is AttemptOutcome.OK


def test_the_overrun_limit_ends_an_attempt_before_its_lease() -> None:
    """Sent right after its claim, an attempt is killed by OVERRUN_LIMIT past its timeout,
    plus a ping's grace and the kill itself: all inside the lease's margin."""
    from lacuna_webhooks.dispatch import LEASE_MARGIN

    assert (
        LEASE_MARGIN.total_seconds()
    ) > workers.OVERRUN_LIMIT_SECONDS + 2 * workers.KILL_GRACE_SECONDS + 5


async def test_stop_ends_every_worker(store: MemoryStore, tmp_path: Path) -> None:
    """After the dispatcher stops, its workers have exited, even one whose handler hangs."""
    out = tmp_path / "started.txt"
    d = pool_dispatcher(store, out, timeout=30.0)
    assert isinstance(d.runner, WorkerPool)
    async with running(d, stop_timeout=0.1):
        await accept(store, "evt_hang_1")
        await wait_until(lambda: bool(started(out)), 60)
        pid = d.runner.workers[NAME].pid
        assert pid is not None
    assert process_exited(pid)
    row = await only_delivery(store)
    assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 0)  # released on stop


async def test_a_stop_just_after_a_worker_died_settles_its_attempt(tmp_path: Path) -> None:
    """The worker dies while a process it forked keeps its socket open, and the stop comes
    within the second the parent still reads that socket: the attempt is settled (given
    back) at once. The stop took the worker for one sleeping before a restart, cancelled
    its reader, and the attempt was never settled (the dispatcher waited out the shutdown
    timeout)."""
    out = tmp_path / "started.txt"
    spec = WorkerSpec(
        name=NAME,
        item="tests.e2e.misbehaving_plugin:Misbehaving",
        environ={"LACUNA_MISBEHAVING_PATH": str(out), "LACUNA_MISBEHAVING_BLOCK": "30"},
        allow_private_urls=False,
        timeout_seconds=10,
        log_format="json",
        log_level="warning",
        sys_path=tuple(sys.path),
    )
    pool = WorkerPool([spec])
    await pool.start(lambda: None)
    forked: list[int] = []
    try:
        await wait_until(lambda: pool.ready(NAME), 60)
        store = MemoryStore()
        await store.open()
        await accept(store, "evt_forkexit_1")
        (delivery,) = await store.claim(
            handler=NAME, limit=1, lease=timedelta(minutes=1), now=datetime.now(UTC)
        )
        attempt = asyncio.create_task(pool.run(delivery, 10))
        await wait_until(lambda: "forked_evt_forkexit_1" in [e for e, _ in started(out)], 30)
        forked = [pid for e, pid in started(out) if e == "forked_evt_forkexit_1"]
        # The death seen (the pool no longer offers the worker), then the stop at once:
        # inside the second in which the parent still reads the socket the fork holds.
        await wait_until(lambda: not pool.ready(NAME), 30)
        await pool.close()
        outcome = await asyncio.wait_for(attempt, 5)
        assert outcome.ending is Ending.INTERRUPTED
    finally:
        await pool.close()
        for pid in forked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
