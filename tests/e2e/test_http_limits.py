"""A real `serve` against hostile and slow clients on raw sockets (docs/http.md).

Timeouts, header caps, the connection cap that sheds idle and slow sockets
first, HTTP errors in the envelope, memory bounded, keep-alive as configured,
the commit wait bound, and the sender allowlist behind trusted and untrusted
proxies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve

pytestmark = pytest.mark.e2e


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    """Every socket a test opened with ``connect`` is closed after it."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def connect(serve: Serve, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", serve.port), timeout=timeout)
    sock.settimeout(timeout)
    _OPEN.append(sock)
    return sock


def webhook_request(event_id: str) -> bytes:
    body, headers = signed(make_event(event_id))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\n{head}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One response (status, headers, body), or ``None`` if the server reset or closed
    the connection before a whole one arrived.

    It takes from the socket exactly the bytes of that response (the end of the head is
    found with ``MSG_PEEK``), so an answer pipelined behind it, even one that arrived in
    the same segment, is left for the next call."""
    try:
        head = b""
        while True:
            peeked = sock.recv(65536, socket.MSG_PEEK)
            if not peeked:
                return None
            end = (head + peeked).find(b"\r\n\r\n")
            taken = _recv_exactly(sock, len(peeked) if end < 0 else end + 4 - len(head))
            if taken is None:
                return None
            head += taken
            if end >= 0:
                break
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        body = _recv_exactly(sock, int(headers.get("content-length", "0")))
        if body is None:
            return None
    except (ConnectionResetError, BrokenPipeError):
        return None
    return int(lines[0].split()[1]), headers, body


def _recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    """Exactly ``count`` bytes, or ``None`` when the peer closed first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed (or reset) the connection: a read returns EOF."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def envelope_code(response: tuple[int, dict[str, str], bytes] | None) -> tuple[int, str]:
    assert response is not None, "the server closed the connection without an answer"
    status, headers, body = response
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"type", "code", "message", "param"}
    return status, error["code"]


def rss_kib(serve: Serve, field: str = "VmRSS") -> int:
    assert serve.proc is not None
    for line in Path(f"/proc/{serve.proc.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for serve")


