"""``tail`` / ``listen`` (``listen.follow_stream``) against a real hostile HTTP server that
streams an endless line, then endless ``data:`` lines of one message, then a quiet stream of
keepalives before a real event.

httpx-sse buffers a line, and a message's data lines, without bound: each hostile
connection used to grow the client's memory for as long as the server sent. Now more than
``MAX_MESSAGE_CHARS`` without a message's end is one "stream: lost (...)" line and a
reconnect, and the server gets to send little past the cap before the client hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest

from lacuna_webhooks import listen
from lacuna_webhooks.listen import MAX_MESSAGE_CHARS, Target

MIB = 1024 * 1024
#: What a hostile connection sends at most (then it holds the connection open, silent),
#: so that a client without the cap waits instead of taking all memory.
HOSTILE_LIMIT = 64 * MIB
CHUNK = 64 * 1024


class HostileStream:
    """A raw asyncio HTTP server: connection 1 streams one endless line, connection 2
    endless ``data:`` lines with no blank line, connection 3 2 MiB of keepalive comments
    (each a whole message) and then one real event."""

    def __init__(self) -> None:
        self.connections = 0
        self.sent: list[int] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.sent.append(0)
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            )
            if number == 1:
                writer.write(b"data: ")
                await self._send(writer, number, b"x" * CHUNK)
            elif number == 2:
                await self._send(writer, number, b"data: " + b"y" * 1000 + b"\n")
            else:
                await self._send(writer, number, b": keepalive\r\n\r\n", limit=2 * MIB)
                event = {"id": "evt_after", "type": "job.completed"}
                writer.write(b"id: c1\nevent: event\ndata: " + orjson.dumps(event) + b"\n\n")
                await writer.drain()
            await reader.read()  # silent until the client hangs up
        writer.close()

    async def _send(
        self, writer: asyncio.StreamWriter, number: int, piece: bytes, limit: int = HOSTILE_LIMIT
    ) -> None:
        while self.sent[number - 1] < limit:
            writer.write(piece)
            await writer.drain()
            self.sent[number - 1] += len(piece)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def _follow(
    port: int, on_event: Callable[[str, dict[str, Any]], Awaitable[None]], say: Callable[[str], Any]
) -> Coroutine[Any, Any, None]:
    """``listen.follow_stream`` of the stream served on ``port``, from now."""
    return listen.follow_stream(
        Target(f"http://127.0.0.1:{port}", "adm_tok"), None, on_event, say=say
    )


async def _follow_until(
    arrived: asyncio.Event,
    port: int,
    on_event: Callable[[str, dict[str, Any]], Awaitable[None]],
    say: Callable[[str], Any],
) -> None:
    """Follow the stream on ``port`` until ``arrived`` is set (at most 30 s), then stop."""
    follow = asyncio.create_task(_follow(port, on_event, say))
    try:
        await asyncio.wait_for(arrived.wait(), 30)
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow


async def test_an_endless_line_or_message_is_cut_reported_and_reconnected() -> None:
    server = HostileStream()
    port = await server.start()
    said: list[str] = []
    got: list[tuple[str, dict[str, Any]]] = []
    arrived = asyncio.Event()

    async def on_event(cursor: str, event: dict[str, Any]) -> None:
        got.append((cursor, event))
        arrived.set()

    try:
        # Without the cap the first connection is buffered whole (64 MiB) and then waits in
        # silence for READ_TIMEOUT_SECONDS (45 s): this wait fails first.
        await _follow_until(arrived, port, on_event, said.append)
    finally:
        await server.stop()
    assert got == [("c1", {"id": "evt_after", "type": "job.completed"})]
    lost = [line for line in said if line.startswith("stream: lost")]
    assert len(lost) == 2, said
    assert all("a message longer than 16 MiB" in line for line in lost), lost
    # The client hung up soon after the cap: what the server could still push is socket
    # buffers' worth, far below what it would have sent (generous: buffers vary by kernel).
    assert server.connections == 3
    assert all(MAX_MESSAGE_CHARS < sent < MAX_MESSAGE_CHARS + 24 * MIB for sent in server.sent[:2])


async def _one_event_stream(
    data: bytes, event_id: bytes = b"c1"
) -> tuple[asyncio.Server, int, list[int]]:
    """A server whose every stream sends one event message (``id: event_id``, ``data``),
    then holds it open: the server, its port, and one item per connection."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                b"id: " + event_id + b"\nevent: event\ndata: " + data + b"\n\n"
            )
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), connections


@pytest.mark.parametrize("event_id", ["é".encode(), b"a b", b"x" * 201])
async def test_an_event_id_that_cannot_be_a_cursor_is_one_line_before_forwarding(
    event_id: bytes,
) -> None:
    """An id that could never go back in Last-Event-ID (not visible ASCII, over 200
    characters): one ListenError before the event is handed on. It used to be forwarded and
    saved, and every start after crashed building the header (UnicodeEncodeError) or looped
    on "Illegal header value"."""
    event = orjson.dumps({"id": "evt_x", "type": "job.completed"})
    server, port, _ = await _one_event_stream(event, event_id)
    got: list[str] = []

    async def on_event(cursor: str, event: dict[str, Any]) -> None:
        got.append(cursor)

    try:
        with pytest.raises(listen.ListenError, match="not a cursor this service makes"):
            await asyncio.wait_for(
                _follow(port, on_event, print),
                30,
            )
    finally:
        server.close()
    assert got == []


@pytest.mark.parametrize("cursor", ["é", "a\r\nX-Inj: 1", "\x00", "x" * 201])
def test_a_saved_cursor_that_cannot_be_sent_back_is_refused(tmp_path: Path, cursor: str) -> None:
    """A cursor file holding what no header can carry: one line saying to delete it."""
    path = tmp_path / "cursor.json"
    path.write_bytes(orjson.dumps({"cursor": cursor}))
    with pytest.raises(listen.ListenError, match="delete it to start from now"):
        listen.read_cursor_file(path)


async def test_an_event_at_the_body_limit_passes_and_one_past_the_cap_ends_listen() -> None:
    """A 1 MiB body (intake's default limit) is carried twice in its message, payload and
    raw: over the old 1 MiB cap, `listen` and `tail` reconnected to it twice a second for
    ever and never moved past it. It now passes; a message past the cap three times in a
    row at one place ends with one line instead of looping."""
    body = orjson.dumps({"id": "evt_big", "type": "job.completed", "lyrics": "la " * 350_000})
    big = orjson.dumps(
        {
            "id": "evt_big",
            "type": "job.completed",
            "raw": body.decode(),
            "payload": orjson.loads(body),
        }
    )
    assert len(big) > 2 * MIB
    server, port, _ = await _one_event_stream(big)
    got: list[str] = []
    arrived = asyncio.Event()

    async def on_event(cursor: str, event: dict[str, Any]) -> None:
        got.append(event["id"])
        arrived.set()

    try:
        await _follow_until(arrived, port, on_event, print)
    finally:
        server.close()
    assert got == ["evt_big"]

    huge = b'{"id":"evt_huge","pad":"' + b"x" * (MAX_MESSAGE_CHARS + MIB) + b'"}'
    server, port, connections = await _one_event_stream(huge)
    said: list[str] = []
    try:
        with pytest.raises(listen.ListenError, match="3 times in a row: too large to take"):
            await asyncio.wait_for(
                _follow(port, on_event, said.append),
                60,
            )
    finally:
        server.close()
    assert len(connections) == 3
