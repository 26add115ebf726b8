"""The HTTP application: routes and lifespan.

``create_app(settings, store=..., handlers=...)`` returns a Starlette app whose
lifespan opens the store (when the app owns it) and runs the dispatcher. The
webhook route (``intake.py``) does only verification, parsing and one durable
``accept``: handler work never happens in a request. The other endpoints are
plain functions reading what they need from ``request.app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .config import Settings
from .dispatch.runner import AttemptRunner, InProcessRunner
from .dispatch.service import DispatchService, build_dispatch
from .envelope import INTERNAL_ERROR, error_body, error_parts
from .errors import StoreUnavailable, WebhookError
from .intake import WEBHOOK_PATH, WebhookEndpoint
from .metrics import CONTENT_TYPE, Metrics
from .plugins import HandlerSet
from .store import QueueStats, Store, open_store

if TYPE_CHECKING:
    from .tracing import Tracing

logger = structlog.get_logger("lacuna_webhooks.app")

PING_TIMEOUT_SECONDS = 2.0
JSON = "application/json"


def error_response(exc: WebhookError) -> Response:
    """``envelope.error_parts`` as a Starlette response, for the routes that are not the hot
    path."""
    status, body, headers = error_parts(exc)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def healthz(request: Request) -> Response:
    """Alive: 200 as long as the process answers."""
    return Response(b'{"status":"ok"}', media_type=JSON)


async def readyz(request: Request) -> Response:
    """200 while the store answers a ping within ``PING_TIMEOUT_SECONDS`` and the webhook
    route's commits do not fail (``WebhookEndpoint.writes_failing``), else 503."""
    if not await _ready(request.app):
        return error_response(StoreUnavailable())
    return Response(b'{"status":"ready"}', media_type=JSON)


async def _ready(app: Any) -> bool:
    webhook = getattr(app, "webhook", None)
    if webhook is not None and webhook.writes_failing():
        return False
    try:
        async with asyncio.timeout(PING_TIMEOUT_SECONDS):
            await app.state.store.ping()
    except (StoreUnavailable, TimeoutError):
        return False
    return True


async def metrics_endpoint(request: Request) -> Response:
    """The Prometheus text format; the readiness and queue gauges refreshed from the store.

    Two store calls per scrape, each bounded by ``PING_TIMEOUT_SECONDS``: ``ping`` (what
    ``/readyz`` answers) and ``stats`` (one grouped query over the open deliveries; done ones
    are never read). When the store does not answer, the queue gauges keep their last values
    and ``lacuna_webhooks_ready`` says 0.
    """
    state = request.app.state
    metrics: Metrics = state.metrics
    ready = await _ready(request.app)
    metrics.ready.set(1 if ready else 0)
    if ready:
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                stats = await state.store.stats(now=datetime.now(UTC), after=state.handlers.after)
        except (StoreUnavailable, TimeoutError):
            metrics.ready.set(0)
        else:
            _set_queue_gauges(metrics, stats, state.handlers.names)
    return Response(metrics.render(), media_type=CONTENT_TYPE)


def _set_queue_gauges(metrics: Metrics, stats: QueueStats, handlers: list[str]) -> None:
    """The outbox gauges, in total and per handler: every configured handler has its series
    (0 when it has nothing queued), and so has any other handler with open deliveries."""
    depth = metrics.queue_depth
    depth.labels("due").set(stats.due)
    depth.labels("running").set(stats.running)
    depth.labels("waiting").set(max(0, stats.pending - stats.due - stats.running))
    depth.labels("dead").set(stats.dead)
    metrics.oldest_due_age.set(stats.oldest_due_age_seconds)
    empty = QueueStats(0, 0, 0, 0, 0.0)
    by_handler = metrics.handler_queue_depth
    for name in sorted({*handlers, *stats.by_handler}):
        part = stats.by_handler.get(name, empty)
        by_handler.labels(name, "due").set(part.due)
        by_handler.labels(name, "running").set(part.running)
        by_handler.labels(name, "waiting").set(max(0, part.pending - part.due - part.running))
        by_handler.labels(name, "dead").set(part.dead)
        metrics.handler_oldest_due_age.labels(name).set(part.oldest_due_age_seconds)


