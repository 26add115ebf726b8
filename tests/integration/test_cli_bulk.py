"""``replay`` with filters and ``backfill HANDLER`` (cli.py): locally on a real SQLite file
(``LACUNA_DATABASE_URL``), and remotely against a real admin listener (uvicorn on a socket,
``--url``/``--token`` or ``LACUNA_ADMIN_URL``/``LACUNA_ADMIN_TOKEN``); bad arguments are one
line and exit 2, never a traceback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lacuna_webhooks.cli import main
from lacuna_webhooks.models import Attempt, AttemptOutcome
from lacuna_webhooks.store import Store, open_store
from tests.e2e.conftest import free_port
from tests.integration.servers import admin_listener
from tests.integration.test_admin_api import TOKEN, event
from tests.integration.test_admin_bulk import bulk_context
from tests.integration.test_cli_remote import answering, nested, raw_server

HANDLERS = "audit=log,hook=log,late=log"


async def _seed(store: Store) -> None:
    """c1..c3 job.completed, c4 job.failed with a dead audit delivery; none has ``late``."""
    now = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(1, 4):
        assert await store.accept(event(f"c{i}", task_id=f"t{i}"), ["audit"], now=now)
    assert await store.accept(event("c4", "job.failed", task_id="t4"), ["audit"], now=now)
    for d in await store.claim(handler="audit", limit=10, lease=timedelta(minutes=1), now=now):
        if d.event.id == "c4":
            assert await store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, "410 Gone"))
        else:
            assert await store.complete(d, Attempt(now, now, AttemptOutcome.OK, None))


def _deliveries(url: str) -> dict[tuple[str, str], str]:
    async def read() -> dict[tuple[str, str], str]:
        store = open_store(url)
        await store.open()
        try:
            found = await store.list_deliveries(limit=1000)
        finally:
            await store.close()
        return {(d.event_id, d.handler): d.status.value for d in found}

    return asyncio.run(read())


@pytest.fixture
def local(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'bulk.db'}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        try:
            await _seed(store)
        finally:
            await store.close()

    asyncio.run(fill())
    return {"LACUNA_DATABASE_URL": url, "LACUNA_HANDLERS": HANDLERS}


def run(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Any:
    """The exit code and the JSON printed by a ``--json`` command."""
    assert main(argv, env) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    # The in-process listener's log lines (structlog, unconfigured here) share stdout.
    return json.loads(out[out.index("{\n") :])


def refused(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a command refused with exit 2 (argparse's too)."""
    try:
        code = main(argv, env)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in captured.err
    return lines[0]


# --- local ---------------------------------------------------------------------------------------


