"""The store commands of the CLI, in-process against a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from lacuna_webhooks.cli import main
from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.store import open_store
from tests.conftest import make_event


@pytest.fixture
def db(tmp_path: Path) -> dict[str, str]:
    """A store holding two events: one delivered, one whose slack delivery is dead."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        now = datetime.now(UTC)

        ok = Event.from_body(orjson.dumps(make_event("evt_cli_ok")))
        bad = Event.from_body(orjson.dumps(make_event("evt_cli_bad", "job.failed", task_id="cm9")))
        await store.accept(ok, ["log"], now=now)
        await store.accept(bad, ["log", "slack"], now=now)
        for handler in ("log", "slack"):
            for d in await store.claim(
                handler=handler, limit=10, lease=timedelta(seconds=30), now=now
            ):
                if d.handler == "slack":
                    await store.dead(
                        d, Attempt(now, now, AttemptOutcome.DEAD, "PermanentError: no_service")
                    )
                else:
                    result = {"seen": d.event.id} if d.event.id == "evt_cli_bad" else None
                    await store.complete(d, Attempt(now, now, AttemptOutcome.OK, None, result))
        await store.close()

    asyncio.run(fill())
    return {"LACUNA_DATABASE_URL": url}


def test_events_list_table_and_json(db: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "list"], db) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["ID", "TYPE", "TASK", "RECEIVED"]
    assert "evt_cli_ok" in out
    assert "evt_cli_bad" in out
    assert main(["events", "list", "--json", "--type", "job.failed"], db) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["evt_cli_bad"]
    assert rows[0]["task_id"] == "cm9"


def test_events_show(db: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "show", "evt_cli_bad"], db) == 0
    out = capsys.readouterr().out
    assert "slack attempt 1: dead" in out
    assert "PermanentError: no_service" in out
    assert main(["events", "show", "evt_cli_bad", "--json"], db) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["payload"]["data"]["error"]["code"] == "provider_error"
    assert {d["handler"]: d["status"] for d in doc["deliveries"]} == {
        "log": "done",
        "slack": "dead",
    }


def test_events_show_unknown_is_one_line(
    db: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["events", "show", "evt_nope"], db) == 1
    assert capsys.readouterr().err == "lacuna-webhooks: error: no event 'evt_nope' in the store\n"


def test_deliveries_list_by_status(db: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deliveries", "list", "--status", "dead", "--json"], db) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["event_id"], r["handler"], r["status"]) for r in rows] == [
        ("evt_cli_bad", "slack", "dead")
    ]
    assert main(["deliveries", "list"], db) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # header + 3 deliveries


def test_retry_dead_keeps_to_the_configured_handlers(
    db: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """With LACUNA_HANDLERS (as for `replay`): `slack`, dead here, is no longer configured, so
    retrying every dead delivery leaves it dead (pending, nothing would run it), and naming
    it is one line and exit 2."""
    configured = {**db, "LACUNA_HANDLERS": "log"}
    assert main(["retry-dead", "--handler", "slack"], configured) == 2
    assert "'slack' is not a configured handler (log)" in capsys.readouterr().err
    assert main(["retry-dead"], configured) == 0
    assert capsys.readouterr().out.startswith("0 dead deliveries are due again")
    assert main(["deliveries", "list", "--status", "dead", "--json"], db) == 0
    assert [r["handler"] for r in json.loads(capsys.readouterr().out)] == ["slack"]


def test_retry_dead_of_a_handler_the_store_never_saw_is_refused_without_configuration(
    db: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without LACUNA_HANDLERS, `retry-dead --handler storag` (a typo) said "0 dead deliveries
    are due again" and exit 0; a name with no delivery at all in the store is exit 2."""
    assert main(["retry-dead", "--handler", "slak"], db) == 2
    assert capsys.readouterr().err == (
        "lacuna-webhooks: error: --handler: the store holds no delivery of a handler named 'slak'\n"
    )
    assert main(["retry-dead", "--handler", "log"], db) == 0  # known, nothing dead: fine
    assert capsys.readouterr().out.startswith("0 dead deliveries are due again")


def test_retry_dead_then_replay(db: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retry-dead", "--handler", "slack"], db) == 0
    assert capsys.readouterr().out.startswith("1 dead deliveries are due again")
    assert main(["deliveries", "list", "--status", "dead", "--json"], db) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["replay", "evt_cli_ok"], db) == 0
    assert "1 deliveries due now" in capsys.readouterr().out
    configured = {**db, "LACUNA_HANDLERS": "log,email"}
    assert main(["replay", "evt_cli_ok", "--handler", "email"], configured) == 0
    capsys.readouterr()
    assert main(["deliveries", "list", "--event", "evt_cli_ok", "--json"], db) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["handler"], r["status"], r["attempts"]) for r in rows) == [
        ("email", "pending", 0),
        ("log", "pending", 0),
    ]


@pytest.mark.parametrize(
    ("handlers", "shown"), [("log,email", "(log, email)"), ("", "(none: LACUNA_HANDLERS is empty)")]
)
def test_replay_of_one_event_to_an_unknown_handler_is_refused(
    db: dict[str, str], capsys: pytest.CaptureFixture[str], handlers: str, shown: str
) -> None:
    """Replaying one event to a handler LACUNA_HANDLERS does not configure is one line and
    exit 2, as the admin API and the bulk replay refuse it: it created a delivery that
    nothing would ever run (pending forever, so the event was never pruned either)."""
    env = {**db, "LACUNA_HANDLERS": handlers}
    assert main(["replay", "evt_cli_ok", "--handler", "zzz"], env) == 2
    assert capsys.readouterr().err == (
        f"lacuna-webhooks: error: --handler: 'zzz' is not a configured handler {shown}\n"
    )
    assert main(["deliveries", "list", "--event", "evt_cli_ok", "--json"], db) == 0
    assert [r["handler"] for r in json.loads(capsys.readouterr().out)] == ["log"]


