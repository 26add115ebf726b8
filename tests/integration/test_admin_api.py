"""The admin API's events, deliveries and handlers routes (SPEC §9, admin/api_events.py),
over every store backend (``store`` fixture: memory, SQLite, SQLite with its writer process,
PostgreSQL): every route and filter, the auth rules, and a 400/404/413 envelope for every bad
parameter or body. The app runs in process (httpx's ASGI transport) on the test's loop, where
the store was opened; tests/e2e/test_admin.py serves it on its own socket from `serve`."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from lacuna_webhooks.admin import AdminContext, create_admin_app
from lacuna_webhooks.admin.bodies import MAX_BODY_BYTES
from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.base import ScanBudget
from lacuna_webhooks.store.search import encode_cursor
from tests.conftest import TEST_SECRET, admin_context_for, make_event

SECOND = timedelta(seconds=1)
TOKEN = "adm_" + "k" * 40
OTHER_TOKEN = "adm_" + "z" * 40
AUTH = {"authorization": f"Bearer {TOKEN}"}
ENVIRON = {
    "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
    "LACUNA_ADMIN_TOKEN": f"{TOKEN},{OTHER_TOKEN}",
    "LACUNA_HANDLERS": "audit=log,hook=log",
    "LACUNA_HOOK_RATE_LIMIT": "10/s",
    "LACUNA_HOOK_PAUSE_AFTER_FAILURES": "5",
    "LACUNA_HOOK_CONCURRENCY": "2",
}


def admin_context(store: Store) -> AdminContext:
    return admin_context_for(store, ENVIRON)


@pytest.fixture
async def client(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    app = create_admin_app(admin_context(store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin/api/v1", headers=AUTH
    ) as c:
        yield c


def refused(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """The envelope of a refusal with this status (and ``param``)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message", "param"}
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [e["id"] for e in response.json()["data"]]


def event(event_id: str, event_type: str = "job.completed", **data: Any) -> Event:
    return Event.from_body(orjson.dumps(make_event(event_id, event_type, **data)))


async def seed(store: Store) -> datetime:
    """e1..e4 one second apart: e1 audit done (with a result), e2 audit dead, e3/e4 due."""
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    specs = [
        ("e1", "job.completed", {"id": "task_1", "title": "Late Night Study"}),
        ("e2", "job.failed", {"id": "task_1", "title": "Other", "n": 2}),
        ("e3", "job.completed", {"id": "task_2", "title": "Late Night Study", "n": 2}),
        ("e4", "job.progress", {"id": "task_3", "title": "Morning"}),
    ]
    for i, (event_id, event_type, data) in enumerate(specs):
        task = data.pop("id")
        stored = event(event_id, event_type, task_id=task, **data)
        assert await store.accept(stored, ["audit", "hook"], now=t0 + timedelta(seconds=i))
    now = datetime.now(UTC)
    for d in await store.claim(handler="audit", limit=2, lease=timedelta(minutes=5), now=now):
        if d.event.id == "e1":
            ok = Attempt(now, now + timedelta(seconds=0.25), AttemptOutcome.OK, None, {"n": 1})
            assert await store.complete(d, ok)
        else:
            dead = Attempt(now, now + timedelta(seconds=1), AttemptOutcome.DEAD, "410 Gone")
            assert await store.dead(d, dead)
    return t0


# --- auth -------------------------------------------------------------------------------------


