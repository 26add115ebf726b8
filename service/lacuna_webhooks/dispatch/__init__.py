"""Dispatch: the claim/record loop, the pure attempt decision, handler worker processes,
and retention. ``docs/workers.md`` describes how the processes share the work."""

from __future__ import annotations

from .attempt import Decision, Ending, Outcome, classify, decide, describe_error
from .dispatcher import DEFAULT_TIMEOUT_SECONDS, LEASE_MARGIN, Dispatcher
from .retention import Retention
from .runner import AttemptRunner, InProcessRunner

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "LEASE_MARGIN",
    "AttemptRunner",
    "Decision",
    "Dispatcher",
    "Ending",
    "InProcessRunner",
    "Outcome",
    "Retention",
    "classify",
    "decide",
    "describe_error",
]
