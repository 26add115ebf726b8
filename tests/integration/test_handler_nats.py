"""The nats handler against the local NATS JetStream server, read back with nats-py itself."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from lacuna_webhooks.errors import PermanentError, RetryLater
from lacuna_webhooks.handlers.brokers.nats import NatsHandler
from tests.e2e.conftest import free_port
from tests.integration.brokers import build, event
from tests.integration.servers import tcp_proxy

nats = pytest.importorskip("nats")


def handler(url: str, name: str = "nats", **settings: str) -> NatsHandler:
    return build(NatsHandler, name, URL=url, **settings)


class Stream:
    """A JetStream stream of its own for one test: subjects ``<prefix>.>``."""

    def __init__(self, js: object, name: str, prefix: str) -> None:
        self.js = js
        self.name = name
        self.prefix = prefix

    async def messages(self) -> list[object]:
        info = await self.js.stream_info(self.name)  # type: ignore[attr-defined]
        return (
            [
                await self.js.get_msg(self.name, seq)  # type: ignore[attr-defined]
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
            ]
            if info.state.messages
            else []
        )


@pytest.fixture
async def stream(nats_server: str) -> AsyncIterator[Stream]:
    from nats.js.api import StreamConfig

    client = await nats.connect(nats_server)
    js = client.jetstream()
    tag = uuid.uuid4().hex[:10]
    name, prefix = f"T_{tag}", f"t{tag}"
    await js.add_stream(
        StreamConfig(
            name=name, subjects=[f"{prefix}.>"], duplicate_window=120.0, max_msg_size=64 * 1024
        )
    )
    try:
        yield Stream(js, name, prefix)
    finally:
        await js.delete_stream(name)
        await client.close()


async def test_publishes_exact_bytes_with_id_and_type_headers(
    nats_server: str, stream: Stream
) -> None:
    """The message is the event's bytes; Nats-Msg-Id and Lacuna-Event-* headers carry id and type;
    the subject template fills {type} and {task_id}; a handler named other than its kind
    reads its own LACUNA_<NAME>_* settings."""
    h = handler(nats_server, name="bus", SUBJECT=f"{stream.prefix}.{{type}}.{{task_id}}")
    first, second = event(task_id="task_a"), event(event_type="job.failed", task_id="task_b")
    try:
        await h.handle(first)
        await h.handle(second)
    finally:
        await h.aclose()
    messages = await stream.messages()
    assert [m.subject for m in messages] == [  # type: ignore[attr-defined]
        f"{stream.prefix}.job.completed.task_a",
        f"{stream.prefix}.job.failed.task_b",
    ]
    assert [m.data for m in messages] == [first.raw, second.raw]  # type: ignore[attr-defined]
    headers = messages[0].headers  # type: ignore[attr-defined]
    assert headers["Nats-Msg-Id"] == first.id
    assert headers["Lacuna-Event-Id"] == first.id
    assert headers["Lacuna-Event-Type"] == "job.completed"


async def test_a_republish_within_the_duplicate_window_is_dropped(
    nats_server: str, stream: Stream
) -> None:
    """The same event published twice (a retry after a lost PubAck) is one message in the stream,
    and the second publish still counts as done."""
    h = handler(nats_server, SUBJECT=f"{stream.prefix}.{{type}}")
    same, other = event(), event()
    try:
        await h.handle(same)
        await h.handle(same)
        await h.handle(other)
    finally:
        await h.aclose()
    messages = await stream.messages()
    assert [m.data for m in messages] == [same.raw, other.raw]  # type: ignore[attr-defined]


async def test_no_stream_for_the_subject_is_dead_with_the_reason(nats_server: str) -> None:
    """A subject no stream holds is a PermanentError saying so (not retried forever)."""
    h = handler(nats_server, SUBJECT=f"nostream{uuid.uuid4().hex[:8]}.{{type}}")
    try:
        with pytest.raises(PermanentError, match="no JetStream stream holds the subject"):
            await h.handle(event())
    finally:
        await h.aclose()


async def test_a_message_over_the_streams_limit_is_dead(nats_server: str, stream: Stream) -> None:
    """JetStream's refusal of a message larger than the stream's max_msg_size is permanent and
    carries the server's description; the same handler then publishes a normal event."""
    h = handler(nats_server, SUBJECT=f"{stream.prefix}.{{type}}")
    big = event(padding="x" * 100_000)
    small = event()
    try:
        with pytest.raises(PermanentError, match="message size exceeds maximum"):
            await h.handle(big)
        await h.handle(small)
    finally:
        await h.aclose()
    assert [m.data for m in await stream.messages()] == [small.raw]  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad_type", ["job completed", "job.*", "job.>", "job..done", "job."])
