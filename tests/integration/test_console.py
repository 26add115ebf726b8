"""The console over HTTP, without a browser: sign-in, the session redirect, CSRF refusals,
the Content-Security-Policy, and hostile event text rendered as text.

The admin app runs in-process over a real store (SQLite here; every backend for the
escaping test), reached through httpx's ASGI transport on the test's own event loop.
Browser behaviour (scripts, dialogs, the live tail) is in ``tests/e2e/test_console.py``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from lacuna_webhooks.admin import AdminContext, create_admin_app
from lacuna_webhooks.admin.auth import SESSION_COOKIE
from lacuna_webhooks.admin.console.web import CSP
from lacuna_webhooks.config import Settings
from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.plugins import build_handlers
from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.base import ScanBudget
from tests.conftest import TEST_SECRET, make_event

TOKEN = "adm_console_test_" + "k" * 32
NOW = datetime.now(UTC).replace(microsecond=0)
HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
PAGES = ["/events", "/event?id=evt_1", "/dead", "/handlers", "/tail", "/activity"]
FORMS = ["/event/replay", "/dead/retry", "/handlers/pause", "/handlers/resume", "/sign-out"]


def context(store: Store, **extra: str) -> AdminContext:
    env = {
        "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
        "LACUNA_ADMIN_TOKEN": TOKEN,
        "LACUNA_HANDLERS": "log,archive=log",
        **extra,
    }
    handlers = build_handlers(["log", "archive=log"], env)
    return AdminContext(Settings.from_env(env), store, handlers.without_instances())


async def accept(store: Store, payload: dict[str, Any] | bytes, handlers: list[str]) -> Event:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    event = Event.from_body(body)
    assert await store.accept(event, handlers, now=NOW)
    return event


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 'events.db'}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def client(store: Store, base_url: str = "http://console.test", **extra: str) -> httpx.AsyncClient:
    app = create_admin_app(context(store, **extra))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


async def sign_in(http: httpx.AsyncClient) -> str:
    """Sign in; return the CSRF token of the session (read from a page's form)."""
    answer = await http.post("/sign-in", data={"token": TOKEN, "next": "/handlers"})
    assert answer.status_code == 303, answer.text
    page = await http.get("/handlers")
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, page.text
    return found.group(1)


@pytest.mark.parametrize("path", PAGES)
async def test_every_page_redirects_to_sign_in_without_a_session(
    sqlite_store: Store, path: str
) -> None:
    """No cookie, or a forged one: 303 to /sign-in with the page to come back to."""
    async with client(sqlite_store) as http:
        for cookies in ({}, {SESSION_COOKIE: "9999999999.forged"}):
            http.cookies.clear()
            http.cookies.update(cookies)
            answer = await http.get(path)
            assert answer.status_code == 303
            location = answer.headers["location"]
            assert location.startswith("/sign-in?next=")
            assert httpx.URL(location).params["next"] == path


@pytest.mark.parametrize("path", FORMS)
async def test_every_form_refuses_without_a_session(sqlite_store: Store, path: str) -> None:
    await accept(sqlite_store, make_event("evt_1"), ["log"])
    async with client(sqlite_store) as http:
        answer = await http.post(path, data={"name": "log", "id": "evt_1", "handler": "log"})
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/sign-in")
    assert not any(s.paused for s in await sqlite_store.handler_states())


async def test_a_trailing_slash_is_the_404_page_not_a_redirect(sqlite_store: Store) -> None:
    """`/events/` was a 307 to a URL built from the Host header."""
    async with client(sqlite_store, base_url="http://evil.example") as http:
        await sign_in(http)
        answer = await http.get("/events/")
        assert answer.status_code == 404
        assert "location" not in answer.headers


async def test_sign_in_sets_a_strict_http_only_cookie(sqlite_store: Store) -> None:
    async with client(sqlite_store) as http:
        wrong = await http.post("/sign-in", data={"token": "adm_" + "z" * 40})
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        assert "not an admin token" in wrong.text
        answer = await http.post("/sign-in", data={"token": TOKEN, "next": "/dead"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/dead"
        cookie = answer.headers["set-cookie"].lower()
        assert cookie.startswith(SESSION_COOKIE + "=")
        for part in ("httponly", "samesite=strict", "path=/"):
            assert part in cookie
        assert "secure" not in cookie  # plain http: a Secure cookie would never come back
        assert (await http.get("/dead")).status_code == 200
        # The sign-in page of a signed-in user goes on to the page asked for.
        again = await http.get("/sign-in", params={"next": "/tail"})
        assert (again.status_code, again.headers["location"]) == (303, "/tail")


async def test_sign_in_from_another_site_is_refused(sqlite_store: Store) -> None:
    async with client(sqlite_store) as http:
        answer = await http.post(
            "/sign-in", data={"token": TOKEN}, headers={"sec-fetch-site": "cross-site"}
        )
        assert answer.status_code == 403
        assert "set-cookie" not in answer.headers
        # What a browser sends from the console's own (no-referrer) page is accepted.
        same = await http.post(
            "/sign-in",
            data={"token": TOKEN},
            headers={"sec-fetch-site": "same-origin", "origin": "null"},
        )
        assert same.status_code == 303


async def test_sign_in_over_https_sets_a_secure_cookie(sqlite_store: Store) -> None:
    async with client(sqlite_store, "https://console.test") as http:
        answer = await http.post("/sign-in", data={"token": TOKEN})
        assert answer.status_code == 303
        assert "secure" in answer.headers["set-cookie"].lower()


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/x", "/\\evil", "/api/v1/events"]
)
async def test_sign_in_never_redirects_off_the_console(sqlite_store: Store, target: str) -> None:
    async with client(sqlite_store) as http:
        answer = await http.post("/sign-in", data={"token": TOKEN, "next": target})
        assert (answer.status_code, answer.headers["location"]) == (303, "/events")


@pytest.mark.parametrize("path", ["/sign-in", "/events", "/api/v1/events", "/api/v1/handlers"])
async def test_a_cookie_with_non_ascii_digits_is_no_session_not_a_500(
    sqlite_store: Store, path: str
) -> None:
    """`Cookie: lacuna_session=\\xb2\\xb3.abc` (read as latin-1: "²³", which isdigit() takes
    and int() refuses): every page and API route answered 500 with a logged traceback, so
    any app on the same host could lock the operator out with one cookie."""
    app = create_admin_app(context(sqlite_store))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as http:
        cookie = SESSION_COOKIE.encode() + b"=\xb2\xb3.abc"  # raw bytes, not UTF-8
        answer = await http.get(path, headers={b"cookie": cookie})
    assert answer.status_code in (200, 303, 401), answer.text


async def test_retrying_a_removed_handlers_dead_deliveries_is_refused(
    sqlite_store: Store,
) -> None:
    """The dead page offered "Retry all of late" for a handler no longer configured; it made
    them pending for ever. A 400 page now, and they stay dead."""
    await accept(sqlite_store, make_event("evt_late"), ["late"])
    now = datetime.now(UTC)
    (d,) = await sqlite_store.claim(handler="late", limit=1, lease=timedelta(minutes=1), now=now)
    assert await sqlite_store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, "gone"))
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        answer = await http.post("/dead/retry", data={"csrf": csrf, "handler": "late"})
        assert answer.status_code == 400
        assert "not a configured handler" in html.unescape(answer.text)
    (row,) = await sqlite_store.list_deliveries(event_id="evt_late")
    assert row.status.value == "dead"


