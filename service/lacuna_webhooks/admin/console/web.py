"""The console's web plumbing: Jinja2 (the one module that imports it), the security headers
of every console answer, the session and CSRF checks, and form parsing.

Every page is rendered with autoescaping on (``.html`` templates and strings alike), so a
value from an event can only ever be text. URLs are built with ``url()``, which
percent-encodes every query value; templates never concatenate one by hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import jinja2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...config import Secret
from ...errors import StoreUnavailable
from .. import offload
from ..auth import SESSION_COOKIE, csrf_ok, csrf_token, session_token
from ..context import AdminContext
from ..filters import only_params
from ..responses import BadRequest
from .present import as_text, shown

#: The console's Content-Security-Policy: only its own files, no inline script or style.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: The headers of every console answer (``ConsoleHeaders``; ``app.LastResort`` adds them to an
#: answer given before the console's middleware, such as a bad query string's).
CONSOLE_HEADERS = _HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
#: A form with more fields than this is refused as too large (413).
MAX_FORM_FIELDS = 100
#: A form body larger than this is refused (413): console forms hold a few short fields.
MAX_FORM_BYTES = 64 * 1024

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("lacuna_webhooks.admin.console", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def url(path: str, params: Mapping[str, Any] | None = None) -> str:
    """``path`` with ``params`` as its query string (``None`` and ``""`` values left out,
    lists repeated), every value percent-encoded."""
    pairs: list[tuple[str, str]] = []
    for name, value in (params or {}).items():
        values = value if isinstance(value, list | tuple) else [value]
        pairs.extend((name, str(v)) for v in values if v is not None and v != "")
    return path + ("?" + urlencode(pairs) if pairs else "")


_env.globals["url"] = url
_env.filters["text"] = as_text  # form values: posted back exactly
_env.filters["shown"] = shown  # what is displayed: invisible characters as escapes


class ConsoleHeaders:
    """ASGI middleware adding the CSP and framing headers to every console answer, and
    answering Starlette's own refusals (405 for a wrong method) with the HTML error page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except HTTPException as exc:
            if started:
                raise
            page = await render(
                Request(scope, receive),
                "error.html",
                exc.status_code,
                message=str(exc.detail),
                headers=dict(exc.headers or {}),
            )
            await page(scope, receive, send_with_headers)


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in console user: the cookie, the token that signed it, its CSRF token."""

    cookie: str
    token: Secret
    csrf: str


def current_session(request: Request, ctx: AdminContext) -> Session | None:
    """The request's valid session, else ``None``."""
    cookie = request.cookies.get(SESSION_COOKIE)
    token = session_token(cookie, ctx.settings.admin_tokens)
    if cookie is None or token is None:
        return None
    return Session(cookie, token, csrf_token(cookie, token))


#: CPU-heavy console work (templates, pretty-printing a megabyte payload) runs on threads,
#: one at a time, never on the event loop that the webhook route shares.
_OFF_LOOP = asyncio.Semaphore(1)
T = TypeVar("T")


async def off_loop(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on a worker thread (one console thread at a time), so the event
    loop, which also serves the webhook route in ``serve``, keeps answering meanwhile."""
    async with _OFF_LOOP:
        return await asyncio.to_thread(work, *args)


async def heavy(size: int, work: Callable[..., T], *args: Any) -> T:
    """``off_loop(work, *args)``, or in the helper process when ``work`` parses ``size``
    bytes of bodies or more (``offload.INLINE_BYTES``): a thread holds the GIL while a
    large body is parsed, and the webhook route waited with it."""
    if size >= offload.INLINE_BYTES:
        return await offload.run(size, work, *args)
    return await off_loop(work, *args)


def _render_bytes(template: str, values: dict[str, Any]) -> bytes:
    # Lone surrogates cannot be encoded: they become "?" rather than an error.
    return _env.get_template(template).render(**values).encode("utf-8", "replace")


async def render(
    request: Request,
    template: str,
    status_code: int = 200,
    *,
    session: Session | None = None,
    headers: Mapping[str, str] | None = None,
    **values: Any,
) -> Response:
    """``template`` rendered with ``values`` (and ``session``, ``path``) as an HTML answer,
    on a worker thread (``off_loop``)."""
    body = await off_loop(
        _render_bytes, template, {"session": session, "path": request.url.path, **values}
    )
    return Response(
        body,
        status_code=status_code,
        media_type="text/html; charset=utf-8",
        headers=dict(headers or {}),
    )


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a console path of this site, else ``/events``."""
    if (
        value
        and value.startswith("/")
        and not value.startswith(("//", "/\\", "/api/"))
        and not any(c.isspace() or ord(c) < 32 for c in value)
        and not urlsplit(value).netloc
    ):
        return value
    return "/events"


def to_sign_in(request: Request) -> Response:
    """303 to the sign-in page, coming back to this page afterwards."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(url("/sign-in", {"next": here}), status_code=303)


async def read_form(request: Request) -> dict[str, list[str]] | None:
    """An ``application/x-www-form-urlencoded`` body as lists of values, or ``None`` when it
    is larger than ``MAX_FORM_BYTES`` or holds more than ``MAX_FORM_FIELDS`` fields."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FORM_BYTES:
            return None
    form: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        )
    except ValueError:  # "Max number of fields exceeded": a 500 with a traceback before
        return None
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from this site's own pages. The browser's
    ``Sec-Fetch-Site`` says so when sent (Chromium, Firefox); else an ``Origin`` naming
    another host refuses it (``Origin: null``, which the console's no-referrer policy
    makes browsers send, proves nothing either way). The CSRF token is the real check;
    this one refuses a cross-site post before its body is read."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        return fetch_site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    try:
        return urlsplit(origin).netloc == request.headers.get("host", "")
    except ValueError:
        return False


