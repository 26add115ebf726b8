"""What the built-in handlers share: typed settings, timeouts and message wording.

Settings are read through ``HandlerContext`` (``LACUNA_<NAME>_<KEY>``); a bad
value is a ``ConfigError`` naming the variable. Events are read with the public
models of ``lacuna_webhooks.events``, as plugins read them.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from ..events import LacunaEvent
from .base import HandlerContext, current_results

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_READ_TIMEOUT_SECONDS = 30.0


def float_setting(
    ctx: HandlerContext, key: str, default: float, *, maximum: float | None = None
) -> float:
    """``LACUNA_<NAME>_<KEY>`` as a finite number > 0 (and at most ``maximum``), or
    ``default`` when unset."""
    raw = ctx.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ctx.env_name(key)} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{ctx.env_name(key)} must be a finite number greater than 0")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{ctx.env_name(key)} must be at most {maximum:g}, got {raw!r}")
    return value


def int_setting(ctx: HandlerContext, key: str, default: int, *, maximum: int | None = None) -> int:
    """``LACUNA_<NAME>_<KEY>`` as a whole number > 0 (and at most ``maximum``), or
    ``default`` when unset."""
    raw = ctx.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ctx.env_name(key)} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{ctx.env_name(key)} must be greater than 0, got {raw!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{ctx.env_name(key)} must be at most {maximum}, got {raw!r}")
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


def display_title(event: LacunaEvent) -> str:
    """``data.title``, else ``Task <id>``, else ``Your track``: what a message calls the task."""
    title = event.task_title
    if title:
        return title
    return f"Task {event.task_id}" if event.task_id else "Your track"


def format_duration(seconds: float | None) -> str:
    """``182.4`` -> ``3:02``; ``None`` -> ``?:??``."""
    if seconds is None:
        return "?:??"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def stored_location() -> str | None:
    """Where a handler this one runs after (``LACUNA_<NAME>_AFTER``) stored the event's
    audio: the ``location`` (a ``file://`` or ``s3://`` URL) of the first prerequisite
    result that has one, as ``storage`` returns it (SPEC §6); None otherwise."""
    for result in (current_results.get() or {}).values():
        location = result.get("location") if isinstance(result, dict) else None
        if isinstance(location, str) and location.startswith(("file://", "s3://")):
            return location
    return None