async def test_sign_out_ends_the_session(sqlite_store: Store) -> None:
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        answer = await http.post("/sign-out", data={"csrf": csrf})
        assert answer.status_code == 303
        assert SESSION_COOKIE not in http.cookies
        assert (await http.get("/events")).status_code == 303


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/handlers/pause", {"name": "log"}),
        ("/handlers/resume", {"name": "log"}),
        ("/event/replay", {"id": "evt_1"}),
        ("/dead/retry", {"handler": "log"}),
        ("/sign-out", {}),
    ],
)
async def test_forms_without_the_csrf_token_are_refused(
    sqlite_store: Store, path: str, form: dict[str, str]
) -> None:
    """A missing, wrong or other session's CSRF token: 403, nothing changes."""
    await accept(sqlite_store, make_event("evt_1"), ["log"])
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        for presented in (None, "", "0" * 64, csrf[:-1] + ("0" if csrf[-1] != "0" else "1")):
            data = dict(form) if presented is None else {**form, "csrf": presented}
            answer = await http.post(path, data=data)
            assert answer.status_code == 403, (presented, answer.text)
            assert "CSRF" in answer.text
        # From another site, even with the right token: refused before the body is read.
        for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}):
            cross = await http.post(path, data={**form, "csrf": csrf}, headers=headers)
            assert cross.status_code == 403
        assert (await http.get("/events")).status_code == 200  # still signed in
    assert not any(s.paused for s in await sqlite_store.handler_states())
    deliveries = await sqlite_store.list_deliveries(event_id="evt_1")
    assert [d.updated_at for d in deliveries] == [NOW]


