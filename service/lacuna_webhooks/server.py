"""The HTTP layer ``serve`` runs: uvicorn's httptools protocol with limits and timeouts.

uvicorn bounds only the keep-alive wait after a response. This protocol adds
what a public receiver needs (docs/http.md), per connection:

- **phases and deadlines**: a fresh or kept-alive connection may stay idle
  ``LACUNA_KEEPALIVE_TIMEOUT`` (then it is closed silently); from the first
  byte of a request its headers must arrive within ``LACUNA_HEADER_TIMEOUT``
  and then its body within ``LACUNA_BODY_TIMEOUT``, else **408**
  ``request_timeout``. Each is a deadline for the whole phase, so sending one
  byte a second does not extend it.
- **header caps**: request line and headers over ``LACUNA_MAX_HEADER_BYTES``, or
  more than ``LACUNA_MAX_HEADERS`` header lines, get **431** ``headers_too_large``
  as soon as the cap is passed; the parser never holds more than the cap plus
  one read (at most 256 KiB).
- **HTTP errors in the envelope**: malformed framing, bad chunk sizes, both
  ``Content-Length`` and ``Transfer-Encoding`` (request smuggling), duplicate
  lengths: **400** ``malformed_request``, and the connection is closed.
- **a connection cap** (``LACUNA_MAX_CONNECTIONS``, lowered to fit the file
  limit): a connection over the cap makes room by closing the connection idle
  the longest, else the one that has been reading its request the longest;
  only when every connection has a request being answered is the newcomer
  refused (**503** ``server_busy``). Attackers' idle and slow sockets go
  first; senders that send their request go through.
- **the body budget** (``intake.BodyBudget``): a webhook body that finds the
  budget spent makes room by refusing (503) the bodies that have been read the
  longest, as the cap does with connections.

Every refusal and shed connection is counted in ``lacuna_webhooks_http_refused``.
``server_config()`` also raises the soft open-file limit to the hard limit.
uvicorn is used here and in ``cli.py`` only.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import resource
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httptools
import uvicorn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .config import Settings
from .envelope import error_parts
from .errors import (
    HeadersTooLarge,
    MalformedRequest,
    RequestTimeout,
    ServerBusy,
    WebhookError,
)
from .intake import WEBHOOK_PATH, Answer, WebhookEndpoint, admit_chunk
from .metrics import Metrics
from .models import Event

logger = logging.getLogger(__name__)

#: Descriptors kept free of connections: the SQLite files and writer socket, a PostgreSQL
#: pool, handler clients, logs. The connection cap is at most the file limit minus these.
RESERVED_FILES = 64
#: The connection cap is never lowered below this, however small the file limit.
MIN_CONNECTIONS = 16
#: The admin listener and the webhook listener share one process's file limit: with admin
#: tokens set, the webhook listener's cap fits in this share of the descriptors left after
#: RESERVED_FILES and the admin listener's in the rest (an operator's few clients), so that
#: together they cannot pass the limit. Without an admin listener intake has it all.
WEBHOOK_SHARE = 0.875
ADMIN_SHARE = 1 - WEBHOOK_SHARE


@dataclass(frozen=True)
class Limits:
    """The HTTP layer's limits, from ``Settings`` (seconds, bytes, counts)."""

    keepalive_timeout_seconds: float
    header_timeout_seconds: float
    body_timeout_seconds: float
    max_header_bytes: int
    max_headers: int
    max_connections: int

    @classmethod
    def from_settings(
        cls, settings: Settings, *, file_limit: int | None = None, share: float = 1.0
    ) -> Limits:
        """The settings' limits, the connection cap lowered to fit ``share`` (0 to 1) of the
        descriptors ``file_limit`` leaves after ``RESERVED_FILES``."""
        connections = settings.max_connections
        if file_limit is not None:
            fits = int((file_limit - RESERVED_FILES) * share)
            connections = min(connections, max(MIN_CONNECTIONS, fits))
        return cls(
            keepalive_timeout_seconds=settings.keepalive_timeout_seconds,
            header_timeout_seconds=settings.header_timeout_seconds,
            body_timeout_seconds=settings.body_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_connections=connections,
        )


