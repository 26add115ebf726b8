"""The webhook route served without ASGI (server.py, "served directly"), on a real `serve`.

`POST /webhooks/lacuna` over HTTP/1.1 is answered by the protocol itself; anything unusual
(a query string, HTTP/1.0, `Expect: 100-continue`, a request pipelined behind one still
being answered) goes through ASGI. Both must answer alike, keep pipelined answers in
order, and handle a sender that leaves mid-body.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve
from tests.e2e.test_http_limits import (
    closed_by_server,
    db_env,
    metric,
    read_response,
    rss_kib,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def serve(serve_factory: type[Serve], tmp_path: Path) -> Serve:
    return serve_factory(db_env(tmp_path, LACUNA_MAX_BODY_BYTES="4096")).start()


@pytest.fixture
def sock(serve: Serve) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
        s.settimeout(10)
        yield s


def request(
    body: bytes,
    headers: dict[str, str],
    *,
    target: str = "/webhooks/lacuna",
    version: str = "HTTP/1.1",
    extra: str = "",
) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST {target} {version}\r\nHost: t\r\n{head}{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def chunked(body: bytes, headers: dict[str, str], *, target: str) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST {target} HTTP/1.1\r\nHost: t\r\n{head}Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def stored_ids(tmp_path: Path) -> set[str]:
    with sqlite3.connect(tmp_path / "events.db") as conn:
        return {row[0] for row in conn.execute("SELECT id FROM events")}


def _signed_kwargs(event_id: str) -> dict[str, object]:
    body, headers = signed(make_event(event_id))
    return {"content": body, "headers": headers}


def cases(tag: str) -> dict[str, bytes]:
    """One request of each kind, for a target of `tag`'s own (unique event ids)."""
    good, headers = signed(make_event(f"evt_{tag}_ok"))
    big, big_headers = signed(make_event(f"evt_{tag}_big", lyrics="la " * 3000))
    return {
        "accepted": request(good, headers, target="{target}"),
        "duplicate": request(good, headers, target="{target}"),
        "bad_signature": request(
            *signed(good, secret="whsec_not_the_one_serve_has_0123456789"), target="{target}"
        ),
        "no_signature": request(good, {"content-type": "application/json"}, target="{target}"),
        "not_json": request(
            *signed(b"\xff\x00 not json"),
            target="{target}",
        ),
        "too_large_declared": request(big, big_headers, target="{target}"),
        "too_large_chunked": chunked(big, big_headers, target="{target}"),
    }


def answer_of(sock: socket.socket, raw: bytes) -> tuple[int, str | None, bool | None]:
    sock.sendall(raw)
    response = read_response(sock)
    assert response is not None, "no answer"
    status, headers, body = response
    assert headers["content-type"] == "application/json"
    parsed = json.loads(body)
    code = parsed["error"]["code"] if "error" in parsed else None
    return status, code, parsed.get("duplicate")


def test_the_direct_and_the_asgi_path_answer_alike(serve: Serve, tmp_path: Path) -> None:
    """Each kind of request gets the same status and error code on the direct path
    (`/webhooks/lacuna`) as through ASGI (the same route with a query string)."""
    answers: dict[str, dict[str, tuple[int, str | None, bool | None]]] = {}
    for path, target in (("direct", "/webhooks/lacuna"), ("asgi", "/webhooks/lacuna?via=asgi")):
        answers[path] = {}
        for kind, raw in cases(path).items():
            # A fresh connection each: a 413 may leave the rest of its body unread.
            with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
                s.settimeout(10)
                answers[path][kind] = answer_of(s, raw.replace(b"{target}", target.encode()))
    assert answers["direct"] == answers["asgi"]
    assert answers["direct"] == {
        "accepted": (200, None, False),
        "duplicate": (200, None, True),
        "bad_signature": (401, "invalid_signature", None),
        "no_signature": (401, "missing_signature", None),
        "not_json": (400, "invalid_json", None),
        "too_large_declared": (413, "payload_too_large", None),
        "too_large_chunked": (413, "payload_too_large", None),
    }
    assert stored_ids(tmp_path) == {"evt_direct_ok", "evt_asgi_ok"}


