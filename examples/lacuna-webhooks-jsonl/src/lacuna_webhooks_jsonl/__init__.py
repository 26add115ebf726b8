"""An example lacuna-webhooks handler plugin: append each event to a JSON Lines file.

``LACUNA_JSONL_FORMAT`` chooses the lines:

- ``raw`` (default): the event's bytes exactly as Lacuna sent them, one line per event;
- ``tracks``: one line per finished track (``job.completed``) and one per failure
  (``job.failed``), read through the typed events of ``lacuna_webhooks.events``;
  other event types write nothing.

Delivery is at least once, so a line may repeat after a crash; readers dedupe by event id.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from lacuna_webhooks import ConfigError, Event, HandlerContext, PermanentError
from lacuna_webhooks.events import is_job_completed, is_job_failed, parse_event

FORMATS = ("raw", "tracks")


def _line(value: dict[str, object]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def track_lines(event: Event) -> list[bytes]:
    """The ``tracks`` format's lines for one event (``MalformedEvent`` when unusable)."""
    typed = parse_event(event)
    if is_job_completed(typed):
        return [
            _line(
                {
                    "event_id": typed.id,
                    "task_id": typed.data.id,
                    "title": typed.data.title,
                    "track_id": track.id,
                    "audio_url": track.audio_url,
                    "duration_seconds": track.duration_seconds,
                }
            )
            for track in typed.data.tracks
        ]
    if is_job_failed(typed):
        error = typed.data.error
        return [
            _line(
                {
                    "event_id": typed.id,
                    "task_id": typed.data.id,
                    "error_code": error.code if error else None,
                    "credits_refunded": typed.data.credits_refunded,
                }
            )
        ]
    return []


class JsonlHandler:
    name = "jsonl"
    events: frozenset[str] | None = None  # every event type unless LACUNA_JSONL_EVENTS says

    def __init__(self, ctx: HandlerContext) -> None:
        self.path = Path(ctx.require("PATH"))  # LACUNA_JSONL_PATH
        if not self.path.is_absolute():
            raise ConfigError(f"{ctx.env_name('PATH')} must be an absolute path")
        self.format = (ctx.get("FORMAT") or "raw").lower()  # LACUNA_JSONL_FORMAT
        if self.format not in FORMATS:
            raise ConfigError(f"{ctx.env_name('FORMAT')} must be one of {', '.join(FORMATS)}")
        self._lock = asyncio.Lock()

    async def handle(self, event: Event) -> None:
        lines = [event.raw] if self.format == "raw" else track_lines(event)
        if not lines:
            return
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, lines)
            except FileNotFoundError as exc:
                raise PermanentError(f"cannot write {self.path}: {exc.strerror}") from None

    def _append(self, lines: list[bytes]) -> None:
        with self.path.open("ab") as fh:
            fh.write(b"".join(line + b"\n" for line in lines))

    async def aclose(self) -> None:
        return None