def test_replay_of_one_event_to_a_handler_that_does_not_take_its_type_is_refused(
    db: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """LACUNA_EMAIL_EVENTS=job.failed: replaying a job.completed event to email is one line
    and exit 2, nothing created, as the admin API refuses it; to log it goes through."""
    env = {**db, "LACUNA_HANDLERS": "log,email", "LACUNA_EMAIL_EVENTS": "job.failed"}
    assert main(["replay", "evt_cli_ok", "--handler", "email"], env) == 2
    assert capsys.readouterr().err == (
        "lacuna-webhooks: error: 'email' does not take 'job.completed' events "
        "(LACUNA_EMAIL_EVENTS)\n"
    )
    assert main(["replay", "evt_cli_ok", "--handler", "log"], env) == 0
    capsys.readouterr()
    assert main(["deliveries", "list", "--event", "evt_cli_ok", "--json"], db) == 0
    assert [r["handler"] for r in json.loads(capsys.readouterr().out)] == ["log"]


def test_replay_unknown_event(db: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "evt_nope"], db) == 1
    assert "no event 'evt_nope'" in capsys.readouterr().err


def test_store_commands_without_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listing never creates an empty database by accident; it says where it looked."""
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'missing.db'}"}
    assert main(["events", "list"], env) == 1
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_a_path_too_long_to_look_up_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``Path.exists`` raises every ``OSError`` but a missing file's: ``dev --env-file`` and
    the store commands on a ``LACUNA_DATABASE_URL`` whose file name is longer than the system
    takes (ENAMETOOLONG) ended in a traceback. One line naming the option or the setting,
    exit 2, and nothing created."""
    monkeypatch.chdir(tmp_path)
    name = "x" * 5000
    assert main(["dev", "--env-file", name], {"PORT": "1"}) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lacuna-webhooks: error: --env-file: cannot use xxx")
    assert lines[0].endswith(": File name too long")
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / name}"}
    for command in (["events", "list"], ["events", "show", "evt_1"], ["tail"]):
        assert main(command, env) == 2, command
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, (command, lines)
        assert lines[0].startswith("lacuna-webhooks: error: LACUNA_DATABASE_URL: cannot use ")
        assert lines[0].endswith(": File name too long")
    assert os.listdir(tmp_path) == []


def test_migrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}"}
    assert main(["migrate"], env) == 0
    assert main(["migrate"], env) == 0
    assert "schema is up to date" in capsys.readouterr().out
    assert (tmp_path / "m.db").exists()


def test_handlers_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["handlers"], {}) == 0
    out = capsys.readouterr().out
    assert "log" in out
    assert "configured instances: none" in out


def test_handlers_lists_instances_with_kind_and_settings_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each LACUNA_HANDLERS instance with its kind and `ok` or the first problem's line;
    exit 2 when one would stop `serve`. The secret is never shown."""
    env = {
        "LACUNA_HANDLERS": "app=http,analytics=http,log",
        "LACUNA_APP_URL": "http://127.0.0.1:9/in",
        "LACUNA_APP_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "LACUNA_ANALYTICS_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
    assert main(["handlers"], env) == 2
    out = capsys.readouterr().out
    rows = out.split("configured instances (LACUNA_HANDLERS):\n", 1)[1].splitlines()
    assert rows[0].split() == ["NAME", "KIND", "SETTINGS"]
    assert rows[1].split() == ["app", "http", "ok"]
    assert rows[2].startswith("analytics")
    assert "LACUNA_ANALYTICS_URL is required" in rows[2]
    assert rows[3].split() == ["log", "log", "ok"]
    assert "MfKQ9r8" not in out
    env["LACUNA_ANALYTICS_URL"] = "http://127.0.0.1:9/a"
    assert main(["handlers"], env) == 0


def test_handlers_names_a_module_attr_instance_whose_settings_fail(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ``package.module:attr`` instance is named after the object's ``name``
    (docs/plugins.md), also on the row of a problem: that row said
    ``lacuna_webhooks.handlers.slack:SlackHandler`` in NAME while the problem and the state
    line below called it ``slack``."""
    target = "lacuna_webhooks.handlers.slack:SlackHandler"
    assert main(["handlers"], {"LACUNA_HANDLERS": f"log,{target}"}) == 2
    out = capsys.readouterr().out
    rows = out.split("configured instances (LACUNA_HANDLERS):\n", 1)[1].splitlines()
    assert rows[2].split()[:2] == ["slack", target]
    assert "LACUNA_SLACK_WEBHOOK_URL is required" in rows[2]
    assert "  slack " in out.split("state:\n", 1)[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "list", "--limit", "0"], "--limit: must be greater than 0"),
        # Past SQLite's 64-bit integer: once an OverflowError traceback.
        (["events", "list", "--limit", "9" * 30], "--limit: must be at most 100000"),
        (["deliveries", "list", "--limit", "9223372036854775808"], "must be at most 100000"),
        # int() refuses more than 4300 digits: it read as "not a whole number", the argument
        # echoed whole; "1_000" and other scripts' digits were numbers (settings refuse them).
        (["events", "list", "--limit", "9" * 5000], "--limit: must be at most 100000, got '999"),
        (["events", "list", "--limit", "1_000"], "--limit: must be a whole number, got '1_000'"),
        (["events", "list", "--limit", "\u0661\u0660"], "--limit: must be a whole number"),
        (["serve", "--port", "0" * 5000 + "80000"], "--port: must be a port from 1 to 65535"),
        (["deliveries", "list", "--event", ""], "--event: must be a non-empty id"),
        (["events", "show", "x" * 100_000], "event_id: must be a non-empty id of at most 255"),
        (["replay", ""], "event_id: must be a non-empty id"),
        # A name no handler can have: replay created a delivery due forever.
        (["replay", "evt_1", "--handler", "No Such!"], "--handler: must be a handler name"),
        (["retry-dead", "--handler", "x y"], "--handler: must be a handler name"),
        (["deliveries", "list", "--handler", "Slack"], "--handler: must be a handler name"),
        (["events"], "required"),
        (["deliveries", "list", "--status", "weird"], "invalid choice"),
        (["serve", "--port", "99999"], "must be a port"),
        (["nosuch"], "invalid choice"),
        (["send"], "--url"),
    ],
)
def test_bad_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv, {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]


