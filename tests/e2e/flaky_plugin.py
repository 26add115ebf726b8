"""A handler for end-to-end tests whose first attempt at an event fails, loaded as
``tests.e2e.flaky_plugin:FailsOnce``.

Every call appends ``<event id> <pid>`` to ``LACUNA_FLAKY_PATH``, then sleeps
``LACUNA_FLAKY_DELAY`` seconds (default 0, ``asyncio.sleep``: the monotonic clock); the
first call for an event then raises ``RuntimeError`` (a retry on the schedule), every later
one succeeds. The file is the count, so a test sees from another process when each attempt
started.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from lacuna_webhooks import Event, HandlerContext


class FailsOnce:
    name = "flaky"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.path = Path(ctx.require("PATH"))
        self.delay = float(ctx.get("DELAY", "0") or 0)

    async def handle(self, event: Event) -> None:
        before = attempts(self.path).count(event.id)
        with self.path.open("a") as fh:
            fh.write(f"{event.id} {os.getpid()}\n")
        if self.delay:
            await asyncio.sleep(self.delay)
        if before == 0:
            raise RuntimeError("the first attempt fails")

    async def aclose(self) -> None:
        return None


def attempts(path: Path) -> list[str]:
    """The event id of every attempt so far, in order."""
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
