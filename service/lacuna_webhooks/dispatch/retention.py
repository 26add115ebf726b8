"""Retention: a task of its own that prunes old, fully delivered events from the store.

It runs beside the dispatcher (in ``serve`` when it dispatches, and in
``worker``): at start, then every ``interval_seconds``. On PostgreSQL several
replicas may prune at once; a prune is one idempotent delete, so that costs
only a repeated query. A store that is down is logged and tried again at the
next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from ..errors import StoreUnavailable
from ..store.base import Store
from .attempt import describe_error

DEFAULT_INTERVAL_SECONDS = 3600.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Retention:
    """Prune events received more than ``retention`` ago whose deliveries are all done or
    dead (``Store.prune``), every ``interval_seconds`` until ``stop()``."""

    def __init__(
        self,
        store: Store,
        retention: timedelta,
        *,
        interval_seconds: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.retention = retention
        self.interval_seconds = interval_seconds
        self.clock = clock
        self.passes = 0  # prune passes finished (pruned or not), for tests
        self._stop = asyncio.Event()
        self._log = structlog.get_logger("lacuna_webhooks.retention")

    async def prune_once(self) -> int:
        """One pass; the number of events pruned. Raises ``StoreUnavailable``."""
        pruned = await self.store.prune(
            received_before=self.clock() - self.retention, keep=self.retention
        )
        # Quiet when there was nothing to do: this runs at every start and every interval.
        log = self._log.info if pruned else self._log.debug
        log("store.pruned", events=pruned, retention_days=self.retention.total_seconds() / 86400)
        return pruned

    async def run(self) -> None:
        """Prune now and then every interval; return once ``stop()`` is called."""
        while not self._stop.is_set():
            try:
                await self.prune_once()
            except StoreUnavailable as exc:
                self._log.warning("store.prune_failed", error=describe_error(exc))
            self.passes += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_seconds):
                    await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


__all__ = ["DEFAULT_INTERVAL_SECONDS", "Retention"]
