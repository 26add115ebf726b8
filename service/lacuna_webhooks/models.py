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

    @classmethod
    def from_body(cls, raw: bytes) -> Event:
        """Parse and validate a body; raise ``InvalidJSON`` or ``InvalidPayload``.

        Only ``id`` and ``type`` are required (non-empty strings of bounded
        length). ``created`` is kept when it is an integer and ignored
        otherwise; nothing else is checked so that new fields and new event
        types pass through.
        """
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidJSON("The request body is not valid UTF-8 JSON.") from None
        if not isinstance(payload, dict):
            raise InvalidJSON("The request body must be a JSON object.")
        event_id = payload.get("id")
        if not isinstance(event_id, str) or not event_id.strip():
            raise InvalidPayload("`id` must be a non-empty string.", param="id")
        if len(event_id) > MAX_ID_LENGTH:
            raise InvalidPayload(f"`id` is longer than {MAX_ID_LENGTH} characters.", param="id")
        event_type = payload.get("type")
        if not isinstance(event_type, str) or not event_type.strip():
            raise InvalidPayload("`type` must be a non-empty string.", param="type")
        if len(event_type) > MAX_TYPE_LENGTH:
            raise InvalidPayload(
                f"`type` is longer than {MAX_TYPE_LENGTH} characters.", param="type"
            )
        created = payload.get("created")
        if not isinstance(created, int) or isinstance(created, bool):
            created = None
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


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one run of a handler did, as recorded against its delivery."""

    started_at: datetime
    finished_at: datetime
    outcome: AttemptOutcome
    error: str | None = None

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()
