"""The admin API's live area (admin/api_live.py): ``GET /stream`` (Server-Sent Events) and
``GET /tasks/{task_id}`` with ``?wait=``, over every store backend (``store`` fixture:
memory, SQLite, SQLite with its writer process, PostgreSQL).

The app is served by a real uvicorn on a socket, on the test's own loop (where the store was
opened): httpx's in-process transport collects a whole response before it returns, which
an endless stream never finishes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from httpx_sse import ServerSentEvent, aconnect_sse

from lacuna_webhooks.admin import AdminContext, api_live, create_admin_app
from lacuna_webhooks.models import Attempt, AttemptOutcome
from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.search import CURSOR_INT_MAX, decode_cursor, encode_cursor
from tests.e2e.conftest import free_port
from tests.integration.test_admin_api import AUTH, admin_context, event, refused

#: A bound for something that should happen promptly: a failure if exceeded, not a measure.
PROMPT = 15.0


@dataclass
class Live:
    ctx: AdminContext
    http: httpx.AsyncClient


@pytest.fixture
async def live(store: Store) -> AsyncIterator[Live]:
    ctx = admin_context(store)
    port = free_port()
    config = uvicorn.Config(
        create_admin_app(ctx),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{port}/api/v1"
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=PROMPT) as http:
        yield Live(ctx, http)
    ctx.stopping.set()
    server.should_exit = True
    await asyncio.wait_for(task, PROMPT)


async def read(
    http: httpx.AsyncClient,
    count: int,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    then: Any = None,
) -> list[ServerSentEvent]:
    """The first ``count`` messages of one ``/stream`` request; ``then()`` (a coroutine
    function) runs once the stream is open, e.g. to store events while it is followed."""
    got: list[ServerSentEvent] = []

    async def run() -> None:
        async with aconnect_sse(
            http, "GET", "/stream", params=params, headers=headers or {}
        ) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            if then is not None:
                await then()
            async for message in source.aiter_sse():
                got.append(message)
                if len(got) == count:
                    return

    await asyncio.wait_for(run(), PROMPT)
    return got


def ids_of(messages: list[ServerSentEvent]) -> list[str]:
    return [orjson.loads(m.data)["id"] for m in messages]


async def store_events(store: Store, *event_ids: str, **data: Any) -> None:
    for event_id in event_ids:
        assert await store.accept(event(event_id, **data), ["audit"], now=_now())


def _now() -> datetime:
    return datetime.now(UTC)


# --- /stream --------------------------------------------------------------------------------------


async def test_stream_from_beginning_then_resume_with_last_event_id(
    live: Live, store: Store
) -> None:
    """Every stored event once, in order, with its cursor as id and the StreamEvent shape;
    a reconnect with Last-Event-ID (which wins over ?from) gets exactly the rest, including
    what was stored while it was away, then new events live."""
    await store_events(store, "evt_a", "evt_b", "evt_c", title="Late Night Study")
    first = await read(live.http, 3, params={"from": "beginning"})
    assert ids_of(first) == ["evt_a", "evt_b", "evt_c"]
    assert {m.event for m in first} == {"event"}
    shown = orjson.loads(first[0].data)
    assert shown["payload"]["data"]["title"] == "Late Night Study"
    assert orjson.loads(shown["raw"]) == shown["payload"]
    assert shown["type"] == "job.completed"
    assert shown["task_id"] == "cm123abc"
    assert len({m.id for m in first}) == 3

    await store_events(store, "evt_d", "evt_e")

    async def later() -> None:
        await store_events(store, "evt_f")

    again = await read(
        live.http,
        4,
        params={"from": "beginning"},
        headers={"last-event-id": first[1].id},
        then=later,
    )
    assert ids_of(again) == ["evt_c", "evt_d", "evt_e", "evt_f"]
    assert again[0].id == first[2].id  # the same event keeps its cursor
    resumed = await read(live.http, 1, params={"after": again[0].id})
    assert ids_of(resumed) == ["evt_d"]


async def test_stream_starts_now_by_default(live: Live, store: Store) -> None:
    """Without a cursor the stream starts now: an event stored before is not sent, one
    stored after is. (PostgreSQL's "now" is the oldest write transaction still running on
    the server, so an event that committed an instant before may come too: never one
    skipped. Other tests' transactions on the shared server can make that happen here.)"""
    await store_events(store, "evt_old")

    async def new() -> None:
        await store_events(store, "evt_new")

    got: list[str] = []

    async def run() -> None:
        async with aconnect_sse(live.http, "GET", "/stream") as source:
            await new()
            async for message in source.aiter_sse():
                got.append(orjson.loads(message.data)["id"])
                if got[-1] == "evt_new":
                    return

    await asyncio.wait_for(run(), PROMPT)
    if "Postgres" in type(store).__name__ and got[0] == "evt_old":
        got = got[1:]
    assert got == ["evt_new"]


async def test_stream_keepalive_on_a_quiet_stream(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet stream still sends a comment line now and then (raw lines: SSE clients hide
    comments)."""
    monkeypatch.setattr(api_live, "KEEPALIVE_SECONDS", 0.2)

    async def run() -> list[str]:
        lines: list[str] = []
        async with live.http.stream("GET", "/stream") as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if line == ": keepalive":
                    return lines
        return lines

    lines = await asyncio.wait_for(run(), PROMPT)
    assert lines[0] == ": stream open"
    assert lines[-1] == ": keepalive"


async def test_stream_refuses_bad_starts_before_streaming(live: Live) -> None:
    """A bad cursor (query or header), an unknown or repeated parameter, a bad from, or
    after with from: 400 with the envelope, never a stream."""
    cases: list[tuple[dict[str, Any], dict[str, str], str]] = [
        ({"after": "nope"}, {}, "after"),
        ({"after": "eyJ4IjoxfQ"}, {}, "after"),
        ({}, {"last-event-id": "nope"}, "last-event-id"),
        ({"from": "yesterday"}, {}, "from"),
        ({"from": "now", "after": "x"}, {}, "from"),
        ({"since": "1"}, {}, "since"),
        ({"from": ["now", "now"]}, {}, "from"),
    ]
    for params, headers, param in cases:
        response = await live.http.get("/stream", params=params, headers=headers)
        refused(response, 400, param)


async def test_stream_ends_when_the_listener_stops(live: Live, store: Store) -> None:
    """``stopping`` (set by serve when the admin listener shuts down) ends an open stream at
    once instead of holding the server open."""

    async def run() -> int:
        count = 0
        async with aconnect_sse(live.http, "GET", "/stream") as source:
            live.ctx.stopping.set()
            async for _ in source.aiter_sse():
                count += 1
        return count

    assert await asyncio.wait_for(run(), PROMPT) == 0


@pytest.mark.postgres
async def test_postgres_stream_waits_for_an_older_open_transaction(postgres_dsn: str) -> None:
    """Transaction A stores an event and stays open while B stores and commits a later one:
    the stream hands out neither until A commits, then A's and B's in that order."""
    store = open_store(postgres_dsn)
    await store.open()
    holder = await asyncpg.connect(postgres_dsn)
    try:
        ctx = admin_context(store)
        server = uvicorn.Server(
            uvicorn.Config(
                create_admin_app(ctx),
                host="127.0.0.1",
                port=(port := free_port()),
                log_config=None,
                lifespan="off",
            )
        )
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        got: list[str] = []
        opened = asyncio.Event()

        async def follow() -> None:
            async with (
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}/api/v1", headers=AUTH, timeout=PROMPT
                ) as http,
                aconnect_sse(http, "GET", "/stream") as source,
            ):
                opened.set()
                async for message in source.aiter_sse():
                    got.append(orjson.loads(message.data)["id"])
                    if len(got) == 2:
                        return

        reader = asyncio.create_task(follow())
        await asyncio.wait_for(opened.wait(), PROMPT)
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(
            "INSERT INTO events (id, type, received_at, raw) VALUES ('evt_A', 't', now(), '{}')"
        )
        await store_events(store, "evt_B")
        await asyncio.sleep(2.5)  # more than the stream's poll interval and a NOTIFY
        assert got == []
        await transaction.commit()
        await asyncio.wait_for(reader, PROMPT)
        assert got == ["evt_A", "evt_B"]
        ctx.stopping.set()
        server.should_exit = True
        await asyncio.wait_for(task, PROMPT)
    finally:
        await holder.close()
        await store.close()


# --- /tasks/{task_id} -----------------------------------------------------------------------------


async def test_task_state_events_and_results(live: Live, store: Store) -> None:
    await store_events(store, "evt_t1", task_id="task_done", title="Rain")
    response = await live.http.get("/tasks/task_done")
    assert response.status_code == 200, response.text
    task = response.json()
    assert task["task_id"] == "task_done"
    assert task["status"] == "ready"
    assert task["event_id"] == "evt_t1"
    assert task["event_type"] == "job.completed"
    assert [e["id"] for e in task["events"]] == ["evt_t1"]
    assert task["results"] == {"audit": None}  # pending: no result yet
    now = _now()
    [claimed] = await store.claim(handler="audit", limit=1, lease=timedelta(minutes=1), now=now)
    ok = Attempt(now, now, AttemptOutcome.OK, None, {"url": "https://files.example/rain.mp3"})
    assert await store.complete(claimed, ok)
    done = (await live.http.get("/tasks/task_done")).json()
    assert done["results"] == {"audit": {"url": "https://files.example/rain.mp3"}}
    refused(await live.http.get("/tasks/no_such_task"), 404, "task_id")


async def test_a_task_id_with_a_slash_is_reachable(live: Live, store: Store) -> None:
    """Intake stores a task id holding "/" (data.id is any string), and ?task_id= finds it;
    /tasks/{task_id} answered a route-level 404 for every spelling of it (no long-poll)."""
    await store_events(store, "evt_slash", task_id="org/task/1", title="Rain")
    for path in ("/tasks/org/task/1", "/tasks/org%2Ftask%2F1"):
        response = await live.http.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["task_id"] == "org/task/1"
    refused(await live.http.get("/tasks/org/task/2"), 404, "task_id")


async def test_task_wait_refuses_bad_values(live: Live) -> None:
    bad = ["0", "-1", "60.5", "61", "nan", "inf", "abc", "", "1e400", "-0", "60.0000001"]
    bad += ["60.000000000000001"]  # the float 60.0, but over 60
    # float() takes these; they are not the decimal number the docs promise
    bad += ["1_0", "\u0661", " 5", "5 ", "0x10", "+5", "1e2", "Infinity"]
    for value in bad:
        refused(await live.http.get("/tasks/t", params={"wait": value}), 400, "wait")
    refused(await live.http.get("/tasks/t", params=[("wait", "1"), ("wait", "2")]), 400, "wait")
    refused(await live.http.get("/tasks/t", params={"limit": "1"}), 400, "limit")


async def test_task_wait_answers_as_soon_as_it_is_ready(live: Live, store: Store) -> None:
    """A wait on a task not stored yet answers once its job.completed is stored, long before
    the wait is over; a running task's job.failed ends a wait the same way."""

    async def later(event_id: str, event_type: str, task_id: str) -> None:
        await asyncio.sleep(0.5)
        stored = event(event_id, event_type, task_id=task_id)
        assert await store.accept(stored, ["audit"], now=_now())

    started = time.monotonic()
    feeder = asyncio.create_task(later("evt_w1", "job.completed", "task_wait"))
    response = await live.http.get("/tasks/task_wait", params={"wait": "30"})
    await feeder
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready"
    assert time.monotonic() - started < 25  # answered on the event, not at the end

    running = event("evt_w2", "job.progress", task_id="task_running", status="running")
    assert await store.accept(running, [], now=_now())
    feeder = asyncio.create_task(later("evt_w3", "job.failed", "task_running"))
    response = await live.http.get("/tasks/task_running", params={"wait": "30"})
    await feeder
    assert response.json()["status"] == "failed"
    assert response.json()["event_id"] == "evt_w3"


async def test_task_wait_times_out(live: Live, store: Store) -> None:
    """At the end of the wait: a task never stored is 404, a running one is answered as it
    is."""
    refused(await live.http.get("/tasks/task_never", params={"wait": "0.3"}), 404, "task_id")
    running = event("evt_r", "job.progress", task_id="task_slow", status="running")
    assert await store.accept(running, [], now=_now())
    response = await live.http.get("/tasks/task_slow", params={"wait": "0.3"})
    assert response.status_code == 200
    assert response.json()["status"] == "running"


async def test_task_wait_ends_when_the_listener_stops(live: Live, store: Store) -> None:
    """A stop ends waits at once (it never holds serve up), and a wait it cut short is
    503 shutting_down with Retry-After, so the client asks again: not 404 for a task not
    stored yet (a 404 only once the wait is over) nor a running task as if the wait were
    over. A task already final is answered as it is; a wait after the stop too."""
    running = event("evt_r", "job.progress", task_id="task_run", status="running")
    assert await store.accept(running, [], now=_now())
    ready = event("evt_d", "job.completed", task_id="task_done", status="ready")
    assert await store.accept(ready, [], now=_now())
    waits = [
        asyncio.create_task(live.http.get(f"/tasks/{task}", params={"wait": "60"}))
        for task in ("task_x", "task_run")
    ]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    live.ctx.stopping.set()
    for answer in await asyncio.wait_for(asyncio.gather(*waits), PROMPT):
        error = refused(answer, 503)
        assert error["code"] == "shutting_down"
        assert answer.headers["retry-after"] == "1"
    assert time.monotonic() - started < PROMPT
    late = await live.http.get("/tasks/task_x", params={"wait": "30"})
    assert refused(late, 503)["code"] == "shutting_down"
    done = await live.http.get("/tasks/task_done", params={"wait": "60"})
    assert done.status_code == 200
    assert done.json()["status"] == "ready"
    # Without a wait nothing was cut short: a 404 and a task as it is, as ever.
    refused(await live.http.get("/tasks/task_x"), 404, "task_id")
    assert (await live.http.get("/tasks/task_run")).json()["status"] == "running"


async def test_live_routes_are_in_the_openapi_document(live: Live) -> None:
    document = (await live.http.get("/openapi.json")).json()
    assert document["paths"]["/stream"]["get"]["operationId"] == "streamEvents"
    assert document["paths"]["/tasks/{task_id}"]["get"]["operationId"] == "getTask"
    assert "TaskState" in document["components"]["schemas"]
    refused(await live.http.get("/stream", headers={"authorization": ""}), 401)


async def test_stream_ends_when_the_store_fails_and_a_reconnect_is_503() -> None:
    """The store failing under an open stream ends it (the client resumes later with its last
    id) rather than answering garbage; a new request meanwhile is a 503 envelope."""
    from lacuna_webhooks.store.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    ctx = admin_context(store)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_admin_app(ctx),
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}/api/v1", headers=AUTH, timeout=PROMPT
        ) as http:

            async def follow_until_end() -> list[str]:
                got: list[str] = []
                async with aconnect_sse(http, "GET", "/stream") as source:
                    await store_events(store, "evt_before_failure")
                    async for message in source.aiter_sse():
                        got.append(orjson.loads(message.data)["id"])
                        store.unavailable = True
                        store.stream_signal.notify()
                return got

            assert await asyncio.wait_for(follow_until_end(), PROMPT) == ["evt_before_failure"]
            refused(await http.get("/stream"), 503)
    finally:
        ctx.stopping.set()
        server.should_exit = True
        await asyncio.wait_for(task, PROMPT)


