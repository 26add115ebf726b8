"""The CLI's client of a remote admin API (``--url``/``--token`` or ``LACUNA_ADMIN_URL`` /
``LACUNA_ADMIN_TOKEN``): JSON requests with the bearer token, and one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from ..redact import redact_text, redact_url

#: Seconds to wait for a connection and for each read of an ordinary (non-stream) request.
TIMEOUT_SECONDS = 30.0
#: Seconds to wait for the answer of a bulk operation (``POST /replays`` answers when the
#: whole operation is done: minutes for a few hundred thousand events).
BULK_TIMEOUT_SECONDS = 3600.0


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


def _message(response: httpx.Response, token: str) -> str:
    try:
        error = orjson.loads(response.content)["error"]
        text = f"{error['code']}: {error['message']}"
        if not isinstance(error["code"], str) or not isinstance(error["message"], str):
            raise TypeError(text)
    except (ValueError, KeyError, TypeError):
        text = response.reason_phrase
    return f"{response.status_code} {_one_line(text, token)}"


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
        """The decoded JSON answer of ``method path``; ``AdminError`` for a refusal or a
        failure to reach the API (the message never holds the token). ``read_timeout``
        (seconds) replaces the client's for this request's wait for its answer."""
        timeout = httpx.Timeout(
            self._timeout, read=self._timeout if read_timeout is None else read_timeout
        )
        try:
            response = await self._client.request(
                method,
                self.base + path,
                params=params,
                content=None if json is None else orjson.dumps(json),
                headers=None if json is None else {"content-type": "application/json"},
                timeout=timeout,
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # The URL shown without credentials, path or query (redact_url); the error
            # text can quote the URL too (an invalid one), so it is masked the same way.
            raise AdminError(
                f"cannot reach the admin API at {redact_url(self.base)}: "
                + _one_line(redact_text(str(exc)), self._token)
            ) from None
        if response.status_code >= 400:
            raise AdminError(
                f"the admin API refused {method} {path}: {_message(response, self._token)}",
                status=response.status_code,
            )
        try:
            return orjson.loads(response.content)
        except ValueError:
            raise AdminError(f"the admin API answered {method} {path} with non-JSON") from None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request(
            "GET", path, params={k: v for k, v in params.items() if v is not None}
        )

    async def post(self, path: str, json: Any = None, *, read_timeout: float | None = None) -> Any:
        return await self.request(
            "POST", path, json={} if json is None else json, read_timeout=read_timeout
        )


__all__ = ["BULK_TIMEOUT_SECONDS", "TIMEOUT_SECONDS", "AdminClient", "AdminError"]