async def http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and friends from Starlette's routing, in the envelope."""
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
    """Last resort: a bug must still answer with the envelope, never a bare 500 page."""
    logger.error("http.unhandled_error", path=request.url.path, exc_info=exc)
    return Response(INTERNAL_ERROR, status_code=500, media_type=JSON)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    """Open the store (when the app owns it), run the dispatcher; at shutdown drain it within
    ``LACUNA_SHUTDOWN_TIMEOUT``, close the handlers, then the store."""
    state = app.state
    if state.owns_store:
        await state.store.open()
    service: DispatchService = state.dispatch_service
    task = asyncio.create_task(service.run(), name="dispatch") if state.dispatch else None
    logger.info("serve.started", handlers=state.handlers.names)
    forced = False
    try:
        yield {}
    except asyncio.CancelledError:
        # uvicorn's force quit (a second Ctrl-C or SIGTERM during the drain) skips the
        # lifespan's shutdown, and the end of the event loop then cancels this task here: the
        # drain was cut short on purpose. Stop without waiting and say so in one line; a
        # CancelledError let out was logged by uvicorn as an error with a traceback.
        forced = True
    finally:
        # What the HTTP drain left of LACUNA_SHUTDOWN_TIMEOUT (serve notes when its stop
        # began): one bound for the whole stop, not one for each part in turn.
        timeout = state.settings.shutdown_timeout_seconds
        deadline = getattr(state, "stop_deadline", None)
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        with contextlib.suppress(asyncio.CancelledError) if forced else contextlib.nullcontext():
            if task is not None:
                await service.stop(0 if forced else timeout)
                await task
            await state.handlers.aclose()
            if state.owns_store:
                await state.store.close()
        if forced:
            logger.warning("serve.stopped", forced=True)
        else:
            logger.info("serve.stopped")


_WEBHOOK_TARGET = WEBHOOK_PATH.encode()


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
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH:
            if scope.get("raw_path", _WEBHOOK_TARGET) != _WEBHOOK_TARGET:
                # The server decoded the path: /webhooks%2Flacuna is another resource (RFC
                # 3986 §2.2), as /webhooks/lacuna/ is, and a proxy rule or ACL written for the
                # literal path would not see it. Routed as what it was sent as: a 404.
                scope["path"] = scope["raw_path"].decode("latin-1")
            elif scope["method"] == "POST":
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
    tracing: Tracing | None = None,
) -> LacunaApp:
    """Build the application.

    When ``store`` is not given the app builds one from ``settings`` and owns
    it (opens it at startup, closes it at shutdown); a given store must be
    opened by the caller. With ``dispatch`` the lifespan runs the dispatcher (and retention)
    and, at shutdown, drains it within ``settings.shutdown_timeout_seconds``. ``runner`` runs
    the handlers' attempts: ``serve`` passes a ``WorkerPool`` (a worker process per handler);
    without one they run on the app's own loop, which is for tests only. ``tracing``
    (``tracing_config.load_tracing``; ``None``: off) traces the webhook requests, their
    commits and, on the app's loop, the attempts (a ``WorkerPool``'s workers trace their own).
    ``app.state`` holds ``settings``, ``store``, ``handlers``, ``metrics``,
    ``dispatch_service`` and its ``dispatcher`` for the endpoints and the lifespan.
    """
    owns_store = store is None
    store = store or open_store(
        settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
    )
    handlers = handlers or HandlerSet({}, {}, {})
    metrics = metrics or Metrics()
    if tracing is None:
        webhook = WebhookEndpoint(settings, store, handlers, metrics)
    else:
        webhook = tracing.endpoint(settings, store, handlers, metrics)
        runner = runner or InProcessRunner(handlers, tracing=tracing)
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
    # "/webhooks/lacuna/" is not the webhook route: a 404 envelope, not a 307 to a URL built
    # from the Host header (SPEC §3 lists no redirect).
    app.router.redirect_slashes = False
    state = app.state
    state.settings, state.store, state.handlers, state.metrics = settings, store, handlers, metrics
    state.dispatch_service = build_dispatch(
        settings, store, handlers, metrics=metrics, runner=runner
    )
    state.dispatcher = state.dispatch_service.dispatcher
    state.owns_store, state.dispatch = owns_store, dispatch
    return app
