"""An example lacuna-webhooks handler plugin: append each event to a JSON Lines file.

Delivery is at least once, so a line may repeat after a crash; readers dedupe by ``id``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lacuna_webhooks import ConfigError, Event, HandlerContext, PermanentError


class JsonlHandler:
    name = "jsonl"
    events: frozenset[str] | None = None  # every event type unless LACUNA_JSONL_EVENTS says

    def __init__(self, ctx: HandlerContext) -> None:
        self.path = Path(ctx.require("PATH"))  # LACUNA_JSONL_PATH
        if not self.path.is_absolute():
            raise ConfigError(f"{ctx.env_name('PATH')} must be an absolute path")
        self._lock = asyncio.Lock()

    async def handle(self, event: Event) -> None:
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, event.raw)
            except FileNotFoundError as exc:
                raise PermanentError(f"cannot write {self.path}: {exc.strerror}") from None

    def _append(self, raw: bytes) -> None:
        with self.path.open("ab") as fh:
            fh.write(raw + b"\n")

    async def aclose(self) -> None:
        return None