def metric(serve: Serve, name: str) -> float:
    text = httpx.get(f"{serve.base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def db_env(tmp_path: Path, **env: str) -> dict[str, str]:
    return {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}", **env}


def test_slowloris_headers_get_408_after_the_header_timeout(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Headers trickled a byte at a time are cut at LACUNA_HEADER_TIMEOUT (a deadline for the
    whole header, not per byte) with the 408 envelope; a valid webhook still gets 200."""
    serve = serve_factory(db_env(tmp_path, LACUNA_HEADER_TIMEOUT="1")).start()
    sock = connect(serve)
    started = time.monotonic()
    sock.sendall(b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\n")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        # A byte every 0.2 s for up to 8 s, until the server answers (after 1 s).
        while time.monotonic() - started < 8 and not select.select([sock], [], [], 0.2)[0]:
            sock.sendall(b"X")
    response = read_response(sock)
    assert envelope_code(response) == (408, "request_timeout")
    assert time.monotonic() - started < 6  # cut at the deadline, not by the trickle's end
    assert closed_by_server(sock)
    sock.close()
    assert metric(serve, 'lacuna_webhooks_http_refused_total{reason="request_timeout"}') == 1
    ok = connect(serve)
    ok.sendall(webhook_request("evt_after_slowloris"))
    assert read_response(ok) is not None


def test_trickling_body_gets_408_after_the_body_timeout(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A body sent a byte at a time is cut at LACUNA_BODY_TIMEOUT with the 408 envelope, and
    nothing is stored."""
    serve = serve_factory(db_env(tmp_path, LACUNA_BODY_TIMEOUT="1")).start()
    request = webhook_request("evt_trickle")
    head, _, body = request.partition(b"\r\n\r\n")
    sock = connect(serve)
    sock.sendall(head + b"\r\n\r\n")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for byte in body[:20]:
            sock.sendall(bytes([byte]))
            time.sleep(0.2)
    assert envelope_code(read_response(sock)) == (408, "request_timeout")
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_header_size_and_count_caps_answer_431(serve_factory: type[Serve], tmp_path: Path) -> None:
    """Headers over LACUNA_MAX_HEADER_BYTES or more than LACUNA_MAX_HEADERS lines get the 431
    envelope (or, for a sender still pushing megabytes, a reset after it)."""
    serve = serve_factory(db_env(tmp_path)).start()
    many = b"".join(b"X-H%d: a\r\n" % i for i in range(101))
    sock = connect(serve)
    sock.sendall(b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n")
    assert envelope_code(read_response(sock)) == (431, "headers_too_large")
    sock = connect(serve)
    sock.sendall(b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000)
    assert envelope_code(read_response(sock)) == (431, "headers_too_large")
    assert metric(serve, 'lacuna_webhooks_http_refused_total{reason="headers_too_large"}') == 2


def _push(serve: Serve, prefix: bytes, total: int, block: bytes) -> tuple[int, str] | None:
    """Send ``prefix`` then ``block`` until ``total`` bytes or the server cuts us off; the
    answer's (status, code) if one could be read."""
    sock = connect(serve, timeout=30)
    sent = 0
    try:
        sock.sendall(prefix)
        while sent < total:
            sock.sendall(block)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = read_response(sock)
    sock.close()
    return envelope_code(response) if response is not None else None


def test_huge_and_numerous_headers_do_not_take_memory(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Ten concurrent unterminated 48 MiB headers, a 16 MiB header and 100,000 headers: each
    answered 431 or cut, and serve's peak RSS (VmHWM) stays within 64 MiB of where it was."""
    serve = serve_factory(db_env(tmp_path)).start()
    for i in range(20):  # warm up: the resident set of a serve that has answered requests
        sock = connect(serve)
        sock.sendall(webhook_request(f"evt_warm_{i}"))
        assert read_response(sock) is not None
        sock.close()
    before = rss_kib(serve)
    block = b"a" * (1 << 20)
    unterminated = b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nX-Big: "
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: _push(serve, unterminated, 48 << 20, block), range(10)))
    answers.append(_push(serve, unterminated, 16 << 20, block))
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(100_000))
    answers.append(_push(serve, b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\n" + headers, 0, b""))
    assert all(a in (None, (431, "headers_too_large")) for a in answers), answers
    assert any(a is not None for a in answers)  # the envelope does reach some senders
    peak = rss_kib(serve, "VmHWM")
    assert peak - before < 64 * 1024, f"RSS grew from {before} KiB to a peak of {peak} KiB"
    ok = connect(serve)
    ok.sendall(webhook_request("evt_after_big_headers"))
    response = read_response(ok)
    assert response is not None
    assert response[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
            id="content-length-and-transfer-encoding",
        ),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n0\r\n\r\n",
            id="transfer-encoding-and-content-length",
        ),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nhello!",
            id="two-content-lengths",
        ),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        # llhttp read these as plain chunked (a 200): codings it does not apply.
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked"
            b"\r\n\r\n0\r\n\r\n",
            id="gzip-then-chunked",
        ),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: foo, chunked"
            b"\r\n\r\n0\r\n\r\n",
            id="unknown-then-chunked",
        ),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="two-transfer-encoding-lines",
        ),
        # RFC 9112 §3.2: one Host, exactly, in an HTTP/1.1 request (all of these got 200).
        pytest.param(b"POST /webhooks/lacuna HTTP/1.1\r\nContent-Length: 0\r\n\r\n", id="no-host"),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
            id="two-hosts",
        ),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/2.0\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
            id="http-2.0-request-line",
        ),
        pytest.param(b"POST /webhooks/lacuna\r\n\r\n", id="http-0.9-request-line"),
        # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing (it was decoded, 200).
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="http-1.0-transfer-encoding",
        ),
        # RFC 9112 §3.2: no fragment in a request target (uvicorn dropped it: 200).
        pytest.param(
            b"POST /webhooks/lacuna#x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
            id="fragment-in-target",
        ),
        pytest.param(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", id="connect"
        ),
    ],
)
def test_malformed_framing_and_smuggling_get_400_envelope(
    serve_factory: type[Serve], tmp_path: Path, request_bytes: bytes
) -> None:
    """What the HTTP parser refuses (request smuggling shapes, bad chunk sizes) is answered
    400 ``malformed_request`` in the envelope, and the connection is closed."""
    serve = serve_factory(db_env(tmp_path)).start()
    sock = connect(serve)
    sock.sendall(request_bytes)
    assert envelope_code(read_response(sock)) == (400, "malformed_request")
    assert closed_by_server(sock)


