"""JSON answers of the admin API: data as JSON, refusals in the error envelope (SPEC §3)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from ..envelope import error_body

JSON = "application/json"


def json_response(data: Any, status_code: int = 200) -> Response:
    """``data`` (datetimes as RFC 3339) as a JSON response."""
    return Response(
        orjson.dumps(data, option=orjson.OPT_UTC_Z), status_code=status_code, media_type=JSON
    )


def page_response(
    data: list[Any], next_cursor: str | None, *, complete: bool | None = None
) -> Response:
    """A list answer: ``{"data": [...], "next_cursor": "…" | null}`` (SPEC §9), plus
    ``"complete"`` when given (a search, which may stop at its time budget)."""
    body: dict[str, Any] = {"data": data, "next_cursor": next_cursor}
    if complete is not None:
        body["complete"] = complete
    return json_response(body)


def error_response(
    status_code: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    error_type: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> Response:
    """A refusal in the envelope."""
    return Response(
        error_body(code, message, error_type=error_type, param=param),
        status_code=status_code,
        media_type=JSON,
        headers=headers,
    )


def shutting_down(message: str) -> Response:
    """``503 shutting_down`` with ``Retry-After: 1``: ``serve`` stopping cut the request short
    (a bulk operation, a task wait); the client asks again."""
    return error_response(
        503, "shutting_down", message, error_type="api_error", headers={"retry-after": "1"}
    )


class BadRequest(Exception):
    """Raised by parameter parsing anywhere in a route; ``create_admin_app`` answers it with
    400 ``invalid_request`` naming ``param``."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class NotFound(Exception):
    """Raised by a route for a missing event, task or handler: 404 ``not_found``."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


__all__ = ["JSON", "BadRequest", "NotFound", "error_response", "json_response", "page_response"]
