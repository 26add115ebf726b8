"""The HTTP application: the webhook route, health, readiness and metrics.

``create_app(settings, store=..., handlers=...)`` returns a Starlette app whose
lifespan opens the store (when the app owns it) and runs the dispatcher. The
webhook route does only verification, parsing and one durable ``accept``:
handler work never happens in a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .config import Settings
from .dispatch.runner import AttemptRunner
from .dispatch.service import build_dispatch
from .errors import PayloadTooLarge, StoreUnavailable, WebhookError
from .metrics import CONTENT_TYPE, Metrics
from .models import Event
from .plugins import HandlerSet
from .signature import HEADER, verify
from .store import Store, open_store

logger = structlog.get_logger("lacuna_webhooks.app")

WEBHOOK_PATH = "/webhooks/lacuna"
RETRY_AFTER_SECONDS = 5
PING_TIMEOUT_SECONDS = 2.0
JSON = "application/json"


def error_body(code: str, message: str, *, error_type: str, param: str | None = None) -> bytes:
    """The quickstart's error envelope."""
    return orjson.dumps(
        {"error": {"type": error_type, "code": code, "message": message, "param": param}}
    )


_JSON_HEADERS = [(b"content-type", b"application/json")]
_RETRY_AFTER = (b"retry-after", str(RETRY_AFTER_SECONDS).encode())


