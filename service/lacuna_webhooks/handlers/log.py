"""The ``log`` handler: writes one structured log line per event. The simplest example."""

from __future__ import annotations

import structlog

from ..events import UnknownEvent, parse_event
from ..models import Event
from .base import HandlerContext

logger = structlog.get_logger("lacuna_webhooks.handlers.log")


class LogHandler:
    """Logs ``handler.log.event`` with the event id, type, task id and status.

    Reads the event leniently (``strict=False``): a malformed ``job.completed``
    is still logged, with ``problem`` saying what is wrong.
    """

    name = "log"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name

    async def handle(self, event: Event) -> None:
        typed = parse_event(event, strict=False)
        problem = typed.problem if isinstance(typed, UnknownEvent) else None
        logger.info(
            "handler.log.event",
            event_id=typed.id,
            event_type=typed.type,
            task_id=typed.task_id,
            task_status=typed.task_status,
            **({"problem": problem} if problem else {}),
        )

    async def aclose(self) -> None:
        return None
