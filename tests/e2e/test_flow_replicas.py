"""Flow control across `serve` replicas on one PostgreSQL database: a pause made through one
replica's database is honoured by the others, and RATE_LIMIT holds for all of them together.

These need the PostgreSQL server (they fail instead of skipping under CI=true).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, wait_until
from tests.e2e.recorder_plugin import recorded
from tests.e2e.test_serve import run_cli
from tests.integration.test_rate_limit import most_in_any_window

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
RECORDER = "tests.e2e.recorder_plugin:FileRecorder"
SECRET = "whsec_" + base64.b64encode(b"the-receivers-secret-key-32bytes").decode()


def post(replica: Serve, event_id: str) -> None:
    body, headers = signed(make_event(event_id))
    response = httpx.post(replica.webhook_url, content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def test_pause_through_one_replica_is_honoured_by_the_other(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """`handlers pause recorder` (the CLI, on the shared database): both replicas log
    handler.paused; an event posted to either is accepted (intake goes on) but not delivered
    while `log` deliveries go on; after `handlers resume` it is delivered exactly once."""
    out = tmp_path / "delivered.txt"
    env = {
        "LACUNA_DATABASE_URL": postgres_dsn,
        "LACUNA_HANDLERS": f"{RECORDER},log",
        "LACUNA_RECORDER_PATH": str(out),
        "LACUNA_POLL_INTERVAL": "0.2",
    }
    a, b = serve_factory(env).start(), serve_factory(env).start()
    cli_env = {**a.env}
    paused = run_cli("handlers", "pause", "recorder", "--reason", "e2e", env=cli_env, cwd=tmp_path)
    assert paused.returncode == 0, paused.stderr
    for replica in (a, b):
        wait_until(lambda r=replica: "handler.paused" in r.log(), what="handler.paused logged")
    post(a, "evt_paused_a")
    post(b, "evt_paused_b")
    listed = run_cli("handlers", env=cli_env, cwd=tmp_path)
    assert "recorder     paused since" in listed.stdout
    # The log handler's deliveries of both events finish: the replicas are claiming.
    wait_until(lambda: done_for("log", cli_env, tmp_path) == 2, what="log deliveries done")
    time.sleep(1.0)  # five poll intervals more: a replica ignoring the pause would have run it
    assert recorded(out) == []
    resumed = run_cli("handlers", "resume", "recorder", env=cli_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    wait_until(lambda: len(recorded(out)) == 2, what="both delivered after resume")
    assert sorted(recorded(out)) == ["evt_paused_a", "evt_paused_b"]
    for replica in (a, b):
        wait_until(lambda r=replica: "handler.resumed" in r.log(), what="handler.resumed logged")


def done_for(handler: str, env: dict[str, str], cwd: Path) -> int:
    listed = run_cli(
        "deliveries", "list", "--handler", handler, "--status", "done", "--json", env=env, cwd=cwd
    )
    assert listed.returncode == 0, listed.stderr
    return len(json.loads(listed.stdout))


class CountingPeer:
    """Answers 204 and records each request's webhook-id."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.ids.append(request.headers["webhook-id"])
        return Response(status=204)


def attempt_starts(dsn: str, handler: str) -> list[float]:
    """When each attempt of ``handler`` started (epoch seconds), as the replicas recorded it."""
    import asyncpg

    async def query() -> list[float]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT extract(epoch FROM a.started_at)::float8 AS t FROM attempts AS a"
                " JOIN deliveries AS d ON d.id = a.delivery_id WHERE d.handler = $1",
                handler,
            )
        finally:
            await conn.close()
        return [row["t"] for row in rows]

    return asyncio.run(query())


def test_rate_limit_holds_across_three_replicas(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str, httpserver: HTTPServer
) -> None:
    """LACUNA_HTTP_RATE_LIMIT=5/s on three replicas, 30 events spread over them at once:
    every event reaches the peer once, and no one-second window holds more attempt starts than
    the limit plus its burst (5 + 5); three unshared buckets would allow 15 + 15. The starts
    are the ones the replicas recorded: arrivals at the peer also carry each worker's and the
    peer's scheduling, which on a loaded machine bunches them."""
    peer = CountingPeer()
    httpserver.expect_request("/hook", method="POST").respond_with_handler(peer)
    env = {
        "LACUNA_DATABASE_URL": postgres_dsn,
        "LACUNA_HANDLERS": "http",
        "LACUNA_HTTP_URL": httpserver.url_for("/hook"),
        "LACUNA_HTTP_SECRET": SECRET,
        "LACUNA_HTTP_RATE_LIMIT": "5/s",
        "LACUNA_POLL_INTERVAL": "0.2",
    }
    replicas = [serve_factory(env).start() for _ in range(3)]
    ids = [f"evt_rate_{n}" for n in range(30)]
    for n, event_id in enumerate(ids):
        post(replicas[n % 3], event_id)
    wait_until(lambda: len(peer.ids) >= 30, timeout=60, what="30 forwards")
    time.sleep(0.5)  # nothing more may arrive
    assert sorted(peer.ids) == sorted(ids)
    starts = attempt_starts(postgres_dsn, "http")
    assert len(starts) == 30
    assert most_in_any_window(starts, 1.0) <= 10