def error_parts(exc: WebhookError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, envelope and headers of a refusal; a 503 also says when to retry."""
    headers = [*_JSON_HEADERS, _RETRY_AFTER] if exc.status_code == 503 else _JSON_HEADERS
    body = error_body(exc.code, exc.message, error_type=exc.error_type, param=exc.param)
    return exc.status_code, body, headers


def error_response(exc: WebhookError) -> Response:
    """``error_parts`` as a Starlette response, for the routes that are not the hot path."""
    status, body, headers = error_parts(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


class ClientGone(Exception):
    """The sender disconnected before the whole body arrived."""


async def read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    """Read at most ``limit`` bytes; refuse larger bodies without holding them.

    A declared ``Content-Length`` over the limit is refused before anything is
    read; a body without one (chunked) is refused as soon as it passes the limit.
    """
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _utcnow() -> datetime:
    return datetime.now(UTC)


_HEADER_NAME = HEADER.encode()


def _client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


_INTERNAL_ERROR = error_body("internal_error", "Internal error.", error_type="api_error")


class WebhookEndpoint:
    """``POST /webhooks/lacuna``: checks in SPEC §3's order, then one durable accept.

    A plain ASGI app rather than a Starlette request handler: this is the hot
    path, and it needs nothing from a ``Request`` but the headers and the body.
    """

    def __init__(
        self, settings: Settings, store: Store, handlers: HandlerSet, metrics: Metrics
    ) -> None:
        self.secrets = [s.encode("utf-8") for s in settings.secret_values]
        self.tolerance = settings.tolerance_seconds
        self.limit = settings.max_body_bytes
        self.store = store
        self.handlers = handlers
        self.metrics = metrics
        # outcome -> counter child, so the hot path skips the label lookup
        self._received: dict[str, Any] = {}
        # Request lines waiting for the end of this loop turn (see _log_request).
        self._log_lines: list[tuple[int, str, str | None, str | None, float, str | None]] = []
        self._log_flush_on: asyncio.AbstractEventLoop | None = None

    def _log_request(
        self, status: int, outcome: str, event: Event | None, elapsed: float, client: str | None
    ) -> None:
        """Queue the request's log line and metrics; one loop turn's are recorded together.

        Under load a whole group commit of requests is answered in the same turn. Recording
        their lines and counts in one go, after the answers are sent, costs measurably less
        per request (``make bench``) than a ``logger.info`` and counter updates in each. A
        line waits at most for the end of the turn; it is the same structlog line either way.
        """
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        event: Event | None = None
        status = 200
        headers = _JSON_HEADERS
        try:
            declared: int | None = None
            signatures: list[str] = []
            for name, value in scope["headers"]:
                if name == b"content-length":
                    text = value.decode("latin-1")
                    declared = int(text) if text.isascii() and text.isdigit() else None
                elif name == _HEADER_NAME:
                    signatures.append(value.decode("latin-1"))
            body = await read_body(receive, self.limit, declared)
            # Several header lines are one comma-separated list (RFC 9110 §5.3).
            header = ",".join(signatures) if signatures else None
            verify(body, header, self.secrets, now=time.time(), tolerance=self.tolerance)
            event = Event.from_body(body)
            # No timeout of our own here: each store bounds its operations (SQLite's busy
            # timeout, asyncpg's command and acquire timeouts) and raises StoreUnavailable.
            new = await self.store.accept(
                event, self.handlers.subscribers(event.type), now=_utcnow()
            )
        except WebhookError as exc:
            status, content, headers = error_parts(exc)
            outcome = exc.code
        except ClientGone:
            # The sender hung up mid-body: nothing was stored, nobody reads this answer.
            status, content, outcome = 400, b"", "client_disconnected"
        except Exception as exc:
            # A bug: still the envelope, never a bare 500 page (this route bypasses
            # Starlette's error middleware, see LacunaApp).
            logger.error("webhook.unhandled_error", exc_info=exc)
            status, content, headers = 500, _INTERNAL_ERROR, _JSON_HEADERS
            outcome = "internal_error"
        else:
            content = orjson.dumps({"received": True, "id": event.id, "duplicate": not new})
            outcome = "accepted" if new else "duplicate"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(content)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": content})
        elapsed = time.perf_counter() - started
        # Who sent a refused request (a forgery, a replay, a misconfigured sender): the peer
        # address, or the X-Forwarded-For client when the peer is in LACUNA_TRUSTED_PROXIES.
        client = _client_host(scope) if status != 200 else None
        self._log_request(status, outcome, event, elapsed, client)


class LacunaApp(Starlette):
    """Starlette, with ``POST /webhooks/lacuna`` served straight from the ASGI entry point.

    Every other path (and every other method on this one, for the 405) goes through
    Starlette's routing and middleware as usual. The webhook endpoint answers every
    outcome itself, bugs included, so it needs neither; skipping them is a measurable
    share of the per-request cost (``make bench``).
    """

    def __init__(self, *, webhook: WebhookEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            scope["app"] = self
            await self.webhook(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    handlers: HandlerSet | None = None,
    metrics: Metrics | None = None,
    dispatch: bool = True,
    runner: AttemptRunner | None = None,
) -> LacunaApp:
    """Build the application.

    When ``store`` is not given the app builds one from ``settings`` and owns
    it (opens it at startup, closes it at shutdown); a given store must be
    opened by the caller. With ``dispatch`` the lifespan runs the dispatcher (and retention)
    and, at shutdown, drains it within ``settings.shutdown_timeout_seconds``. ``runner`` runs
    the handlers' attempts: ``serve`` passes a ``WorkerPool`` (a worker process per handler);
    without one they run on the app's own loop, which is for tests only.
    """
    owns_store = store is None
    the_store = store or open_store(
        settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
    )
    the_handlers = handlers or HandlerSet({}, {}, {})
    the_metrics = metrics or Metrics()
    dispatch_service = build_dispatch(
        settings, the_store, the_handlers, metrics=the_metrics, runner=runner
    )
    dispatcher = dispatch_service.dispatcher

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    async def readyz(request: Request) -> Response:
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                await the_store.ping()
        except (StoreUnavailable, TimeoutError):
            return error_response(StoreUnavailable())
        return Response(b'{"status":"ready"}', media_type=JSON)

    async def metrics_endpoint(request: Request) -> Response:
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                stats = await the_store.stats(now=_utcnow())
            the_metrics.queue_depth.labels("due").set(stats.due)
            the_metrics.queue_depth.labels("running").set(stats.running)
            the_metrics.queue_depth.labels("waiting").set(
                max(0, stats.pending - stats.due - stats.running)
            )
            the_metrics.queue_depth.labels("dead").set(stats.dead)
            the_metrics.oldest_due_age.set(stats.oldest_due_age_seconds)
        return Response(the_metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return Response(
            error_body(
                codes.get(exc.status_code, "invalid_request"),
                str(exc.detail),
                error_type="invalid_request_error",
            ),
            status_code=exc.status_code,
            media_type=JSON,
            headers=exc.headers,
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        # Last resort: a bug must still answer with the envelope, never a bare 500 page.
        logger.error("http.unhandled_error", path=request.url.path, exc_info=exc)
        return Response(_INTERNAL_ERROR, status_code=500, media_type=JSON)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if owns_store:
            await the_store.open()
        task = asyncio.create_task(dispatch_service.run(), name="dispatch") if dispatch else None
        logger.info("serve.started", handlers=the_handlers.names)
        try:
            yield {}
        finally:
            if task is not None:
                await dispatch_service.stop(settings.shutdown_timeout_seconds)
                await task
            await the_handlers.aclose()
            if owns_store:
                await the_store.close()
            logger.info("serve.stopped")

    webhook = WebhookEndpoint(settings, the_store, the_handlers, the_metrics)
    app = LacunaApp(
        webhook=webhook,
        routes=[
            Route(WEBHOOK_PATH, webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.store = the_store
    app.state.dispatcher = dispatcher
    app.state.metrics = the_metrics
    app.state.handlers = the_handlers
    return app
