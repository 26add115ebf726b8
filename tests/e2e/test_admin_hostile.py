"""The admin listener of a real ``serve`` against what a hostile or careless client sends,
and beside the webhook route it must never hold up.

Each test starts ``serve`` (SQLite, an admin token) and talks to it over real sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, children, free_port, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "adm_hostile_e2e_" + "h" * 32
AUTH = {"authorization": f"Bearer {TOKEN}"}


def start(serve_factory: type[Serve], tmp_path: Path, **extra: str) -> tuple[Serve, str]:
    """A ``serve`` with the admin listener on, and the listener's base URL."""
    admin_port = free_port()
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_ADMIN_TOKEN": TOKEN,
            "LACUNA_ADMIN_PORT": str(admin_port),
            "LACUNA_HANDLERS": "log",
            "LACUNA_POLL_INTERVAL": "0.2",
            **extra,
        }
    ).start()
    admin = f"http://127.0.0.1:{admin_port}"
    wait_until(lambda: _answers(admin + "/sign-in"), what="the admin listener")
    return serve, admin


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def send(serve: Serve, event_id: str, **data: object) -> None:
    body, headers = signed(make_event(event_id, **data))
    answer = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


def sign_in(admin: str) -> httpx.Client:
    """A client holding a console session cookie."""
    client = httpx.Client(base_url=admin, timeout=10)
    answer = client.post(
        "/sign-in", data={"token": TOKEN, "next": "/events"}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    return client


@contextmanager
def writer_stopped(serve: Serve) -> Iterator[None]:
    """``serve``'s SQLite writer process stopped (SIGSTOP) for the block: as when it is busy
    with a long transaction or a slow disk. Intake waits for it; the admin's reads must not
    (docs/admin.md: they run on a read-only connection of their own, never in the writer's
    queue). It is well under the writer's stall limit (60 s), so nothing is killed."""
    (writer,) = [pid for pid, cmd in children(serve).items() if "store.sqlite.process" in cmd]
    os.kill(writer, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(writer, signal.SIGCONT)


def test_admin_reads_never_wait_in_the_writers_queue(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """One event, its deliveries, a task and the console's pages are read beside the writer:
    with the writer stopped they still answer at once. Before, the deliveries of one event
    (``GET /events/{id}``, ``/tasks/{id}``, ``/deliveries?event_id=``, a row of the console's
    events page) were read by a job in the writer's queue, ahead of intake's accepts: they
    waited for the writer, and each such read held the accepts behind it."""
    serve, admin = start(serve_factory, tmp_path)
    send(serve, "evt_beside_writer", title="Beside the writer", task_id="cm_beside")
    api = httpx.Client(base_url=admin + "/api/v1", headers=AUTH, timeout=10)
    console = sign_in(admin)
    try:
        _read_beside_a_stopped_writer(serve, api, console)
    finally:
        api.close()
        console.close()
    # The writer goes on afterwards: intake works.
    send(serve, "evt_after_writer")


def _read_beside_a_stopped_writer(serve: Serve, api: httpx.Client, console: httpx.Client) -> None:
    wait_until(
        lambda: api.get("/events/evt_beside_writer").json()["deliveries"][0]["status"] == "done",
        what="the log handler's delivery",
    )
    reads = [
        (api, "/events/evt_beside_writer"),
        (api, "/deliveries?event_id=evt_beside_writer"),
        (api, "/tasks/cm_beside"),
        (api, "/events?type=job.completed"),
        (console, "/events"),
        (console, "/event?id=evt_beside_writer"),
    ]
    with writer_stopped(serve):
        for client, path in reads:
            started = time.monotonic()
            try:
                answer = client.get(path, timeout=5)
            except httpx.TimeoutException:
                pytest.fail(f"GET {path} waited for the stopped writer")
            took = time.monotonic() - started
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            assert took < 3, (path, took)


def _raw_answer(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers of the answer to ``request`` sent as is."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


def test_the_http_layers_refusals_carry_the_admin_listeners_headers(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A request the HTTP layer refuses before any route (headers too large: 431; a
    malformed body framing: 400) still gets what docs/admin.md and docs/console.md promise of
    every answer of the admin listener: ``Cache-Control: no-store`` and ``nosniff``, and on a
    console path the Content-Security-Policy and ``X-Frame-Options: DENY``. Before, such
    refusals had none of them: the app's middleware never saw them."""
    _, admin = start(serve_factory, tmp_path)
    port = int(admin.rsplit(":", 1)[1])
    big = b"x-padding: " + b"a" * 20_000 + b"\r\n"
    bad_chunk = b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n"
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    cases = {
        "431 api": b"GET /api/v1/handlers HTTP/1.1\r\nHost: x\r\n" + auth + big + b"\r\n",
        "431 console": b"GET /events HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n",
        "400 api": b"POST /api/v1/replays HTTP/1.1\r\nHost: x\r\n" + auth + bad_chunk,
        "400 console": b"POST /sign-in HTTP/1.1\r\nHost: x\r\n" + bad_chunk,
    }
    for label, request in cases.items():
        status, headers = _raw_answer(port, request)
        assert status == int(label.split()[0]), (label, status)
        assert headers.get("cache-control") == "no-store", (label, headers)
        assert headers.get("x-content-type-options") == "nosniff", (label, headers)
        assert headers.get("x-frame-options") == "DENY", (label, headers)
        assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), (
            label,
            headers,
        )
