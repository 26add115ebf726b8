"""What the admin routes share: the settings, the store, the handler set and a clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..config import Settings
from ..metrics import Metrics
from ..plugins import HandlerSet
from ..store import Store
from ..store.base import ScanBudget
from .bulk import BulkRunner


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class AdminContext:
    """Built once by ``serve`` (or a test) and handed to every area's ``routes(ctx)``.

    ``store`` is the process's opened store (the admin app never opens or closes it);
    ``handlers`` the configured instances without their objects (names, kinds, filters,
    per-instance settings); ``clock`` gives "now" (UTC-aware) for every decision a route
    makes, so tests can move time. ``stopping`` is set when the admin listener shuts down:
    what would otherwise run on (the live stream, a task's long-poll) ends at once, so the
    server is not held open until its graceful-shutdown timeout. ``search_budget`` replaces
    the ``ScanBudget`` of ``LACUNA_ADMIN_SEARCH_BUDGET`` (tests give tiny windows). ``bulk``
    runs the bulk operations (one at a time); ``serve`` stops it when it stops
    (``BulkRunner.stop``).
    """

    settings: Settings
    store: Store
    handlers: HandlerSet
    metrics: Metrics | None = None
    clock: Callable[[], datetime] = field(default=_utcnow)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    search_budget: ScanBudget | None = None
    bulk: BulkRunner = field(init=False)

    def __post_init__(self) -> None:
        self.bulk = BulkRunner(self.store, clock=self.clock, budget=self.scan_budget())

    def scan_budget(self) -> ScanBudget:
        """The budget of every search the admin makes (``GET /events``, the console, each
        batch of a bulk operation)."""
        if self.search_budget is not None:
            return self.search_budget
        return ScanBudget(self.settings.admin_search_budget_seconds)
