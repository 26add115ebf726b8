"""examples/lacuna-webhooks-jsonl: its `tracks` format reads events through the typed models."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from lacuna_webhooks import ConfigError, HandlerContext, MalformedEvent
from lacuna_webhooks.models import Event
from tests.conftest import make_event

SRC = Path(__file__).resolve().parents[2] / "examples" / "lacuna-webhooks-jsonl" / "src"


@pytest.fixture
def plugin() -> Iterator[ModuleType]:
    sys.path.insert(0, str(SRC))
    try:
        import lacuna_webhooks_jsonl

        yield lacuna_webhooks_jsonl
    finally:
        sys.path.remove(str(SRC))
        sys.modules.pop("lacuna_webhooks_jsonl", None)


def as_event(payload: dict[str, object]) -> Event:
    return Event.from_body(orjson.dumps(payload))


def test_tracks_format_writes_a_line_per_track_and_per_failure(
    plugin: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    env = {"LACUNA_JSONL_PATH": str(out), "LACUNA_JSONL_FORMAT": "tracks"}
    handler = plugin.JsonlHandler(HandlerContext("jsonl", environ=env))
    tracks = [
        {"id": "t1", "audio_url": "https://c.example/1.mp3", "duration": 61.5},
        {"id": "t2", "audio_url": "https://c.example/2.mp3", "duration": "NaN"},
    ]

    async def run() -> None:
        await handler.handle(as_event(make_event("evt_ok", tracks=tracks)))
        await handler.handle(as_event(make_event("evt_fail", "job.failed")))
        await handler.handle(as_event(make_event("evt_other", "job.started")))
        with pytest.raises(MalformedEvent, match=r"data\.tracks is empty"):
            await handler.handle(as_event(make_event("evt_bad", tracks=[])))

    asyncio.run(run())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["event_id"], x.get("track_id"), x.get("duration_seconds")) for x in lines] == [
        ("evt_ok", "t1", 61.5),
        ("evt_ok", "t2", None),
        ("evt_fail", None, None),
    ]
    assert lines[2]["error_code"] == "provider_error"


def test_an_unknown_format_is_a_config_error(plugin: ModuleType, tmp_path: Path) -> None:
    env = {"LACUNA_JSONL_PATH": str(tmp_path / "o"), "LACUNA_JSONL_FORMAT": "csv"}
    with pytest.raises(ConfigError, match="LACUNA_JSONL_FORMAT must be one of raw, tracks"):
        plugin.JsonlHandler(HandlerContext("jsonl", environ=env))
