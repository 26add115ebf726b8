"""The http (forward) handler against real HTTP servers standing in for the team's own service.

What it signs is checked with the official ``standardwebhooks`` package, the way
a receiver would verify it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs
from werkzeug import Request, Response

from lacuna_webhooks.errors import (
    ConfigError,
    PauseHandler,
    PermanentError,
    RateLimited,
    RetryLater,
)
from lacuna_webhooks.handlers.base import HandlerContext, current_attempt
from lacuna_webhooks.handlers.http import HTTPHandler
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import HandlerSet, available, build_handlers
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import make_event
from tests.dispatching import FakeClock, make_dispatcher, only_delivery, running, wait_until
from tests.integration.servers import SlowResponse, free_port

PATH = "/hooks/lacuna"
SECRET = "whsec_" + base64.b64encode(b"the-receivers-secret-key-32bytes").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"the-rotated-secret-key-0002-abcd").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"somebody-elses-secret-key-000000").decode()


def as_event(payload: dict[str, Any] | None = None) -> Event:
    return Event.from_body(orjson.dumps(payload or make_event()))


def make_handler(url: str, **env: str) -> HTTPHandler:
    environ = {
        "LACUNA_HTTP_URL": url,
        "LACUNA_HTTP_SECRET": SECRET,
        "LACUNA_HTTP_READ_TIMEOUT": "1",
        **{f"LACUNA_HTTP_{key}": value for key, value in env.items()},
    }
    return HTTPHandler(HandlerContext("http", environ=environ, timeout_seconds=10))


@pytest.fixture
async def forward(httpserver: HTTPServer) -> AsyncIterator[HTTPHandler]:
    handler = make_handler(httpserver.url_for(PATH))
    yield handler
    await handler.aclose()


def received(server: HTTPServer) -> list[tuple[bytes, dict[str, str]]]:
    return [(request.get_data(), dict(request.headers)) for request, _ in server.log]


class VerifyingReceiver:
    """A receiver endpoint that verifies each request with ``standardwebhooks`` as it arrives.

    Answers 204 when the signature holds, 400 otherwise (and remembers why).
    """

    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)
        self.verified: list[Any] = []
        self.refused: list[str] = []

    def __call__(self, request: Request) -> Response:
        try:
            self.verified.append(self.webhook.verify(request.get_data(), dict(request.headers)))
        except WebhookVerificationError as exc:
            self.refused.append(str(exc))
            return Response("bad signature", status=400)
        return Response(status=204)


async def test_the_request_verifies_with_the_standardwebhooks_library(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """POST, JSON, body = the event's bytes exactly; the reference library accepts it."""
    receiver = VerifyingReceiver(SECRET)
    httpserver.expect_request(PATH, method="POST").respond_with_handler(receiver)
    event = as_event(make_event("evt_forward_1"))
    token = current_attempt.set(3)  # as the dispatcher does for the third attempt
    try:
        await forward.handle(event)
    finally:
        current_attempt.reset(token)
    assert receiver.refused == []
    assert receiver.verified == [event.payload]
    ((body, headers),) = received(httpserver)
    assert body == event.raw
    assert headers["Content-Type"] == "application/json"
    assert headers["Webhook-Id"] == "evt_forward_1"
    assert abs(int(headers["Webhook-Timestamp"]) - time.time()) < 60
    assert headers["Webhook-Signature"].startswith("v1,")
    assert " " not in headers["Webhook-Signature"]  # one secret, one signature
    assert headers["Lacuna-Event-Type"] == "job.completed"
    assert headers["Lacuna-Attempt"] == "3"


