"""The ``http`` handler: forwards each event to the team's own service, signed (SPEC §7).

Settings (``LACUNA_<NAME>_*``, so ``LACUNA_HTTP_*`` for the plain ``http`` handler):

- ``URL`` (required): where to POST. The operator's own endpoint, so ``http://``
  and private or loopback addresses are allowed; the outbound SSRF rules of
  ``_http`` are for URLs taken from events. Redirects are never followed.
- ``SECRET`` (required): Standard Webhooks secret(s) ``whsec_<base64>``,
  comma-separated while the receiver rotates (one signature each).
- ``HEADERS``: extra headers as a JSON object of strings, e.g.
  ``{"Authorization": "Bearer …"}``; it cannot replace the signature headers,
  ``content-type`` or the ``lacuna-*`` headers.
- ``PAYLOAD``: ``event`` (default: the event's bytes exactly as Lacuna sent
  them) or ``enriched`` (``{"event": <event>, "results": {"<handler>": <result or
  null>}}``, one key per handler in ``LACUNA_<NAME>_AFTER``, read from
  ``current_results``; ``{}`` without AFTER).
- ``TIMEOUT``, ``CONNECT_TIMEOUT``, ``READ_TIMEOUT``: as for every handler.

Each attempt is a ``POST`` with ``content-type: application/json`` and the
Standard Webhooks headers ``webhook-id`` (the event id, the same on every
attempt), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature``, plus ``lacuna-event-type`` and ``lacuna-attempt``; while tracing is
on, ``traceparent`` (W3C Trace Context: the attempt's span, in the trace of the request that
received the event; docs/observability.md).

Outcomes: 2xx done; 429 (``RateLimited``: not counted against the attempt budget, see
docs/delivery.md) and 503 are retried after their ``Retry-After`` (held
within the retry policy's base delay and cap by ``RetryPolicy``); 408, 425,
other 429/5xx, timeouts and connection errors are retried on the schedule; a
redirect and any other 4xx are permanent (the delivery is dead); 410 raises
``PauseHandler``: dead, and the handler paused (docs/flow-control.md).

The secret and the URL's credentials, path and query are never logged.
"""

from __future__ import annotations

import functools
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import structlog

from ..config import http_url_problem
from ..errors import ConfigError, PauseHandler, PermanentError, RateLimited, RetryLater
from ..models import Event
from ..redact import header_secrets, remember_secrets, url_secrets
from ..signature import signed_headers, standard_webhooks_key
from ._common import Problems, network_timeouts, peer_text
from ._http import OutboundClient, retry_after_seconds, transport_failure
from .base import HandlerContext, current_attempt, current_results, current_traceparent

logger = structlog.get_logger("lacuna_webhooks.handlers.http")

PAYLOADS = ("event", "enriched")
# Headers the handler owns: an extra header may not replace them (case-insensitive).
RESERVED_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "lacuna-event-type",
        "lacuna-attempt",
    }
)
RETRIED_STATUSES = frozenset({408, 425, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})
# RFC 9110 token characters for a header name; values may hold neither CR, LF nor NUL.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FALLBACK_ATTEMPTS_MAX = 10_000


def where(url: httpx.URL) -> str:
    """``scheme://host[:port]/…``: names the endpoint without userinfo, path or query."""
    host = f"[{url.host}]" if ":" in url.host else url.host  # an IPv6 literal keeps its brackets
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{host}{port}/…"


def parse_url(value: str, var: str) -> httpx.URL:
    """``LACUNA_<NAME>_URL``: an http(s) URL with a host and a port from 1 to 65535
    (``config.http_url_problem``); ``ConfigError`` naming ``var``."""
    problem = http_url_problem(value)
    if problem is not None:
        raise ConfigError(f"{var} {problem}")
    try:
        return httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        raise ConfigError(f"{var} is not a valid URL") from None