class _Phase(enum.Enum):
    IDLE = "idle"  # no request started: fresh, or kept alive after a response
    HEADERS = "headers"  # reading the request line and headers
    BODY = "body"  # reading the body
    APP = "app"  # the whole request is read; the application is answering


class _ClientOf:
    """The sender's address as the ASGI path sees it: the peer, or the ``X-Forwarded-For``
    client when the peer is in ``LACUNA_TRUSTED_PROXIES``. It runs uvicorn's own
    ``ProxyHeadersMiddleware`` (the middleware of the ASGI path, with the same setting) on a
    scope of its own, so that both paths apply one rule."""

    def __init__(self, trusted_proxies: str) -> None:
        self._middleware = ProxyHeadersMiddleware(
            cast(Any, self._seen), trusted_hosts=trusted_proxies
        )

    @staticmethod
    async def _seen(scope: Any, receive: Any, send: Any) -> None:
        return None

    def __call__(
        self, peer: tuple[str, int] | None, headers: list[tuple[bytes, bytes]]
    ) -> str | None:
        scope: dict[str, Any] = {"type": "http", "client": peer, "headers": headers}
        step = cast(Awaitable[None], self._middleware(cast(Any, scope), _no_io, _no_io))
        # Neither the middleware nor _seen awaits anything: the coroutine ends at its first
        # step, so it is run here without a loop turn.
        coroutine = step.__await__()
        try:
            next(coroutine)
        except StopIteration:
            pass
        else:  # a uvicorn whose middleware suspends: take the peer rather than guess
            close = getattr(coroutine, "close", None)
            if close is not None:
                close()
            scope["client"] = peer
        client = scope.get("client")
        return str(client[0]) if client else None


async def _no_io(*args: Any) -> Any:
    raise RuntimeError("the proxy-headers step does no I/O")