def test_bad_database_url_is_a_config_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["events", "list"], {"LACUNA_DATABASE_URL": "redis://x"}) == 2
    assert "LACUNA_DATABASE_URL must be sqlite:///PATH" in capsys.readouterr().err


def test_send_with_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "send",
        "--url",
        "http://127.0.0.1:9/x",
        "--secret",
        "s",
        "--file",
        str(tmp_path / "no.json"),
    ]
    assert main(argv, {}) == 2
    assert "cannot read --file" in capsys.readouterr().err


def test_send_with_an_endless_file_stops_at_the_body_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``send --file /dev/zero`` reads at most the largest body any receiver accepts and says
    so in one line, exit 2; it used to read forever into memory."""
    argv = ["send", "--url", "http://127.0.0.1:9/x", "--secret", "s", "--file", "/dev/zero"]
    assert main(argv, {}) == 2
    assert capsys.readouterr().err == (
        "lacuna-webhooks: error: --file /dev/zero is larger than 104857600 bytes\n"
    )


def test_send_to_nothing_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "--url", "http://127.0.0.1:9/webhooks/lacuna", "--secret", "s"], {}) == 1
    err = capsys.readouterr().err
    assert err.startswith("lacuna-webhooks: error: could not POST to http://127.0.0.1:9/")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "0"], "--count: must be greater than 0"),
        (["--count", "many"], "--count: must be a whole number"),
        (["--concurrency", "5000"], "--concurrency: must be at most 1000"),
        (["--timeout", "nan"], "--timeout: must be a number above 0 and at most 86400"),
        (["--timeout", "-1"], "--timeout: must be a number above 0 and at most 86400"),
        (["--type", ""], "--type: must be a type such as job.completed"),
        (["--type", " job.completed"], "no surrounding spaces"),
        (["--id", ""], "--id: must be a non-empty id"),
        (["--id", "x" * 256], "at most 255 characters"),
        (["--set", "data.title"], "expected PATH=VALUE"),
        (["--set", "data..title=x"], "bad path at '..title'"),
        (["--set", "data.tracks[7].id=x"], "data.tracks has 1 item(s); [7] is past its end"),
        (["--set", "type.x=1"], "type is a string, not an object"),
        (["--secret-index", "3"], "--secret-index 3: --secret holds 1 secret(s)"),
        (["--secret-index", "0"], "--secret-index: must be greater than 0"),
        (["--url", "ftp://x"], "must be an http:// or https:// URL, got ftp scheme"),
        # httpx.InvalidURL is no httpx.HTTPError: this was a traceback.
        (["--url", "http://[::1"], "is not a valid URL"),
        # httpx takes port 84267 and connects to 84267 - 65536 = 18731: another server.
        (["--url", "http://127.0.0.1:84267/x"], "a port that is not a number from 1 to 65535"),
        (["--url", "http://[::1]:99999/x"], "a port that is not a number from 1 to 65535"),
        (["--url", "http://x:-1/"], "a port that is not a number from 1 to 65535"),
        (["--url", "http://"], "has no host"),
        (["--url", "http://:80/x"], "has no host"),
        # urlsplit strips the blank, httpx refused the URL at send: exit 1, not 2.
        (["--url", " http://127.0.0.1:9/x"], "holds a space or a control character"),
        # An A-label that is no IDNA: httpx decodes it only when it sends, a traceback.
        (["--url", "http://xn--zz.invalid/x"], "is not a valid URL"),
        # int() refuses more than 4300 digits: a ValueError traceback.
        (["--set", "data.tracks[" + "9" * 5000 + "]=1"], "is larger than 10000"),
        # \d took any script's digits: [٣] was index 3.
        (["--set", "data.tracks[\u0663]=1"], "bad path at"),
    ],
)
def test_send_bad_arguments_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything is sent: exit code 2 and one line on stderr, no traceback."""
    argv = ["send", "--url", "http://127.0.0.1:9/webhooks/lacuna", "--secret", "whsec_a", *args]
    try:
        code = main(argv, {})
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_send_without_any_secret_names_both_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "--url", "http://127.0.0.1:9/x"], {}) == 2
    assert "LACUNA_WEBHOOK_SECRET (or LACUNA_WEBHOOK_SECRET_FILE)" in capsys.readouterr().err


