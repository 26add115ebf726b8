"""The data the service moves around: events, deliveries and their attempts.

All frozen: an ``Event`` is what was received, a ``Delivery`` is a snapshot of
one row of the outbox as it was claimed.
"""

from __future__ import annotations

import enum
import json
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from .errors import InvalidJSON, InvalidPayload

MAX_ID_LENGTH = 255
MAX_TYPE_LENGTH = 128
#: ``data.id`` is a key of the per-task state (an indexed column): bounded like ``id``.
MAX_TASK_ID_LENGTH = 255
#: ``created`` is stored in a signed 64-bit integer column on every backend.
CREATED_MIN = -(2**63)
CREATED_MAX = 2**63 - 1
#: Deepest JSON nesting accepted (the top-level object is level 1). orjson parses up to
#: 1024 levels but writes only 254, and pickling ~1000 levels exceeds Python's recursion
#: limit; an event must survive both (``events show``, the ``http`` handler's enriched body,
#: the hop to the SQLite writer and handler worker processes) with room for the wrappers
#: around it. Real events nest about 4 levels.
MAX_JSON_DEPTH = 128

#: Most characters of a handler's pause reason (the admin API's bound on a text field).
MAX_PAUSE_REASON_LENGTH = 1000


def pause_reason_problem(reason: str) -> str | None:
    """What is wrong with ``reason`` as a handler's pause reason (to follow its name:
    ``reason must be ...``), or ``None``. The one rule of the admin API's ``POST
    /handlers/{name}/pause`` and of ``lacuna-webhooks handlers pause --reason``."""
    if not reason.strip() or len(reason) > MAX_PAUSE_REASON_LENGTH:
        return f"must be 1 to {MAX_PAUSE_REASON_LENGTH} characters, not only spaces"
    if "\x00" in reason:
        return "must not contain a NUL character"
    return None


