"""A real `serve` with the nats and redis handlers, both brokers restarted in the middle.

1,000 signed events go in; NATS (JetStream, file storage) and Redis (no
persistence) are each stopped and started again while deliveries flow. Every
event must reach each broker's consumer exactly once: retries after a lost
acknowledgement are dropped by JetStream's ``Nats-Msg-Id`` window, and by the
Redis handler's marker.

Redis keeps nothing across its restart, so its consumer reads continuously,
and the restart happens under ``CLIENT PAUSE WRITE`` once the consumer has
read everything written: the restart loses no entry the consumer had not yet
seen, and an XADD held by the pause is answered by a dropped connection (a
lost acknowledgement, retried after the restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import IN_CI, make_event, signed
from tests.e2e.conftest import Serve, wait_until

pytestmark = pytest.mark.e2e

nats = pytest.importorskip("nats")
redis = pytest.importorskip("redis")

EVENTS = 1_000
NATS_BIN = "/usr/sbin/nats-server"
NATS_START = [
    "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", NATS_BIN, "--",
    "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server",
    "-l", "/var/log/nats-server.log",
]  # fmt: skip
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def restartable() -> None:
    """The test stops and starts the machine's NATS and Redis: it needs root and their binaries."""
    missing = [b for b in (NATS_BIN, "redis-server", "start-stop-daemon") if not shutil.which(b)]
    if os.geteuid() != 0 or missing:
        message = f"restarting brokers needs root and {missing or 'the binaries'}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)


def restart_nats() -> None:
    subprocess.run(
        ["start-stop-daemon", "--stop", "--oknodo", "--retry", "20", "--exec", NATS_BIN],
        check=True,
    )
    wait_until(lambda: not port_open(4222), 20, "NATS to stop")
    # Deliveries meet a NATS that is down for longer than the handler's 2 s read timeout:
    # nats-py buffers publishes while it reconnects, so a shorter outage can pass unseen.
    time.sleep(4)
    subprocess.run(NATS_START, check=True)
    wait_until(lambda: port_open(4222), 30, "NATS to start")


class RedisConsumer:
    """Reads the stream continuously (XREAD from the last id seen), across Redis restarts."""

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self.last_id = "0-0"
        self.ids: list[str] = []
        self.payloads: dict[str, bytes] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)
        while not self.stopping.is_set():
            try:
                reply = client.xread({self.stream: self.last_id}, block=200, count=500)
            except redis.exceptions.RedisError:
                time.sleep(0.1)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    event_id = fields[b"id"].decode()
                    self.ids.append(event_id)
                    self.payloads[event_id] = fields[b"payload"]
                    self.last_id = entry_id.decode()
        client.close()

    def restart_redis(self) -> None:
        admin = redis.Redis.from_url(self.url)
        admin.client_pause(30_000, all=False)  # WRITE: XADDs wait, reads go on
        info = admin.xinfo_stream(self.stream)
        last = info["last-generated-id"].decode()
        wait_until(lambda: self.last_id == last, 20, "the Redis consumer to catch up")
        with contextlib.suppress(redis.exceptions.ConnectionError):
            admin.shutdown(nosave=True)  # the server may go away while answering
        admin.close()
        wait_until(lambda: not port_open(6379), 20, "Redis to stop")
        # Down for longer than the handler's timeouts and redis-py's own reconnect retries,
        # so deliveries in the meantime fail and are retried by the dispatcher.
        time.sleep(4)
        subprocess.run(REDIS_START, check=True, stdout=subprocess.DEVNULL)
        wait_until(lambda: port_open(6379), 30, "Redis to start")


async def _nats_setup(url: str, name: str, prefix: str) -> None:
    from nats.js.api import StorageType, StreamConfig

    client = await nats.connect(url)
    js = client.jetstream()
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=[f"{prefix}.>"],
            storage=StorageType.FILE,
            duplicate_window=600.0,
        )
    )
    await client.close()


async def _nats_read(url: str, name: str, delete: bool) -> list[tuple[str, bytes]]:
    client = await nats.connect(url)
    js = client.jetstream()
    try:
        info = await js.stream_info(name)
        messages = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(name, seq)
                messages.append((msg.headers["Nats-Msg-Id"], msg.data))  # type: ignore[index]
        if delete:
            await js.delete_stream(name)
        return messages
    finally:
        await client.close()


