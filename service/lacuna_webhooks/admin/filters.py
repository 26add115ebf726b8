"""The admin API's filter language (SPEC §9 ``GET /events``), from a query string or a JSON
object, into a store ``EventFilter``. Every bad value raises ``BadRequest`` naming it.

- ``type``, ``task_id``: exact values (at most ``MAX_TEXT`` characters, no NUL).
- ``since``, ``until``: RFC 3339 (``2026-11-30T12:00:00Z``, ``2026-11-30T13:00:00+01:00``,
  or a date ``2026-11-30`` for its midnight UTC) or Unix seconds (integer or decimal);
  ``since`` is inclusive, ``until`` exclusive.
- ``handler`` (a handler name) and ``status`` (``pending``, ``due``, ``running``,
  ``waiting``, ``done``, ``dead``).
- ``match``: ``<dotted.path>:<value>``, repeatable (a JSON list in a body); the first ``:``
  ends the path, of at most ``MAX_MATCH_DEPTH`` keys of 1 to ``MAX_MATCH_KEY`` characters
  (any but ``.`` and NUL). At most ``MAX_MATCHES``.
- ``q``: a substring of the raw payload (at least one character).
- ``limit`` (1..500, default 50) and ``cursor`` belong to listings, not to the filter:
  ``page_params`` reads them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import QueryParams

from ..config import HANDLER_NAME_RE
from ..store.base import EventFilter
from ..store.search import DELIVERY_STATES
from .responses import BadRequest

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_TEXT = 1000
MAX_MATCHES = 10
#: The most keys in a ``match`` path, and the most characters in one key: each backend's
#: statement grows linearly with the path, and these keep it small.
MAX_MATCH_DEPTH = 32
MAX_MATCH_KEY = 200
_KEY = rf"[^.\x00]{{1,{MAX_MATCH_KEY}}}"
_PATH_RE = re.compile(rf"\A{_KEY}(\.{_KEY}){{0,{MAX_MATCH_DEPTH - 1}}}\Z")
#: The filter's names, in a query string or a JSON body.
FILTER_NAMES = ("type", "task_id", "since", "until", "handler", "status", "match", "q")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string.", param=name)
    if not value or len(value) > MAX_TEXT or "\x00" in value:
        raise BadRequest(f"{name} must be 1 to {MAX_TEXT} characters without NUL.", param=name)
    return value


_RFC3339 = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})"
    r"(?:[Tt](?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.(?P<fraction>[0-9]{1,9}))?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2}))?"
)
_UNIX = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
#: 10000-01-01T00:00:00Z: the first instant Python's datetime cannot hold.
_END_OF_TIME = 253402300800


def parse_time(name: str, value: Any) -> datetime:
    """RFC 3339 ``date-time`` (``2026-11-30T12:00:00Z``, ``…+01:00``, fractions allowed) or
    ``full-date`` (``2026-11-30``: midnight UTC), or Unix seconds (digits, an optional
    fraction; a JSON number too), as an aware UTC datetime from 1970 to 9999. Anything else
    is ``BadRequest`` naming ``name``."""
    # A JSON true or false is no time (Python's bool is an int: true was second 1).
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be RFC 3339 or Unix seconds.", param=name)
    if isinstance(value, int) and not 0 <= value < _END_OF_TIME:
        # Before float(): an integer past a double (10**400) would raise OverflowError.
        raise BadRequest(f"{name} is out of range (1970 to 9999).", param=name)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = _text(name, value).strip()
        if _UNIX.fullmatch(text):
            seconds = float(text)
        else:
            match = _RFC3339.fullmatch(text)
            if match is None:
                raise BadRequest(
                    f"{name} must be RFC 3339 (2026-11-30T12:00:00Z or 2026-11-30) or Unix "
                    "seconds.",
                    param=name,
                )
            fraction = (match["fraction"] or "")[:6]
            iso = match["date"]
            if match["time"]:
                offset = "+00:00" if match["offset"] in ("Z", "z") else match["offset"]
                iso += "T" + match["time"] + ("." + fraction if fraction else "") + offset
            try:
                parsed = datetime.fromisoformat(iso)
                parsed = (
                    parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed
                ).astimezone(UTC)
            except (ValueError, OverflowError):
                raise BadRequest(
                    f"{name} is not a valid time, or out of range.", param=name
                ) from None
            seconds = parsed.timestamp()
    if not math.isfinite(seconds) or not 0 <= seconds < _END_OF_TIME:
        raise BadRequest(f"{name} is out of range (1970 to 9999).", param=name)
    return datetime.fromtimestamp(seconds, UTC)


def _match(value: Any) -> tuple[str, str]:
    text = _text("match", value)
    path, sep, wanted = text.partition(":")
    if not sep or not _PATH_RE.fullmatch(path):
        raise BadRequest(
            "match must be <dotted.path>:<value>, e.g. data.title:Late Night Study: at most "
            f"{MAX_MATCH_DEPTH} keys of 1 to {MAX_MATCH_KEY} characters each.",
            param="match",
        )
    return path, wanted


def build_filter(values: Mapping[str, Any]) -> EventFilter:
    """An ``EventFilter`` from already-split values (``match`` a list); ``BadRequest``."""
    kwargs: dict[str, Any] = {}
    for name in ("type", "task_id", "q"):
        if values.get(name) is not None:
            kwargs[name] = _text(name, values[name])
    for name in ("since", "until"):
        if values.get(name) is not None:
            kwargs[name] = parse_time(name, values[name])
    if "since" in kwargs and "until" in kwargs and kwargs["since"] >= kwargs["until"]:
        raise BadRequest("since must be before until.", param="since")
    if values.get("handler") is not None:
        handler = _text("handler", values["handler"])
        if not HANDLER_NAME_RE.fullmatch(handler):
            raise BadRequest("handler is not a handler name.", param="handler")
        kwargs["handler"] = handler
    if values.get("status") is not None:
        status = _text("status", values["status"])
        if status not in DELIVERY_STATES:
            raise BadRequest(f"status must be one of {', '.join(DELIVERY_STATES)}.", param="status")
        kwargs["status"] = status
    matches = values.get("match") or []
    if isinstance(matches, str):
        matches = [matches]
    if not isinstance(matches, list):
        raise BadRequest("match must be a list of <dotted.path>:<value>.", param="match")
    if len(matches) > MAX_MATCHES:
        raise BadRequest(f"At most {MAX_MATCHES} match conditions.", param="match")
    kwargs["match"] = tuple(_match(m) for m in matches)
    return EventFilter(**kwargs)


def _single(query: QueryParams, name: str) -> str | None:
    values = query.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name} may be given once.", param=name)
    return values[0] if values else None


def only_params(
    query: QueryParams, allowed: Iterable[str], *, repeatable: Iterable[str] = ()
) -> None:
    """``BadRequest`` for a parameter of ``query`` not in ``allowed`` (a typo must never
    silently widen what a request reads or does) or given twice while not ``repeatable``
    (which one was meant?). The console's pages apply it too, so they answer as the API."""
    known = set(allowed)
    many = set(repeatable)
    for name in query:
        if name not in known:
            raise BadRequest(f"Unknown parameter {name!r}.", param=name)
        if name not in many and len(query.getlist(name)) > 1:
            raise BadRequest(f"{name} may be given once.", param=name)


