"""send.py: --set paths and values, and the latency summary, without a network."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from lacuna_webhooks.samples import sample_of_type
from lacuna_webhooks.send import SendError, Summary, apply, parse_assignment, parse_path


def edited(*assignments: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = doc if doc is not None else sample_of_type("job.completed", event_id="evt_1")
    for text in assignments:
        apply(doc, parse_assignment(text))
    return doc


def test_the_issue_example() -> None:
    """--set data.title="Rainy Day" --set data.tracks[0].duration=61.5 (shell quotes removed)."""
    doc = edited("data.title=Rainy Day", "data.tracks[0].duration=61.5")
    assert doc["data"]["title"] == "Rainy Day"
    assert doc["data"]["tracks"][0]["duration"] == 61.5
    assert doc["data"]["tracks"][0]["id"] == "trk_01"  # the rest of the track is kept


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("61.5", 61.5),
        ("7", 7),
        ("true", True),
        ("null", None),
        ('"Rainy Day"', "Rainy Day"),
        ('"42"', "42"),
        ('{"a": [1]}', {"a": [1]}),
        ("Rainy Day", "Rainy Day"),
        ("NaN", "NaN"),
        ("", ""),
        # beyond a double: still a JSON number, as the receiver reads it (was kept as text)
        ("1e999", Decimal("1e999")),
        ("123456789012345678901234567890", Decimal("123456789012345678901234567890")),
    ],
)
def test_values_are_json_when_they_parse(raw: str, value: Any) -> None:
    assert parse_assignment(f"data.x={raw}").value == value


def test_missing_objects_and_lists_are_created_and_an_index_may_append() -> None:
    doc = edited(
        "data.tracks[1].id=trk_02",
        "data.tracks[1].audio_url=https://cdn.example/2.mp3",
        "data.meta.mood.primary=calm",
        "data.stems[0][0]=v",
        "extra_top=1",
    )
    assert doc["data"]["tracks"][1] == {"id": "trk_02", "audio_url": "https://cdn.example/2.mp3"}
    assert doc["data"]["meta"] == {"mood": {"primary": "calm"}}
    assert doc["data"]["stems"] == [["v"]]
    assert doc["extra_top"] == 1


def test_parse_path_steps() -> None:
    assert parse_path("data.tracks[0].duration") == ("data", "tracks", 0, "duration")
    assert parse_path("a[1][2].b c") == ("a", 1, 2, "b c")
    # Leading zeros at any length are still the number (int() refuses past 4300 digits).
    assert parse_path("a[" + "0" * 5000 + "7]") == ("a", 7)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data.title", "expected PATH=VALUE"),
        ("=1", "the path is empty"),
        ("data..x=1", "bad path at '..x'"),
        ("data.=1", "bad path at '.'"),
        ("[0]=1", "bad path at '[0]'"),
        ("data[x]=1", "bad path at '[x]'"),
        ("data[0]x=1", "bad path at 'x'"),
        ("data. title=1", "spaces around it"),
        ("data.tracks[99999999]=1", "larger than 10000"),
        # int() of more than 4300 digits raised ValueError: a traceback from `send`.
        ("data.tracks[" + "9" * 5000 + "]=1", "larger than 10000"),
        # Only ASCII digits are an index (\d took ٣ as 3).
        ("data.tracks[\u0663]=1", "bad path at '[\u0663]'"),
    ],
)
def test_a_bad_path_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(SendError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_assignment(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data.title.x=1", "data.title is a string, not an object"),
        ("data.tracks.x=1", "data.tracks is a list, not an object"),
        ("data[0]=1", "data is an object, not a list"),
        ("data.tracks[3].id=x", r"data.tracks has 1 item\(s\); \[3\] is past its end"),
        ("data.instrumental[0]=1", "data.instrumental is a boolean, not a list"),
    ],
)
def test_a_path_that_does_not_fit_the_event_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(SendError, match=message):
        edited(text)


def test_minimal_sample_for_other_types() -> None:
    """Any type: a minimal event (id, object, type, created, data with a task id)."""
    doc = sample_of_type("job.started", event_id="evt_x", created=5)
    assert doc["type"] == "job.started"
    assert set(doc) == {"id", "object", "type", "created", "data"}
    assert set(doc["data"]) == {"id", "object"}
    assert sample_of_type("job.failed")["data"]["error"]["code"] == "provider_error"


def test_summary_percentiles_and_statuses() -> None:
    """Nearest-rank percentiles over answered requests; failures counted by kind."""
    summary = Summary(latencies_seconds=[i / 1000 for i in range(1, 101)], elapsed_seconds=2.0)
    summary.statuses.update({"200": 98, "503": 1, "error: ConnectError": 1})
    assert summary.percentile_ms(0.5) == pytest.approx(50)
    assert summary.percentile_ms(0.99) == pytest.approx(99)
    assert summary.percentile_ms(1.0) == pytest.approx(100)
    lines = summary.lines("http://h/webhooks/lacuna", 4)
    assert (
        lines[0] == "sent 100 events to http://h/webhooks/lacuna in 2.00 s (50.0/s, concurrency 4)"
    )
    assert lines[1] == "status: 200 x98, 503 x1, error: ConnectError x1"
    assert lines[2] == "latency ms: p50 50.0  p90 90.0  p99 99.0  max 100.0"
    assert not summary.all_succeeded
