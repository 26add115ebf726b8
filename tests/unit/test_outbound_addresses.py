"""handlers/_http.py: IPv6 addresses that embed an IPv4 address are judged by that address.

A NAT64 gateway, a SIIT translator, a 6to4 relay, a Teredo relay or a dual-stack
socket carries such an address to the IPv4 host inside it, so ``::ffff:127.0.0.1``
or ``64:ff9b::7f00:1`` must be as refused as ``127.0.0.1`` itself, while the same
forms around a public IPv4 address, and ordinary public IPv6, stay allowed.
"""

from __future__ import annotations

import ipaddress

import pytest

from lacuna_webhooks.handlers._http import embedded_ipv4, is_public_address


def teredo(server: str, client: str, port: int = 40000) -> str:
    """A Teredo address (RFC 4380): 2001:0::/32, server, flags, then port and client XORed."""
    value = (
        (0x20010000 << 96)
        | (int(ipaddress.IPv4Address(server)) << 64)
        | ((port ^ 0xFFFF) << 32)
        | (int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF)
    )
    return str(ipaddress.IPv6Address(value))


PRIVATE_V4 = ["127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.1.2.3"]


def forms(v4: str) -> dict[str, str]:
    """Every IPv6 form embedding ``v4``, by name."""
    n = int(ipaddress.IPv4Address(v4))
    return {
        "mapped ::ffff:a.b.c.d": str(ipaddress.IPv6Address((0xFFFF << 32) | n)),
        "translated ::ffff:0:a.b.c.d": str(ipaddress.IPv6Address((0xFFFF << 48) | n)),
        "compatible ::a.b.c.d": str(ipaddress.IPv6Address(n)),
        "NAT64 64:ff9b::/96": str(ipaddress.IPv6Address((0x64FF9B << 96) | n)),
        "6to4 2002::/16": str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80))),
        "Teredo client": teredo("65.54.227.120", v4),
    }


@pytest.mark.parametrize("v4", PRIVATE_V4)
@pytest.mark.parametrize("form", list(forms("1.2.3.4")))
def test_every_form_embedding_a_non_public_ipv4_is_refused(v4: str, form: str) -> None:
    """Mapped, translated, compatible, NAT64, 6to4 and Teredo forms of loopback, private,
    link-local (metadata), CGNAT and "this network" IPv4 addresses are not public."""
    address = ipaddress.ip_address(forms(v4)[form])
    assert ipaddress.IPv4Address(v4) in embedded_ipv4(address)
    assert is_public_address(address) is False


@pytest.mark.parametrize(
    "literal",
    ["::7f00:1", "64:ff9b::7f00:1", "2002:7f00:1::", "::ffff:0:7f00:1", "::ffff:127.0.0.1"],
)
def test_the_forms_named_in_the_issue_are_refused(literal: str) -> None:
    """The addresses issue 10 found accepted as public, exactly as written there."""
    assert is_public_address(ipaddress.ip_address(literal)) is False


def test_teredo_embedding_a_private_server_is_refused() -> None:
    address = ipaddress.ip_address(teredo("10.0.0.1", "8.8.8.8"))
    assert embedded_ipv4(address) == (
        ipaddress.IPv4Address("10.0.0.1"),
        ipaddress.IPv4Address("8.8.8.8"),
    )
    assert is_public_address(address) is False


@pytest.mark.parametrize("literal", ["64:ff9b:1::7f00:1", "64:ff9b:1::808:808", "64:ff9b:1:ff::1"])
def test_the_nat64_local_use_prefix_is_never_public(literal: str) -> None:
    """RFC 8215's 64:ff9b:1::/48 belongs to one network's own translator: refused whatever
    it embeds (where it embeds depends on a prefix length only that network knows)."""
    assert is_public_address(ipaddress.ip_address(literal)) is False


@pytest.mark.parametrize(
    "form",
    [
        "mapped ::ffff:a.b.c.d",
        "translated ::ffff:0:a.b.c.d",
        "NAT64 64:ff9b::/96",
        "6to4 2002::/16",
    ],
)
def test_forms_embedding_a_public_ipv4_stay_allowed(form: str) -> None:
    address = ipaddress.ip_address(forms("8.8.8.8")[form])
    assert embedded_ipv4(address) == (ipaddress.IPv4Address("8.8.8.8"),)
    assert is_public_address(address) is True


@pytest.mark.parametrize(
    "literal", ["2606:4700::1111", "2a00:1450:4001:80b::200e", "2001:4860::8888"]
)
def test_real_public_ipv6_stays_allowed_and_embeds_nothing(literal: str) -> None:
    address = ipaddress.ip_address(literal)
    assert embedded_ipv4(address) == ()
    assert is_public_address(address) is True


@pytest.mark.parametrize("literal", ["::", "::1"])
def test_unspecified_and_loopback_are_not_read_as_ipv4_compatible(literal: str) -> None:
    address = ipaddress.ip_address(literal)
    assert embedded_ipv4(address) == ()
    assert is_public_address(address) is False


def test_the_helper_agrees_with_ipaddress_where_it_can() -> None:
    """The by-hand reading matches ``ipaddress``'s own ``ipv4_mapped``, ``sixtofour`` and
    ``teredo`` properties (the NAT64 and translated forms have none)."""
    mapped = ipaddress.IPv6Address(forms("10.0.0.1")["mapped ::ffff:a.b.c.d"])
    assert embedded_ipv4(mapped) == (mapped.ipv4_mapped,)
    sixtofour = ipaddress.IPv6Address(forms("10.0.0.1")["6to4 2002::/16"])
    assert embedded_ipv4(sixtofour) == (sixtofour.sixtofour,)
    tunnel = ipaddress.IPv6Address(forms("10.0.0.1")["Teredo client"])
    assert tunnel.teredo is not None
    assert embedded_ipv4(tunnel) == tunnel.teredo
    assert tunnel.teredo[1] == ipaddress.IPv4Address("10.0.0.1")