@pytest.fixture
def brokers(nats_server: str, redis_server: str, restartable: None) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:10]
    names = {"stream": f"E2E_{tag}", "prefix": f"e2e{tag}", "redis_stream": f"lw-e2e:{tag}"}
    asyncio.run(_nats_setup(nats_server, names["stream"], names["prefix"]))
    yield names
    if port_open(4222):
        asyncio.run(_nats_read(nats_server, names["stream"], delete=True))
    if port_open(6379):
        client = redis.Redis.from_url(redis_server)
        client.delete(names["redis_stream"])
        client.close()


def test_every_event_reaches_nats_and_redis_once_across_broker_restarts(
    serve_factory: type[Serve], nats_server: str, redis_server: str, brokers: dict[str, str]
) -> None:
    """1,000 events; NATS then Redis restarted mid-way; intake answers 2xx throughout; each event
    id is present exactly once at each broker's consumer, with the event's exact bytes."""
    consumer = RedisConsumer(redis_server, brokers["redis_stream"])
    consumer.thread.start()
    serve = serve_factory(
        {
            "LACUNA_HANDLERS": "nats,redis",
            "LACUNA_NATS_URL": nats_server,
            "LACUNA_NATS_SUBJECT": brokers["prefix"] + ".{type}",
            "LACUNA_NATS_READ_TIMEOUT": "2",
            "LACUNA_NATS_CONNECT_TIMEOUT": "2",
            "LACUNA_REDIS_URL": redis_server,
            "LACUNA_REDIS_STREAM": brokers["redis_stream"],
            "LACUNA_REDIS_CONNECT_TIMEOUT": "1",
            "LACUNA_REDIS_READ_TIMEOUT": "2",
            "LACUNA_RETRY_BASE_DELAY": "0.2",
            "LACUNA_RETRY_MAX_DELAY": "1",
            "LACUNA_RETRY_MAX_ATTEMPTS": "1000",
        }
    ).start()
    bodies: dict[str, bytes] = {}
    failures: list[str] = []

    def send() -> None:
        """Sends every event, one after another, while the main thread restarts the brokers."""
        with httpx.Client(timeout=10) as http:
            for _ in range(EVENTS):
                event_id = f"evt_{uuid.uuid4().hex}"
                body, headers = signed(make_event(event_id))
                response = http.post(serve.webhook_url, content=body, headers=headers)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                bodies[event_id] = body
                # Paced (about 100/s at most) so that events are still arriving when Redis
                # goes down after the NATS outage, whatever this machine's speed.
                time.sleep(0.01)

    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        wait_until(lambda: len(bodies) >= 300, 60, "300 events sent")
        restart_nats()
        wait_until(lambda: len(bodies) >= 600 or not sender.is_alive(), 60, "600 events sent")
        consumer.restart_redis()
        sender.join(120)
        assert not sender.is_alive()
        assert failures == []  # intake answered 200 to every event, brokers down or not
        assert len(bodies) == EVENTS

        def nats_count() -> int:
            return len(asyncio.run(_nats_read(nats_server, brokers["stream"], delete=False)))

        wait_until(lambda: len(consumer.ids) >= EVENTS, 120, "every event at the Redis consumer")
        wait_until(lambda: nats_count() >= EVENTS, 120, "every event in the NATS stream")
        time.sleep(2)  # a late duplicate would show now
    finally:
        consumer.stopping.set()
        consumer.thread.join(10)
        serve.stop()
    # The restarts happened under load: each handler had attempts that failed and were retried.
    attempts = [
        orjson.loads(line) for line in serve.log().splitlines() if "delivery.attempt" in line
    ]
    retried = Counter(a["handler"] for a in attempts if a["outcome"] == "retry")
    assert retried["nats"] >= 1
    assert retried["redis"] >= 1
    assert not [a for a in attempts if a["outcome"] == "dead"]
    redis_counts = Counter(consumer.ids)
    assert {i: n for i, n in redis_counts.items() if n != 1} == {}
    assert set(redis_counts) == set(bodies)
    assert all(consumer.payloads[i] == body for i, body in bodies.items())
    nats_messages = asyncio.run(_nats_read(nats_server, brokers["stream"], delete=False))
    nats_counts: Counter[Any] = Counter(i for i, _ in nats_messages)
    assert {i: n for i, n in nats_counts.items() if n != 1} == {}
    assert set(nats_counts) == set(bodies)
    assert all(bodies[i] == data for i, data in nats_messages)
