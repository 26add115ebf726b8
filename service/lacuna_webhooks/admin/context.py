"""What the admin routes share: the settings, the store, the handler set and a clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..config import Settings
from ..metrics import Metrics
from ..plugins import HandlerSet
from ..store import Store
from .bulk import BulkRunner


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class AdminContext:
    """Built once by ``serve`` (or a test) and handed to every area's ``routes(ctx)``.

    ``store`` is the process's opened store (the admin app never opens or closes it);
    ``handlers`` the configured instances without their objects (names, kinds, filters,
    per-instance settings); ``clock`` gives "now" (UTC-aware) for every decision a route
    makes, so tests can move time. ``bulk`` runs the bulk operations (one at a time); ``serve``
    stops it when it stops (``BulkRunner.stop``).
    """

    settings: Settings
    store: Store
    handlers: HandlerSet
    metrics: Metrics | None = None
    clock: Callable[[], datetime] = field(default=_utcnow)
    bulk: BulkRunner = field(init=False)

    def __post_init__(self) -> None:
        self.bulk = BulkRunner(self.store, clock=self.clock)
