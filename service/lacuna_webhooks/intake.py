"""``POST /webhooks/lacuna``: read the body, verify, parse, accept, answer (SPEC §3).

A plain ASGI endpoint rather than a Starlette request handler: this is the hot
path, and it needs nothing from a ``Request`` but the headers and the body.
``app.LacunaApp`` calls it straight from its ASGI entry point.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import structlog

from .config import IPNetwork, Settings
from .envelope import INTERNAL_ERROR, JSON_HEADERS, error_parts
from .errors import (
    PayloadTooLarge,
    ServerBusy,
    SourceNotAllowed,
    StoreUnavailable,
    WebhookError,
)
from .metrics import Metrics
from .models import Event
from .plugins import HandlerSet
from .signature import HEADER, verify
from .store import Store

# The logger keeps the name it had when this code lived in app.py: dashboards filter on it.
logger = structlog.get_logger("lacuna_webhooks.app")

WEBHOOK_PATH = "/webhooks/lacuna"

# The ASGI shapes (as starlette.types spells them; Starlette itself stays in app.py).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: How a request ends: (status, content, headers, outcome for the log and metrics, the event
#: when the body parsed as one).
Answer = tuple[int, bytes, list[tuple[bytes, bytes]], str, "Event | None"]


class ClientGone(Exception):
    """The sender disconnected before the whole body arrived."""


#: How long a failed accept keeps /readyz at 503 when no accept has committed since.
WRITE_FAILURE_SECONDS = 30.0


class BodyBudget:
    """Bytes of request bodies held by all requests being read, at most ``limit_bytes``.

    The body must be read whole before its signature can be checked, so an unsigned body
    of up to ``LACUNA_MAX_BODY_BYTES`` is held by every connection reading one. This bound
    keeps many of them together from taking memory without limit (docs/http.md).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def take(self, size: int) -> None:
        """Hold ``size`` more bytes; ``ServerBusy`` (503, retry later) when over the limit."""
        if self.held_bytes + size > self.limit_bytes:
            raise ServerBusy("Too many request bodies are being received at once; retry later.")
        self.held_bytes += size

    def give(self, size: int) -> None:
        self.held_bytes -= size


#: Request bodies held at once, in bytes (BodyBudget): at least 64 bodies of the largest size.
BODY_BUDGET_MIN_BYTES = 64 * 1024 * 1024


def too_large(limit: int) -> PayloadTooLarge:
    """The 413 of a body over ``limit`` bytes (SPEC §3), however it was found out."""
    return PayloadTooLarge(f"The request body is larger than {limit} bytes.")


#: Significant digits past which a Content-Length is read as ``DECLARED_HUGE``: llhttp refuses
#: one past 2**64 - 1 (20 digits), but lets any number of leading zeros through.
_LENGTH_DIGITS = 20
#: What a Content-Length of more significant digits reads as: over every body limit.
DECLARED_HUGE = 10**_LENGTH_DIGITS


