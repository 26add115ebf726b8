"""logs.py: the batched stderr writer and URL redaction."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import structlog

from lacuna_webhooks import logs
from lacuna_webhooks.logs import LoopBatchedFile, redact_url


@pytest.fixture(autouse=True)
def _restore_structlog() -> Any:
    """Tests here configure logging globally: put the previous configuration back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


class CountingRaw(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def test_lines_of_one_loop_turn_are_one_write() -> None:
    raw = CountingRaw()
    out = LoopBatchedFile(raw)

    async def main() -> tuple[bytes, int]:
        for i in range(30):
            out.write(b"line %d\n" % i)
            out.flush()
        before = raw.getvalue()
        await asyncio.sleep(0)  # the turn ends
        return before, raw.writes

    before, writes = asyncio.run(main())
    assert before == b""  # nothing is written in the middle of the turn
    assert writes == 1
    assert raw.getvalue() == b"".join(b"line %d\n" % i for i in range(30))


def test_outside_a_loop_lines_are_written_at_once() -> None:
    raw = CountingRaw()
    out = LoopBatchedFile(raw)
    out.write(b"a\n")
    out.flush()
    assert raw.getvalue() == b"a\n"


def test_a_loop_closed_before_its_turn_ended_loses_nothing() -> None:
    """Lines pending when a loop is dropped are written by the next flush, in order, and a
    new loop schedules its own drain."""
    raw = CountingRaw()
    out = LoopBatchedFile(raw)
    loop = asyncio.new_event_loop()

    async def log(text: bytes) -> None:
        out.write(text)
        out.flush()

    loop.run_until_complete(log(b"first\n"))  # its drain is scheduled, never run
    loop.close()

    async def later() -> None:
        await log(b"second\n")
        await asyncio.sleep(0)

    asyncio.run(later())
    assert raw.getvalue() == b"first\nsecond\n"


def test_a_closed_stream_is_not_an_error() -> None:
    raw = io.BytesIO()
    out = LoopBatchedFile(raw)
    raw.close()
    out.write(b"lost\n")
    out.flush()  # nowhere left to write: silently dropped, never raised


def test_redact_url_keeps_scheme_and_host_only() -> None:
    assert (
        redact_url("https://user:pw@hooks.slack.com/services/T/B/X") == "https://hooks.slack.com/…"
    )
    assert redact_url("not a url") == "…"


def _render_with(configure_output: str, log: Callable[[Any], None]) -> list[dict[str, Any]]:
    """Configure JSON logging onto a fresh stderr, run ``log(logger)``, parse what came out."""
    raw = CountingRaw()
    stderr = io.TextIOWrapper(raw, encoding="utf-8")
    old = sys.stderr
    sys.stderr = stderr
    try:
        logs.configure(log_format=configure_output, level="info")
        log(structlog.get_logger("test"))
        logs._batched_stderr().drain()
    finally:
        sys.stderr = old
    return [orjson.loads(line) for line in raw.getvalue().splitlines()]


ENTRIES = [
    {"status": 200, "outcome": "accepted", "event_id": f"evt_{i}", "latency_ms": 1.5}
    for i in range(3)
]


def test_info_lines_renders_what_info_renders_one_line_each() -> None:
    """``info_lines`` gives the same JSON lines as one ``info`` per entry (the timestamps
    aside), through the same processors and output."""

    def one_by_one(logger: Any) -> None:
        for entry in ENTRIES:
            logger.info("webhook.received", **entry)

    def together(logger: Any) -> None:
        logger.info_lines("webhook.received", ENTRIES)

    singles = _render_with("json", one_by_one)
    batched = _render_with("json", together)
    assert len(batched) == 3
    for line in (*singles, *batched):
        assert line.pop("timestamp").endswith("Z")
    assert batched == singles
    assert batched[0] == {**ENTRIES[0], "event": "webhook.received", "level": "info"}


def test_info_lines_respects_the_level() -> None:
    raw = CountingRaw()
    old = sys.stderr
    sys.stderr = io.TextIOWrapper(raw, encoding="utf-8")
    try:
        logs.configure(log_format="json", level="warning")
        structlog.get_logger("test").info_lines("webhook.received", ENTRIES)
        logs._batched_stderr().drain()
    finally:
        sys.stderr = old
    assert raw.getvalue() == b""
