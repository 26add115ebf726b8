"""A 429 does not spend the attempt budget (docs/delivery.md, "Rate-limited attempts").

The peer is a real HTTP server (pytest-httpserver) answering 429 + ``Retry-After`` and the
``http`` handler sends to it through the dispatcher, on every store backend.
"""

from __future__ import annotations

import threading

import orjson
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from lacuna_webhooks.dispatch.dispatcher import Dispatcher, utcnow
from lacuna_webhooks.dispatch.flow import FlowControl
from lacuna_webhooks.handlers.http import HTTPHandler
from lacuna_webhooks.models import DeliveryStatus, Event
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.base import AttemptRecord, DeliveryRecord
from tests.conftest import make_event
from tests.dispatching import running, wait_until
from tests.integration.test_rate_limit import forward

__all__ = ["forward"]  # the fixture: an ``http`` handler sending to pytest-httpserver's /hook


class RefusingPeer:
    """Answers ``429`` + ``Retry-After: <retry_after>`` to the first ``refusals`` requests
    (all of them when ``refusals`` is None), then 200; counts the requests."""

    def __init__(self, refusals: int | None, retry_after: str) -> None:
        self.refusals = refusals
        self.retry_after = retry_after
        self.requests = 0
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.requests += 1
            if self.refusals is None or self.requests <= self.refusals:
                return Response("slow down", status=429, headers={"Retry-After": self.retry_after})
            return Response(status=200)


async def deliver_one(
    store: Store, forward: HTTPHandler, policy: RetryPolicy, flow: FlowControl | None = None
) -> tuple[DeliveryRecord, list[AttemptRecord]]:
    """Accept one event for ``http``, dispatch until its delivery has ended (30 s at most);
    the delivery and its attempt rows."""
    event = Event.from_body(orjson.dumps(make_event()))
    assert await store.accept(event, ["http"], now=utcnow())

    async def ended() -> bool:
        (record,) = await store.list_deliveries(event_id=event.id)
        return record.status is not DeliveryStatus.PENDING

    d = Dispatcher(
        store,
        HandlerSet.of([forward]),
        policy=policy,
        poll_interval_seconds=0.1,
        concurrency=2,
        flow={"http": flow} if flow is not None else None,
    )
    async with running(d):
        await wait_until(ended, within_seconds=30)
    (record,) = await store.list_deliveries(event_id=event.id)
    return record, await store.list_attempts(record.id)


async def test_429s_with_retry_after_do_not_spend_a_budget_of_two(
    store: Store, httpserver: HTTPServer, forward: HTTPHandler
) -> None:
    """RETRY_MAX_ATTEMPTS=2 and a peer answering 429 + Retry-After: 1 three times, then 200:
    the delivery ends done (four attempts recorded, the 429s refunded), not dead."""
    peer = RefusingPeer(refusals=3, retry_after="1")
    httpserver.expect_request("/hook", method="POST").respond_with_handler(peer)
    policy = RetryPolicy(max_attempts=2, base_delay_seconds=0.2, max_delay_seconds=30.0)
    record, rows = await deliver_one(store, forward, policy)
    assert record.status is DeliveryStatus.DONE
    assert peer.requests == 4
    assert [row.outcome.value for row in rows] == ["retry", "retry", "retry", "ok"]
    assert all("HTTP 429" in (row.error or "") for row in rows[:3])
    assert [row.attempt for row in rows] == [1, 1, 1, 1]


async def test_a_peer_answering_429_forever_still_ends_dead(
    store: Store, httpserver: HTTPServer, forward: HTTPHandler
) -> None:
    """The bound: past the rate-limit window (here 1 s: the longer of the 0.2 s schedule and
    the 1 s cap) the 429s count, so a peer refusing forever makes the delivery dead after
    the refunded attempts plus the two counted ones."""
    peer = RefusingPeer(refusals=None, retry_after="0")
    httpserver.expect_request("/hook", method="POST").respond_with_handler(peer)
    policy = RetryPolicy(max_attempts=2, base_delay_seconds=0.2, max_delay_seconds=1.0)
    record, rows = await deliver_one(store, forward, policy)
    assert record.status is DeliveryStatus.DEAD
    assert len(rows) == peer.requests
    assert len(rows) > 2  # some 429s were refunded before the window closed
    assert [row.attempt for row in rows[-2:]] == [1, 2]
    assert rows[-1].outcome.value == "dead"


async def test_refunded_429s_do_not_count_towards_pause_after_failures(
    store: Store, httpserver: HTTPServer, forward: HTTPHandler
) -> None:
    """PAUSE_AFTER_FAILURES=1 and a peer answering 429 + Retry-After three times, then 200:
    the refunded 429s are the peer pacing us, not failing, so the handler is never paused and
    its failure count stays 0 (docs/delivery.md; docs/flow-control.md said "a 429
    included")."""
    peer = RefusingPeer(refusals=3, retry_after="1")
    httpserver.expect_request("/hook", method="POST").respond_with_handler(peer)
    policy = RetryPolicy(max_attempts=10, base_delay_seconds=0.2, max_delay_seconds=30.0)
    record, rows = await deliver_one(store, forward, policy, FlowControl(pause_after_failures=1))
    assert record.status is DeliveryStatus.DONE
    assert [row.outcome.value for row in rows] == ["retry", "retry", "retry", "ok"]
    states = {state.handler: state for state in await store.handler_states()}
    assert "http" not in states or (states["http"].paused, states["http"].consecutive_failures) == (
        False,
        0,
    )