def declared_length(text: str) -> int | None:
    """A ``Content-Length`` value as a number of bytes, or ``None`` when it is not plain
    ASCII digits. ``1*DIGIT`` (RFC 9110 §8.6) allows leading zeros, which llhttp passes at
    any length: ``int()`` refuses more than 4300 digits with a ``ValueError``, and a valid
    webhook whose ``Content-Length`` was ``000…0369`` got a 500 (through ASGI) or a 400
    (served directly) instead of its 200. Past 20 significant digits: ``DECLARED_HUGE``."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    return int(digits or "0") if len(digits) <= _LENGTH_DIGITS else DECLARED_HUGE


def admit_chunk(held: int, chunk: int, limit: int, budget: BodyBudget) -> int:
    """Hold ``chunk`` more bytes of a body of which ``held`` are held already: the new size.
    Raises ``PayloadTooLarge`` past ``limit`` (nothing more is taken) and ``ServerBusy`` when
    ``budget`` is spent. Both readers of a body use it: ``read_body`` (ASGI) and the
    direct webhook path of ``server.py``."""
    if held + chunk > limit:
        raise too_large(limit)
    budget.take(chunk)
    return held + chunk


async def read_body(receive: Receive, limit: int, budget: BodyBudget) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies without holding them.

    A body is refused as soon as it passes the limit (a declared ``Content-Length`` over
    it is refused before, by ``WebhookEndpoint.screen``). The bytes are held against
    ``budget`` while they are read. Raises ``PayloadTooLarge``, ``ServerBusy`` or
    ``ClientGone``.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size = admit_chunk(size, len(chunk), limit, budget)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        # The body is the caller's now (or dropped): verification and the accept that follow
        # hold one body per request, as any request handler does.
        budget.give(size)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _refusal(exc: WebhookError, event: Event | None) -> Answer:
    status, content, headers = error_parts(exc)
    return status, content, headers, exc.code, event


def _internal_error(exc: BaseException, event: Event | None) -> Answer:
    logger.error("webhook.unhandled_error", exc_info=exc)
    return 500, INTERNAL_ERROR, JSON_HEADERS, "internal_error", event


def _accepted(event: Event, new: bool) -> Answer:
    content = orjson.dumps({"received": True, "id": event.id, "duplicate": not new})
    return 200, content, JSON_HEADERS, "accepted" if new else "duplicate", event


_HEADER_NAME = HEADER.encode()


def _client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


class SourceAllowlist:
    """``LACUNA_ALLOWED_SOURCE_IPS`` (SPEC §10): is a client address inside one of the networks?

    The address is the one uvicorn's proxy-headers middleware leaves in the scope: the peer's,
    or the ``X-Forwarded-For`` client when the peer is in ``LACUNA_TRUSTED_PROXIES`` (so an
    untrusted peer cannot claim an allowed address). Anything that is not an IP address (no
    client, a unix socket, garbage forwarded by a proxy) is outside. Answers are remembered
    per address, at most ``CACHE_SIZE`` of them.
    """

    CACHE_SIZE = 4096

    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        self.networks = networks
        self._seen: dict[str, bool] = {}

    def allows(self, host: str | None) -> bool:
        if host is None:
            return False
        known = self._seen.get(host)
        if known is None:
            known = self._check(host)
            if len(self._seen) >= self.CACHE_SIZE:
                self._seen.clear()
            self._seen[host] = known
        return known

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        return any(address in network for network in self.networks)


class WebhookEndpoint:
    """The ASGI endpoint: checks in SPEC §3's order, then one durable accept.

    Every outcome is answered here, bugs included (the 500 envelope), so the
    endpoint needs neither Starlette's routing nor its error middleware.
    """

    def __init__(
        self, settings: Settings, store: Store, handlers: HandlerSet, metrics: Metrics
    ) -> None:
        self.secrets = [s.encode("utf-8") for s in settings.secret_values]
        self.tolerance = settings.tolerance_seconds
        self.limit = settings.max_body_bytes
        self.commit_timeout = settings.commit_timeout_seconds
        self.body_budget = BodyBudget(max(BODY_BUDGET_MIN_BYTES, 64 * self.limit))
        # Requests waiting for their commit (a task, or the commit's future on the direct
        # path) -> deadline (time.monotonic), oldest first; the tasks the watchdog cancelled.
        self._waiting: dict[asyncio.Future[Any], float] = {}
        self._expired: set[asyncio.Future[Any]] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_loop: asyncio.AbstractEventLoop | None = None
        # When (time.monotonic) the newest accept timed out waiting for its commit since the
        # last that committed (None: the last committed): /readyz reads it (writes_failing).
        self.write_failed_at: float | None = None
        self.allowlist = (
            SourceAllowlist(settings.allowed_source_ips) if settings.allowed_source_ips else None
        )
        self.store = store
        self.handlers = handlers
        self.metrics = metrics
        # outcome -> counter child, so the hot path skips the label lookup
        self._received: dict[str, Any] = {}
        # Request lines waiting for the end of this loop turn (see log_request).
        self._log_lines: list[tuple[int, str, str | None, str | None, float, str | None]] = []
        self._log_flush_on: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            signatures = self.screen(scope["headers"], lambda: _client_host(scope))
            body = await read_body(receive, self.limit, self.body_budget)
        except WebhookError as exc:
            status, content, headers = error_parts(exc)
            outcome, event = exc.code, None
        except ClientGone:
            # The sender hung up mid-body: nothing was stored, nobody reads this answer.
            status, content, headers = 400, b"", JSON_HEADERS
            outcome, event = "client_disconnected", None
        else:
            status, content, headers, outcome, event = await self.answer(body, signatures)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(content)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": content})
        # Who sent a refused request (a forgery, a replay, a misconfigured sender): the peer
        # address, or the X-Forwarded-For client when the peer is in LACUNA_TRUSTED_PROXIES.
        client = _client_host(scope) if status != 200 else None
        self.log_request(status, outcome, event, time.perf_counter() - started, client)

    #: Whether the HTTP layer may call ``screen``/``answer``/``log_request`` itself instead
    #: of the ASGI entry point (server.py's direct webhook path). A subclass that wraps
    #: ``__call__`` (tracing) sets it False and is always called through ASGI.
    serves_direct: ClassVar[bool] = True

    def screen(
        self, headers: Iterable[tuple[bytes, bytes]], client: Callable[[], str | None]
    ) -> list[str]:
        """The checks before a byte of the body is read (SPEC §3, §10), and what the endpoint
        needs of the headers: the ``x-lacuna-signature`` values. ``client()`` gives the
        sender's address (asked only with an allowlist). Raises ``SourceNotAllowed`` (403)
        and ``PayloadTooLarge`` (413, a declared ``Content-Length`` over the limit)."""
        if self.allowlist is not None and not self.allowlist.allows(client()):
            raise SourceNotAllowed()  # before a byte of the body is read (SPEC §10)
        declared: int | None = None
        signatures: list[str] = []
        for name, value in headers:
            if name == b"content-length":
                declared = declared_length(value.decode("latin-1"))
            elif name == _HEADER_NAME:
                signatures.append(value.decode("latin-1"))
        if declared is not None and declared > self.limit:
            raise too_large(self.limit)
        return signatures

    async def answer(
        self,
        body: bytes,
        signatures: list[str],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Answer:
        """Verify, parse and durably accept a whole body: ``(status, content, headers,
        outcome, event)``. Never raises: every outcome is an answer, bugs included (the
        500 envelope; the direct path and this one bypass Starlette's error middleware).
        ``loop``: the running loop, when the caller knows it (``asyncio.get_running_loop()``
        costs a ``getpid()`` system call before Python 3.12)."""
        try:
            event = self._event_of(body, signatures)
        except WebhookError as exc:
            return _refusal(exc, None)
        except Exception as exc:
            return _internal_error(exc, None)
        return await self._accept_answer(event, loop)

    async def _accept_answer(
        self, event: Event, loop: asyncio.AbstractEventLoop | None = None
    ) -> Answer:
        """The answer of a verified, parsed event: its accept's (``_accept``), never raised."""
        try:
            new = await self._accept(event, loop)
        except WebhookError as exc:
            return _refusal(exc, event)
        except Exception as exc:
            return _internal_error(exc, event)
        self.write_failed_at = None
        return _accepted(event, new)

    def answer_soon(
        self,
        body: bytes,
        signatures: list[str],
        loop: asyncio.AbstractEventLoop,
        done: Callable[[Answer], None],
        tasks: set[asyncio.Task[Any]] | None = None,
    ) -> None:
        """``answer`` without a task per request, for the HTTP layer's direct path
        (server.py): ``done(answer)`` is called exactly once, at once for a refusal, else
        from the commit's callback. The same checks, answers and ``LACUNA_COMMIT_TIMEOUT``
        bound as ``answer``; a store without ``accept_soon`` is awaited in a task, kept in
        ``tasks`` while it runs (uvicorn's, which its shutdown cancels at its deadline).

        A task and its coroutine chain per request measured about 2.5 µs of the event
        loop's time (``make bench``); a future's callback, a fraction of that."""
        event: Event | None = None
        try:
            event = self._event_of(body, signatures)
            accept_soon = getattr(self.store, "accept_soon", None)
            if accept_soon is None:
                task = loop.create_task(self._accept_answer(event, loop))
                task.add_done_callback(
                    lambda finished: None if finished.cancelled() else done(finished.result())
                )
                if tasks is not None:
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                return
            pending: asyncio.Future[bool] = accept_soon(
                event, self.handlers.subscribers(event.type), now=_utcnow()
            )
        except WebhookError as exc:
            done(_refusal(exc, event))
            return
        except Exception as exc:
            done(_internal_error(exc, event))
            return
        self._wait_for(pending, loop)
        pending.add_done_callback(functools.partial(self._committed, event, done))

    def _committed(
        self, event: Event, done: Callable[[Answer], None], pending: asyncio.Future[bool]
    ) -> None:
        """``answer_soon``'s end: the commit's outcome (or the watchdog's 503) answered."""
        self._waiting.pop(pending, None)
        if pending.cancelled():  # by the watchdog: nobody else holds this future
            self.write_failed_at = time.monotonic()
            done(_refusal(self._commit_timed_out(), event))
            return
        error = pending.exception()
        if error is None:
            self.write_failed_at = None
            done(_accepted(event, pending.result()))
        elif isinstance(error, WebhookError):
            done(_refusal(error, event))
        else:
            done(_internal_error(error, event))

    def _event_of(self, body: bytes, signatures: list[str]) -> Event:
        """The verified, parsed event of ``body``; raises the ``WebhookError`` that refuses
        it (SPEC §3's checks 2 and 3)."""
        # Several header lines are one comma-separated list (RFC 9110 §5.3).
        header = ",".join(signatures) if signatures else None
        verify(body, header, self.secrets, now=time.time(), tolerance=self.tolerance)
        return Event.from_body(body)

    def _wait_for(self, waiter: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Bound ``waiter`` (a request's task, or its commit's future) by
        ``LACUNA_COMMIT_TIMEOUT``: ``_expire_waits`` cancels it past its deadline."""
        self._waiting[waiter] = time.monotonic() + self.commit_timeout
        if self._watchdog is None or self._watchdog_loop is not loop:
            self._watchdog_loop = loop  # a new loop (tests run one per client)
            self._watchdog = loop.call_later(self.commit_timeout / 10, self._expire_waits)

    def writes_failing(self) -> bool:
        """Whether the newest accept got no commit within ``LACUNA_COMMIT_TIMEOUT`` less
        than ``WRITE_FAILURE_SECONDS`` ago, and none has committed since. A store can answer
        its ping while every commit waits (a table lock held on PostgreSQL): /readyz must
        not call that ready. (A store's own write errors are its ping's to report: its probe
        write fails with them, and succeeds again with no traffic needed.) Past the window
        the ping decides again, so a replica taken out of rotation comes back to be tried."""
        failed = self.write_failed_at
        return failed is not None and time.monotonic() - failed < WRITE_FAILURE_SECONDS

    def _commit_timed_out(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"The event store did not confirm the commit within {self.commit_timeout:g} s;"
            " retry later."
        )

    async def _accept(self, event: Event, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """``store.accept``, waited for at most ``LACUNA_COMMIT_TIMEOUT`` seconds (checked
        every tenth of it, so the 503 comes within 1.1 times the setting).

        Each store bounds its own operations, but a request can queue behind several of
        them (a group commit waiting for the SQLite lock another process holds, then its
        own): this is the bound the sender sees. On timeout the answer is a 503, which
        is safe even if the commit succeeds later: the sender retries and the retry is
        answered ``duplicate: true``. Never a 2xx before the commit is confirmed.

        One watchdog timer serves every waiting request: ``asyncio.timeout`` per request
        measured 7-10 µs each, a fifth of the whole request path.
        """
        task = asyncio.current_task(loop)
        assert task is not None
        self._wait_for(task, task.get_loop())
        try:
            return await self.store.accept(
                event, self.handlers.subscribers(event.type), now=_utcnow()
            )
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # a shutdown, not our timeout
            self._expired.discard(task)
            task.uncancel()
            self.write_failed_at = time.monotonic()
            raise self._commit_timed_out() from None
        finally:
            self._waiting.pop(task, None)

    def _expire_waits(self) -> None:
        """Cancel the waits past their deadline (``_waiting`` is in deadline order: one
        timeout for all); run again while any request waits."""
        now = time.monotonic()
        expired = []
        for waiter, deadline in self._waiting.items():
            if deadline > now:
                break
            expired.append(waiter)
        for waiter in expired:
            del self._waiting[waiter]
            # A commit's future may already hold its result, its callback not yet run: then
            # it stands (the answer is the commit's). A task is marked, so that _accept tells
            # this cancel from a shutdown's; a future's callback needs no mark.
            if waiter.cancel() and isinstance(waiter, asyncio.Task):
                self._expired.add(waiter)
        self._watchdog = (
            asyncio.get_running_loop().call_later(self.commit_timeout / 10, self._expire_waits)
            if self._waiting
            else None
        )

    # --- the request log and metrics, one loop turn at a time ------------------------------

    def log_request(
        self,
        status: int,
        outcome: str,
        event: Event | None,
        elapsed: float,
        client: str | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Queue the request's log line and metrics; one loop turn's are recorded together.

        Under load a whole group commit of requests is answered in the same turn. Recording
        their lines and counts in one go, after the answers are sent, costs measurably less
        per request (``make bench``) than a ``logger.info`` and counter updates in each. A
        line waits at most for the end of the turn; it is the same structlog line either way.
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        if self._log_flush_on is not loop:
            self._log_flush_on = loop
            loop.call_soon(self._flush_request_log)
        self._log_lines.append(
            (
                status,
                outcome,
                event.id if event else None,
                event.type if event else None,
                elapsed,
                client,
            )
        )

    def _flush_request_log(self) -> None:
        self._log_flush_on = None
        lines, self._log_lines = self._log_lines, []
        counts: dict[str, int] = {}
        observe = self.metrics.request_latency.observe
        entries: list[dict[str, Any]] = []
        for status, outcome, event_id, event_type, elapsed, client in lines:
            counts[outcome] = counts.get(outcome, 0) + 1
            observe(elapsed)
            entry: dict[str, Any] = {
                "status": status,
                "outcome": outcome,
                "event_id": event_id,
                "event_type": event_type,
                "latency_ms": round(elapsed * 1000, 2),
            }
            if client is not None:
                entry["client"] = client
            entries.append(entry)
        for outcome, count in counts.items():
            self._count(outcome, count)
        info_lines = getattr(logger, "info_lines", None)
        if info_lines is not None:
            info_lines("webhook.received", entries)
        else:  # structlog configured by someone else (tests, an embedding app)
            for entry in entries:
                logger.info("webhook.received", **entry)

    def _count(self, outcome: str, count: int) -> None:
        counter = self._received.get(outcome)
        if counter is None:
            counter = self._received[outcome] = self.metrics.received.labels(outcome)
        counter.inc(count)
