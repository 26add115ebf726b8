"""The CLI's client of a remote admin API (``--url``/``--token`` or ``LACUNA_ADMIN_URL`` /
``LACUNA_ADMIN_TOKEN``): JSON requests with the bearer token, and one-line errors.

Besides the generic ``request``, one method per operation the store commands share with
the API (``list_events``, ``get_event``, ``list_deliveries``, ``retry_dead``, ``handlers``,
``set_paused``): each checks the answer's shape and gives the store's own records
(``EventRecord``, ``DeliveryRecord``, ``AttemptRecord``), so that the CLI prints a remote
answer exactly as it prints what it reads from ``LACUNA_DATABASE_URL``. An answer of another
shape (a proxy's JSON, another service at that URL) is an ``AdminError``, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson

from ..models import AttemptOutcome, DeliveryStatus
from ..redact import redact_text, redact_url
from ..store.base import AttemptRecord, DeliveryRecord, EventRecord

E = TypeVar("E", bound=enum.Enum)

#: Seconds to wait for a connection and for each read of an ordinary (non-stream) request.
TIMEOUT_SECONDS = 30.0
#: Seconds to wait for the answer of a bulk operation (``POST /replays`` answers when the
#: whole operation is done: minutes for a few hundred thousand events).
BULK_TIMEOUT_SECONDS = 3600.0
#: The most bytes of an answer (as decoded) read before the request is given up: far more
#: than any answer of the API (an event of the largest ``LACUNA_MAX_BODY_BYTES``, 100 MiB,
#: escaped as a JSON string, with its deliveries), so that a server sending without end
#: (or a small compressed answer that inflates without end) cannot fill the memory.
MAX_ANSWER_BYTES = 256 * 1024 * 1024


class AdminError(Exception):
    """The admin API could not be reached or refused the request; ``str()`` is one line.
    ``status`` is the answer's HTTP status (``None`` when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


#: The most characters of a server's error text shown in an ``AdminError``.
MAX_SHOWN_CHARS = 300


def _one_line(text: str, token: str) -> str:
    """Text from the server, safe for one line of a terminal: ``token`` masked (a server, or
    a proxy in front of it, may echo the request's ``Authorization``), control characters
    (newlines, ESC) written as escapes, at most ``MAX_SHOWN_CHARS`` characters."""
    if token:
        text = text.replace(token, "***")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "…"


def _message(response: httpx.Response, body: bytes, token: str) -> str:
    try:
        error = orjson.loads(body)["error"]
        text = f"{error['code']}: {error['message']}"
        if not isinstance(error["code"], str) or not isinstance(error["message"], str):
            raise TypeError(text)
    except (ValueError, KeyError, TypeError):
        text = response.reason_phrase
    return f"{response.status_code} {_one_line(text, token)}"


def path_segment(text: str) -> str:
    """``text`` as one segment of a URL path: percent-encoded (an event id may hold ``/``,
    ``?`` or ``#``). A dots-only text (``.`` or ``..``) would be resolved away as a path
    segment by the HTTP client (RFC 3986 §5.2.4): each dot is sent as ``%2E``, which the
    server decodes as the id."""
    if text and set(text) == {"."}:
        return "%2E" * len(text)
    return quote(text, safe="")


class _Unexpected(Exception):
    """An answer that is not of the shape the API documents (docs/admin.md)."""


def _value(doc: Any, name: str) -> Any:
    if not isinstance(doc, dict) or name not in doc:
        raise _Unexpected(name)
    return doc[name]


def _str(doc: Any, name: str) -> str:
    value = _value(doc, name)
    if not isinstance(value, str):
        raise _Unexpected(name)
    return value


def _optional_str(doc: Any, name: str) -> str | None:
    return None if _value(doc, name) is None else _str(doc, name)


def _int(doc: Any, name: str) -> int:
    value = _value(doc, name)
    if not isinstance(value, int) or isinstance(value, bool):  # JSON true is no count
        raise _Unexpected(name)
    return value


