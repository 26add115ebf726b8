"""Handler instances (SPEC §6): ``NAME=KIND`` items, per-instance settings and overrides."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from lacuna_webhooks.cli import main
from lacuna_webhooks.config import Settings, split_handler_item
from lacuna_webhooks.dispatch.workers import worker_specs
from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.handlers._common import stored_location
from lacuna_webhooks.handlers.base import RecordingHandler, current_results
from lacuna_webhooks.handlers.email import compose
from lacuna_webhooks.handlers.http import HTTPHandler
from lacuna_webhooks.handlers.slack import build_message
from lacuna_webhooks.models import DeliveryStatus, Event
from lacuna_webhooks.plugins import HandlerSet, build_handlers
from lacuna_webhooks.retry import RetryPolicy
from lacuna_webhooks.store.memory import MemoryStore
from tests.conftest import make_event
from tests.dispatching import FakeClock, make_dispatcher, running, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TWO_HTTP = {
    "LACUNA_HANDLERS": "app=http,analytics=http,log",
    "LACUNA_APP_URL": "http://127.0.0.1:9/app",
    "LACUNA_APP_SECRET": SECRET,
    "LACUNA_ANALYTICS_URL": "http://127.0.0.1:9/analytics",
    "LACUNA_ANALYTICS_SECRET": SECRET,
    "LACUNA_ANALYTICS_PAYLOAD": "enriched",
}


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("http", (None, "http")),
        ("app=http", ("app", "http")),
        (" app = http ", ("app", "http")),
        ("hook=pkg.mod:Hook", ("hook", "pkg.mod:Hook")),
        ("pkg.mod:Hook", (None, "pkg.mod:Hook")),
    ],
)
def test_split_handler_item(item: str, expected: tuple[str | None, str]) -> None:
    """An item is KIND or NAME=KIND; a plain KIND names no instance of its own."""
    assert split_handler_item(item) == expected


def test_two_instances_of_one_kind_read_their_own_settings() -> None:
    """``app=http,analytics=http`` builds two http handlers, each from LACUNA_<NAME>_*."""
    settings = Settings.from_env(TWO_HTTP, require_secret=False)
    built = build_handlers(settings.handlers, settings.environ)
    try:
        assert built.names == ["app", "analytics", "log"]
        assert built.kinds == {"app": "http", "analytics": "http", "log": "log"}
        app, analytics = built.handlers["app"], built.handlers["analytics"]
        assert isinstance(app, HTTPHandler)
        assert isinstance(analytics, HTTPHandler)
        assert (app.name, analytics.name) == ("app", "analytics")
        assert str(app.url).endswith("/app")
        assert str(analytics.url).endswith("/analytics")
        assert (app.payload, analytics.payload) == ("event", "enriched")
    finally:
        asyncio.run(built.aclose())


def test_worker_specs_pair_each_instance_with_its_own_item() -> None:
    """Each worker process rebuilds its instance from its own item, matched by name."""
    settings = Settings.from_env(TWO_HTTP, require_secret=False)
    built = build_handlers(settings.handlers, settings.environ)
    try:
        specs = worker_specs(settings, built)
        assert [(s.name, s.item) for s in specs] == [
            ("app", "app=http"),
            ("analytics", "analytics=http"),
            ("log", "log"),
        ]
        for spec in specs:
            again = build_handlers([spec.item], spec.environ)
            assert again.names == [spec.name]
            asyncio.run(again.aclose())
    finally:
        asyncio.run(built.aclose())


@pytest.mark.parametrize(
    ("handlers", "message"),
    [
        ("app=http,app=log", "LACUNA_HANDLERS names 'app' twice"),
        ("log,log=log", "LACUNA_HANDLERS names 'log' twice"),
        ("App=http", "LACUNA_HANDLERS item 'App=http': an instance NAME is a lowercase letter"),
        ("9x=http", "an instance NAME is a lowercase letter"),
        ("app=", "item 'app=' names no handler kind"),
        ("app=Http", "LACUNA_HANDLERS names 'Http': a handler kind is lowercase"),
        # Not package.module:attr either: a URL pasted here was imported ("No module named
        # 'postgresql'") and quoted whole, password and all.
        (
            "app=postgresql://app:Zq8pLwX3@db/x",
            "LACUNA_HANDLERS names 'postgresql://db/…': a handler kind is lowercase",
        ),
        ("a:b:c", "LACUNA_HANDLERS names 'a:b:c': a handler kind is lowercase"),
        ("pkg.mod:", "LACUNA_HANDLERS names 'pkg.mod:': a handler kind is lowercase"),
    ],
)
def test_bad_instance_items_are_one_line(handlers: str, message: str) -> None:
    """Two instances with one name, a bad NAME or KIND: a bad setting, one line each."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LACUNA_HANDLERS": handlers}, require_secret=False)
    assert len(info.value.problems) == 1
    assert message in info.value.problems[0]


