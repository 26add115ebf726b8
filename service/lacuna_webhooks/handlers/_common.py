"""What the built-in handlers share: typed settings, timeouts and a strict reading of events.

Settings are read through ``HandlerContext`` (``LACUNA_<NAME>_<KEY>``); a bad
value is a ``ConfigError`` naming the variable. Event data is read strictly
where a handler depends on it: a ``job.completed`` whose ``tracks`` is missing,
empty, not a list, or holds a track without a string ``id`` and ``audio_url``
is a ``PermanentError`` naming the problem (retrying the same event cannot
fix it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, PermanentError
from ..models import Event
from .base import HandlerContext

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_READ_TIMEOUT_SECONDS = 30.0


def float_setting(ctx: HandlerContext, key: str, default: float) -> float:
    """``LACUNA_<NAME>_<KEY>`` as a finite number > 0, or ``default`` when unset."""
    raw = ctx.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ctx.env_name(key)} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{ctx.env_name(key)} must be a finite number greater than 0")
    return value


def int_setting(ctx: HandlerContext, key: str, default: int) -> int:
    """``LACUNA_<NAME>_<KEY>`` as a whole number > 0, or ``default`` when unset."""
    raw = ctx.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ctx.env_name(key)} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{ctx.env_name(key)} must be greater than 0, got {raw!r}")
    return value


def network_timeouts(ctx: HandlerContext) -> tuple[float, float]:
    """(connect, read) seconds: ``LACUNA_<NAME>_CONNECT_TIMEOUT`` / ``_READ_TIMEOUT``.

    Both must stay below the per-attempt timeout (``ctx.timeout_seconds``) so a
    stuck peer ends as a clear network error, not as the dispatcher's timeout.
    Defaults are 10 s and 30 s, lowered to half the attempt timeout when that is shorter.
    """
    limit = ctx.timeout_seconds
    result = []
    for key, default in (
        ("CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_SECONDS),
        ("READ_TIMEOUT", DEFAULT_READ_TIMEOUT_SECONDS),
    ):
        value = float_setting(ctx, key, min(default, limit / 2))
        if value >= limit:
            raise ConfigError(
                f"{ctx.env_name(key)} ({value:g}) must be smaller than the handler's attempt "
                f"timeout ({limit:g} s, {ctx.env_name('TIMEOUT')} or LACUNA_HANDLER_TIMEOUT)"
            )
        result.append(value)
    return result[0], result[1]


@dataclass(frozen=True, slots=True)
class Track:
    """One track of a ``job.completed`` event."""

    id: str
    audio_url: str
    duration_seconds: float | None
    title: str | None
    format: str | None


@dataclass(frozen=True, slots=True)
class Completed:
    """The parts of a ``job.completed`` event the handlers use."""

    task_id: str | None
    title: str
    style: str | None
    tracks: tuple[Track, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    """The parts of a ``job.failed`` event the handlers use (lenient: a failure is always told)."""

    task_id: str | None
    title: str
    code: str
    message: str | None
    credits_refunded: Any


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def title_of(event: Event) -> str:
    """``data.title``, else ``Task <id>``, else ``Your track``."""
    title = _text(event.data.get("title"))
    if title:
        return title
    return f"Task {event.task_id}" if event.task_id else "Your track"


def parse_completed(event: Event) -> Completed:
    """Read a ``job.completed`` event; raise ``PermanentError`` when its tracks are malformed."""
    tracks_value = event.data.get("tracks")
    if tracks_value is None:
        raise PermanentError(f"event {event.id}: data.tracks is missing")
    if not isinstance(tracks_value, list):
        raise PermanentError(f"event {event.id}: data.tracks is not a list")
    if not tracks_value:
        raise PermanentError(f"event {event.id}: data.tracks is empty")
    tracks: list[Track] = []
    for index, item in enumerate(tracks_value):
        where = f"event {event.id}: data.tracks[{index}]"
        if not isinstance(item, dict):
            raise PermanentError(f"{where} is not an object")
        track_id = item.get("id")
        if not isinstance(track_id, str) or not track_id.strip():
            raise PermanentError(f"{where}.id is missing or not a string")
        audio_url = item.get("audio_url")
        if not isinstance(audio_url, str) or not audio_url.strip():
            raise PermanentError(f"{where}.audio_url is missing or not a string")
        duration = item.get("duration")
        seconds: float | None = None
        if isinstance(duration, int | float) and not isinstance(duration, bool):
            seconds = float(duration) if math.isfinite(duration) and duration >= 0 else None
        tracks.append(
            Track(
                id=track_id,
                audio_url=audio_url.strip(),
                duration_seconds=seconds,
                title=_text(item.get("title")),
                format=_text(item.get("format")),
            )
        )
    return Completed(
        task_id=event.task_id,
        title=title_of(event),
        style=_text(event.data.get("style")),
        tracks=tuple(tracks),
    )


def parse_failed(event: Event) -> Failed:
    """Read a ``job.failed`` event; missing error details become ``unknown_error``."""
    error = event.data.get("error")
    code = message = None
    if isinstance(error, dict):
        code = _text(error.get("code"))
        message = _text(error.get("message"))
    elif isinstance(error, str):
        message = _text(error)
    refunded = event.data.get("credits_refunded")
    if isinstance(refunded, bool) or not isinstance(refunded, int | float):
        refunded = None
    return Failed(
        task_id=event.task_id,
        title=title_of(event),
        code=code or "unknown_error",
        message=message,
        credits_refunded=refunded,
    )


def format_duration(seconds: float | None) -> str:
    """``182.4`` -> ``3:02``; ``None`` -> ``?:??``."""
    if seconds is None:
        return "?:??"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
