"""Events intake accepts but whose content is hostile, through a real ``serve`` to real peers.

Every event answered 2xx must reach every subscribed handler once: the ``http`` forward
(checked with the official ``standardwebhooks`` library on the bytes received), NATS
JetStream, RabbitMQ and Redis. The ids and types below are all ones intake takes (a
non-blank type without NUL, at most 128 characters; an id of at most 255 characters);
each of the first three used to end one handler's delivery dead: a type with a space at
either end (h11 refused the ``lacuna-event-type`` header), with a control character (the
NATS headers), a type or id over AMQP's 255-byte short strings (RabbitMQ).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from lacuna_webhooks.signature import header_text
from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, free_port, wait_until

pytestmark = pytest.mark.e2e

nats = pytest.importorskip("nats")
aio_pika = pytest.importorskip("aio_pika")
redis = pytest.importorskip("redis")
standardwebhooks = pytest.importorskip("standardwebhooks")

FORWARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
HOSTILE = [
    ("evt_spaced_type", " job.completed "),
    ("evt_escape_type", "job.\x1b[31mcompleted\r\nX-Evil: 1"),
    ("evt_" + "\u00e9" * 200, "job.completed"),  # 404 bytes
    ("evt_long_type", "\U0001f3b5" * 128),  # 512 bytes
    # Intake refuses such characters in an id (a key shown by every listing), not in a type.
    ("evt_bidi_type", "job.\u202e\u2066\u00e9t\u00e9"),
]


class Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def peers(nats_server: str, rabbitmq_server: str, redis_server: str) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:10]
    names = {"stream": f"HOSTILE_{tag}", "subject": f"hostile{tag}.events", "tag": tag}

    async def setup() -> None:
        from nats.js.api import StreamConfig

        client = await nats.connect(nats_server)
        await client.jetstream().add_stream(
            StreamConfig(name=names["stream"], subjects=[names["subject"]])
        )
        await client.close()
        connection = await aio_pika.connect(rabbitmq_server)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(f"lw-{tag}", aio_pika.ExchangeType.TOPIC)
        queue = await channel.declare_queue(f"lw-{tag}")
        await queue.bind(exchange, "#")
        await connection.close()

    async def teardown() -> None:
        client = await nats.connect(nats_server)
        await client.jetstream().delete_stream(names["stream"])
        await client.close()
        connection = await aio_pika.connect(rabbitmq_server)
        channel = await connection.channel()
        await channel.queue_delete(f"lw-{tag}")
        await channel.exchange_delete(f"lw-{tag}")
        await connection.close()

    asyncio.run(setup())
    try:
        yield names
    finally:
        asyncio.run(teardown())
        redis.Redis.from_url(redis_server).delete(f"lw:{tag}")


async def _broker_messages(
    nats_url: str, rabbitmq_url: str, names: dict[str, str]
) -> tuple[list[bytes], list[object]]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    info = await js.stream_info(names["stream"])
    published = [
        (await js.get_msg(names["stream"], seq)).data
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
        if info.state.messages
    ]
    await client.close()
    connection = await aio_pika.connect(rabbitmq_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(f"lw-{names['tag']}")
    queued = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        queued.append(message)
    await connection.close()
    return published, queued


def test_hostile_ids_and_types_reach_every_handler_once(
    serve_factory: type[Serve],
    tmp_path: Path,
    nats_server: str,
    rabbitmq_server: str,
    redis_server: str,
    peers: dict[str, str],
) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    db = tmp_path / "events.db"
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{db}",
            "LACUNA_HANDLERS": "audit=log,fwd=http,nats,rabbitmq,redis",
            "LACUNA_FWD_URL": f"http://127.0.0.1:{receiver.server_port}/in",
            "LACUNA_FWD_SECRET": FORWARD_SECRET,
            "LACUNA_NATS_URL": nats_server,
            "LACUNA_NATS_SUBJECT": peers["subject"],
            "LACUNA_RABBITMQ_URL": rabbitmq_server,
            "LACUNA_RABBITMQ_EXCHANGE": f"lw-{peers['tag']}",
            "LACUNA_RABBITMQ_ROUTING_KEY": "lacuna.events",  # {type} would be a destination
            "LACUNA_REDIS_URL": redis_server,
            "LACUNA_REDIS_STREAM": f"lw:{peers['tag']}",
            "LACUNA_RETRY_BASE_DELAY": "0.2",
            "LACUNA_RETRY_MAX_DELAY": "0.5",
            "LACUNA_RETRY_MAX_ATTEMPTS": "3",
            "LACUNA_POLL_INTERVAL": "0.1",
        }
    ).start()
    try:
        bodies = {}
        for event_id, event_type in HOSTILE:
            body, headers = signed(make_event(event_id, event_type))
            answer = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)
            assert answer.status_code == 200, answer.text
            bodies[event_id] = body

        def ended() -> list[tuple[str, str, str]]:
            with sqlite3.connect(db) as conn:
                return conn.execute(
                    "SELECT event_id, handler, status FROM deliveries WHERE status != 'pending'"
                ).fetchall()

        wait_until(lambda: len(ended()) == 5 * len(HOSTILE), 60, "every delivery ended")
        assert sorted(row for row in ended() if row[2] != "done") == []
    finally:
        serve.stop()
        receiver.shutdown()
        receiver.server_close()
    webhook = standardwebhooks.Webhook(FORWARD_SECRET)
    forwarded = {headers["webhook-id"]: (headers, body) for headers, body in Receiver.received}
    assert len(Receiver.received) == len(HOSTILE)
    for event_id, event_type in HOSTILE:
        headers, body = forwarded[header_text(event_id)]
        assert body == bodies[event_id]
        webhook.verify(body, headers)
        assert headers["lacuna-event-type"] == header_text(event_type)
    published, queued = asyncio.run(_broker_messages(nats_server, rabbitmq_server, peers))
    assert sorted(published) == sorted(bodies.values())
    assert sorted(m.body for m in queued) == sorted(bodies.values())  # type: ignore[attr-defined]
    assert sorted(m.headers["lacuna-event-type"] for m in queued) == sorted(  # type: ignore[attr-defined]
        t for _, t in HOSTILE
    )
    entries = redis.Redis.from_url(redis_server).xrange(f"lw:{peers['tag']}")
    assert sorted(fields[b"payload"] for _, fields in entries) == sorted(bodies.values())