def test_two_instances_one_name_found_only_when_loaded() -> None:
    """A ``package.module:attr`` item's name is known once loaded: build_handlers refuses
    the clash with an explicit NAME as a bad setting."""
    items = ["log=log", "lacuna_webhooks.handlers.log:LogHandler"]
    Settings.from_env({"LACUNA_HANDLERS": ",".join(items)}, require_secret=False)
    with pytest.raises(ConfigError, match="names the handler 'log' twice"):
        build_handlers(items, {})


def test_unknown_kind_under_a_name_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        build_handlers(["app=nosuch"], {})
    assert info.value.problems[0].startswith("LACUNA_HANDLERS names unknown handler 'nosuch'")


def test_overrides_default_to_the_global_values() -> None:
    """Unset LACUNA_<NAME>_CONCURRENCY / _RETRY_* take the global values; set ones win."""
    env = {
        "LACUNA_APP_CONCURRENCY": "9",
        "LACUNA_APP_RETRY_MAX_ATTEMPTS": "2",
        "LACUNA_APP_RETRY_BASE_DELAY": "0.5",
        "LACUNA_APP_RETRY_MAX_DELAY": "30",
        "LACUNA_OTHER_RETRY_MAX_DELAY": "7",
    }
    glob = RetryPolicy(max_attempts=6, base_delay_seconds=3.0, max_delay_seconds=100.0)
    built = build_handlers(["app=log", "other=log", "log"], env, concurrency=4, policy=glob)
    assert built.concurrency == {"app": 9, "other": 4, "log": 4}
    assert built.policies["app"] == RetryPolicy(2, 0.5, 30.0)
    assert built.policies["other"] == RetryPolicy(6, 3.0, 7.0)
    assert built.policies["log"] == glob


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("LACUNA_APP_CONCURRENCY", "0", "LACUNA_APP_CONCURRENCY must be greater than 0"),
        ("LACUNA_APP_CONCURRENCY", "2.5", "LACUNA_APP_CONCURRENCY must be a whole number"),
        ("LACUNA_APP_RETRY_MAX_ATTEMPTS", "x", "LACUNA_APP_RETRY_MAX_ATTEMPTS must be a whole"),
        ("LACUNA_APP_RETRY_BASE_DELAY", "nan", "LACUNA_APP_RETRY_BASE_DELAY must be a finite"),
        ("LACUNA_APP_RETRY_BASE_DELAY", "inf", "LACUNA_APP_RETRY_BASE_DELAY must be a finite"),
        ("LACUNA_APP_RETRY_MAX_DELAY", "1", "LACUNA_APP_RETRY_MAX_DELAY (1) must not be smaller"),
        # Upper bounds, as the global settings have: a typo must not become "never".
        ("LACUNA_APP_CONCURRENCY", "100000", "LACUNA_APP_CONCURRENCY must be at most 1000"),
        ("LACUNA_APP_RETRY_MAX_ATTEMPTS", "10000000", "LACUNA_APP_RETRY_MAX_ATTEMPTS must be at"),
        ("LACUNA_APP_RETRY_MAX_ATTEMPTS", "9" * 5000, "LACUNA_APP_RETRY_MAX_ATTEMPTS must be a"),
        ("LACUNA_APP_RETRY_BASE_DELAY", "1e12", "LACUNA_APP_RETRY_BASE_DELAY must be at most"),
        ("LACUNA_APP_RETRY_MAX_DELAY", "1e300", "LACUNA_APP_RETRY_MAX_DELAY must be at most"),
    ],
)
def test_bad_overrides_stop_the_start(var: str, value: str, message: str) -> None:
    """Validated at start, naming the variable: the global base delay is 5 s here."""
    with pytest.raises(ConfigError) as info:
        build_handlers(["app=log"], {var: value}, policy=RetryPolicy(base_delay_seconds=5.0))
    assert info.value.problems[0].startswith(message)


