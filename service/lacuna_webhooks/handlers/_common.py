"""What the built-in handlers share: typed settings, timeouts and message wording.

Settings are read through ``HandlerContext`` (``LACUNA_<NAME>_<KEY>``); a bad
value is a ``ConfigError`` naming the variable. Events are read with the public
models of ``lacuna_webhooks.events``, as plugins read them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TypeVar

from ..config import at_most, positive_float, positive_int
from ..errors import ConfigError
from ..events import LacunaEvent
from ..redact import redact_text
from .base import HandlerContext, current_results

N = TypeVar("N", int, float)
T = TypeVar("T")

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_READ_TIMEOUT_SECONDS = 30.0


class Problems:
    """The ``ConfigError`` lines of a handler's independent settings, gathered so that its
    constructor reports every bad one at once (docs/configuration.md), not the first:

    >>> problems = Problems()
    >>> size = problems.read(lambda: int_setting(ctx, "MAX_BYTES", 10))  # None if bad
    >>> problems.check()  # ConfigError with every line, if any
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def read(self, read: Callable[[], T]) -> T | None:
        """``read()``, or ``None`` with its problems kept when it raises ``ConfigError``."""
        try:
            return read()
        except ConfigError as exc:
            self.lines.extend(exc.problems)
            return None

    def check(self) -> None:
        """Raise ``ConfigError`` with every line gathered, if any."""
        if self.lines:
            raise ConfigError(self.lines)


def float_setting(
    ctx: HandlerContext,
    key: str,
    default: float,
    maximum: float | None = None,
    minimum: float | None = None,
) -> float:
    """``LACUNA_<NAME>_<KEY>`` as a finite number > 0 (and at most ``maximum``, at least
    ``minimum``), or ``default`` when unset; ``ConfigError`` naming the variable, worded as
    the global settings' errors are."""
    return _number_setting(ctx, key, default, positive_float, maximum, minimum)


def int_setting(ctx: HandlerContext, key: str, default: int, maximum: int | None = None) -> int:
    """``LACUNA_<NAME>_<KEY>`` as a whole number > 0 in ASCII digits (and at most
    ``maximum``), or ``default`` when unset; ``ConfigError`` naming the variable."""
    return _number_setting(ctx, key, default, positive_int, maximum)


def _number_setting(
    ctx: HandlerContext,
    key: str,
    default: N,
    parse: Callable[[str], N],
    maximum: N | None,
    minimum: N | None = None,
) -> N:
    raw = ctx.get(key)
    if raw is None:
        return default
    try:
        return (parse if maximum is None else at_most(parse, maximum, minimum=minimum))(raw)
    except ValueError as exc:
        raise ConfigError(f"{ctx.env_name(key)} {exc}") from None


def network_timeouts(ctx: HandlerContext) -> tuple[float, float]:
    """(connect, read) seconds: ``LACUNA_<NAME>_CONNECT_TIMEOUT`` / ``_READ_TIMEOUT``.

    Both must stay below the per-attempt timeout (``ctx.timeout_seconds``) so a
    stuck peer ends as a clear network error, not as the dispatcher's timeout.
    Defaults are 10 s and 30 s, lowered to half the attempt timeout when that is shorter.
    """
    limit = ctx.timeout_seconds
    problems = Problems()
    result = []
    for key, default in (
        ("CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_SECONDS),
        ("READ_TIMEOUT", DEFAULT_READ_TIMEOUT_SECONDS),
    ):
        value = problems.read(functools.partial(float_setting, ctx, key, min(default, limit / 2)))
        if value is not None and value >= limit:
            problems.lines.append(
                f"{ctx.env_name(key)} ({value:g}) must be smaller than the handler's attempt "
                f"timeout ({limit:g} s, {ctx.env_name('TIMEOUT')} or LACUNA_HANDLER_TIMEOUT)"
            )
        result.append(value or 0.0)
    problems.check()
    return result[0], result[1]


def display_title(event: LacunaEvent) -> str:
    """``data.title``, else ``Task <id>``, else ``Your track``: what a message calls the task."""
    title = event.task_title
    if title:
        return title
    return f"Task {event.task_id}" if event.task_id else "Your track"


#: The longest duration a message shows (99:59:59); a longer one is shown as unknown.
MAX_SHOWN_DURATION_SECONDS = 100 * 3600 - 1


def format_duration(seconds: float | None) -> str:
    """``182.4`` -> ``3:02``; ``None`` -> ``?:??``, and so is a duration past 99:59:59: a
    ``duration`` of ``1e308`` was written out as a 300-digit count of hours, in every mail
    and Slack message about the task."""
    if seconds is None or not 0 <= seconds <= MAX_SHOWN_DURATION_SECONDS:
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


def peer_text(text: str, limit: int) -> str:
    """What a peer answered (a refusal's body), for an error and a log line: on one line,
    its URLs cut to their host and every known secret masked (``redact.redact_text``),
    *then* cut to ``limit`` characters. Cut first, a secret the peer echoed across the cut
    (a request header, a URL's credentials) kept its first characters unmasked."""
    return redact_text(" ".join(text.split()))[:limit]


#: Control characters (C0 but tab and line feed, DEL, C1) and the bidirectional embedding,
#: override and isolate marks. From event text they reached mails and Slack messages raw: a
#: NUL in a Subject or a body breaks RFC 5322 (relays refuse or strip it), an escape sequence
#: repaints a terminal mail reader, and U+202E shows "evil\u202egpj.exe" as "evilexe.jpg".
UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def showable_text(text: str) -> str:
    """Event text as a message for people may carry it: line breaks as ``\n`` (a lone CR
    too), and each control or bidi character (``UNSHOWABLE``) replaced by U+FFFD, so nothing
    from the event vanishes unseen."""
    return UNSHOWABLE.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))