class _Shared:
    """What every connection of one server shares: limits, metrics, the webhook endpoint
    served directly (``None``: every request through ASGI), the headers this layer's own
    refusals carry besides uvicorn's (the admin listener's: ``no-store``, its CSP and
    framing headers, as every answer of its app), and the connections ordered by how long
    they have been idle or reading (dicts keep insertion order, so the first key is the one
    to shed)."""

    def __init__(
        self,
        limits: Limits,
        metrics: Metrics,
        webhook: WebhookEndpoint | None = None,
        trusted_proxies: str = "127.0.0.1",
        refusal_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.limits = limits
        self.refusal_headers = list(refusal_headers)
        self.webhook = webhook
        self.client_of = _ClientOf(trusted_proxies)
        self.refused = {
            reason: metrics.http_refused.labels(reason)
            for reason in (
                "request_timeout",
                "headers_too_large",
                "malformed_request",
                "server_busy",
                "idle_shed",
                "slow_shed",
            )
        }
        self.idle: dict[LimitedHttpToolsProtocol, None] = {}
        self.reading: dict[LimitedHttpToolsProtocol, None] = {}


class LacunaConfig(uvicorn.Config):
    """``uvicorn.Config`` that carries the shared state its protocol instances read."""

    def __init__(self, app: Any, *, shared: _Shared, **kwargs: Any) -> None:
        super().__init__(app, http=LimitedHttpToolsProtocol, **kwargs)
        self.lacuna = shared


class _StopParsing(Exception):
    """Raised from a parser callback with ``_refusal`` set (over LACUNA_MAX_HEADERS or
    LACUNA_MAX_HEADER_BYTES, a transfer coding other than chunked): the parser turns it
    into an error and data_received answers the refusal."""


def _refusal_bytes(exc: WebhookError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The refusal's whole answer; ``default_headers`` are uvicorn's (``Date``), as on every
    other answer."""
    status, body, headers = error_parts(exc)
    phrase = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
    lines = [b"HTTP/1.1 %d %s" % (status, phrase.get(status, b"Service Unavailable"))]
    lines += [name + b": " + value for name, value in (*default_headers, *headers)]
    lines += [b"content-length: %d" % len(body), b"connection: close", b"", body]
    return b"\r\n".join(lines)


_WEBHOOK_TARGET = WEBHOOK_PATH.encode()


class _DirectCycle:
    """A webhook request served without ASGI (``LimitedHttpToolsProtocol._start_direct``).

    It stands where uvicorn keeps its ``RequestResponseCycle`` (``protocol.cycle``) while
    the request is in progress, with the attributes uvicorn's and this module's code read
    there, so that pipelining (a next request waits for this answer), graceful shutdown
    (``keep_alive`` turned off) and disconnects work as for any other request.
    """

    __slots__ = (
        "body",
        "disconnected",
        "headers",
        "held",
        "keep_alive",
        "message_event",
        "response_complete",
        "response_started",
        "signatures",
        "size",
        "started",
    )

    def __init__(self, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.headers = headers
        self.keep_alive = keep_alive
        self.started = time.perf_counter()
        self.signatures: list[str] = []
        # The body read so far: the first read's bytes as they came (the usual whole body),
        # then one bytearray. A list of the reads held ~30 bytes of object per chunk: 14 MiB
        # for a 512 KiB body sent in 2-byte chunks.
        self.held: bytes | bytearray = b""
        self.size = 0  # bytes of body held (and taken from the endpoint's BodyBudget)
        self.response_started = False
        self.response_complete = False
        self.disconnected = False
        self.body = b""  # uvicorn's cycle holds unread body here; this one never does
        self.message_event = self  # uvicorn wakes an ASGI receive() with .set(): none here

    def set(self) -> None:
        return None


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines, caps and shedding described above.

    The timers cost nothing on the fast path: a request that arrives in one read is parsed
    to the end before any deadline is armed, so none is (only a phase the connection is
    still in after a read gets a timer). After a response, uvicorn's own keep-alive timer
    (``timeout_keep_alive`` = ``LACUNA_KEEPALIVE_TIMEOUT``) bounds the idle time.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, LacunaConfig)
        self._shared = config.lacuna
        self._limits = config.lacuna.limits
        self._phase = _Phase.IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._timer_phase: _Phase | None = None
        self._header_bytes = 0  # bytes received since the last request's headers ended
        # A chunked body's trailer section: bytes of the reads that began after a chunk
        # header with no body data since (the last chunk's), capped like headers.
        self._after_chunk_header = False
        self._trailer_bytes = 0
        # The same section counted by the fields the parser hands over, which also sees a
        # trailer that begins and ends inside one read (the count above then misses it).
        self._trailer_field_bytes = 0
        self._trailer_fields = 0
        # An Upgrade request's head without its upgrade, to be parsed again (see
        # on_headers_complete).
        self._plain_head: bytes | None = None
        self._refusal: WebhookError | None = None
        # A refusal waiting for the answers to the requests before it (see _refuse).
        self._deferred: WebhookError | None = None
        # The ASGI request being answered; with requests pipelined behind it, it is not
        # ``self.cycle`` (the newest), which is all uvicorn marks when the connection goes.
        self._answering: Any = None
        self._shutting_down = False

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._shared.idle[self] = None
        # A fresh connection waits like a kept-alive one (proxies may open theirs ahead).
        self._arm(self._limits.keepalive_timeout_seconds)
        if len(self.connections) > self._limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._gone(self._answering)
        self._untrack()
        cycle = self.cycle
        if (
            isinstance(cycle, _DirectCycle)
            and not cycle.response_complete
            and self._phase is _Phase.BODY
        ):
            # The sender hung up (or was cut off) mid-body: as the ASGI path's ClientGone.
            cycle.response_complete = True
            self._release_body(cycle)
            self._log_direct(cycle, 400, "client_disconnected", None)
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio.Protocol's type
        """The client closed its sending side (``shutdown(SHUT_WR)``, ``nc -N``, a proxy's
        half-close). With a whole request read and its answer owed, our side stays open to
        send that answer, then the connection closes: RFC 9112 §9.6 lets a client half-close
        and still read the response. Before, the transport closed at once: a webhook was
        stored and never answered (the sender retried it). Idle or mid-request: closed now."""
        cycle = self.cycle
        # APP: the request is read and being answered. HEADERS: a pipelined request was cut
        # short by the half-close while the one before it (still self.cycle) is answered.
        if (
            self._phase in (_Phase.APP, _Phase.HEADERS)
            and cycle is not None
            and not cycle.response_complete
        ):
            cycle.keep_alive = False  # nothing can follow: close once answered
            return True
        return None

    def _make_room(self) -> None:
        """Close the longest-idle connection, else the longest-reading one; else refuse
        this one (every other connection has a request being answered)."""
        shared = self._shared
        for pool, reason in ((shared.idle, "idle_shed"), (shared.reading, "slow_shed")):
            victim = next((c for c in pool if c is not self), None)
            if victim is not None:
                shared.refused[reason].inc()
                victim._close_quietly()
                return
        self._refuse(ServerBusy())

    def _shed_bodies(self, need: int) -> bool:
        """The body budget is spent: refuse (503, then close) the connections that have been
        reading a webhook body the longest, until ``need`` more bytes fit. Whether they now
        do. Without it, 64 unsigned bodies left one byte short held the budget for the whole
        body timeout, and every sender that sent its request got the 503."""
        webhook = self._shared.webhook
        assert webhook is not None
        budget = webhook.body_budget
        for victim in list(self._shared.reading):
            if budget.held_bytes + need <= budget.limit_bytes:
                return True
            held = victim.cycle
            if victim is self or not isinstance(held, _DirectCycle) or not held.size:
                continue
            victim._release_body(held)
            victim._refuse(ServerBusy())
        return budget.held_bytes + need <= budget.limit_bytes

    def _close_quietly(self) -> None:
        self._gone(self._answering)
        self._gone(self.cycle)
        self._close_now()

    @staticmethod
    def _gone(cycle: Any) -> None:
        """Tell a request still being answered that its connection is gone: its receive()
        says so and its send() writes nothing (uvloop raises on a closed transport)."""
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    # --- shutdown -------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, except for a client that does not read its response:
        its connection is aborted (now, or as soon as its write buffer fills). Otherwise an
        admin stream whose client stopped reading holds its task in ``send`` where it cannot
        see ``AdminContext.stopping``, and ``serve`` waits out ``LACUNA_SHUTDOWN_TIMEOUT``,
        then logs a traceback per such stream.

        A body still arriving gets until a second before the drain ends
        (``LACUNA_SHUTDOWN_TIMEOUT``), if its own deadline is later: then the 408, as at that
        deadline. Left to the drain's end, the ASGI endpoint reading it would be cancelled
        (a 500 and a traceback) and a direct one cut without an answer or a log line."""
        self._shutting_down = True
        super().shutdown()
        if self.flow is not None and self.flow.write_paused:
            self._abort()
        elif self._phase is _Phase.BODY and self._timer is not None:
            drain = self.config.timeout_graceful_shutdown or 1
            cut = self.loop.time() + max(0.0, drain - 1.0)
            if self._timer.when() > cut:
                self._timer.cancel()
                self._timer = self.loop.call_at(cut, self._deadline)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._shutting_down:
            self._abort()

    def _abort(self) -> None:
        # close() would wait for the buffer to drain, which a client not reading never lets
        # happen; abort() drops it and calls connection_lost, which frees the blocked send.
        self._untrack()
        self.transport.abort()

    # --- phases and deadlines --------------------------------------------------------------
    # The hot path: a request read in one go passes IDLE -> HEADERS -> BODY -> APP inside one
    # data_received and back to IDLE when answered. Each step is a few attribute and dict
    # operations; the clock is read and a timer armed only for a phase a read ends in.

    def _to_idle(self) -> None:
        self._phase = _Phase.IDLE
        self._shared.reading.pop(self, None)
        self._shared.idle[self] = None

    def _arm(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer_phase = self._phase
        self._timer = self.loop.call_later(seconds, self._deadline)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_phase = None

    def _deadline(self) -> None:
        self._timer = None
        self._timer_phase = None
        if self.transport.is_closing():
            return
        if self._phase is _Phase.IDLE:
            self.transport.close()  # keep-alive expired: closed silently (RFC 9112 §9.5)
        elif self._phase is _Phase.HEADERS:
            self._refuse(RequestTimeout("The request headers were not received in time."))
        elif self._phase is _Phase.BODY:
            self._refuse(RequestTimeout("The request body was not received in time."))

    # --- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        again: bytes | None = data
        while again is not None:  # a loop, not a recursion: a read may hold many upgrades
            again = self._received(again)

    def _received(self, data: bytes) -> bytes | None:
        """Parse one read; what is to be parsed again by a new parser (an Upgrade request's
        head and what followed it), else ``None``."""
        if self._deferred is not None:
            return None  # refused; what follows the bad request is never read
        if self._phase is not _Phase.BODY:
            self._header_bytes += len(data)
        elif self._after_chunk_header:
            self._trailer_bytes += len(data)
        # uvicorn's data_received, with the parser's own reason in the 400 envelope
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            head, self._plain_head = self._plain_head, None
            if head is not None:
                # Parsed again as the plain request it also is: this head, then its body
                # and whatever follows, which the upgrade left unread.
                self.parser = httptools.HttpRequestParser(self)
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                self._header_bytes = 0
                return head + data[exc.args[0] :]
            return None
        except httptools.HttpParserError as exc:
            refusal, self._refusal = self._refusal, None  # e.g. too many headers
            self._refuse(refusal or MalformedRequest(f"The request is not valid HTTP/1.1: {exc}."))
            return None
        phase = self._phase
        if (
            phase is _Phase.BODY
            and self._after_chunk_header
            and self._trailer_bytes > self._limits.max_header_bytes
        ):
            self._refuse(self._trailer_too_large())
            return None
        if phase is _Phase.HEADERS:
            limits = self._limits
            if self._header_bytes > limits.max_header_bytes:
                self._refuse(self._head_too_large())
                return None
            if len(self.headers) > limits.max_headers:
                self._refuse(self._too_many_headers())
                return None
        if phase is not self._timer_phase:
            # A deadline for the phase this read leaves the connection in, if it has one.
            if phase is _Phase.HEADERS:
                self._arm(self._limits.header_timeout_seconds)
            elif phase is _Phase.BODY:
                self._arm(self._limits.body_timeout_seconds)
            elif self._timer is not None:  # APP: the application answers
                self._cancel_timer()
        return None

    def _head_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"The request headers are larger than {self._limits.max_header_bytes} bytes."
        )

    def _trailer_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"The trailer fields are larger than {self._limits.max_header_bytes} bytes."
        )

    def _too_many_headers(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"The request has more than {self._limits.max_headers} header lines."
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A request has begun: uvicorn's keep-alive timer no longer applies. uvicorn cancels
        # it at each read, but an answer given in the middle of a read (a 413 or 403 from
        # the headers, a refusal from the body) arms it again, and a request pipelined
        # behind in the same read would be cut by it while still arriving or being answered.
        self._unset_keepalive_if_required()
        self._phase = _Phase.HEADERS
        self._shared.idle.pop(self, None)
        self._shared.reading[self] = None  # reading since its first byte: shed order

    def on_headers_complete(self) -> None:
        headers = self.headers
        limits = self._limits
        if len(headers) > limits.max_headers:
            self._refusal = self._too_many_headers()
            raise _StopParsing()  # the parser stops; data_received answers 431
        # data_received's count sees a head that ends in the read it started in only after the
        # parse (then reset): counted here, the target and each header's name and value with
        # its ": " and CRLF (a lower bound of the bytes; about 0.4 µs for ten headers).
        if len(self.url) + sum([len(n) + len(v) + 4 for n, v in headers]) > (
            limits.max_header_bytes
        ):
            self._refusal = self._head_too_large()
            raise _StopParsing()
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._refusal = MalformedRequest(
                f"HTTP/{version} is not served here: send HTTP/1.1 (RFC 9112)."
            )
            raise _StopParsing()
        if version == "1.0" and any(n == b"transfer-encoding" for n, _ in headers):
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (an
            # HTTP/1.0 hop may have passed it on without understanding it: a smuggling shape).
            self._refusal = MalformedRequest(
                "Transfer-Encoding is not defined for HTTP/1.0 (RFC 9112 §6.1)."
            )
            raise _StopParsing()
        if b"#" in self.url:
            # RFC 9112 §3.2: the request target carries no fragment; uvicorn drops one, so
            # "/webhooks/lacuna#x" reached the route.
            self._refusal = MalformedRequest("A request target has no fragment (RFC 9112 §3.2).")
            raise _StopParsing()
        if version == "1.1" and [n for n, _ in headers if n == b"host"] != [b"host"]:
            # RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request with no Host
            # header or more than one.
            self._refusal = MalformedRequest("An HTTP/1.1 request needs one Host header.")
            raise _StopParsing()
        if parser.should_upgrade():
            if parser.get_method() == b"CONNECT":
                self._refusal = MalformedRequest("CONNECT is not served here: this is no proxy.")
                raise _StopParsing()
            # Upgrades are not served (RFC 9110 §7.8 lets a server ignore the header). But
            # httptools ends an Upgrade request at its head, its body unread (`curl --http2`
            # sends `Upgrade: h2c` with a POST: the body was lost, a valid webhook got 401),
            # and a body sent later was parsed as a request of its own (smuggling). The
            # head, without its upgrade, is parsed again with what follows it, by a parser
            # of its own (data_received): the request is then what it would be without it.
            self._plain_head = self._head_without_upgrade(parser.get_method(), version)
            return
        self._phase = _Phase.BODY
        self._header_bytes = 0
        self._after_chunk_header = False
        webhook = self._shared.webhook
        if (
            webhook is not None
            and self.url == _WEBHOOK_TARGET
            and parser.get_method() == b"POST"
            and version == "1.1"
            and not self.expect_100_continue
            and (self.cycle is None or self.cycle.response_complete)
            and not self.flow.write_paused
        ):
            self._start_direct(webhook)
            return
        super().on_headers_complete()

    def _head_without_upgrade(self, method: bytes, version: str) -> bytes:
        """The request's head as received, less its ``Upgrade`` header and the ``upgrade``
        token of its ``Connection`` header (the names lowercased, the values as parsed)."""
        lines = [method, b" ", self.url, b" HTTP/", version.encode(), b"\r\n"]
        for name, value in self.headers:
            if name == b"upgrade":
                continue
            if name == b"connection":
                tokens = [t.strip() for t in value.split(b",")]
                value = b", ".join(t for t in tokens if t and t.lower() != b"upgrade")
                if not value:
                    continue
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase is _Phase.BODY:
            # A trailer field of a chunked body: not a request header (RFC 9110 §6.5.1).
            # Appended to the headers, it would reach an ASGI endpoint that had not yet
            # read them (a signature, an X-Forwarded-For behind a trusted proxy). Capped as
            # headers are.
            self._trailer_fields += 1
            self._trailer_field_bytes += len(name) + len(value) + 4
            limits = self._limits
            if self._trailer_fields > limits.max_headers:
                self._refusal = HeadersTooLarge(
                    f"The trailer section has more than {limits.max_headers} field lines."
                )
                raise _StopParsing()
            if self._trailer_field_bytes > limits.max_header_bytes:
                self._refusal = self._trailer_too_large()
                raise _StopParsing()
            return
        # llhttp reads "gzip, chunked" or "foo, chunked" as plain chunked: a body decoded
        # other than the sender meant (a smuggling shape). Chunked alone, or refused.
        if (
            len(name) == 17
            and name.lower() == b"transfer-encoding"
            and value.strip().lower() != b"chunked"
        ):
            self._refusal = MalformedRequest(
                "Transfer-Encoding must be chunked alone: this server reads no other "
                "transfer coding (RFC 9112 §6.1)."
            )
            raise _StopParsing()
        super().on_header(name, value)

    def on_chunk_header(self) -> None:
        self._after_chunk_header = True
        self._trailer_bytes = 0
        self._trailer_field_bytes = 0
        self._trailer_fields = 0

    def on_body(self, body: bytes) -> None:
        self._after_chunk_header = False
        cycle = self.cycle
        if not isinstance(cycle, _DirectCycle):
            super().on_body(body)
            return
        if cycle.response_complete:
            return  # answered before its body (413, 403): the rest is read and dropped
        webhook = self._shared.webhook
        assert webhook is not None
        try:  # a chunked body over the limit, or a body past the budget
            try:
                cycle.size = admit_chunk(cycle.size, len(body), webhook.limit, webhook.body_budget)
            except ServerBusy:
                if not self._shed_bodies(len(body)):
                    raise
                cycle.size = admit_chunk(cycle.size, len(body), webhook.limit, webhook.body_budget)
        except WebhookError as exc:
            self._release_body(cycle)
            self._answer_direct(cycle, *error_parts(exc), exc.code, None)
            return
        held = cycle.held
        if not held:
            cycle.held = body
        elif isinstance(held, bytearray):
            held += body
        else:
            cycle.held = bytearray(held) + body

    def on_message_complete(self) -> None:
        if self._plain_head is not None:
            return  # an Upgrade request's head alone: parsed again (on_headers_complete)
        self._phase = _Phase.APP
        self._shared.reading.pop(self, None)
        cycle = self.cycle
        if isinstance(cycle, _DirectCycle):
            if not cycle.response_complete:
                held = cycle.held
                body = held if isinstance(held, bytes) else bytes(held)
                self._release_body(cycle)
                webhook = self._shared.webhook
                assert webhook is not None
                # Answered now when refused, else when its commit is confirmed (or the
                # commit wait times out): no task per request.
                webhook.answer_soon(
                    body,
                    cycle.signatures,
                    self.loop,
                    functools.partial(self._answered, cycle),
                    self.tasks,
                )
        else:
            super().on_message_complete()
        if self.cycle.response_complete:
            # Answered before its body was read (a 413, a 403) or refused at once (a bad
            # signature, invalid JSON): now idle. uvicorn's keep-alive
            # timer was cancelled by the body's reads, so the deadline is ours.
            self._to_idle()
            self._arm(self._limits.keepalive_timeout_seconds)

    def on_response_complete(self) -> None:
        # The last answer owed before a deferred refusal: none is left in the pipeline.
        refusal = self._deferred if not self.pipeline else None
        super().on_response_complete()
        if refusal is not None:
            self._deferred = None
            if not self.transport.is_closing():
                self.transport.write(_refusal_bytes(refusal, self._refusal_headers()))
            self._close_now()
            return
        cycle = self.cycle
        if cycle.response_complete:
            if cycle.body:  # a body the application did not read (sent to /healthz, say)
                cycle.body = bytearray()
            if self._phase is _Phase.APP:  # not if a pipelined request is being read
                self._to_idle()

    # --- the webhook route, served directly ------------------------------------------------
    # POST /webhooks/lacuna, the hot path, skips ASGI: no scope, no task-per-request machinery
    # of uvicorn's cycle, no proxy-headers middleware or message dicts, and the answer leaves
    # in one write instead of two. The endpoint's own code does the work either way (screen,
    # answer, log_request: intake.py), so both paths answer alike; anything unusual about the
    # request (HTTP/1.0, Expect, a query string, a pipelined request behind one still being
    # answered, a client not reading its answers, tracing on) takes the ASGI path.

    def _start_direct(self, webhook: WebhookEndpoint) -> None:
        headers = self.headers
        cycle = _DirectCycle(headers, self.parser.should_keep_alive())
        self.cycle = cast(Any, cycle)
        try:
            cycle.signatures = webhook.screen(headers, lambda: self._client(cycle))
        except WebhookError as exc:  # 403 outside the allowlist, 413 by Content-Length
            self._answer_direct(cycle, *error_parts(exc), exc.code, None)

    def _answered(self, cycle: _DirectCycle, answer: Answer) -> None:
        self._answer_direct(cycle, *answer)

    def _answer_direct(
        self,
        cycle: _DirectCycle,
        status: int,
        content: bytes,
        headers: list[tuple[bytes, bytes]],
        outcome: str,
        event: Event | None,
    ) -> None:
        if cycle.response_complete:
            return
        cycle.response_started = cycle.response_complete = True
        if not cycle.disconnected and not self.transport.is_closing():
            parts = [STATUS_LINE[status]]
            for name, value in (*self.server_state.default_headers, *headers):
                parts += (name, b": ", value, b"\r\n")
            parts.append(b"content-length: %d\r\n" % len(content))
            if not cycle.keep_alive:
                parts.append(b"connection: close\r\n")
            parts += (b"\r\n", content)
            self.transport.write(b"".join(parts))
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()
        self._log_direct(cycle, status, outcome, event)

    def _log_direct(
        self, cycle: _DirectCycle, status: int, outcome: str, event: Event | None
    ) -> None:
        webhook = self._shared.webhook
        assert webhook is not None
        # Who sent a refused request: logged as the ASGI path logs it (intake.py).
        client = self._client(cycle) if status != 200 else None
        elapsed = time.perf_counter() - cycle.started
        webhook.log_request(status, outcome, event, elapsed, client, self.loop)

    def _client(self, cycle: _DirectCycle) -> str | None:
        return self._shared.client_of(self.client, cycle.headers)

    def _release_body(self, cycle: _DirectCycle) -> None:
        webhook = self._shared.webhook
        if webhook is not None and cycle.size:
            webhook.body_budget.give(cycle.size)
        cycle.size = 0
        cycle.held = b""

    # --- refusals --------------------------------------------------------------------------

    def _refuse(self, exc: WebhookError) -> None:
        """Answer ``exc`` in the envelope and close the connection. A request whose
        application has already started answering cannot get a second answer: closed.

        Requests before the refused one that are still being answered (pipelined) get
        their answers first: written now, the refusal would be read as the first one's
        answer. Then it waits (nothing more is read) until ``on_response_complete`` of the
        last of them; the refused request itself is never started."""
        self._shared.refused[exc.code].inc()
        self._cancel_timer()
        cycle = self.cycle
        if self._phase is _Phase.BODY:
            # The refused request is the cycle being read; queued, it has answers before it.
            queued = next((item for item in self.pipeline if item[0] is cycle), None)
            if queued is not None:
                self.pipeline.remove(queued)
                self._defer(exc)
                return
        elif cycle is not None and not cycle.response_complete:
            self._defer(exc)  # a request after the whole of the cycle's
            return
        if cycle is not None and not cycle.response_complete:
            answer = not cycle.response_started
            self._gone(cycle)  # the application's receive() sees a disconnect
        else:  # no request yet, the previous one answered, or this one answered early (413)
            answer = cycle is None or self._phase is not _Phase.BODY
        if answer:
            self.transport.write(_refusal_bytes(exc, self._refusal_headers()))
        self._close_now()

    def _refusal_headers(self) -> list[tuple[bytes, bytes]]:
        """uvicorn's headers (``Date``) and this server's own for a refusal."""
        return [*self.server_state.default_headers, *self._shared.refusal_headers]

    def _defer(self, exc: WebhookError) -> None:
        self._deferred = exc
        self.flow.pause_reading()
        # Being answered now: neither idle nor reading, so never shed for a newcomer.
        self._untrack()

    def _close_now(self) -> None:
        self._untrack()
        self.transport.close()

    def _untrack(self) -> None:
        """Out of the connection cap's shed order: neither idle nor reading."""
        self._shared.idle.pop(self, None)
        self._shared.reading.pop(self, None)


def raise_file_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit in force after
    (``None`` when it is unlimited). A failure leaves the limit as it was (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("server.file_limit_unchanged: soft %s, hard %s: %s", soft, hard, exc)
    return None if soft == resource.RLIM_INFINITY else soft


def server_config(
    app: Any,
    settings: Settings,
    metrics: Metrics,
    *,
    host: str,
    port: int,
    share: float = 1.0,
    refusal_headers: Sequence[tuple[bytes, bytes]] = (),
) -> LacunaConfig:
    """The ``uvicorn.Config`` of ``serve``: this module's protocol and limits, proxy headers
    from ``LACUNA_TRUSTED_PROXIES``, no access log, no Server header. Raises the open-file
    limit first (``raise_file_limit``) and fits the connection cap under ``share`` of it
    (``WEBHOOK_SHARE`` / ``ADMIN_SHARE`` when both listeners run). ``refusal_headers`` are
    added to the answers this layer gives itself (408, 431, 400 ``malformed_request``, 503
    ``server_busy``), which never reach the app's middleware."""
    limits = Limits.from_settings(settings, file_limit=raise_file_limit(), share=share)
    if limits.max_connections < settings.max_connections:
        logger.warning(
            "server.connection_cap_lowered: LACUNA_MAX_CONNECTIONS %d -> %d to fit the"
            " open-file limit",
            settings.max_connections,
            limits.max_connections,
        )
    webhook = getattr(app, "webhook", None)
    direct = webhook if isinstance(webhook, WebhookEndpoint) and webhook.serves_direct else None
    return LacunaConfig(
        app,
        shared=_Shared(limits, metrics, direct, settings.trusted_proxies, refusal_headers),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
        server_header=False,
        ws="none",  # no WebSocket route: an upgrade request is an ordinary request
        timeout_keep_alive=settings.keepalive_timeout_seconds,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds) or 1,
    )


__all__ = [
    "ADMIN_SHARE",
    "WEBHOOK_SHARE",
    "LacunaConfig",
    "LimitedHttpToolsProtocol",
    "Limits",
    "raise_file_limit",
    "server_config",
]
