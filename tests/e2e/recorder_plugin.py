"""A handler for end-to-end tests, loaded as ``tests.e2e.recorder_plugin:FileRecorder``.

It appends one line per call, ``<event id> <pid>``, to ``LACUNA_RECORDER_PATH``
after sleeping ``LACUNA_RECORDER_DELAY`` seconds, so a test can see from
another process what was delivered, by which process, and how often.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from lacuna_webhooks import Event, HandlerContext


class FileRecorder:
    name = "recorder"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.path = Path(ctx.require("PATH"))
        self.delay = float(ctx.get("DELAY", "0") or 0)

    async def handle(self, event: Event) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.path.open("a") as fh:
            fh.write(f"{event.id} {os.getpid()}\n")

    async def aclose(self) -> None:
        return None


def recorded(path: Path) -> list[str]:
    """Event ids recorded so far, one per delivery (repeats included)."""
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
