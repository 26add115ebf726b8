"""What an ``EventFilter`` means, as pure functions: the reference the SQL backends match.

``memory.py`` evaluates filters with these; ``sqlite/`` and ``postgres/`` translate the same
rules into their dialect's JSON functions, and the contract suite checks they agree.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

import orjson

from ..models import DeliveryStatus

#: ``EventFilter.status`` values: the stored statuses, and the three states of a pending one.
DELIVERY_STATES = ("pending", "due", "running", "waiting", "done", "dead")


def delivery_state(
    status: DeliveryStatus, next_attempt_at: datetime, lease_until: datetime | None, now: datetime
) -> set[str]:
    """Every ``DELIVERY_STATES`` name a delivery answers to at ``now``: ``pending`` and one
    of ``running`` (live lease), ``due`` (due, no live lease), ``waiting`` (not due yet);
    or ``done``; or ``dead``."""
    if status is not DeliveryStatus.PENDING:
        return {status.value}
    if lease_until is not None and lease_until > now:
        return {"pending", "running"}
    return {"pending", "due" if next_attempt_at <= now else "waiting"}


def field_at(payload: Any, path: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted path through JSON objects (no list indexing)."""
    value = payload
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def matches_value(value: Any, wanted: str) -> bool:
    """A ``match`` condition on one field: a string equal to ``wanted``, or a number,
    boolean or ``null`` whose JSON text equals it (``1`` matches ``1`` but not ``1.0``)."""
    if isinstance(value, str):
        return value == wanted
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return orjson.dumps(value).decode() == wanted
    return False


def encode_cursor(*parts: Any) -> str:
    """An opaque, URL-safe cursor holding ``parts`` (JSON values)."""
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    """The parts of ``encode_cursor``; ``ValueError`` when it is not one of ``arity`` parts."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        parts = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not a cursor this service made") from exc
    if not isinstance(parts, list) or len(parts) != arity:
        raise ValueError("not a cursor this service made")
    return parts


__all__ = [
    "DELIVERY_STATES",
    "decode_cursor",
    "delivery_state",
    "encode_cursor",
    "field_at",
    "matches_value",
]
