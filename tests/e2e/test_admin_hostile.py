"""The admin listener of a real ``serve`` against what a hostile or careless client sends,
and beside the webhook route it must never hold up.

Each test starts ``serve`` (SQLite, an admin token) and talks to it over real sockets.
"""

from __future__ import annotations

import os
import signal
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