async def test_pause_and_resume_with_the_csrf_token(sqlite_store: Store) -> None:
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        answer = await http.post("/handlers/pause", data={"name": "archive", "csrf": csrf})
        assert (answer.status_code, answer.headers["location"]) == (303, "/handlers?done=paused")
        assert (await sqlite_store.paused_handlers()).keys() == {"archive"}
        page = await http.get("/handlers?done=paused")
        assert "Handler paused." in page.text
        assert "paused from the console" in page.text
        assert (
            await http.post("/handlers/resume", data={"name": "archive", "csrf": csrf})
        ).status_code == 303
        assert await sqlite_store.paused_handlers() == {}
        unknown = await http.post("/handlers/pause", data={"name": "nope", "csrf": csrf})
        assert unknown.status_code == 404


async def test_every_console_answer_carries_the_csp(sqlite_store: Store) -> None:
    """Pages, redirects, refusals, 404s and the static files alike."""
    async with client(sqlite_store) as http:
        answers = [
            await http.get("/sign-in"),
            await http.get("/events"),  # 303
            await http.get("/static/console.css"),
            await http.get("/static/tail.js"),
            await http.get("/no-such-page"),
            await http.get("/sign-out"),  # 405: only POST signs out
        ]
        csrf = await sign_in(http)
        answers += [await http.get(p) for p in PAGES]
        answers.append(await http.post("/handlers/pause", data={"name": "log"}))  # 403
        answers.append(await http.post("/handlers/pause", data={"name": "log", "csrf": csrf}))
    for answer in answers:
        assert answer.headers["content-security-policy"] == CSP, answer.url
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in CSP
    assert "script-src 'self'" in CSP
    assert {a.status_code for a in answers} >= {200, 303, 403, 404, 405}


async def test_pages_have_no_inline_script_or_style(sqlite_store: Store) -> None:
    await accept(sqlite_store, make_event("evt_1"), ["log"])
    async with client(sqlite_store) as http:
        await sign_in(http)
        for path in ["/sign-in", *PAGES]:
            text = (await http.get(path)).text
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), path
            assert "<style" not in text, path
            assert " style=" not in text, path
            assert not re.search(r"\son[a-z]+=", text), path


async def test_hostile_text_is_escaped_on_every_backend(store: Store) -> None:
    """Titles, ids, errors and results that hold markup come out as text on every page;
    only http(s) result values become links."""
    for i, title in enumerate(HOSTILE):
        await accept(store, make_event(f"evt_{i}<b>bold</b>", title=title), ["log"])
    await accept(
        store,
        json.dumps(
            {
                "id": "evt_odd",
                "type": "job.completed",
                "data": {"title": "nul\x00here", "n": 10**60},
            },
            ensure_ascii=True,
        ).encode(),
        ["log"],
    )
    claimed = await store.claim(handler="log", limit=10, lease=timedelta(minutes=1), now=NOW)
    for delivery in claimed:
        if delivery.event.id == "evt_0<b>bold</b>":
            await store.complete(
                delivery,
                Attempt(
                    NOW,
                    NOW,
                    AttemptOutcome.OK,
                    result={
                        "location": "s3://bucket/<script>alert(2)</script>/",
                        "link": "javascript:alert(3)",
                        "file": "https://files.example/a?b=<i>&c=1",
                    },
                ),
            )
        else:
            await store.dead(
                delivery, Attempt(NOW, NOW, AttemptOutcome.DEAD, error=HOSTILE[1] + " failed")
            )
    async with client(store) as http:
        await sign_in(http)
        pages = [
            await http.get("/events"),
            await http.get("/events", params={"q": "<script>"}),
            await http.get("/event", params={"id": "evt_0<b>bold</b>"}),
            await http.get("/event", params={"id": "evt_1<b>bold</b>"}),
            await http.get("/event", params={"id": "evt_odd"}),
            await http.get("/dead"),
            await http.get("/handlers"),
        ]
    for page in pages:
        assert page.status_code == 200, (page.url, page.text)
        for raw in [*HOSTILE, "<b>bold</b>", "<script>alert(2)", "<i>"]:
            assert raw not in page.text, (page.url, raw)
    one = pages[2].text
    assert html.escape(HOSTILE[0], quote=False) in one
    assert "&lt;b&gt;bold&lt;/b&gt;" in one
    assert 'href="https://files.example/a?b=&lt;i&gt;&amp;c=1"' in one
    assert 'href="javascript' not in one
    assert "javascript:alert(3)</code>" in one
    assert "s3://bucket/&lt;script&gt;" in one
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt; failed" in pages[3].text
    assert "1" + "0" * 60 in pages[4].text  # the big number as sent
    assert "\\u0000" in pages[4].text
    assert "evt_0&lt;b&gt;bold&lt;/b&gt;" in pages[1].text  # the search found it
    # Links to an event carry its id percent-encoded.
    assert 'href="/event?id=evt_0%3Cb%3Ebold%3C%2Fb%3E"' in pages[0].text


