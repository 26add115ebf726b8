"""Every store command through a remote admin API (docs/cli.md#local-or-remote): ``events list``
(with the filters of ``GET /events``), ``events show``, ``deliveries list``, ``retry-dead``,
``handlers`` and ``handlers pause|resume``, in-process (``cli.main``) against a real admin
listener (uvicorn on a socket, tests/integration/servers.py) over a real SQLite file.

The same commands run locally on that very file (``LACUNA_DATABASE_URL``) must print the same
text and the same ``--json`` document. With ``LACUNA_ADMIN_URL`` set the local store is never
read nor written, even when ``LACUNA_DATABASE_URL`` names one; a wrong token, an unreachable
URL and the API's refusals are one line on stderr with the documented exit code."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from lacuna_webhooks import cli
from lacuna_webhooks.admin import AdminContext
from lacuna_webhooks.admin import client as admin_client
from lacuna_webhooks.cli import main
from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.store import Store, open_store
from lacuna_webhooks.store.base import ScanBudget
from tests.e2e.conftest import free_port
from tests.integration.servers import admin_listener
from tests.integration.test_admin_api import ENVIRON, TOKEN, admin_context, event, seed

#: What a local command needs beside LACUNA_DATABASE_URL: the listener's own handlers.
HANDLERS = {k: v for k, v in ENVIRON.items() if k.startswith("LACUNA_H")}
WRONG_TOKEN = "adm_" + "w" * 40
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\nhook running\x9b2J\x7f\u2028"


def cli_run(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Any:
    """``(exit code, stdout, stderr)`` of one command (argparse's exit too)."""
    try:
        code = main(argv, env)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ok(argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = cli_run(argv, env, capsys)
    assert code == 0, err
    assert err == ""
    return str(out)


def one_line(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str], code: int
) -> str:
    """The one stderr line of a command that failed with ``code``; nothing on stdout."""
    got, out, err = cli_run(argv, env, capsys)
    assert got == code, (argv, out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lacuna-webhooks: error: ")
    assert "Traceback" not in err
    return str(lines[0])


def _read(url: str) -> tuple[dict[tuple[str, str], str], set[str]]:
    """The store's ``{(event, handler): status}`` and its paused handlers."""

    async def read() -> tuple[dict[tuple[str, str], str], set[str]]:
        store = open_store(url)
        await store.open()
        try:
            found = await store.list_deliveries(limit=1000)
            paused = set(await store.paused_handlers())
        finally:
            await store.close()
        return {(d.event_id, d.handler): d.status.value for d in found}, paused

    return asyncio.run(read())


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real admin listener over ``seed``'s e1..e4 (audit: e1 done, e2 dead; the rest
    pending). ``remote``: an operator's environment naming it; ``local``: the environment
    of a command on the deployment's own machine, reading the same file directly."""
    path = tmp_path / "deployment.db"
    with admin_listener(path, seed, admin_context) as (url, _app):
        db = f"sqlite:///{path}"
        yield {"url": url, "db": db}


@pytest.fixture
def remote(deployment: dict[str, str]) -> dict[str, str]:
    return {"LACUNA_ADMIN_URL": deployment["url"], "LACUNA_ADMIN_TOKEN": TOKEN}


@pytest.fixture
def local(deployment: dict[str, str]) -> dict[str, str]:
    return {"LACUNA_DATABASE_URL": deployment["db"], **HANDLERS}


@pytest.fixture
def elsewhere(tmp_path: Path) -> dict[str, str]:
    """Another store on the operator's machine (``LACUNA_DATABASE_URL``) holding one event
    whose audit delivery is dead: a command that wrongly works on it shows ``local_only``,
    or makes that delivery pending."""
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"

    async def fill() -> None:
        store = open_store(url)
        await store.open()
        try:
            now = datetime.now(UTC)
            assert await store.accept(event("local_only"), ["audit"], now=now)
            for d in await store.claim(handler="audit", limit=1, lease=timedelta(1), now=now):
                assert await store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, "local"))
        finally:
            await store.close()

    asyncio.run(fill())
    return {"LACUNA_DATABASE_URL": url, **HANDLERS}


# --- the same output, locally and remotely ------------------------------------------------------