def test_send_cannot_edit_a_file_that_is_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "body.txt"
    body.write_text("not json")
    argv = ["send", "--url", "http://127.0.0.1:9/x", "--secret", "s", "--file", str(body)]
    assert main([*argv, "--id", "evt_1"], {}) == 2
    assert "is not JSON, so --set/--id/--type cannot edit it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"LACUNA_DATABASE_URL": "sqlite:///./x.db", "LACUNA_HANDLERS": "log"},
            "lacuna-webhooks: error: `worker` needs PostgreSQL (LACUNA_DATABASE_URL): on SQLite"
            " `serve` runs the handler workers itself, so the database keeps one writer",
        ),
        (
            {"LACUNA_DATABASE_URL": "postgresql://127.0.0.1:1/none"},
            "lacuna-webhooks: error: configuration: LACUNA_HANDLERS names no handler to run",
        ),
    ],
)
def test_worker_refuses_what_it_cannot_run(
    env: dict[str, str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`worker` on SQLite (one writer: serve dispatches there) or without a handler stops
    with exit 2 and one line, before touching any database."""
    assert main(["worker"], env) == 2
    assert capsys.readouterr().err.strip() == expected


def test_events_show_prints_a_payload_nested_past_what_orjson_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body nested 300 levels (stored before intake bounded nesting, MAX_JSON_DEPTH) is
    shown by ``events show`` and ``events show --json`` as stored: orjson writes at most
    254 levels, and this was a ``TypeError: Recursion limit reached`` traceback."""
    url = f"sqlite:///{tmp_path / 'deep.db'}"
    depth = 300
    raw = b'{"id":"evt_deep","type":"job.completed","x":' + b"[" * depth + b"]" * depth + b"}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        event = Event.from_stored(raw)
        await store.accept(event, [], now=datetime.now(UTC))
        await store.close()

    asyncio.run(fill())
    env = {"LACUNA_DATABASE_URL": url}
    assert main(["events", "show", "evt_deep"], env) == 0
    assert "[" * depth in capsys.readouterr().out
    assert main(["events", "show", "evt_deep", "--json"], env) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["payload"]["id"] == "evt_deep"


def test_events_show_prints_numbers_beyond_a_double_as_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored body holding ``1e400`` and a 5000-digit integer (valid JSON orjson cannot
    read) is shown by ``events show`` and ``--json`` with those numbers as sent."""
    url = f"sqlite:///{tmp_path / 'big.db'}"
    huge = b"-" + b"9" * 5000
    raw = b'{"id":"evt_big","type":"job.completed","a":1e400,"data":{"n":' + huge + b"}}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        await store.accept(Event.from_body(raw), ["log"], now=datetime.now(UTC))
        await store.close()

    asyncio.run(fill())
    env = {"LACUNA_DATABASE_URL": url}
    assert main(["events", "show", "evt_big"], env) == 0
    out = capsys.readouterr().out
    assert raw.decode() in out
    assert main(["events", "show", "evt_big", "--json"], env) == 0
    doc = json.loads(capsys.readouterr().out, parse_int=str, parse_float=str)
    assert doc["payload"]["a"] == "1e400"
    assert doc["payload"]["data"]["n"] == huge.decode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d: (d / "bad.env").write_bytes(b"LACUNA_WEBHOOK_SECRET=\xff\n") and "bad.env",
            "bad.env is not UTF-8 text",
        ),
        (lambda d: (d / "dir.env").mkdir() or "dir.env", "cannot read dir.env: Is a directory"),
        (lambda d: os.mkfifo(d / "fifo.env") or "fifo.env", "fifo.env is not a regular file"),
        (lambda d: "/dev/zero", "/dev/zero is not a regular file"),
        (lambda d: huge_file(d / "huge.env"), "huge.env is larger than 1 MiB"),
        (
            lambda d: "no-such-dir/x.env",
            "cannot write no-such-dir/x.env: No such file or directory",
        ),
    ],
    ids=["not-utf8", "a-directory", "a-fifo", "a-device", "huge", "unwritable"],
)
def test_dev_with_an_unusable_env_file_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], str],
    message: str,
) -> None:
    """``dev --env-file`` that cannot be read or written (not UTF-8, a directory, a missing
    folder) is one ``--env-file`` line and exit 2, before anything listens; each was a
    traceback (UnicodeDecodeError, IsADirectoryError, FileNotFoundError). A FIFO hung the
    start, /dev/zero took all memory, a huge file was read whole: only a regular file of at
    most 1 MiB is read."""
    monkeypatch.chdir(tmp_path)
    name = make(tmp_path)
    # Before the fix open() blocked on the FIFO: a writer that comes later lets the test end.
    fifo = tmp_path / "fifo.env"
    unblock = threading.Timer(5.0, lambda: fifo.open("wb").close() if fifo.exists() else None)
    unblock.start()
    try:
        assert main(["dev", "--env-file", name], {"PORT": "1"}) == 2
    finally:
        unblock.cancel()
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"lacuna-webhooks: error: --env-file: {message}"]


def huge_file(path: Path) -> str:
    with path.open("wb") as f:
        f.truncate(2 * 1024 * 1024)  # sparse: no disk used
    return path.name


def test_listings_write_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An id and type holding a newline and a terminal escape (ESC) are printed escaped by
    ``events list`` and ``events show``: one table row, no raw control character. Printed
    raw, a sender's id forged extra rows and drove the operator's terminal."""
    url = f"sqlite:///{tmp_path / 'ctl.db'}"
    event_id = "evt_x\nevt_forged  job.completed \x1b[31mRED"
    raw = orjson.dumps({"id": event_id, "type": "job.completed\r\nX"})

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        # Built directly: intake refuses such an id now, but a database written before that
        # rule may still hold one, and the listings must stay safe for it.
        hostile = Event(
            id=event_id, type="job.completed\r\nX", payload=orjson.loads(raw), raw=raw, created=None
        )
        await store.accept(hostile, [], now=datetime.now(UTC))
        await store.close()

    asyncio.run(fill())
    env = {"LACUNA_DATABASE_URL": url}
    assert main(["events", "list"], env) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert len(out.strip().splitlines()) == 2  # the header and one row
    assert "evt_x\\nevt_forged  job.completed \\x1b[31mRED" in out
    assert main(["events", "show", event_id], env) == 0
    shown = capsys.readouterr().out
    head = shown.split("\npayload")[0]
    assert "\x1b" not in head
    assert "\r" not in head
    assert "type      job.completed\\r\\nX" in head


def test_events_show_prints_each_delivery_result(
    db: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler's result (SPEC §6) is shown per delivery, as text and in --json (null when
    the handler returned none or did not complete)."""
    assert main(["events", "show", "evt_cli_bad"], db) == 0
    out = capsys.readouterr().out
    assert '\nresults\n  log: {"seen":"evt_cli_bad"}\n' in out
    assert main(["events", "show", "evt_cli_bad", "--json"], db) == 0
    doc = json.loads(capsys.readouterr().out)
    results = {d["handler"]: d["result"] for d in doc["deliveries"]}
    assert results == {"log": {"seen": "evt_cli_bad"}, "slack": None}
    assert main(["events", "show", "evt_cli_ok"], db) == 0
    assert "\nresults\n" not in capsys.readouterr().out


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\nlog running\x9b2J\x7f\u2028"


def _no_raw_control(text: str) -> None:
    """No character of ``HOSTILE`` reaches the terminal raw (a newline only between lines)."""
    for c in ("\x1b", "\x07", "\x9b", "\x7f", "\u2028", "\r"):
        assert c not in text, repr(c)


def test_every_output_of_stored_values_is_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler's name, error and result, a payload string, and a pause reason (which any
    admin API caller sets) are printed escaped by `handlers`, `events show` (text and
    --json) and `deliveries list --json`: `handlers | cat -v` showed an admin's terminal
    title changed, the screen cleared and a forged `log running` line."""
    url = f"sqlite:///{tmp_path / 'ctl.db'}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        now = datetime.now(UTC)
        body = make_event("evt_ctl")
        body["data"]["title"] = HOSTILE
        await store.accept(Event.from_body(orjson.dumps(body)), ["log", "slack"], now=now)
        for handler in ("log", "slack"):
            for d in await store.claim(
                handler=handler, limit=10, lease=timedelta(seconds=30), now=now
            ):
                if handler == "log":
                    result = {"note": HOSTILE}
                    await store.complete(d, Attempt(now, now, AttemptOutcome.OK, None, result))
                else:
                    await store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, HOSTILE))
        await store.set_paused("log", True, reason=HOSTILE, now=now)
        await store.close()

    asyncio.run(fill())
    env = {"LACUNA_DATABASE_URL": url, "LACUNA_HANDLERS": "log"}
    assert main(["handlers"], env) == 0
    out = capsys.readouterr().out
    _no_raw_control(out)
    assert "\nlog running" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\nlog running\\x9b2J\\x7f\\u2028" in out

    capsys.readouterr()
    assert main(["events", "show", "evt_ctl"], env) == 0
    out = capsys.readouterr().out
    _no_raw_control(out)
    for argv in (["events", "show", "evt_ctl", "--json"], ["deliveries", "list", "--json"]):
        assert main(argv, env) == 0
        out = capsys.readouterr().out
        _no_raw_control(out)
        doc = json.loads(out)  # still JSON, with the same values
        deliveries = doc["deliveries"] if isinstance(doc, dict) else doc
        errors = {d["handler"]: d["last_error"] for d in deliveries}
        assert errors["slack"] == HOSTILE
        if isinstance(doc, dict):
            assert doc["payload"]["data"]["title"] == HOSTILE
            assert {d["handler"]: d["result"] for d in deliveries}["log"] == {"note": HOSTILE}