def _count(doc: Any, name: str) -> int:
    value = _int(doc, name)
    if value < 0:
        raise _Unexpected(name)
    return value


def _bool(doc: Any, name: str) -> bool:
    value = _value(doc, name)
    if not isinstance(value, bool):
        raise _Unexpected(name)
    return value


def _time(doc: Any, name: str) -> datetime:
    """An RFC 3339 time of the answer, as an aware UTC datetime (as the store gives it)."""
    try:
        value = datetime.fromisoformat(_str(doc, name))
        if value.tzinfo is None:
            raise _Unexpected(name)
        return value.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01T00:00+01:00 in UTC
        raise _Unexpected(name) from None


def _optional_time(doc: Any, name: str) -> datetime | None:
    return None if _value(doc, name) is None else _time(doc, name)


def _choice(doc: Any, name: str, kind: type[E]) -> E:
    """A value of the enumeration ``kind`` (``DeliveryStatus``, ``AttemptOutcome``)."""
    try:
        return kind(_str(doc, name))
    except ValueError:
        raise _Unexpected(name) from None


def _list(doc: Any, name: str) -> list[Any]:
    value = _value(doc, name)
    if not isinstance(value, list):
        raise _Unexpected(name)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _json_text(doc: Any, name: str) -> bytes:
    """A body as received (``raw``): one JSON text, else ``_Unexpected``. ``events show
    --json`` embeds it as it is when orjson cannot read it (a number beyond a double), so
    text that is not one JSON value (``1, "forged": true``) would change the document
    printed. Read with the standard library's parser: numbers of any size are JSON."""
    text = _str(doc, name)
    try:
        json.loads(text, parse_int=len, parse_float=len, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _Unexpected(name) from None
    return text.encode()


def _page(answer: Any) -> tuple[list[Any], str | None]:
    """``(data, next_cursor)`` of a list answer (``{"data": [...], "next_cursor": …}``)."""
    return _list(answer, "data"), _optional_str(answer, "next_cursor")


def _event(doc: Any, raw: bytes, *, listed: bool = False) -> EventRecord:
    """``listed``: a listing's summary (no body; ``size`` from the document)."""
    return EventRecord(
        id=_str(doc, "id"),
        type=_str(doc, "type"),
        created=None if _value(doc, "created") is None else _int(doc, "created"),
        received_at=_time(doc, "received_at"),
        task_id=_optional_str(doc, "task_id"),
        superseded=_bool(doc, "superseded"),
        raw=raw,
        size=_count(doc, "size") if listed else -1,
    )


def _delivery(doc: Any) -> DeliveryRecord:
    result = _value(doc, "result")
    if result is not None and not isinstance(result, dict):
        raise _Unexpected("result")
    try:
        # Printed with orjson, which writes less depth than it reads: a result nested
        # deeper than it writes is none the service stored (it wrote each with orjson).
        orjson.dumps(result)
    except orjson.JSONEncodeError:
        raise _Unexpected("result") from None
    return DeliveryRecord(
        id=_int(doc, "id"),
        event_id=_str(doc, "event_id"),
        event_type=_str(doc, "event_type"),
        handler=_str(doc, "handler"),
        status=_choice(doc, "status", DeliveryStatus),
        attempts=_count(doc, "attempts"),
        next_attempt_at=_time(doc, "next_attempt_at"),
        lease_until=_optional_time(doc, "lease_until"),
        last_error=_optional_str(doc, "last_error"),
        created_at=_time(doc, "created_at"),
        updated_at=_time(doc, "updated_at"),
        result=result,
    )


def _attempt(doc: Any, delivery_id: int) -> AttemptRecord:
    return AttemptRecord(
        delivery_id=delivery_id,
        attempt=_count(doc, "attempt"),
        started_at=_time(doc, "started_at"),
        finished_at=_time(doc, "finished_at"),
        outcome=_choice(doc, "outcome", AttemptOutcome),
        error=_optional_str(doc, "error"),
    )


@dataclass(frozen=True, slots=True)
class HandlerInstance:
    """What the CLI shows of one entry of ``GET /handlers``: the instance, its kind, and its
    flow-control state (paused, why and since when; consecutive failed attempts)."""

    name: str
    kind: str
    paused: bool
    paused_reason: str | None
    paused_since: datetime | None
    consecutive_failures: int


def _handler(doc: Any) -> HandlerInstance:
    return HandlerInstance(
        name=_str(doc, "name"),
        kind=_str(doc, "kind"),
        paused=_bool(doc, "paused"),
        paused_reason=_optional_str(doc, "paused_reason"),
        paused_since=_optional_time(doc, "paused_since"),
        consecutive_failures=_count(doc, "consecutive_failures"),
    )


#: One event with its deliveries, each with its attempts (oldest first), as ``events show``
#: reads them from the store.
EventDetail = tuple[EventRecord, list[tuple[DeliveryRecord, list[AttemptRecord]]]]


class AdminClient:
    """An async client of ``<url>/api/v1``; use as ``async with AdminClient(url, token)``."""

    def __init__(self, url: str, token: str, *, timeout: float | None = None) -> None:
        """``timeout``: seconds, default ``TIMEOUT_SECONDS``."""
        self.base = url.rstrip("/") + "/api/v1"
        self._token = token
        timeout = TIMEOUT_SECONDS if timeout is None else timeout
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            headers={"authorization": f"Bearer {token}", "accept": "application/json"},
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
        )

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying client (for streaming requests), already carrying the token."""
        return self._client

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json: Any = None,
        read_timeout: float | None = None,
    ) -> Any:
        """The decoded JSON answer of ``method path``; ``AdminError`` for a refusal, a
        redirect or a failure to reach the API (the message never holds the token). The whole
        request, answer included, gets ``read_timeout`` seconds (else the client's): a server
        that sends its answer a byte at a time is given up on then too."""
        wait = self._timeout if read_timeout is None else read_timeout
        try:
            async with (
                asyncio.timeout(wait),
                self._client.stream(
                    method,
                    self.base + path,
                    params=params,
                    content=None if json is None else orjson.dumps(json),
                    headers=None if json is None else {"content-type": "application/json"},
                    timeout=httpx.Timeout(self._timeout, read=wait),
                ) as response,
            ):
                body = await self._body(response, method, path)
        except (TimeoutError, httpx.TimeoutException):
            raise AdminError(
                f"the admin API at {redact_url(self.base)} did not answer {method} {path}"
                f" within {wait:g} s"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # The URL shown without credentials, path or query (redact_url); the error
            # text can quote the URL too (an invalid one), so it is masked the same way.
            raise AdminError(
                f"cannot reach the admin API at {redact_url(self.base)}: "
                + _one_line(redact_text(str(exc) or type(exc).__name__), self._token)
            ) from None
        status = response.status_code
        if status >= 400:
            raise AdminError(
                f"the admin API refused {method} {path}: {_message(response, body, self._token)}",
                status=status,
            )
        if not 200 <= status < 300:
            # Never followed (the token would go along to wherever it points), nor taken
            # as the answer: --url names the listener itself.
            location = response.headers.get("location")
            to = f" to {_one_line(redact_url(location), self._token)}" if location else ""
            raise AdminError(
                f"the admin API answered {method} {path} with a redirect ({status}{to}), not"
                " followed: --url / LACUNA_ADMIN_URL must be the admin listener's own address",
                status=status,
            )
        try:
            return orjson.loads(body)
        except ValueError:
            raise AdminError(f"the admin API answered {method} {path} with non-JSON") from None

    async def _body(self, response: httpx.Response, method: str, path: str) -> bytes:
        """The answer's body, as decoded; ``AdminError`` past ``MAX_ANSWER_BYTES``."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise AdminError(
                    f"the admin API answered {method} {path} with more than"
                    f" {MAX_ANSWER_BYTES} bytes: stopped reading"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request(
            "GET", path, params={k: v for k, v in params.items() if v is not None}
        )

    async def post(self, path: str, json: Any = None, *, read_timeout: float | None = None) -> Any:
        return await self.request(
            "POST", path, json={} if json is None else json, read_timeout=read_timeout
        )

    # --- the operations the store commands share with the API ------------------------------

    @staticmethod
    @contextlib.contextmanager
    def _expecting(method: str, path: str) -> Iterator[None]:
        """An answer of another shape than the API's, read inside, is an ``AdminError``."""
        try:
            yield
        except _Unexpected:
            raise AdminError(
                f"the admin API answered {method} {path} with an unexpected answer"
            ) from None

    async def list_events(
        self, filters: Mapping[str, Any], *, cursor: str | None, limit: int
    ) -> tuple[list[EventRecord], str | None]:
        """One page of ``GET /events`` (``filters``: its query parameters, ``match`` a list)
        and its ``next_cursor``. A listing carries no bodies: each record's ``raw`` is
        empty. A search that stopped at the deployment's time budget gives fewer records
        (even none) and a cursor that resumes it."""
        answer = await self.get("/events", **filters, cursor=cursor, limit=limit)
        with self._expecting("GET", "/events"):
            data, next_cursor = _page(answer)
            return [_event(doc, b"", listed=True) for doc in data], next_cursor

    async def get_event(self, event_id: str) -> EventDetail:
        """``GET /events/{id}``: the event (``raw`` its body as received) and its deliveries,
        newest first as ``Store.list_deliveries`` gives them, each with its attempts."""
        path = "/events/" + path_segment(event_id)
        answer = await self.get(path)
        with self._expecting("GET", path):
            record = _event(answer, _json_text(answer, "raw"))
            deliveries = []
            for doc in _list(answer, "deliveries"):
                delivery = _delivery(doc)
                attempts = [_attempt(a, delivery.id) for a in _list(doc, "attempt_log")]
                deliveries.append((delivery, attempts))
        deliveries.sort(key=lambda found: found[0].id, reverse=True)
        return record, deliveries

    async def list_deliveries(
        self,
        *,
        status: str | None,
        handler: str | None,
        event_id: str | None,
        cursor: str | None,
        limit: int,
    ) -> tuple[list[DeliveryRecord], str | None]:
        """One page of ``GET /deliveries`` (newest first) and its ``next_cursor``."""
        answer = await self.get(
            "/deliveries",
            status=status,
            handler=handler,
            event_id=event_id,
            cursor=cursor,
            limit=limit,
        )
        with self._expecting("GET", "/deliveries"):
            data, next_cursor = _page(answer)
            return [_delivery(doc) for doc in data], next_cursor

    async def retry_dead(self, handler: str | None) -> int:
        """``POST /deliveries/retry-dead``: how many dead deliveries are due again."""
        path = "/deliveries/retry-dead"
        answer = await self.post(path, {} if handler is None else {"handler": handler})
        with self._expecting("POST", path):
            return _count(answer, "retried")

    async def handlers(self) -> list[HandlerInstance]:
        """``GET /handlers``: every configured instance, in ``LACUNA_HANDLERS`` order."""
        answer = await self.get("/handlers")
        with self._expecting("GET", "/handlers"):
            data, _ = _page(answer)
            return [_handler(doc) for doc in data]

    async def set_paused(self, name: str, paused: bool, *, reason: str | None = None) -> bool:
        """``POST /handlers/{name}/pause`` (with ``reason``) or ``/resume``: whether the
        state changed (``False``: it already was so)."""
        path = f"/handlers/{path_segment(name)}/{'pause' if paused else 'resume'}"
        answer = await self.post(path, {} if reason is None else {"reason": reason})
        with self._expecting("POST", path):
            if _bool(answer, "paused") is not paused:
                raise _Unexpected("paused")
            return _bool(answer, "changed")


__all__ = [
    "BULK_TIMEOUT_SECONDS",
    "MAX_ANSWER_BYTES",
    "TIMEOUT_SECONDS",
    "AdminClient",
    "AdminError",
    "EventDetail",
    "HandlerInstance",
    "path_segment",
]
