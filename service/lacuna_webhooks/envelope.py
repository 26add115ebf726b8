"""The error envelope of the Lacuna quickstart, as bytes ready for the wire (SPEC §3).

``{"error": {"type": "…", "code": "…", "message": "…", "param": null}}``: every
refusal the service sends, from the webhook route, the other routes and the
HTTP layer itself (``server.py``), has this shape.
"""

from __future__ import annotations

import orjson

from .errors import WebhookError

#: Seconds a sender is asked to wait before retrying a 503 (``Retry-After``).
RETRY_AFTER_SECONDS = 5
JSON_HEADERS = [(b"content-type", b"application/json")]
_RETRY_AFTER = (b"retry-after", str(RETRY_AFTER_SECONDS).encode())


def error_body(code: str, message: str, *, error_type: str, param: str | None = None) -> bytes:
    """The envelope's JSON bytes."""
    return orjson.dumps(
        {"error": {"type": error_type, "code": code, "message": message, "param": param}}
    )


def error_parts(exc: WebhookError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, envelope and headers of a refusal; a 503 also says when to retry."""
    headers = [*JSON_HEADERS, _RETRY_AFTER] if exc.status_code == 503 else JSON_HEADERS
    body = error_body(exc.code, exc.message, error_type=exc.error_type, param=exc.param)
    return exc.status_code, body, headers


INTERNAL_ERROR = error_body("internal_error", "Internal error.", error_type="api_error")