def test_send_prints_the_answer_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """The receiver's answer (reason phrase and body) comes from the network: printed
    escaped, the body's own line breaks kept."""
    import http.server

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = ("first\n" + HOSTILE).encode()
            self.send_response(200, "OK\x1b[2J")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert main(["send", "--url", url, "--secret", "whsec_a"], {}) == 0
    finally:
        thread.join(10)
        server.server_close()
    out = capsys.readouterr().out
    _no_raw_control(out)
    assert out.startswith("200 OK\\x1b[2J\nfirst\n\\x1b]0;pwned")


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`events list --json | head -1`: the reader goes away after one line. The command
    stops with exit code 141 (128 + SIGPIPE, as a shell reports other tools) and writes no
    traceback (it was a BrokenPipeError traceback, and another at the interpreter's exit)."""
    url = f"sqlite:///{tmp_path / 'pipe.db'}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        now = datetime.now(UTC)
        for i in range(2000):
            event = Event.from_body(orjson.dumps(make_event(f"evt_pipe_{i:04d}")))
            await store.accept(event, ["log"], now=now)
        await store.close()

    asyncio.run(fill())
    env = {**os.environ, "LACUNA_DATABASE_URL": url}
    # Several times a pipe's 64 KiB buffer, so that the writes meet the closed pipe.
    for command in (
        ["events", "list", "--limit", "2000", "--json"],
        ["deliveries", "list", "--limit", "2000"],
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "lacuna_webhooks", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.read(100)  # what `head -c 100` reads
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 141, err
        assert err == ""


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_1(
    db: dict[str, str], stdout: str
) -> None:
    """`events list > /dev/full` ended with an OSError traceback (ENOSPC), and with stdout
    closed (`>&-`) the output was dropped with exit 0. Now one line on stderr and exit 1
    for every command that prints, the interpreter's own flush at exit included."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    redirect = ">/dev/full" if stdout == "/dev/full" else ">&-"
    reason = "No space left on device" if stdout == "/dev/full" else "Bad file descriptor"
    env = {**os.environ, **db, "LACUNA_HANDLERS": "log,slack"}
    for command in (
        ["events", "list"],
        ["events", "show", "evt_cli_bad", "--json"],
        ["deliveries", "list"],
        ["handlers"],
        ["replay", "--all", "--dry-run"],
        ["replay", "--all", "--dry-run", "--json"],
        ["--version"],
    ):
        shell = ["sh", "-c", f'exec "$0" "$@" {redirect}']
        done = subprocess.run(
            [*shell, sys.executable, "-m", "lacuna_webhooks", *command],
            env=env,
            capture_output=True,
            timeout=60,
        )
        err = done.stderr.decode()
        assert err == f"lacuna-webhooks: error: cannot write to standard output: {reason}\n", (
            command,
            err,
        )
        assert done.returncode == 1, command


def test_a_stdout_that_fails_in_process_is_one_line(
    db: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through `main` in this process: a write that fails is the one line."""

    class Full:
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["events", "list"], db) == 1
    assert capsys.readouterr().err == (
        "lacuna-webhooks: error: cannot write to standard output: No space left on device\n"
    )
    assert isinstance(sys.stdout, Full)  # put back


def test_listen_status_lines_into_a_closed_pipe_end_with_141(tmp_path: Path) -> None:
    """`listen ... 2>&1 | head -3`: its status lines' reader goes away; it ended with exit 1
    (the broken pipe taken for "cannot keep the cursor file", whose own line then failed),
    not 141 as every other command."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lacuna_webhooks",
            "listen",
            "--url",
            "http://127.0.0.1:1",
            "--token",
            "x",
            "--forward-to",
            "http://127.0.0.1:2",
            "--cursor-file",
            str(tmp_path / "cursor.json"),
        ],
        env={**os.environ, "HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    assert proc.stderr.readline()  # what `head -1` reads
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141


def test_dev_with_a_bad_setting_is_one_line_before_any_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make run` with a mistyped setting: the one configuration line and exit 2, without the
    "Send it a signed test event" banner printed first as if it were serving."""
    monkeypatch.chdir(tmp_path)
    env = {"LACUNA_RETRY_BASE_DELAY": "abc", "PORT": "8000"}
    assert main(["dev", "--env-file", str(tmp_path / ".env")], env) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacuna-webhooks: error: configuration: LACUNA_RETRY_BASE_DELAY"), err
    assert "Send it a signed test event" not in err
    assert len(err.splitlines()) == 1


def test_dev_completes_a_copy_of_the_env_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`.env.example` copied to `.env`, as it says to: its empty secret and empty handler list
    are completed (the secret, and the log handler the README describes), and it does not make
    the development server listen on every interface."""
    monkeypatch.chdir(tmp_path)
    example = Path(__file__).resolve().parents[2] / ".env.example"
    env_file = tmp_path / ".env"
    env_file.write_text(example.read_text())
    assert main(["dev", "--env-file", str(env_file)], {"PORT": "eighty"}) == 2  # stops there
    capsys.readouterr()
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["LACUNA_WEBHOOK_SECRET"].startswith("whsec_dev_")
    assert values["LACUNA_HANDLERS"] == "log"
    assert "HOST" not in values  # 127.0.0.1 unless set


def test_dev_banner_lists_the_database_the_env_file_chose(tmp_path: Path) -> None:
    """The banner's "Then look at it" command lists the database `dev` serves: when `.env`
    chose it, the command reads `.env` first (the other commands read only the environment,
    and listed the default database instead)."""
    from lacuna_webhooks.cli import _dev_look_command

    env_file = tmp_path / "my env"
    plain = ".venv/bin/lacuna-webhooks events list"
    assert _dev_look_command(env_file, {"LACUNA_HANDLERS": "log"}, {}) == plain
    url = {"LACUNA_DATABASE_URL": "sqlite:///./mydev.db"}
    assert _dev_look_command(env_file, url, url) == plain  # the environment chose it
    command = _dev_look_command(env_file, url, {})
    assert command == f"(set -a; . '{env_file}'; set +a; {plain})"
    env_file.write_text("LACUNA_DATABASE_URL=sqlite:///./mydev.db\n")
    shown = subprocess.run(
        ["sh", "-c", command.replace(plain, 'echo "$LACUNA_DATABASE_URL"')],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == "sqlite:///./mydev.db\n"


def test_dev_banner_names_the_admin_api_and_the_console_never_the_token() -> None:
    """With a token, the banner says where the admin API and the console answer (the console's
    URL was missing) without printing the token; without one, how to turn them on."""
    from lacuna_webhooks.cli import _dev_admin_line

    token = "t" * 40
    line = _dev_admin_line({"LACUNA_ADMIN_TOKEN": token, "LACUNA_ADMIN_PORT": "8101"})
    assert "Admin API: http://127.0.0.1:8101/api/v1/events" in line
    assert "Console: http://127.0.0.1:8101/ " in line
    assert token not in line
    assert "Admin API: off" in _dev_admin_line({})
    # It names the file dev read (--env-file), not always .env.
    assert "set LACUNA_ADMIN_TOKEN in local.env " in _dev_admin_line({}, Path("local.env"))


@pytest.mark.parametrize("line", ["LACUNA_HANDLERS slack", "LACUNA HANDLERS=slack", "=x"])
def test_dev_refuses_an_env_file_line_that_is_not_key_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    """A typo in `.env` used to be skipped in silence, leaving its setting unset. It is one
    line naming the line number, not its text (it may hold a secret), and exit 2."""
    env_file = tmp_path / ".env"
    env_file.write_text(f"# comment\n\nLACUNA_WEBHOOK_SECRET=whsec_hidden_value\n{line}\n")
    assert main(["dev", "--env-file", str(env_file)], {}) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lacuna-webhooks: error: --env-file: {env_file} line 4 is not KEY=VALUE "
        "(a comment starts with #)\n"
    )


def test_dev_reads_an_env_file_that_starts_with_a_byte_order_mark(tmp_path: Path) -> None:
    """A `.env` saved by an editor that writes a UTF-8 byte-order mark was refused, "line 1 is
    not KEY=VALUE": the mark is part of no key, and is skipped as dotenv tools skip it."""
    from lacuna_webhooks.cli import CommandError, _load_env_file

    env_file = tmp_path / ".env"
    env_file.write_bytes("LACUNA_HANDLERS=log\nPORT=8123\n".encode("utf-8-sig"))
    assert _load_env_file(env_file) == {"LACUNA_HANDLERS": "log", "PORT": "8123"}
    # Only at the start of the file: one inside a line is still that line's text.
    env_file.write_bytes(b"PORT=8123\n\xef\xbb\xbfLACUNA_HANDLERS=log\n")
    with pytest.raises(CommandError, match="line 2 is not KEY=VALUE"):
        _load_env_file(env_file)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "is not a valid URL"),
        ("http://[zz]:1/", "is not a valid URL"),
        ("http://127.0.0.1:70000/hook", "a port that is not a number from 1 to 65535"),
        ("http://", "has no host"),
        ("http:///x", "has no host"),
        ("ftp://x/", "got ftp scheme"),
        # Accepted, then every forward failed and was retried forever.
        (" http://127.0.0.1:3000/hook", "holds a space or a control character"),
    ],
)
def test_listen_forward_to_that_cannot_be_sent_to_is_one_line_and_exit_2(
    url: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused at start: it was a traceback (a bad IPv6 literal), a traceback at the first
    event forwarded (port 70000), or accepted and run ("forwarding to http://")."""
    argv = ["listen", "--forward-to", url, "--url", "http://127.0.0.1:9", "--token", "t" * 40]
    assert main(argv, {}) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacuna-webhooks: error: --forward-to "), err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


@pytest.mark.parametrize("argv", [["events", "list"], ["migrate"]])
def test_a_database_url_with_control_characters_is_one_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newline, an ESC and a NUL in LACUNA_DATABASE_URL (a _FILE can hold a NUL): the
    error spanned lines with a raw ESC byte, and a NUL failed the SQLite writer's thread."""
    url = f"sqlite:///{tmp_path}/x\n\x1b[31mRED\x00.db"
    assert main(argv, {"LACUNA_DATABASE_URL": url}) == 2
    err = capsys.readouterr().err
    assert err == (
        "lacuna-webhooks: error: configuration: LACUNA_DATABASE_URL holds a control character"
        " (a newline, a NUL, an escape)\n"
    )


def test_an_error_line_shows_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every error line goes out with its control characters escaped, whatever it quotes
    (here a file name holding a newline and an ESC): one line that cannot drive the
    terminal."""
    folder = tmp_path / "a\nb\x1b[31m"
    folder.mkdir()
    env_file = folder / ".env"
    env_file.write_text("not a setting\n")
    assert main(["dev", "--env-file", str(env_file)], {}) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "\x1b" not in err
    assert "a\\nb\\x1b[31m" in err


def test_a_listener_on_all_ipv6_addresses_takes_ipv4_too() -> None:
    """`::` alone: one dual-stack socket, as the admin listener always had (binding it IPv6
    only lost `listen --url http://127.0.0.1:8001`); a host that resolves to both families
    gets a socket per family, the IPv6 one IPv6 only."""
    import socket

    from lacuna_webhooks.cli import _bind

    (sock,) = _bind("::", 0, "(HOST, PORT)")
    try:
        sock.listen()
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with socket.create_connection(("::1", port), timeout=5):
            pass
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["events", "show", "\udcff"], "event_id"),
        (["events", "list", "--type", "\udcff"], "--type"),
        (["replay", "--task-id", "\udcff", "--dry-run"], "--task-id"),
        (["replay", "--match", "data.title:\udcff", "--dry-run"], "--match"),
        (["send", "--id", "\udcff", "--url", "http://127.0.0.1:9/x"], "--id"),
        (["send", "--secret", "\udcff", "--url", "http://127.0.0.1:9/x"], "--secret"),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    db: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], name: str
) -> None:
    """Such bytes reach argv as lone surrogates: the store's driver refused them and the
    error blamed LACUNA_DATABASE_URL ("check its form") or a pruned cursor; `send --id`
    named --set. Now a usage error naming the argument, exit 2."""
    with pytest.raises(SystemExit) as caught:
        main(argv, db)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {name}: not valid UTF-8 text" in err
    assert "LACUNA_DATABASE_URL" not in err


@pytest.mark.parametrize("host", ["\udcff", "a" * 70, "a..b", ",", "a,b", "host:80", "\x1b[2J"])
def test_serve_host_is_checked_as_host_is(capsys: pytest.CaptureFixture[str], host: str) -> None:
    """`serve --host` skipped HOST's check: the resolver's UnicodeError was a traceback."""
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--host", host], {"LACUNA_WEBHOOK_SECRET": "whsec_a"})
    assert caught.value.code == 2
    assert "argument --host: is not a valid address or host name" in capsys.readouterr().err


def test_send_timeout_has_an_upper_bound(capsys: pytest.CaptureFixture[str]) -> None:
    """`send --timeout 1e300` passed the check and ended in httpx's OverflowError traceback."""
    with pytest.raises(SystemExit) as caught:
        main(["send", "--timeout", "1e300", "--url", "http://127.0.0.1:9/x"], {})
    assert caught.value.code == 2
    assert "argument --timeout: must be a number above 0 and at most 86400" in (
        capsys.readouterr().err
    )


def test_send_with_an_empty_secret_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`--secret ''` fell back to LACUNA_WEBHOOK_SECRET in silence: the user asked for a
    secret and got another one."""
    env = {"LACUNA_WEBHOOK_SECRET": "whsec_from_the_environment"}
    assert main(["send", "--secret", "", "--url", "http://127.0.0.1:9/x"], env) == 2
    assert "--secret names no secret" in capsys.readouterr().err


def test_tail_help_says_where_it_starts(capsys: pytest.CaptureFixture[str]) -> None:
    """``tail`` keeps no cursor: its ``--from`` help said "where to start without a saved
    cursor", which is ``listen``'s (docs/cli.md: tail's --from is now or every stored event
    first)."""
    for command, expected in (("tail", "every stored event first"), ("listen", "saved cursor")):
        with pytest.raises(SystemExit):
            main([command, "--help"], {})
        help_text = " ".join(capsys.readouterr().out.split())
        assert expected in help_text
    with pytest.raises(SystemExit):
        main(["tail", "--help"], {})
    assert "saved cursor" not in capsys.readouterr().out


def test_a_url_in_the_wrong_setting_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A URL pasted into a number, a choice or a list setting was quoted whole in the error
    line, its password with it (`LACUNA_RETENTION_DAYS must be a number, got
    'postgresql://app:pw@db/x'`): the line promises never to show one. Global settings and a
    handler instance's alike, reported together."""
    url = "postgresql://app:Zq8pLwX3hunter2@db.internal:5432/lacuna"
    env = {
        "LACUNA_WEBHOOK_SECRET": "whsec_a",
        "LACUNA_HANDLERS": "app=http",
        "LACUNA_APP_URL": "http://127.0.0.1:9/x",
        "LACUNA_APP_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "LACUNA_RETENTION_DAYS": url,
        "LACUNA_HANDLER_CONCURRENCY": url,
        "LACUNA_SQLITE_SYNCHRONOUS": url,
        "LACUNA_DISPATCH": url,
        "LACUNA_TRUSTED_PROXIES": url,
        "PORT": url,
        "LACUNA_APP_RETRY_MAX_DELAY": url,
    }
    assert main(["serve"], env) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    for var in ("LACUNA_RETENTION_DAYS", "LACUNA_SQLITE_SYNCHRONOUS", "LACUNA_DISPATCH", "PORT"):
        assert var in err
    assert "hunter2" not in err
    assert "postgresql://db.internal:5432" in err  # which URL it was, as log lines show it


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        # A credential given to a command that takes none, or to a mistyped option: argparse
        # quoted the unrecognized arguments whole, the token with them.
        (["migrate", "--token", "Tk" * 20], "unrecognized arguments: --token …"),
        (["serve", "--secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2La"], "arguments: --secret=…"),
        (["events", "list", "--tokne", "Tk" * 20], "unrecognized arguments: --tokne …"),
        (["events", "show", "--", "--url", "http://h", "--token", "Tk" * 20], "h --token …"),
        # A positional one is still named, escaped: raw, a newline split the line and an
        # ESC drove the terminal.
        (["events", "show", "evt_1", "evt_2"], "unrecognized arguments: evt_2 ("),
        (["migrate", "a\nb\x1b[2J"], "unrecognized arguments: a\\nb\\x1b[2J ("),
        # A short option's value written against it, and a URL given as a positional
        # argument (migrate takes the database from LACUNA_DATABASE_URL): both were whole.
        (["migrate", "-t" + "Tk" * 20], "unrecognized arguments: -t… ("),
        (
            ["migrate", "postgresql://app:MfKQ9r8GKYq@db.internal/lacuna"],
            "unrecognized arguments: postgresql://db.internal/… (",
        ),
    ],
)
def test_unrecognized_arguments_are_named_without_values_and_escaped(
    argv: list[str], shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv, {})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert shown in err
    assert "TkTk" not in err
    assert "MfKQ" not in err
    assert "\x1b" not in err