def filter_from_query(query: QueryParams, *, allowed: tuple[str, ...] = ()) -> EventFilter:
    """The filter of a ``GET`` query string. Unknown parameters (other than ``allowed``,
    ``limit`` and ``cursor``) are refused, so a typo never silently widens a search."""
    only_params(query, (*FILTER_NAMES, "limit", "cursor", *allowed), repeatable=("match",))
    values: dict[str, Any] = {n: _single(query, n) for n in FILTER_NAMES if n != "match"}
    values["match"] = query.getlist("match")
    return build_filter(values)


def filter_from_json(body: Mapping[str, Any], *, allowed: tuple[str, ...] = ()) -> EventFilter:
    """The filter of a JSON body (``POST /replays``); other keys than the filter's and
    ``allowed`` are refused."""
    for name in body:
        if name not in FILTER_NAMES and name not in allowed:
            raise BadRequest(f"Unknown field {name!r}.", param=name)
    return build_filter(body)


def page_params(query: QueryParams) -> tuple[int, str | None]:
    """``(limit, cursor)`` of a listing: ``limit`` 1..500 (default 50)."""
    raw_limit = _single(query, "limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not re.fullmatch(r"[0-9]{1,4}", raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}.", param="limit")
        limit = int(raw_limit)
    cursor = _single(query, "cursor")
    if cursor is not None and (not cursor or len(cursor) > MAX_TEXT):
        raise BadRequest("cursor is not one this service made.", param="cursor")
    return limit, cursor


__all__ = [
    "DEFAULT_LIMIT",
    "FILTER_NAMES",
    "MAX_LIMIT",
    "MAX_MATCHES",
    "MAX_MATCH_DEPTH",
    "MAX_MATCH_KEY",
    "build_filter",
    "filter_from_json",
    "filter_from_query",
    "only_params",
    "page_params",
    "parse_time",
]