async def test_invisible_and_bidi_text_is_shown_as_escapes_on_every_backend(store: Store) -> None:
    """A title, type, error or result holding a right-to-left override (Trojan Source), a
    zero-width space or a terminal escape is displayed with those characters as ``\\uXXXX``
    (the payload stays the same JSON), so that no value can pass for another or reverse what
    follows it; a form's hidden value keeps the exact text, to post back."""
    hidden = "\u202e", "\u200b", "\u2066", "\ufeff", "\x1b", "\U000e0041"
    body = make_event("evt_bidi", title="Late \u202ethgiN\u200b \U000e0041")
    body["type"] = "job.completed\u2066x"
    event = await accept(store, body, ["log", "archive"])
    claimed = await store.claim(handler="log", limit=1, lease=timedelta(minutes=1), now=NOW)
    await store.dead(
        claimed[0], Attempt(NOW, NOW, AttemptOutcome.DEAD, error="bad \x1b[31m\u202eorre")
    )
    claimed = await store.claim(handler="archive", limit=1, lease=timedelta(minutes=1), now=NOW)
    await store.complete(
        claimed[0], Attempt(NOW, NOW, AttemptOutcome.OK, result={"file": "a\ufeffb\u202e.mp3"})
    )
    async with client(store) as http:
        await sign_in(http)
        listing = (await http.get("/events")).text
        one = (await http.get("/event", params={"id": event.id})).text
        dead = (await http.get("/dead")).text
    for page in (listing, one, dead):
        assert [c for c in hidden if c in page] == [], [
            page[max(0, page.index(c) - 80) : page.index(c) + 20] for c in hidden if c in page
        ]
    assert "Late \\u202ethgiN\\u200b \\udb40\\udc41" in listing
    assert "job.completed\\u2066x" in listing
    assert "job.completed\\u2066x" in dead
    assert "bad \\u001b[31m\\u202eorre" in one
    assert "bad \\u001b[31m\\u202eorre" in dead
    assert "a\\ufeffb\\u202e.mp3" in one
    payload = re.search(r'<pre class="payload">(.*?)</pre>', one, re.DOTALL)
    assert payload is not None
    assert json.loads(html.unescape(payload.group(1))) == body  # the same JSON