def test_a_url_in_a_tracing_setting_is_named_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The OpenTelemetry settings' checks quoted a bad value whole, as the service's own did:
    a URL's password went into the error line with it."""
    url = "postgresql://app:Zq8pLwX3hunter2@db.internal:5432/lacuna"
    env = {
        "LACUNA_WEBHOOK_SECRET": "whsec_a",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_TRACES_EXPORTER": f"otlp,{url}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": url,
        "OTEL_BSP_SCHEDULE_DELAY": url,
        "OTEL_TRACES_SAMPLER_ARG": url,
        "OTEL_RESOURCE_ATTRIBUTES": url,
    }
    assert main(["serve"], env) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_BSP_SCHEDULE_DELAY"):
        assert var in err
    assert "hunter2" not in err


@pytest.mark.parametrize("argv", [["migrate"], ["events", "list"]])
@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("sslmode=requre", "`sslmode` parameter must be one of"),
        ("ssl_min_protocol_version=TLSv9", "No such TLS version"),
    ],
)
def test_a_postgres_url_option_the_driver_refuses_is_a_bad_setting(
    argv: list[str], query: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncpg refuses such an option before it connects; it was reported as a store that
    is down ("store unavailable", exit 1), which `serve` under a supervisor retries forever.
    No server is needed: the refusal comes first."""
    url = f"postgresql://app:Zq8pLwX3hunter2@127.0.0.1:1/lacuna?{query}"
    assert main(argv, {"LACUNA_DATABASE_URL": url}) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacuna-webhooks: error: configuration: LACUNA_DATABASE_URL: "), err
    assert said in err
    assert len(err.splitlines()) == 1
    assert "hunter2" not in err