def test_every_bad_override_of_every_instance_is_reported_together() -> None:
    """One ConfigError, one line per bad LACUNA_<NAME>_* value, the flow-control ones and
    the handler's own missing setting included: a bad CONCURRENCY used to hide the rest."""
    env = {
        "LACUNA_APP_URL": "http://127.0.0.1:9/app",
        "LACUNA_APP_SECRET": SECRET,
        "LACUNA_APP_CONCURRENCY": "100000",
        "LACUNA_APP_RETRY_MAX_ATTEMPTS": "x",
        "LACUNA_APP_RETRY_BASE_DELAY": "1e12",
        "LACUNA_APP_TIMEOUT": "1e9",
        "LACUNA_APP_RATE_LIMIT": "10000000/s",
        "LACUNA_APP_PAUSE_AFTER_FAILURES": "0",
        "LACUNA_OTHER_CONCURRENCY": "0",
    }
    with pytest.raises(ConfigError) as info:
        build_handlers(["app=http", "other=http"], env)
    named = sorted(problem.split()[0] for problem in info.value.problems)
    assert named == [
        "LACUNA_APP_CONCURRENCY",
        "LACUNA_APP_PAUSE_AFTER_FAILURES",
        "LACUNA_APP_RATE_LIMIT",
        "LACUNA_APP_RETRY_BASE_DELAY",
        "LACUNA_APP_RETRY_MAX_ATTEMPTS",
        "LACUNA_APP_TIMEOUT",
        "LACUNA_OTHER_CONCURRENCY",
        "LACUNA_OTHER_SECRET",  # the handler's own settings, each of them (only URL was)
        "LACUNA_OTHER_URL",
    ]


