"""logs.py: the batched stderr writer and URL redaction."""

from __future__ import annotations

import asyncio
import io

from lacuna_webhooks.logs import LoopBatchedFile, redact_url


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