async def test_search_filters_and_bad_filters(sqlite_store: Store) -> None:
    for i in range(3):
        await accept(sqlite_store, make_event(f"evt_{i}", task_id=f"cm_{i}"), ["log"])
    await accept(sqlite_store, make_event("evt_f", "job.failed", task_id="cm_f"), ["log"])
    async with client(sqlite_store) as http:
        await sign_in(http)
        found = await http.get("/events", params={"type": "job.failed", "q": "", "since": ""})
        assert found.status_code == 200
        assert "evt_f" in found.text
        assert "evt_1" not in found.text
        by_task = await http.get("/events", params={"task_id": "cm_1"})
        assert "evt_1" in by_task.text
        assert "evt_2" not in by_task.text
        bad = await http.get("/events", params={"since": "yesterday"})
        assert bad.status_code == 400
        assert "since must be RFC 3339" in bad.text
        stale = await http.get("/events", params={"cursor": "not-a-cursor"})
        assert stale.status_code == 400
        # An edited cursor past 64 bits (base64 of [1.0, 2**63]) was an overflow: a 500.
        forged = await http.get("/events", params={"cursor": "WzEuMCwgOTIyMzM3MjAzNjg1NDc3NTgwOF0"})
        assert forged.status_code == 400
        # Newest first, a page at a time, with an "older" link that keeps the filter.
        first = await http.get("/events", params={"limit": "2", "type": "job.completed"})
        ids = re.findall(r'href="/event\?id=(evt_\w+)"', first.text)
        assert ids == ["evt_2", "evt_1"]
        older = re.search(r'href="(/events\?[^"]+)" rel="next"', first.text)
        assert older
        second = await http.get(html.unescape(older.group(1)))
        assert re.findall(r'href="/event\?id=(evt_\w+)"', second.text) == ["evt_0"]


async def test_search_stopped_by_its_budget_says_so(sqlite_store: Store) -> None:
    """A payload search cut by its budget (one window of 2 events a page) shows the rows
    found, "Searched up to <time>; more may match" and a Next link; following Next pages
    reaches every match once, in order, and the last page has no such line."""
    for i in range(9):
        title = "Late Night Study" if i % 4 == 0 else "Other"
        await accept(sqlite_store, make_event(f"evt_{i}", task_id=f"cm_{i}", title=title), [])
    ctx = context(sqlite_store)
    ctx.search_budget = ScanBudget(0, first_window=2)
    app = create_admin_app(ctx)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://console.test"
    ) as http:
        await sign_in(http)
        page = await http.get("/events", params={"q": "Late Night", "limit": "5"})
        seen: list[str] = []
        notes = 0
        while True:
            assert page.status_code == 200, page.text
            seen += re.findall(r'href="/event\?id=(evt_\w+)"', page.text)
            more = re.search(r'href="(/events\?[^"]+)" rel="next">([^<]+)<', page.text)
            if "more may match" in page.text:
                notes += 1
                assert re.search(r"Searched up to <time datetime=\"[^\"]+\">", page.text)
                assert more
                assert more.group(2) == "Next"
            if more is None:
                break
            page = await http.get(html.unescape(more.group(1)))
        assert seen == ["evt_8", "evt_4", "evt_0"]
        assert notes >= 2
        assert "No events match" not in page.text


async def test_replay_and_retry_dead(sqlite_store: Store) -> None:
    await accept(sqlite_store, make_event("evt_1"), ["log", "archive"])
    await accept(sqlite_store, make_event("evt_2"), ["log"])
    for delivery in await sqlite_store.claim(
        handler="log", limit=5, lease=timedelta(minutes=1), now=NOW
    ):
        await sqlite_store.dead(delivery, Attempt(NOW, NOW, AttemptOutcome.DEAD, error="boom"))
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        dead = await http.get("/dead")
        assert dead.text.count('action="/dead/retry"') == 3  # all of log, and each delivery
        one = await http.post("/dead/retry", data={"csrf": csrf, "id": "evt_1", "handler": "log"})
        assert one.headers["location"] == "/dead?done=retried"
        left = await sqlite_store.list_deliveries(handler="log")
        assert {d.event_id: d.status.value for d in left} == {"evt_1": "pending", "evt_2": "dead"}
        assert (
            await http.post("/dead/retry", data={"csrf": csrf, "handler": "log"})
        ).status_code == 303
        assert all(d.status.value == "pending" for d in await sqlite_store.list_deliveries())
        replay = await http.post(
            "/event/replay", data={"csrf": csrf, "id": "evt_2", "handler": "archive"}
        )
        assert replay.headers["location"] == "/event?id=evt_2&done=replayed"
        handlers = {d.handler for d in await sqlite_store.list_deliveries(event_id="evt_2")}
        assert handlers == {"log", "archive"}
        missing = await http.post("/event/replay", data={"csrf": csrf, "id": "evt_nope"})
        assert missing.status_code == 404
        unknown = await http.post(
            "/event/replay", data={"csrf": csrf, "id": "evt_2", "handler": "x"}
        )
        assert unknown.status_code == 400


