"""The admin listener of a real ``serve`` (SPEC §9): its own socket, only with a token, never
the webhook port's routes; one SIGTERM stops both; intake keeps its latency while admin
searches scan the store."""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, free_port

pytestmark = pytest.mark.e2e

TOKEN = "adm_" + "e" * 40
AUTH = {"authorization": f"Bearer {TOKEN}"}


def admin_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "LACUNA_ADMIN_TOKEN": TOKEN,
        "LACUNA_ADMIN_PORT": str(free_port()),
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        "LACUNA_HANDLERS": "audit=log",
        **extra,
    }


def test_admin_listener_is_its_own_socket(serve_factory: type[Serve], tmp_path: Path) -> None:
    """The admin API answers on LACUNA_ADMIN_PORT with a token (401 without); the webhook
    port serves no /api/v1 and the admin port no webhook route; SIGTERM ends both, exit 0."""
    env = admin_env(tmp_path)
    serve = serve_factory(env).start()
    admin = f"http://127.0.0.1:{env['LACUNA_ADMIN_PORT']}/api/v1"
    body, headers = signed(make_event("evt_admin_1", title="Late Night Study"))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    events = httpx.get(
        f"{admin}/events", headers=AUTH, params={"match": "data.title:Late Night Study"}
    )
    assert events.status_code == 200, events.text
    assert [e["id"] for e in events.json()["data"]] == ["evt_admin_1"]
    assert httpx.get(f"{admin}/events").status_code == 401
    assert httpx.get(f"{admin}/openapi.json", headers=AUTH).json()["openapi"].startswith("3.1")
    for path in ("/api/v1/events", "/api/v1/openapi.json", "/api/v1/handlers"):
        webhook_side = httpx.get(f"{serve.base_url}{path}", headers=AUTH)
        assert webhook_side.status_code == 404, path
    admin_side = httpx.post(
        f"http://127.0.0.1:{env['LACUNA_ADMIN_PORT']}/webhooks/lacuna",
        content=body,
        headers=headers,
    )
    assert admin_side.status_code == 404
    serve.signal(15)
    assert serve.wait(30) == 0, serve.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{admin}/events", headers=AUTH, timeout=2)


