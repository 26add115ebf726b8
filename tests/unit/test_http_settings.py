"""The HTTP layer's settings (docs/http.md), the sender allowlist and the connection cap."""

from __future__ import annotations

import ipaddress

import pytest

from lacuna_webhooks.config import Settings
from lacuna_webhooks.errors import ConfigError, PayloadTooLarge, ServerBusy
from lacuna_webhooks.intake import BodyBudget, SourceAllowlist, read_body
from lacuna_webhooks.server import (
    ADMIN_SHARE,
    MIN_CONNECTIONS,
    RESERVED_FILES,
    WEBHOOK_SHARE,
    Limits,
)

BASE = {"LACUNA_WEBHOOK_SECRET": "whsec_a"}


def test_defaults() -> None:
    """Keep-alive outlives the 60 s idle timeout of nginx and common load balancers; every
    other limit has a finite default; no allowlist means every address."""
    s = Settings.from_env(BASE)
    assert s.keepalive_timeout_seconds == 75.0
    assert s.keepalive_timeout_seconds > 60
    assert (s.header_timeout_seconds, s.body_timeout_seconds) == (10.0, 30.0)
    assert (s.max_header_bytes, s.max_headers, s.max_connections) == (16_384, 100, 1024)
    assert s.commit_timeout_seconds == 5.0
    assert s.allowed_source_ips is None


def test_every_variable_is_read() -> None:
    s = Settings.from_env(
        {
            **BASE,
            "LACUNA_KEEPALIVE_TIMEOUT": "90",
            "LACUNA_HEADER_TIMEOUT": "2.5",
            "LACUNA_BODY_TIMEOUT": "7",
            "LACUNA_MAX_HEADER_BYTES": "8192",
            "LACUNA_MAX_HEADERS": "50",
            "LACUNA_MAX_CONNECTIONS": "300",
            "LACUNA_COMMIT_TIMEOUT": "0.5",
            "LACUNA_ALLOWED_SOURCE_IPS": "203.0.113.0/24, 2001:db8::/32,198.51.100.7",
        }
    )
    assert s.keepalive_timeout_seconds == 90.0
    assert (s.header_timeout_seconds, s.body_timeout_seconds) == (2.5, 7.0)
    assert (s.max_header_bytes, s.max_headers, s.max_connections) == (8192, 50, 300)
    assert s.commit_timeout_seconds == 0.5
    assert s.allowed_source_ips == (
        ipaddress.ip_network("203.0.113.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("LACUNA_KEEPALIVE_TIMEOUT", "0"),
        ("LACUNA_HEADER_TIMEOUT", "soon"),
        ("LACUNA_BODY_TIMEOUT", "-1"),
        ("LACUNA_MAX_HEADER_BYTES", "16k"),
        ("LACUNA_MAX_HEADERS", "0"),
        ("LACUNA_MAX_CONNECTIONS", "1.5"),
        ("LACUNA_COMMIT_TIMEOUT", "inf"),
        ("LACUNA_ALLOWED_SOURCE_IPS", "10.0.0.0/33"),
        ("LACUNA_ALLOWED_SOURCE_IPS", "example.com"),
        ("LACUNA_ALLOWED_SOURCE_IPS", " , "),
    ],
)
def test_bad_values_are_one_clear_problem(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, var: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(var)


def test_allowlist_matches_addresses_in_its_networks() -> None:
    """IPv4, IPv6, IPv4 seen through a dual-stack socket; anything not an address is outside."""
    allowlist = SourceAllowlist(
        (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8::/32"))
    )
    assert allowlist.allows("203.0.113.200")
    assert allowlist.allows("2001:db8::1")
    assert allowlist.allows("::ffff:203.0.113.9")
    assert not allowlist.allows("203.0.114.1")
    assert not allowlist.allows("::1")
    for not_an_address in (None, "", "testclient", "203.0.113.1:443", "unix:/run/x.sock"):
        assert not allowlist.allows(not_an_address)
    assert allowlist.allows("203.0.113.200")  # remembered answers stay right


def test_connection_cap_fits_under_the_file_limit() -> None:
    """The cap leaves RESERVED_FILES descriptors free, never drops below MIN_CONNECTIONS, and
    is the setting when the file limit is large or unlimited."""
    s = Settings.from_env({**BASE, "LACUNA_MAX_CONNECTIONS": "1000"})
    assert Limits.from_settings(s, file_limit=256).max_connections == 256 - RESERVED_FILES
    assert Limits.from_settings(s, file_limit=20).max_connections == MIN_CONNECTIONS
    assert Limits.from_settings(s, file_limit=1 << 20).max_connections == 1000
    assert Limits.from_settings(s, file_limit=None).max_connections == 1000


async def _read(chunks: list[bytes], budget: BodyBudget, limit: int = 100) -> bytes:
    messages = iter(
        [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
    )

    async def receive() -> dict[str, object]:
        return next(messages)

    return await read_body(receive, limit, budget)


async def test_body_budget_bounds_bodies_being_read_together() -> None:
    """Bytes of bodies being read count against the budget while they are read; a body that
    would pass it is refused with 503 server_busy; every byte is given back afterwards."""
    budget = BodyBudget(10)
    assert await _read([b"abcd", b"efgh"], budget) == b"abcdefgh"
    assert budget.held_bytes == 0
    budget.take(5)  # another request's body, still being read
    with pytest.raises(ServerBusy) as info:
        await _read([b"abcd", b"efgh"], budget)
    assert (info.value.status_code, info.value.code) == (503, "server_busy")
    assert budget.held_bytes == 5
    with pytest.raises(PayloadTooLarge):
        await _read([b"x" * 8, b"y" * 8], BodyBudget(1000), limit=10)


def test_the_two_listeners_caps_together_fit_under_the_file_limit() -> None:
    """With the admin listener on, the webhook and admin caps are shares of the same file
    limit: together they leave RESERVED_FILES free (each alone used to take it all)."""
    s = Settings.from_env({**BASE, "LACUNA_MAX_CONNECTIONS": "100000"})
    for limit in (1024, 4096, 65536):
        webhook = Limits.from_settings(s, file_limit=limit, share=WEBHOOK_SHARE)
        admin = Limits.from_settings(s, file_limit=limit, share=ADMIN_SHARE)
        assert webhook.max_connections + admin.max_connections <= limit - RESERVED_FILES
        assert webhook.max_connections > 6 * admin.max_connections >= 6 * MIN_CONNECTIONS
    assert Limits.from_settings(s, file_limit=1024).max_connections == 1024 - RESERVED_FILES