Endpoint = Callable[[Request], Awaitable[Response]]
PageView = Callable[[Request, Session], Awaitable[Response]]
ActionView = Callable[[Request, Session, dict[str, list[str]]], Awaitable[Response]]


def _holds_nul(values: Iterable[str]) -> bool:
    return any("\x00" in value for value in values)


async def _nul_refused(request: Request, session: Session) -> Response:
    # No id, handler or text the console looks up or stores can hold NUL (the API refuses
    # it too: admin/bodies.py); PostgreSQL cannot even take it as a parameter (a 503 before).
    return await render(
        request,
        "error.html",
        400,
        session=session,
        message="A value in this request holds a NUL character.",
    )


def page(ctx: AdminContext, view: PageView, params: Iterable[str] | None = ()) -> Endpoint:
    """A ``GET`` page: signed-in users only (else 303 to the sign-in page); a query value
    holding NUL is a 400 page. Its query takes ``params``, each once (``None``: the view
    checks its own query); any other parameter, or one given twice, is the 400 page with
    the API's message (``filters.only_params``)."""
    allowed = None if params is None else tuple(params)

    async def endpoint(request: Request) -> Response:
        session = current_session(request, ctx)
        if session is None:
            return to_sign_in(request)
        if _holds_nul(v for _, v in request.query_params.multi_items()):
            return await _nul_refused(request, session)
        if allowed is not None:
            try:
                only_params(request.query_params, allowed)
            except BadRequest as exc:
                return await render(
                    request, "error.html", 400, session=session, message=exc.message
                )
        try:
            return await view(request, session)
        except StoreUnavailable:
            return await unavailable(request, session)

    return endpoint


def form_problem(
    form: Mapping[str, list[str]], required: Iterable[str], optional: Iterable[str] = ()
) -> str | None:
    """What is wrong with a form's fields, else ``None``: a field it does not take, one
    given twice, or a ``required`` one missing or empty. A console form names exactly what
    it acts on, so a form that says less (no handler: every handler?) or more (two names:
    which one?) is refused, never read as the widest or the last."""
    needed = tuple(required)
    known = {*needed, *optional}
    for name, values in form.items():
        if name not in known:
            return f"This form does not take a field {name!r}."
        if len(values) > 1:
            return f"The field {name!r} is given more than once."
    for name in needed:
        if field(form, name) is None:
            return f"This form needs the field {name!r}."
    return None


def action(
    ctx: AdminContext,
    view: ActionView,
    *,
    required: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> Endpoint:
    """A state-changing ``POST``: signed-in users only (else 303 to sign-in), from this
    site (else 403), with the session's CSRF token in the form's ``csrf`` field (else
    403), and a small body (else 413) without NUL in a value, its query's included (else
    400). Its fields are ``csrf``, the ``required`` ones and the ``optional`` ones, each
    at most once, and no query string (else the 400 page, ``form_problem``): nothing is
    written for a form the console's pages never send."""
    needed = tuple(required)
    allowed = ("csrf", *optional)

    async def endpoint(request: Request) -> Response:
        session = current_session(request, ctx)
        if session is None:
            return to_sign_in(request)
        if not same_origin(request):
            return await forbidden(request, session, "This form was sent from another site.")
        form = await read_form(request)
        if form is None:
            return await render(
                request, "error.html", 413, session=session, message="Form too large."
            )
        presented = form.get("csrf", [None])[-1]
        if not csrf_ok(session.cookie, session.token, presented):
            return await forbidden(request, session, "The form's CSRF token is missing or stale.")
        if _holds_nul(v for values in form.values() for v in values) or _holds_nul(
            v for _, v in request.query_params.multi_items()
        ):
            return await _nul_refused(request, session)
        problem = form_problem(form, needed, allowed)
        if problem is None and request.url.query:
            problem = "This form takes no query string."
        if problem is not None:
            return await render(request, "error.html", 400, session=session, message=problem)
        try:
            return await view(request, session, form)
        except StoreUnavailable:
            return await unavailable(request, session)

    return endpoint


async def forbidden(request: Request, session: Session | None, message: str) -> Response:
    """The 403 page."""
    return await render(
        request,
        "error.html",
        403,
        session=session,
        message=message + " Reload the page and try again.",
    )


async def unavailable(request: Request, session: Session | None) -> Response:
    """The 503 page: the store did not answer."""
    return await render(
        request,
        "error.html",
        503,
        session=session,
        message="The event store is unavailable right now; try again in a moment.",
        headers={"retry-after": "5"},
    )


def field(form: Mapping[str, list[str]], name: str) -> str | None:
    """The last value of a form field, ``None`` when absent or empty."""
    values = form.get(name) or []
    return values[-1] if values and values[-1] != "" else None


__all__ = [
    "CONSOLE_HEADERS",
    "CSP",
    "ConsoleHeaders",
    "Session",
    "action",
    "current_session",
    "field",
    "forbidden",
    "form_problem",
    "off_loop",
    "page",
    "read_form",
    "render",
    "safe_next",
    "same_origin",
    "to_sign_in",
    "unavailable",
    "url",
]