def test_pipelined_requests_are_answered_in_order(
    serve: Serve, sock: socket.socket, tmp_path: Path
) -> None:
    """Three webhooks and a GET sent in one write: four answers, in the order asked."""
    raws = []
    for i in range(3):
        raws.append(request(*signed(make_event(f"evt_pipe_{i}"))))
    sock.sendall(b"".join(raws) + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    for i in range(3):
        response = read_response(sock)
        assert response is not None
        assert response[0] == 200
        assert json.loads(response[2])["id"] == f"evt_pipe_{i}"
    health = read_response(sock)
    assert health is not None
    assert health[0] == 200
    assert json.loads(health[2])["status"] == "ok"
    assert stored_ids(tmp_path) == {f"evt_pipe_{i}" for i in range(3)}


def test_connection_close_and_http_1_0_end_the_connection(serve: Serve, tmp_path: Path) -> None:
    """`Connection: close` (direct path) and HTTP/1.0 (ASGI path) are answered, the answer
    says `connection: close`, and the server closes the connection."""
    for i, (version, extra) in enumerate((("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", ""))):
        with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
            s.settimeout(10)
            s.sendall(request(*signed(make_event(f"evt_close_{i}")), version=version, extra=extra))
            response = read_response(s)
            assert response is not None
            assert response[0] == 200
            assert response[1]["connection"] == "close"
            assert closed_by_server(s)
    assert stored_ids(tmp_path) == {"evt_close_0", "evt_close_1"}


def test_expect_100_continue_is_answered(serve: Serve, sock: socket.socket) -> None:
    """A sender that waits for `100 Continue` before its body gets it, then its 200."""
    body, headers = signed(make_event("evt_expect"))
    raw = request(body, headers, extra="Expect: 100-continue\r\n")
    head, _, _ = raw.partition(b"\r\n\r\n")
    sock.sendall(head + b"\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
    sock.sendall(body)
    response = read_response(sock)
    assert response is not None
    assert response[0] == 200


def test_a_sender_leaving_mid_body_is_counted_and_holds_nothing(
    serve: Serve, tmp_path: Path
) -> None:
    """Half a body then a hang-up: nothing stored, counted as `client_disconnected` (as on
    the ASGI path), and the next sender is accepted."""
    body, headers = signed(make_event("evt_gone"))
    raw = request(body, headers)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
            s.sendall(raw[: len(raw) - len(body) // 2])
    outcome = 'lacuna_webhooks_received_total{outcome="client_disconnected"}'
    for _ in range(100):
        if metric(serve, outcome) == 3:
            break
        time.sleep(0.05)
    assert metric(serve, outcome) == 3
    ok = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)
    assert ok.status_code == 200
    assert stored_ids(tmp_path) == {"evt_gone"}


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="malformed-head"),
        pytest.param(
            b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n",
            id="bad-chunk",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: t\r\n"
            + b"".join(b"x-h%d: a\r\n" % i for i in range(101))
            + b"\r\n",
            id="too-many-headers",
        ),
    ],
)
def test_a_bad_request_behind_pending_ones_is_refused_after_their_answers(
    serve: Serve, sock: socket.socket, tmp_path: Path, target: str, bad: bytes
) -> None:
    """Two valid webhooks and a bad request in one write, the webhooks' answers still
    pending when the bad one is parsed: each webhook gets its own 200 (and is stored), then
    the bad request its refusal, then the connection is closed. The refusal written at once
    would have been read as the first webhook's answer (a 400 for a valid event, which the
    direct path stored all the same and logged as 200, while the ASGI path dropped it)."""
    raws = [request(*signed(make_event(f"evt_before_bad_{i}")), target=target) for i in range(2)]
    sock.sendall(b"".join(raws) + bad)
    for i in range(2):
        answer = read_response(sock)
        assert answer is not None
        assert answer[0] == 200, answer
        assert json.loads(answer[2])["id"] == f"evt_before_bad_{i}"
    refusal = read_response(sock)
    assert refusal is not None
    assert refusal[0] in (400, 431)
    assert refusal[1]["connection"] == "close"
    assert closed_by_server(sock)
    assert stored_ids(tmp_path) == {"evt_before_bad_0", "evt_before_bad_1"}


