"""plugins.py: resolving LACUNA_HANDLERS by entry point or package.module:attr, with filters."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from lacuna_webhooks import plugins
from lacuna_webhooks.dispatch.attempt import Ending, run_attempt
from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.handlers.log import LogHandler
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import HandlerSet, available, build_handlers, parse_events
from tests.conftest import make_event


@pytest.fixture
def plugin_module(tmp_path: Path) -> Iterator[str]:
    """A throwaway importable module holding handler factories."""
    name = f"lw_test_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from lacuna_webhooks import ConfigError

            class Hook:
                name = "hook"
                events = frozenset({"job.failed"})

                def __init__(self, ctx):
                    self.url = ctx.require("URL")
                    self.ctx = ctx

                async def handle(self, event):
                    return None

                async def aclose(self):
                    return None

            class Broken:
                name = "broken"
                events = None

                def __init__(self, ctx):
                    raise ConfigError(ctx.env_name("MODE") + " must be fast or slow")

            class SyncHandle:
                name = "synchandle"
                events = None

                def __init__(self, ctx):
                    pass

                def handle(self, event):
                    return None

                def aclose(self):
                    return None

            class NoHandle:
                name = "nohandle"
                events = None

                def __init__(self, ctx):
                    pass

                async def aclose(self):
                    return None

            class BadEvents(Hook):
                events = 5

                def __init__(self, ctx):
                    pass

            class OneEvent(Hook):
                events = "job.failed"

                def __init__(self, ctx):
                    pass

            class Plain(str):
                def __hash__(self):
                    raise RuntimeError("a plugin's __hash__")

            class StrName(Hook):
                name = Plain("strname")

                def __init__(self, ctx):
                    pass

            class SlowInit(Hook):
                name = "slowinit"

                def __init__(self, ctx):
                    import time
                    time.sleep(float(ctx.get("SLEEP", "0")))
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_builtin_log_is_an_entry_point() -> None:
    """Built-ins are registered through the same entry-point group as third-party plugins."""
    assert available()["log"] == "lacuna_webhooks.handlers.log:LogHandler"
    handlers = build_handlers(["log"], {})
    assert isinstance(handlers.handlers["log"], LogHandler)
    assert handlers.subscribers("job.completed") == ["log"]
    assert handlers.subscribers("anything.new") == ["log"]


def test_module_attr_form_reads_its_own_settings(plugin_module: str) -> None:
    """``pkg.mod:attr`` loads the factory; the handler reads LACUNA_<NAME>_* via its context."""
    handlers = build_handlers([f"{plugin_module}:Hook"], {"LACUNA_HOOK_URL": "https://x"})
    hook = handlers.handlers["hook"]
    assert hook.url == "https://x"  # type: ignore[attr-defined]
    assert handlers.subscribers("job.failed") == ["hook"]
    assert handlers.subscribers("job.completed") == []


def test_events_filter_overrides_the_default(plugin_module: str) -> None:
    env = {"LACUNA_HOOK_URL": "u", "LACUNA_HOOK_EVENTS": "job.completed, job.other"}
    handlers = build_handlers([f"{plugin_module}:Hook", "log"], env)
    assert handlers.subscribers("job.completed") == ["hook", "log"]
    assert handlers.subscribers("job.failed") == ["log"]
    env["LACUNA_LOG_EVENTS"] = "*"
    assert build_handlers(["log"], env).filters["log"] is None


@pytest.mark.parametrize("value", [",", " , ,", ",,"])
def test_an_events_filter_naming_no_type_is_refused(plugin_module: str, value: str) -> None:
    """``LACUNA_<NAME>_EVENTS=,`` was read as the empty list: the handler subscribed to
    nothing, and every event was stored without a delivery for it, nothing said. One line
    naming the variable, as every bad setting (blank still means unset: the default)."""
    env = {"LACUNA_HOOK_URL": "u", "LACUNA_HOOK_EVENTS": value}
    with pytest.raises(ConfigError) as info:
        build_handlers([f"{plugin_module}:Hook", "log"], env)
    assert info.value.problems == [
        "LACUNA_HOOK_EVENTS names no event type: list types comma-separated, * for every "
        "type, or unset it for the handler's own"
    ]
    env["LACUNA_HOOK_EVENTS"] = "  "
    assert build_handlers([f"{plugin_module}:Hook"], env).subscribers("job.failed") == ["hook"]


def test_per_handler_timeout(plugin_module: str) -> None:
    env = {"LACUNA_HOOK_URL": "u", "LACUNA_HOOK_TIMEOUT": "2.5"}
    handlers = build_handlers([f"{plugin_module}:Hook", "log"], env, timeout_seconds=9)
    assert handlers.timeouts == {"hook": 2.5, "log": 9}


def test_a_name_two_installed_packages_register_is_refused(
    plugin_module: str, tmp_path: Path
) -> None:
    """A package registering a built-in's name (here `slack`): which of the two loaded
    depended on sys.path (the package's did, silently), and `handlers` listed the other."""
    dist = tmp_path / "evilslack-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evilslack\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[lacuna_webhooks.handlers]\nslack = {plugin_module}:Hook\n"
    )
    with pytest.raises(ConfigError) as info:
        build_handlers(["slack"], {"LACUNA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/x"})
    (problem,) = info.value.problems
    assert problem.startswith("LACUNA_HANDLERS names 'slack', which several installed packages")
    assert f"evilslack ({plugin_module}:Hook)" in problem
    assert "lacuna_webhooks.handlers.slack:SlackHandler" in problem
    assert available()["slack"] in (
        f"lacuna_webhooks.handlers.slack:SlackHandler or {plugin_module}:Hook",
        f"{plugin_module}:Hook or lacuna_webhooks.handlers.slack:SlackHandler",
    )
    assert isinstance(build_handlers(["log"], {}).handlers["log"], LogHandler)  # others load


