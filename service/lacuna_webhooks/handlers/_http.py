"""Outbound HTTP for the built-in handlers: https only, public addresses only, bounded.

Every request a handler makes to a URL it did not choose (an ``audio_url`` from
an event, a Slack webhook URL from the environment) goes through
``OutboundClient``:

- the scheme must be ``https`` (``http`` too when ``allow_private`` is set);
- the address actually connected to must be public: the host name is resolved
  at connect time and the connection is refused when *any* address it resolves
  to is loopback, private, link-local (cloud metadata ``169.254.169.254``),
  carrier-grade NAT, multicast, reserved or unspecified, including IPv6 forms
  that embed such an IPv4 address (IPv4-mapped, -compatible and -translated,
  NAT64, 6to4, Teredo; see ``is_public_address``). The check sits in the
  network backend under the connection pool, so it covers every redirect hop
  and a DNS answer cannot change between "checked" and "connected";
- redirects are followed by hand, at most ``max_redirects``, each hop checked;
- connect and read timeouts always apply; proxies from the environment are
  ignored (a proxy would hide the real destination from the check).

``allow_private=True`` (``LACUNA_ALLOW_PRIVATE_URLS``) lifts the address check
and allows ``http``: for local testing only.

Refusals raise ``UnsafeURL``, a ``PermanentError``: retrying cannot help.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpcore
import httpx

from ..config import http_url_problem
from ..errors import MAX_RETRY_DELAY_SECONDS, PermanentError, RetryLater
from ..redact import redact_text, redact_url

USER_AGENT = "lacuna-webhooks"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# How httpx words the RemoteProtocolError of a redirect whose Location it cannot parse.
_BAD_LOCATION = "Invalid URL in location header"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeURL(PermanentError):
    """The URL is not allowed: not https, or it leads to a non-public address."""


# IPv6 prefixes that carry an IPv4 address in their last 32 bits; what they reach is that
# IPv4 host (through a NAT64 gateway, a translator, or a dual-stack socket), so they are
# judged by it. 6to4 (``2002::/16``) and Teredo (``2001::/32``) embed theirs elsewhere and
# are read with ``ipaddress``'s ``sixtofour`` / ``teredo``.
_LOW_32_EMBEDDING = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped (RFC 4291)
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (RFC 2765 SIIT)
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (RFC 4291, deprecated)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
"""RFC 8215's NAT64 prefix for one network's own translator: local by definition, and its
embedding position depends on the prefix length the operator chose, so always refused."""


def embedded_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address embeds (mapped, translated, compatible, NAT64
    well-known prefix, 6to4, Teredo server and client); ``()`` for any other address.

    ``::`` and ``::1`` are not IPv4-compatible addresses (RFC 4291 2.5.5.1): they stay
    the IPv6 unspecified and loopback addresses.
    """
    if not isinstance(ip, ipaddress.IPv6Address) or int(ip) <= 1:
        return ()
    if any(ip in net for net in _LOW_32_EMBEDDING):
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo  # (server, client); the client's address is already un-XORed
    return ()


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address.

    An IPv6 address that embeds IPv4 addresses (see ``embedded_ipv4``) is public only
    when each of them is; IPv4-mapped ones are judged by their IPv4 address alone (the
    socket connects to that address). The NAT64 local-use prefix ``64:ff9b:1::/48`` is
    never public.
    """
    embedded = embedded_ipv4(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    elif ip in NAT64_LOCAL_USE:
        return False
    return (
        ip.is_global
        and not ip.is_multicast
        and all(v4.is_global and not v4.is_multicast for v4 in embedded)
    )


def check_url(
    url: str | httpx.URL, *, allow_private: bool, what: str, allow_http: bool | None = None
) -> httpx.URL:
    """Parse ``url`` and check its scheme and host; raise ``UnsafeURL`` naming ``what``.

    ``http`` is accepted when ``allow_http`` (default: ``allow_private``).
    Addresses are checked later, at connect time (see the module docstring).
    """
    if allow_http is None:
        allow_http = allow_private
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise UnsafeURL(f"{what} is not a valid URL") from None
    allowed = {"https", "http"} if allow_http else {"https"}
    if parsed.scheme not in allowed:
        hint = "" if allow_http else " (http and other schemes need LACUNA_ALLOW_PRIVATE_URLS)"
        raise UnsafeURL(f"{what} must be an https URL, got {parsed.scheme or 'no'} scheme{hint}")
    if not parsed.host:
        raise UnsafeURL(f"{what} has no host")
    # The settings' rule (a port from 1 to 65535 above all: httpx takes 84333, and the
    # connect then failed at every attempt with anyio's OverflowError).
    problem = http_url_problem(str(parsed))
    if problem is not None:
        raise UnsafeURL(f"{what} {problem}")
    return parsed


class _PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    """Resolves host names itself and connects only when every address is public.

    Addresses inside ``trusted_networks`` count as public (a seam for tests and
    embedders; the built-in handlers pass none).
    """

    def __init__(self, trusted_networks: tuple[IPNetwork, ...] = ()) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._trusted = trusted_networks

    def allowed(self, ip: IPAddress) -> bool:
        return is_public_address(ip) or any(ip in net for net in self._trusted)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        addresses: list[IPAddress] = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not self.allowed(ip):
                where = f"{host} resolves to {ip}" if host != str(ip) else host
                raise UnsafeURL(
                    f"{where}: a loopback, private, link-local or otherwise non-public "
                    "address (allowed only with LACUNA_ALLOW_PRIVATE_URLS=true)"
                )
            if ip not in addresses:
                addresses.append(ip)
        error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for ip in addresses:
            # Connect to the address just checked, never to the name (which could re-resolve).
            try:
                return await self._inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} has no address")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeURL("unix sockets are not used for outbound calls")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PublicOnlyTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the connection pool built on ``_PublicOnlyBackend``."""

    def __init__(self, trusted_networks: tuple[IPNetwork, ...] = ()) -> None:
        super().__init__(trust_env=False)
        # httpx does not expose the network backend, so the pool is rebuilt with ours;
        # the arguments mirror httpx's defaults (certificates verified with certifi).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=20,
            max_keepalive_connections=10,
            keepalive_expiry=5.0,
            network_backend=_PublicOnlyBackend(trusted_networks),
        )


