"""``WebhookEndpoint.answer_soon``: the direct path's answer without a task per request.

It must answer exactly as ``answer`` does (the ASGI path), once per request: a refusal at
once, an accept from the commit's callback, a commit that does not come within
``LACUNA_COMMIT_TIMEOUT`` with the 503; and a store without ``accept_soon`` (the in-memory
one) through a task. Real stores: an SQLite file (its writer in a process, as ``serve``
runs it) and the memory store.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from lacuna_webhooks.config import Settings
from lacuna_webhooks.intake import Answer, WebhookEndpoint
from lacuna_webhooks.metrics import Metrics
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import HandlerSet
from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.memory import MemoryStore

from ..conftest import TEST_SECRET, make_event, signed


def endpoint(store: Store, **env: str) -> WebhookEndpoint:
    settings = Settings.from_env(
        {"LACUNA_WEBHOOK_SECRET": TEST_SECRET, "LACUNA_DATABASE_URL": "sqlite:///unused", **env}
    )
    return WebhookEndpoint(settings, store, HandlerSet.of([]), Metrics())


async def answer_of(
    webhook: WebhookEndpoint,
    body: bytes,
    signature: str,
    tasks: set[asyncio.Task[Any]] | None = None,
    tasks_while_waiting: list[int] | None = None,
) -> list[Answer]:
    """``answer_soon``'s answers for one request, once it has one (at most 10 s)."""
    answers: list[Answer] = []
    webhook.answer_soon(body, [signature], asyncio.get_running_loop(), answers.append, tasks)
    if tasks_while_waiting is not None and tasks is not None:
        tasks_while_waiting.append(len(tasks))
    for _ in range(1000):
        if answers:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a second answer would come now
    return answers


def sqlite_store(path: Path) -> Store:
    return open_store(f"sqlite:///{path}", sqlite_process=True)


async def test_a_refusal_is_answered_before_answer_soon_returns(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "events.db")
    await store.open()
    try:
        webhook = endpoint(store)
        body, headers = signed(make_event("evt_soon_refused"), secret="whsec_not_the_secret_0000")
        answers: list[Answer] = []
        webhook.answer_soon(
            body, [headers["x-lacuna-signature"]], asyncio.get_running_loop(), answers.append
        )
        assert len(answers) == 1  # no loop turn needed
        status, content, _, outcome, _ = answers[0]
        assert (status, outcome) == (401, "invalid_signature")
        assert orjson.loads(content)["error"]["code"] == "invalid_signature"
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_accepted_then_duplicate_answered_once_each(tmp_path: Path, backend: str) -> None:
    store = sqlite_store(tmp_path / "events.db") if backend == "sqlite" else MemoryStore()
    await store.open()
    try:
        webhook = endpoint(store)
        body, headers = signed(make_event("evt_soon_ok"))
        tasks: set[asyncio.Task[Any]] = set()
        for duplicate in (False, True):
            waiting: list[int] = []
            answers = await answer_of(webhook, body, headers["x-lacuna-signature"], tasks, waiting)
            # A store without accept_soon is awaited in a task, kept in uvicorn's set (which
            # its shutdown cancels at its deadline) while it runs; SQLite needs none.
            assert waiting == [1 if backend == "memory" else 0]
            assert not tasks
            assert len(answers) == 1
            status, content, _, outcome, event = answers[0]
            assert status == 200
            assert outcome == ("duplicate" if duplicate else "accepted")
            assert orjson.loads(content) == {
                "received": True,
                "id": "evt_soon_ok",
                "duplicate": duplicate,
            }
            assert event is not None
            assert event.id == "evt_soon_ok"
        stored = await store.get_event("evt_soon_ok")
        assert stored is not None
    finally:
        await store.close()


async def test_a_commit_held_up_past_the_commit_timeout_is_a_503(tmp_path: Path) -> None:
    """Another process holds the SQLite write lock: the answer is 503 store_unavailable after
    LACUNA_COMMIT_TIMEOUT (0.3 s), once; the commit that goes through after the lock is
    released makes the retry a duplicate, never a second event."""
    path = tmp_path / "events.db"
    store = sqlite_store(path)
    await store.open()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        webhook = endpoint(store, LACUNA_COMMIT_TIMEOUT="0.3")
        body, headers = signed(make_event("evt_soon_locked"))
        holder.execute("BEGIN IMMEDIATE")
        started = asyncio.get_running_loop().time()
        answers = await answer_of(webhook, body, headers["x-lacuna-signature"])
        waited = asyncio.get_running_loop().time() - started
        holder.execute("ROLLBACK")
        assert len(answers) == 1
        status, content, answer_headers, outcome, _ = answers[0]
        assert (status, outcome) == (503, "store_unavailable")
        assert "0.3 s" in orjson.loads(content)["error"]["message"]
        assert any(name == b"retry-after" for name, _ in answer_headers)
        assert waited < 3  # SQLite's own busy timeout is 5 s
        retry = await answer_of(webhook, body, headers["x-lacuna-signature"])
        assert [a[0] for a in retry] == [200]
        assert not webhook._waiting
        assert not webhook._expired
    finally:
        holder.close()
        await store.close()


async def test_a_commit_done_in_the_turn_of_its_deadline_keeps_its_answer(
    tmp_path: Path,
) -> None:
    """The watchdog may find a wait past its deadline in the very turn its commit's result
    came, before the callback ran: the commit's answer stands, and nothing is left marked
    expired (a set that only grew, for the life of the process)."""
    webhook = endpoint(MemoryStore(), LACUNA_COMMIT_TIMEOUT="0.5")
    loop = asyncio.get_running_loop()
    answers: list[Answer] = []
    for i in range(3):
        event = Event.from_body(signed(make_event(f"evt_race_{i}"))[0])
        committed: asyncio.Future[bool] = loop.create_future()
        webhook._wait_for(committed, loop)
        # answer_soon's own callback: the answer from the commit's outcome
        committed.add_done_callback(functools.partial(webhook._committed, event, answers.append))
        webhook._waiting[committed] = 0.0  # long past its deadline
        committed.set_result(bool(i % 2))  # ... yet its result is in
    webhook._expire_waits()
    await asyncio.sleep(0)
    assert [(status, outcome) for status, _, _, outcome, _ in answers] == [
        (200, "duplicate"),
        (200, "accepted"),
        (200, "duplicate"),
    ]
    assert not webhook._waiting
    assert not webhook._expired