def test_unknown_name_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as info:
        build_handlers(["nosuch"], {})
    assert info.value.problems == [
        "LACUNA_HANDLERS names unknown handler 'nosuch' "
        f"(installed: {', '.join(sorted(available()))}; or give package.module:attr)"
    ]


def test_every_problem_is_reported(plugin_module: str) -> None:
    """Missing settings, a failing factory, a missing module, a bad timeout: all at once."""
    with pytest.raises(ConfigError) as info:
        build_handlers(
            [f"{plugin_module}:Hook", f"{plugin_module}:Broken", "no.such.module:X", "log"],
            {"LACUNA_LOG_TIMEOUT": "soon"},
        )
    text = " | ".join(info.value.problems)
    assert "LACUNA_HOOK_URL is required by the hook handler" in text
    assert "LACUNA_BROKEN_MODE must be fast or slow" in text
    assert "'no.such.module:X', which cannot be loaded" in text
    assert "LACUNA_LOG_TIMEOUT must be a number, got 'soon'" in text


def test_every_bad_setting_of_one_built_in_handler_is_reported(tmp_path: Path) -> None:
    """A built-in's constructor stopped at its first bad setting: the operator fixed one,
    restarted, and met the next (configuration.md promises them all at once)."""
    env = {
        "LACUNA_STORAGE_URL": f"{tmp_path.as_uri()}/a%00b",
        "LACUNA_STORAGE_MAX_BYTES": "-1",
        "LACUNA_STORAGE_READ_TIMEOUT": "100",
        "LACUNA_EMAIL_SMTP_URL": "smtp://mail.example",
        "LACUNA_EMAIL_FROM": "not an address",
        "LACUNA_EMAIL_TO": "also bad",
        "LACUNA_EMAIL_CONNECT_TIMEOUT": "soon",
    }
    with pytest.raises(ConfigError) as info:
        build_handlers(["storage", "email"], env)
    text = " | ".join(info.value.problems)
    for var in (
        "LACUNA_STORAGE_URL",
        "LACUNA_STORAGE_MAX_BYTES",
        "LACUNA_STORAGE_READ_TIMEOUT",
        "LACUNA_EMAIL_FROM",
        "LACUNA_EMAIL_TO",
        "LACUNA_EMAIL_CONNECT_TIMEOUT",
    ):
        assert var in text, var
    assert "LACUNA_EMAIL_SMTP_URL" not in text


