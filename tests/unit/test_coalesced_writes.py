"""server._CoalescedWrites: the writes of one loop turn go out as one ``send``, a streamed
response's head is not held past its turn, and close sends what is pending first."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from lacuna_webhooks.server import _CoalescedWrites


class Recording(asyncio.Transport):
    """A transport that records what reaches it (the socket's view)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


async def test_head_and_body_of_one_turn_are_one_send() -> None:
    raw = Recording()
    coalesced = _CoalescedWrites(raw, asyncio.get_running_loop())
    coalesced.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    coalesced.write(b"{}")
    assert raw.sent == []
    coalesced.flush()  # what on_response_complete does
    assert raw.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)  # the end-of-turn flush finds nothing left
    assert len(raw.sent) == 1


async def test_a_streamed_head_is_sent_at_the_end_of_its_turn() -> None:
    raw = Recording()
    coalesced = _CoalescedWrites(raw, asyncio.get_running_loop())
    coalesced.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
    await asyncio.sleep(0)
    assert raw.sent == [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"]
    coalesced.write(b"data: 1\n\n")
    await asyncio.sleep(0)
    assert raw.sent[-1] == b"data: 1\n\n"


async def test_close_sends_what_is_pending_then_closes() -> None:
    raw = Recording()
    coalesced = _CoalescedWrites(raw, asyncio.get_running_loop())
    coalesced.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    coalesced.close()
    assert raw.sent == [b"HTTP/1.1 408 Request Timeout\r\n\r\n"]
    assert raw.closed
    coalesced.write(b"late")  # after close: dropped at the end of the turn, never raised
    await asyncio.sleep(0)
    assert len(raw.sent) == 1
    assert cast(Any, coalesced).get_extra_info("peername") == ("127.0.0.1", 1)
