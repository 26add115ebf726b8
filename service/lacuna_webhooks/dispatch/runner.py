"""Where attempts run: the ``AttemptRunner`` protocol, and the in-process runner for tests.

The dispatcher hands each claimed delivery to a runner and records the
``Outcome`` it answers. ``serve`` and ``worker`` use ``workers.WorkerPool``
(each handler in a worker process of its own); ``InProcessRunner`` runs
``handle()`` on the dispatcher's own event loop and exists for tests and for
embedding the app in another program: there a handler that blocks blocks the
loop, and a timeout cannot end it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..models import Delivery
from ..plugins import HandlerSet
from .attempt import Outcome, run_attempt

if TYPE_CHECKING:
    from ..tracing import Tracing


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


class InProcessRunner:
    """``handle()`` on the caller's event loop: for tests and embedding, not for ``serve``.

    With ``tracing`` each attempt runs in its span (``tracing.Tracing.run_attempt``).
    """

    def __init__(self, handlers: HandlerSet, *, tracing: Tracing | None = None) -> None:
        self.handlers = handlers
        self.tracing = tracing

    async def start(self, on_ready: Callable[[], None]) -> None:
        return None

    def ready(self, handler: str) -> bool:
        return handler in self.handlers.handlers

    async def run(self, delivery: Delivery, timeout_seconds: float) -> Outcome:
        handler = self.handlers.handlers[delivery.handler]
        if self.tracing is not None:
            return await self.tracing.run_attempt(
                handler,
                delivery.event,
                timeout_seconds,
                attempt=delivery.attempts,
                results=delivery.results,
                trace_context=delivery.trace_context,
            )
        return await run_attempt(
            handler,
            delivery.event,
            timeout_seconds,
            attempt=delivery.attempts,
            results=delivery.results,
        )

    async def close(self) -> None:
        return None


__all__ = ["AttemptRunner", "InProcessRunner"]