def test_a_constructor_that_blocks_is_named_in_a_warning(
    plugin_module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin whose __init__ blocked hung `serve`'s start without a word: no line, no
    port. While it runs past SLOW_BUILD_SECONDS, a warning names it."""
    monkeypatch.setattr(plugins, "SLOW_BUILD_SECONDS", 0.05)
    with capture_logs() as logs:
        build_handlers([f"{plugin_module}:SlowInit"], {"LACUNA_SLOWINIT_SLEEP": "0.5"})
        slow = [e for e in logs if e["event"] == "handler.build_slow"]
        assert slow
        assert slow[0]["handler"] == f"{plugin_module}:SlowInit"
        assert slow[0]["log_level"] == "warning"
        count = len(slow)
        build_handlers(["log"], {})  # a quick one: no warning, and the watch ended
        time.sleep(0.2)
        assert len([e for e in logs if e["event"] == "handler.build_slow"]) == count


def test_a_module_that_blocks_at_import_is_named_in_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin module that blocked when imported (time.sleep at module level, a connection
    made there) hung `serve`'s start without a word; the constructor had its warning, the
    import none. While the import runs past SLOW_BUILD_SECONDS, a warning names the item."""
    name = f"lw_slow_import_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import time\ntime.sleep(0.5)\n\n"
        "class H:\n    name = 'slowimport'\n\n"
        "    def __init__(self, ctx):\n        pass\n\n"
        "    async def handle(self, event):\n        return None\n\n"
        "    async def aclose(self):\n        return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "SLOW_BUILD_SECONDS", 0.05)
    with capture_logs() as logs:
        build_handlers([f"{name}:H"], {})
    slow = [e for e in logs if e["event"] == "handler.import_slow"]
    assert slow
    assert slow[0]["handler"] == f"{name}:H"
    assert slow[0]["log_level"] == "warning"


def test_same_handler_twice_is_refused(plugin_module: str) -> None:
    with pytest.raises(ConfigError, match="twice"):
        build_handlers(
            ["log", f"{plugin_module}:Hook", f"{plugin_module}:Hook"], {"LACUNA_HOOK_URL": "u"}
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, frozenset({"a"})),
        ("", frozenset({"a"})),
        ("*", None),
        ("b, c", frozenset({"b", "c"})),
    ],
)
def test_parse_events(value: str | None, expected: frozenset[str] | None) -> None:
    assert parse_events(value, frozenset({"a"})) == expected


# --- every handler setting may come from a file (SPEC §10) --------------------------------


def test_a_plugin_setting_comes_from_its_file(plugin_module: str, tmp_path: Path) -> None:
    """LACUNA_<NAME>_<KEY>_FILE works for any handler, through HandlerContext; so do the
    dispatcher's per-handler settings (_EVENTS, _TIMEOUT) read for it."""
    (tmp_path / "url").write_text("https://hooks.example/abc\n")
    (tmp_path / "events").write_text("job.completed,job.started\n")
    built = build_handlers(
        [f"{plugin_module}:Hook"],
        {
            "LACUNA_HOOK_URL_FILE": str(tmp_path / "url"),
            "LACUNA_HOOK_EVENTS_FILE": str(tmp_path / "events"),
        },
    )
    assert built.handlers["hook"].url == "https://hooks.example/abc"  # type: ignore[attr-defined]
    assert built.filters["hook"] == frozenset({"job.completed", "job.started"})


def test_handler_setting_in_both_forms_or_unreadable(plugin_module: str, tmp_path: Path) -> None:
    """Both forms set, or a file that cannot be read: one line each, naming the variable."""
    (tmp_path / "url").write_text("https://hooks.example/secret-part\n")
    with pytest.raises(ConfigError) as info:
        build_handlers(
            [f"{plugin_module}:Hook", "log"],
            {
                "LACUNA_HOOK_URL": "https://hooks.example/x",
                "LACUNA_HOOK_URL_FILE": str(tmp_path / "url"),
                "LACUNA_LOG_TIMEOUT_FILE": str(tmp_path / "nope"),
            },
        )
    assert info.value.problems[0] == (
        "LACUNA_HOOK_URL and LACUNA_HOOK_URL_FILE are both set: keep one of them"
    )
    assert info.value.problems[1].startswith("LACUNA_LOG_TIMEOUT_FILE: cannot read ")
    assert "secret-part" not in str(info.value)


def test_a_handler_secret_that_cannot_be_right_is_warned_once(tmp_path: Path) -> None:
    """ctx.require_secret logs config.secret_suspicious once per problem, without the value;
    the slack handler reads its URL (the secret) from LACUNA_SLACK_WEBHOOK_URL_FILE."""
    url = "https://hooks.slack.com/services/T0/B0/sekrit value"
    (tmp_path / "slack").write_text(url + "\n")
    with capture_logs() as logs:
        built = build_handlers(
            ["slack"], {"LACUNA_SLACK_WEBHOOK_URL_FILE": str(tmp_path / "slack")}
        )
    assert built.names == ["slack"]
    warnings = [e for e in logs if e["event"] == "config.secret_suspicious"]
    assert warnings == [
        {
            "event": "config.secret_suspicious",
            "log_level": "warning",
            "variable": "LACUNA_SLACK_WEBHOOK_URL",
            "problem": "contains whitespace",
        }
    ]
    assert "sekrit" not in repr(logs)


class _Closing:
    """A handler whose aclose raises, hangs (cooperatively) or records that it ran."""

    events: frozenset[str] | None = None

    def __init__(self, name: str, how: str, closed: list[str]) -> None:
        self.name, self.how, self.closed = name, how, closed

    async def handle(self, event: object) -> None:
        return None

    async def aclose(self) -> None:
        if self.how == "raise":
            raise RuntimeError("aclose exploded")
        if self.how == "hang":
            await asyncio.sleep(3600)
        self.closed.append(self.name)


