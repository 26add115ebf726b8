"""Large stored bodies are parsed and encoded in the admin's helper process (offload.py),
not on the loop that the webhook route shares: the same answers as the inline code, from
another process.

(Measured by a hostile review before: one `GET /events/{id}` of a 16.8 MB event held intake
for 559 ms, the console's event page 615 ms, a worker thread notwithstanding: the GIL.)"""

from __future__ import annotations

import html
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from lacuna_webhooks.admin import create_admin_app, offload
from lacuna_webhooks.admin.api_events import event_json, event_summary
from lacuna_webhooks.admin.api_live import sse_message
from lacuna_webhooks.admin.console.present import pretty_json
from lacuna_webhooks.models import Event
from lacuna_webhooks.store import Store, open_store
from tests.conftest import make_event
from tests.integration.test_console import NOW, TOKEN, context, sign_in

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _big_event(event_id: str) -> Event:
    payload = make_event(event_id)
    payload["data"]["title"] = "Big One"
    payload["data"]["blob"] = [{"i": i, "s": "é" * 8} for i in range(8000)]  # ~250 KB
    raw = orjson.dumps(payload)
    assert len(raw) > offload.INLINE_BYTES
    return Event.from_body(raw)


@pytest.fixture
async def big_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 'big.db'}")
    await store.open()
    assert await store.accept(_big_event("evt_big"), ["log"], now=NOW)
    yield store
    await store.close()
    offload.close()


async def test_the_helper_is_another_process_and_small_work_stays_here() -> None:
    try:
        assert await offload.run(offload.INLINE_BYTES, os.getpid) != os.getpid()
        assert await offload.run(offload.INLINE_BYTES - 1, os.getpid) == os.getpid()
        # What the work raises is raised here.
        with pytest.raises(ValueError, match="invalid literal"):
            await offload.run(offload.INLINE_BYTES, int, "x")
    finally:
        offload.close()


async def test_a_helper_that_died_is_replaced_and_its_call_runs_here() -> None:
    try:
        pid = await offload.run(offload.INLINE_BYTES, os.getpid)
        os.kill(pid, 9)
        # The call that meets the dead helper still answers, here; the next one has a new
        # helper.
        assert await offload.run(offload.INLINE_BYTES, os.getpid) == os.getpid()
        again = await offload.run(offload.INLINE_BYTES, os.getpid)
        assert again not in {pid, os.getpid()}
    finally:
        offload.close()


async def test_large_event_answers_are_those_of_the_inline_code(big_store: Store) -> None:
    record = await big_store.get_event("evt_big")
    assert record is not None
    app = create_admin_app(context(big_store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin.test") as http:
        offload.close()
        answer = await http.get("/api/v1/events/evt_big", headers=AUTH)
        assert answer.status_code == 200
        assert offload._pool is not None  # it went through the helper
        shown = answer.json()
        assert shown["payload"] == orjson.loads(record.raw)
        assert shown["raw"] == record.raw.decode()
        assert shown["deliveries"][0]["handler"] == "log"
        inline = orjson.loads(event_json(event_summary(record), record.raw, []))
        assert {k: v for k, v in shown.items() if k != "deliveries"} == {
            k: v for k, v in inline.items() if k != "deliveries"
        }
        # The stream's message for it, encoded there.
        message = await sse_message("c1", record)
        data = orjson.loads(message.split(b"\ndata: ", 1)[1])
        assert data["payload"] == shown["payload"]
        # The console's pages: the title parsed there, the payload re-indented there.
        await sign_in(http)
        page = await http.get("/events")
        assert page.status_code == 200
        assert "Big One" in page.text
        event_page = await http.get("/event", params={"id": "evt_big"})
        assert event_page.status_code == 200
        text, _ = pretty_json(record.raw)
        assert text.splitlines()[1].strip() in html.unescape(event_page.text)
