"""JSON request bodies of the admin API: bounded, an object, refused with the envelope.

``json_object(request)`` reads at most ``MAX_BODY_BYTES`` (a bigger ``Content-Length`` or
body is 413 ``body_too_large``), parses it, and returns the object; malformed JSON or
another JSON value is 400 ``invalid_json`` (a number past a double, ``1e400``, is valid
JSON: it is read as an infinity, and the field holding it refused by name). An empty body
is ``{}`` (every field of the admin's bodies is optional). A string anywhere in the body
(a value at any depth, or a key) holding NUL is 400 ``invalid_request`` naming its
top-level field: PostgreSQL's text cannot hold NUL, so no field the admin stores may
(checked here, once, for every body). Lone surrogates never get this far (the JSON parser
refuses them). ``only_fields`` checks that only known keys are present.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import orjson
from starlette.requests import Request

from ..intake import declared_length
from ..models import json_strings
from .responses import BadRequest

#: The largest admin request body, in bytes: the admin's bodies are a few names and filters.
MAX_BODY_BYTES = 64 * 1024


class BodyTooLarge(BadRequest):
    """A body over ``MAX_BODY_BYTES``: the app answers 413."""

    def __init__(self) -> None:
        super().__init__(
            f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="body_too_large"
        )


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object (``{}`` when empty); ``BadRequest`` / ``BodyTooLarge``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        length = declared_length(declared)  # leading zeros at any length: still a number
        if length is None:
            raise BadRequest("Content-Length is not a number.", code="invalid_request")
        if length > MAX_BODY_BYTES:
            raise BodyTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge()
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        value = _beyond_double(raw, exc)
    if not isinstance(value, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    for name, field in value.items():
        if _holds_nul(name) or _holds_nul(field):
            raise BadRequest(f"{name!r} must not contain a NUL character.", param=name)
    return value


def _beyond_double(raw: bytes, error: orjson.JSONDecodeError) -> Any:
    """The body orjson refused only because a number is past a double (``1e400``: valid
    JSON, RFC 8259 §6 leaves the range to the reader), parsed by the standard library, with
    that number as an infinity: the field holding it is then refused by name, as out of
    range (a time) or of the wrong kind, instead of the whole body as not JSON. Anything
    else orjson refuses stays ``invalid_json``, including what the standard library would
    take (lone surrogates, ``NaN``)."""
    invalid = BadRequest("The request body is not valid JSON.", code="invalid_json")
    if "infinity when parsed as double" not in str(error):
        raise invalid from None
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeError, RecursionError):
        raise invalid from None
    for text in json_strings(value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: orjson refuses it, so do we
            raise invalid from None
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _holds_nul(value: Any) -> bool:
    """A string of ``value`` (itself, a list item or an object key or value, at any depth)
    holds NUL. Iterative: the body is bounded in bytes, not in depth."""
    return any("\x00" in text for text in json_strings(value))


def only_fields(body: dict[str, Any], allowed: Iterable[str]) -> None:
    """``BadRequest`` naming the first key of ``body`` not in ``allowed``."""
    known = set(allowed)
    for name in body:
        if name not in known:
            raise BadRequest(f"Unknown field {name!r}.", param=name)


__all__ = ["MAX_BODY_BYTES", "BodyTooLarge", "json_object", "only_fields"]