async def test_replay_of_all_handlers_leaves_a_removed_handlers_deliveries(
    sqlite_store: Store,
) -> None:
    """The console's replay without a handler resets the configured handlers' deliveries
    only, as the API does: a removed handler's (``gone``) made pending would never run."""
    await accept(sqlite_store, make_event("evt_r"), ["log", "gone"])
    for name in ("log", "gone"):
        for d in await sqlite_store.claim(
            handler=name, limit=5, lease=timedelta(minutes=1), now=NOW
        ):
            assert await sqlite_store.complete(d, Attempt(NOW, NOW, AttemptOutcome.OK, None))
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        replay = await http.post("/event/replay", data={"csrf": csrf, "id": "evt_r"})
        assert replay.headers["location"] == "/event?id=evt_r&done=replayed"
    states = {d.handler: d.status.value for d in await sqlite_store.list_deliveries()}
    assert states == {"log": "pending", "gone": "done"}


async def test_activity_chart_counts_the_last_hours(sqlite_store: Store) -> None:
    now = datetime.now(UTC)
    await accept(sqlite_store, make_event("evt_a"), ["log"])
    event = Event.from_body(orjson.dumps(make_event("evt_old")))
    assert await sqlite_store.accept(event, ["log"], now=now - timedelta(hours=3))
    for delivery in await sqlite_store.claim(
        handler="log", limit=5, lease=timedelta(minutes=1), now=now
    ):
        if delivery.event.id == "evt_old":
            await sqlite_store.dead(delivery, Attempt(now, now, AttemptOutcome.DEAD, error="x"))
    async with client(sqlite_store) as http:
        await sign_in(http)
        page = await http.get("/activity")
    assert page.status_code == 200
    assert "<svg" in page.text
    rows = re.findall(
        r"<tr><td data-label=\"Hour\">([^<]+)</td><td[^>]*>(\d+)</td><td[^>]*>(\d+)</td></tr>",
        page.text,
    )
    assert len(rows) == 12
    counts = {hour: (int(a), int(f)) for hour, a, f in rows}
    hour = lambda t: t.strftime("%Y-%m-%d %H:00")  # noqa: E731
    if NOW.hour == now.hour:  # evt_a was accepted at NOW, at the test module's import
        assert counts[hour(now)] == (1, 0)
    assert counts[hour(now - timedelta(hours=3))] == (1, 1)
    assert sum(a for a, _ in counts.values()) == 2


async def test_store_down_is_a_503_page(tmp_path: Path) -> None:
    from lacuna_webhooks.store.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    async with client(store) as http:
        await sign_in(http)
        store.unavailable = True
        answer = await http.get("/events")
    assert answer.status_code == 503
    assert "unavailable" in answer.text
    assert answer.headers["content-security-policy"] == CSP


async def test_handlers_page_shows_backlog_and_the_last_hour(sqlite_store: Store) -> None:
    now = datetime.now(UTC)
    for i in range(3):
        await accept(sqlite_store, make_event(f"evt_{i}"), ["log", "archive"])
    claimed = await sqlite_store.claim(handler="log", limit=2, lease=timedelta(minutes=1), now=now)
    await sqlite_store.complete(
        claimed[0], Attempt(now, now + timedelta(seconds=2), AttemptOutcome.OK)
    )
    await sqlite_store.dead(
        claimed[1], Attempt(now, now, AttemptOutcome.DEAD, error=HOSTILE[0] + " went wrong")
    )
    async with client(sqlite_store) as http:
        await sign_in(http)
        page = await http.get("/handlers")
    assert page.status_code == 200
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.text))
    log = text[text.index(" log ") : text.index(" archive ")]
    archive = text[text.index(" archive ") :]
    assert "due 1 running 0 waiting 0 dead 1" in log
    assert "Attempts, last hour 2" in log
    assert "Succeeded 1 (50%)" in log
    assert "&lt;script&gt;alert(1)&lt;/script&gt; went wrong" in log
    assert HOSTILE[0] not in page.text
    assert "due 3 running 0 waiting 0 dead 0" in archive


