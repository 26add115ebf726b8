"""Several `serve` replicas on one PostgreSQL database: dedupe, takeover, outage.

These need the PostgreSQL server (they fail instead of skipping under CI=true).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import Serve, wait_until
from tests.e2e.recorder_plugin import recorded
from tests.e2e.test_serve import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
RECORDER = "tests.e2e.recorder_plugin:FileRecorder"


def replica_env(dsn: str, out: Path, **extra: str) -> dict[str, str]:
    return {
        "LACUNA_DATABASE_URL": dsn,
        "LACUNA_HANDLERS": RECORDER,
        "LACUNA_RECORDER_PATH": str(out),
        **extra,
    }


def test_duplicate_storm_across_three_replicas(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """20 copies of each of 10 events, spread over 3 replicas at once: each event is
    accepted exactly once (one ``duplicate: false``) and delivered exactly once."""
    out = tmp_path / "delivered.txt"
    replicas = [serve_factory(replica_env(postgres_dsn, out)) for _ in range(3)]
    for r in replicas:
        r.start()
    ids = [f"evt_storm_{i}" for i in range(10)]
    requests = [
        (replicas[n % 3], *signed(make_event(event_id)))
        for n, event_id in enumerate(i for i in ids for _ in range(20))
    ]

    def post(item: tuple[Serve, bytes, dict[str, str]]) -> httpx.Response:
        replica, body, headers = item
        return httpx.post(replica.webhook_url, content=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(post, requests))
    assert {r.status_code for r in responses} == {200}
    firsts = Counter(r.json()["id"] for r in responses if not r.json()["duplicate"])
    assert firsts == dict.fromkeys(ids, 1)
    wait_until(lambda: set(recorded(out)) == set(ids), what="all events delivered")
    assert sorted(recorded(out)) == sorted(ids)
    pids = {line.split()[1] for line in out.read_text().splitlines()}
    assert len(pids) >= 2, "the NOTIFY nudge should spread work over replicas"


def test_sigkill_a_replica_holding_leases(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """A replica killed while running deliveries loses nothing: the others take over its
    work once the leases expire, and every event is delivered exactly once."""
    out = tmp_path / "delivered.txt"
    slow = serve_factory(
        replica_env(
            postgres_dsn,
            out,
            LACUNA_RECORDER_DELAY="60",
            LACUNA_RECORDER_TIMEOUT="2",
            LACUNA_HANDLER_CONCURRENCY="4",
        )
    ).start()
    ids = [f"evt_take_{i}" for i in range(4)]
    for event_id in ids:
        body, headers = signed(make_event(event_id))
        assert httpx.post(slow.webhook_url, content=body, headers=headers).status_code == 200

    def leased() -> bool:
        listed = run_cli(
            "deliveries", "list", "--json", env={"LACUNA_DATABASE_URL": postgres_dsn}, cwd=tmp_path
        )
        rows = json.loads(listed.stdout or "[]")
        return len(rows) == 4 and all(r["status"] == "running" for r in rows)

    wait_until(leased, timeout=20, what="the slow replica to hold every lease")
    slow.signal(signal.SIGKILL)
    slow.wait()
    others = [
        serve_factory(replica_env(postgres_dsn, out, LACUNA_RECORDER_TIMEOUT="2")).start()
        for _ in range(2)
    ]
    assert others
    wait_until(lambda: set(recorded(out)) == set(ids), timeout=90, what="takeover")
    assert sorted(recorded(out)) == sorted(ids)


async def _set_connections(dsn: str, allowed: bool) -> None:
    """Open or close the test database to new connections, and cut the existing ones."""
    base, _, name = dsn.rpartition("/")
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
    finally:
        await admin.close()


async def _stored_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["id"] for r in await conn.fetch("SELECT id FROM events")}
    finally:
        await conn.close()


@pytest.fixture
def sender(serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str) -> Serve:
    return serve_factory(replica_env(postgres_dsn, tmp_path / "delivered.txt")).start()


def test_database_outage_under_load(sender: Serve, postgres_dsn: str, tmp_path: Path) -> None:
    """While the database refuses connections, senders get 503 with Retry-After (never a
    2xx for an event that is not stored) and /readyz is 503; afterwards the service
    recovers by itself, every 2xx'd event is stored, and retried events are accepted."""
    answers: dict[str, list[int]] = {}
    stop = threading.Event()

    def load() -> None:
        n = 0
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                event_id = f"evt_outage_{n}"
                n += 1
                body, headers = signed(make_event(event_id))
                r = client.post(sender.webhook_url, content=body, headers=headers)
                answers.setdefault(event_id, []).append(r.status_code)
                if r.status_code == 503:
                    assert r.headers["retry-after"].isdigit()
                    assert r.json()["error"]["code"] == "store_unavailable"

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: len(answers) > 20, what="traffic before the outage")
        asyncio.run(_set_connections(postgres_dsn, allowed=False))
        wait_until(
            lambda: any(503 in codes for codes in answers.values()), what="503 during outage"
        )
        assert httpx.get(f"{sender.base_url}/readyz").status_code == 503
        assert httpx.get(f"{sender.base_url}/healthz").status_code == 200
    finally:
        asyncio.run(_set_connections(postgres_dsn, allowed=True))
    wait_until(lambda: httpx.get(f"{sender.base_url}/readyz").status_code == 200, what="recovery")
    outage_seen = len(answers)
    wait_until(lambda: len(answers) > outage_seen + 20, what="traffic after recovery")
    stop.set()
    thread.join(30)

    codes = {code for seen in answers.values() for code in seen}
    assert codes <= {200, 503}, codes
    stored = asyncio.run(_stored_ids(postgres_dsn))
    answered_ok = {event_id for event_id, seen in answers.items() if 200 in seen}
    assert answered_ok <= stored  # never a 2xx for an unstored event
    # The sender retries what got a 503: it is accepted (or found stored) now.
    refused = [event_id for event_id, seen in answers.items() if seen == [503]]
    assert refused
    for event_id in refused:
        body, headers = signed(make_event(event_id))
        r = httpx.post(sender.webhook_url, content=body, headers=headers)
        assert r.status_code == 200
    assert set(refused) <= asyncio.run(_stored_ids(postgres_dsn))


def test_readyz_is_503_while_commits_time_out_though_the_database_answers(
    serve_factory: type[Serve], tmp_path: Path, postgres_dsn: str
) -> None:
    """Another session holds a lock on the events table: the database answers its ping, but
    every accept waits past LACUNA_COMMIT_TIMEOUT and gets 503. /readyz said 200 all along
    (a load balancer kept sending every event to a replica that could only refuse it). It is
    503 once a commit has failed, and 200 again after the next one commits."""
    serve = serve_factory(
        replica_env(postgres_dsn, tmp_path / "delivered.txt", LACUNA_COMMIT_TIMEOUT="1")
    ).start()

    async def hold_lock(locked: threading.Event, release: threading.Event) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait, 60)
        finally:
            await conn.close()

    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=asyncio.run, args=(hold_lock(locked, release),))
    holder.start()
    try:
        assert locked.wait(30)
        body, headers = signed(make_event("evt_locked"))
        refused = httpx.post(serve.webhook_url, content=body, headers=headers, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "store_unavailable"
        assert httpx.get(f"{serve.base_url}/readyz", timeout=10).status_code == 503
    finally:
        release.set()
        holder.join(30)
    body, headers = signed(make_event("evt_unlocked"))
    assert (
        httpx.post(serve.webhook_url, content=body, headers=headers, timeout=30).status_code == 200
    )
    assert httpx.get(f"{serve.base_url}/readyz", timeout=10).status_code == 200