async def test_auth_is_required_and_checked(client: httpx.AsyncClient) -> None:
    """No token, a wrong one, one of the wrong length, another scheme: 401 with the envelope
    and WWW-Authenticate; each configured token works; extra spaces around it are fine."""
    cases: list[dict[str, str]] = [
        {},
        {"authorization": f"Bearer {'x' * len(TOKEN)}"},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": "Bearer"},
        {"authorization": TOKEN},
    ]
    for headers in cases:
        response = await client.get("/events", headers={"authorization": "", **headers})
        error = refused(response, 401)
        assert error["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["cache-control"] == "no-store"
    for token in (TOKEN, OTHER_TOKEN):
        ok = await client.get("/events", headers={"authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    spaced = await client.get("/events", headers={"authorization": f"  Bearer    {TOKEN}  "})
    assert spaced.status_code == 200
    assert spaced.headers["cache-control"] == "no-store"


async def test_token_in_query_string_is_refused(client: httpx.AsyncClient) -> None:
    """A credential in the URL is a 400 before anything else, even with a valid header."""
    for name in ("token", "access_token", "api_key", "Token"):
        response = await client.get("/events", params={name: TOKEN})
        assert refused(response, 400)["code"] == "token_in_query"
    response = await client.get("/events", params={"token": TOKEN}, headers={"authorization": ""})
    assert refused(response, 400)["code"] == "token_in_query"


async def test_ambiguous_requests_are_refused(client: httpx.AsyncClient) -> None:
    """Two Authorization headers (which counts?) and a query string that is not UTF-8 once
    percent-decoded (it would search for U+FFFD) are 400s; a trailing slash is a 404, not a
    redirect."""
    both = [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")]
    response = await client.get("/events", headers=both)
    assert refused(response, 400, "authorization")
    response = await client.get("/events?q=%FF")
    assert refused(response, 400)
    response = await client.get("/events/")
    assert refused(response, 404)


# --- GET /events --------------------------------------------------------------------------


async def test_list_events_filters(client: httpx.AsyncClient, store: Store) -> None:
    """Each filter of the query string, and together; newest first."""
    t0 = await seed(store)
    assert ids(await client.get("/events")) == ["e4", "e3", "e2", "e1"]
    assert ids(await client.get("/events", params={"type": "job.completed"})) == ["e3", "e1"]
    assert ids(await client.get("/events", params={"task_id": "task_1"})) == ["e2", "e1"]
    since = (t0 + timedelta(seconds=2)).isoformat()
    assert ids(await client.get("/events", params={"since": since})) == ["e4", "e3"]
    unix = str((t0 + timedelta(seconds=2)).timestamp())
    assert ids(await client.get("/events", params={"until": unix})) == ["e2", "e1"]
    assert ids(await client.get("/events", params={"handler": "audit", "status": "dead"})) == ["e2"]
    assert ids(await client.get("/events", params={"handler": "audit", "status": "due"})) == [
        "e4",
        "e3",
    ]
    assert ids(await client.get("/events", params={"status": "done"})) == ["e1"]
    assert ids(await client.get("/events", params={"handler": "hook"})) == ["e4", "e3", "e2", "e1"]
    match = {"match": "data.title:Late Night Study"}
    assert ids(await client.get("/events", params=match)) == ["e3", "e1"]
    both = [("match", "data.title:Late Night Study"), ("match", "data.n:2")]
    assert ids(await client.get("/events", params=both)) == ["e3"]
    assert ids(await client.get("/events", params={"q": "Morning"})) == ["e4"]
    page = (await client.get("/events", params={"type": "job.failed"})).json()
    (summary,) = page["data"]
    assert set(summary) == {
        "id",
        "type",
        "created",
        "received_at",
        "task_id",
        "superseded",
        "size",
    }
    assert summary["task_id"] == "task_1"
    assert summary["received_at"].endswith("Z")
    assert page["next_cursor"] is None


async def test_list_events_pages(client: httpx.AsyncClient, store: Store) -> None:
    """limit + next_cursor walk every event once, newest first."""
    await seed(store)
    seen: list[str] = []
    params: dict[str, str] = {"limit": "3"}
    while True:
        response = await client.get("/events", params=params)
        seen += ids(response)
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
        params = {"limit": "3", "cursor": cursor}
    assert seen == ["e4", "e3", "e2", "e1"]


async def test_list_events_within_a_time_budget(store: Store) -> None:
    """A search reading payloads stops at its budget (here after every window of 2 events):
    `complete: false`, fewer than `limit` rows (even none) and a cursor; following it gives
    the ids of one unbounded search, in order. An incomplete page's cursor is refused when
    edited and accepted by a search with the default budget; an indexed search stays
    complete; every answer carries `complete`."""
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(12):
        title = "Late Night Study" if i % 5 == 1 else "Other"
        assert await store.accept(event(f"b{i:02d}", title=title), ["audit"], now=t0 + i * SECOND)
    ctx = admin_context(store)
    ctx.search_budget = ScanBudget(0, first_window=2)
    transport = httpx.ASGITransport(app=create_admin_app(ctx))
    async with (
        httpx.AsyncClient(
            transport=transport, base_url="http://admin/api/v1", headers=AUTH
        ) as budgeted,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(admin_context(store))),
            base_url="http://admin/api/v1",
            headers=AUTH,
        ) as default,
    ):
        query = {"match": "data.title:Late Night Study", "limit": "2"}
        whole = await default.get("/events", params={**query, "limit": "500"})
        assert whole.json()["complete"] is True
        expected = ids(whole)
        assert expected == ["b11", "b06", "b01"]
        seen: list[str] = []
        answers: list[dict[str, Any]] = []
        params = dict(query)
        while True:
            response = await budgeted.get("/events", params=params)
            seen += ids(response)
            body = response.json()
            assert set(body) == {"data", "next_cursor", "complete"}
            answers.append(body)
            if body["next_cursor"] is None:
                break
            params = {**query, "cursor": body["next_cursor"]}
        assert seen == expected
        assert any(not a["complete"] and a["data"] == [] for a in answers)
        assert all(a["next_cursor"] is not None for a in answers if not a["complete"])
        cut = next(a for a in answers if not a["complete"])
        rest = await default.get("/events", params={**query, "cursor": cut["next_cursor"]})
        assert rest.status_code == 200
        parts = orjson.loads(base64.urlsafe_b64decode(cut["next_cursor"] + "=="))
        for bad in (
            encode_cursor(*parts[:-1], -1),  # a negative arrival or seq
            encode_cursor(*parts, 1),  # one part too many
            encode_cursor(*parts[:-1], 2**63),  # past 64 bits
        ):
            response = await budgeted.get("/events", params={**query, "cursor": bad})
            refused(response, 400, "cursor")
        indexed = await budgeted.get("/events", params={"type": "job.completed", "limit": "5"})
        assert indexed.json()["complete"] is True
        assert len(ids(indexed)) == 5


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=abc", "limit"),
        ("limit=1&limit=2", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=WzEsMiwzXQ", "cursor"),
        ("since=yesterday", "since"),
        ("until=1e999", "until"),
        ("since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "since"),
        ("status=broken", "status"),
        ("handler=Not-A-Name", "handler"),
        ("match=nocolon", "match"),
        ("match=.a:b", "match"),
        ("type=a&type=b", "type"),
        ("type=", "type"),
        ("q=", "q"),
        ("q=%00", "q"),
        ("typo=1", "typo"),
        # Found by a hostile run: an offset past year 1 or 9999 was a 500 (OverflowError).
        ("since=9999-12-31T23:59:59-01:00", "since"),
        ("until=0001-01-01T00:00:00%2B01:00", "until"),
        ("since=2026-W48", "since"),
        ("since=2026-11-30%2012:00", "since"),
        ("since=2026-11-30T12:00:00", "since"),  # RFC 3339 needs the offset
        ("since=2026-02-30", "since"),
    ],
)
async def test_list_events_bad_parameters(
    client: httpx.AsyncClient, query: str, param: str
) -> None:
    refused(await client.get(f"/events?{query}"), 400, param)


# --- GET /events/{id} and replay -----------------------------------------------------------


async def test_get_event(client: httpx.AsyncClient, store: Store) -> None:
    """The event, its payload and raw body, its deliveries with state, attempts and result."""
    await seed(store)
    body = (await client.get("/events/e1")).json()
    assert body["id"] == "e1"
    assert body["payload"]["data"]["title"] == "Late Night Study"
    assert orjson.loads(body["raw"]) == body["payload"]
    audit, hook = body["deliveries"]
    assert (audit["handler"], audit["status"], audit["state"]) == ("audit", "done", "done")
    assert audit["result"] == {"n": 1}
    (attempt,) = audit["attempt_log"]
    assert attempt["outcome"] == "ok"
    assert attempt["duration_seconds"] == pytest.approx(0.25, abs=1e-3)
    assert (hook["handler"], hook["state"], hook["attempt_log"]) == ("hook", "due", [])
    dead = (await client.get("/events/e2")).json()["deliveries"][0]
    assert (dead["state"], dead["last_error"]) == ("dead", "410 Gone")
    error = refused(await client.get("/events/nope"), 404, "event_id")
    assert error["code"] == "not_found"
    refused(await client.get("/events/e1?x=1"), 400, "x")


async def test_get_event_with_a_body_json_cannot_re_encode(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A stored body that cannot be answered as JSON (nested deeper than the encoder writes,
    a lone surrogate, NULs) is shown as raw text with payload null, never a 500."""
    deep = b'{"id":"deep","type":"t","data":' + b"[" * 300 + b"]" * 300 + b"}"
    lone = b'{"id":"lone","type":"t","data":{"s":"\\ud800"}}'
    nul = b'{"id":"nul","type":"t","data":{"s":"a\\u0000b"}}'
    for event_id, raw in (("deep", deep), ("lone", lone), ("nul", nul)):
        stored = Event(id=event_id, type="t", payload={}, raw=raw)
        assert await store.accept(stored, ["audit"], now=datetime.now(UTC))
    for event_id in ("deep", "lone"):
        body = (await client.get(f"/events/{event_id}")).json()
        assert body["payload"] is None
        assert body["raw"].startswith('{"id":"' + event_id)
    assert (await client.get("/events/nul")).json()["payload"]["data"]["s"] == "a\x00b"
    assert set(ids(await client.get("/events", params={"match": "data.s:a"}))) <= {"nul"}


async def test_replay_event(client: httpx.AsyncClient, store: Store) -> None:
    """No body: every existing delivery is due again; handlers: those (created if missing)."""
    await seed(store)
    response = await client.post("/events/e2/replay")
    assert response.json() == {"event_id": "e2", "replayed": 2}
    states = {
        d["handler"]: d["state"] for d in (await client.get("/events/e2")).json()["deliveries"]
    }
    assert states == {"audit": "due", "hook": "due"}
    response = await client.post("/events/e1/replay", json={"handlers": ["audit"]})
    assert response.json() == {"event_id": "e1", "replayed": 1}
    assert (await client.post("/events/e1/replay", json={})).json()["replayed"] == 2
    refused(await client.post("/events/nope/replay"), 404, "event_id")


async def test_replay_to_a_handler_that_does_not_take_the_type_is_refused(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler whose LACUNA_<NAME>_EVENTS leaves the event's type out: intake made it no
    delivery, so naming it in a replay is a 400 naming it, and nothing is created (as a
    backfill skips it); before, the delivery was created and went dead on a payload it
    was never meant for."""
    monkeypatch.setitem(ENVIRON, "LACUNA_HOOK_EVENTS", "job.failed")
    await store.accept(event("e9", "job.completed"), ["audit"], now=datetime.now(UTC))
    app = create_admin_app(admin_context(store))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin/api/v1", headers=AUTH
    ) as c:
        answer = refused(await c.post("/events/e9/replay", json={"handlers": ["hook"]}), 400)
        assert answer["param"] == "handlers"
        assert "'hook' does not take 'job.completed' events" in answer["message"]
        assert "LACUNA_HOOK_EVENTS" in answer["message"]
        ok = await c.post("/events/e9/replay", json={"handlers": ["audit"]})
        assert ok.json() == {"event_id": "e9", "replayed": 1}
        refused(await c.post("/events/nope/replay", json={"handlers": ["hook"]}), 404, "event_id")
    assert [d.handler for d in await store.list_deliveries(event_id="e9")] == ["audit"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{", None, "invalid_json"),
        (b"[]", None, "invalid_json"),
        (b'"handlers"', None, "invalid_json"),
        (b'{"handlers": "audit"}', "handlers", "invalid_request"),
        (b'{"handlers": []}', "handlers", "invalid_request"),
        (b'{"handlers": [1]}', "handlers", "invalid_request"),
        (b'{"handlers": ["nobody"]}', "handlers", "invalid_request"),
        (b'{"handlers": ["audit"], "x": 1}', "x", "invalid_request"),
        (b"\xff\xfe", None, "invalid_json"),
    ],
)
async def test_replay_bad_bodies(
    client: httpx.AsyncClient, store: Store, body: bytes, param: str | None, code: str
) -> None:
    await seed(store)
    response = await client.post(
        "/events/e1/replay", content=body, headers={"content-type": "application/json"}
    )
    assert refused(response, 400, param)["code"] == code


async def test_bodies_over_the_cap_are_413(client: httpx.AsyncClient) -> None:
    big = b'{"handlers": ["' + b"a" * MAX_BODY_BYTES + b'"]}'
    response = await client.post("/events/e1/replay", content=big)
    assert refused(response, 413)["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    response = await client.post("/deliveries/retry-dead", content=chunks())
    assert refused(response, 413)["code"] == "body_too_large"


# --- deliveries ----------------------------------------------------------------------------


async def test_list_deliveries(client: httpx.AsyncClient, store: Store) -> None:
    """status / handler / event_id filters; newest first; cursor pages."""
    await seed(store)

    async def listed(**params: str) -> list[tuple[str, str]]:
        response = await client.get("/deliveries", params={"limit": "500", **params})
        assert response.status_code == 200, response.text
        assert response.json()["next_cursor"] is None
        return [(d["event_id"], d["handler"]) for d in response.json()["data"]]

    everything = await listed()
    assert len(everything) == 8
    assert everything[0][0] == "e4"
    assert await listed(status="dead") == [("e2", "audit")]
    assert await listed(status="done") == [("e1", "audit")]
    assert await listed(handler="audit", status="pending") == [("e4", "audit"), ("e3", "audit")]
    assert await listed(event_id="e3") == [("e3", "hook"), ("e3", "audit")]
    seen: list[tuple[str, str]] = []
    params = {"limit": "3"}
    while True:
        page = (await client.get("/deliveries", params=params)).json()
        seen += [(d["event_id"], d["handler"]) for d in page["data"]]
        if page["next_cursor"] is None:
            break
        params = {"limit": "3", "cursor": page["next_cursor"]}
    assert seen == everything


async def test_a_well_formed_cursor_made_by_hand_is_a_position_not_a_widening(
    client: httpx.AsyncClient, store: Store
) -> None:
    """docs/admin.md: cursors are not signed; a well-formed one built by hand is taken as
    the position it names, and the page is what follows it in the same search: the filters
    come from the query, never from the cursor, so it shows nothing the token could not
    list anyway (as Stripe's starting_after=<id>)."""
    await seed(store)
    listed = (await client.get("/deliveries", params={"handler": "audit"})).json()["data"]
    assert [d["handler"] for d in listed] == ["audit"] * 4
    for before in (listed[1]["id"], 2**63 - 1):
        page = await client.get(
            "/deliveries", params={"handler": "audit", "cursor": encode_cursor(before)}
        )
        assert page.status_code == 200, page.text
        assert [d["id"] for d in page.json()["data"]] == [
            d["id"] for d in listed if d["id"] < before
        ]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("status=due", "status"),
        ("handler=BAD", "handler"),
        ("event_id=", "event_id"),
        ("limit=-1", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=WyJ4Il0", "cursor"),
        ("cursor=WzBd", "cursor"),
        ("type=job", "type"),
    ],
)
async def test_list_deliveries_bad_parameters(
    client: httpx.AsyncClient, query: str, param: str
) -> None:
    refused(await client.get(f"/deliveries?{query}"), 400, param)


async def test_retry_dead(client: httpx.AsyncClient, store: Store) -> None:
    await seed(store)
    response = await client.post("/deliveries/retry-dead", json={"handler": "hook"})
    assert response.json() == {"handler": "hook", "retried": 0}
    response = await client.post("/deliveries/retry-dead")
    assert response.json() == {"handler": None, "retried": 1}
    assert (await client.get("/deliveries", params={"status": "dead"})).json()["data"] == []
    refused(await client.post("/deliveries/retry-dead", json={"handler": "nobody"}), 400, "handler")
    refused(await client.post("/deliveries/retry-dead", json={"handler": 3}), 400, "handler")
    refused(await client.post("/deliveries/retry-dead", json={"all": True}), 400, "all")


async def test_retry_dead_leaves_a_removed_handlers_deliveries_dead(
    client: httpx.AsyncClient, store: Store
) -> None:
    """A dead delivery of `late`, a handler no longer configured: retrying all dead ones made
    it pending for ever (nothing runs it, and its event is never pruned). It stays dead,
    as replay already leaves a removed handler's deliveries alone."""
    await seed(store)
    stored = event("e_late", "job.completed")
    assert await store.accept(stored, ["late"], now=datetime.now(UTC) - timedelta(minutes=1))
    now = datetime.now(UTC)
    (late,) = await store.claim(handler="late", limit=1, lease=timedelta(minutes=5), now=now)
    assert await store.dead(late, Attempt(now, now, AttemptOutcome.DEAD, "gone"))
    response = await client.post("/deliveries/retry-dead")
    assert response.json() == {"handler": None, "retried": 1}  # audit's, not late's
    dead = (await client.get("/deliveries", params={"status": "dead"})).json()["data"]
    assert [(d["event_id"], d["handler"]) for d in dead] == [("e_late", "late")]


# --- handlers ------------------------------------------------------------------------------


async def test_handlers_health(client: httpx.AsyncClient, store: Store) -> None:
    """Every configured instance with its settings, queue and last hour's figures."""
    await seed(store)
    page = (await client.get("/handlers")).json()
    assert page["next_cursor"] is None
    audit, hook = page["data"]
    assert (audit["name"], audit["kind"], hook["name"], hook["kind"]) == (
        "audit",
        "log",
        "hook",
        "log",
    )
    assert audit["queue"] == {"due": 2, "running": 0, "waiting": 0, "dead": 1}
    assert (audit["attempts"], audit["succeeded"], audit["success_ratio"]) == (2, 1, 0.5)
    assert audit["p50_seconds"] == pytest.approx(0.25, abs=1e-3)
    assert audit["p95_seconds"] == pytest.approx(1.0, abs=1e-3)
    assert audit["last_error"] == "410 Gone"
    assert audit["rate_limit"] is None
    assert audit["concurrency"] == 4
    assert hook["queue"] == {"due": 4, "running": 0, "waiting": 0, "dead": 0}
    assert (hook["attempts"], hook["success_ratio"], hook["p50_seconds"]) == (0, None, None)
    assert hook["rate_limit"] == {"count": 10, "period_seconds": 1.0}
    assert hook["pause_after_failures"] == 5
    assert hook["concurrency"] == 2
    assert (hook["paused"], hook["paused_reason"], hook["consecutive_failures"]) == (
        False,
        None,
        0,
    )


async def test_pause_and_resume(client: httpx.AsyncClient, store: Store) -> None:
    response = await client.post("/handlers/hook/pause", json={"reason": "maintenance"})
    assert response.json() == {"name": "hook", "paused": True, "changed": True}
    again = await client.post("/handlers/hook/pause")
    assert again.json() == {"name": "hook", "paused": True, "changed": False}
    hook = (await client.get("/handlers")).json()["data"][1]
    assert (hook["paused"], hook["paused_reason"]) == (True, "maintenance")
    assert hook["paused_since"] is not None
    assert "hook" in await store.paused_handlers()
    response = await client.post("/handlers/hook/resume")
    assert response.json() == {"name": "hook", "paused": False, "changed": True}
    assert await store.paused_handlers() == {}
    refused(await client.post("/handlers/nobody/pause"), 404, "name")
    refused(await client.post("/handlers/hook/pause", json={"reason": 5}), 400, "reason")
    refused(await client.post("/handlers/hook/pause", json={"reason": ""}), 400, "reason")
    refused(await client.post("/handlers/hook/pause", json={"reason": "  "}), 400, "reason")
    refused(await client.post("/handlers/hook/pause", json={"reason": "x" * 1001}), 400, "reason")
    refused(await client.post("/handlers/hook/resume", json={"reason": "x"}), 400, "reason")
    refused(await client.get("/handlers/hook/pause"), 405)


async def test_store_unavailable_is_503(store: Store, client: httpx.AsyncClient) -> None:
    """A store that does not answer: 503 with the envelope, never a 500."""
    await store.close()
    response = await client.get("/events")
    assert refused(response, 503)["code"] == "store_unavailable"
    refused(await client.get("/handlers"), 503)
    refused(await client.post("/deliveries/retry-dead"), 503)


async def test_a_bugs_500_carries_the_headers_of_every_answer(
    store: Store, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last-resort 500 (a bug: here a store call raising what no store raises) is the
    envelope, kept out of caches like every other answer; on a console path it also carries
    the console's CSP and framing headers."""

    async def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "handler_states", bug, raising=False)
    monkeypatch.setattr(store, "list_events", bug, raising=False)
    monkeypatch.setattr(store, "search_events", bug, raising=False)
    response = await client.get("/events")
    assert refused(response, 500)["code"] == "internal_error"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"
    signed_in = await client.post("http://admin/sign-in", data={"token": TOKEN, "next": "/events"})
    assert signed_in.status_code == 303, signed_in.text
    page = await client.get("http://admin/events")
    assert page.status_code == 500
    assert page.headers["cache-control"] == "no-store"
    assert "default-src" in page.headers["content-security-policy"]


# --- the OpenAPI document ------------------------------------------------------------------


def test_every_route_is_in_the_openapi_document() -> None:
    """Each route of /api/v1 (every area) has its path item and method in the document, and
    every documented operation has a route."""
    from starlette.routing import Mount, Route

    from lacuna_webhooks.store.memory import MemoryStore

    app = create_admin_app(admin_context(MemoryStore()))
    document = app.state.openapi
    (mount,) = [r for r in app.routes if isinstance(r, Mount) and r.path == "/api/v1"]
    routed = {
        # "{event_id:path}" is "{event_id}" in OpenAPI's path templates.
        (re.sub(r":[a-z]+}", "}", route.path), method.lower())
        for route in mount.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }
    routed.discard(("/openapi.json", "get"))
    documented.discard(("/openapi.json", "get"))
    assert routed == documented
    assert document["openapi"].startswith("3.1")
