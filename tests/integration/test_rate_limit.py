"""LACUNA_<NAME>_RATE_LIMIT in the dispatcher: attempts start no faster than the bucket allows,
and a burst against a real HTTP peer that enforces its own limit ends with every delivery done.

The peer (pytest-httpserver, a real HTTP server) keeps a token bucket of its own and answers
429 with ``Retry-After: 1`` when it is empty, as Slack does; the ``http`` handler sends to it.
The issue's case (a peer allowing 1/s, burst 3) is scaled to 10/s, burst 3, to stay fast.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from lacuna_webhooks.dispatch.dispatcher import Dispatcher, utcnow
from lacuna_webhooks.dispatch.flow import FlowControl, RateLimit
from lacuna_webhooks.handlers.base import HandlerContext
from lacuna_webhooks.handlers.http import HTTPHandler
from lacuna_webhooks.models import DeliveryStatus, Event
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store import Store
from tests.conftest import make_event
from tests.dispatching import running, wait_until

SECRET = "whsec_" + base64.b64encode(b"the-receivers-secret-key-32bytes").decode()


class LimitedPeer:
    """An endpoint allowing ``per_second`` requests a second with a burst of ``burst``: 204
    while its bucket has a token, else 429 + ``Retry-After: 1``. Records which event ids it
    accepted and how many requests it refused."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.accepted: list[str] = []
        self.refused = 0
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.per_second)
            self.updated = now
            if self.tokens < 1:
                self.refused += 1
                return Response("slow down", status=429, headers={"Retry-After": "1"})
            self.tokens -= 1
            self.accepted.append(request.headers["webhook-id"])
            return Response(status=204)


def most_in_any_window(times: list[float], seconds: float) -> int:
    """The largest number of ``times`` inside one window of ``seconds`` (start inclusive)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t < start + seconds))
    return best


@pytest.fixture
async def forward(httpserver: HTTPServer) -> AsyncIterator[HTTPHandler]:
    environ = {"LACUNA_HTTP_URL": httpserver.url_for("/hook"), "LACUNA_HTTP_SECRET": SECRET}
    handler = HTTPHandler(HandlerContext("http", environ=environ, timeout_seconds=10))
    yield handler
    await handler.aclose()


async def accept_burst(store: Store, count: int) -> list[str]:
    """``count`` new events for the ``http`` handler, all due at once; their ids."""
    ids = []
    for _ in range(count):
        event = Event.from_body(orjson.dumps(make_event()))
        assert await store.accept(event, ["http"], now=utcnow())
        ids.append(event.id)
    return ids


async def all_done(store: Store, count: int) -> bool:
    rows = await store.list_deliveries(status=DeliveryStatus.DONE, limit=count)
    return len(rows) == count


def dispatcher(
    store: Store, handler: object, rate: RateLimit | None, **kwargs: object
) -> Dispatcher:
    handlers = HandlerSet.of([handler])  # type: ignore[list-item]
    return Dispatcher(
        store,
        handlers,
        policy=kwargs.pop("policy", POLICY),  # type: ignore[arg-type]
        poll_interval_seconds=0.2,
        concurrency=10,
        flow={"http": FlowControl(rate_limit=rate)},
        **kwargs,  # type: ignore[arg-type]
    )


POLICY = RetryPolicy(max_attempts=10, base_delay_seconds=0.2, max_delay_seconds=2.0)


async def test_a_burst_meets_a_limited_peer_and_all_are_delivered(
    store: Store, httpserver: HTTPServer, forward: HTTPHandler
) -> None:
    """40 events at once, RATE_LIMIT=10/s, against a peer allowing 10/s with a burst of 3
    that answers 429 + Retry-After: 1 beyond it: every delivery ends done, none dead, and no
    one-second window saw more attempts start than the bucket plus its refill (10 + 10).

    The window is counted where the limit applies, as each attempt starts: at the peer,
    arrivals also carry the HTTP client's and the peer's own scheduling (the first burst opens
    ten connections), which on a loaded machine bunched 22 into one second."""
    peer = LimitedPeer(per_second=10, burst=3)
    httpserver.expect_request("/hook", method="POST").respond_with_handler(peer)
    ids = await accept_burst(store, 40)
    timed = TimedHandler(forward)
    d = dispatcher(store, timed, RateLimit(10, 1.0))
    async with running(d):
        await wait_until(lambda: all_done(store, 40), within_seconds=60)
    assert sorted(peer.accepted) == sorted(ids)
    assert peer.refused > 0  # the peer's own limit was met, and its 429s were retried
    assert await store.list_deliveries(status=DeliveryStatus.DEAD) == []
    assert len(timed.started) == 40 + peer.refused
    assert most_in_any_window(timed.started, 1.0) <= 20


class TimedHandler:
    """Records when each attempt started (monotonic seconds), then hands the event to
    ``inner`` when given (its outcome is the attempt's), else succeeds."""

    name = "http"
    events = None

    def __init__(self, inner: HTTPHandler | None = None) -> None:
        self.inner = inner
        self.started: list[float] = []

    async def handle(self, event: Event) -> object:
        self.started.append(time.monotonic())
        return None if self.inner is None else await self.inner.handle(event)

    async def aclose(self) -> None:
        pass


async def test_attempts_start_no_faster_than_the_bucket(store: Store) -> None:
    """RATE_LIMIT=10/s with 30 due at once and room for 10 at a time: within any half second
    at most 10 (the bucket) + 5 (its refill) start, and all 30 are delivered. Without the
    limit all 30 would start within milliseconds."""
    handler = TimedHandler()
    await accept_burst(store, 30)
    d = dispatcher(store, handler, RateLimit(10, 1.0))
    async with running(d):
        await wait_until(lambda: all_done(store, 30), within_seconds=60)
    assert len(handler.started) == 30
    assert most_in_any_window(handler.started, 0.5) <= 15
