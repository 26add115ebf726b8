"""A handler for end-to-end tests that notices two runs of one event at the same time.

Loaded as ``tests.e2e.overlap_plugin:OverlapRecorder``. For each call it creates
``<LACUNA_OVERLAP_DIR>/<event id>.running`` exclusively (``O_EXCL``), sleeps
``LACUNA_OVERLAP_DELAY`` seconds, removes the file and appends ``<event id> <pid>`` to
``done.txt`` there. A call that finds the file already present (another process is
running the same event right now) appends ``<event id> <pid>`` to ``overlaps.txt``.
No clock is compared, so the processes' clocks may disagree (that is what is tested).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from lacuna_webhooks import Event, HandlerContext


class OverlapRecorder:
    name = "overlap"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.folder = Path(ctx.require("DIR"))
        self.delay = float(ctx.get("DELAY", "0") or 0)

    async def handle(self, event: Event) -> None:
        marker = self.folder / f"{event.id}.running"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with (self.folder / "overlaps.txt").open("a") as fh:
                fh.write(f"{event.id} {os.getpid()}\n")
            owner = False
        else:
            os.close(fd)
            owner = True
        try:
            await asyncio.sleep(self.delay)
        finally:
            if owner:
                marker.unlink()
        with (self.folder / "done.txt").open("a") as fh:
            fh.write(f"{event.id} {os.getpid()}\n")

    async def aclose(self) -> None:
        return None


def lines(path: Path) -> list[tuple[str, str]]:
    """(event id, pid) of every line written so far."""
    if not path.exists():
        return []
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line.strip()]  # type: ignore[misc]
