"""Flow control in the dispatcher (on the in-memory store): pause / resume, the
PAUSE_AFTER_FAILURES circuit breaker, and PauseHandler (an http endpoint's 410).

"Not attempted" is shown by a later event of another handler being delivered first: the
dispatcher has made claim passes since the pause and skipped the paused handler in each.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import orjson
import pytest
from structlog.testing import capture_logs

from lacuna_webhooks.dispatch.flow import FlowControl, RateLimit, read_flow_control
from lacuna_webhooks.errors import ConfigError, PauseHandler
from lacuna_webhooks.handlers.base import RecordingHandler
from lacuna_webhooks.metrics import Metrics
from lacuna_webhooks.models import Attempt, Delivery, DeliveryStatus, Event
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store.base import HandlerState, Recorded, Tally
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import make_event
from tests.dispatching import FakeClock, make_dispatcher, running, wait_until

T0 = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=10, base_delay_seconds=5.0, max_delay_seconds=3600.0)
dispatcher = functools.partial(make_dispatcher, policy=POLICY, poll_interval_seconds=0.02)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


async def accept(store: MemoryStore, *handlers: str) -> Event:
    event = Event.from_body(orjson.dumps(make_event()))
    assert await store.accept(event, list(handlers), now=T0)
    return event


async def status(store: MemoryStore, event: Event, handler: str) -> DeliveryStatus:
    (row,) = await store.list_deliveries(event_id=event.id, handler=handler)
    return row.status


async def delivered(store: MemoryStore, event: Event, handler: str) -> bool:
    return await status(store, event, handler) is DeliveryStatus.DONE


def gauge(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(f"lacuna_webhooks_{name}", labels)


async def test_a_paused_handler_waits_others_go_on_and_resume_drains(store: MemoryStore) -> None:
    """While "a" is paused its deliveries stay pending and unattempted, "b" is delivered;
    handler.paused / handler.resumed are logged and the gauge follows; on resume "a" drains."""
    a, b = RecordingHandler("a"), RecordingHandler("b")
    metrics = Metrics()
    d = dispatcher(store, [a, b], FakeClock(T0), metrics=metrics)
    await store.set_paused("a", True, reason="operator", now=T0)
    first = await accept(store, "a", "b")
    with capture_logs() as logs:
        async with running(d):
            await wait_until(lambda: delivered(store, first, "b"))
            later = await accept(store, "b")
            await wait_until(lambda: delivered(store, later, "b"))
            assert a.calls == []
            assert await status(store, first, "a") is DeliveryStatus.PENDING
            assert gauge(metrics, "handler_paused", {"handler": "a"}) == 1
            assert gauge(metrics, "handler_paused", {"handler": "b"}) == 0
            await store.set_paused("a", False, reason=None, now=T0)
            await wait_until(lambda: delivered(store, first, "a"))
    assert [e.id for e in a.calls] == [first.id]
    assert gauge(metrics, "handler_paused", {"handler": "a"}) == 0
    events = [(e["event"], e.get("handler")) for e in logs if e["event"].startswith("handler.")]
    assert events == [("handler.paused", "a"), ("handler.resumed", "a")]
    assert next(e for e in logs if e["event"] == "handler.paused")["reason"] == "operator"


async def test_pause_after_failures_pauses_and_a_success_resets(store: MemoryStore) -> None:
    """With PAUSE_AFTER_FAILURES=3: fail, succeed (count reset), then three failures in a row
    pause the handler; the third failing delivery and a new one stay pending, unattempted."""
    boom = ValueError("boom")
    a = RecordingHandler("a", script=[boom, None, boom, boom, boom])
    b = RecordingHandler("b")
    metrics = Metrics()
    clock = FakeClock(T0)
    flow = {"a": FlowControl(pause_after_failures=3)}
    d = dispatcher(store, [a, b], clock, metrics=metrics, flow=flow, concurrency=1)
    with capture_logs() as logs:
        async with running(d):
            first = await accept(store, "a")
            await wait_until(lambda: len(a.calls) == 1)
            clock.advance(5)  # its retry is due: the success
            await wait_until(lambda: delivered(store, first, "a"))
            assert (await store.handler_states())[0].consecutive_failures == 0
            second = await accept(store, "a")
            for n in (3, 4, 5):
                await wait_until(lambda n=n: len(a.calls) == n)  # type: ignore[misc]
                clock.advance(3600)
            await wait_until(lambda: "a" in d._paused)
            third = await accept(store, "a", "b")
            await wait_until(lambda: delivered(store, third, "b"))
    assert len(a.calls) == 5
    assert await status(store, second, "a") is DeliveryStatus.PENDING
    assert await status(store, third, "a") is DeliveryStatus.PENDING
    paused_now = await store.paused_handlers()
    assert list(paused_now) == ["a"]
    assert paused_now["a"].reason == ("3 consecutive failed attempts; the last: ValueError: boom")
    assert gauge(metrics, "handler_pauses_total", {"handler": "a", "cause": "failures"}) == 1
    paused = [e for e in logs if e["event"] == "handler.paused"]
    assert [(e["handler"], e["cause"]) for e in paused] == [("a", "failures")]


async def test_without_the_setting_failures_never_pause(store: MemoryStore) -> None:
    """No PAUSE_AFTER_FAILURES: failures are retried and dead as usual; they are counted
    (GET /handlers shows the count) but never pause the handler."""
    policy = RetryPolicy(max_attempts=2, base_delay_seconds=5.0, max_delay_seconds=5.0)
    a = RecordingHandler("a", script=[ValueError("boom")] * 2)
    clock = FakeClock(T0)
    d = make_dispatcher(store, [a], clock, policy=policy, poll_interval_seconds=0.02)
    event = await accept(store, "a")
    async with running(d):
        await wait_until(lambda: len(a.calls) == 1)
        clock.advance(5)
        await wait_until(lambda: status_is(store, event, "a", DeliveryStatus.DEAD))
    assert await store.paused_handlers() == {}
    ((name, paused, failures),) = [
        (s.handler, s.paused, s.consecutive_failures) for s in await store.handler_states()
    ]
    assert (name, paused, failures) == ("a", False, 2)


class AnswersLate(MemoryStore):
    """Commits a retry at once but answers only after ``meanwhile`` (as a PostgreSQL write
    answers a round trip after its commit, when its pooled connection is reset)."""

    meanwhile: Callable[[], Awaitable[None]] | None = None

    async def retry(
        self,
        delivery: Delivery,
        attempt: Attempt,
        *,
        at: datetime,
        refund: bool = False,
        tally: Tally | None = None,
    ) -> Recorded:
        done = await super().retry(delivery, attempt, at=at, refund=refund, tally=tally)
        if self.meanwhile is not None:
            await self.meanwhile()
        return done


async def test_no_attempt_starts_between_the_pause_and_its_answer() -> None:
    """The write that pauses a handler (PAUSE_AFTER_FAILURES) also makes its retry due. A
    claim pass that runs after that write committed but before it answered (its claim of
    "b" shows it ran) claims the retry and gives it back instead of starting it: the
    success that would have reset the count never runs here."""
    store = AnswersLate()
    await store.open()
    clock = FakeClock(T0)
    a = RecordingHandler("a", script=[ValueError("boom")])  # then successes
    b = RecordingHandler("b")

    async def meanwhile() -> None:
        clock.advance(3600)  # the retry is due
        await accept(store, "b")  # wakes the dispatcher: a claim pass
        await wait_until(lambda: bool(b.calls))

    store.meanwhile = meanwhile
    flow = {"a": FlowControl(pause_after_failures=1)}
    # A long poll: the paused set is not read again during the test; only the write tells.
    d = make_dispatcher(store, [a, b], clock, policy=POLICY, poll_interval_seconds=30, flow=flow)
    first = await accept(store, "a")
    try:
        async with running(d):
            await wait_until(lambda: "a" in d._paused)
            await wait_until(lambda: d.in_flight == 0)
        assert len(a.calls) == 1
        assert len(b.calls) == 1
        assert await status(store, first, "a") is DeliveryStatus.PENDING
        (state,) = [s for s in await store.handler_states() if s.handler == "a"]
        assert (state.paused, state.consecutive_failures) == (True, 1)
    finally:
        await store.close()


class ReadsLate(MemoryStore):
    """Once ``hold`` is set, a read of the paused set takes its answer at once but returns
    it only when ``release`` is set (``reading`` / ``answered`` tell the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.reading = asyncio.Event()
        self.release = asyncio.Event()
        self.answered = asyncio.Event()

    async def paused_handlers(self) -> dict[str, HandlerState]:
        found = await super().paused_handlers()
        if self.hold:
            self.hold = False
            self.reading.set()
            await self.release.wait()
            self.answered.set()
        return found


async def test_a_read_of_the_paused_set_from_before_a_pause_made_here_is_dropped() -> None:
    """A read of the paused set that began before this dispatcher paused a handler (a 410)
    and answers after it does not undo the pause here: no "handler.resumed", the handler
    still held, and the gauge still 1."""
    store = ReadsLate()
    await store.open()
    a = RecordingHandler("a", script=[PauseHandler("HTTP 410")])
    a.block = asyncio.Event()
    metrics = Metrics()
    d = dispatcher(store, [a], FakeClock(T0), metrics=metrics)
    try:
        with capture_logs() as logs:
            async with running(d):
                gone = await accept(store, "a")
                await wait_until(lambda: bool(a.calls))
                store.hold = True
                await asyncio.wait_for(store.reading.wait(), 10)  # a read from before the pause
                a.block.set()
                await wait_until(lambda: status_is(store, gone, "a", DeliveryStatus.DEAD))
                await wait_until(lambda: "a" in d._paused)
                store.release.set()
                await asyncio.wait_for(store.answered.wait(), 10)
                await wait_until(lambda: d._paused_read_at is not None and "a" in d._paused)
                assert gauge(metrics, "handler_paused", {"handler": "a"}) == 1
        events = [(e["event"], e.get("handler")) for e in logs if e["event"].startswith("handler.")]
        assert events == [("handler.paused", "a")]
        assert "a" in d._paused
    finally:
        await store.close()


async def status_is(store: MemoryStore, event: Event, handler: str, want: DeliveryStatus) -> bool:
    return await status(store, event, handler) is want


async def test_pause_handler_is_dead_and_pauses(store: MemoryStore) -> None:
    """PauseHandler (the http handler's 410): that delivery is dead at once, the handler is
    paused with the reason, and its next delivery waits while another handler goes on."""
    a = RecordingHandler("a", script=[PauseHandler("HTTP 410: the endpoint is gone")])
    b = RecordingHandler("b")
    metrics = Metrics()
    d = dispatcher(store, [a, b], FakeClock(T0), metrics=metrics, concurrency=1)
    async with running(d):
        gone = await accept(store, "a")
        await wait_until(lambda: status_is(store, gone, "a", DeliveryStatus.DEAD))
        await wait_until(lambda: "a" in d._paused)
        waiting = await accept(store, "a", "b")
        await wait_until(lambda: delivered(store, waiting, "b"))
    assert len(a.calls) == 1
    assert await status(store, waiting, "a") is DeliveryStatus.PENDING
    reason = (await store.paused_handlers())["a"].reason
    assert reason == "its endpoint is gone: PauseHandler: HTTP 410: the endpoint is gone"
    assert gauge(metrics, "handler_pauses_total", {"handler": "a", "cause": "gone"}) == 1


def test_flow_settings_are_read_per_handler() -> None:
    """LACUNA_<NAME>_PAUSE_AFTER_FAILURES per handler; unset or empty means never."""
    env = {
        "LACUNA_SLACK_PAUSE_AFTER_FAILURES": "0" * 20 + "5",  # leading zeros, however many
        "LACUNA_LOG_PAUSE_AFTER_FAILURES": " ",
    }
    assert read_flow_control(["slack", "log", "http"], env) == {
        "slack": FlowControl(pause_after_failures=5),
        "log": FlowControl(),
        "http": FlowControl(),
    }


@pytest.mark.parametrize("raw", ["0", "-1", "x", "2.5", "1000001", "9" * 5000])
def test_a_bad_flow_setting_is_one_clear_line(raw: str) -> None:
    """A bad value names the variable and what it must be."""
    with pytest.raises(ConfigError) as caught:
        read_flow_control(["slack"], {"LACUNA_SLACK_PAUSE_AFTER_FAILURES": raw})
    assert caught.value.problems == [
        f"LACUNA_SLACK_PAUSE_AFTER_FAILURES must be a whole number from 1 to 1000000, got {raw!r}"
    ]


@pytest.mark.parametrize(
    ("raw", "count", "period"),
    [
        ("1/s", 1, 1.0),
        ("30/m", 30, 60.0),
        (" 500 / h ", 500, 3600.0),
        # Leading zeros, however many, as in every whole number: they counted as digits.
        ("0" * 20 + "7/m", 7, 60.0),
    ],
)
def test_rate_limit_values(raw: str, count: int, period: float) -> None:
    """N/s, N/m, N/h: a bucket of N refilled at N per period."""
    flow = read_flow_control(["slack"], {"LACUNA_SLACK_RATE_LIMIT": raw})["slack"]
    assert flow.rate_limit == RateLimit(count, period)
    assert flow.rate_limit.per_second == count / period


@pytest.mark.parametrize(
    "raw", ["0/s", "10", "10/d", "1.5/s", "-1/s", "ten/s", "1000001/s", "9" * 5000 + "/s"]
)
def test_a_bad_rate_limit_is_one_clear_line(raw: str) -> None:
    """A bad RATE_LIMIT names the variable, the accepted forms and the value given; every bad
    variable is reported at once."""
    env = {"LACUNA_SLACK_RATE_LIMIT": raw, "LACUNA_SLACK_PAUSE_AFTER_FAILURES": "0"}
    with pytest.raises(ConfigError) as caught:
        read_flow_control(["slack"], env)
    assert caught.value.problems == [
        "LACUNA_SLACK_PAUSE_AFTER_FAILURES must be a whole number from 1 to 1000000, got '0'",
        "LACUNA_SLACK_RATE_LIMIT must be N/s, N/m or N/h with N a whole number from 1 to 1000000 "
        f"(e.g. 1/s), got {raw!r}",
    ]
