"""The console in a real browser: Debian's chromium driven by Playwright, over a real
``serve`` process (intake, dispatcher, handler workers, the admin listener) and its SQLite
store.

A user signs in, searches, opens an event, replays it and sees the new attempt appear,
pauses and resumes a handler, retries a dead delivery, follows the live tail (which must
degrade to a message when the stream is not served) and reads the activity chart; hostile
payload text (``<script>alert(1)</script>``, ``"><img src=x onerror=alert(1)>``) stays
visible text and no dialog ever opens. The page screenshots are written beside the test's
files, and to ``docs/console/`` when ``LACUNA_CONSOLE_SCREENSHOTS=1``.

Chromium: ``/usr/bin/chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it),
never a browser downloaded by ``playwright install``. Missing, it skips the tests, except
under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI, make_event, signed
from tests.e2e.conftest import REPO, Serve, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TOKEN = "adm_console_e2e_" + "q" * 32
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror=alert(1)>'
HANDLERS = "probe=tests.e2e.console_plugin:Probe,log"
DOCS_SHOTS = REPO / "docs" / "console"


def _require_browser() -> Any:
    """The Playwright module, when it and Debian's chromium are here; else skip (or fail
    under CI=true)."""
    problem = None
    try:
        from playwright import sync_api
    except ImportError as exc:
        problem = f"Playwright for Python is not installed: {exc}"
    if problem is None and not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        problem = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if problem is not None:
        if IN_CI:
            pytest.fail(problem + " (CI=true: browser tests fail instead of skipping)")
        pytest.skip(problem)
    return sync_api


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Site:
    """What the tests share: the serve process, the admin URL, the probe's fail list."""

    def __init__(self, serve: Serve, admin_url: str, fail_path: Path, shots: Path) -> None:
        self.serve = serve
        self.admin_url = admin_url
        self.fail_path = fail_path
        self.shots = shots

    def send(self, event: dict[str, Any]) -> None:
        body, headers = signed(event)
        answer = httpx.post(self.serve.webhook_url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text

    def status_of(self, path: str) -> int:
        """The status code of an admin ``GET`` with the bearer token (the body unread: the
        stream never ends)."""
        with httpx.stream(
            "GET", self.admin_url + path, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
        ) as answer:
            return answer.status_code


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The ``serve`` every console test uses (in Chromium here, in Firefox in
    ``test_console_firefox.py``); each browser's own fixture checks that browser is here."""
    workdir = tmp_path_factory.mktemp("console")
    fail_path = workdir / "fail.txt"
    fail_path.write_text("evt_console_img\nevt_console_broken\n")
    database_url = f"sqlite:///{workdir / 'events.db'}"
    env = {
        "LACUNA_DATABASE_URL": database_url,
        "LACUNA_ADMIN_TOKEN": TOKEN,
        "LACUNA_HANDLERS": HANDLERS,
        "LACUNA_PROBE_FAIL_PATH": str(fail_path),
        "LACUNA_POLL_INTERVAL": "0.2",
    }
    admin_port = free_port()
    serve = Serve(workdir, {**env, "LACUNA_ADMIN_PORT": str(admin_port)}).start()
    admin_url = f"http://127.0.0.1:{admin_port}"
    wait_until(lambda: _answers(admin_url + "/sign-in"), what="the admin listener")
    shots = workdir / "screenshots"
    shots.mkdir()
    site = Site(serve, admin_url, fail_path, shots)
    try:
        site.send(make_event("evt_console_ok", title="Morning Focus Mix", task_id="cm_ok"))
        site.send(make_event("evt_console_failed", "job.failed", task_id="cm_failed"))
        site.send(make_event("evt_console_script", title=XSS_SCRIPT, task_id="cm_script"))
        site.send(make_event("evt_console_img", title=XSS_IMG, task_id="cm_img"))
        site.send(make_event("evt_console_broken", title="Rainy Day Jazz", task_id="cm_broken"))
        wait_until(
            lambda: delivery_state(site, "evt_console_img", "probe") == ("dead", 1),
            what="the probe's delivery of evt_console_img to die",
        )
        yield site
    finally:
        serve.stop()
    if os.environ.get("LACUNA_CONSOLE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, DOCS_SHOTS / shot.name)


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    sync_api = _require_browser()
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page whose dialogs (an ``alert`` from injected markup would open one) and CSP
    violations are recorded, so a test can assert there were none."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.csp: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", self._console)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.csp.append(message.text)

    def clean(self) -> None:
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.csp == [], f"the CSP blocked something: {self.csp}"


@pytest.fixture
def page(site: Site, browser: Any) -> Iterator[Watched]:
    context = browser.new_context(base_url=site.admin_url, viewport={"width": 1280, "height": 900})
    watched = Watched(context.new_page())
    try:
        yield watched
        watched.clean()
    finally:
        context.close()


def sign_in(page: Any, path: str = "/events") -> None:
    page.goto(path)
    assert "/sign-in" in page.url
    page.fill("#token", TOKEN)
    page.click("main button[type=submit]")
    page.wait_for_url(f"**{path}*")


def delivery_state(site: Site, event_id: str, handler: str) -> tuple[str, int] | None:
    """(status, attempts) of a delivery, read from the store's own file."""
    import sqlite3

    with sqlite3.connect(site.serve.workdir / "events.db") as db:
        row = db.execute(
            "SELECT status, attempts FROM deliveries WHERE event_id = ? AND handler = ?",
            (event_id, handler),
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def test_sign_in_search_and_hostile_text(site: Site, page: Watched) -> None:
    p = page.page
    p.goto("/events")
    p.wait_for_url("**/sign-in?next=*")
    p.screenshot(path=site.shots / "sign-in.png")
    sign_in(p)
    rows = p.locator("table.events tbody tr")
    assert rows.count() >= 4
    # Newest first; each handler's status at a glance.
    order = [text.split()[2] for text in rows.all_inner_texts()]
    assert order.index("evt_console_img") < order.index("evt_console_ok")
    img_row = rows.filter(has_text="evt_console_img")
    assert "probe dead" in " ".join(img_row.inner_text().split())
    # The hostile titles are on the page as text, not as elements.
    assert p.get_by_text(XSS_SCRIPT, exact=True).is_visible()
    assert p.get_by_text(XSS_IMG, exact=True).is_visible()
    assert p.locator("main img").count() == 0
    p.screenshot(path=site.shots / "events.png", full_page=True)

    p.fill("input[name=q]", "Morning Focus")
    p.click("form.search button[type=submit]")
    p.wait_for_url("**/events?*q=Morning+Focus*")
    assert p.locator("table.events tbody tr").count() == 1
    assert "evt_console_ok" in p.locator("table.events").inner_text()
    p.select_option("select[name=handler]", "probe")
    p.select_option("select[name=status]", "dead")
    p.fill("input[name=q]", "")
    p.click("form.search button[type=submit]")
    p.wait_for_url("**/events?*status=dead*")
    found = p.locator("table.events tbody tr").all_inner_texts()
    assert sorted(t.split()[2] for t in found) == ["evt_console_broken", "evt_console_img"]
    p.fill("input[name=since]", "not a time")
    p.click("form.search button[type=submit]")
    assert "since must be RFC 3339" in p.locator("p.error").inner_text()


def test_open_an_event_replay_and_see_the_new_attempt(site: Site, page: Watched) -> None:
    p = page.page
    sign_in(p)
    p.click("a:text('evt_console_script')")
    p.wait_for_url("**/event?id=evt_console_script")
    assert p.locator("p.lead").inner_text() == XSS_SCRIPT
    payload = p.locator("pre.payload").inner_text()
    assert f'"title": "{XSS_SCRIPT}"' in payload  # pretty-printed, and text
    wait_until(
        lambda: delivery_state(site, "evt_console_script", "probe") == ("done", 1),
        what="the probe's first delivery",
    )
    p.reload()
    probe = p.locator("section.delivery", has_text="Replay probe")
    assert probe.locator("table.attempts tbody tr").count() == 1
    # The result: the http link is an anchor; the storage location, hostile, is text.
    link = probe.locator("table.result a")
    assert link.get_attribute("href") == "https://files.example/tasks/evt_console_script"
    assert probe.get_by_text(f"s3://archive/{XSS_SCRIPT}/", exact=True).is_visible()
    p.screenshot(path=site.shots / "event.png", full_page=True)

    probe.locator("button", has_text="Replay probe").click()
    p.wait_for_url("**/event?id=evt_console_script&done=replayed")
    assert "Replay requested" in p.locator(".notice").inner_text()
    # The page reads the deliveries and then their attempts (not one snapshot): it can show
    # the new attempt a moment before the delivery's new state. Wait for both.
    deadline = time.monotonic() + 30
    while (
        probe.locator("table.attempts tbody tr").count() < 2
        or "done" not in probe.locator(".badge").first.inner_text()
    ):
        assert time.monotonic() < deadline, "the replay's attempt did not appear"
        time.sleep(0.3)
        p.reload()
    assert probe.locator("table.attempts tbody tr").count() == 2


def test_dead_delivery_shows_its_error_as_text_and_retries(site: Site, page: Watched) -> None:
    p = page.page
    sign_in(p, "/dead")
    row = p.locator("table.dead tbody tr", has_text="evt_console_img")
    assert row.count() == 1
    error = f"refused {XSS_IMG}: the archive said 422"
    assert error in row.locator("td.pre").inner_text()
    assert p.locator("main img").count() == 0
    p.screenshot(path=site.shots / "dead.png", full_page=True)

    site.fail_path.write_text("evt_console_broken\n")  # evt_console_img's cause is fixed
    row.locator("button", has_text="Retry").click()
    p.wait_for_url("**/dead?done=retried")
    wait_until(
        lambda: delivery_state(site, "evt_console_img", "probe") == ("done", 1),
        what="the retried delivery to succeed",
    )
    p.goto("/event?id=evt_console_img")
    probe = p.locator("section.delivery", has_text="Replay probe")
    attempts = probe.locator("table.attempts tbody tr")
    assert attempts.count() == 2
    assert attempts.nth(0).locator("td").nth(3).inner_text() == "dead"
    assert attempts.nth(1).locator("td").nth(3).inner_text() == "ok"
    # The old attempt's error is there, as text.
    assert error in attempts.nth(0).locator("td.pre").inner_text()


def test_pause_and_resume_a_handler(site: Site, page: Watched) -> None:
    p = page.page
    sign_in(p, "/handlers")
    card = p.locator("section.handler", has=p.locator("h2", has_text="probe"))
    card.locator("button", has_text="Pause").click()
    p.wait_for_url("**/handlers?done=paused")
    assert "paused" in card.locator(".badge").first.inner_text()
    site.send(make_event("evt_console_while_paused", title="Held back"))
    time.sleep(1.0)  # several poll intervals: a paused handler claims nothing
    assert delivery_state(site, "evt_console_while_paused", "probe") == ("pending", 0)
    p.reload()
    assert "due 1" in " ".join(card.locator("dd.queue").inner_text().split())
    p.screenshot(path=site.shots / "handlers.png", full_page=True)
    card.locator("button", has_text="Resume").click()
    p.wait_for_url("**/handlers?done=resumed")
    wait_until(
        lambda: delivery_state(site, "evt_console_while_paused", "probe") == ("done", 1),
        what="the held delivery to run after resume",
    )


def test_live_tail_degrades_or_follows(site: Site, page: Watched) -> None:
    """Where /api/v1/stream is served, a new event appears at the top; where it is not
    (404), the page says so instead of spinning."""
    p = page.page
    sign_in(p, "/tail")
    status = p.locator("#tail-status")
    p.wait_for_function(
        "() => !document.getElementById('tail-status').textContent.startsWith('Connecting')",
        timeout=15000,
    )
    streaming = site.status_of("/api/v1/stream") == 200
    if streaming:
        site.send(make_event("evt_console_live", title=XSS_SCRIPT))
        p.wait_for_selector("#tail-rows a:text('evt_console_live')", timeout=15000)
        row = p.locator("#tail-rows tr").first
        assert row.locator("td").nth(3).inner_text() == XSS_SCRIPT  # text, not markup
        assert p.locator("#tail-rows script").count() == 0
        # A right-to-left override or a zero-width space is shown as its escape, as on the
        # server-rendered pages (present.shown), not applied.
        site.send(make_event("evt_console_live_bidi", title="Late \u202ethgiN\u200b"))
        p.wait_for_selector("#tail-rows a:text('evt_console_live_bidi')", timeout=15000)
        title = p.locator("#tail-rows tr").first.locator("td").nth(3).inner_text()
        assert title == "Late \\u202ethgiN\\u200b"
    else:
        assert "not available" in status.inner_text()
    p.screenshot(path=site.shots / "tail.png")


def test_activity_chart(site: Site, page: Watched) -> None:
    p = page.page
    sign_in(p, "/activity")
    assert p.locator("svg rect.accepted").count() == 12
    heights = [float(r.get_attribute("height") or 0) for r in p.locator("svg rect.accepted").all()]
    assert heights[-1] > 0  # this hour's events
    failing = p.locator("svg rect.failed").last.get_attribute("height")
    assert float(failing or 0) > 0  # evt_console_broken stays dead
    p.screenshot(path=site.shots / "activity.png", full_page=True)


def test_readable_on_a_phone(site: Site, browser: Any) -> None:
    context = browser.new_context(
        base_url=site.admin_url,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    try:
        watched = Watched(context.new_page())
        p = watched.page
        sign_in(p)
        for path, name in [("/events", "phone-events.png"), ("/event?id=evt_console_img", None)]:
            p.goto(path)
            overflow = p.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, f"{path} scrolls sideways on a phone by {overflow}px"
            if name:
                p.screenshot(path=site.shots / name, full_page=False)
        watched.clean()
    finally:
        context.close()


def test_console_pages_never_hold_up_intake(site: Site) -> None:
    """The admin listener shares ``serve``'s event loop with the webhook route: while two
    clients keep rendering the page of a ~1 MB payload that orjson cannot print (an integer
    past 64 bits), webhooks are still answered promptly: rendering runs on a worker thread
    and the pure-Python printer is not used on payloads that large."""
    items = ",".join(f'[{i},"x"]' for i in range(60_000))
    body = (
        '{"id":"evt_console_big","object":"event","type":"job.completed","created":1,'
        f'"data":{{"id":"cm_big","status":"ready","n":12345678901234567890123,"items":[{items}]}}}}'
    ).encode()
    assert len(body) < 1_048_576
    body, headers = signed(body)
    assert httpx.post(site.serve.webhook_url, content=body, headers=headers).status_code == 200

    with httpx.Client(base_url=site.admin_url, timeout=30) as login:
        assert login.post("/sign-in", data={"token": TOKEN}).status_code == 303
        cookies = dict(login.cookies)
    stop = threading.Event()
    rendered: list[float] = []
    wrong: list[str] = []

    def render_loop() -> None:
        with httpx.Client(base_url=site.admin_url, cookies=cookies, timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                answer = client.get("/event", params={"id": "evt_console_big"})
                if answer.status_code != 200 or "12345678901234567890123" not in answer.text:
                    wrong.append(f"{answer.status_code}: {answer.text[:300]}")
                    return
                rendered.append(time.monotonic() - started)

    def intake(prefix: str) -> list[float]:
        latencies = []
        for i in range(15):
            body, headers = signed(make_event(f"evt_console_{prefix}_{i}"))
            started = time.monotonic()
            answer = httpx.post(site.serve.webhook_url, content=body, headers=headers, timeout=30)
            latencies.append(time.monotonic() - started)
            assert answer.status_code == 200
        return latencies

    alone = intake("alone")
    loaders = [threading.Thread(target=render_loop, daemon=True) for _ in range(2)]
    for loader in loaders:
        loader.start()
    try:
        wait_until(lambda: len(rendered) >= 1, what="a first render of the big event")
        busy = intake("busy")
        in_flight = len(rendered)
    finally:
        stop.set()
        for loader in loaders:
            loader.join(60)
    assert wrong == []
    assert in_flight >= 2, "the console was not kept busy"
    # Bounds for something that should happen promptly, not measurements, relative to the
    # same webhooks without the console busy (a shared 2-core machine varies): rendering
    # on the loop held nearly every webhook for a whole render, 1 to 4 s.
    alone.sort()
    busy.sort()
    report = f"alone {alone}, busy {busy}, renders {rendered}"
    assert busy[len(busy) // 2] < alone[len(alone) // 2] + 0.5, report
    assert busy[-1] < alone[-1] + 1.5, report
