"""The redis handler against the local Redis, read back with redis-py itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from lacuna_webhooks.errors import PermanentError, RetryLater
from lacuna_webhooks.handlers.brokers.redis import RedisHandler, marker_key
from tests.e2e.conftest import free_port
from tests.integration.brokers import build, event

redis_asyncio = pytest.importorskip("redis.asyncio")


def handler(url: str, name: str = "redis", **settings: str) -> RedisHandler:
    return build(RedisHandler, name, URL=url, **settings)


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[object]:
    """A redis-py client; every key a test made under its prefix is deleted afterwards."""
    c = redis_asyncio.Redis.from_url(redis_server)
    yield c
    await c.aclose()


@pytest.fixture
def prefix() -> str:
    return f"lw-test:{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
async def _cleanup(client: object, prefix: str) -> AsyncIterator[None]:
    yield
    keys = [k async for k in client.scan_iter(f"{prefix}*")]  # type: ignore[attr-defined]
    if keys:
        await client.delete(*keys)  # type: ignore[attr-defined]


async def test_xadd_has_id_type_and_exact_payload(
    redis_server: str, client: object, prefix: str
) -> None:
    """One entry per event with fields id, type and payload (the event's bytes), in a stream
    named by the template; a handler named other than its kind reads its own settings."""
    h = handler(redis_server, name="streams", STREAM=f"{prefix}:{{type}}")
    first, second = event(), event("job.failed")
    try:
        await h.handle(first)
        await h.handle(second)
    finally:
        await h.aclose()
    completed = await client.xrange(f"{prefix}:job.completed")  # type: ignore[attr-defined]
    failed = await client.xrange(f"{prefix}:job.failed")  # type: ignore[attr-defined]
    assert [fields for _, fields in completed] == [
        {b"id": first.id.encode(), b"type": b"job.completed", b"payload": first.raw}
    ]
    assert [fields[b"payload"] for _, fields in failed] == [second.raw]


async def test_one_entry_per_event_id_across_retries_and_instances(
    redis_server: str, client: object, prefix: str
) -> None:
    """The same event handled again (a retry), and concurrently by two instances (two replicas),
    gives one entry; other events still get theirs."""
    stream = f"{prefix}:events"
    a = handler(redis_server, STREAM=stream)
    b = handler(redis_server, name="replica", STREAM=stream)
    same, other = event(), event()
    try:
        await a.handle(same)
        await a.handle(same)
        await asyncio.gather(*(h.handle(same) for h in (a, b) for _ in range(10)))
        await b.handle(other)
    finally:
        await a.aclose()
        await b.aclose()
    entries = await client.xrange(stream)  # type: ignore[attr-defined]
    assert [fields[b"id"] for _, fields in entries] == [same.id.encode(), other.id.encode()]
    ttl = await client.ttl(marker_key(stream, same.id))  # type: ignore[attr-defined]
    assert 0 < ttl <= 86_400


async def test_maxlen_trims_approximately(redis_server: str, client: object, prefix: str) -> None:
    """MAXLEN=10: the stream is trimmed (approximately, by whole nodes) as entries are added."""
    stream = f"{prefix}:trim"
    h = handler(redis_server, STREAM=stream, MAXLEN="10")
    try:
        for _ in range(600):
            await h.handle(event())
    finally:
        await h.aclose()
    length = await client.xlen(stream)  # type: ignore[attr-defined]
    assert 10 <= length < 600


async def test_a_key_of_another_type_is_dead(
    redis_server: str, client: object, prefix: str
) -> None:
    """The stream name holds a string: Redis's WRONGTYPE reason, dead."""
    await client.set(f"{prefix}:taken", "x")  # type: ignore[attr-defined]
    h = handler(redis_server, STREAM=f"{prefix}:taken")
    try:
        with pytest.raises(PermanentError, match="WRONGTYPE"):
            await h.handle(event())
    finally:
        await h.aclose()


async def test_a_user_without_permission_is_dead_without_the_password(
    redis_server: str, client: object, prefix: str
) -> None:
    """An ACL user that may not write the stream: NOPERM, dead; its password is in no error."""
    user = f"lw_test_{uuid.uuid4().hex[:8]}"
    password = f"S3cret{uuid.uuid4().hex[:8]}"
    await client.execute_command(  # type: ignore[attr-defined]
        "ACL", "SETUSER", user, "on", f">{password}", "~elsewhere:*", "+@all"
    )
    parts = urlsplit(redis_server)
    url = urlunsplit(
        (parts.scheme, f"{user}:{password}@{parts.hostname}:{parts.port}", parts.path, "", "")
    )
    h = handler(url, STREAM=f"{prefix}:events")
    try:
        with pytest.raises(PermanentError) as caught:
            await h.handle(event())
    finally:
        await h.aclose()
        await client.execute_command("ACL", "DELUSER", user)  # type: ignore[attr-defined]
    assert "NOPERM" in str(caught.value) or "permission" in str(caught.value).lower()
    assert password not in str(caught.value)


async def test_an_unreachable_server_is_retried() -> None:
    """Nothing listening on the port: RetryLater."""
    h = handler(f"redis://127.0.0.1:{free_port()}/0", CONNECT_TIMEOUT="1")
    try:
        with pytest.raises(RetryLater, match="Redis is unreachable"):
            await h.handle(event())
    finally:
        await h.aclose()


async def test_a_peer_that_is_not_redis_is_never_taken_as_done() -> None:
    """A peer answering every command `+OK` (a proxy, another server on the port): the
    script's reply was unpacked from the two bytes of "OK" and the attempt recorded done,
    the entry never added. Done only on the script's own answer; anything else is retried."""
    commands: list[bytes] = []

    async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                words = []  # one RESP command: an array of bulk strings
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    words.append((await reader.readexactly(size + 2))[:-2])
                commands.append(words[0].upper())
                writer.write(b"+PONG\r\n" if words[0].upper() == b"PING" else b"+OK\r\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer_ok, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    h = handler(f"redis://127.0.0.1:{port}/0", STREAM="review:{type}")
    try:
        with pytest.raises(RetryLater, match="not a stream entry"):
            await h.handle(event())
    finally:
        await h.aclose()
        server.close()
    assert any(command.startswith(b"EVAL") for command in commands)  # the script was sent
