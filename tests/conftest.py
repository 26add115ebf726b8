"""Fixtures shared by every test layer: real stores, real PostgreSQL, signing helpers.

PostgreSQL: ``LACUNA_TEST_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``). When the server is unreachable
the tests that need it skip with the reason, except under ``CI=true``, where
they fail: a CI run must never go green by skipping its PostgreSQL tests.

Brokers, the same way: ``nats_server``, ``rabbitmq_server`` and ``redis_server``
give the URL of the local broker (``LACUNA_TEST_NATS_URL``,
``LACUNA_TEST_RABBITMQ_URL``, ``LACUNA_TEST_REDIS_URL``; defaults are the
ports every developer machine and CI run: 4222, 5672 with guest/guest, 6379).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from lacuna_webhooks.admin import AdminContext
from lacuna_webhooks.config import Settings
from lacuna_webhooks.plugins import build_handlers
from lacuna_webhooks.samples import sample_event
from lacuna_webhooks.signature import sign
from lacuna_webhooks.store import Store, open_store

POSTGRES_DSN = os.environ.get(
    "LACUNA_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
NATS_URL = os.environ.get("LACUNA_TEST_NATS_URL", "nats://127.0.0.1:4222")
RABBITMQ_URL = os.environ.get("LACUNA_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("LACUNA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

TEST_SECRET = "whsec_test_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"


@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    """Undo what a test's in-process ``logs.configure`` (a CLI command run by ``cli.main``)
    did to the root logger: its handler writes to the ``sys.stderr`` of that test, which
    pytest closes after it, so a later test's library log line (pytest-httpserver's access
    log) printed a "Logging error" traceback into that test's captured stderr."""
    import logging
    import sys
    import threading

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (threading.excepthook, sys.unraisablehook)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    threading.excepthook, sys.unraisablehook = hooks


def make_event(
    event_id: str | None = None,
    event_type: str = "job.completed",
    *,
    task_id: str = "cm123abc",
    created: int | None = None,
    **data: Any,
) -> dict[str, Any]:
    """A realistic event payload (SPEC §2); keyword arguments replace fields of ``data``."""
    event = sample_event(event_type, event_id=event_id, task_id=task_id, created=created)
    event["data"].update(data)
    return event


def admin_context_for(store: Store, environ: Mapping[str, str]) -> AdminContext:
    """The admin API's context over ``store`` with the settings of ``environ``, its handlers
    built without instances (as ``serve`` gives them to the admin listener)."""
    settings = Settings.from_env(dict(environ))
    handlers = build_handlers(settings.handlers, settings.environ).without_instances()
    return AdminContext(settings=settings, store=store, handlers=handlers)


def signed(payload: dict[str, Any] | bytes, secret: str = TEST_SECRET, t: int | None = None):
    """(body bytes, headers) for a validly signed request."""
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    header = sign(body, secret, int(time.time()) if t is None else t)
    return body, {"x-lacuna-signature": header, "content-type": "application/json"}


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The server DSN, or skip (fail under CI) when PostgreSQL is unreachable."""
    import asyncio
    import concurrent.futures

    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        await conn.close()

    try:
        # In a thread of its own: this fixture may be first requested while an event loop
        # runs, where asyncio.run() would fail and be mistaken for "unreachable".
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, probe()).result()
    except Exception as exc:  # any failure to connect means "unreachable"
        message = f"PostgreSQL unreachable at {POSTGRES_DSN}: {exc!r}"
        if IN_CI:
            pytest.fail(message + " (CI=true: PostgreSQL tests fail instead of skipping)")
        pytest.skip(message)
    return POSTGRES_DSN


@pytest.fixture
async def postgres_dsn(postgres_server: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    import asyncpg

    name = f"lw_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = postgres_server.rpartition("/")
    yield f"{base}/{name}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _require_broker(what: str, url: str) -> str:
    """``url`` when its host:port accepts a TCP connection; else skip (fail when CI=true)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 3):
            pass
    except OSError as exc:
        message = f"{what} unreachable at {parts.hostname}:{parts.port}: {exc!r}"
        if IN_CI:
            pytest.fail(message + f" (CI=true: {what} tests fail instead of skipping)")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def nats_server() -> str:
    """The NATS (JetStream) URL, or skip (fail under CI) when the server is unreachable."""
    return _require_broker("NATS", NATS_URL)


@pytest.fixture(scope="session")
def rabbitmq_server() -> str:
    """The RabbitMQ URL, or skip (fail under CI) when the broker is unreachable."""
    return _require_broker("RabbitMQ", RABBITMQ_URL)


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The Redis URL, or skip (fail under CI) when the server is unreachable."""
    return _require_broker("Redis", REDIS_URL)


def process_exited(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "sqlite-process",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty store, once per backend (``memory:`` is the in-memory test double;
    ``sqlite+process:`` is SQLite with its writer in a child process, as ``serve`` runs it)."""
    if request.param == "memory":
        yield "memory:"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.db'}"
    elif request.param == "sqlite-process":
        yield f"sqlite+process:///{tmp_path / 'events.db'}"
    else:
        yield request.getfixturevalue("postgres_dsn")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An opened, migrated, empty store, once per backend."""
    if store_url == "memory:":
        from lacuna_webhooks.store.memory import MemoryStore

        s: Store = MemoryStore()
    elif store_url.startswith("sqlite+process:"):
        s = open_store(store_url.replace("sqlite+process:", "sqlite:", 1), sqlite_process=True)
    else:
        s = open_store(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
