"""The console in Firefox: Debian's ``firefox-esr`` driven over WebDriver BiDi, its own remote
protocol, over a real ``serve`` (the same site as ``test_console.py``'s Chromium tests).

Playwright's Firefox needs Playwright's patched build (not installable here) or, on its BiDi
channel, a newer Firefox than Debian's ESR (``emulation.setMediaFeaturesOverride`` is missing),
so these tests speak BiDi themselves through ``websockets``: ``session.new``,
``browsingContext.navigate``/``setViewport``/``captureScreenshot``, ``script.evaluate``, and the
``log.entryAdded`` and ``browsingContext.userPromptOpened`` events, which record any console
error (a CSP violation is one) and any dialog an injected script would open.

A user signs in, sees hostile payload text as text, opens an event and replays it, follows
the live tail, and reads the events page on a phone-sized viewport without sideways
scrolling. ``/usr/bin/firefox-esr`` (``apt-get install -y firefox-esr``; ``.ci/run`` installs
it): missing, the tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, make_event
from tests.e2e.conftest import free_port
from tests.e2e.test_console import (  # noqa: F401 (site: the shared serve, a fixture)
    TOKEN,
    XSS_IMG,
    XSS_SCRIPT,
    Site,
    delivery_state,
    site,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

FIREFOX = "/usr/bin/firefox-esr"


def _require_firefox() -> str:
    found = FIREFOX if Path(FIREFOX).exists() else shutil.which("firefox-esr")
    if found is None:
        problem = f"{FIREFOX} is missing (apt-get install -y firefox-esr)"
        if IN_CI:
            pytest.fail(problem + " (CI=true: browser tests fail instead of skipping)")
        pytest.skip(problem)
    return found


class BiDi:
    """A WebDriver BiDi session with one browsing context (a tab, in a user context of its own:
    fresh cookies), synchronous.

    Every event the browser sends while a command is awaited is kept: ``log.entryAdded``
    entries in ``logs``, opened prompts in ``prompts``."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ws = self._stack.enter_context(connect(url, max_size=None, open_timeout=5))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.next_id = 0
        self.logs: list[dict[str, Any]] = []
        self.prompts: list[dict[str, Any]] = []
        self.call("session.new", capabilities={})
        self.call("session.subscribe", events=["log.entryAdded", "browsingContext"])
        # A user context of its own per tab: no cookie (session) carries over between tests.
        self.user_context = self.call("browser.createUserContext")["userContext"]
        created = self.call("browsingContext.create", type="tab", userContext=self.user_context)
        self.context = created["context"]

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("method") == "log.entryAdded":
            self.logs.append(message["params"])
        elif message.get("method") == "browsingContext.userPromptOpened":
            self.prompts.append(message["params"])
            self.ws.send(
                json.dumps(
                    {
                        "id": 10**9 + len(self.prompts),
                        "method": "browsingContext.handleUserPrompt",
                        "params": {"context": message["params"]["context"], "accept": False},
                    }
                )
            )

    def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if message["type"] == "error":
                    raise AssertionError(f"{method}: {message['message']}")
                return message["result"]
            if "id" not in message:
                self._event(message)

    def go(self, url: str) -> None:
        self.call("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a string, number or boolean)."""
        result = self.call(
            "script.evaluate",
            expression=expression,
            target={"context": self.context},
            awaitPromise=True,
        )
        if result["type"] == "exception":
            raise AssertionError(f"{expression}: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(f"!!({expression})"):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        shot = self.call("browsingContext.captureScreenshot", context=self.context)
        path.write_bytes(base64.b64decode(shot["data"]))

    def clean(self) -> None:
        """No dialog opened and nothing went to the console as an error or a CSP report."""
        assert self.prompts == [], f"a dialog opened: {self.prompts}"
        bad = [
            entry.get("text")
            for entry in self.logs
            if entry.get("level") == "error" or "Content-Security-Policy" in str(entry.get("text"))
        ]
        assert bad == [], f"console errors: {bad}"

    def close(self) -> None:
        try:
            self.call("browser.removeUserContext", userContext=self.user_context)
            self.call("session.end")
        finally:
            self._stack.close()


@pytest.fixture(scope="module")
def firefox(site: Site) -> Iterator[str]:  # noqa: F811 (site is the imported fixture)
    """A headless Firefox with a fresh profile; yields its BiDi URL."""
    binary = _require_firefox()
    profile = tempfile.mkdtemp(prefix="lacuna-firefox-")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-remote",
            "--profile",
            profile,
            f"--remote-debugging-port={port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"ws://127.0.0.1:{port}/session"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def tab(firefox: str) -> Iterator[BiDi]:
    bidi = BiDi(firefox)
    try:
        yield bidi
        bidi.clean()
    finally:
        bidi.close()


def attempts_of(site: Site, event_id: str, handler: str) -> int:  # noqa: F811
    """How many attempts the store recorded for a delivery (a replay adds one)."""
    import sqlite3

    with sqlite3.connect(site.serve.workdir / "events.db") as db:
        (count,) = db.execute(
            "SELECT count(*) FROM attempts AS a JOIN deliveries AS d ON d.id = a.delivery_id"
            " WHERE d.event_id = ? AND d.handler = ?",
            (event_id, handler),
        ).fetchone()
    return int(count)


def sign_in(tab: BiDi, site: Site, path: str = "/events") -> None:  # noqa: F811
    tab.go(site.admin_url + path)
    assert "/sign-in" in tab.js("location.pathname")
    tab.js(
        f"document.querySelector('#token').value = {json.dumps(TOKEN)};"
        "document.querySelector('main button[type=submit]').click()"
    )
    tab.wait_for(f"location.pathname === {json.dumps(path)}", what=f"{path} after sign-in")
    tab.wait_for("document.readyState === 'complete'", what="the page to load")


def test_sign_in_and_hostile_text_stays_text(site: Site, tab: BiDi) -> None:  # noqa: F811
    sign_in(tab, site)
    cells = "[...document.querySelectorAll('table.events td')].map(td => td.textContent)"
    texts = tab.js(f"JSON.stringify({cells})")
    assert XSS_SCRIPT in json.loads(texts)
    assert XSS_IMG in json.loads(texts)
    assert tab.js("document.querySelectorAll('main img, main script').length") == 0
    tab.screenshot(site.shots / "firefox-events.png")


def test_open_an_event_and_replay(site: Site, tab: BiDi) -> None:  # noqa: F811
    sign_in(tab, site)
    tab.go(site.admin_url + "/event?id=evt_console_ok")
    assert tab.js("document.querySelector('p.lead').textContent") == "Morning Focus Mix"
    assert delivery_state(site, "evt_console_ok", "probe") == ("done", 1)
    before = attempts_of(site, "evt_console_ok", "probe")
    tab.js(
        "[...document.querySelectorAll('section.delivery button')]"
        ".find(b => b.textContent.includes('Replay probe')).click()"
    )
    tab.wait_for("location.search.includes('done=replayed')", what="the replay to be accepted")
    deadline = time.monotonic() + 30
    while attempts_of(site, "evt_console_ok", "probe") != before + 1:
        assert time.monotonic() < deadline, "the replayed delivery did not run"
        time.sleep(0.2)
    assert delivery_state(site, "evt_console_ok", "probe") == ("done", 1)


def test_live_tail_follows_or_says_it_cannot(site: Site, tab: BiDi) -> None:  # noqa: F811
    sign_in(tab, site, "/tail")
    tab.wait_for(
        "!document.getElementById('tail-status').textContent.startsWith('Connecting')",
        what="the tail to connect",
    )
    if site.status_of("/api/v1/stream") == 200:
        site.send(make_event("evt_console_firefox_live", title=XSS_IMG))
        tab.wait_for(
            "[...document.querySelectorAll('#tail-rows a')]"
            ".some(a => a.textContent === 'evt_console_firefox_live')",
            what="the new event in the live tail",
        )
        title = "document.querySelector('#tail-rows tr').querySelectorAll('td')[3].textContent"
        assert tab.js(title) == XSS_IMG
        assert tab.js("document.querySelectorAll('#tail-rows img').length") == 0
    else:
        assert "not available" in tab.js("document.getElementById('tail-status').textContent")
        # Firefox reports the refused stream on the console: that is this case, not a fault.
        tab.logs = [e for e in tab.logs if "/api/v1/stream" not in str(e.get("text"))]


def test_readable_on_a_phone(site: Site, tab: BiDi) -> None:  # noqa: F811
    tab.call(
        "browsingContext.setViewport",
        context=tab.context,
        viewport={"width": 390, "height": 844},
        devicePixelRatio=2,
    )
    sign_in(tab, site)
    for path in ("/events", "/event?id=evt_console_img", "/handlers", "/dead"):
        tab.go(site.admin_url + path)
        overflow = tab.js("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{path} scrolls sideways on a phone by {overflow}px"
    tab.screenshot(site.shots / "firefox-phone-dead.png")
