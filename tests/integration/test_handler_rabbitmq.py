"""The rabbitmq handler against the local RabbitMQ, read back with aio-pika itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from lacuna_webhooks.errors import PermanentError, RetryLater
from lacuna_webhooks.handlers.brokers.rabbitmq import RabbitMQHandler
from lacuna_webhooks.models import Event
from tests.conftest import make_event
from tests.e2e.conftest import free_port
from tests.integration.brokers import build, event

aio_pika = pytest.importorskip("aio_pika")


def handler(url: str, name: str = "rabbitmq", **settings: str) -> RabbitMQHandler:
    return build(RabbitMQHandler, name, URL=url, **settings)


class Topology:
    """A topic exchange and a queue of their own for one test (deleted afterwards)."""

    def __init__(self, channel: object, exchange: str, queue: object) -> None:
        self.channel = channel
        self.exchange = exchange
        self.queue = queue

    async def drain(self) -> list[object]:
        """Every message in the queue, acknowledged."""
        messages = []
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:  # type: ignore[attr-defined]
            messages.append(message)
        return messages


@pytest.fixture
async def topology(rabbitmq_server: str) -> AsyncIterator[Topology]:
    connection = await aio_pika.connect(rabbitmq_server)
    channel = await connection.channel()
    tag = uuid.uuid4().hex[:10]
    exchange = await channel.declare_exchange(f"lw-test-{tag}", aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(f"lw-test-{tag}")
    await queue.bind(exchange, "lacuna.#")
    try:
        yield Topology(channel, exchange.name, queue)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()


async def test_publishes_exact_bytes_persistent_with_id_and_type(
    rabbitmq_server: str, topology: Topology
) -> None:
    """Body = the event's bytes; message_id = event id; type = event type; persistent;
    routing key from the template; a handler named other than its kind reads its own settings."""
    h = handler(
        rabbitmq_server,
        name="queue_out",
        EXCHANGE=topology.exchange,
        ROUTING_KEY="lacuna.{type}.{task_id}",
    )
    first, second = event(task_id="task_a"), event("job.failed", task_id="task_b")
    try:
        await h.handle(first)
        await h.handle(second)
    finally:
        await h.aclose()
    messages = await topology.drain()
    assert [m.body for m in messages] == [first.raw, second.raw]  # type: ignore[attr-defined]
    assert [m.routing_key for m in messages] == [  # type: ignore[attr-defined]
        "lacuna.job.completed.task_a",
        "lacuna.job.failed.task_b",
    ]
    assert [(m.message_id, m.type) for m in messages] == [  # type: ignore[attr-defined]
        (first.id, "job.completed"),
        (second.id, "job.failed"),
    ]
    assert messages[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT  # type: ignore[attr-defined]
    assert messages[0].content_type == "application/json"  # type: ignore[attr-defined]


async def test_unroutable_is_retried_then_delivered_once_bound(
    rabbitmq_server: str, topology: Topology
) -> None:
    """mandatory: no queue bound for the key → RetryLater; once a queue is bound, the retry
    delivers exactly one message."""
    h = handler(rabbitmq_server, EXCHANGE=topology.exchange, ROUTING_KEY="other.{type}")
    e = event()
    try:
        with pytest.raises(RetryLater, match="unroutable"):
            await h.handle(e)
        await topology.queue.bind(topology.exchange, "other.#")  # type: ignore[attr-defined]
        await h.handle(e)
    finally:
        await h.aclose()
    assert [m.body for m in await topology.drain()] == [e.raw]  # type: ignore[attr-defined]


async def test_a_missing_exchange_is_dead_and_the_handler_recovers(
    rabbitmq_server: str, topology: Topology
) -> None:
    """Publishing to an exchange that does not exist is dead with the broker's NOT_FOUND reason;
    the broker closed the channel, and once the exchange exists the same handler publishes on a
    fresh one."""
    name = f"late-{uuid.uuid4().hex[:8]}"
    h = handler(rabbitmq_server, EXCHANGE=name)
    e = event()
    try:
        with pytest.raises(PermanentError, match="NOT_FOUND"):
            await h.handle(event())
        late = await topology.channel.declare_exchange(  # type: ignore[attr-defined]
            name, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        await topology.queue.bind(late, "lacuna.#")  # type: ignore[attr-defined]
        await h.handle(e)
    finally:
        await h.aclose()
    assert [m.body for m in await topology.drain()] == [e.raw]  # type: ignore[attr-defined]


async def test_a_refused_login_is_dead_without_the_password(rabbitmq_server: str) -> None:
    """Wrong credentials: dead with ACCESS_REFUSED, and the password is in no error text."""
    parts = urlsplit(rabbitmq_server)
    netloc = f"guest:Wr0ngSecretPw@{parts.hostname}:{parts.port}"
    url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    h = handler(url)
    try:
        with pytest.raises(PermanentError) as caught:
            await h.handle(event())
    finally:
        await h.aclose()
    assert "ACCESS_REFUSED" in str(caught.value) or "authentication" in str(caught.value).lower()
    assert "Wr0ngSecretPw" not in str(caught.value)
    assert "Wr0ngSecretPw" not in repr(h)


async def test_a_routing_key_over_255_bytes_is_dead(rabbitmq_server: str) -> None:
    """An event type that makes the routing key longer than AMQP allows is dead before any I/O."""
    h = handler(rabbitmq_server)
    try:
        with pytest.raises(PermanentError, match=r"routing key is .* bytes"):
            await h.handle(event("é" * 128))
    finally:
        await h.aclose()


async def test_an_id_or_type_over_255_bytes_is_published_with_its_digest(
    rabbitmq_server: str, topology: Topology
) -> None:
    """Intake bounds ids to 255 characters and types to 128, not bytes: `evt_` and 200 `é`
    is 404 bytes, 128 `🎵` 512, over AMQP's short strings, and such an event was dead. Now
    message_id and type are the SHA-256 hex of a value that does not fit (stable, so a
    consumer's dedupe by message_id still holds), the headers lacuna-event-id and
    lacuna-event-type carry the exact values, and the body is the event's bytes."""
    h = handler(rabbitmq_server, EXCHANGE=topology.exchange, ROUTING_KEY="lacuna.fixed")
    long_id, long_type = "evt_" + "\u00e9" * 200, "\U0001f3b5" * 128
    sent = Event.from_body(orjson.dumps(make_event(long_id, long_type)))
    fits = event()
    try:
        await h.handle(sent)
        await h.handle(fits)
    finally:
        await h.aclose()
    first, second = await topology.drain()
    assert first.body == sent.raw  # type: ignore[attr-defined]
    assert first.message_id == hashlib.sha256(long_id.encode()).hexdigest()  # type: ignore[attr-defined]
    assert first.type == hashlib.sha256(long_type.encode()).hexdigest()  # type: ignore[attr-defined]
    assert first.headers == {"lacuna-event-id": long_id, "lacuna-event-type": long_type}  # type: ignore[attr-defined]
    assert (second.message_id, second.type) == (fits.id, "job.completed")  # type: ignore[attr-defined]
    assert second.headers == {"lacuna-event-id": fits.id, "lacuna-event-type": "job.completed"}  # type: ignore[attr-defined]


async def test_an_unreachable_broker_is_retried() -> None:
    """Nothing listening on the port: RetryLater."""
    h = handler(f"amqp://guest:guest@127.0.0.1:{free_port()}/", CONNECT_TIMEOUT="2")
    try:
        with pytest.raises(RetryLater, match="publishing to RabbitMQ failed"):
            await h.handle(event())
    finally:
        await h.aclose()


class Proxy:
    """A TCP proxy to the broker that can drop every connection and stop listening, then
    listen again on the same port: a broker restart, as the handler sees it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def drop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers = []
        await self.server.wait_closed()


async def test_a_lost_connection_is_reopened_at_the_next_attempt(
    rabbitmq_server: str, topology: Topology
) -> None:
    """The broker goes away and comes back (a restart): the attempt in between is retried,
    and the next one publishes. The lost connection was reused at every attempt (aio-pika's
    `is_closed` turns true only once `close()` is called) and every event went dead until
    serve restarted."""
    parts = urlsplit(rabbitmq_server)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    url = urlunsplit(parts._replace(netloc=netloc))
    h = handler(url, EXCHANGE=topology.exchange, CONNECT_TIMEOUT="2", CONFIRM_TIMEOUT="2")
    before, during, after = event(), event(), event()
    try:
        await h.handle(before)
        await proxy.drop()
        with pytest.raises(RetryLater):
            await h.handle(during)
        await proxy.start()
        await h.handle(after)
    finally:
        await h.aclose()
        await proxy.drop()
    ids = [m.message_id for m in await topology.drain()]  # type: ignore[attr-defined]
    assert ids == [before.id, after.id]


async def test_a_virtual_host_that_does_not_exist_is_dead_with_why(rabbitmq_server: str) -> None:
    """RabbitMQ answers a missing virtual host with Connection.Close (530 NOT_ALLOWED), which
    aiormq reports as an InvalidFrameError naming no reason: every attempt was retried, then
    dead with `Expected Connection.OpenOk, got <Connection.Close object at 0x…>`."""
    parts = urlsplit(rabbitmq_server)
    url = urlunsplit((parts.scheme, parts.netloc, "/no_such_vhost_review3", "", ""))
    h = handler(url)
    try:
        with pytest.raises(PermanentError, match="virtual host 'no_such_vhost_review3'") as caught:
            await h.handle(event())
    finally:
        await h.aclose()
    assert "object at 0x" not in str(caught.value)