def parse_secrets(value: str, var: str) -> tuple[bytes, ...]:
    """``LACUNA_<NAME>_SECRET``: comma-separated ``whsec_<base64>`` -> HMAC keys."""
    keys: list[bytes] = []
    items = [item.strip() for item in value.split(",") if item.strip()]
    for position, item in enumerate(items, start=1):
        try:
            keys.append(standard_webhooks_key(item))
        except ValueError as exc:
            which = f" (item {position} of {len(items)})" if len(items) > 1 else ""
            raise ConfigError(f"{var}{which} {exc}") from None
    if not keys:
        raise ConfigError(f"{var} names no secret")
    return tuple(keys)


def parse_headers(value: str | None, var: str) -> dict[str, str]:
    """``LACUNA_<NAME>_HEADERS``: a JSON object of string -> string; ``ConfigError`` otherwise.

    Names must be HTTP tokens, values free of CR/LF/NUL, and none of
    ``RESERVED_HEADERS`` may be given. Values are never shown in an error.
    """
    if value is None:
        return {}
    try:
        parsed: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise ConfigError(
            f'{var} must be a JSON object such as {{"Authorization": "Bearer …"}}'
        ) from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{var} must be a JSON object of header name to value")
    headers: dict[str, str] = {}
    for name, header_value in parsed.items():
        if not _HEADER_NAME_RE.match(name):
            raise ConfigError(f"{var}: {name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError(
                f"{var} cannot set {name!r}: the http handler sets it itself "
                "(the Standard Webhooks signature headers, content-type and lacuna-*)"
            )
        if not isinstance(header_value, str):
            raise ConfigError(f"{var}: the value of {name!r} must be a string")
        if any(c in header_value for c in "\r\n\0"):
            raise ConfigError(f"{var}: the value of {name!r} must not contain line breaks")
        if not (header_value.isascii() and header_value.isprintable()):
            # Sent as is, no request could be built: every attempt failed, then died.
            raise ConfigError(
                f"{var}: the value of {name!r} must be printable ASCII (an HTTP header value)"
            )
        headers[name] = header_value
    return headers


def enriched_body(event: Event, results: dict[str, Any]) -> bytes:
    """``{"event": <event>, "results": {...}}`` with the event's bytes embedded as received."""
    return b'{"event":' + event.raw + b',"results":' + orjson.dumps(results) + b"}"