class OutboundClient:
    """An httpx client with the safety rules of this module. One per handler.

    ``allow_http`` and ``trusted_networks`` loosen the rules one at a time for
    tests (e.g. reach a test server on 127.0.0.1 while still refusing
    ``169.254.169.254``); the built-in handlers only pass ``allow_private``.
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
        max_redirects: int = 5,
        allow_http: bool | None = None,
        trusted_networks: Iterable[str] = (),
    ) -> None:
        self.allow_private = allow_private
        self.read_timeout_seconds = read_timeout_seconds
        self.allow_http = allow_private if allow_http is None else allow_http
        self.max_redirects = max_redirects
        networks = tuple(ipaddress.ip_network(n) for n in trusted_networks)
        transport = (
            httpx.AsyncHTTPTransport(trust_env=False)
            if allow_private
            else _PublicOnlyTransport(networks)
        )
        self._client = httpx.AsyncClient(
            transport=transport,
            trust_env=False,
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
            timeout=httpx.Timeout(
                connect=connect_timeout_seconds,
                read=read_timeout_seconds,
                write=read_timeout_seconds,
                pool=connect_timeout_seconds,
            ),
        )

    def check(self, url: str | httpx.URL, *, what: str) -> httpx.URL:
        return check_url(
            url, allow_private=self.allow_private, allow_http=self.allow_http, what=what
        )

    @asynccontextmanager
    async def stream_get(
        self, url: str, *, what: str, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """GET ``url`` as a stream, following redirects by hand; yield the final response.

        Raises ``UnsafeURL`` for a refused hop and ``PermanentError`` after too
        many redirects. httpx's own errors (timeouts, resets) propagate.
        """
        current = self.check(url, what=what)
        for _ in range(self.max_redirects + 1):
            request = self._client.build_request("GET", current, headers=headers)
            response = await self._send(request, what)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity") and response.status_code < 300:
                # httpx would inflate it, a whole chunk at once and before any size check: a
                # 1 KB double-gzipped body took 1.6 GB. Audio was asked for as identity.
                await response.aclose()
                raise PermanentError(
                    f"{what} came with Content-Encoding {encoding[:40]!r}, though identity was "
                    "asked for: it is not read (a compressed body can inflate without bound)"
                )
            location = response.headers.get("location")
            if response.status_code in REDIRECT_STATUSES and location:
                await response.aclose()
                try:
                    target = current.join(location)
                except httpx.InvalidURL:
                    raise UnsafeURL(f"{what} redirects to an invalid URL") from None
                current = self.check(target, what=f"{what} (redirect)")
                continue
            try:
                yield response
            finally:
                await response.aclose()
            return
        raise PermanentError(f"{what} redirected more than {self.max_redirects} times")

    async def post(
        self, url: str, *, what: str, content: bytes, headers: Mapping[str, str]
    ) -> tuple[httpx.Response, str]:
        """POST without following redirects; return the response and, for an answer that is
        not 2xx, up to 4 KiB of its body (for the error's reason).

        A 2xx is done with its headers: its body is not read (a slow or cut-off body after
        a 2xx failed the attempt, which the receiver had taken). The body is read raw,
        never inflated (a compressed one is named, not read: a 1 KB gzip bomb took 1 GB),
        and a failure while reading it leaves the reason empty."""
        target = self.check(url, what=what)
        request = self._client.build_request("POST", target, content=content, headers=headers)
        response = await self._send(request, what)
        body = bytearray()
        cut = False  # the body read is not the whole body
        try:
            if not 200 <= response.status_code < 300:
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    body += f"(a body with Content-Encoding {encoding[:40]})".encode()
                else:
                    cut = True
                    # The whole read within the read timeout: each read has that timeout, so
                    # a body trickled a byte a second never ended and the attempt ran into
                    # the handler's timeout, the peer's status lost with it.
                    with contextlib.suppress(httpx.HTTPError, TimeoutError):
                        async with asyncio.timeout(self.read_timeout_seconds):
                            async for chunk in response.aiter_raw():
                                body += chunk
                                if len(body) >= 4096:
                                    break
                            else:
                                cut = False
        finally:
            await response.aclose()
        text = bytes(body[:4096]).decode("utf-8", "replace")
        if cut:
            # Its last word may be the start of a secret the peer echoed, which no mask can
            # recognise any more (handlers._common.peer_text): dropped.
            text = re.sub(r"\S*\Z", "", text)
        return response, text

    async def _send(self, request: httpx.Request, what: str) -> httpx.Response:
        try:
            return await self._client.send(request, stream=True)
        except httpx.InvalidURL:
            # A redirect's Location httpx cannot parse: it builds the next request even when
            # redirects are not followed, and InvalidURL is no httpx.HTTPError.
            raise UnsafeURL(f"{what} answered with a redirect to an invalid URL") from None
        except httpx.RemoteProtocolError as exc:
            # The same, for a Location httpx parses no further than this (`//[::1`, a bad
            # port): raised as a protocol error, it was retried as network trouble, though
            # the peer answered and its redirect is refused whatever its target.
            if str(exc).startswith(_BAD_LOCATION):
                raise UnsafeURL(f"{what} answered with a redirect to an invalid URL") from None
            raise

    async def aclose(self) -> None:
        await self._client.aclose()


def retry_after_seconds(
    value: str | None, *, date: str | None = None, now: datetime | None = None
) -> float | None:
    """``Retry-After`` (delta seconds or an HTTP date) as seconds; ``None`` if absent or bad.

    A date is read against the answer's own ``Date`` header (``date``) when it has a valid
    one, else against ``now`` (default: this machine's clock). The peer wrote both with its
    clock: read against ours, a peer an hour ahead asking for 60 s got the cap (an hour), and
    one an hour behind got nothing (the base delay, again and again)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() holds and float("²") raises
        # 309 digits and more read as inf, which the worker's JSON wire carries as null:
        # finite, and far past any cap.
        return min(float(text), MAX_RETRY_DELAY_SECONDS)
    when = http_date(text)
    if when is None:
        return None
    sent = http_date(date) if date is not None else None
    reference = sent or now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def http_date(text: str) -> datetime | None:
    """An HTTP date as an aware datetime (UTC when it names no zone); ``None`` if bad."""
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


# httpx errors that the request itself causes (a scheme no transport speaks, a header value
# h11 refuses to send): the same event builds the same request on every retry.
INPUT_ERRORS = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def transport_failure(exc: httpx.HTTPError, *, what: str, url: str) -> RetryLater | PermanentError:
    """An httpx failure, with a message free of the full URL: ``PermanentError`` when the
    request itself is at fault (``INPUT_ERRORS``), else ``RetryLater`` (network trouble)."""
    # Every URL in the text (a redirect's target too) is cut to its host.
    detail = redact_text(str(exc).replace(url, redact_url(url))) or "no detail"
    message = f"{what} failed: {type(exc).__name__}: {detail}"
    if isinstance(exc, INPUT_ERRORS):
        return PermanentError(message)
    return RetryLater(message)


__all__ = [
    "OutboundClient",
    "UnsafeURL",
    "check_url",
    "embedded_ipv4",
    "http_date",
    "is_public_address",
    "retry_after_seconds",
    "transport_failure",
]