def test_sigint_stops_both_listeners(serve_factory: type[Serve], tmp_path: Path) -> None:
    env = admin_env(tmp_path)
    serve = serve_factory(env).start()
    admin = f"http://127.0.0.1:{env['LACUNA_ADMIN_PORT']}/api/v1/handlers"
    assert httpx.get(admin, headers=AUTH).status_code == 200
    serve.signal(2)
    serve.wait(30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(admin, headers=AUTH, timeout=2)


def test_no_token_no_admin_socket(serve_factory: type[Serve], tmp_path: Path) -> None:
    env = admin_env(tmp_path)
    env.pop("LACUNA_ADMIN_TOKEN")
    serve = serve_factory(env).start()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{env['LACUNA_ADMIN_PORT']}/api/v1/events", timeout=2)
    assert "admin.off" in serve.log()


def test_admin_port_taken_is_one_line(serve_factory: type[Serve], tmp_path: Path) -> None:
    """An admin port already in use stops serve at start with a line naming the settings."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = admin_env(tmp_path, LACUNA_ADMIN_PORT=str(taken.getsockname()[1]))
        serve = serve_factory(env)
        serve.proc = None
        import subprocess

        from tests.e2e.conftest import CLI

        done = subprocess.run(
            [CLI, "serve"], env=serve.env, cwd=tmp_path, capture_output=True, timeout=60
        )
    assert done.returncode != 0
    err = done.stderr.decode()
    assert "LACUNA_ADMIN_HOST, LACUNA_ADMIN_PORT" in err, err
    assert "Traceback" not in err


def test_ctrl_c_with_the_admin_listener_stops_both_quietly(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Ctrl-C with the admin listener on: the same graceful stop as SIGTERM, then exit 130
    and one `interrupted` line. asyncio's SIGINT handler, which uvicorn calls again after its
    drain, cancelled serve in the middle of the admin listener's stop: an error-level line
    with three chained tracebacks."""
    import json
    import signal

    serve = serve_factory(admin_env(tmp_path)).start()
    admin = f"http://127.0.0.1:{serve.env['LACUNA_ADMIN_PORT']}/api/v1"
    assert httpx.get(f"{admin}/events", headers=AUTH, timeout=5).status_code == 200
    body, headers = signed(make_event("evt_before_ctrl_c"))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    serve.signal(signal.SIGINT)
    assert serve.wait(timeout=40) == 130
    log = serve.log()
    assert "Traceback" not in log
    assert log.rstrip().splitlines()[-1] == "lacuna-webhooks: interrupted"
    levels = [json.loads(line)["level"] for line in log.splitlines() if line.startswith("{")]
    assert "error" not in levels
    assert '"serve.stopped"' in log


# --- intake while admin searches run ------------------------------------------------------

STORED = 100_000


def fill(db: Path, count: int) -> None:
    """Bulk-insert ``count`` stored events straight into the file (serve migrated it)."""
    conn = sqlite3.connect(db)
    now = time.time() - 3600
    rows = []
    for i in range(count):
        # Every body holds an escape (\"): the worst case for `match`, which reads such bodies
        # key by key (json_each) and skips its byte pre-filter for them.
        raw = orjson.dumps(make_event(f"old_{i}", title=f"Track {i}", lyrics='la "la" ' * 20, n=i))
        rows.append((f"old_{i}", "job.completed", None, now + i * 0.001, f"task_{i}", 0, raw))
    with conn:
        conn.executemany(
            "INSERT INTO events (id, type, created, received_at, task_id, superseded, raw)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.close()


def intake_latencies(serve: Serve, prefix: str, count: int) -> list[float]:
    """Seconds per signed POST, sent one after another on one connection."""
    took = []
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            body, headers = signed(make_event(f"{prefix}_{i}"))
            started = time.perf_counter()
            response = client.post(serve.webhook_url, content=body, headers=headers)
            took.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return took


def p(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, (len(ordered) * percent + 99) // 100 - 1)]


def test_intake_latency_while_admin_searches(serve_factory: type[Serve], tmp_path: Path) -> None:
    """With 100k stored events, admin searches that scan all of them run in a loop (on the
    SQLite reader, beside the writer; each request within its time budget, the loop following
    the cursors to the end); intake's p50 and p99 stay within a generous factor of the same
    run's idle figures. Were searches run on the writer, each accept would wait
    behind a scan of the whole table."""
    env = admin_env(tmp_path, LACUNA_HANDLERS="")
    serve = serve_factory(env).start()
    serve.signal(15)
    assert serve.wait(30) == 0
    fill(tmp_path / "events.db", STORED)
    serve.start()
    admin = f"http://127.0.0.1:{env['LACUNA_ADMIN_PORT']}/api/v1/events"
    intake_latencies(serve, "warm", 30)
    idle = intake_latencies(serve, "idle", 300)

    stop = threading.Event()
    searches: list[float] = []
    failures: list[str] = []
    incomplete: list[int] = []

    def search_loop() -> None:
        queries = [
            {"q": "no such text anywhere"},  # scans every body
            {"match": "data.title:Track -1"},  # parses every body (in Python: escapes)
            {"match": "data.n:-1e0"},  # a number: no byte pre-filter at all
            {"type": "job.completed", "limit": "500"},
        ]
        with httpx.Client(timeout=60, headers=AUTH) as client:
            i = 0
            while not stop.is_set():
                query = queries[i % len(queries)]
                params = dict(query)
                # Payload searches answer within their time budget: follow the cursors, so
                # the reader still scans every body (one budget's worth per request).
                while not stop.is_set():
                    started = time.perf_counter()
                    response = client.get(admin, params=params)
                    searches.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        failures.append(response.text)
                        break
                    answer = response.json()
                    incomplete.append(0 if answer["complete"] else 1)
                    if answer["next_cursor"] is None or "type" in query:
                        break
                    params = {**query, "cursor": answer["next_cursor"]}
                i += 1

    thread = threading.Thread(target=search_loop, daemon=True)
    thread.start()
    time.sleep(0.5)  # searches under way
    try:
        busy = intake_latencies(serve, "busy", 300)
    finally:
        stop.set()
        thread.join(120)
    assert not failures, failures[:1]
    assert len(searches) >= 2, "the admin searches did not overlap the intake run"
    assert sum(incomplete) >= 1, "no search ran into its time budget"
    idle_p50, idle_p99 = p(idle, 50), p(idle, 99)
    busy_p50, busy_p99 = p(busy, 50), p(busy, 99)
    print(
        f"\nintake idle p50 {idle_p50 * 1000:.1f} ms p99 {idle_p99 * 1000:.1f} ms; while "
        f"{len(searches)} admin searches ran (median {statistics.median(searches) * 1000:.0f} ms, "
        f"max {max(searches) * 1000:.0f} ms): p50 {busy_p50 * 1000:.1f} ms p99 "
        f"{busy_p99 * 1000:.1f} ms"
    )
    assert busy_p50 <= 4 * idle_p50, (idle_p50, busy_p50)
    assert busy_p99 <= 8 * idle_p99, (idle_p99, busy_p99)
    # The scans were real: each took longer than intake's idle p99.
    assert statistics.median(searches) > idle_p99


def test_intake_latency_while_admin_reads_a_large_event(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Two clients read a 12 MB event through the admin API in a loop. Parsing and encoding
    it held the GIL on the loop that the webhook route shares, about half a second a read
    (admin/offload.py); done in the admin's helper process, intake stays within the same
    generous factor of its idle figures as under searches."""
    env = admin_env(tmp_path, LACUNA_HANDLERS="", LACUNA_MAX_BODY_BYTES="20000000")
    serve = serve_factory(env).start()
    huge = make_event("evt_huge")
    huge["data"]["blob"] = [{"i": i, "s": "abcdefgh"} for i in range(400_000)]
    body, headers = signed(huge)
    assert len(body) > 10_000_000
    assert httpx.post(serve.webhook_url, content=body, headers=headers, timeout=60).is_success
    event_url = f"http://127.0.0.1:{env['LACUNA_ADMIN_PORT']}/api/v1/events/evt_huge"
    with httpx.Client(timeout=60, headers=AUTH) as client:
        first = client.get(event_url)  # starts the helper process
        assert first.status_code == 200
        assert first.json()["payload"]["data"]["blob"][-1] == {"i": 399_999, "s": "abcdefgh"}
    intake_latencies(serve, "warm", 30)
    idle = intake_latencies(serve, "idle", 200)

    stop = threading.Event()
    reads: list[float] = []
    failures: list[str] = []

    def read_loop() -> None:
        with httpx.Client(timeout=60, headers=AUTH) as client:
            while not stop.is_set():
                started = time.perf_counter()
                response = client.get(event_url)
                reads.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures.append(response.text[:300])
                    return

    readers = [threading.Thread(target=read_loop, daemon=True) for _ in range(2)]
    for reader in readers:
        reader.start()
    busy: list[float] = []
    deadline = time.monotonic() + 60
    try:
        # Webhooks until several whole reads overlapped them (a read takes longer than 200).
        while (len(busy) < 200 or len(reads) < 4) and time.monotonic() < deadline:
            busy += intake_latencies(serve, f"busy_{len(busy)}", 50)
    finally:
        stop.set()
        for reader in readers:
            reader.join(120)
    assert not failures, failures[:1]
    assert len(reads) >= 4, "the admin reads did not overlap the intake run"
    idle_p50, idle_p99 = p(idle, 50), p(idle, 99)
    busy_p50, busy_p99 = p(busy, 50), p(busy, 99)
    print(
        f"\nintake idle p50 {idle_p50 * 1000:.1f} ms p99 {idle_p99 * 1000:.1f} ms; while "
        f"{len(reads)} reads of a {len(body) // 1_000_000} MB event ran (median "
        f"{statistics.median(reads) * 1000:.0f} ms): p50 {busy_p50 * 1000:.1f} ms p99 "
        f"{busy_p99 * 1000:.1f} ms"
    )
    assert busy_p50 <= 4 * idle_p50, (idle_p50, busy_p50)
    # Each read still copies its 22 MB answer out on the loop (a few ms); with reads parsed
    # on the loop, p99 was 296 ms against an idle 3.9.
    assert busy_p99 <= max(8 * idle_p99, idle_p99 + 0.05), (idle_p99, busy_p99)
