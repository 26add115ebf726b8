"""What an ``EventFilter`` means, as pure functions: the reference the SQL backends match.

``memory.py`` evaluates filters with these; ``sqlite/`` and ``postgres/`` translate the same
rules into their dialect's JSON functions, and the contract suite checks they agree.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from ..models import DeliveryStatus, parse_json

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


#: A JSON number literal (RFC 8259): a ``match`` value of this form also matches numbers.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def json_number(wanted: str) -> Decimal | None:
    """``wanted`` as an exact decimal when it is a JSON number literal (``1``, ``-0``,
    ``1.50``, ``1e22``), else ``None`` (``01``, ``+1``, ``1.``, ``NaN`` are not)."""
    if not _JSON_NUMBER.fullmatch(wanted):
        return None
    try:
        return Decimal(wanted)
    except ArithmeticError:  # an exponent past what decimal holds: no number equals it
        return None


def matches_value(value: Any, wanted: str) -> bool:
    """A ``match`` condition on one field (docs/admin.md): a string equal to ``wanted``; a
    number numerically equal to it when ``wanted`` is a JSON number literal, compared as
    exact decimals (``1`` matches ``1``, ``1.0``, ``1e0``, not ``1.5`` nor
    ``10000000000000000000001`` = ``1e22 + 1``); ``true``, ``false``, ``null`` when
    ``wanted`` is that literal. Objects and lists never match. Give numbers exactly
    (``Decimal`` or ``int``, see ``exact_payload``): a ``float`` compares by its binary
    value."""
    if isinstance(value, str):
        return value == wanted
    if value is None:
        return wanted == "null"
    if isinstance(value, bool):
        return wanted == ("true" if value else "false")
    if isinstance(value, int | float | Decimal):
        number = json_number(wanted)
        if number is None:
            return False
        try:
            return bool(Decimal(value) == number)
        except (ArithmeticError, ValueError):  # inf or nan from a float: equals no literal
            return False
    return False


def exact_payload(raw: bytes) -> Any:
    """A stored body as ``match`` reads it: ``models.parse_json``'s rules (the same bodies
    refused, ``ValueError``), but every number an exact ``Decimal``."""
    parse_json(raw)  # refuses what every reader refuses (orjson, fast)
    try:
        return json.loads(
            raw.decode("utf-8"), parse_int=Decimal, parse_float=Decimal, parse_constant=_refuse
        )
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not UTF-8 JSON text: {exc}") from None


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


#: What ``match`` reads as U+FFFD in a stored string or key: NUL and unpaired UTF-16
#: surrogates, which PostgreSQL's ``jsonb`` cannot hold (``0010_payload_mended.sql``).
_UNREADABLE = re.compile("[\x00\ud800-\udfff]")
#: The escapes that may write one (a surrogate pair too; ``\\u0000``, an escaped backslash
#: and text, too): a body holding none is read as ``parse_json`` reads it.
_UNREADABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def _mended_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of ``readable_payload``: keys and string values with ``_UNREADABLE``
    written as U+FFFD (a key that becomes a repeat keeps the last value, as ``jsonb``)."""
    return {
        _UNREADABLE.sub("\ufffd", key): (
            _UNREADABLE.sub("\ufffd", value) if isinstance(value, str) else value
        )
        for key, value in pairs
    }


def readable_payload(raw: bytes) -> Any:
    """A stored body as ``match`` reads one holding ``\\u0000`` or a surrogate escape: as
    ``exact_payload`` (numbers exact, the same bodies refused), but a lone surrogate escape
    is read too, and in every key and string value of an object NUL and unpaired surrogates
    read as U+FFFD, as PostgreSQL's ``lacuna_payload`` reads them (``jsonb`` holds neither).
    Strings inside lists are left as they are: ``match`` never reads into a list."""
    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_int=Decimal,
            parse_float=Decimal,
            parse_constant=_refuse,
            object_pairs_hook=_mended_object,
        )
    except (UnicodeDecodeError, RecursionError, ArithmeticError) as exc:
        raise ValueError(f"not JSON text this receiver reads: {exc}") from None


