"""Where attempts run: the ``AttemptRunner`` protocol, and the in-process runner for tests.

The dispatcher hands each claimed delivery to a runner and records the
``Outcome`` it answers. ``serve`` and ``worker`` use ``workers.WorkerPool``
(each handler in a worker process of its own); ``InProcessRunner`` runs
``handle()`` on the dispatcher's own event loop and exists for tests and for
embedding the app in another program: there a handler that blocks blocks the
loop, and a timeout cannot end it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..handlers.base import Handler
from ..models import Delivery, Event
from ..plugins import HandlerSet
from .attempt import Outcome, run_attempt


class AttemptRunner(Protocol):
    """Runs one attempt of a delivery's handler somewhere and answers its ``Outcome``."""

    async def start(self, on_ready: Callable[[], None]) -> None:
        """Start; call ``on_ready`` whenever a handler becomes ready (again)."""

    def ready(self, handler: str) -> bool:
        """Whether ``handler`` can take an attempt now (claim only for ready handlers)."""

    async def run(self, delivery: Delivery, timeout_seconds: float) -> Outcome:
        """Run one attempt; never raises for the handler's failure. Cancelling it stops the
        attempt (as far as the handler lets itself be stopped)."""

    async def close(self) -> None:
        """End every attempt still running and free what ``start`` took."""


class RunAttempt(Protocol):
    """``attempt.run_attempt``'s shape (``tracing.Tracing.run_attempt`` wraps it in a span)."""

    async def __call__(
        self,
        handler: Handler,
        event: Event,
        timeout_seconds: float,
        *,
        attempt: int | None = None,
        results: Mapping[str, Any] | None = None,
    ) -> Outcome: ...


class InProcessRunner:
    """``handle()`` on the caller's event loop: for tests and embedding, not for ``serve``.

    ``run`` runs one attempt: ``attempt.run_attempt``, or the traced one when tracing is on.
    """

    def __init__(self, handlers: HandlerSet, *, run: RunAttempt = run_attempt) -> None:
        self.handlers = handlers
        self._run = run

    async def start(self, on_ready: Callable[[], None]) -> None:
        return None

    def ready(self, handler: str) -> bool:
        return handler in self.handlers.handlers

    async def run(self, delivery: Delivery, timeout_seconds: float) -> Outcome:
        handler = self.handlers.handlers[delivery.handler]
        return await self._run(
            handler,
            delivery.event,
            timeout_seconds,
            attempt=delivery.attempts,
            results=delivery.results,
        )

    async def close(self) -> None:
        return None


__all__ = ["AttemptRunner", "InProcessRunner", "RunAttempt"]