SAME_OUTPUT = [
    ["events", "list"],
    ["events", "list", "--json"],
    ["events", "list", "--limit", "2", "--json"],
    ["events", "list", "--type", "job.completed", "--json"],
    ["events", "list", "--task-id", "task_1"],
    ["events", "list", "--handler", "audit", "--status", "dead", "--json"],
    ["events", "list", "--status", "done"],
    ["events", "list", "--match", "data.title:Late Night Study", "--match", "data.n:2"],
    ["events", "list", "--q", "Morning", "--json"],
    ["events", "list", "--since", "2000-01-01", "--until", "2000-01-02"],
    ["events", "show", "e1"],
    ["events", "show", "e1", "--json"],
    ["events", "show", "e2"],
    ["events", "show", "e2", "--json"],
    ["deliveries", "list"],
    ["deliveries", "list", "--json"],
    ["deliveries", "list", "--status", "dead", "--json"],
    ["deliveries", "list", "--handler", "hook", "--limit", "3"],
    ["deliveries", "list", "--event", "e3", "--json"],
]


@pytest.mark.parametrize("argv", SAME_OUTPUT, ids=" ".join)
def test_a_remote_command_prints_what_the_local_one_prints(
    argv: list[str],
    deployment: dict[str, str],
    remote: dict[str, str],
    local: dict[str, str],
    elsewhere: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through ``LACUNA_ADMIN_URL`` (with another store named by ``LACUNA_DATABASE_URL``,
    never read) and through ``--url``/``--token``: the text and the ``--json`` document the
    same command prints on the deployment's store directly."""
    here = ok(argv, local, capsys)
    assert "local_only" not in here
    assert ok(argv, {**remote, **elsewhere}, capsys) == here
    flags = ["--url", deployment["url"], "--token", TOKEN]
    assert ok([*argv, *flags], {}, capsys) == here


def test_events_list_filters_select_as_the_api(
    remote: dict[str, str], local: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The filters of ``GET /events``, in both modes: each selects the events the admin API
    selects (seed: e1/e3 Late Night Study, e2 audit dead, e4 job.progress)."""
    cases = [
        (["--type", "job.completed"], ["e3", "e1"]),
        (["--task-id", "task_1"], ["e2", "e1"]),
        (["--handler", "audit", "--status", "dead"], ["e2"]),
        (["--handler", "audit", "--status", "due"], ["e4", "e3"]),
        (["--match", "data.title:Late Night Study", "--match", "data.n:2"], ["e3"]),
        (["--q", "Morning"], ["e4"]),
        (["--limit", "3"], ["e4", "e3", "e2"]),
    ]
    everything = json.loads(ok(["events", "list", "--json"], remote, capsys))
    received = {e["id"]: e["received_at"] for e in everything}
    cases.append((["--since", received["e2"], "--until", received["e4"]], ["e3", "e2"]))
    for options, wanted in cases:
        for env in (local, remote):
            found = json.loads(ok(["events", "list", *options, "--json"], env, capsys))
            assert [e["id"] for e in found] == wanted, (options, env)


def test_remote_listings_follow_next_cursor(
    remote: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pages of one record: ``events list`` and ``deliveries list`` follow ``next_cursor``
    until ``--limit`` or the last page."""
    monkeypatch.setattr(cli, "PAGE_SIZE", 1)
    found = json.loads(ok(["events", "list", "--json"], remote, capsys))
    assert [e["id"] for e in found] == ["e4", "e3", "e2", "e1"]
    found = json.loads(ok(["events", "list", "--limit", "3", "--json"], remote, capsys))
    assert [e["id"] for e in found] == ["e4", "e3", "e2"]
    found = json.loads(ok(["deliveries", "list", "--json"], remote, capsys))
    assert [d["id"] for d in found] == list(range(8, 0, -1))


def budgeted_context(store: Store) -> AdminContext:
    """The listener's context with a search budget that stops every scan after one event."""
    ctx = admin_context(store)
    ctx.search_budget = ScanBudget(0.0, first_window=1, max_window=1)
    return ctx


def test_a_remote_search_cut_short_by_its_budget_is_followed_to_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deployment whose searches stop at their time budget answers pages with fewer events
    than asked (even none) and a cursor: ``events list --q`` follows them and finds every
    match, as the local search does."""
    with admin_listener(tmp_path / "budget.db", seed, budgeted_context) as (url, _app):
        env = {"LACUNA_ADMIN_URL": url, "LACUNA_ADMIN_TOKEN": TOKEN}
        found = json.loads(ok(["events", "list", "--q", "Late Night", "--json"], env, capsys))
        assert [e["id"] for e in found] == ["e3", "e1"]
        found = json.loads(
            ok(["events", "list", "--q", "Late", "--limit", "1", "--json"], env, capsys)
        )
        assert [e["id"] for e in found] == ["e3"]


def test_handlers_remotely_shows_the_deployments_instances_and_state(
    deployment: dict[str, str],
    remote: dict[str, str],
    local: dict[str, str],
    elsewhere: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``handlers`` through ``GET /handlers``: the deployment's instances in the local
    listing's columns, and the same ``state:`` lines; not the local LACUNA_HANDLERS (here
    ``elsewhere`` configures only ``audit``)."""
    assert main(["handlers", "pause", "hook", "--reason", "Hook outage"], local) == 0
    capsys.readouterr()
    here = ok(["handlers"], local, capsys)
    there = ok(["handlers"], {**remote, **elsewhere, "LACUNA_HANDLERS": "audit=log"}, capsys)
    assert there.splitlines()[0] == (
        f"configured instances (LACUNA_HANDLERS of {deployment['url']}):"
    )
    assert there.split("\n", 1)[1] == here.split("configured instances (LACUNA_HANDLERS):\n")[1]
    assert "  hook         paused since " in there
    assert there.rstrip().endswith(": Hook outage")
    flags = ["--url", deployment["url"], "--token", TOKEN]
    assert ok(["handlers", *flags], {}, capsys) == there


# --- changes reach the deployment, never the local store ----------------------------------------


def test_retry_dead_and_pause_act_on_the_deployment_not_the_local_store(
    deployment: dict[str, str],
    remote: dict[str, str],
    elsewhere: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With LACUNA_ADMIN_URL set (and LACUNA_DATABASE_URL naming another store, whose dead
    delivery would be retried): ``retry-dead``, ``handlers pause`` and ``resume`` change the
    deployment's store and leave the local one as it was."""
    env = {**remote, **elsewhere}
    before_here = _read(elsewhere["LACUNA_DATABASE_URL"])
    assert ok(["retry-dead", "--handler", "audit"], env, capsys).startswith(
        "1 dead deliveries are due again"
    )
    assert ok(["retry-dead"], env, capsys).startswith("0 dead deliveries are due again")
    assert ok(["handlers", "pause", "hook", "--reason", "maintenance"], env, capsys).startswith(
        "paused hook: its deliveries wait"
    )
    assert ok(["handlers", "pause", "hook"], env, capsys).strip() == "hook was already paused"
    statuses, paused = _read(deployment["db"])
    assert statuses[("e2", "audit")] == "pending"
    assert paused == {"hook"}
    assert _read(elsewhere["LACUNA_DATABASE_URL"]) == before_here
    assert ok(["handlers", "resume", "hook"], env, capsys).startswith("resumed hook")
    assert ok(["handlers", "resume", "hook"], env, capsys).strip() == "hook was not paused"
    assert _read(deployment["db"])[1] == set()
    assert _read(elsewhere["LACUNA_DATABASE_URL"]) == before_here


def test_url_and_token_options_reach_the_deployment(
    deployment: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--url``/``--token`` on each changing command, before or after a subcommand's
    name; no local settings at all on the operator's side."""
    flags = ["--url", deployment["url"], "--token", TOKEN]
    assert ok(["retry-dead", *flags], {}, capsys).startswith("1 dead deliveries")
    assert ok(["handlers", *flags, "pause", "audit"], {}, capsys).startswith("paused audit")
    assert ok(["handlers", "resume", "audit", *flags], {}, capsys).startswith("resumed audit")
    assert ok(["handlers", "pause", "hook", *flags], {}, capsys).startswith("paused hook")
    statuses, paused = _read(deployment["db"])
    assert statuses[("e2", "audit")] == "pending"
    assert paused == {"hook"}


def test_local_mode_still_works(local: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Without --url and LACUNA_ADMIN_URL (LACUNA_ADMIN_TOKEN alone is the server's own
    setting, not a choice of API): the store of LACUNA_DATABASE_URL, as before, and the new
    filters of ``events list`` there too."""
    env = {**local, "LACUNA_ADMIN_TOKEN": TOKEN}
    assert "e4  job.progress" in ok(["events", "list"], env, capsys)
    assert "e2  job.failed" in ok(["events", "list", "--status", "dead"], env, capsys)
    assert ok(["retry-dead"], env, capsys).startswith("1 dead deliveries are due again")
    assert ok(["handlers", "pause", "hook"], env, capsys).startswith("paused hook")
    statuses, paused = _read(local["LACUNA_DATABASE_URL"])
    assert statuses[("e2", "audit")] == "pending"
    assert paused == {"hook"}


# --- failures: one line, the documented exit code -----------------------------------------------

EVERY_COMMAND = [
    ["events", "list"],
    ["events", "list", "--json"],
    ["events", "show", "e1"],
    ["deliveries", "list"],
    ["retry-dead"],
    ["handlers"],
    ["handlers", "pause", "hook"],
    ["handlers", "resume", "hook"],
]


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=" ".join)
def test_a_wrong_token_is_one_line_and_exit_1(
    argv: list[str],
    deployment: dict[str, str],
    elsewhere: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The listener's 401, from LACUNA_ADMIN_TOKEN or --token: exit 1, one line, never the
    token; the local store (LACUNA_DATABASE_URL) is not used instead."""
    env = {**elsewhere, "LACUNA_ADMIN_URL": deployment["url"], "LACUNA_ADMIN_TOKEN": WRONG_TOKEN}
    for argv_, env_ in (
        (argv, env),
        ([*argv, "--url", deployment["url"], "--token", WRONG_TOKEN], elsewhere),
    ):
        line = one_line(argv_, env_, capsys, 1)
        assert "401 unauthorized" in line, line
        assert WRONG_TOKEN not in line
    assert _read(deployment["db"])[1] == set()
    assert _read(elsewhere["LACUNA_DATABASE_URL"])[0][("local_only", "audit")] == "dead"


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=" ".join)
def test_an_unreachable_admin_api_is_one_line_and_exit_1(
    argv: list[str], elsewhere: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at LACUNA_ADMIN_URL: exit 1 and one line naming it, not the local
    store instead."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**elsewhere, "LACUNA_ADMIN_URL": url, "LACUNA_ADMIN_TOKEN": TOKEN}
    line = one_line(argv, env, capsys, 1)
    assert f"cannot reach the admin API at {url}/" in line, line
    assert _read(elsewhere["LACUNA_DATABASE_URL"])[0][("local_only", "audit")] == "dead"


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=" ".join)
def test_an_admin_url_without_a_token_is_a_usage_error(
    argv: list[str], elsewhere: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """LACUNA_ADMIN_URL set but no token: exit 2 and one line, never the local store."""
    env = {**elsewhere, "LACUNA_ADMIN_URL": "http://127.0.0.1:9"}
    line = one_line(argv, env, capsys, 2)
    assert "give the admin token: --token or LACUNA_ADMIN_TOKEN" in line
    assert _read(elsewhere["LACUNA_DATABASE_URL"])[0][("local_only", "audit")] == "dead"


@pytest.mark.parametrize("argv", [*EVERY_COMMAND, ["tail"]], ids=" ".join)
def test_a_token_without_an_admin_url_is_a_usage_error(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--token`` without --url or LACUNA_ADMIN_URL: exit 2, before any store is opened
    (``tail`` followed the local store, the token dropped without a word)."""
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}", **HANDLERS}
    line = one_line([*argv, "--token", TOKEN], env, capsys, 2)
    assert "--token needs --url (or LACUNA_ADMIN_URL)" in line
    assert TOKEN not in line


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["events", "list", "--since", "yesterday"], 2, "400 invalid_request: since must be RFC"),
        (["events", "list", "--match", "nocolon"], 2, "400 invalid_request: match must be"),
        (["events", "list", "--q", "x" * 1001], 2, "400 invalid_request: q must be 1 to 1000"),
        (["retry-dead", "--handler", "nope"], 2, "400 invalid_request: 'nope' is not a configured"),
        (["handlers", "pause", "nope"], 2, "404 not_found: No configured handler 'nope'"),
        (["handlers", "resume", "nope"], 2, "404 not_found: No configured handler 'nope'"),
        (["events", "show", "nope"], 1, "404 not_found: No event 'nope'"),
        (["events", "show", ".."], 1, "404 not_found: No event '..'"),
    ],
)
def test_the_apis_refusals_are_one_line_with_the_local_exit_code(
    argv: list[str],
    code: int,
    message: str,
    remote: dict[str, str],
    local: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A filter the API refuses (400) and a handler the deployment does not configure (400,
    404) are exit 2, an unknown event exit 1: the exit code of the same refusal locally."""
    line = one_line(argv, remote, capsys, code)
    assert message in line, line
    one_line(argv, local, capsys, code)


# --- values from the network are printed escaped ------------------------------------------------


async def hostile_seed(store: Store) -> None:
    """An event whose id, type, payload, error and result hold terminal controls (a store
    written before intake refused such ids), and hook paused for a reason holding them."""
    now = datetime.now(UTC)
    raw = orjson.dumps({"id": "evt_x\x1b[31m", "type": "job.completed\r\nX", "data": HOSTILE})
    hostile = Event(
        id="evt_x\x1b[31m",
        type="job.completed\r\nX",
        payload=orjson.loads(raw),
        raw=raw,
        created=None,
    )
    assert await store.accept(hostile, ["audit", "hook"], now=now)
    for handler in ("audit", "hook"):
        for d in await store.claim(handler=handler, limit=1, lease=timedelta(1), now=now):
            if handler == "audit":
                done = Attempt(now, now, AttemptOutcome.OK, None, {"note": HOSTILE})
                assert await store.complete(d, done)
            else:
                assert await store.dead(d, Attempt(now, now, AttemptOutcome.DEAD, HOSTILE))
    await store.set_paused("hook", True, reason=HOSTILE, now=now)


def test_values_from_the_network_are_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Control characters in an id, a type, an error, a result, a payload and a pause
    reason the API answers are printed escaped (``--json`` as JSON escapes), as the local
    commands print them from the store."""
    path = tmp_path / "hostile.db"
    with admin_listener(path, hostile_seed, admin_context) as (url, _app):
        remote = {"LACUNA_ADMIN_URL": url, "LACUNA_ADMIN_TOKEN": TOKEN}
        local = {"LACUNA_DATABASE_URL": f"sqlite:///{path}", **HANDLERS}
        for argv in (
            ["events", "list"],
            ["events", "list", "--json"],
            ["events", "show", "evt_x\x1b[31m"],
            ["events", "show", "evt_x\x1b[31m", "--json"],
            ["deliveries", "list"],
            ["deliveries", "list", "--json"],
            ["handlers"],
        ):
            out = ok(argv, remote, capsys)
            for c in ("\x1b", "\x07", "\x9b", "\x7f", "\u2028", "\r"):
                assert c not in out, (argv, repr(c))
            if argv[0] != "handlers":
                assert out == ok(argv, local, capsys)
            if "--json" in argv:
                json.loads(out)  # still JSON
        assert "\\x1b]0;pwned\\x07\\x1b[2J\\nhook running" in ok(["handlers"], remote, capsys)


# --- an answer that is not the API's --------------------------------------------------------------


@pytest.fixture
def httpserver_quiet(httpserver: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``httpserver`` without its access log: once an earlier test's ``logs.configure`` left
    the root logger writing to a stream now closed, each request line was a logging error
    on the command's stderr."""
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)
    return httpserver


def _answering(httpserver: Any, body: str) -> str:
    httpserver.clear()
    for path, method in (
        ("/api/v1/events", "GET"),
        ("/api/v1/events/e1", "GET"),
        ("/api/v1/deliveries", "GET"),
        ("/api/v1/deliveries/retry-dead", "POST"),
        ("/api/v1/handlers", "GET"),
        ("/api/v1/handlers/hook/pause", "POST"),
        ("/api/v1/handlers/hook/resume", "POST"),
    ):
        httpserver.expect_request(path, method=method).respond_with_data(
            body, status=200, content_type="application/json"
        )
    return str(httpserver.url_for("/"))


@pytest.mark.parametrize(
    "body",
    [
        "[1, 2]",
        '{"data": "x", "next_cursor": null}',
        '{"data": [{"id": 1}], "next_cursor": null}',
        '{"data": [], "next_cursor": 7}',
        '{"retried": -1, "paused": "yes", "changed": 1, "raw": null}',
    ],
)
@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=" ".join)
def test_an_answer_of_another_shape_is_one_line_and_exit_1(
    argv: list[str], body: str, httpserver_quiet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another service (or a proxy) at --url answering JSON of another shape: one line
    naming the operation, exit 1, never a traceback."""
    url = _answering(httpserver_quiet, body)
    line = one_line([*argv, "--url", url, "--token", TOKEN], {}, capsys, 1)
    assert "with an unexpected answer" in line, line


def test_a_cursor_that_does_not_move_ends_the_listing(
    httpserver_quiet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server answering every page with the cursor it was given would be followed for
    ever: the listing stops with one line."""
    url = _answering(httpserver_quiet, '{"data": [], "next_cursor": "same"}')
    line = one_line(["events", "list", "--url", url, "--token", TOKEN], {}, capsys, 1)
    assert "ending where it started" in line


# --- a broken or hostile server: real sockets, its answers written byte for byte ----------------

T0 = "2026-12-01T00:00:00+00:00"
DELIVERY: dict[str, Any] = {
    "id": 1,
    "event_id": "e1",
    "event_type": "job.completed",
    "handler": "hook",
    "status": "done",
    "attempts": 1,
    "next_attempt_at": T0,
    "lease_until": None,
    "last_error": None,
    "created_at": T0,
    "updated_at": T0,
    "result": None,
    "attempt_log": [],
}
EVENT: dict[str, Any] = {
    "id": "e1",
    "type": "job.completed",
    "created": None,
    "received_at": T0,
    "task_id": None,
    "superseded": False,
    "raw": '{"id": "e1", "type": "job.completed"}',
    "deliveries": [DELIVERY],
}
HANDLER: dict[str, Any] = {
    "name": "hook",
    "kind": "http",
    "paused": False,
    "paused_reason": None,
    "paused_since": None,
    "consecutive_failures": 0,
}
#: A valid answer of each route EVERY_COMMAND calls: only the way it is sent is wrong.
VALID: dict[str, Any] = {
    "/api/v1/events": {"data": [], "next_cursor": None},
    "/api/v1/events/e1": EVENT,
    "/api/v1/deliveries": {"data": [], "next_cursor": None},
    "/api/v1/deliveries/retry-dead": {"retried": 0},
    "/api/v1/handlers": {"data": [], "next_cursor": None},
    "/api/v1/handlers/hook/pause": {"paused": True, "changed": True},
    "/api/v1/handlers/hook/resume": {"paused": False, "changed": True},
}


def target(head: bytes) -> tuple[str, dict[str, list[str]]]:
    """The path and the query of a request's head."""
    parts = urlsplit(head.split(b" ", 2)[1].decode())
    return parts.path, parse_qs(parts.query)


def http_answer(status: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\nConnection: close\r\n" + headers + b"\r\n" + body
    )  # fmt: skip


@dataclass
class RawServer:
    url: str
    heads: list[bytes]
    stop: threading.Event


Answer = Callable[[socket.socket, bytes, threading.Event], None]


@contextlib.contextmanager
def raw_server(answer: Answer) -> Iterator[RawServer]:
    """A real HTTP server on 127.0.0.1, in threads: for each connection it reads the
    request's head, records it, and calls ``answer(connection, head, stop)``, which writes
    whatever it likes (or nothing); the connection is closed after. ``stop`` is set when the
    test is done with the server."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    server = RawServer(f"http://127.0.0.1:{listener.getsockname()[1]}", [], threading.Event())

    def one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            server.heads.append(head)
            answer(conn, head, server.stop)

    def accept() -> None:
        while not server.stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        thread.join()
        listener.close()


def answering(body: Any) -> Answer:
    """Every request answered 200 with ``body`` (JSON, deeper than orjson writes too, or
    bytes as they are)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda conn, head, stop: conn.sendall(http_answer(b"200 OK", raw))


@pytest.mark.parametrize("status", [b"302 Found", b"307 Temporary Redirect"])
@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=" ".join)
def test_a_redirect_is_neither_followed_nor_taken_as_the_answer(
    argv: list[str], status: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 3xx carrying a body of the right shape was printed as the answer (exit 0). It is
    one line naming where it pointed (without its path or query), exit 1; the request,
    which carries the token, never goes there."""
    with raw_server(answering(b"")) as elsewhere:

        def redirect(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
            location = f"Location: {elsewhere.url}/api/v1/x?token={TOKEN}\r\n".encode()
            body = orjson.dumps(VALID[target(head)[0]])
            conn.sendall(http_answer(status, body, location))

        with raw_server(redirect) as proxy:
            line = one_line([*argv, "--url", proxy.url, "--token", TOKEN], {}, capsys, 1)
    assert f"with a redirect ({status[:3].decode()} to {elsewhere.url}/…), not followed" in line
    assert TOKEN not in line
    assert elsewhere.heads == []


def silent(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    stop.wait(30)


def head_only(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    stop.wait(30)


def trickle(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """A byte every 0.2 s (for 10 s at most): each read is quick, the answer never ends."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(50):
        if stop.wait(0.2):
            return
        conn.sendall(b" ")


@pytest.mark.parametrize("answer", [silent, head_only, trickle])
@pytest.mark.parametrize("argv", [["events", "list"], ["handlers", "pause", "hook"]], ids=" ".join)
def test_a_server_that_does_not_answer_in_time_is_one_line_and_exit_1(
    argv: list[str],
    answer: Answer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The request's time bounds the whole answer: a server sending a byte now and then
    was waited on for ever (each read was within the timeout), and one that never answered
    was ``cannot reach the admin API at …: `` with nothing after the colon."""
    monkeypatch.setattr(admin_client, "TIMEOUT_SECONDS", 1.0)
    with raw_server(answer) as server:
        started = time.monotonic()
        line = one_line([*argv, "--url", server.url, "--token", TOKEN], {}, capsys, 1)
        elapsed = time.monotonic() - started
    assert f"the admin API at {server.url}/… did not answer " in line, line
    assert line.endswith(" within 1 s"), line
    assert elapsed < 5


def endless(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """A chunked answer without end (32 MiB at most, then the connection is cut)."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(512):
        conn.sendall(b"10000\r\n" + b" " * 0x10000 + b"\r\n")


def endless_error(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 33554432\r\n\r\n")
    for _ in range(512):
        conn.sendall(b"x" * 0x10000)


def inflating(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """8 KiB on the wire, 8 MiB once decompressed."""
    body = gzip.compress(b" " * (8 * 1024 * 1024))
    conn.sendall(http_answer(b"200 OK", body, b"Content-Encoding: gzip\r\n"))


@pytest.mark.parametrize("answer", [endless, endless_error, inflating])
@pytest.mark.parametrize("argv", [["events", "list"], ["retry-dead"]], ids=" ".join)
def test_an_answer_larger_than_any_of_the_api_is_cut_off(
    argv: list[str],
    answer: Answer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An answer was read whole into memory, however long (or however much it inflated):
    past ``MAX_ANSWER_BYTES`` (1 MiB here) it is one line and exit 1."""
    monkeypatch.setattr(admin_client, "MAX_ANSWER_BYTES", 1024 * 1024)
    with raw_server(answer) as server:
        line = one_line([*argv, "--url", server.url, "--token", TOKEN], {}, capsys, 1)
    assert "with more than 1048576 bytes: stopped reading" in line, line


@pytest.mark.parametrize("argv", [["events", "list"], ["deliveries", "list"]], ids=" ".join)
def test_a_listing_going_round_in_a_cycle_of_cursors_is_stopped(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a cursor equal to the one just sent was caught: a server whose cursors go
    A, B, A, B… (with empty pages) was followed for ever."""
    count = itertools.count()

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        if next(count) >= 200:
            conn.sendall(http_answer(b"500 Enough", b""))
            return
        cursor = target(head)[1].get("cursor", ["B"])[0]
        page = {"data": [], "next_cursor": "A" if cursor == "B" else "B"}
        conn.sendall(http_answer(b"200 OK", orjson.dumps(page)))

    with raw_server(answer) as server:
        line = one_line([*argv, "--url", server.url, "--token", TOKEN], {}, capsys, 1)
    assert "where an earlier page ended (it would go round for ever): stopped" in line, line
    assert len(server.heads) == 3


@pytest.mark.parametrize("argv", [["events", "list"], ["deliveries", "list"]], ids=" ".join)
def test_a_listing_of_empty_pages_without_end_is_stopped(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server answering empty pages, each with a new cursor, was followed for ever: past
    ``MAX_EMPTY_PAGES`` (20 here) the listing stops with one line."""
    monkeypatch.setattr(cli, "MAX_EMPTY_PAGES", 20)
    count = itertools.count()

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        n = next(count)
        if n >= 200:
            conn.sendall(http_answer(b"500 Enough", b""))
            return
        conn.sendall(http_answer(b"200 OK", orjson.dumps({"data": [], "next_cursor": f"c{n}"})))

    with raw_server(answer) as server:
        line = one_line([*argv, "--url", server.url, "--token", TOKEN], {}, capsys, 1)
    assert "gave 20 pages without a record and still a next one: stopped" in line, line
    assert len(server.heads) == 20


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"n": 1}
    for _ in range(depth):
        doc = {"n": doc}
    return doc


PAST_UTC = "0001-01-01T00:00:00+01:00"  # before 0001-01-01 in UTC
BEYOND_UTC = "9999-12-31T23:59:59-23:59"  # after 9999-12-31 in UTC


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        (["events", "list"], {"data": [{**EVENT, "received_at": PAST_UTC}], "next_cursor": None}),
        (["events", "show", "e1"], {**EVENT, "received_at": BEYOND_UTC}),
        (
            ["deliveries", "list"],
            {"data": [{**DELIVERY, "next_attempt_at": BEYOND_UTC}], "next_cursor": None},
        ),
        (["handlers"], {"data": [{**HANDLER, "paused_since": PAST_UTC}], "next_cursor": None}),
        # Deeper than orjson writes: a traceback when printed.
        (["events", "show", "e1"], {**EVENT, "deliveries": [{**DELIVERY, "result": nested(300)}]}),
        (
            ["deliveries", "list", "--json"],
            {"data": [{**DELIVERY, "result": nested(300)}], "next_cursor": None},
        ),
        # Not one JSON text: embedded as it is, it forged the --json document's keys.
        (["events", "show", "e1", "--json"], {**EVENT, "raw": '1, "forged": true'}),
        (["events", "show", "e1"], {**EVENT, "raw": '{"a": 1} {"b": 2}'}),
        (["events", "show", "e1"], {**EVENT, "raw": "\x1b[2J"}),
        (["events", "show", "e1"], {**EVENT, "raw": ""}),
    ],
)
def test_values_no_store_holds_are_an_unexpected_answer(
    argv: list[str], body: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Values of the right type that no deployment sends: a time that is out of range in
    UTC, a result nested deeper than can be printed, a body that is not one JSON text."""
    with raw_server(answering(body)) as server:
        line = one_line([*argv, "--url", server.url, "--token", TOKEN], {}, capsys, 1)
    assert "with an unexpected answer" in line, line


def test_a_body_orjson_cannot_read_is_still_printed_as_received(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The check of ``raw`` takes every JSON text: numbers beyond a double and a lone
    surrogate escape (a body stored before intake refused them) still print as stored."""
    raw = '{"id": "e1", "n": 1e400, "s": "\\ud800"}'
    with raw_server(answering({**EVENT, "raw": raw})) as server:
        out = ok(
            ["events", "show", "e1", "--json", "--url", server.url, "--token", TOKEN], {}, capsys
        )
    assert json.loads(out)["payload"]["s"] == "\ud800"
    assert '"n": 1e400' in out


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # An A-label that is no IDNA: httpx decoded it only when it sent, a traceback.
        ("http://xn--zz.invalid:8001", "is not a valid URL"),
        ("http://admin host:8001", "holds a space or a control character"),
        ("http://127.0.0.1:8001/a\tb", "holds a space or a control character"),
        # It said "must be the admin listener's http(s):// URL, got a http: URL".
        ("http://127.0.0.1:8001/" + "a" * 2000, "is longer than 2000 characters"),
    ],
)
@pytest.mark.parametrize("argv", [["events", "list"], ["retry-dead"]], ids=" ".join)
def test_a_bad_admin_url_is_one_line_and_exit_2(
    argv: list[str], url: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL no request can be sent to, or one too long, is a usage error before anything
    is sent (``check_admin_url``): exit 2, the URL not echoed."""
    line = one_line([*argv, "--url", url, "--token", TOKEN], {}, capsys, 2)
    assert line.startswith("lacuna-webhooks: error: --url / LACUNA_ADMIN_URL "), line
    assert message in line
    assert url not in line