@pytest.mark.parametrize(
    ("suffix", "value", "problem"),
    [
        ("CONCURRENCY", "1_0", "must be a whole number, got '1_0'"),
        (
            "CONCURRENCY",
            "\uff11\uff10",
            "must be a whole number, got '\uff11\uff10'",
        ),  # fullwidth digits
        ("RETRY_MAX_ATTEMPTS", "9" * 5000, "must be a whole number of at most 18 digits"),
        ("TIMEOUT", "1e9", "must be at most 86400, got '1e9'"),
        ("TIMEOUT", "soon", "must be a number, got 'soon'"),
    ],
)
def test_overrides_are_read_and_worded_as_the_global_settings(
    suffix: str, value: str, problem: str
) -> None:
    """``LACUNA_<NAME>_X`` takes what ``LACUNA_HANDLER_X``/``LACUNA_X`` takes, and says the
    same line about what it refuses (int() alone took ``1_0``, fullwidth digits, and said
    "Exceeds the limit (4300 digits) for integer string conversion" for a long one)."""
    glob = {"CONCURRENCY": "LACUNA_HANDLER_CONCURRENCY", "TIMEOUT": "LACUNA_HANDLER_TIMEOUT"}
    with pytest.raises(ConfigError) as info:
        build_handlers(["app=log"], {f"LACUNA_APP_{suffix}": value})
    assert info.value.problems == [f"LACUNA_APP_{suffix} {problem}"]
    variable = glob.get(suffix, f"LACUNA_{suffix}")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: value}, require_secret=False)
    assert info.value.problems == [f"{variable} {problem}"]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_bad_global_and_handler_settings_are_reported_together(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve`/`worker` with a bad global setting, a bad *_FILE and a bad handler
    override: one line listing all three (the handlers used to be checked only once the
    global settings were good, so a second start showed the rest)."""
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    env = {
        "LACUNA_WEBHOOK_SECRET": SECRET,
        "LACUNA_DATABASE_URL": "postgresql://127.0.0.1:9/none",
        "LACUNA_HANDLER_CONCURRENCY": "0",
        "LACUNA_ADMIN_TOKEN_FILE": str(fifo),
        "LACUNA_HANDLERS": "app=http",
        "LACUNA_APP_SECRET": SECRET,
        "LACUNA_APP_RETRY_MAX_ATTEMPTS": "x",
    }
    assert main([command], environ=env) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    for variable in (
        "LACUNA_HANDLER_CONCURRENCY",
        "LACUNA_ADMIN_TOKEN_FILE",
        "LACUNA_APP_URL",
        "LACUNA_APP_RETRY_MAX_ATTEMPTS",
    ):
        assert variable in line


# -- the dispatcher honours them -------------------------------------------------------------

T0 = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


def _set(*handlers: RecordingHandler, **extra: object) -> HandlerSet:
    base = HandlerSet.of(handlers)
    return dataclasses.replace(base, **extra)  # type: ignore[arg-type]


async def test_each_instance_has_its_own_concurrency(store: MemoryStore) -> None:
    """``a`` may run 1 attempt at once, ``b`` 3, while the global value is 2."""
    clock = FakeClock(T0)
    a, b = RecordingHandler("a"), RecordingHandler("b")
    a.block, b.block = asyncio.Event(), asyncio.Event()
    handlers = _set(a, b, concurrency={"a": 1, "b": 3})
    d = make_dispatcher(
        store, handlers, clock, policy=RetryPolicy(), poll_interval_seconds=0.02, concurrency=2
    )
    for _ in range(5):
        event = Event.from_body(orjson.dumps(make_event()))
        assert await store.accept(event, ["a", "b"], now=clock())
    async with running(d):
        await wait_until(lambda: len(a.calls) == 1 and len(b.calls) == 3)
        await asyncio.sleep(0.05)  # room to overrun, were the limits not held
        assert (len(a.calls), len(b.calls)) == (1, 3)
        a.block.set()
        b.block.set()
        await d.drain()
    assert (len(a.calls), len(b.calls)) == (5, 5)


async def test_each_instance_has_its_own_retry_schedule(store: MemoryStore) -> None:
    """``a`` is dead after its own 2 attempts; ``b`` keeps the global 4."""
    clock = FakeClock(T0)
    a = RecordingHandler("a", script=[ValueError("x")] * 10)
    b = RecordingHandler("b", script=[ValueError("x")] * 10)
    handlers = _set(a, b, policies={"a": RetryPolicy(2, 1.0, 1.0)})
    d = make_dispatcher(
        store, handlers, clock, policy=RetryPolicy(4, 1.0, 1.0), poll_interval_seconds=0.02
    )
    event = Event.from_body(orjson.dumps(make_event()))
    assert await store.accept(event, ["a", "b"], now=clock())
    async with running(d):
        for _ in range(5):
            await d.drain()
            clock.advance(5)
        await d.drain()
    rows = {r.handler: r for r in await store.list_deliveries()}
    assert (rows["a"].status, rows["a"].attempts) == (DeliveryStatus.DEAD, 2)
    assert (rows["b"].status, rows["b"].attempts) == (DeliveryStatus.DEAD, 4)


class _Returning(RecordingHandler):
    async def handle(self, event: Event) -> dict[str, object] | None:  # type: ignore[override]
        await super().handle(event)
        return {"location": f"file:///srv/{event.id}/", "tracks": []}


async def test_a_returned_object_is_recorded_as_the_result(store: MemoryStore) -> None:
    """What handle() returns is stored with the completed delivery (SPEC §6); a handler
    returning nothing records None."""
    clock = FakeClock(T0)
    returning, plain = _Returning("storage"), RecordingHandler("plain")
    d = make_dispatcher(
        store, [returning, plain], clock, policy=RetryPolicy(), poll_interval_seconds=0.02
    )
    event = Event.from_body(orjson.dumps(make_event("evt_result_1")))
    assert await store.accept(event, ["storage", "plain"], now=clock())
    async with running(d):
        await d.drain()
    rows = {r.handler: r for r in await store.list_deliveries()}
    assert rows["storage"].status is DeliveryStatus.DONE
    assert rows["storage"].result == {"location": "file:///srv/evt_result_1/", "tracks": []}
    assert rows["plain"].result is None


# -- LACUNA_<NAME>_AFTER ---------------------------------------------------------------------


def test_after_is_read_per_instance() -> None:
    env = {"LACUNA_APP_AFTER": "storage, log", "LACUNA_STORAGE_URL": "file:///tmp/lw-after"}
    built = build_handlers(["log", "storage", "app=log"], env, allow_private_urls=True)
    try:
        assert built.after == {"app": ("storage", "log")}
    finally:
        asyncio.run(built.aclose())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LACUNA_A_AFTER": "nosuch"}, "LACUNA_A_AFTER names 'nosuch', which is not an instance"),
        (
            {"LACUNA_A_AFTER": "a"},
            "LACUNA_A_AFTER: the handlers wait for each other in a cycle (a -> a)",
        ),
        (
            {"LACUNA_A_AFTER": "b", "LACUNA_B_AFTER": "c", "LACUNA_C_AFTER": "a"},
            "in a cycle (a -> b -> c -> a)",
        ),
    ],
)
def test_unknown_names_and_cycles_in_after_are_bad_settings(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_handlers(["a=log", "b=log", "c=log"], env)
    assert len(info.value.problems) == 1
    assert message in info.value.problems[0]


def test_a_diamond_is_no_cycle() -> None:
    env = {"LACUNA_D_AFTER": "b,c", "LACUNA_B_AFTER": "a", "LACUNA_C_AFTER": "a"}
    built = build_handlers(["a=log", "b=log", "c=log", "d=log"], env)
    assert built.after == {"b": ("a",), "c": ("a",), "d": ("b", "c")}


class _Reading(RecordingHandler):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.seen: list[object] = []

    async def handle(self, event: Event) -> None:
        self.seen.append(current_results.get())
        await super().handle(event)


async def test_after_runs_the_later_handler_once_the_earlier_ended_with_its_results(
    store: MemoryStore,
) -> None:
    """``late`` after ``storage`` and ``gone``: it waits while ``storage`` is blocked, then
    reads storage's result and None for ``gone`` (no delivery for this event)."""
    clock = FakeClock(T0)
    storage = _Returning("storage")
    storage.block = asyncio.Event()
    late, gone = _Reading("late"), RecordingHandler("gone")
    handlers = _set(storage, late, gone, after={"late": ("storage", "gone")})
    d = make_dispatcher(store, handlers, clock, policy=RetryPolicy(), poll_interval_seconds=0.02)
    event = Event.from_body(orjson.dumps(make_event("evt_after_d")))
    assert await store.accept(event, ["storage", "late"], now=clock())
    async with running(d):
        await wait_until(lambda: len(storage.calls) == 1)
        await asyncio.sleep(0.1)  # several claim passes: none may start `late`
        assert late.calls == []
        storage.block.set()
        await d.drain()
    assert late.seen == [
        {"storage": {"location": "file:///srv/evt_after_d/", "tracks": []}, "gone": None}
    ]


# -- Slack and email name the stored location when they run after storage --------------------


def test_stored_location_comes_from_a_prerequisite_result() -> None:
    """Any prerequisite result with a file:// or s3:// ``location`` (a storage instance under
    any name); None without AFTER, for a dead storage (None) or another kind of location."""
    assert stored_location() is None
    for results, expected in [
        ({"storage": None}, None),
        ({"app": {"location": "https://x"}}, None),
        ({"app": None, "archive": {"location": "s3://b/p/cm1/", "tracks": []}}, "s3://b/p/cm1/"),
    ]:
        token = current_results.set(results)
        try:
            assert stored_location() == expected
        finally:
            current_results.reset(token)


def test_slack_and_email_name_the_stored_location_escaped() -> None:
    """A hostile location cannot ping or forge a link in Slack, nor inject HTML in the mail."""
    event = Event.from_body(orjson.dumps(make_event("evt_stored_1")))
    stored = "file:///srv/audio/<!channel>&<x|y>/"
    message = build_message(event, stored)
    section = [
        b["text"]["text"]
        for b in message["blocks"]
        if b["type"] == "section" and "Stored" in b["text"]["text"]
    ]
    assert section == ["*Stored:* `file:///srv/audio/&lt;!channel&gt;&amp;&lt;x|y&gt;/`"]
    assert "Stored" not in orjson.dumps(build_message(event)).decode()
    mail = compose(event, "a@example.com", ["b@example.com"], stored)
    text = mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html_part = mail.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert f"Stored: {stored}\n" in text
    assert "<code>file:///srv/audio/&lt;!channel&gt;&amp;&lt;x|y&gt;/</code>" in html_part
    assert "Stored" not in compose(event, "a@example.com", ["b@example.com"]).as_string()