async def test_a_subject_made_invalid_by_the_event_type_is_dead(
    nats_server: str, stream: Stream, bad_type: str
) -> None:
    """A type with whitespace, a wildcard or an empty token cannot pick another subject: dead,
    and nothing reaches the stream."""
    h = handler(nats_server, SUBJECT=f"{stream.prefix}.{{type}}")
    try:
        with pytest.raises(PermanentError, match="subject"):
            await h.handle(event(event_type=bad_type))
    finally:
        await h.aclose()
    assert await stream.messages() == []


@pytest.mark.parametrize(
    ("event_type", "header"),
    [
        ("job.\tcompleted", "job.%09completed"),
        ("job.\x1b[31mcompleted", "job.%1B[31mcompleted"),
        ("job.completed\r\nX-Evil: 1", "job.completed%0D%0AX-Evil: 1"),
        (" job.completed ", "%20job.completed%20"),
        ("job.\u00e9t\u00e9", "job.%C3%A9t%C3%A9"),
    ],
)
async def test_a_type_no_header_value_can_hold_goes_percent_encoded(
    nats_server: str, stream: Stream, event_type: str, header: str
) -> None:
    """Intake takes any non-blank type without NUL. One with a control character was dead
    ("could not be a header value"), and one with a space at either end reached consumers
    trimmed (nats-py strips header values): the message never reached the stream, or named
    another type. Lacuna-Event-Type carries it percent-encoded as the http handler's
    lacuna-event-type does; the message is the event's bytes, published once."""
    h = handler(nats_server, SUBJECT=f"{stream.prefix}.fixed")
    sent = event(event_type=event_type)
    try:
        await h.handle(sent)
    finally:
        await h.aclose()
    (message,) = await stream.messages()
    assert message.data == sent.raw  # type: ignore[attr-defined]
    headers = message.headers  # type: ignore[attr-defined]
    assert headers["Lacuna-Event-Type"] == header
    assert headers["Nats-Msg-Id"] == headers["Lacuna-Event-Id"] == sent.id


async def test_an_unreachable_server_is_retried() -> None:
    """Nothing listening on the port: RetryLater (the broker may come back)."""
    h = handler(f"nats://127.0.0.1:{free_port()}", CONNECT_TIMEOUT="1")
    try:
        with pytest.raises(RetryLater, match="cannot connect to NATS"):
            await h.handle(event())
    finally:
        await h.aclose()


async def test_the_connection_is_reused_and_closed(nats_server: str, stream: Stream) -> None:
    """Many events go over one connection, which aclose() closes."""
    h = handler(nats_server, SUBJECT=f"{stream.prefix}.{{type}}")
    await h.handle(event())
    client = h._client
    for _ in range(5):
        await h.handle(event())
    assert h._client is client
    await h.aclose()
    assert client is not None
    assert client.is_closed
    assert len(await stream.messages()) == 6


async def test_a_connection_gone_silent_is_dropped_and_the_next_attempt_reconnects(
    nats_server: str, stream: Stream
) -> None:
    """The broker's host gone without a reset (the socket open, nothing passing): the PubAck
    times out, and nats-py would notice only after two unanswered pings two minutes apart,
    every attempt until then timing out on the dead connection. The timeout has the
    connection checked with a PING; it does not answer, so it is dropped and a later
    attempt connects afresh."""
    target = urlsplit(nats_server)
    async with tcp_proxy(target.port or 4222, target.hostname or "127.0.0.1") as proxy:
        h = handler(
            f"nats://127.0.0.1:{proxy.port}",
            SUBJECT=f"{stream.prefix}.{{type}}",
            CONNECT_TIMEOUT="1",
            READ_TIMEOUT="1",
        )
        try:
            await h.handle(event())
            proxy.silence()
            with pytest.raises(RetryLater, match="publishing to NATS failed: TimeoutError"):
                await h.handle(event())
            deadline = time.monotonic() + 15
            while True:
                try:
                    await h.handle(event())
                    break
                except RetryLater:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
        finally:
            await h.aclose()
    assert len(await stream.messages()) == 2  # the publish into the dead connection is lost


async def test_a_late_puback_on_a_live_connection_keeps_the_connection(
    nats_server: str, stream: Stream
) -> None:
    """A PubAck that does not come while the server answers (a subscriber that never
    replies stands for a JetStream that is slow): the connection answers its PING and is
    kept."""
    listener = await nats.connect(nats_server)

    async def never_reply(msg: object) -> None:
        return None

    await listener.subscribe(f"slow{stream.prefix}.>", cb=never_reply)
    h = handler(nats_server, SUBJECT=f"slow{stream.prefix}.{{type}}", READ_TIMEOUT="1")
    try:
        with pytest.raises(RetryLater, match="TimeoutError"):
            await h.handle(event())
        client = h._client
        await asyncio.sleep(1.5)  # the check's PING is answered at once
        assert client is not None
        assert h._client is client
        assert not client.is_closed
    finally:
        await h.aclose()
        await listener.close()