async def test_head_on_the_stream_answers_and_ends(live: Live, store: Store) -> None:
    """HEAD (which Starlette answers on every GET route) answered 200 and then held the
    connection like a live stream, for a body HEAD never gets. Now the GET's status and
    headers, at once; a bad cursor is still its 400."""
    await store_events(store, "evt_h1")
    response = await asyncio.wait_for(live.http.head("/stream"), PROMPT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""
    bad = await asyncio.wait_for(live.http.head("/stream", params={"after": "x"}), PROMPT)
    assert bad.status_code == 400


async def test_stream_refuses_a_cursor_beyond_the_head(live: Live, store: Store) -> None:
    """A cursor past every position handed out (forged, or saved against a database since
    replaced by a fresh one or an older backup) is a 400 before the stream starts: followed,
    it would wait in silence, then skip every event stored below it. The head itself and
    every handed-out cursor are still accepted."""
    await store_events(store, "evt_head1", "evt_head2")
    head = await store.stream_head()
    kind, *positions = decode_cursor(head, len(_parts(head)))
    beyond = [encode_cursor(kind, positions[0] + 1, *positions[1:])]
    beyond.append(encode_cursor(kind, *[CURSOR_INT_MAX] * len(positions)))
    for cursor in beyond:
        refused(await live.http.get("/stream", params={"after": cursor}), 400, "after")
        response = await live.http.get("/stream", headers={"last-event-id": cursor})
        refused(response, 400, "last-event-id")
    messages = await read(live.http, 2, params={"from": "beginning"})
    assert ids_of(messages) == ["evt_head1", "evt_head2"]

    async def more() -> None:
        await store_events(store, "evt_head3")

    got = await read(live.http, 1, headers={"last-event-id": messages[0].id})
    assert ids_of(got) == ["evt_head2"]
    assert ids_of(await read(live.http, 1, params={"after": head}, then=more)) == ["evt_head3"]


def _parts(cursor: str) -> list[Any]:
    return orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))  # type: ignore[no-any-return]