async def test_a_form_with_too_many_fields_is_413_not_a_500(sqlite_store: Store) -> None:
    """parse_qsl's field cap raised ValueError out of every console form: a 500 and an
    error-level traceback, on /sign-in without any credentials. Now the 413 page."""
    crowded = "token=x" + "&a=1" * 100
    headers = {"content-type": "application/x-www-form-urlencoded"}
    async with client(sqlite_store) as http:
        answer = await http.post("/sign-in", content=crowded, headers=headers)
        assert answer.status_code == 413
        assert "Form too large." in answer.text
        csrf = await sign_in(http)
        answer = await http.post(
            "/handlers/pause", content=f"name=archive&csrf={csrf}" + "&a=1" * 100, headers=headers
        )
        assert answer.status_code == 413
        assert "Form too large." in answer.text
    assert await sqlite_store.paused_handlers() == {}


async def test_a_nul_in_a_query_or_form_value_is_a_400_page_on_every_backend(
    store: Store,
) -> None:
    """NUL in an id, a handler or any other value of a page's query or a form: the 400 page,
    nothing changed; PostgreSQL cannot take NUL as a parameter, and answered 503 (the store
    'unavailable') for this bad input."""
    await accept(store, make_event("evt_1"), ["log"])
    async with client(store) as http:
        csrf = await sign_in(http)
        for path in ("/event?id=%00", "/event?id=evt_1%00", "/dead?handler=a%00b", "/events?q=%00"):
            answer = await http.get(path)
            assert answer.status_code == 400, (path, answer.status_code)
            assert "NUL" in answer.text
        for path, form in (
            ("/event/replay", {"id": "\x00"}),
            ("/event/replay", {"id": "evt_1", "handler": "log\x00"}),
            ("/dead/retry", {"id": "\x00"}),
            ("/dead/retry", {"handler": "a\x00b"}),
        ):
            answer = await http.post(path, data={**form, "csrf": csrf})
            assert answer.status_code == 400, (path, form, answer.status_code)
        assert (await http.get("/event?id=evt_1")).status_code == 200  # still signed in
    (delivery,) = await store.list_deliveries(event_id="evt_1")
    assert (delivery.status, delivery.updated_at) == ("pending", NOW)


async def test_no_delivery_to_a_handler_that_does_not_take_the_type(sqlite_store: Store) -> None:
    """LACUNA_ARCHIVE_EVENTS=job.failed: a job.completed event's page offers no "Deliver to
    archive", and a form asking for it anyway is the 400 page, nothing created (as the
    API refuses it and a backfill skips it)."""
    await accept(sqlite_store, make_event("evt_1"), ["log"])
    async with client(sqlite_store, LACUNA_ARCHIVE_EVENTS="job.failed") as http:
        csrf = await sign_in(http)
        page = await http.get("/event?id=evt_1")
        assert page.status_code == 200
        assert "Deliver to archive" not in page.text
        answer = await http.post(
            "/event/replay", data={"csrf": csrf, "id": "evt_1", "handler": "archive"}
        )
        assert answer.status_code == 400
        assert "LACUNA_ARCHIVE_EVENTS" in html.unescape(answer.text)
    assert [d.handler for d in await sqlite_store.list_deliveries(event_id="evt_1")] == ["log"]


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/dead/retry", {}),  # no handler: was every dead delivery of every handler
        ("/dead/retry", {"delivery": "abc"}),
        ("/dead/retry", {"id": "evt_1"}),
        ("/dead/retry", {"handler": ["log", "archive"]}),
        ("/dead/retry", {"handler": "log", "id": ["evt_1", "evt_2"]}),
        ("/dead/retry", {"handler": "log", "extra": "1"}),
        ("/event/replay", {}),
        ("/event/replay", {"id": "evt_1", "handler": ["log", "archive"]}),
        ("/event/replay", {"id": ["evt_1", "evt_2"]}),
        ("/event/replay", {"id": "evt_1", "handlers": "log"}),
        ("/handlers/pause", {"name": ["log", "archive"]}),
        ("/handlers/pause", {"name": "log", "reason": "x"}),
        ("/handlers/pause", {}),
        ("/handlers/resume", {"name": ["archive", "log"]}),
        ("/sign-out", {"next": "/events"}),
    ],
)
async def test_a_form_with_missing_unknown_or_repeated_fields_is_a_400_page(
    sqlite_store: Store, path: str, form: dict[str, Any]
) -> None:
    """A console form names exactly what it acts on: one without its field, with a field no
    page sends, or with a field twice is the 400 page and nothing is written; it was read
    as the widest action (retry every handler's dead deliveries) or the last value."""
    for event_id in ("evt_1", "evt_2"):
        await accept(sqlite_store, make_event(event_id), ["log", "archive"])
    now = datetime.now(UTC)
    for handler in ("log", "archive"):
        for claimed in await sqlite_store.claim(
            handler=handler, limit=10, lease=timedelta(minutes=5), now=now
        ):
            dead = Attempt(now, now, AttemptOutcome.DEAD, "410 Gone")
            assert await sqlite_store.dead(claimed, dead)
    before = sorted(
        (d.event_id, d.handler, d.status, d.updated_at)
        for d in await sqlite_store.list_deliveries(limit=100)
    )
    async with client(sqlite_store) as http:
        csrf = await sign_in(http)
        answer = await http.post(path, data={**form, "csrf": csrf})
        assert answer.status_code == 400, answer.text
        assert answer.headers["content-type"].startswith("text/html")
        assert answer.headers["content-security-policy"] == CSP
        # The same form with a query string is refused too.
        query = await http.post(path + "?handler=log", data={"csrf": csrf, "name": "log"})
        assert query.status_code == 400
        assert (await http.get("/handlers")).status_code == 200  # still signed in
    after = sorted(
        (d.event_id, d.handler, d.status, d.updated_at)
        for d in await sqlite_store.list_deliveries(limit=100)
    )
    assert after == before
    assert await sqlite_store.paused_handlers() == {}


