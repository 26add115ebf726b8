"""Flow control per handler (SPEC §6, docs/flow-control.md): its settings, read once at start.

- ``LACUNA_<NAME>_PAUSE_AFTER_FAILURES=N``: pause the handler after N consecutive failed
  attempts (a retry or a dead outcome; a success resets the count, kept in the store so it
  holds across replicas and restarts). Unset: never.
- ``LACUNA_<NAME>_RATE_LIMIT=N/s|N/m|N/h``: at most N attempts started per period across
  every process sharing the store: a token bucket holding at most N, refilled continuously
  at N per period (``Store.take_tokens``). Unset: no limit.

Pausing itself (``lacuna-webhooks handlers pause NAME``) needs no setting: the paused set
lives in the store (``Store.set_paused`` / ``paused_handlers``) and the dispatcher reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import ConfigError

_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# Leading zeros allowed, however many, as in every whole number (docs/configuration.md): they
# counted against the twelve digits, and `0000000000001/s` was refused.
_RATE = re.compile(r"\s*0*([0-9]{1,12})\s*/\s*([smh])\s*")
#: Upper bounds of the per-handler values: far above any real use, low enough that a typo
#: (an extra digit or five) is reported instead of becoming a limit that never applies.
MAX_RATE = 1_000_000
MAX_PAUSE_AFTER = 1_000_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` attempts started per ``period_seconds``: the bucket's capacity is
    ``count`` and it refills at ``per_second``."""

    count: int
    period_seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.period_seconds


@dataclass(frozen=True, slots=True)
class FlowControl:
    """One handler's flow-control settings; the defaults mean "no limit"."""

    pause_after_failures: int | None = None
    rate_limit: RateLimit | None = None


def parse_rate_limit(variable: str, raw: str) -> RateLimit:
    """``"10/s"`` -> ``RateLimit(10, 1.0)`` (``s``, ``m`` or ``h``; N at least 1); a bad
    value raises ``ConfigError`` naming ``variable``."""
    match = _RATE.fullmatch(raw)
    if match is None or not 1 <= int(match.group(1)) <= MAX_RATE:
        raise ConfigError(
            f"{variable} must be N/s, N/m or N/h with N a whole number from 1 to {MAX_RATE} "
            f"(e.g. 1/s), got {raw!r}"
        )
    return RateLimit(int(match.group(1)), _PERIODS[match.group(2)])


def _rate_limit(handler: str, environ: Mapping[str, str]) -> RateLimit | None:
    variable = f"LACUNA_{handler.upper()}_RATE_LIMIT"
    raw = environ.get(variable, "")
    return parse_rate_limit(variable, raw) if raw.strip() else None


def _pause_after(handler: str, environ: Mapping[str, str]) -> int | None:
    variable = f"LACUNA_{handler.upper()}_PAUSE_AFTER_FAILURES"
    raw = environ.get(variable, "").strip()
    if not raw:
        return None
    value = int(raw) if re.fullmatch(r"[+-]?0*[0-9]{1,12}", raw) else 0
    if not 1 <= value <= MAX_PAUSE_AFTER:
        raise ConfigError(
            f"{variable} must be a whole number from 1 to {MAX_PAUSE_AFTER}, got {raw!r}"
        )
    return value


def read_flow_control(
    handlers: Iterable[str], environ: Mapping[str, str]
) -> dict[str, FlowControl]:
    """Each handler's ``FlowControl`` from ``LACUNA_<NAME>_*``.

    Raises ``ConfigError`` listing every bad value (one line each).
    """
    problems: list[str] = []
    found: dict[str, FlowControl] = {}
    for name in handlers:
        pause_after: int | None = None
        rate_limit: RateLimit | None = None
        try:
            pause_after = _pause_after(name, environ)
        except ConfigError as exc:
            problems.extend(exc.problems)
        try:
            rate_limit = _rate_limit(name, environ)
        except ConfigError as exc:
            problems.extend(exc.problems)
        found[name] = FlowControl(pause_after_failures=pause_after, rate_limit=rate_limit)
    if problems:
        raise ConfigError(problems)
    return found


__all__ = ["FlowControl", "RateLimit", "parse_rate_limit", "read_flow_control"]
