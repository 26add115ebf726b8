"""intake.py in process: the commit wait bound (LACUNA_COMMIT_TIMEOUT) on a real SQLite store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from lacuna_webhooks.app import create_app
from lacuna_webhooks.config import Settings
from lacuna_webhooks.store import Store, open_store

from ..conftest import TEST_SECRET, make_event, signed

URL = "/webhooks/lacuna"


class _StuckStore:
    """A real store whose ``accept`` waits on ``release`` first: a commit that takes long."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def accept(self, *args: Any, **kwargs: Any) -> bool:
        await self.release.wait()
        return await self.inner.accept(*args, **kwargs)


async def test_a_commit_slower_than_the_bound_is_503_then_duplicate_on_retry(
    tmp_path: Path,
) -> None:
    """A webhook whose commit is not confirmed within LACUNA_COMMIT_TIMEOUT gets 503
    store_unavailable with Retry-After; requests waiting together all get it; once the store
    answers, the retry is 200."""
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    await store.open()
    stuck = _StuckStore(store)
    settings = Settings.from_env(
        {
            "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}",
            "LACUNA_COMMIT_TIMEOUT": "0.3",
        }
    )
    app = create_app(settings, store=stuck, dispatch=False)  # type: ignore[arg-type]
    bodies = [signed(make_event(f"evt_slow_{i}")) for i in range(5)]
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as client:
            started = time.monotonic()
            answers = await asyncio.gather(
                *(client.post(URL, content=body, headers=headers) for body, headers in bodies)
            )
            waited = time.monotonic() - started
            assert [a.status_code for a in answers] == [503] * 5
            assert {a.json()["error"]["code"] for a in answers} == {"store_unavailable"}
            assert all(a.headers["retry-after"].isdigit() for a in answers)
            assert waited < 5  # the bound, not a hang
            stuck.release.set()
            body, headers = bodies[0]
            retry = await client.post(URL, content=body, headers=headers)
            assert retry.status_code == 200
            assert retry.json()["duplicate"] is False
    finally:
        await store.close()
