"""The data the service moves around: events, deliveries and their attempts.

All frozen: an ``Event`` is what was received, a ``Delivery`` is a snapshot of
one row of the outbox as it was claimed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
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
    def from_body(cls, raw: bytes, *, max_depth: int | None = MAX_JSON_DEPTH) -> Event:
        """Parse and validate a body; raise ``InvalidJSON`` or ``InvalidPayload`` (with ``param``).

        SPEC §3 check 3: the body must be a UTF-8 JSON object (else ``InvalidJSON``;
        orjson also refuses lone UTF-16 surrogate escapes such as ``"\\ud800"``, so no
        stored string can hold one) with ``id`` and ``type`` non-empty strings of
        bounded length (else ``InvalidPayload``). JSON nested deeper than ``max_depth``
        levels (``MAX_JSON_DEPTH``; the top-level object is level 1) is ``InvalidJSON``;
        ``max_depth=None`` skips that check, for bodies already stored.

        Beyond the spec, the fields the store derives columns from are refused when no
        backend could hold them, so that an accepted body is always storable and one
        unstorable event never turns into a ``503`` the sender retries forever
        (issue 9; ``docs/delivery.md``):

        - ``id``, ``type``: a NUL character (``\\u0000``): PostgreSQL ``text`` cannot
          hold it. ``param`` is ``id`` / ``type``.
        - ``created``: an integer outside the signed 64-bit range (``param``
          ``created``). A ``created`` that is not an integer (a float, a string,
          ``null``) is *ignored* (stored as NULL, the event ordered by its received
          time), as before: refusing an event for an ill-typed optional field the
          spec does not make us check would drop real events.
        - ``data.id``, when a string: a NUL character, or longer than
          ``MAX_TASK_ID_LENGTH`` (``param`` ``data.id``). When it is not a
          string the event simply has no task (NULL).
        - ``data.status``, when a string: a NUL character (``param`` ``data.status``).
          Not a string: no status (NULL).

        Everything else (unknown fields, NULs in other strings, huge numbers, floats,
        deep nesting up to orjson's limit) lives only in ``raw``, kept byte for byte.
        """
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidJSON("The request body is not valid UTF-8 JSON.") from None
        if not isinstance(payload, dict):
            raise InvalidJSON("The request body must be a JSON object.")
        # Counting brackets is C-speed and bounds the depth from above, so the walk only
        # runs for bodies with many containers (brackets inside strings count too: harmless).
        if (
            max_depth is not None
            and raw.count(b"[") + raw.count(b"{") > max_depth
            and _nesting_exceeds(payload, max_depth)
        ):
            raise InvalidJSON(f"The request body nests JSON deeper than {max_depth} levels.")
        event_id = payload.get("id")
        if not isinstance(event_id, str) or not event_id.strip():
            raise InvalidPayload("`id` must be a non-empty string.", param="id")
        if len(event_id) > MAX_ID_LENGTH:
            raise InvalidPayload(f"`id` is longer than {MAX_ID_LENGTH} characters.", param="id")
        _refuse_nul(event_id, "id")
        event_type = payload.get("type")
        if not isinstance(event_type, str) or not event_type.strip():
            raise InvalidPayload("`type` must be a non-empty string.", param="type")
        if len(event_type) > MAX_TYPE_LENGTH:
            raise InvalidPayload(
                f"`type` is longer than {MAX_TYPE_LENGTH} characters.", param="type"
            )
        _refuse_nul(event_type, "type")
        created = payload.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            created = None
        elif not CREATED_MIN <= created <= CREATED_MAX:
            raise InvalidPayload(
                "`created` must be Unix seconds within the signed 64-bit range.", param="created"
            )
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
            status = data.get("status")
            if isinstance(status, str):
                _refuse_nul(status, "data.status")
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


def _from_wire(event_id: str, event_type: str, raw: bytes, created: int | None) -> Event:
    return Event(id=event_id, type=event_type, payload=orjson.loads(raw), raw=raw, created=created)


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