class HTTPHandler:
    """Forwards each event to ``LACUNA_<NAME>_URL`` (see the module docstring).

    ``clock`` (Unix seconds) is what ``webhook-timestamp`` is read from; tests inject it.
    """

    name = "http"
    events: frozenset[str] | None = None  # forward every type unless LACUNA_<NAME>_EVENTS says

    def __init__(self, ctx: HandlerContext, *, clock: Callable[[], float] = time.time) -> None:
        self.name = ctx.name
        self.url_var = ctx.env_name("URL")
        problems = Problems()  # every bad setting at once, not the first
        url_text = problems.read(functools.partial(ctx.require, "URL"))
        url = None
        if url_text is not None:
            url = problems.read(functools.partial(parse_url, url_text, self.url_var))
        if url_text is not None and url is not None:
            # forwarding.md: the URL's credentials, path and query are never shown (only
            # `where`). A peer that echoes the request line or its headers in its refusal
            # put them in the error text: the password as the `Basic` token the client
            # sends it as.
            remember_secrets([*url_secrets(url_text, secret_path=True), url.query.decode()])
        keys = problems.read(lambda: parse_secrets(ctx.require("SECRET"), ctx.env_name("SECRET")))
        extra_headers = problems.read(
            lambda: parse_headers(ctx.get("HEADERS"), ctx.env_name("HEADERS"))
        )
        # Their values are never shown either (API keys, `Bearer <token>`): as serve and the
        # workers remember them from the environment, for a handler built elsewhere too.
        remember_secrets(header_secrets(ctx.get("HEADERS")))
        # The client sends the URL's user and password as `Authorization: Basic …`, which
        # would replace an Authorization of HEADERS without a word: refused.
        if (
            url is not None
            and extra_headers is not None
            and url.userinfo
            and any(name.lower() == "authorization" for name in extra_headers)
        ):
            problems.lines.append(
                f"{self.url_var} has a user and password, which are sent as an "
                f"Authorization header, and {ctx.env_name('HEADERS')} sets Authorization "
                "too: give the credentials in one of them"
            )
        payload = (ctx.get("PAYLOAD") or "event").lower()
        if payload not in PAYLOADS:
            problems.lines.append(
                f"{ctx.env_name('PAYLOAD')} must be one of {', '.join(PAYLOADS)}, got {payload!r}"
            )
        timeouts = problems.read(functools.partial(network_timeouts, ctx))
        problems.check()
        assert url is not None
        assert keys is not None
        assert extra_headers is not None
        assert timeouts is not None
        self.url, self.keys, self.extra_headers = url, keys, extra_headers
        self.where = where(self.url)
        self.payload = payload
        self.clock = clock
        connect_seconds, read_seconds = timeouts
        # The URL is the operator's own (SPEC §7): private addresses and http are allowed, so
        # the public-only transport is not used; redirects are still never followed.
        self.http = OutboundClient(
            allow_private=True,
            connect_timeout_seconds=connect_seconds,
            read_timeout_seconds=read_seconds,
        )
        self._what = f"{self.url_var} ({self.where})"
        # Used only when the dispatcher does not say which attempt this is (current_attempt).
        self._fallback_attempts: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        return f"HTTPHandler(name={self.name!r}, url={self.where!r}, payload={self.payload!r})"

    def _attempt(self, event_id: str) -> int:
        known = current_attempt.get()
        if known is not None:
            return known
        count = self._fallback_attempts.pop(event_id, 0) + 1
        self._fallback_attempts[event_id] = count
        if len(self._fallback_attempts) > _FALLBACK_ATTEMPTS_MAX:
            self._fallback_attempts.popitem(last=False)
        return count

    def request(self, event: Event, *, attempt: int) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one attempt (signed at ``clock()``)."""
        body = (
            event.raw
            if self.payload == "event"
            else enriched_body(event, dict(current_results.get() or {}))
        )
        timestamp = int(self.clock())
        headers = dict(self.extra_headers)
        headers.update(signed_headers(event.id, event.type, body, self.keys, timestamp))
        headers["lacuna-attempt"] = str(attempt)
        traceparent = current_traceparent.get()
        if traceparent is not None:  # tracing on: the receiver's spans join the event's trace
            headers["traceparent"] = traceparent
        return body, headers

    async def handle(self, event: Event) -> None:
        attempt = self._attempt(event.id)
        body, headers = self.request(event, attempt=attempt)
        try:
            response, text = await self.http.post(
                str(self.url), what=self._what, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise transport_failure(exc, what=f"POST to {self.where}", url=str(self.url)) from None
        status = response.status_code
        if 200 <= status < 300:
            self._fallback_attempts.pop(event.id, None)
            logger.info(
                "handler.http.delivered",
                handler=self.name,
                event_id=event.id,
                status=status,
                url=self.where,
                attempt=attempt,
            )
            return
        reason = peer_text(text, 200) or response.reason_phrase
        logger.warning(
            "handler.http.refused",
            handler=self.name,
            event_id=event.id,
            status=status,
            reason=reason,
            url=self.where,
            attempt=attempt,
        )
        summary = f"{self.where} answered HTTP {status}: {reason}"
        if status in RETRY_AFTER_STATUSES:
            delay = retry_after_seconds(
                response.headers.get("retry-after"), date=response.headers.get("date")
            )
            if status == 429:
                raise RateLimited(summary, delay_seconds=delay)  # not counted: docs/delivery.md
            raise RetryLater(summary, delay_seconds=delay)
        if status in RETRIED_STATUSES or status >= 500:
            raise RetryLater(summary)
        if 300 <= status < 400:
            raise PermanentError(
                f"{self.where} answered HTTP {status}, a redirect, which is never followed: "
                f"point {self.url_var} at the final URL"
            )
        if status == 410:
            raise PauseHandler(f"{self.where} answered HTTP 410: the endpoint is gone")
        raise PermanentError(summary)

    async def aclose(self) -> None:
        await self.http.aclose()


__all__ = ["HTTPHandler", "enriched_body", "parse_headers", "parse_secrets", "parse_url", "where"]
