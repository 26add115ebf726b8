"""Outbound calls refuse IPv6 addresses that embed a non-public IPv4 address, before connecting.

A real TCP listener on 127.0.0.1 counts the connections it accepts: the IPv4-mapped
form of its address does reach it (the control), and every embedding form, written
literally in the URL or given by a DNS answer, is refused with none accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from lacuna_webhooks.handlers._http import OutboundClient, UnsafeURL


class CountingListener:
    """Accepts on 127.0.0.1, answers every connection with a tiny HTTP 200, counts them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    server = CountingListener()
    yield server
    server.close()


def client(*, allow_private: bool) -> OutboundClient:
    return OutboundClient(
        allow_private=allow_private,
        allow_http=True,  # the listener speaks plain http; the address rule is what is tested
        connect_timeout_seconds=2,
        read_timeout_seconds=2,
    )


async def get(http: OutboundClient, url: str) -> int:
    try:
        async with http.stream_get(url, what="audio") as response:
            return response.status_code
    finally:
        await http.aclose()


async def test_the_mapped_form_of_loopback_reaches_a_loopback_listener(
    listener: CountingListener,
) -> None:
    """The control: with LACUNA_ALLOW_PRIVATE_URLS the mapped address connects to 127.0.0.1,
    so a refusal below is the check at work, not an unreachable address."""
    status = await get(client(allow_private=True), f"http://[::ffff:127.0.0.1]:{listener.port}/")
    assert status == 200
    assert listener.accepted == 1


@pytest.mark.parametrize(
    "host",
    [
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:0:7f00:1",  # IPv4-translated
        "::7f00:1",  # IPv4-compatible
        "64:ff9b::7f00:1",  # NAT64 well-known prefix
        "64:ff9b:1::7f00:1",  # NAT64 local-use prefix
        "2002:7f00:1::",  # 6to4
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    ],
)
async def test_a_literal_embedding_loopback_is_refused_before_connecting(
    listener: CountingListener, host: str
) -> None:
    with pytest.raises(UnsafeURL, match="non-public address"):
        await get(client(allow_private=False), f"http://[{host}]:{listener.port}/track.mp3")
    assert listener.accepted == 0


async def test_a_name_resolving_to_an_embedding_form_is_refused_before_connecting(
    listener: CountingListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS answer of ``::ffff:127.0.0.1`` (or a NAT64 synthesis of a private address) for
    a public-looking name is checked like a literal. The answer is given by replacing the
    loop's resolver: no DNS server is reachable from the tests."""
    loop = asyncio.get_running_loop()
    answers = {
        "cdn.example.com": "::ffff:127.0.0.1",
        "nat64.example.com": "64:ff9b::a00:1",
    }

    async def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        address = answers[host]
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    for name, address in answers.items():
        shown = ipaddress.ip_address(address)  # as Python prints it, e.g. ::ffff:7f00:1
        with pytest.raises(UnsafeURL, match=re.escape(f"{name} resolves to {shown}")):
            await get(client(allow_private=False), f"http://{name}:{listener.port}/a.mp3")
    assert listener.accepted == 0