async def test_sign_in_refuses_unknown_or_repeated_fields(sqlite_store: Store) -> None:
    async with client(sqlite_store) as http:
        for form in ({"token": [TOKEN, "x"]}, {"token": TOKEN, "remember": "1"}):
            answer = await http.post("/sign-in", data=form)
            assert answer.status_code == 400, answer.text
            assert SESSION_COOKIE not in answer.cookies


async def test_pages_read_their_query_by_the_apis_rules(sqlite_store: Store) -> None:
    """A console page's query is read as the API reads it: a parameter given twice or one
    it does not take is a 400 with the API's message, on the page (it took the last value,
    or ignored the typo and widened the search); a query string that is not UTF-8 or holds
    a credential is an HTML page with the console's headers, not the API's JSON envelope.
    Empty inputs of the search form and the pages' own parameters still work."""
    await accept(sqlite_store, make_event("evt_1"), ["log"])
    async with client(sqlite_store) as http:
        await sign_in(http)
        for path, message in (
            ("/events?type=a&type=b", "type may be given once."),
            ("/events?foo=bar", "Unknown parameter &#39;foo&#39;."),
            ("/events?limit=1&limit=2", "limit may be given once."),
            ("/event?id=evt_1&id=evt_2", "id may be given once."),
            ("/event?id=evt_1&x=1", "Unknown parameter &#39;x&#39;."),
            ("/dead?handler=log&handler=archive", "handler may be given once."),
            ("/handlers?name=log", "Unknown parameter &#39;name&#39;."),
            ("/tail?from=beginning", "Unknown parameter &#39;from&#39;."),
            ("/sign-in?next=/events&next=/dead", "next may be given once."),
        ):
            answer = await http.get(path)
            assert answer.status_code == 400, (path, answer.status_code)
            assert message in answer.text, (path, answer.text)
            assert answer.headers["content-security-policy"] == CSP
        for path in ("/events?q=%FF", "/sign-in?next=%FF", "/dead?token=x", "/nope?q=%FF"):
            answer = await http.get(path)
            assert answer.status_code == 400, (path, answer.status_code)
            assert answer.headers["content-type"].startswith("text/html"), path
            assert answer.headers["content-security-policy"] == CSP, path
            assert answer.headers["x-frame-options"] == "DENY", path
        for path in (
            "/events?type=job.completed&q=&since=&until=&handler=&status=&match=&limit=5",
            "/event?id=evt_1&done=replayed",
            "/dead?handler=log&done=retried",
            "/handlers?done=paused",
        ):
            answer = await http.get(path)
            assert answer.status_code == 200, (path, answer.text)
    async with client(sqlite_store) as http:  # the API is unchanged: its envelope
        answer = await http.get("/api/v1/events?q=%FF")
        assert answer.status_code == 401 or answer.headers["content-type"] == "application/json"
        assert "content-security-policy" not in answer.headers
