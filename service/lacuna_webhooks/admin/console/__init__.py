"""The HTML console (SPEC §9), served at ``/`` of the admin listener.

``routes(ctx)`` gives one ``Mount`` holding every console path (``pages.py`` the views,
``web.py`` sessions, CSRF, headers and Jinja2, ``present.py`` how stored values are shown,
``templates/`` and ``static/`` the files shipped inside the package). Every answer carries
a strict Content-Security-Policy; every page but sign-in needs the session cookie, and
every form that changes something a CSRF token. The admin app's auth middleware lets
non-``/api/v1`` paths through to here, so this package authenticates its own pages.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from ..context import AdminContext
from .pages import Console
from .web import ConsoleHeaders, action, current_session, page, render


def routes(ctx: AdminContext) -> list[BaseRoute]:
    """The console's routes, mounted at ``/``; they authenticate with the session cookie."""
    views = Console(ctx)

    async def home(request: Request) -> Response:
        return RedirectResponse("/events", status_code=303)

    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await render(
            request,
            "error.html",
            404,
            session=current_session(request, ctx),
            message="No such page.",
        )
        await response(scope, receive, send)

    router = Router(
        routes=[
            Route("/", home, methods=["GET"]),
            Route("/sign-in", views.sign_in, methods=["GET", "POST"]),
            Route("/sign-out", action(ctx, views.sign_out), methods=["POST"]),
            Route("/events", page(ctx, views.events, params=None), methods=["GET"]),
            Route("/event", page(ctx, views.event, params=["id", "done"]), methods=["GET"]),
            Route(
                "/event/replay",
                action(ctx, views.replay, required=["id"], optional=["handler"]),
                methods=["POST"],
            ),
            Route("/dead", page(ctx, views.dead, params=["handler", "done"]), methods=["GET"]),
            # One delivery (id and handler) or every dead one of one handler, never all.
            Route(
                "/dead/retry",
                action(ctx, views.retry, required=["handler"], optional=["id"]),
                methods=["POST"],
            ),
            Route("/handlers", page(ctx, views.handlers, params=["done"]), methods=["GET"]),
            Route(
                "/handlers/pause",
                action(ctx, views.pause, required=["name"]),
                methods=["POST"],
            ),
            Route(
                "/handlers/resume",
                action(ctx, views.resume, required=["name"]),
                methods=["POST"],
            ),
            Route("/tail", page(ctx, views.tail), methods=["GET"]),
            Route("/activity", page(ctx, views.activity), methods=["GET"]),
            Mount(
                "/static",
                app=StaticFiles(packages=[("lacuna_webhooks.admin.console", "static")]),
                name="static",
            ),
        ],
        default=not_found,
        # "/events/" is not a page: the 404 page, never a redirect built from the Host header.
        redirect_slashes=False,
    )
    return [Mount("", app=ConsoleHeaders(router))]


__all__ = ["routes"]
