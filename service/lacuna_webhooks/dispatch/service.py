"""The dispatch side of one process, as ``serve`` and ``worker`` run it: the dispatcher
(with its runner) and the retention task, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

from ..config import Settings
from ..metrics import Metrics
from ..plugins import HandlerSet
from ..retry import RetryPolicy
from ..store.base import Store
from .dispatcher import Dispatcher
from .flow import read_flow_control
from .retention import Retention
from .runner import AttemptRunner


class DispatchService:
    """``run()`` until ``stop()``; ``stop`` drains the dispatcher within its bound."""

    def __init__(self, dispatcher: Dispatcher, retention: Retention | None) -> None:
        self.dispatcher = dispatcher
        self.retention = retention
        self._retention_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        if self.retention is not None:
            self._retention_task = asyncio.create_task(self.retention.run(), name="retention")
        try:
            await self.dispatcher.run()
        finally:
            await self._end_retention()

    async def stop(self, timeout_seconds: float) -> None:
        """Stop claiming; let in-flight attempts finish for up to ``timeout_seconds``, then
        release the rest and end the handler workers (see ``Dispatcher.stop``)."""
        await self._end_retention()
        await self.dispatcher.stop(timeout_seconds)

    async def _end_retention(self) -> None:
        if self.retention is not None:
            self.retention.stop()
        task, self._retention_task = self._retention_task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _since_boot() -> float:
    """Seconds on a clock that never steps and, unlike ``time.monotonic``, goes on while the
    machine sleeps (Linux's ``CLOCK_BOOTTIME``; the monotonic clock elsewhere): against the
    monotonic one, a laptop's or a VM's resume read as a step forward of the wall clock by the
    sleep, and a later step back then left what was written before the sleep unmoved."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.monotonic() if boottime is None else time.clock_gettime(boottime)


def build_dispatch(
    settings: Settings,
    store: Store,
    handlers: HandlerSet,
    *,
    metrics: Metrics | None = None,
    runner: AttemptRunner | None = None,
) -> DispatchService:
    """The dispatcher and retention ``settings`` describe. ``runner`` defaults to running
    handlers on this loop (tests); ``serve`` and ``worker`` pass a ``WorkerPool``.

    Raises ``ConfigError`` for a bad ``LACUNA_<NAME>_*`` flow-control setting (``flow.py``).
    """
    dispatcher = Dispatcher(
        store,
        handlers,
        policy=RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay_seconds=settings.retry_base_delay_seconds,
            max_delay_seconds=settings.retry_max_delay_seconds,
        ),
        runner=runner,
        concurrency=settings.handler_concurrency,
        poll_interval_seconds=settings.poll_interval_seconds,
        metrics=metrics,
        flow=read_flow_control(handlers.names, settings.environ),
        monotonic=_since_boot,
    )
    retention = Retention(store, timedelta(days=settings.retention_days))
    return DispatchService(dispatcher, retention)


__all__ = ["DispatchService", "build_dispatch"]
