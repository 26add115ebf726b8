"""Typed Lacuna events for code: the Python counterpart of the SDK's ``isJobCompleted``.

Shapes from SPEC §2 (the provider's quickstart and a peer API's track shape)::

    from lacuna_webhooks import Event
    from lacuna_webhooks.events import is_job_completed, is_job_failed, parse_event

    async def handle(self, event: Event) -> None:
        typed = parse_event(event)           # MalformedEvent (a PermanentError) if unusable
        if is_job_completed(typed):
            for track in typed.data.tracks:  # tuple[Track, ...], never empty
                print(track.audio_url, track.duration_seconds)
        elif is_job_failed(typed):
            print(typed.data.error.code if typed.data.error else "unknown_error")

Every model is a frozen dataclass. Parsing is **strict where a reader depends on
a field** and lenient elsewhere:

- every event: ``id`` and ``type`` are non-empty strings (``MalformedEvent``
  otherwise, ``param`` naming the field);
- ``job.completed``: ``data`` is an object and ``data.tracks`` a non-empty list
  of objects, each with a non-empty string ``id`` and ``audio_url``;
- everything else is optional: a field of the wrong type, a non-finite or
  out-of-range number, or a blank string reads as ``None`` (``job.failed`` is
  never refused for its content: a failure is always worth telling).

Unknown fields are kept and reachable: each model's ``extra`` maps the fields it
does not model to their values as received, and ``LacunaEvent.payload`` is the
whole event. These mappings are read-only views; the values inside them are the
parsed JSON as received (do not mutate them).

An event whose ``type`` this version does not model parses as ``UnknownEvent``
(its ``data`` is the raw object). ``parse_event(event, strict=False)`` also
turns a malformed known type into an ``UnknownEvent`` whose ``problem`` says
what is wrong, instead of raising: for readers that only log.

The only error parsing raises is ``MalformedEvent`` (from ``lacuna_webhooks.errors``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeAlias, TypeGuard

from .errors import MalformedEvent
from .models import Event

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
"""A value as ``json.loads`` / ``orjson.loads`` produce it."""

JOB_COMPLETED = "job.completed"
JOB_FAILED = "job.failed"

_EMPTY: Mapping[str, JSONValue] = MappingProxyType({})
# Unix seconds beyond this are not a time (and do not fit the stores' 64-bit integers).
_MAX_INT64 = 2**63 - 1


# --- lenient readers: a value of the wrong shape reads as None --------------------------


def _text(value: object) -> str | None:
    """A non-blank string, stripped; anything else is ``None``."""
    if isinstance(value, str):
        stripped = value.strip()
        return stripped or None
    return None


def _ident(value: object) -> str | None:
    """A non-blank string kept exactly as sent (ids are never trimmed: ``"ok\\n"`` stays
    itself, for the reader's own checks to refuse); anything else is ``None``."""
    return value if isinstance(value, str) and value.strip() else None


def _number(value: object, *, minimum: float = 0.0) -> float | None:
    """A finite JSON number ``>= minimum`` (bools excluded); anything else is ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)  # an int too large for a float raises OverflowError
    except OverflowError:
        return None
    if not math.isfinite(number) or number < minimum:
        return None
    return number


def _flag(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _unix_seconds(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= _MAX_INT64 else None


def _extra(obj: Mapping[Any, Any], known: frozenset[str]) -> Mapping[str, JSONValue]:
    """The string-keyed fields of ``obj`` not in ``known``, as a read-only view."""
    rest = {k: v for k, v in obj.items() if isinstance(k, str) and k not in known}
    return MappingProxyType(rest) if rest else _EMPTY


def _view(obj: Mapping[Any, Any]) -> Mapping[str, JSONValue]:
    return MappingProxyType({k: v for k, v in obj.items() if isinstance(k, str)})


def _required_text(
    obj: Mapping[Any, Any], key: str, where: str, event_id: str | None, *, strip: bool = False
) -> str:
    """A required non-blank string, kept as sent (stripped only with ``strip``)."""
    value = obj.get(key)
    if isinstance(value, str) and value.strip():
        return value.strip() if strip else value
    raise _malformed(
        event_id, where, "is missing" if value is None else "is not a non-empty string"
    )


def _malformed(event_id: str | None, where: str, problem: str) -> MalformedEvent:
    prefix = f"event {event_id}: " if event_id else ""
    return MalformedEvent(f"{prefix}{where} {problem}", param=where)


# --- the models -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderError:
    """The provider's error envelope of a ``job.failed`` event (``data.error``).

    ``code`` as in the quickstart's table (``provider_error``, ``insufficient_credits``…);
    a plain string in place of the object is read as ``message``.
    """

    type: str | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None
    extra: Mapping[str, JSONValue] = field(default_factory=lambda: _EMPTY, hash=False)

    _FIELDS: ClassVar[frozenset[str]] = frozenset({"type", "code", "message", "param"})

    @classmethod
    def parse(cls, value: object) -> ProviderError | None:
        """Read ``data.error`` leniently; ``None`` when it is neither an object nor a string."""
        if isinstance(value, str):
            return cls(message=_text(value))
        if not isinstance(value, Mapping):
            return None
        return cls(
            type=_text(value.get("type")),
            code=_text(value.get("code")),
            message=_text(value.get("message")),
            param=_text(value.get("param")),
            extra=_extra(value, cls._FIELDS),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Track:
    """One track of a finished task (``data.tracks[i]``).

    ``id`` and ``audio_url`` (https URL of the hosted audio) are always non-empty
    strings. ``duration_seconds`` is the wire's ``duration`` when it is a finite
    number >= 0. ``format`` is ``mp3``/``wav`` when the provider says.
    """

    id: str
    audio_url: str
    duration_seconds: float | None = None
    lyrics: str | None = None
    title: str | None = None
    image_url: str | None = None
    format: str | None = None
    extra: Mapping[str, JSONValue] = field(default_factory=lambda: _EMPTY, hash=False)

    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"id", "audio_url", "duration", "lyrics", "title", "image_url", "format"}
    )

    @classmethod
    def parse(cls, value: object, *, where: str, event_id: str | None = None) -> Track:
        """Read one track; ``MalformedEvent`` when it is not an object with ``id`` and
        ``audio_url`` strings (``where`` is its path, e.g. ``data.tracks[0]``)."""
        if not isinstance(value, Mapping):
            raise _malformed(event_id, where, "is not an object")
        lyrics = value.get("lyrics")
        return cls(
            id=_required_text(value, "id", f"{where}.id", event_id),
            audio_url=_required_text(
                value, "audio_url", f"{where}.audio_url", event_id, strip=True
            ),
            duration_seconds=_number(value.get("duration")),
            # Lyrics keep their line breaks and spacing; only a blank string reads as None.
            lyrics=lyrics if isinstance(lyrics, str) and lyrics.strip() else None,
            title=_text(value.get("title")),
            image_url=_text(value.get("image_url")),
            format=_text(value.get("format")),
            extra=_extra(value, cls._FIELDS),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationTask:
    """The generation task an event is about (its ``data``).

    ``tracks`` is never empty in a ``JobCompleted`` (and empty when a
    ``job.failed`` carries none); ``error`` and ``credits_refunded`` come with
    ``job.failed``.
    """

    id: str | None = None
    object: str | None = None
    status: str | None = None
    title: str | None = None
    style: str | None = None
    instrumental: bool | None = None
    tracks: tuple[Track, ...] = ()
    error: ProviderError | None = None
    credits_refunded: float | None = None
    extra: Mapping[str, JSONValue] = field(default_factory=lambda: _EMPTY, hash=False)

    _FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "id",
            "object",
            "status",
            "title",
            "style",
            "instrumental",
            "tracks",
            "error",
            "credits_refunded",
        }
    )

    @classmethod
    def _parse(cls, data: Mapping[Any, Any], tracks: tuple[Track, ...]) -> GenerationTask:
        return cls(
            id=_ident(data.get("id")),
            object=_text(data.get("object")),
            status=_text(data.get("status")),
            title=_text(data.get("title")),
            style=_text(data.get("style")),
            instrumental=_flag(data.get("instrumental")),
            tracks=tracks,
            error=ProviderError.parse(data.get("error")),
            credits_refunded=_number(data.get("credits_refunded")),
            extra=_extra(data, cls._FIELDS),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LacunaEvent:
    """What every event has; the base of ``JobCompleted``, ``JobFailed`` and ``UnknownEvent``.

    ``payload`` is the whole event as received; ``extra`` its top-level fields
    other than ``id``, ``object``, ``type``, ``created`` and ``data``.
    """

    id: str
    type: str
    created: int | None = None
    object: str | None = None
    payload: Mapping[str, JSONValue] = field(default_factory=lambda: _EMPTY, hash=False)
    extra: Mapping[str, JSONValue] = field(default_factory=lambda: _EMPTY, hash=False)

    _FIELDS: ClassVar[frozenset[str]] = frozenset({"id", "object", "type", "created", "data"})

    @property
    def _data(self) -> Mapping[str, JSONValue]:
        data = self.payload.get("data")
        return data if isinstance(data, dict) else _EMPTY

    @property
    def task_id(self) -> str | None:
        """``data.id`` when it is a non-blank string (as sent, never trimmed)."""
        return _ident(self._data.get("id"))

    @property
    def task_status(self) -> str | None:
        """``data.status`` (``ready``, ``failed``…) when it is a non-blank string."""
        return _text(self._data.get("status"))

    @property
    def task_title(self) -> str | None:
        """``data.title`` when it is a non-blank string."""
        return _text(self._data.get("title"))


@dataclass(frozen=True, slots=True, kw_only=True)
class JobCompleted(LacunaEvent):
    """``job.completed``: the task is ready; ``data.tracks`` holds at least one track."""

    data: GenerationTask


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFailed(LacunaEvent):
    """``job.failed``: the task failed; ``data.error`` says why when the provider tells."""

    data: GenerationTask


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(LacunaEvent):
    """An event of a type this version does not model (``data`` as received, ``{}`` when
    absent or not an object), or, from ``parse_event(strict=False)``, a known type that
    is malformed: then ``problem`` says what is wrong."""

    data: Mapping[str, JSONValue] = field(default_factory=lambda: _EMPTY, hash=False)
    problem: str | None = None


TypedEvent: TypeAlias = JobCompleted | JobFailed | UnknownEvent
"""What ``parse_event`` returns."""


def parse_event(event: Event | Mapping[str, Any], *, strict: bool = True) -> TypedEvent:
    """The typed form of a stored ``Event`` or of a parsed event object.

    Returns ``JobCompleted``, ``JobFailed`` or ``UnknownEvent`` by ``type``.
    Raises ``MalformedEvent`` (``param`` names the field) when ``id`` or
    ``type`` is not a non-empty string, or, with ``strict`` (the default), when a
    ``job.completed`` lacks usable tracks; with ``strict=False`` such an event is
    an ``UnknownEvent`` with ``problem`` set. Nothing else is raised, whatever
    the values hold.
    """
    payload: Mapping[Any, Any] = event.payload if isinstance(event, Event) else event
    if not isinstance(payload, Mapping):
        raise MalformedEvent("the event is not an object", param=None)
    event_id = _required_text(payload, "id", "id", None)
    event_type = _required_text(payload, "type", "type", event_id)
    common: dict[str, Any] = {
        "id": event_id,
        "type": event_type,
        "created": _unix_seconds(payload.get("created")),
        "object": _text(payload.get("object")),
        "payload": _view(payload),
        "extra": _extra(payload, LacunaEvent._FIELDS),
    }
    raw_data = payload.get("data")
    data: Mapping[Any, Any] = raw_data if isinstance(raw_data, Mapping) else {}
    try:
        if event_type == JOB_COMPLETED:
            return JobCompleted(**common, data=_completed_task(raw_data, event_id))
        if event_type == JOB_FAILED:
            return JobFailed(**common, data=GenerationTask._parse(data, ()))
    except MalformedEvent as exc:
        if strict:
            raise
        return UnknownEvent(**common, data=_view(data), problem=exc.message)
    return UnknownEvent(**common, data=_view(data))


def _completed_task(raw_data: object, event_id: str) -> GenerationTask:
    if not isinstance(raw_data, Mapping):
        raise _malformed(event_id, "data", "is missing" if raw_data is None else "is not an object")
    value = raw_data.get("tracks")
    if not isinstance(value, list) or not value:
        problem = (
            "is missing"
            if value is None
            else "is empty"
            if isinstance(value, list)
            else "is not a list"
        )
        raise _malformed(event_id, "data.tracks", problem)
    tracks = tuple(
        Track.parse(item, where=f"data.tracks[{index}]", event_id=event_id)
        for index, item in enumerate(value)
    )
    return GenerationTask._parse(raw_data, tracks)


def is_job_completed(event: LacunaEvent) -> TypeGuard[JobCompleted]:
    """True for a ``job.completed`` event; narrows ``event.data.tracks`` to typed tracks."""
    return isinstance(event, JobCompleted)


def is_job_failed(event: LacunaEvent) -> TypeGuard[JobFailed]:
    """True for a ``job.failed`` event; narrows ``event.data.error`` to a ``ProviderError``."""
    return isinstance(event, JobFailed)


__all__ = [
    "JOB_COMPLETED",
    "JOB_FAILED",
    "GenerationTask",
    "JSONValue",
    "JobCompleted",
    "JobFailed",
    "LacunaEvent",
    "MalformedEvent",
    "ProviderError",
    "Track",
    "TypedEvent",
    "UnknownEvent",
    "is_job_completed",
    "is_job_failed",
    "parse_event",
]
