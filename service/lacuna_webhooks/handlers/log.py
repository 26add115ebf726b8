"""The ``log`` handler: writes one structured log line per event. The simplest example."""

from __future__ import annotations

import structlog

from ..models import Event
from .base import HandlerContext

logger = structlog.get_logger("lacuna_webhooks.handlers.log")


class LogHandler:
    """Logs ``handler.log.event`` with the event id, type, task id and status."""

    name = "log"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name

    async def handle(self, event: Event) -> None:
        logger.info(
            "handler.log.event",
            event_id=event.id,
            event_type=event.type,
            task_id=event.task_id,
            task_status=event.task_status,
        )

    async def aclose(self) -> None:
        return None