async def test_a_non_ascii_id_or_type_goes_percent_encoded_and_still_verifies(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """`evt_ü1` of type `job.完成` (intake takes them): no request could be built (a header
    value is ASCII), every attempt failed, and with PAUSE_AFTER_FAILURES one such event
    paused the handler. Now they go percent-encoded, and the signature covers the id as
    sent."""
    receiver = VerifyingReceiver(SECRET)
    httpserver.expect_request(PATH, method="POST").respond_with_handler(receiver)
    event = as_event(make_event("evt_\u00fc1", "job.\u5b8c\u6210"))
    await forward.handle(event)
    assert receiver.refused == []
    assert receiver.verified == [event.payload]
    ((_, headers),) = received(httpserver)
    assert headers["Webhook-Id"] == "evt_%C3%BC1"
    assert headers["Lacuna-Event-Type"] == "job.%E5%AE%8C%E6%88%90"


async def test_a_type_with_edge_spaces_goes_encoded_and_still_verifies(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """`" job.completed "` (intake takes any non-blank type): the header value began and ended
    with a space, which h11 refuses, so no request could be built and the delivery ended
    dead. The edge spaces go percent-encoded; inner ones stay as they are."""
    receiver = VerifyingReceiver(SECRET)
    httpserver.expect_request(PATH, method="POST").respond_with_handler(receiver)
    event = as_event(make_event("evt_spaced_type", " job completed  "))
    await forward.handle(event)
    assert receiver.refused == []
    assert receiver.verified == [event.payload]
    ((_, headers),) = received(httpserver)
    assert headers["Lacuna-Event-Type"] == "%20job completed%20%20"


async def test_a_tampered_body_or_a_wrong_secret_fails_verification(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """What was signed is exactly the body and the id/timestamp; nothing else verifies."""
    httpserver.expect_request(PATH).respond_with_data("", status=204)
    await forward.handle(as_event())
    ((body, headers),) = received(httpserver)
    Webhook(SECRET).verify(body, headers)  # the genuine request passes
    tampered = body.replace(b"Late Night Study", b"Late Night Stud!")
    assert tampered != body
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(OTHER_SECRET).verify(body, headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(body, {**headers, "Webhook-Id": "evt_other"})


async def test_two_secrets_while_rotating_verify_with_either(httpserver: HTTPServer) -> None:
    """Comma-separated secrets give one space-separated signature each; each secret verifies."""
    httpserver.expect_request(PATH).respond_with_data("", status=200)
    handler = make_handler(httpserver.url_for(PATH), SECRET=f"{SECRET}, {NEW_SECRET}")
    try:
        await handler.handle(as_event())
    finally:
        await handler.aclose()
    ((body, headers),) = received(httpserver)
    assert len(headers["Webhook-Signature"].split(" ")) == 2
    Webhook(SECRET).verify(body, headers)
    Webhook(NEW_SECRET).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(body, headers)


async def test_an_unpadded_secret_signs_like_the_reference_library(
    httpserver: HTTPServer,
) -> None:
    """A secret without base64 padding (accepted by the reference libraries) is accepted too."""
    secret = "whsec_" + base64.b64encode(b"seventeen-byte-k!").decode().rstrip("=")
    assert len(secret.removeprefix("whsec_")) % 4 != 0  # padding really is missing
    httpserver.expect_request(PATH).respond_with_data("", status=200)
    handler = make_handler(httpserver.url_for(PATH), SECRET=secret)
    try:
        await handler.handle(as_event())
    finally:
        await handler.aclose()
    ((body, headers),) = received(httpserver)
    Webhook(secret).verify(body, headers)


async def test_the_enriched_payload_wraps_the_event_and_is_signed(
    httpserver: HTTPServer,
) -> None:
    """PAYLOAD=enriched: {"event": <the event as received>, "results": {}}, verifiable."""
    receiver = VerifyingReceiver(SECRET)
    httpserver.expect_request(PATH).respond_with_handler(receiver)
    handler = make_handler(httpserver.url_for(PATH), PAYLOAD="enriched")
    event = as_event()
    try:
        await handler.handle(event)
    finally:
        await handler.aclose()
    assert receiver.verified == [{"event": event.payload, "results": {}}]
    ((body, _),) = received(httpserver)
    assert event.raw in body  # the event's own bytes, not a re-serialisation


async def test_extra_headers_are_sent(httpserver: HTTPServer) -> None:
    """LACUNA_<NAME>_HEADERS adds headers beside the signature ones."""
    httpserver.expect_request(
        PATH, headers={"Authorization": "Bearer abc", "X-Team": "audio"}
    ).respond_with_data("", status=202)
    handler = make_handler(
        httpserver.url_for(PATH), HEADERS='{"Authorization": "Bearer abc", "X-Team": "audio"}'
    )
    try:
        await handler.handle(as_event())
    finally:
        await handler.aclose()
    assert len(httpserver.log) == 1
    assert httpserver.log[0][1].status_code == 202


async def test_without_the_dispatcher_the_attempt_is_counted_per_event(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """Outside the dispatcher (no current_attempt), lacuna-attempt counts this process's tries."""
    httpserver.expect_ordered_request(PATH).respond_with_data("busy", status=500)
    httpserver.expect_ordered_request(PATH).respond_with_data("", status=200)
    event = as_event()
    with pytest.raises(RetryLater):
        await forward.handle(event)
    await forward.handle(event)
    assert [h["Lacuna-Attempt"] for _, h in received(httpserver)] == ["1", "2"]


# --- outcomes -------------------------------------------------------------------------------


async def test_429_with_retry_after_seconds_is_retried_after_it(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """429 + Retry-After: 7 asks for a retry in 7 s."""
    httpserver.expect_request(PATH).respond_with_data(
        "slow down", status=429, headers={"Retry-After": "7"}
    )
    with pytest.raises(RateLimited, match="HTTP 429") as caught:  # does not spend the budget
        await forward.handle(as_event())
    assert caught.value.delay_seconds == 7


async def test_503_with_an_http_date_retry_after_is_retried_after_it(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """503 + Retry-After as an HTTP date asks for a retry at that date."""
    when = datetime.now(UTC) + timedelta(seconds=120)
    httpserver.expect_request(PATH).respond_with_data(
        "maintenance", status=503, headers={"Retry-After": format_datetime(when, usegmt=True)}
    )
    with pytest.raises(RetryLater, match="HTTP 503") as caught:
        await forward.handle(as_event())
    assert not isinstance(caught.value, RateLimited)  # a failing peer: the attempt counts
    assert caught.value.delay_seconds is not None
    assert 100 <= caught.value.delay_seconds <= 121


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retried_on_the_schedule(
    forward: HTTPHandler, httpserver: HTTPServer, status: int
) -> None:
    """408, 425, 429 and 5xx without Retry-After: retried, on the policy's backoff."""
    httpserver.expect_request(PATH).respond_with_data("try again", status=status)
    with pytest.raises(RetryLater, match=f"HTTP {status}") as caught:
        await forward.handle(as_event())
    assert caught.value.delay_seconds is None


async def test_410_is_permanent(forward: HTTPHandler, httpserver: HTTPServer) -> None:
    """410 Gone: the endpoint says it is gone; PauseHandler (dead, and the handler paused)."""
    httpserver.expect_request(PATH).respond_with_data("gone", status=410)
    with pytest.raises(PauseHandler, match="410: the endpoint is gone"):
        await forward.handle(as_event())


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_other_client_errors_are_permanent(
    forward: HTTPHandler, httpserver: HTTPServer, status: int
) -> None:
    """Any other 4xx will not change on retry: dead, with the receiver's reason."""
    httpserver.expect_request(PATH).respond_with_data("no such thing", status=status)
    with pytest.raises(PermanentError, match=f"HTTP {status}: no such thing"):
        await forward.handle(as_event())


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed(
    forward: HTTPHandler, httpserver: HTTPServer, status: int
) -> None:
    """A redirect is permanent and its target is never requested."""
    httpserver.expect_request(PATH).respond_with_data(
        "", status=status, headers={"Location": httpserver.url_for("/elsewhere")}
    )
    httpserver.expect_request("/elsewhere").respond_with_data("", status=200)
    with pytest.raises(PermanentError, match="never followed: point LACUNA_HTTP_URL at the final"):
        await forward.handle(as_event())
    assert [request.path for request, _ in httpserver.log] == [PATH]


async def test_a_slow_receiver_times_out_and_is_retried(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """A receiver slower than READ_TIMEOUT: the attempt ends as a retry."""
    slow = SlowResponse(2.5)  # longer than LACUNA_HTTP_READ_TIMEOUT=1
    httpserver.expect_request(PATH).respond_with_handler(slow)
    with pytest.raises(RetryLater, match="ReadTimeout"):
        await forward.handle(as_event())
    assert await asyncio.to_thread(slow.served.wait, 10)


@contextlib.contextmanager
def resetting_server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server that reads the request's first bytes, then resets the connection (RST)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    seen.append(conn.recv(65536))
                # Linger 0: close() sends RST instead of FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1]), seen
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_a_reset_connection_is_retried() -> None:
    """The receiver resets the connection mid-request: retried, not dead."""
    with resetting_server() as (port, seen):
        handler = make_handler(f"http://127.0.0.1:{port}{PATH}")
        try:
            with pytest.raises(RetryLater, match=r"POST to http://127\.0\.0\.1"):
                await handler.handle(as_event())
        finally:
            await handler.aclose()
    assert seen
    assert seen[0].startswith(b"POST /hooks/lacuna")


async def test_an_unreachable_receiver_is_retried() -> None:
    """Connection refused is transient."""
    handler = make_handler(f"http://127.0.0.1:{free_port()}{PATH}")
    try:
        with pytest.raises(RetryLater, match="ConnectError"):
            await handler.handle(as_event())
    finally:
        await handler.aclose()


async def test_neither_secret_nor_url_credentials_nor_query_appear_in_errors_or_logs(
    httpserver: HTTPServer,
) -> None:
    """Errors, logs and repr name scheme, host and port only."""
    httpserver.expect_request(PATH).respond_with_data("nope", status=404)
    url = httpserver.url_for(PATH).replace("http://", "http://user:pa55word@") + "?token=t0ken"
    handler = make_handler(url)
    try:
        with capture_logs() as logs, pytest.raises(PermanentError) as caught:
            await handler.handle(as_event())
    finally:
        await handler.aclose()
    assert logs, "the refusal is logged"
    for text in (str(caught.value), repr(logs), repr(handler)):
        for secret in ("pa55word", "t0ken", "hooks/lacuna", SECRET.removeprefix("whsec_")):
            assert secret not in text


# --- the Retry-After floor, with the dispatcher ------------------------------------------


@pytest.mark.parametrize("retry_after", ["0", "Thu, 01 Jan 2015 00:00:00 GMT"])
async def test_retry_after_zero_or_past_waits_the_base_delay_not_a_tight_loop(
    httpserver: HTTPServer, retry_after: str
) -> None:
    """Retry-After: 0 (or a past date) from a real server: the delivery waits the base delay."""
    httpserver.expect_request(PATH).respond_with_data(
        "slow down", status=429, headers={"Retry-After": retry_after}
    )
    handler = make_handler(httpserver.url_for(PATH))
    clock = FakeClock()
    store = MemoryStore()
    await store.open()
    policy = RetryPolicy(max_attempts=10, base_delay_seconds=5.0, max_delay_seconds=3600.0)
    d = make_dispatcher(
        store,
        HandlerSet({"http": handler}, {"http": None}, {"http": 10.0}),
        clock,
        policy=policy,
        poll_interval_seconds=0.05,
    )
    try:
        assert await store.accept(as_event(), ["http"], now=clock())
        async with running(d):
            await wait_until(lambda: len(httpserver.log) >= 1)
            await d.drain()
            await asyncio.sleep(0.3)  # a tight loop would post again meanwhile
        row = await only_delivery(store)
        assert len(httpserver.log) == 1
        assert row.attempts == 0  # a 429 is refunded: it does not spend the budget
        assert row.next_attempt_at == clock.now + timedelta(seconds=5)
    finally:
        await handler.aclose()
        await store.close()


# --- configuration ---------------------------------------------------------------------------


def config_error(**env: str) -> str:
    environ = {"LACUNA_HTTP_URL": "https://example.test/hook", "LACUNA_HTTP_SECRET": SECRET}
    environ.update({f"LACUNA_HTTP_{k}": v for k, v in env.items()})
    with pytest.raises(ConfigError) as caught:
        HTTPHandler(HandlerContext("http", environ=environ))
    (line,) = caught.value.problems
    assert "\n" not in line
    return line


def test_a_missing_url_or_secret_stops_start() -> None:
    """Both are required, each named."""
    with pytest.raises(ConfigError, match="LACUNA_HTTP_URL is required"):
        HTTPHandler(HandlerContext("http", environ={"LACUNA_HTTP_SECRET": SECRET}))
    with pytest.raises(ConfigError, match="LACUNA_HTTP_SECRET is required"):
        HTTPHandler(HandlerContext("http", environ={"LACUNA_HTTP_URL": "http://x.test/"}))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://user:hunter2@files.test/in?key=abc", "must be an http:// or https:// URL"),
        ("files.test/hook", "must be an http:// or https:// URL"),
        ("http:///hook?key=abc", "has no host"),
        ("http://[::1/hook", "is not a valid URL"),
        # httpx took it, and every attempt failed with an ExceptionGroup until dead.
        ("http://127.0.0.1:84333/hook?key=abc", "a port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:0/hook?key=abc", "port 0"),
    ],
)
def test_a_bad_url_is_one_line_naming_the_variable_without_secrets(url: str, expected: str) -> None:
    """Scheme http/https and a host, or one line naming LACUNA_HTTP_URL, credentials hidden."""
    line = config_error(URL=url)
    assert line.startswith("LACUNA_HTTP_URL")
    assert expected in line
    assert "hunter2" not in line
    assert "key=abc" not in line


def test_a_private_http_url_is_allowed() -> None:
    """The operator's own URL: plain http on a private address starts fine."""
    environ = {"LACUNA_HTTP_URL": "http://10.0.0.7:8080/in", "LACUNA_HTTP_SECRET": SECRET}
    handler = HTTPHandler(HandlerContext("http", environ=environ))
    assert handler.where == "http://10.0.0.7:8080/…"
    environ["LACUNA_HTTP_URL"] = "http://user:pw@[fd00::7]:8080/in?key=abc"
    assert HTTPHandler(HandlerContext("http", environ=environ)).where == "http://[fd00::7]:8080/…"


@pytest.mark.parametrize(
    "secret", ["whsec_not base64!", "whsec_", "whsec_é", f"{SECRET},whsec_%%%"]
)
def test_a_bad_secret_is_one_line_without_the_secret(secret: str) -> None:
    """Invalid base64, an empty key or a bad rotation item: one line, the value not shown."""
    line = config_error(SECRET=secret)
    assert line.startswith("LACUNA_HTTP_SECRET")
    assert "base64" in line or "empty" in line
    assert SECRET.removeprefix("whsec_") not in line
    assert "%%%" not in line


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("not json", "must be a JSON object"),
        ('["a"]', "must be a JSON object"),
        ('{"X-Team": 5}', "must be a string"),
        ('{"Bad Name": "x"}', "not a valid header name"),
        ('{"X-Team": "a\\r\\nX-Evil: 1"}', "must not contain line breaks"),
        ('{"Webhook-Signature": "v1,forged"}', "cannot set 'Webhook-Signature'"),
        ('{"webhook-id": "x"}', "cannot set 'webhook-id'"),
        ('{"Content-Type": "text/plain"}', "cannot set 'Content-Type'"),
    ],
)
def test_bad_extra_headers_are_one_line(headers: str, expected: str) -> None:
    """HEADERS must be a JSON object of valid string headers not owned by the handler."""
    line = config_error(HEADERS=headers)
    assert line.startswith("LACUNA_HTTP_HEADERS")
    assert expected in line


def test_an_unknown_payload_is_refused() -> None:
    line = config_error(PAYLOAD="full")
    assert line.startswith("LACUNA_HTTP_PAYLOAD must be one of event, enriched")


async def test_http_is_a_built_in_subscribed_to_every_type_with_its_own_timeout() -> None:
    """Registered as the entry point `http`; every event type by default; TIMEOUT read."""
    assert available()["http"] == "lacuna_webhooks.handlers.http:HTTPHandler"
    environ = {
        "LACUNA_HTTP_URL": "http://127.0.0.1:9/in",
        "LACUNA_HTTP_SECRET": SECRET,
        "LACUNA_HTTP_TIMEOUT": "5",
    }
    built = build_handlers(["http"], environ)
    try:
        assert built.filters == {"http": None}
        assert built.timeouts == {"http": 5.0}
        assert built.subscribers("something.new") == ["http"]
    finally:
        await built.aclose()


@contextlib.asynccontextmanager
async def raw_peer(head: bytes, body: bytes = b"", trickle: bool = False) -> AsyncIterator[str]:
    """A peer that answers every request with ``head`` (status line and headers), then
    ``body`` (one byte a second with ``trickle``); its URL."""

    tasks: list[asyncio.Task[Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            if trickle:
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1)
            else:
                writer.write(body)
            await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{PATH}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_a_2xx_is_done_whatever_its_body_does() -> None:
    """200 with a body sent a byte a second (READ_TIMEOUT=1): the receiver took the event,
    so the attempt is done. Its body was read, timed out, and the event was sent again."""
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"
    async with raw_peer(head, b"x" * 100, trickle=True) as url:
        handler = make_handler(url)
        try:
            await asyncio.wait_for(handler.handle(as_event()), 10)
        finally:
            await handler.aclose()


async def test_a_compressed_error_body_is_named_not_inflated() -> None:
    """A 500 whose 1 KB body inflates to 512 MiB (gzip twice): httpx inflated it while
    the handler read 4 KiB of it for the error's reason (1 GB of memory)."""
    import gzip

    bomb = gzip.compress(gzip.compress(bytes(512 * 1024 * 1024), 9), 9)
    assert len(bomb) < 1024 * 1024
    head = (
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-encoding: gzip, gzip\r\n"
        b"content-length: %d\r\n\r\n" % len(bomb)
    )
    async with raw_peer(head, bomb) as url:
        handler = make_handler(url)
        try:
            with pytest.raises(RetryLater, match=r"a body with Content-Encoding gzip, gzip"):
                await handler.handle(as_event())
        finally:
            await handler.aclose()


async def test_a_redirect_to_an_unparsable_location_is_dead_at_once() -> None:
    """httpx builds the next request even when redirects are not followed, and raised
    InvalidURL, which no handler caught: retried to the end of the budget."""
    head = b"HTTP/1.1 302 Found\r\nlocation: http:\\\\example.com\\\r\ncontent-length: 0\r\n\r\n"
    async with raw_peer(head) as url:
        handler = make_handler(url)
        try:
            with pytest.raises(PermanentError, match="redirect to an invalid URL"):
                await handler.handle(as_event())
        finally:
            await handler.aclose()


async def test_a_download_with_a_content_encoding_is_refused_not_inflated() -> None:
    """Audio is asked for as identity; a 200 with `Content-Encoding: gzip, gzip` (1 KB that
    inflates to 512 MiB) took the storage worker to 1.6 GB before its size check ran."""
    import gzip

    from lacuna_webhooks.handlers._http import OutboundClient

    bomb = gzip.compress(gzip.compress(bytes(512 * 1024 * 1024), 9), 9)
    head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip, gzip\r\ncontent-length: %d\r\n\r\n" % len(
        bomb
    )
    client = OutboundClient(allow_private=True, connect_timeout_seconds=5, read_timeout_seconds=5)
    try:
        async with raw_peer(head, bomb) as url:
            with pytest.raises(PermanentError, match="Content-Encoding 'gzip, gzip'"):
                async with client.stream_get(url, what="audio") as response:
                    await response.aread()
    finally:
        await client.aclose()


async def refusal_texts(
    status_line: bytes, body: bytes, *, credentials: str = "", path: str = PATH, **env: str
) -> list[str]:
    """What a handler shows of a peer's refusal (``status_line``, then ``body``): the
    attempt's stored error and the log lines it wrote. ``credentials`` (``user:password``)
    and ``path`` go into the handler's URL; ``env``, its other settings."""
    from lacuna_webhooks.dispatch.attempt import describe_error

    head = b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n" % (status_line, len(body))
    async with raw_peer(head, body) as url:
        url = url.replace(PATH, path)
        if credentials:
            url = url.replace("http://", f"http://{credentials}@")
        handler = make_handler(url, **env)
        try:
            with capture_logs() as logs, pytest.raises(PermanentError) as info:
                await handler.handle(as_event())
        finally:
            await handler.aclose()
    return [describe_error(info.value), repr(logs)]


async def test_a_peer_echoing_the_request_leaks_neither_path_nor_header_values() -> None:
    """A 404 page that echoes the request line and a header (Express's, roughly): the URL's
    path and an extra header's value went into the attempt's error and the log, which
    forwarding.md says are never shown."""
    body = b"Cannot POST /hooks/t0ps3cretpath x=apikeyvalue77zz auth=tok3n-abcdef"
    headers = '{"X-Api-Key": "apikeyvalue77zz", "Authorization": "Bearer tok3n-abcdef"}'
    texts = await refusal_texts(
        b"404 Not Found", body, path="/hooks/t0ps3cretpath", HEADERS=headers
    )
    assert "404" in texts[0]
    for text in texts:
        for secret in ("t0ps3cretpath", "apikeyvalue77zz", "tok3n-abcdef"):
            assert secret not in text, text


def test_a_header_value_that_is_not_ascii_stops_the_start() -> None:
    """`{"X-Name": "café ☕"}` started, and every attempt then failed to build its request."""
    with pytest.raises(ConfigError, match="must be printable ASCII"):
        make_handler("http://127.0.0.1:9/x", HEADERS='{"X-Name": "caf\u00e9 \u2615"}')


async def test_a_peer_echoing_the_basic_credentials_of_the_url_leaks_no_password() -> None:
    """The client sends a URL's user and password as `Authorization: Basic <base64>`; a peer
    that echoed it put base64("user:password") into the error, the admin API and the log,
    which decodes straight back to the password."""
    token = base64.b64encode(b"userx:Pa55wordSecretX").decode()
    body = f"Bad request; you sent authorization=Basic {token}".encode()
    texts = await refusal_texts(b"400 Bad Request", body, credentials="userx:Pa55wordSecretX")
    for text in texts:
        assert "400" in text
        assert token not in text, text
        assert "Pa55wordSecretX" not in text


async def test_a_secret_echoed_across_the_cut_of_the_reason_is_not_left_in_part() -> None:
    """The reason is cut to 200 characters. Cut before the secrets were masked, a header
    value the peer echoed across the cut kept its first 30 characters."""
    secret = "HdrSecretValue999LongerToken0123456789"
    for pad in range(150, 200, 7):  # the secret across character 200, wherever it falls
        body = ("p" * pad + f" auth=Bearer {secret}").encode()
        headers = f'{{"Authorization": "Bearer {secret}"}}'
        for text in await refusal_texts(b"400 Bad Request", body, HEADERS=headers):
            assert secret[:12] not in text, (pad, text)


def test_url_credentials_and_an_authorization_header_together_are_refused() -> None:
    """Both would be sent as Authorization, the URL's silently replacing the header's."""
    with pytest.raises(ConfigError, match="give the credentials in one of them") as info:
        make_handler("http://u:pw-secret-1@127.0.0.1:9/x", HEADERS='{"authorization": "Bearer z"}')
    assert "pw-secret-1" not in str(info.value)


async def test_a_secret_across_the_end_of_the_read_body_is_not_left_in_part() -> None:
    """Only the first 4096 bytes of a refusal are read. Spaces before a header value the
    peer echoed put the value across that end, and its start, no longer a secret any mask
    knows, came first in the reason once the spaces were collapsed."""
    secret = "HdrSecretValue999LongerToken0123456789"
    body = (" " * 4070 + f"auth=Bearer {secret}").encode()
    headers = f'{{"Authorization": "Bearer {secret}"}}'
    for text in await refusal_texts(b"400 Bad Request", body, HEADERS=headers):
        assert secret[:10] not in text, text


async def test_two_different_ids_never_share_a_webhook_id(
    forward: HTTPHandler, httpserver: HTTPServer
) -> None:
    """`evt_é_1` went as `evt_%C3%A9_1`, and so did the ASCII id `evt_%C3%A9_1` itself: a
    receiver dropping repeats by `webhook-id` (forwarding.md) dropped the second event.
    A `%` is encoded too now; both still verify."""
    receiver = VerifyingReceiver(SECRET)
    httpserver.expect_request(PATH, method="POST").respond_with_handler(receiver)
    for event_id in ("evt_\u00e9_1", "evt_%C3%A9_1", "evt_plain-1"):
        await forward.handle(as_event(make_event(event_id, "job.%41")))
    assert receiver.refused == []
    ids = [headers["Webhook-Id"] for _, headers in received(httpserver)]
    assert ids == ["evt_%C3%A9_1", "evt_%25C3%25A9_1", "evt_plain-1"]
    types = {headers["Lacuna-Event-Type"] for _, headers in received(httpserver)}
    assert types == {"job.%2541"}


async def test_a_refusal_whose_body_trickles_ends_with_its_status_in_time() -> None:
    """A 500 whose body came a byte a second never tripped the read timeout (each read got
    its byte in time): the attempt ran into the handler's timeout and the 500 was lost. The
    body is read within the read timeout (2 s here), then the status is the answer; what
    came of a secret being echoed is dropped with its word."""
    secret = "TrickledHeaderSecret0123456789"
    body = f"oops auth={secret} and more".encode()
    head = b"HTTP/1.1 500 Oops\r\ncontent-length: %d\r\n\r\n" % len(body)
    async with raw_peer(head, body, trickle=True) as url:
        handler = make_handler(
            url, READ_TIMEOUT="2", HEADERS=f'{{"Authorization": "Bearer {secret}"}}'
        )
        try:
            started = time.monotonic()
            with pytest.raises(RetryLater, match="HTTP 500") as info:
                await asyncio.wait_for(handler.handle(as_event()), 8)
            took = time.monotonic() - started
        finally:
            await handler.aclose()
    assert took < 6
    assert "TrickledHe" not in str(info.value)