def body_matches(raw: bytes, path: str, wanted: str) -> bool:
    """The reference of one ``match`` condition on a stored body: ``False`` for a body the
    JSON parser refuses, never an exception. A body holding a ``\\u0000`` or surrogate
    escape is read by ``readable_payload`` (NUL and lone surrogates as U+FFFD)."""
    if _UNREADABLE_ESCAPE.search(raw):
        try:
            found, value = field_at(readable_payload(raw), path)
        except ValueError:
            return False
        return found and matches_value(value, wanted)
    try:
        payload = parse_json(raw)
    except ValueError:
        return False
    found, value = field_at(payload, path)
    if not found:
        return False
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        # parse_json reads some numbers inexactly (floats): read this body again, exactly.
        try:
            found, value = field_at(exact_payload(raw), path)
        except ValueError:
            return False
    return matches_value(value, wanted)


def fitting(sizes: list[int], max_bytes: int | None) -> int:
    """How many of a page's events, newest first, keep their bodies (``sizes``, bytes)
    within ``max_bytes`` (``Store.search_events``): at least one of a page that has any, so
    following the page's cursor always makes progress; every one with ``None``."""
    if max_bytes is None:
        return len(sizes)
    total = 0
    for kept, size in enumerate(sizes):
        total += size
        if kept and total > max_bytes:
            return kept
    return len(sizes)


#: The largest integer a cursor may hold: a signed 64-bit column (SQLite ``rowid``,
#: PostgreSQL ``bigint``) holds nothing larger.
CURSOR_INT_MAX = 2**63 - 1
#: The longest text part of a cursor (an RFC 3339 time is 32 characters).
_CURSOR_TEXT_MAX = 64


def cursor_time(part: Any) -> datetime:
    """A cursor's RFC 3339 time part as an aware UTC datetime; ``ValueError`` when it is not
    one, or its UTC instant is outside what a datetime (and so a database) holds."""
    if not isinstance(part, str):
        raise ValueError("not a cursor this service made")
    try:
        at = datetime.fromisoformat(part)
        if at.tzinfo is None:
            raise ValueError("not a cursor this service made")
        return at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError("not a cursor this service made") from None


def encode_cursor(*parts: Any) -> str:
    """An opaque, URL-safe cursor holding ``parts`` (JSON values)."""
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    """The parts of ``encode_cursor``; ``ValueError`` when it is not one of ``arity`` parts,
    or a part is out of the range any store makes: an integer outside 0 to
    ``CURSOR_INT_MAX``, a number not finite or negative, text over 64 characters or with
    NUL, or anything else (a forged cursor must be a 400, never an integer overflow in the
    database). Every store's cursors are checked here, once."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        parts = json.loads(
            base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"),
            parse_constant=_refuse,
        )
    except (ValueError, UnicodeError, binascii.Error, RecursionError) as exc:
        raise ValueError("not a cursor this service made") from exc
    if not isinstance(parts, list) or len(parts) != arity:
        raise ValueError("not a cursor this service made")
    for part in parts:
        if isinstance(part, bool):
            raise ValueError("not a cursor this service made")
        if isinstance(part, int):
            if not 0 <= part <= CURSOR_INT_MAX:
                raise ValueError("a cursor number is out of range")
        elif isinstance(part, float):
            if not (math.isfinite(part) and 0 <= part <= CURSOR_INT_MAX):
                raise ValueError("a cursor number is out of range")
        elif isinstance(part, str):
            if len(part) > _CURSOR_TEXT_MAX or "\x00" in part:
                raise ValueError("not a cursor this service made")
        else:
            raise ValueError("not a cursor this service made")
    return parts


__all__ = [
    "CURSOR_INT_MAX",
    "DELIVERY_STATES",
    "body_matches",
    "cursor_time",
    "decode_cursor",
    "delivery_state",
    "encode_cursor",
    "exact_payload",
    "field_at",
    "fitting",
    "json_number",
    "matches_value",
]
