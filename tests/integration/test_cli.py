"""The store commands of the CLI, in-process against a real SQLite file."""

from __future__ import annotations

import asyncio
import json
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


def test_retry_dead_then_replay(db: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["retry-dead", "--handler", "slack"], db) == 0
    assert capsys.readouterr().out.startswith("1 dead deliveries are due again")
    assert main(["deliveries", "list", "--status", "dead", "--json"], db) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["replay", "evt_cli_ok"], db) == 0
    assert "1 deliveries due now" in capsys.readouterr().out
    assert main(["replay", "evt_cli_ok", "--handler", "email"], db) == 0
    capsys.readouterr()
    assert main(["deliveries", "list", "--event", "evt_cli_ok", "--json"], db) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["handler"], r["status"], r["attempts"]) for r in rows) == [
        ("email", "pending", 0),
        ("log", "pending", 0),
    ]


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "list", "--limit", "0"], "--limit: must be greater than 0"),
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
        (["--timeout", "nan"], "--timeout: must be a finite number above 0"),
        (["--timeout", "-1"], "--timeout: must be a finite number above 0"),
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
        (["--url", "ftp://x"], "--url must start with http:// or https://"),
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