def parse_json(raw: bytes) -> Any:
    """Parse JSON bytes as every reader of a stored body must: any number RFC 8259 allows.

    The fast path is orjson. It refuses valid JSON holding a number beyond a double
    (``1e400``, ``-1e400``, an integer of 310 digits or more); only when orjson refuses
    does the standard library parser run, with number readers that never fail and give
    what orjson gives wherever orjson can:

    - an integer within orjson's range (``-2**63`` to ``2**64 - 1``) is an ``int``; beyond
      it a ``float`` (orjson's rule: inexact), and beyond a double a ``decimal.Decimal``
      holding it exactly (never an ``int``: Python refuses to convert more than 4300
      digits, and orjson cannot write an integer past 64 bits);
    - a number with a fraction or exponent is a ``float``, or a ``decimal.Decimal`` when it
      overflows a double (``Decimal("1E+400")``); underflow reads as ``0.0``, as orjson.

    So a value reads the same whatever else the body holds, and the only new type a
    reader can meet is ``Decimal``. The body's bytes (``Event.raw``) stay the exact
    record; ``json_default`` writes a ``Decimal`` back as its JSON number. Still refused
    (``ValueError``, which ``orjson.JSONDecodeError`` is too): bytes that are not UTF-8
    JSON text, ``NaN`` and ``Infinity``, a lone UTF-16 surrogate escape (``"\\ud800"``;
    no backend's text column and no UTF-8 encoder can hold one, see docs/delivery.md),
    a number whose exponent is past what ``decimal`` holds (more than 18 digits: RFC 8259
    §9 lets a parser limit the range of numbers) and nesting past Python's recursion limit
    (far beyond ``MAX_JSON_DEPTH``, which ``Event.from_body`` checks after).
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_exact_numbers(raw)


def json_default(value: Any) -> Any:
    """``orjson.dumps(..., default=json_default)``: a ``Decimal`` from ``parse_json`` is
    written as the JSON number it holds; anything else raises ``TypeError`` as orjson does."""
    if isinstance(value, Decimal) and value.is_finite():
        return orjson.Fragment(str(value))
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


#: The integers orjson reads as ``int`` (beyond them it reads a float).
_ORJSON_INT_MIN = -(2**63)
_ORJSON_INT_MAX = 2**64 - 1


def _json_int(text: str) -> int | float | Decimal:
    if len(text) <= 20:  # at most 20 digits or sign and 19: well within int()'s digit limit
        number = int(text)
        if _ORJSON_INT_MIN <= number <= _ORJSON_INT_MAX:
            return number
    return _json_float(text)


def _json_float(text: str) -> float | Decimal:
    number = float(text)
    if not math.isinf(number):
        return number
    try:
        return Decimal(text)
    except ArithmeticError:  # decimal.InvalidOperation: an exponent past 10**18 digits' worth
        # RFC 8259 §6 lets a parser limit the range of numbers; ValueError is a 400.
        raise ValueError(f"a number beyond the range this receiver reads: {text[:40]}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _parse_exact_numbers(raw: bytes) -> Any:
    """The standard library's parser where orjson refused (see ``parse_json``)."""
    try:
        text = raw.decode("utf-8")  # strictly UTF-8, as orjson (json.loads(bytes) would guess)
        value = json.loads(
            text, parse_int=_json_int, parse_float=_json_float, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not UTF-8 JSON text: {exc}") from None
    # orjson refuses a lone surrogate escape; the standard library reads it into the string.
    if any(_SURROGATE.search(text) for text in json_strings(value)):
        raise ValueError("a lone UTF-16 surrogate escape")
    return value


def json_strings(value: Any) -> Iterator[str]:
    """Every string of a parsed JSON ``value``: itself, list items, object keys and values,
    at any depth. Iterative: a body is bounded in bytes, not in depth."""
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _written_as_integer(raw: bytes, key: str) -> bool:
    """Whether the top-level ``key`` of ``raw`` (valid JSON) is an integer literal (no
    fraction, no exponent), whatever its size: orjson reads large ones as floats."""

    class _IntegerLiteral(str):
        pass

    try:
        value = json.loads(raw.decode("utf-8"), parse_int=_IntegerLiteral, parse_float=str)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and isinstance(value.get(key), _IntegerLiteral)


@dataclass(frozen=True, slots=True)
class Event:
    """One webhook event, exactly as received.

    ``raw`` is the body the signature covered; ``payload`` is its parsed form.
    Unknown fields are kept in ``payload`` untouched.
    """

    id: str
    type: str
    payload: dict[str, Any] = field(repr=False, compare=False)
    raw: bytes = field(repr=False)
    created: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Across processes (the SQLite writer, handler workers) an event travels as its raw
        # bytes and is parsed again on arrival: pickling the parsed tree recurses once per
        # nesting level and fails on deep payloads, which stopped the whole dispatcher.
        return (_from_wire, (self.id, self.type, self.raw, self.created))

    @classmethod
    def from_stored(cls, raw: bytes) -> Event:
        """An event from a body the store accepted once already: ``from_body`` without the
        nesting bound and the id rules (a body stored before a rule existed must still read
        back: a claimed delivery whose event no longer parsed would stop the dispatcher).
        Raises as ``from_body`` does for anything else."""
        return cls._parse(raw, stored=True)

    @classmethod
    def from_body(cls, raw: bytes) -> Event:
        """Parse and validate a request body; raise ``InvalidJSON`` or ``InvalidPayload``
        (with ``param``). The rules are ``_parse``'s."""
        return cls._parse(raw, stored=False)

    @classmethod
    def _parse(cls, raw: bytes, *, stored: bool) -> Event:
        """Parse and validate a body; raise ``InvalidJSON`` or ``InvalidPayload`` (with ``param``).

        SPEC §3 check 3: the body must be a UTF-8 JSON object (else ``InvalidJSON``;
        numbers of any size are JSON, see ``parse_json``; lone UTF-16 surrogate escapes
        such as ``"\\ud800"`` are refused, so no stored string can hold one) with ``id``
        and ``type`` non-empty strings of
        bounded length (else ``InvalidPayload``). JSON nested deeper than
        ``MAX_JSON_DEPTH`` levels (the top-level object is level 1) is ``InvalidJSON``;
        ``stored`` skips that check and the id checks below (``from_stored``).

        Beyond the spec, the fields the store derives columns from are refused when no
        backend could hold them, so that an accepted body is always storable and one
        unstorable event never turns into a ``503`` the sender retries forever
        (issue 9; ``docs/delivery.md``):

        - ``id``, ``type``: a NUL character (``\\u0000``): PostgreSQL ``text`` cannot
          hold it. ``param`` is ``id`` / ``type``.
        - ``created``: an integer (written without fraction or exponent, whatever its
          size: ``9223372036854775808``, ``-1e19`` is not one, a 5000-digit one is)
          outside the signed 64-bit range (``param`` ``created``). A ``created`` that
          is not an integer (a float such as ``1e400``, a string, ``null``) is
          *ignored* (stored as NULL, the event ordered by its received time), as
          before: refusing an event for an ill-typed optional field the spec does not
          make us check would drop real events.
        - ``data.id``, when a string: a NUL character, or longer than
          ``MAX_TASK_ID_LENGTH`` (``param`` ``data.id``). When it is not a
          string the event simply has no task (NULL).
        - ``data.status``, when a string: a NUL character (``param`` ``data.status``).
          Not a string: no status (NULL).

        Ids are keys (the dedupe key, a task's state, a track's file name), so ``id``,
        ``data.id`` and each ``data.tracks[i].id``, when strings, are refused when they
        begin or end with whitespace or hold a control character (C0, DEL, C1), with
        ``param`` naming the field (``data.tracks[0].id``); they are never trimmed.

        Everything else (unknown fields, NULs in other strings, numbers of any size,
        deep nesting up to ``MAX_JSON_DEPTH``) lives only in ``raw``, kept byte for byte;
        in ``payload`` such numbers are as ``parse_json`` reads them.
        """
        try:
            payload = parse_json(raw)
        except ValueError:
            raise InvalidJSON("The request body is not valid UTF-8 JSON.") from None
        if not isinstance(payload, dict):
            raise InvalidJSON("The request body must be a JSON object.")
        # Counting brackets is C-speed and bounds the depth from above, so the walk only
        # runs for bodies with many containers (brackets inside strings count too: harmless).
        if (
            not stored
            and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
            and _nesting_exceeds(payload, MAX_JSON_DEPTH)
        ):
            raise InvalidJSON(f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.")
        event_id = payload.get("id")
        if not isinstance(event_id, str) or not event_id.strip():
            raise InvalidPayload("`id` must be a non-empty string.", param="id")
        if len(event_id) > MAX_ID_LENGTH:
            raise InvalidPayload(f"`id` is longer than {MAX_ID_LENGTH} characters.", param="id")
        _refuse_nul(event_id, "id")
        new_body = not stored  # see from_stored: stored bodies read back as they are
        if new_body:
            _refuse_unclean_id(event_id, "id")
        event_type = payload.get("type")
        if not isinstance(event_type, str) or not event_type.strip():
            raise InvalidPayload("`type` must be a non-empty string.", param="type")
        if len(event_type) > MAX_TYPE_LENGTH:
            raise InvalidPayload(
                f"`type` is longer than {MAX_TYPE_LENGTH} characters.", param="type"
            )
        _refuse_nul(event_type, "type")
        created = payload.get("created")
        if isinstance(created, int) and not isinstance(created, bool):
            if not CREATED_MIN <= created <= CREATED_MAX:
                raise _created_out_of_range()
        elif (
            isinstance(created, Decimal) or (isinstance(created, float) and abs(created) >= 2**63)
        ) and _written_as_integer(raw, "created"):
            # An integer orjson read as a float (past 64 bits) or parse_json as a Decimal
            # (past 4300 digits): out of range all the same. Only huge values come here.
            raise _created_out_of_range()
        else:
            created = None
        data = payload.get("data")
        if isinstance(data, dict):
            task_id = data.get("id")
            if isinstance(task_id, str):
                if len(task_id) > MAX_TASK_ID_LENGTH:
                    raise InvalidPayload(
                        f"`data.id` is longer than {MAX_TASK_ID_LENGTH} characters.",
                        param="data.id",
                    )
                _refuse_nul(task_id, "data.id")
                if new_body:
                    _refuse_unclean_id(task_id, "data.id")
            status = data.get("status")
            if isinstance(status, str):
                _refuse_nul(status, "data.status")
            tracks = data.get("tracks") if new_body else None
            for index, track in enumerate(tracks if isinstance(tracks, list) else ()):
                track_id = track.get("id") if isinstance(track, dict) else None
                if isinstance(track_id, str):
                    _refuse_unclean_id(track_id, f"data.tracks[{index}].id")
        return cls(id=event_id, type=event_type, payload=payload, raw=raw, created=created)

    @property
    def data(self) -> dict[str, Any]:
        """The event's ``data`` object (empty when absent or not an object)."""
        data = self.payload.get("data")
        return data if isinstance(data, dict) else {}

    @property
    def task_id(self) -> str | None:
        """The generation task this event is about (``data.id``), when given."""
        task_id = self.data.get("id")
        return task_id if isinstance(task_id, str) and task_id else None

    @property
    def task_status(self) -> str | None:
        """The task status the event reports (``data.status``), when given."""
        status = self.data.get("status")
        return status if isinstance(status, str) and status else None


def _created_out_of_range() -> InvalidPayload:
    return InvalidPayload(
        "`created` must be Unix seconds within the signed 64-bit range.", param="created"
    )


def _from_wire(event_id: str, event_type: str, raw: bytes, created: int | None) -> Event:
    return Event(id=event_id, type=event_type, payload=parse_json(raw), raw=raw, created=created)


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) has containers nested more than ``limit`` deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


# C0, DEL and C1: Unicode's control characters (category Cc).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Unicode categories no id has a use for and every listing shows as nothing or as a
#: reordering of what follows: format characters (Cf: the bidirectional overrides and
#: isolates of "Trojan Source", CVE-2021-42574; zero-width spaces and joiners; the BOM;
#: tag characters) and the line and paragraph separators (Zl, Zp).
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp"})


def _invisible(value: str) -> str | None:
    """The first character of ``value`` of ``_INVISIBLE_CATEGORIES``, if any (``None`` at
    once for ASCII, the ids every sender uses)."""
    if value.isascii():
        return None
    return next((c for c in value if unicodedata.category(c) in _INVISIBLE_CATEGORIES), None)


def _refuse_unclean_id(value: str, param: str) -> None:
    # An id is a key: the event id the dedupe key, the task id the key of the task's state
    # (its latest event wins), a track id a file name. " evt_1" or "evt_1\n" would be stored
    # as a second event (or task, or file) next to "evt_1", shown identically by every
    # listing. No sender means that; refuse it, as Stripe-like receivers refuse a malformed id.
    # "evt_1\u200b" (a zero-width space) and "evt_\u202e1" (a right-to-left override) are the
    # same kind: a second key that listings show as, or disguised as, another.
    if value != value.strip() or _CONTROL.search(value):
        raise InvalidPayload(
            f"`{param}` must not begin or end with whitespace or contain control characters.",
            param=param,
        )
    invisible = _invisible(value)
    if invisible is not None:
        raise InvalidPayload(
            f"`{param}` must not contain invisible or bidirectional formatting characters "
            f"(it holds U+{ord(invisible):04X}).",
            param=param,
        )


def _refuse_nul(value: str, param: str) -> None:
    if "\x00" in value:
        raise InvalidPayload(f"`{param}` must not contain a NUL character.", param=param)


class DeliveryStatus(enum.StrEnum):
    """Where a delivery stands. A ``pending`` delivery with a live lease is running."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


class AttemptOutcome(enum.StrEnum):
    """How one attempt of a handler ended."""

    OK = "ok"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One (event, handler) pair to deliver, as claimed.

    ``attempts`` counts claims since the delivery was created or last reset
    (this claim included); ``lease_token`` identifies this claim, so a worker
    whose lease expired and was taken over cannot record an outcome.
    """

    id: int
    event: Event
    handler: str
    status: DeliveryStatus
    attempts: int
    lease_token: int
    next_attempt_at: datetime
    created_at: datetime
    # LACUNA_<NAME>_AFTER (SPEC §6): each prerequisite handler's result for this event (None
    # when it recorded none or has no delivery); set by the dispatcher, None without AFTER.
    results: dict[str, Any] | None = None
    # The W3C traceparent of the request that received the event, when it was traced
    # (Store.accept's ``trace_context``; docs/observability.md): the attempt's span joins it.
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one run of a handler did, as recorded against its delivery."""

    started_at: datetime
    finished_at: datetime
    outcome: AttemptOutcome
    error: str | None = None
    # The JSON object handle() returned (SPEC §6); stored with the delivery by ``complete``.
    result: dict[str, Any] | None = None

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()
