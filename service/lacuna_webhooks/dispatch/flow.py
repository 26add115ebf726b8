"""Flow control per handler (SPEC §6, docs/flow-control.md): its settings, read once at start.

- ``LACUNA_<NAME>_PAUSE_AFTER_FAILURES=N``: pause the handler after N consecutive failed
  attempts (a retry or a dead outcome; a success resets the count, kept in the store so it
  holds across replicas and restarts). Unset: never.

Pausing itself (``lacuna-webhooks handlers pause NAME``) needs no setting: the paused set
lives in the store (``Store.set_paused`` / ``paused_handlers``) and the dispatcher reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class FlowControl:
    """One handler's flow-control settings; the defaults mean "no limit"."""

    pause_after_failures: int | None = None


def _pause_after(handler: str, environ: Mapping[str, str]) -> int | None:
    variable = f"LACUNA_{handler.upper()}_PAUSE_AFTER_FAILURES"
    raw = environ.get(variable, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{variable} must be a whole number of at least 1, got {raw!r}")
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
        try:
            found[name] = FlowControl(pause_after_failures=_pause_after(name, environ))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return found


__all__ = ["FlowControl", "read_flow_control"]