async def test_handler_set_aclose_survives_a_raising_or_hanging_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HandlerSet.aclose logs a handler whose aclose raises or outlives the bound
    (handler.aclose_failed) and still closes the others; it once stopped at the first."""
    monkeypatch.setattr(plugins, "ACLOSE_TIMEOUT_SECONDS", 0.05)
    closed: list[str] = []
    handlers = HandlerSet.of(
        [
            _Closing("raises", "raise", closed),
            _Closing("hangs", "hang", closed),
            _Closing("fine", "ok", closed),
        ]
    )
    with capture_logs() as logs:
        await handlers.aclose()
    assert closed == ["fine"]
    failed = [entry["handler"] for entry in logs if entry["event"] == "handler.aclose_failed"]
    assert failed == ["raises", "hangs"]


async def test_a_plain_def_handle_or_aclose_is_run_and_counts_as_done(
    plugin_module: str,
) -> None:
    """`def handle` (not async) does its work when called: awaiting its None failed the
    attempt after the work was done, and it was retried until dead, the work done each time.
    It is not refused at start either (an async wrapper around a plain def, a def returning
    a coroutine, are valid handlers that no start-time check can tell apart)."""
    handlers = build_handlers([f"{plugin_module}:SyncHandle"], {})
    handler = handlers.handlers["synchandle"]
    event = Event.from_body(orjson.dumps(make_event("evt_sync")))
    outcome = await run_attempt(handler, event, 5.0)
    assert outcome.ending is Ending.OK, outcome
    await handlers.aclose()


def test_without_instances_keeps_names_filters_and_timeouts(plugin_module: str) -> None:
    """What serve keeps of its own copies of the handlers (they run in worker processes):
    names, filters and timeouts, and nothing whose aclose could block its loop."""
    env = {"LACUNA_HOOK_URL": "u", "LACUNA_HOOK_TIMEOUT": "2.5"}
    built = build_handlers([f"{plugin_module}:Hook"], env)
    kept = built.without_instances()
    assert kept.names == built.names
    assert kept.subscribers("job.failed") == built.subscribers("job.failed")
    assert kept.subscribers("job.failed") == ["hook"]
    assert kept.subscribers("job.completed") == []
    assert kept.timeouts == built.timeouts == {"hook": 2.5}
    assert all(type(h).__name__ == "_RunsElsewhere" for h in kept.handlers.values())


def test_an_object_that_is_not_a_handler_is_refused_at_start(plugin_module: str) -> None:
    """A factory whose object lacks handle() (or aclose()) or whose ``events`` is not event
    type strings stops the start with one line each. Such a plugin used to start: every
    attempt then failed, and an ``events = 5`` made intake answer every webhook with a 500."""
    with pytest.raises(ConfigError) as info:
        build_handlers([f"{plugin_module}:NoHandle", f"{plugin_module}:BadEvents"], {})
    first, second = info.value.problems
    assert "built a NoHandle, which is not a handler: it has no handle() method" in first
    assert "events must be None or a set of event type strings, got 5" in second
    # A single type given as a string is one type, not its characters.
    one = build_handlers([f"{plugin_module}:OneEvent"], {})
    assert one.subscribers("job.failed") == ["hook"]  # its name attribute, inherited
    assert one.subscribers("job.completed") == []


def test_the_start_check_gives_a_plugin_as_long_as_its_worker_has() -> None:
    """A plugin the check lets through must be able to start in its worker process: the
    check's bound per item is the worker's start timeout."""
    from lacuna_webhooks.dispatch.workers import START_TIMEOUT_SECONDS
    from lacuna_webhooks.plugin_check import CHECK_TIMEOUT_SECONDS

    assert CHECK_TIMEOUT_SECONDS == START_TIMEOUT_SECONDS


def test_a_kinds_own_name_and_events_are_read_as_building_reads_them(plugin_module: str) -> None:
    """``resolve_items`` (the CLI's handler names and filters) took an ``events`` string as a
    set of its characters; a ``name`` that is a str subclass kept its own ``__hash__``, which
    raised outside the plugin boundary wherever the name was used."""
    assert plugins.resolve_items([f"{plugin_module}:OneEvent"]) == [
        ("hook", frozenset({"job.failed"}))
    ]
    ((name, _),) = plugins.resolve_items([f"{plugin_module}:StrName"])
    built = build_handlers([f"{plugin_module}:StrName"], {})
    assert type(name) is str
    assert [type(n) for n in built.names] == [str]
    assert built.names == ["strname"]
