"""A handler for end-to-end tests that misbehaves as its event id says, loaded as
``tests.e2e.misbehaving_plugin:Misbehaving``.

Every call first appends ``<event id> <pid>`` to ``LACUNA_MISBEHAVING_PATH``
(so a test sees from outside that an attempt started, and in which process);
then, by the event id's prefix:

- ``evt_sleep_``: ``time.sleep(LACUNA_MISBEHAVING_BLOCK)``, blocking its event loop;
- ``evt_spin_``: a CPU loop for ``LACUNA_MISBEHAVING_BLOCK`` seconds, never yielding;
- ``evt_raise_<Name>``: raises ``SystemExit(0)``, ``KeyboardInterrupt``,
  ``GeneratorExit``, ``CancelledError``, ``Custom`` (a ``BaseException`` subclass) or
  ``Unprintable`` (an exception whose ``__str__`` raises);
- ``evt_fail_``: raises ``RuntimeError`` at once (a handler failing fast, every time);
- ``evt_exit_``: ``os._exit(3)``, as a crash would;
- ``evt_hang_``: ``await asyncio.sleep(3600)`` (cooperative, until cut off or killed);
- anything else: succeeds.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from lacuna_webhooks import Event, HandlerContext


class Custom(BaseException):
    """A plugin's own BaseException subclass."""


class Unprintable(Exception):
    """An exception whose ``__str__`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


RAISES: dict[str, BaseException] = {
    "SystemExit": SystemExit(0),
    "KeyboardInterrupt": KeyboardInterrupt(),
    "GeneratorExit": GeneratorExit(),
    "CancelledError": asyncio.CancelledError(),
    "Custom": Custom("a plugin's own BaseException"),
    "Unprintable": Unprintable(),
}


class Misbehaving:
    name = "misbehaving"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.path = Path(ctx.require("PATH"))
        self.block_seconds = float(ctx.get("BLOCK", "60") or 60)
        self.aclose_block_seconds = float(ctx.get("ACLOSE_BLOCK", "0") or 0)

    async def handle(self, event: Event) -> None:
        with self.path.open("a") as fh:
            fh.write(f"{event.id} {os.getpid()}\n")
        if event.id.startswith("evt_sleep_"):
            time.sleep(self.block_seconds)  # noqa: ASYNC251 - blocking the loop is the point
        elif event.id.startswith("evt_spin_"):
            end = time.monotonic() + self.block_seconds
            while time.monotonic() < end:
                pass
        elif event.id.startswith("evt_raise_"):
            raise RAISES[event.id.removeprefix("evt_raise_")]
        elif event.id.startswith("evt_fail_"):
            raise RuntimeError("fails fast")
        elif event.id.startswith("evt_exit_"):
            os._exit(3)
        elif event.id.startswith("evt_hang_"):
            await asyncio.sleep(3600)

    async def aclose(self) -> None:
        # LACUNA_MISBEHAVING_ACLOSE_BLOCK: block the event loop for that long while closing.
        time.sleep(self.aclose_block_seconds)  # noqa: ASYNC251 - blocking is the point


def started(path: Path) -> list[tuple[str, int]]:
    """(event id, pid) of every attempt started so far, in order."""
    if not path.exists():
        return []
    return [
        (line.split()[0], int(line.split()[1]))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
