"""Sample events (SPEC §2 shapes), for ``send``, the benchmark and tests."""

from __future__ import annotations

import time
import uuid
from typing import Any


def sample_event(
    event_type: str = "job.completed",
    *,
    event_id: str | None = None,
    task_id: str | None = None,
    created: int | None = None,
    audio_url: str = "https://cdn.lacuna.example/tracks/trk_01.mp3",
) -> dict[str, Any]:
    """A realistic ``job.completed`` or ``job.failed`` event with fresh ids."""
    data: dict[str, Any] = {
        "id": task_id or f"cm{uuid.uuid4().hex[:22]}",
        "object": "music.generation",
        "status": "failed" if event_type == "job.failed" else "ready",
        "title": "Late Night Study",
        "style": "lofi hip hop, mellow piano, 70 bpm",
        "instrumental": True,
    }
    if event_type == "job.failed":
        data["error"] = {
            "type": "api_error",
            "code": "provider_error",
            "message": "Upstream failure.",
            "param": None,
        }
        data["credits_refunded"] = 10
    else:
        data["tracks"] = [
            {
                "id": "trk_01",
                "audio_url": audio_url,
                "duration": 182.4,
                "lyrics": None,
                "format": "mp3",
            }
        ]
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()) if created is None else created,
        "data": data,
    }


KNOWN_TYPES = ("job.completed", "job.failed")


def sample_of_type(
    event_type: str, *, event_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """A sample for ``send --type``: realistic for the two known types (``sample_event``),
    minimal for any other (``id``, ``object``, ``type``, ``created`` and a ``data`` holding
    only a fresh task id and ``object``), to shape further with ``--set``."""
    if event_type in KNOWN_TYPES:
        return sample_event(event_type, event_id=event_id, created=created)
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()) if created is None else created,
        "data": {"id": f"cm{uuid.uuid4().hex[:22]}", "object": "music.generation"},
    }
