"""The admin application: authentication, the error envelope, and every area's routes.

``create_admin_app(ctx)`` returns a Starlette app that shares the process and the store of
``serve`` but none of the webhook route's path: it is served by a listener of its own
(``serve_admin`` in ``cli.py``). Every ``/api/v1`` request needs a bearer token (SPEC §9);
a console session cookie also admits ``GET``/``HEAD`` (the console's live tail uses
``EventSource``, which cannot send headers). A credential in the query string is refused
before anything else.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
import structlog
from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import StoreUnavailable
from . import api_bulk, api_events, api_live, console, openapi
from .auth import (
    SESSION_COOKIE,
    TOKEN_QUERY_NAMES,
    bearer_token,
    matching_token,
    session_token,
)
from .console.web import CONSOLE_HEADERS
from .context import AdminContext
from .responses import BadRequest, NotFound, error_response, json_response

logger = structlog.get_logger("lacuna_webhooks.admin")

API_PREFIX = "/api/v1"
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]

#: The headers of the answers the HTTP layer gives the admin listener's clients itself (a 431,
#: a 408, a malformed request), before any route or middleware: what every answer of the app
#: carries (``no-store``, and the console's CSP and framing headers, harmless on JSON).
REFUSAL_HEADERS = [*_SECURITY_HEADERS, *CONSOLE_HEADERS]


def is_api_path(path: str) -> bool:
    """Whether ``path`` is the JSON API's; every other path of the admin listener is the
    console's."""
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


class AdminAuth:
    """ASGI middleware: refuse credentials in the query string (400), require a valid bearer
    token (or, for reads, a console session) under ``/api/v1`` (401), and add headers that
    keep answers out of caches."""

    def __init__(self, app: ASGIApp, ctx: AdminContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None and not is_api_path(scope["path"]):
            # A console page asked for: the HTML error page (the console's headers are
            # added by LastResort), not the API's envelope.
            request = Request(scope, receive)
            message = orjson.loads(bytes(refusal.body))["error"]["message"]
            refusal = await console.web.render(
                request,
                "error.html",
                refusal.status_code,
                session=console.web.current_session(request, self.ctx),
                message=message,
            )
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> Response | None:
        try:
            # Strict: Starlette would turn %FF into U+FFFD and search for that instead.
            pairs = parse_qsl(
                scope.get("query_string", b"").decode("latin-1"),
                keep_blank_values=True,
                errors="strict",
            )
        except UnicodeDecodeError:
            return error_response(
                400, "invalid_request", "The query string is not valid UTF-8 once decoded."
            )
        query = QueryParams(pairs)
        if any(name.lower() in TOKEN_QUERY_NAMES for name in query):
            return error_response(
                400,
                "token_in_query",
                "Send the admin token in the Authorization header, never in the URL.",
            )
        if not is_api_path(scope["path"]):
            return None  # the console authenticates its own pages
        headers = Headers(scope=scope)
        if len(headers.getlist("authorization")) > 1:
            # Which one would count? Proxies and frameworks disagree: refuse the ambiguity.
            return error_response(
                400,
                "invalid_request",
                "Send exactly one Authorization header.",
                param="authorization",
            )
        tokens = self.ctx.settings.admin_tokens
        presented = bearer_token(headers.get("authorization"))
        if presented is not None and matching_token(presented, tokens) is not None:
            return None
        if scope["method"] in ("GET", "HEAD") and presented is None:
            cookie = Request(scope).cookies.get(SESSION_COOKIE)
            if session_token(cookie, tokens) is not None:
                return None
        return error_response(
            401,
            "unauthorized",
            "A valid admin token is required: Authorization: Bearer <LACUNA_ADMIN_TOKEN>.",
            error_type="authentication_error",
            headers={"www-authenticate": "Bearer"},
        )


class LastResort:
    """ASGI middleware, outermost: a bug answers one 500 envelope and logs one line with its
    traceback (Starlette's own last-resort handler re-raises, so the server logged every
    such error a second time); a client that went away mid-request is not an error at all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        console_path = not is_api_path(scope.get("path", ""))

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # Every answer carries no-store and nosniff, and every console answer its CSP
                # and framing headers, also one answered before the inner middleware (a bad
                # query string) or by this one (a bug's 500).
                wanted = REFUSAL_HEADERS if console_path else _SECURITY_HEADERS
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in wanted if k not in present]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception as exc:
            logger.error("admin.unhandled_error", path=scope.get("path"), exc_info=exc)
            if not started:
                response = error_response(
                    500, "internal_error", "Internal error.", error_type="api_error"
                )
                await response(scope, receive, watched_send)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    status = 413 if exc.code == "body_too_large" else 400
    return error_response(status, exc.code, exc.message, param=exc.param)


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreUnavailable)
    return error_response(
        503,
        "store_unavailable",
        exc.message,
        error_type="api_error",
        headers={"retry-after": "1"},
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotFound)
    return error_response(404, "not_found", exc.message, param=exc.param)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "invalid_request"),
        str(exc.detail),
        headers=dict(exc.headers or {}),
    )


def create_admin_app(ctx: AdminContext) -> Starlette:
    """The admin app over ``ctx`` (its store already open; the app never opens or closes
    it). ``app.state.ctx`` holds the context."""
    areas: list[Any] = [api_events, api_bulk, api_live]
    document = openapi.document(*(area.PATHS for area in areas))

    async def openapi_json(request: Request) -> Response:
        return json_response(document)

    api_routes = [route for area in areas for route in area.routes(ctx)]
    api_routes.append(Route("/openapi.json", openapi_json, methods=["GET"]))
    app = Starlette(
        routes=[
            Mount(API_PREFIX, app=Router(api_routes, redirect_slashes=False)),
            *console.routes(ctx),
        ],
        exception_handlers={
            BadRequest: _bad_request,
            NotFound: _not_found,
            StoreUnavailable: _store_unavailable,
            HTTPException: _http_error,
        },
    )
    # "/events/" is not "/events": a 404 envelope, not a redirect to a URL nobody asked for.
    app.router.redirect_slashes = False
    app.add_middleware(AdminAuth, ctx=ctx)
    app.add_middleware(LastResort)  # added last: outermost of the app's own middleware
    app.state.ctx = ctx
    app.state.openapi = document
    return app


__all__ = ["API_PREFIX", "REFUSAL_HEADERS", "AdminAuth", "create_admin_app", "is_api_path"]