@pytest.mark.parametrize(
    "target", ["/webhooks%2Flacuna", "/webhooks%2flacuna", "/%77ebhooks/lacuna"]
)
def test_an_encoded_webhook_path_is_not_the_webhook_route(
    serve_factory: type[Serve], tmp_path: Path, target: str
) -> None:
    """uvicorn decodes the path: /webhooks%2Flacuna reached the route and stored a signed
    event (RFC 3986 §2.2: %2F is not "/"). Only the literal path is the route: a 404."""
    serve = serve_factory(db_env(tmp_path)).start()
    sock = connect(serve)
    sock.sendall(
        webhook_request("evt_encoded_path").replace(b"/webhooks/lacuna", target.encode(), 1)
    )
    assert envelope_code(read_response(sock))[0] == 404
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_idle_and_slow_sockets_are_shed_so_valid_webhooks_get_through(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """With the file limit at 256 (so the connection cap is 192), 2,000 idle sockets, 100
    slowloris sockets and 20 trickling bodies are open; 50 valid signed webhooks sent
    afterwards on new connections all get 200 (idle and slow connections are closed to
    make room), and the sheds are counted in /metrics."""
    serve = serve_factory(db_env(tmp_path))
    serve.wrapper = ("prlimit", "--nofile=256")
    serve.start()
    hostile: list[socket.socket] = []
    try:
        for i in range(2_120):
            sock = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
            hostile.append(sock)
            if 2_000 <= i < 2_100:
                sock.sendall(b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            elif i >= 2_100:
                sock.sendall(
                    b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nContent-Length: 999\r\n\r\n{"
                )
        time.sleep(0.5)  # let the server accept the backlog
        statuses = []
        for i in range(50):
            sock = connect(serve)
            sock.sendall(webhook_request(f"evt_shed_{i:02d}"))
            response = read_response(sock)
            statuses.append(response[0] if response else None)
            sock.close()
    finally:
        for sock in hostile:
            sock.close()
    assert statuses == [200] * 50
    assert metric(serve, 'lacuna_webhooks_http_refused_total{reason="idle_shed"}') > 1_000
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 50


def test_bodies_left_one_byte_short_are_shed_so_valid_webhooks_get_through(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """64 unsigned bodies of the largest size, each left one byte short, spend the body
    budget (64 x LACUNA_MAX_BODY_BYTES). Every valid webhook sent after them got 503
    server_busy until the body timeout cut the attackers (and the attack could be renewed
    every 30 s); now the bodies read the longest are refused to make room."""
    serve = serve_factory(db_env(tmp_path)).start()
    size = 1_048_576
    hostile: list[socket.socket] = []
    try:
        for _ in range(64):
            sock = connect(serve)
            sock.sendall(
                b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\n"
                + f"Content-Length: {size}\r\n\r\n".encode()
                + b"a" * (size - 1)
            )
            hostile.append(sock)
        time.sleep(1)  # the server has read them all
        statuses = []
        for i in range(5):
            sock = connect(serve)
            sock.sendall(webhook_request(f"evt_budget_{i}"))
            response = read_response(sock)
            statuses.append(response[0] if response else None)
        assert statuses == [200] * 5
        # One shed body (the oldest) made room for the five small ones.
        assert envelope_code(read_response(hostile[0])) == (503, "server_busy")
    finally:
        for sock in hostile:
            sock.close()


def test_keepalive_lasts_the_configured_time(serve_factory: type[Serve], tmp_path: Path) -> None:
    """An idle kept-alive connection stays usable until LACUNA_KEEPALIVE_TIMEOUT, then the
    server closes it."""
    serve = serve_factory(db_env(tmp_path, LACUNA_KEEPALIVE_TIMEOUT="3")).start()
    sock = connect(serve)
    sock.sendall(webhook_request("evt_ka_1"))
    assert read_response(sock) is not None
    time.sleep(2)
    sock.sendall(webhook_request("evt_ka_2"))
    response = read_response(sock)
    assert response is not None
    assert response[0] == 200
    answered = time.monotonic()
    assert closed_by_server(sock)
    assert time.monotonic() - answered > 2.5  # not before the timeout (3 s)


def test_default_keepalive_outlives_a_60_second_proxy_idle_timeout(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """By default a kept-alive connection is still open after uvicorn's old 5 s (the default is
    75 s, above the 60 s idle timeout of nginx and common load balancers)."""
    serve = serve_factory(db_env(tmp_path)).start()
    sock = connect(serve)
    sock.sendall(webhook_request("evt_ka_default_1"))
    assert read_response(sock) is not None
    time.sleep(6)
    sock.sendall(webhook_request("evt_ka_default_2"))
    response = read_response(sock)
    assert response is not None
    assert response[0] == 200


def test_commit_wait_is_bounded_by_lacuna_commit_timeout(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """While another process holds the SQLite write lock, a webhook gets 503
    store_unavailable with Retry-After after LACUNA_COMMIT_TIMEOUT (1 s), well before
    SQLite's 5 s busy timeout; once the lock is released the retry gets 200 (a duplicate if
    the first commit went through after its 503)."""
    serve = serve_factory(db_env(tmp_path, LACUNA_COMMIT_TIMEOUT="1")).start()
    holder = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        body, headers = signed(make_event("evt_locked"))
        started = time.monotonic()
        response = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=30)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "store_unavailable"
    assert response.headers["retry-after"].isdigit()
    assert waited < 4
    retry = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=30)
    assert retry.status_code == 200, retry.text


# --- LACUNA_ALLOWED_SOURCE_IPS ---------------------------------------------------------------


def post_from(serve: Serve, event_id: str, forwarded_for: str | None) -> httpx.Response:
    body, headers = signed(make_event(event_id))
    if forwarded_for is not None:
        headers["x-forwarded-for"] = forwarded_for
    return httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)


def test_allowlist_behind_a_trusted_proxy_uses_the_forwarded_client(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Behind a trusted proxy (the peer 127.0.0.1 is in LACUNA_TRUSTED_PROXIES) the
    X-Forwarded-For client is checked: inside the list → 200, outside or absent → 403
    source_not_allowed, counted in /metrics."""
    serve = serve_factory(
        db_env(
            tmp_path,
            LACUNA_TRUSTED_PROXIES="127.0.0.1",
            LACUNA_ALLOWED_SOURCE_IPS="203.0.113.0/24, 2001:db8::/32",
        )
    ).start()
    assert post_from(serve, "evt_allow_1", "203.0.113.9").status_code == 200
    assert post_from(serve, "evt_allow_2", "2001:db8::7").status_code == 200
    for i, forwarded in enumerate(["198.51.100.7", None, "not-an-address"]):
        refused = post_from(serve, f"evt_refused_{i}", forwarded)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "source_not_allowed"
    assert metric(serve, 'lacuna_webhooks_received_total{outcome="source_not_allowed"}') == 3


def test_allowlist_ignores_a_spoofed_forwarded_for_from_an_untrusted_peer(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A peer that is not a trusted proxy cannot claim an allowed address with X-Forwarded-For:
    its own address is checked."""
    serve = serve_factory(
        db_env(
            tmp_path,
            LACUNA_TRUSTED_PROXIES="192.0.2.1",
            LACUNA_ALLOWED_SOURCE_IPS="203.0.113.0/24",
        )
    ).start()
    spoofed = post_from(serve, "evt_spoof", "203.0.113.9")
    assert spoofed.status_code == 403
    assert spoofed.json()["error"]["code"] == "source_not_allowed"
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_allowlist_refuses_before_the_body_is_read(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A refused sender gets its 403 while its announced body has not been sent at all."""
    serve = serve_factory(
        db_env(tmp_path, LACUNA_TRUSTED_PROXIES="192.0.2.1", LACUNA_ALLOWED_SOURCE_IPS="10.0.0.0/8")
    ).start()
    sock = connect(serve)
    sock.sendall(
        b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nContent-Length: 500000\r\n"
        b"x-lacuna-signature: t=1,v1=00\r\n\r\n"
    )
    assert envelope_code(read_response(sock)) == (403, "source_not_allowed")
    allowed = serve_factory(
        db_env(tmp_path, LACUNA_TRUSTED_PROXIES="192.0.2.1", LACUNA_ALLOWED_SOURCE_IPS="127.0.0.1")
    ).start()
    assert post_from(allowed, "evt_local", "198.51.100.7").status_code == 200


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi", "/healthz"])
def test_a_whole_head_over_the_cap_in_one_read_gets_431(
    serve_factory: type[Serve], tmp_path: Path, target: str
) -> None:
    """Request line and headers over LACUNA_MAX_HEADER_BYTES that arrive complete, in one
    write: 431, as when they trickle in (the count per read was reset by the end of the very
    head it should have measured, so such a head went through, a 200 with 20 KB of headers),
    also behind a request answered in the same read."""
    serve = serve_factory(db_env(tmp_path)).start()
    head = f"POST {target} HTTP/1.1\r\nHost: t\r\nX-Big: {'a' * 20_000}\r\n".encode()
    body, headers = signed(make_event("evt_big_head"))
    signed_head = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    big = head + signed_head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    for before in (b"", b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"):
        sock = connect(serve)
        sock.sendall(before + big)
        if before:
            ahead = read_response(sock)
            assert ahead is not None
            assert ahead[0] == 200
        assert envelope_code(read_response(sock)) == (431, "headers_too_large")
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_refusals_of_the_http_layer_carry_a_date(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """400, 408 and 431 written by the HTTP layer carry `Date` like every other answer
    (RFC 9110 §6.6.1: an origin server with a clock sends it); they had none."""
    serve = serve_factory(db_env(tmp_path, LACUNA_HEADER_TIMEOUT="1")).start()
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000,
        b"GET /healthz HTTP/1.1\r\n",
    ):
        sock = connect(serve)
        sock.sendall(raw)
        answer = read_response(sock)
        assert answer is not None
        assert answer[0] in (400, 408, 431)
        assert answer[1]["date"].endswith(" GMT"), answer[1]


def _chunked_head(target: str, headers: dict[str, str]) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST {target} HTTP/1.1\r\nHost: t\r\n{head}Transfer-Encoding: chunked\r\n\r\n".encode()


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
def test_trailer_fields_are_not_request_headers(
    serve_factory: type[Serve], tmp_path: Path, target: str
) -> None:
    """A chunked body's trailer fields are not the request's headers (RFC 9110 §6.5): a
    signature or an `X-Forwarded-For` sent there counts for nothing. Through ASGI they were
    appended to the headers before the endpoint read them: a signature in a trailer was
    accepted, and an `X-Forwarded-For` in a trailer (which a trusted proxy passes on after
    its own header) chose the client address the allowlist checks."""
    serve = serve_factory(
        db_env(tmp_path, LACUNA_TRUSTED_PROXIES="127.0.0.1", LACUNA_ALLOWED_SOURCE_IPS="10.0.0.0/8")
    ).start()
    body, headers = signed(make_event("evt_trailer"))
    framed = b"%x\r\n%s\r\n0\r\n" % (len(body), body)
    sig = headers["x-lacuna-signature"].encode()
    sock = connect(serve)
    sock.sendall(
        _chunked_head(target, {"X-Forwarded-For": "10.0.0.1"})
        + framed
        + b"x-lacuna-signature: %s\r\n\r\n" % sig
    )
    assert envelope_code(read_response(sock)) == (401, "missing_signature")
    sock = connect(serve)
    sock.sendall(
        _chunked_head(target, {**headers, "X-Forwarded-For": "203.0.113.9"})
        + framed
        + b"X-Forwarded-For: 10.0.0.1\r\n\r\n"
    )
    assert envelope_code(read_response(sock)) == (403, "source_not_allowed")
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
def test_a_trailer_section_over_the_header_cap_gets_431(
    serve_factory: type[Serve], tmp_path: Path, target: str
) -> None:
    """A trailer section larger than LACUNA_MAX_HEADER_BYTES (one endless field, or many
    small ones) is refused with the 431 as headers are, and the server does not hold it:
    it held every byte until the body timeout (200 MiB of trailer: 200 MiB more RSS)."""
    serve = serve_factory(db_env(tmp_path, LACUNA_BODY_TIMEOUT="60")).start()
    before = rss_kib(serve)
    endless = [b"X-Endless: "] + [b"a" * (1 << 20)] * 32
    many = [b"".join(b"X-T%d-%d: a\r\n" % (j, i) for i in range(10_000)) for j in range(20)]
    for trailer in (endless, many):
        sock = connect(serve)
        sock.sendall(_chunked_head(target, {}) + b"2\r\n{}\r\n0\r\n")
        with contextlib.suppress(OSError):  # the server may close while this is sent
            for part in trailer:
                sock.sendall(part)
        assert envelope_code(read_response(sock)) == (431, "headers_too_large")
    assert rss_kib(serve) - before < 24 * 1024


def _upgrade_head(target: str, upgrade: bytes, headers: dict[str, str], framing: bytes) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    return b"POST %s HTTP/1.1\r\nHost: t\r\n%s%s%s\r\n" % (target.encode(), upgrade, head, framing)


@pytest.mark.parametrize(
    "upgrade",
    [
        pytest.param(
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
            id="curl-http2",
        ),
        pytest.param(b"Connection: keep-alive, upgrade\r\nUpgrade: websocket\r\n", id="websocket"),
    ],
)
@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
def test_an_upgrade_request_is_answered_as_plain_http_with_its_body(
    serve_factory: type[Serve], tmp_path: Path, upgrade: bytes, target: str
) -> None:
    """Upgrades are not served, so an Upgrade request is the plain HTTP/1.1 request it also
    is (RFC 9110 §7.8). httptools ended it at its head: its body was dropped (`curl --http2`
    on http:// offers h2c with a POST, and a valid webhook got 401), what followed in the
    same read was dropped too, and a body sent after the head was parsed as a request of
    its own (here a GET /metrics inside a POST /healthz's body was answered)."""
    serve = serve_factory(db_env(tmp_path)).start()
    body, headers = signed(make_event("evt_upgrade_cl"))
    sock = connect(serve)
    # Content-Length, the body in the same read, and a request pipelined behind it.
    sock.sendall(
        _upgrade_head(target, upgrade, headers, b"Content-Length: %d\r\n" % len(body))
        + body
        + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    first, second = read_response(sock), read_response(sock)
    assert first is not None
    assert second is not None
    assert (first[0], json.loads(first[2])["duplicate"]) == (200, False)
    assert second[0] == 200
    assert second[1]["content-type"] == "application/json", second
    # Chunked, the body sent after the head, in two reads.
    body, headers = signed(make_event("evt_upgrade_chunked"))
    sock.sendall(_upgrade_head(target, upgrade, headers, b"Transfer-Encoding: chunked\r\n"))
    time.sleep(0.2)
    sock.sendall(b"%x\r\n%s\r\n" % (len(body), body))
    time.sleep(0.2)
    sock.sendall(b"0\r\n\r\n")
    third = read_response(sock)
    assert third is not None
    assert (third[0], json.loads(third[2])["duplicate"]) == (200, False)
    # A request hidden in a body that arrives after the head is that body, not a request.
    inner = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n"
    sock.sendall(
        b"POST /healthz HTTP/1.1\r\nHost: t\r\n%sContent-Length: %d\r\n\r\n" % (upgrade, len(inner))
    )
    time.sleep(0.2)
    sock.sendall(inner + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    outer, after = read_response(sock), read_response(sock)
    assert outer is not None
    assert outer[0] == 405
    assert after is not None
    assert after[0] == 200
    assert after[1]["content-type"] == "application/json", after  # /healthz, not /metrics
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT id FROM events ORDER BY id").fetchall() == [
            ("evt_upgrade_chunked",),
            ("evt_upgrade_cl",),
        ]


@pytest.mark.parametrize(
    "trailer",
    [
        pytest.param(b"X-Pad: " + b"a" * 20_000 + b"\r\n", id="one-large-field"),
        pytest.param(b"".join(b"X-T%d: a\r\n" % i for i in range(3000)), id="many-fields"),
    ],
)
def test_a_trailer_section_in_the_same_read_as_its_body_is_capped_too(
    serve_factory: type[Serve], tmp_path: Path, trailer: bytes
) -> None:
    """A trailer section over the caps (bytes, field lines) that arrives whole in one read
    with the end of its body: 431 as in separate reads. The caps counted only the reads
    that began after the last chunk's header, so these were accepted (200, stored)."""
    serve = serve_factory(db_env(tmp_path)).start()
    body, headers = signed(make_event("evt_trailer_one_read"))
    sock = connect(serve)
    sock.sendall(
        _chunked_head("/webhooks/lacuna", headers)
        + b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        + trailer
        + b"\r\n"
    )
    assert envelope_code(read_response(sock)) == (431, "headers_too_large")
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_many_upgrade_requests_pipelined_in_one_read_are_each_answered(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Each Upgrade request in a read was parsed again by a recursion: past about 988 of
    them the recursion limit gave a 400 "User callback error" and closed the connection."""
    serve = serve_factory(db_env(tmp_path)).start()
    sock = connect(serve, timeout=60)
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
    sock.sendall(request * 1500)
    statuses = [answer[0] if (answer := read_response(sock)) else None for _ in range(1500)]
    assert statuses == [200] * 1500