def test_backfill_locally(local: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """backfill late --all: one new pending delivery per event, nothing else touched; again:
    nothing created; the text output says so."""
    before = _deliveries(local["LACUNA_DATABASE_URL"])
    dry = run(["backfill", "late", "--all", "--dry-run", "--json"], local, capsys)
    assert dry == {"matched": 4, "created": 0, "reset": 0, "dry_run": True}
    assert _deliveries(local["LACUNA_DATABASE_URL"]) == before
    answer = run(["backfill", "late", "--all", "--json"], local, capsys)
    assert answer == {"matched": 4, "created": 4, "reset": 0, "dry_run": False}
    after = _deliveries(local["LACUNA_DATABASE_URL"])
    assert {k: v for k, v in after.items() if k[1] == "late"} == {
        (f"c{i}", "late"): "pending" for i in range(1, 5)
    }
    assert {k: v for k, v in after.items() if k[1] != "late"} == before
    assert main(["backfill", "late", "--all"], local) == 0
    out = capsys.readouterr().out
    assert "4 events matched; 0 deliveries created, 0 made due again" in out


def test_replay_with_filters_locally(
    local: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--status dead --handler audit selects c4: its dead delivery is due again; --type with
    --to creates and resets; --match and --task-id select like the API."""
    answer = run(["replay", "--handler", "audit", "--status", "dead", "--json"], local, capsys)
    assert answer == {"matched": 1, "created": 0, "reset": 1, "dry_run": False}
    assert _deliveries(local["LACUNA_DATABASE_URL"])[("c4", "audit")] == "pending"
    answer = run(
        ["replay", "--type", "job.completed", "--to", "audit", "--to", "late", "--json"],
        local,
        capsys,
    )
    assert answer == {"matched": 3, "created": 3, "reset": 3, "dry_run": False}
    answer = run(["replay", "--task-id", "t2", "--dry-run", "--json"], local, capsys)
    assert answer["matched"] == 1
    answer = run(
        ["replay", "--match", "data.id:t3", "--q", "t3", "--since", "2000-01-01", "--json"],
        local,
        capsys,
    )
    assert answer == {"matched": 1, "created": 0, "reset": 2, "dry_run": False}
    answer = run(["replay", "--until", "2000-01-01", "--json"], local, capsys)
    assert answer["matched"] == 0


def test_single_event_replay_keeps_working(
    local: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "c4"], local) == 0
    assert "replayed c4: 1 deliveries due now" in capsys.readouterr().out
    assert run(["replay", "c1", "--to", "late", "--json"], local, capsys) == {
        "event_id": "c1",
        "replayed": 1,
    }
    assert _deliveries(local["LACUNA_DATABASE_URL"])[("c1", "late")] == "pending"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay"], "give at least one filter (--type, --task-id"),
        (["backfill", "late"], "or --all to take every stored event"),
        (["replay", "--all", "--type", "job.failed"], "--all takes every stored event"),
        (["replay", "c1", "--all"], "EVENT_ID replays one event: --all"),
        (["replay", "c1", "--type", "x", "--dry-run"], "--type, --dry-run select events"),
        (["replay", "--handler", "audit", "--handler", "hook"], "--handler (the filter)"),
        (["replay", "--since", "yesterday"], "--since: since must be RFC 3339"),
        (["replay", "--since", "2026-02-01", "--until", "2026-01-01"], "since must be before"),
        (["replay", "--match", "nocolon"], "--match: match must be <dotted.path>:<value>"),
        (["replay", "--q", ""], "--q: q must be 1 to"),
        (["backfill", "nope", "--all"], "HANDLER: 'nope' is not a configured handler"),
        (["replay", "--all", "--to", "nope"], "--to: 'nope' is not a configured handler"),
        (["backfill", "Not-A-Name", "--all"], "must be a handler name"),
        (["replay", "--status", "lost"], "invalid choice"),
        (["replay", "--all", "--token", "x" * 40], "--token needs --url"),
        (["replay", "--all", "--url", "ftp://host"], "must be the admin listener's http(s)"),
        (["replay", "--all", "--url", "http://127.0.0.1:9"], "give the admin token"),
    ],
)
def test_bad_arguments_are_one_line(
    local: dict[str, str], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _deliveries(local["LACUNA_DATABASE_URL"])
    line = refused(argv, {**local, "LACUNA_ADMIN_TOKEN": ""}, capsys)
    assert message in line, line
    assert line.startswith("lacuna-webhooks")
    assert _deliveries(local["LACUNA_DATABASE_URL"]) == before


# --- remote ------------------------------------------------------------------------------------


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real admin listener (uvicorn on a socket, in a thread with its own loop, where its
    SQLite store lives) over the seeded events; the env of a CLI on another machine."""
    path = tmp_path / "remote.db"
    with admin_listener(path, _seed, bulk_context) as (url, _app):
        # No LACUNA_DATABASE_URL: the command must not touch a local store.
        yield {"url": url, "db": f"sqlite:///{path}"}


def test_backfill_remotely(remote: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """--url/--token, then LACUNA_ADMIN_URL/LACUNA_ADMIN_TOKEN (several tokens: the first);
    no LACUNA_DATABASE_URL or webhook secret on the operator's side."""
    flags = ["--url", remote["url"], "--token", TOKEN]
    dry = run(["backfill", "late", "--all", "--dry-run", "--json", *flags], {}, capsys)
    assert dry == {"matched": 4, "created": 0, "reset": 0, "dry_run": True}
    answer = run(["backfill", "late", "--type", "job.completed", "--json", *flags], {}, capsys)
    assert answer == {"matched": 3, "created": 3, "reset": 0, "dry_run": False}
    env = {"LACUNA_ADMIN_URL": remote["url"] + "/", "LACUNA_ADMIN_TOKEN": f"{TOKEN},other"}
    answer = run(["backfill", "late", "--all", "--json"], env, capsys)
    assert answer == {"matched": 4, "created": 1, "reset": 0, "dry_run": False}
    answer = run(["replay", "--status", "dead", "--to", "audit", "--json"], env, capsys)
    assert answer == {"matched": 1, "created": 0, "reset": 1, "dry_run": False}
    assert main(["replay", "c2", "--to", "hook"], env) == 0
    assert "replayed c2: 1 deliveries due now" in capsys.readouterr().out
    stored = _deliveries(remote["db"])
    assert {k for k in stored if k[1] == "late"} == {(f"c{i}", "late") for i in range(1, 5)}
    assert stored[("c4", "audit")] == "pending"
    assert stored[("c2", "hook")] == "pending"


def test_remote_refusals_are_one_line(
    remote: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The listener's 400 is exit 2 with its message; a wrong token or no listener exit 1;
    never the token in the output."""
    env = {"LACUNA_ADMIN_URL": remote["url"], "LACUNA_ADMIN_TOKEN": TOKEN}
    line = refused(["backfill", "nope", "--all"], env, capsys)
    assert "400 invalid_request: 'nope' is not a configured handler" in line
    line = refused(["replay", "--since", "yesterday"], env, capsys)
    assert "since must be RFC 3339" in line
    wrong = {**env, "LACUNA_ADMIN_TOKEN": "adm_" + "w" * 40}
    assert main(["replay", "--all", "--dry-run"], wrong) == 1
    err = capsys.readouterr().err
    assert "401 unauthorized" in err
    assert "w" * 40 not in err
    gone = {**env, "LACUNA_ADMIN_URL": f"http://127.0.0.1:{free_port()}"}
    assert main(["replay", "--all", "--dry-run"], gone) == 1
    err = capsys.readouterr().err
    assert "cannot reach the admin API" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["replay", "nope_evt"], env) == 1
    assert "404 not_found" in capsys.readouterr().err


# --- hostile URLs and answers ------------------------------------------------------------------

SECRET_TOKEN = "adm_" + "s" * 40


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://", "must be http(s)://HOST[:PORT]"),
        ("https://", "must be http(s)://HOST[:PORT]"),
        ("http://[::1", "is not a valid URL"),
        ("http://127.0.0.1:99999", "is not a valid URL"),
        ("ftp://operator:pw-Secret-42@host", "got a ftp: URL"),
        ("http://operator:pw-Secret-42@127.0.0.1:9", "must not hold credentials"),
        ("https://127.0.0.1:9/?token=pw-Secret-42", "without a query or fragment"),
    ],
)
def test_bad_urls_are_usage_errors_that_never_echo_them(
    url: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --url (or LACUNA_ADMIN_URL) is exit 2 and one line that never repeats the URL:
    it may hold a password; an invalid one is not a traceback."""
    for argv, env in (
        (["replay", "--all", "--url", url, "--token", SECRET_TOKEN], {}),
        (["backfill", "late", "--all"], {"LACUNA_ADMIN_URL": url, "LACUNA_ADMIN_TOKEN": "x" * 40}),
    ):
        line = refused(argv, env, capsys)
        assert message in line, line
        assert "pw-Secret-42" not in line
        assert SECRET_TOKEN not in line


@pytest.mark.parametrize("token", ["tok" + "é" * 40, SECRET_TOKEN + "\nX", SECRET_TOKEN + " x"])
def test_a_token_that_cannot_be_a_header_is_a_usage_error(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token that is not visible ASCII cannot go in a header: one line, exit 2 (it was a
    UnicodeEncodeError traceback), never the token itself."""
    for argv, env in (
        (["replay", "--all", "--url", "http://127.0.0.1:9", "--token", token], {}),
        (["replay", "c1"], {"LACUNA_ADMIN_URL": "http://127.0.0.1:9", "LACUNA_ADMIN_TOKEN": token}),
    ):
        line = refused(argv, env, capsys)
        assert "must be printable ASCII" in line
        assert SECRET_TOKEN not in line
        assert "é" not in line


def _answering(httpserver: Any, status: int, body: str, content_type: str) -> str:
    httpserver.clear()
    for path in ("/api/v1/replays", "/api/v1/events/c1/replay"):
        httpserver.expect_request(path, method="POST").respond_with_data(
            body, status=status, content_type=content_type
        )
    return str(httpserver.url_for("/"))


@pytest.mark.parametrize(
    ("status", "body", "content_type", "code", "message"),
    [
        (200, "<html>a proxy's page</html>", "text/html", 1, "with non-JSON"),
        (200, "[1, 2]", "application/json", 1, "unexpected answer"),
        (200, '"done"', "application/json", 1, "unexpected answer"),
        (200, '{"matched": "x", "replayed": -1}', "application/json", 1, "unexpected answer"),
        (500, "<h1>Internal\nServer Error</h1>", "text/html", 1, "500 INTERNAL SERVER ERROR"),
        (
            401,
            json.dumps(
                {
                    "error": {
                        "code": "unauthorized",
                        "message": f"bad Bearer {SECRET_TOKEN}\n\x1b[31mx",
                    }
                }
            ),
            "application/json",
            1,
            "401 unauthorized: bad Bearer ***\\n\\x1b[31mx",
        ),
        (400, '{"error": {"code": 7, "message": ["x"]}}', "application/json", 2, "400 BAD REQ"),
    ],
)
def test_a_hostile_admin_answer_is_one_line_without_the_token(
    httpserver: Any,
    status: int,
    body: str,
    content_type: str,
    code: int,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever the server at --url answers (another service, a proxy's page, a server
    echoing the Authorization header), bulk and single-event replay print one line, never
    a traceback, never the token given with --token, and exit 1 (2 for a 400)."""
    url = _answering(httpserver, status, body, content_type)
    for argv in (["replay", "--all"], ["replay", "c1"], ["backfill", "late", "--all"]):
        assert main([*argv, "--url", url, "--token", SECRET_TOKEN], {}) == code
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert message.lower() in err.lower(), err
        assert SECRET_TOKEN not in err


def test_a_remote_bulk_answer_prints_as_the_local_one(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` printed the server's whole answer: a key more than the local document has,
    or one nested deeper than orjson writes (a traceback). It prints the four keys."""
    answer = {"matched": 2, "created": 1, "reset": 1, "dry_run": False, "more": nested(300)}
    with raw_server(answering(answer)) as server:
        for argv in (["replay", "--all"], ["backfill", "late", "--all"]):
            printed = run([*argv, "--json", "--url", server.url, "--token", TOKEN], {}, capsys)
            assert printed == {"matched": 2, "created": 1, "reset": 1, "dry_run": False}


def test_a_local_replay_leaves_a_removed_handlers_deliveries(
    local: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``audit`` removed from LACUNA_HANDLERS: ``replay --all`` and ``replay EVENT_ID`` reset
    none of its deliveries (pending again, nothing would ever run them)."""
    env = {**local, "LACUNA_HANDLERS": "hook=log,late=log"}
    before = _deliveries(local["LACUNA_DATABASE_URL"])
    answer = run(["replay", "--all", "--json"], env, capsys)
    assert answer == {"matched": 4, "created": 0, "reset": 0, "dry_run": False}
    assert main(["replay", "c1"], env) == 1
    assert "has no deliveries to replay" in capsys.readouterr().err
    assert _deliveries(local["LACUNA_DATABASE_URL"]) == before


def test_a_local_backfill_follows_the_handlers_event_filter(
    local: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``late`` gets only job.failed (LACUNA_LATE_EVENTS): ``backfill late --all`` creates its
    delivery of c4 only, as intake would have."""
    env = {**local, "LACUNA_LATE_EVENTS": "job.failed"}
    answer = run(["backfill", "late", "--all", "--json"], env, capsys)
    assert answer == {"matched": 4, "created": 1, "reset": 0, "dry_run": False}
    stored = _deliveries(local["LACUNA_DATABASE_URL"])
    assert {k for k in stored if k[1] == "late"} == {("c4", "late")}


def test_a_remote_filter_too_large_is_a_usage_error(
    remote: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``--q`` larger than the admin's body limit is refused 413 by the listener: exit 2 and
    one line, as the same filter refused 400 (and as it is locally)."""
    env = {"LACUNA_ADMIN_URL": remote["url"], "LACUNA_ADMIN_TOKEN": TOKEN}
    line = refused(["replay", "--q", "x" * 70_000, "--dry-run"], env, capsys)
    assert "413 body_too_large" in line
    line = refused(["replay", "--q", "x" * 60_000, "--dry-run"], env, capsys)
    assert "400 invalid_request: q must be 1 to 1000" in line


def test_a_hung_listener_is_not_waited_on_for_an_hour_by_a_single_replay(
    httpserver: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``replay EVENT_ID --url`` against a listener that never answers gives up after the
    ordinary timeout (here 1 s), one line and exit 1; it used to wait the bulk operations'
    hour."""
    from lacuna_webhooks.admin import client

    release = threading.Event()

    def hang(request: Any) -> Any:
        release.wait(60)
        from werkzeug import Response

        return Response("{}", status=200)

    httpserver.expect_request("/api/v1/events/c1/replay", method="POST").respond_with_handler(hang)
    monkeypatch.setattr(client, "TIMEOUT_SECONDS", 1.0)
    result: dict[str, int] = {}

    def call() -> None:
        result["code"] = main(
            ["replay", "c1", "--url", httpserver.url_for("/"), "--token", SECRET_TOKEN], {}
        )

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(30)  # generous: the timeout is 1 s
    release.set()
    assert not thread.is_alive(), "the single replay still waits for the hung listener"
    assert result["code"] == 1
    err = capsys.readouterr().err
    assert "did not answer POST /events/c1/replay within 1 s" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("event_id", [".", ".."])
def test_a_dots_only_id_reaches_its_own_route_remotely(
    remote: dict[str, str], event_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``.`` and ``..`` are ids like any other: the HTTP client would resolve them away as
    path segments (reaching ``/api/v1/replay`` or ``/api/v1/events/replay``); sent
    percent-encoded they reach the event's replay route, which knows no such event."""
    env = {"LACUNA_ADMIN_URL": remote["url"], "LACUNA_ADMIN_TOKEN": TOKEN}
    assert main(["replay", event_id], env) == 1
    assert f"404 not_found: No event {event_id!r}" in capsys.readouterr().err