def test_a_body_still_arriving_at_sigterm_is_cut_before_the_drain_ends(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SIGTERM while two senders are half-way through their bodies (one on the direct path,
    one through ASGI), with LACUNA_BODY_TIMEOUT longer than LACUNA_SHUTDOWN_TIMEOUT: each
    gets the 408 before the drain ends, is logged `client_disconnected`, and `serve` exits 0
    without a traceback. Through ASGI the drain's end cancelled the endpoint reading the body
    (a 500 and `Exception in ASGI application`); the direct one was cut without a word."""
    serve = serve_factory(
        db_env(tmp_path, LACUNA_SHUTDOWN_TIMEOUT="2", LACUNA_BODY_TIMEOUT="60")
    ).start()
    socks = []
    for i, target in enumerate(("/webhooks/lacuna", "/webhooks/lacuna?via=asgi")):
        body, headers = signed(make_event(f"evt_half_{i}"))
        raw = request(body, headers, target=target)
        s = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
        s.settimeout(10)
        s.sendall(raw[: len(raw) - len(body) // 2])
        socks.append(s)
    time.sleep(0.2)  # both heads read
    serve.signal(signal.SIGTERM)
    try:
        for s in socks:
            answer = read_response(s)
            assert answer is not None
            assert answer[0] == 408
    finally:
        for s in socks:
            s.close()
    assert serve.wait() == 0
    log = serve.log()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log
    gone = [
        line
        for line in log.splitlines()
        if '"webhook.received"' in line and '"client_disconnected"' in line
    ]
    assert len(gone) == 2, log
    assert stored_ids(tmp_path) == set()


def test_a_body_in_tiny_chunks_holds_no_more_than_its_bytes(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Eight concurrent 512 KiB chunked bodies sent two bytes a chunk (the BodyBudget lets
    64 such bodies in): serve's peak RSS grows by a few times their bytes, not by the
    ~28 bytes of object overhead per chunk the direct path held when it kept each chunk (an
    eight-times-smaller body budget in memory: about 14 MiB a body)."""
    serve = serve_factory(db_env(tmp_path, LACUNA_MAX_BODY_BYTES=str(512 << 10))).start()
    for i in range(10):  # warm up: the resident set of a serve that has answered requests
        assert (
            httpx.post(serve.webhook_url, **_signed_kwargs(f"evt_warm_{i}"), timeout=10).status_code
            == 200
        )
    before = rss_kib(serve, "VmHWM")
    body = b"x" * ((512 << 10) - 16)
    raw = (
        b"POST /webhooks/lacuna HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"2\r\n%s\r\n" % body[i : i + 2] for i in range(0, len(body), 2))
        + b"0\r\n\r\n"
    )
    socks = [socket.create_connection(("127.0.0.1", serve.port), timeout=20) for _ in range(8)]
    try:
        for s in socks:
            s.settimeout(20)
            s.sendall(raw[:-5])  # every chunk but the last: the bodies are held together
        time.sleep(0.5)
        for s in socks:
            s.sendall(raw[-5:])
        for s in socks:
            answer = read_response(s)
            assert answer is not None
            assert answer[0] == 401  # unsigned: read whole, then refused
    finally:
        for s in socks:
            s.close()
    peak = rss_kib(serve, "VmHWM")
    assert peak - before < 32 * 1024, f"peak RSS grew from {before} KiB to {peak} KiB"


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
def test_a_reset_behind_pipelined_requests_leaves_no_traceback(
    serve_factory: type[Serve], tmp_path: Path, target: str
) -> None:
    """Three webhooks in one write, then a reset while the first is being committed: no
    answer can be written, none is tried. uvicorn marks only the newest request of the
    connection as gone, so the one being answered through ASGI wrote to the closed transport
    (uvloop raises: `Exception in ASGI application`, a traceback per connection)."""
    serve = serve_factory(db_env(tmp_path)).start()
    for round_ in range(5):
        raws = [
            request(*signed(make_event(f"evt_reset_{round_}_{i}")), target=target) for i in range(3)
        ]
        s = socket.create_connection(("127.0.0.1", serve.port), timeout=10)
        s.sendall(b"".join(raws))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset, at once
    time.sleep(0.5)  # the commits end, the answers are (not) written
    assert httpx.get(f"{serve.base_url}/healthz", timeout=10).status_code == 200
    log = serve.log()
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log


@pytest.mark.parametrize("refused", ["bad_signature", "too_large_declared"])
def test_a_request_pipelined_behind_a_refusal_is_not_cut_by_the_keepalive_timer(
    serve_factory: type[Serve], tmp_path: Path, refused: str
) -> None:
    """A refusal answered in the middle of a read (a 401 from the body, a 413 from the
    headers) armed uvicorn's keep-alive timer while the next request, pipelined in the same
    read, was still arriving: LACUNA_KEEPALIVE_TIMEOUT (1 s) later the connection was closed
    under it, within its 10 s body deadline. Both must be answered, the second stored."""
    serve = serve_factory(
        db_env(
            tmp_path,
            LACUNA_MAX_BODY_BYTES="4096",
            LACUNA_KEEPALIVE_TIMEOUT="1",
            LACUNA_BODY_TIMEOUT="10",
        )
    ).start()
    first = cases("ka")[refused].replace(b"{target}", b"/webhooks/lacuna")
    body, headers = signed(make_event("evt_behind_refusal"))
    second = request(body, headers)
    cut = second.index(b"\r\n\r\n") + 4 + 5  # its head and five bytes of its body
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(first + second[:cut])
        time.sleep(2)  # past the keep-alive timeout, well within the body timeout
        sock.sendall(second[cut:])
        refusal, accepted = read_response(sock), read_response(sock)
    assert refusal is not None
    assert refusal[0] == (401 if refused == "bad_signature" else 413)
    assert accepted is not None, "the connection was closed under the pipelined request"
    assert accepted[0] == 200
    assert "evt_behind_refusal" in stored_ids(tmp_path)


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
def test_a_client_that_half_closes_after_its_request_gets_its_answer(
    serve: Serve, tmp_path: Path, target: str
) -> None:
    """`shutdown(SHUT_WR)` right after a whole request (`nc -N`): the answer is sent, then
    the connection closed; before, the event was stored and never answered. On the direct
    path and the ASGI one (a query string takes it). A request cut off mid-body by the
    half-close is not answered and not stored."""
    event_id = f"evt_half_{len(target)}"
    body, headers = signed(make_event(event_id))
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
        s.sendall(request(body, headers, target=target))
        s.shutdown(socket.SHUT_WR)
        response = read_response(s)
        assert response is not None, "no answer to a half-closed request"
        assert response[0] == 200
        assert s.recv(1) == b""  # then closed
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
        cut, cut_headers = signed(make_event(event_id + "_cut"))
        s.sendall(request(cut, cut_headers, target=target)[:-10])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
        # A whole request, then the start of a pipelined one cut short by the half-close:
        # the first is still answered (it was stored and not answered).
        whole, whole_headers = signed(make_event(event_id + "_whole"))
        s.sendall(
            request(whole, whole_headers, target=target) + b"POST /webhooks/lacuna HTTP/1.1\r\nHo"
        )
        s.shutdown(socket.SHUT_WR)
        response = read_response(s)
        assert response is not None, "no answer to the whole request before the cut one"
        assert response[0] == 200
    assert stored_ids(tmp_path) == {event_id, event_id + "_whole"}


@pytest.mark.parametrize("target", ["/webhooks/lacuna", "/webhooks/lacuna?via=asgi"])
def test_a_content_length_with_thousands_of_leading_zeros_is_read_as_its_number(
    serve: Serve, tmp_path: Path, target: str
) -> None:
    """``Content-Length`` is ``1*DIGIT`` (RFC 9110 §8.6) and llhttp lets any number of leading
    zeros through; ``int()`` refuses more than 4300 digits. A valid webhook whose length was
    written with 5000 leading zeros got a 500 and a traceback through ASGI, and a 400
    ``malformed_request`` served directly: it is a 200 and stored, and one declaring more
    than ``LACUNA_MAX_BODY_BYTES`` that way is a 413, both ways, with no traceback."""
    tag = "asgi" if "?" in target else "direct"
    zeros = "0" * 5000
    body, headers = signed(make_event(f"evt_zeros_{tag}"))
    raw = request(body, headers, target=target).replace(
        b"Content-Length: ", f"Content-Length: {zeros}".encode(), 1
    )
    big, big_headers = signed(make_event(f"evt_zeros_big_{tag}", lyrics="la " * 3000))
    big_raw = request(big, big_headers, target=target).replace(
        b"Content-Length: ", f"Content-Length: {zeros}".encode(), 1
    )
    for sent, expected in ((raw, 200), (big_raw, 413)):
        with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as s:
            s.settimeout(10)
            s.sendall(sent)
            response = read_response(s)
        assert response is not None, "no answer"
        assert response[0] == expected, response
    assert f"evt_zeros_{tag}" in stored_ids(tmp_path)
    assert f"evt_zeros_big_{tag}" not in stored_ids(tmp_path)
    log = serve.log()
    assert "Traceback" not in log
    assert "internal_error" not in log
