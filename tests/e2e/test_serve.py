"""A real `serve` process: crashes, graceful stops, bad settings, an installed plugin."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_SECRET, make_event, process_exited, signed
from tests.e2e.conftest import (
    CLI,
    REPO,
    Serve,
    children,
    free_port,
    handler_workers,
    wait_until,
)
from tests.e2e.recorder_plugin import recorded

pytestmark = pytest.mark.e2e
RECORDER = "tests.e2e.recorder_plugin:FileRecorder"


def writer_children(serve: Serve) -> list[int]:
    """The process ids of ``serve``'s SQLite writer process (one, unless it is restarting)."""
    return [pid for pid, cmd in children(serve).items() if "store.sqlite.process" in cmd]


def send(serve: Serve, event_id: str) -> httpx.Response:
    body, headers = signed(make_event(event_id))
    return httpx.post(serve.webhook_url, content=body, headers=headers, timeout=10)


def test_sigkill_with_pending_deliveries_loses_nothing(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Every event answered 200 before a SIGKILL is delivered, exactly once, after a restart.

    The handler is slow, so at the kill some deliveries are leased (in flight)
    and the rest wait in the outbox; the restarted process takes the unclaimed
    ones at once and the leased ones when their lease expires.
    """
    out = tmp_path / "delivered.txt"
    env = {
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        "LACUNA_HANDLERS": RECORDER,
        "LACUNA_RECORDER_PATH": str(out),
        "LACUNA_RECORDER_DELAY": "30",
        "LACUNA_RECORDER_TIMEOUT": "2",
        "LACUNA_HANDLER_CONCURRENCY": "2",
    }
    first = serve_factory(env).start()
    ids = [f"evt_kill_{i:02d}" for i in range(20)]
    for event_id in ids:
        response = send(first, event_id)
        assert response.status_code == 200, response.text
        assert response.json()["duplicate"] is False
    (writer,) = writer_children(first)
    wait_until(lambda: handler_workers(first), what="the handler worker process")
    (worker,) = handler_workers(first)
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert recorded(out) == []  # nothing finished before the crash
    wait_until(
        lambda: process_exited(writer), timeout=30, what="the writer process to follow serve"
    )
    # The handler worker must not finish its attempts behind the restarted serve's back.
    wait_until(lambda: process_exited(worker), timeout=30, what="the handler worker to follow")

    serve_factory({**env, "LACUNA_RECORDER_DELAY": "0"}).start()
    wait_until(lambda: set(recorded(out)) == set(ids), timeout=90, what="every event delivered")
    assert sorted(recorded(out)) == sorted(ids)  # and none twice


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_in_flight_deliveries(
    serve_factory: type[Serve], tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM lets running handlers finish (within LACUNA_SHUTDOWN_TIMEOUT) and exits 0.
    SIGHUP (a closed terminal) is the same requested stop, not an exit at once (129)."""
    out = tmp_path / "delivered.txt"
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": RECORDER,
            "LACUNA_RECORDER_PATH": str(out),
            "LACUNA_RECORDER_DELAY": "1.5",
            "LACUNA_SHUTDOWN_TIMEOUT": "20",
        }
    ).start()
    ids = [f"evt_term_{i}" for i in range(3)]
    for event_id in ids:
        assert send(serve, event_id).status_code == 200
    db_env = {"LACUNA_DATABASE_URL": serve.env["LACUNA_DATABASE_URL"]}

    def all_running() -> bool:
        listed = run_cli("deliveries", "list", "--json", env=db_env, cwd=tmp_path)
        rows = json.loads(listed.stdout or "[]")
        return len(rows) == 3 and all(r["status"] == "running" for r in rows)

    wait_until(all_running, timeout=20, what="three deliveries in flight")
    (writer,) = writer_children(serve)
    (worker,) = handler_workers(serve)
    serve.signal(signum)
    assert serve.wait(timeout=40) == 0
    assert process_exited(writer)
    assert process_exited(worker)
    assert sorted(recorded(out)) == sorted(ids)
    assert "serve.stopped" in serve.log()


def test_a_second_interrupt_during_the_drain_stops_quietly(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """Ctrl-C, then Ctrl-C again while the drain waits (uvicorn's force quit): exit 130, as
    for one Ctrl-C, with one `serve.stopped` warning saying it was forced. It logged an
    error-level traceback of a CancelledError from the lifespan and no `serve.stopped`."""
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_SHUTDOWN_TIMEOUT": "30",
        }
    ).start()
    assert send(serve, "evt_forced").status_code == 200
    # Half a request: the drain waits for this connection, so the second signal finds it.
    with socket.create_connection(("127.0.0.1", serve.port)) as stalled:
        stalled.sendall(b"POST /webhooks/lacuna HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nab")
        serve.signal(signal.SIGINT)
        wait_until(lambda: "Waiting for connections to close" in serve.log(), what="the drain")
        serve.signal(signal.SIGINT)
        assert serve.wait(timeout=30) == 130
    log = serve.log()
    assert "Traceback" not in log
    assert '"level":"error"' not in log
    stopped = [json.loads(line) for line in log.splitlines() if '"serve.stopped"' in line]
    assert [(line.get("forced"), line["level"]) for line in stopped] == [(True, "warning")]
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT id FROM events").fetchall() == [("evt_forced",)]


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "LACUNA_WEBHOOK_SECRET is not set"),
        ({"LACUNA_WEBHOOK_SECRET": "s", "PORT": "eighty"}, "PORT must be a whole number"),
        ({"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_HANDLERS": "nosuch"}, "unknown handler 'nosuch'"),
        (
            {"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_HANDLERS": RECORDER},
            "LACUNA_RECORDER_PATH is required",
        ),
        ({"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_DATABASE_URL": "mysql://x"}, "LACUNA_DATABASE_URL"),
        # These started, then broke: an OverflowError traceback at start, a dispatcher that
        # stopped on its first claim (the lease overflowed a timedelta).
        (
            {"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_RETENTION_DAYS": "1e300"},
            "LACUNA_RETENTION_DAYS must be at most 36500",
        ),
        (
            {"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_HANDLER_TIMEOUT": "1e300"},
            "LACUNA_HANDLER_TIMEOUT must be at most 86400",
        ),
        (
            {"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_HANDLERS": "log", "LACUNA_LOG_TIMEOUT": "1e300"},
            "LACUNA_LOG_TIMEOUT must be at most 86400, got '1e300'",
        ),
    ],
)
def test_serve_refuses_bad_settings_with_one_line(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    result = run_cli(
        "serve", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env}, cwd=tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lacuna-webhooks: error: configuration: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_a_mistyped_variable_is_a_warning_at_start(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """`LACUNA_HANDLER=log` (for LACUNA_HANDLERS) started serve with no handler, silently: the
    variable is named in a warning at start with the name it was likely meant as, never its
    value; serve still runs."""
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLER": "log",
            "LACUNA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/sekrit",
        }
    ).start()
    assert send(serve, "evt_typo").status_code == 200
    lines = [json.loads(x) for x in serve.log().splitlines() if x.startswith("{")]
    warned = {x["variable"]: x["hint"] for x in lines if x["event"] == "config.unknown_variable"}
    assert warned == {"LACUNA_HANDLER": "did you mean LACUNA_HANDLERS?"}
    (unused,) = [x for x in lines if x["event"] == "config.unused_variables"]
    assert unused["variables"] == ["LACUNA_SLACK_WEBHOOK_URL"]
    assert "sekrit" not in serve.log()


def test_serve_that_cannot_listen_ends_with_one_line_naming_host_and_port(
    tmp_path: Path,
) -> None:
    """A port already taken: serve exits 1 with one ``lacuna-webhooks: error:`` line naming
    HOST, PORT and the reason, before it has opened the store or started a dispatcher (it
    used to start both, then stop them again, and point at uvicorn's log line)."""
    db = tmp_path / "events.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "LACUNA_WEBHOOK_SECRET": "s",
            "LACUNA_DATABASE_URL": f"sqlite:///{db}",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LACUNA_LOG_FORMAT": "json",
        }
        result = run_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"lacuna-webhooks: error: could not listen on 127.0.0.1:{port} (HOST, PORT): "
        "Address already in use"
    ]
    assert not db.exists()  # the store was never opened


def test_a_second_dev_on_a_port_in_use_prints_no_banner(tmp_path: Path) -> None:
    """A second `make run` beside the first: one line, no banner promising a server that
    will not come, and no store opened."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [CLI, "dev"],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "PORT": str(port), "LACUNA_LOG_FORMAT": "json"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"lacuna-webhooks: error: could not listen on 127.0.0.1:{port} (HOST, PORT): "
        "Address already in use"
    ]
    assert not (tmp_path / "lacuna-webhooks.db").exists()


def test_serve_refuses_an_unopenable_store(tmp_path: Path) -> None:
    """A database file that is not SQLite stops serve with one line, not a traceback."""
    bogus = tmp_path / "not-a.db"
    bogus.write_bytes(b"this is not a database" * 100)
    result = run_cli(
        "serve",
        env={"LACUNA_WEBHOOK_SECRET": "s", "LACUNA_DATABASE_URL": f"sqlite:///{bogus}"},
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "cannot open the store" in result.stderr
    assert "Traceback" not in result.stderr


def test_example_plugin_installed_with_pip_is_picked_up(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """examples/lacuna-webhooks-jsonl, once pip-installed, is LACUNA_HANDLERS=jsonl."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(REPO / "examples" / "lacuna-webhooks-jsonl"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    listed = run_cli("handlers", env={"PYTHONPATH": str(target)}, cwd=tmp_path)
    assert "jsonl" in listed.stdout
    out = tmp_path / "events.jsonl"
    serve = serve_factory(
        {
            "PYTHONPATH": str(target),
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": "jsonl",
            "LACUNA_JSONL_PATH": str(out),
        }
    ).start()
    body, headers = signed(make_event("evt_plugin"))
    assert httpx.post(serve.webhook_url, content=body, headers=headers).status_code == 200
    wait_until(lambda: out.exists() and out.read_bytes() == body + b"\n", what="jsonl line")


def _start_dev(folder: Path, port: str, **extra: str) -> subprocess.Popen[str]:
    """`dev` as `make run` starts it, in ``folder`` (its .env), its stderr (the banner) piped."""
    return subprocess.Popen(
        [CLI, "dev"],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "PORT": port, "LACUNA_LOG_FORMAT": "json", **extra},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_dev_mode_generates_a_secret_once(tmp_path: Path) -> None:
    """`make run`'s path: the secret is generated into .env once, printed with a send line."""
    env_file = tmp_path / ".env"
    port = str(free_port())
    proc = _start_dev(tmp_path, port)
    try:
        wait_until(
            lambda: env_file.exists() and "LACUNA_WEBHOOK_SECRET" in env_file.read_text(),
            what=".env",
        )
        secret = next(
            line.split("=", 1)[1]
            for line in env_file.read_text().splitlines()
            if line.startswith("LACUNA_WEBHOOK_SECRET=")
        )
        wait_until(lambda: _ready(port), timeout=30, what="dev server ready")
        result = run_cli(
            "send",
            "--url",
            f"http://127.0.0.1:{port}/webhooks/lacuna",
            "--secret",
            secret,
            env={"PATH": "/usr/bin:/bin"},
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("200 OK")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"--secret {secret}" in err
    assert f"send --url http://127.0.0.1:{port}/webhooks/lacuna" in err
    assert (env_file.stat().st_mode & 0o777) == 0o600
    # A second start reuses the same secret instead of generating another.
    before = env_file.read_text()
    again = subprocess.run(
        [CLI, "dev"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PORT": "eighty"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert again.returncode == 2  # bad PORT stops it, after reading .env
    assert env_file.read_text() == before


def _ready(port: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_send_reports_a_refusal(serve_factory: type[Serve], tmp_path: Path) -> None:
    """`send` with the wrong secret prints the 401 envelope and exits 1."""
    serve = serve_factory({"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}).start()
    result = run_cli(
        "send",
        "--url",
        serve.webhook_url,
        "--secret",
        "whsec_wrong",
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stdout.startswith("401")
    assert '"code":"invalid_signature"' in result.stdout
    ok = run_cli(
        "send",
        "--url",
        serve.webhook_url,
        "--type",
        "job.failed",
        env={"PATH": "/usr/bin:/bin", "LACUNA_WEBHOOK_SECRET": TEST_SECRET},
        cwd=tmp_path,
    )
    assert ok.returncode == 0
    assert '"duplicate":false' in ok.stdout


def received_lines(serve: Serve) -> list[dict[str, object]]:
    lines = [json.loads(x) for x in serve.log().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "webhook.received"]


@pytest.mark.parametrize(
    ("trusted", "expected"), [("127.0.0.1", "203.0.113.7"), ("10.9.8.7", "127.0.0.1")]
)
def test_a_refused_request_logs_its_client(
    serve_factory: type[Serve], tmp_path: Path, trusted: str, expected: str
) -> None:
    """A refused request's line names who sent it: the X-Forwarded-For client when the peer
    is a trusted proxy (LACUNA_TRUSTED_PROXIES), else the peer; accepted lines do not."""
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_TRUSTED_PROXIES": trusted,
        }
    ).start()
    body, headers = signed(make_event("evt_forged"), secret="whsec_not_ours")
    forwarded = {**headers, "x-forwarded-for": "203.0.113.7"}
    assert httpx.post(serve.webhook_url, content=body, headers=forwarded).status_code == 401
    assert send(serve, "evt_fine").status_code == 200
    wait_until(lambda: len(received_lines(serve)) == 2, what="two request lines")
    refused, accepted = received_lines(serve)
    assert (refused["status"], refused["outcome"]) == (401, "invalid_signature")
    assert refused["client"] == expected
    assert accepted["status"] == 200
    assert "client" not in accepted


def test_a_killed_writer_process_is_replaced_and_nothing_answered_is_lost(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SIGKILL of serve's SQLite writer child: requests meanwhile get 503 (never a 2xx for an
    unstored event), serve starts a new writer and accepts again; every 200 is stored."""
    db = tmp_path / "events.db"
    serve = serve_factory({"LACUNA_DATABASE_URL": f"sqlite:///{db}"}).start()
    (writer,) = writer_children(serve)
    answered = {}
    for i in range(5):
        answered[f"evt_before_{i}"] = send(serve, f"evt_before_{i}").status_code
    os.kill(writer, signal.SIGKILL)
    i = 0

    def accepting_again() -> bool:
        nonlocal i
        i += 1
        event_id = f"evt_during_{i}"
        response = send(serve, event_id)
        answered[event_id] = response.status_code
        assert response.status_code in (200, 503), response.text
        return response.status_code == 200

    wait_until(accepting_again, timeout=30, what="serve accepting again")
    (replacement,) = writer_children(serve)
    assert replacement != writer
    assert httpx.get(f"{serve.base_url}/readyz", timeout=5).status_code == 200
    assert "store.sqlite.writer_exited" in serve.log()
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM events")}
    assert {e for e, status in answered.items() if status == 200} <= stored
    assert serve.proc is not None
    assert serve.proc.poll() is None  # serve itself never stopped


def test_a_stopped_writer_does_not_outlive_a_killed_serve(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SIGSTOP of the SQLite writer child, then SIGKILL of serve (an OOM kill, a supervisor's
    final kill): the writer waited for its socket's end, which a stopped process never reads,
    so it lived on as an orphan (holding SQLite's write lock when stopped inside a
    transaction: the next serve then answered every webhook 503). It dies with serve now, and
    the next serve on the file stores and answers."""
    db = tmp_path / "events.db"
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{db}"}
    first = serve_factory(env).start()
    assert send(first, "evt_before_stop").status_code == 200
    (writer,) = writer_children(first)
    os.kill(writer, signal.SIGSTOP)
    try:
        first.signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        wait_until(
            lambda: process_exited(writer), timeout=30, what="the stopped writer to follow serve"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer, signal.SIGKILL)
    second = serve_factory(env).start()
    assert send(second, "evt_after_restart").status_code == 200
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM events")}
    assert {"evt_before_stop", "evt_after_restart"} <= stored


def test_dev_banner_send_line_pastes_whole_with_a_secret_the_shell_would_split(
    tmp_path: Path,
) -> None:
    """The banner's send line is shell-quoted: a secret from `.env` holding `$`, `;`, a
    space or a quote was printed bare, and pasting the line signed with a piece of it (401)
    and ran the rest as a command."""
    secret = 'whsec_ab$cd;ef gh"ij`kl'
    env_file = tmp_path / ".env"
    env_file.write_text(f"LACUNA_WEBHOOK_SECRET='{secret}'\n")
    port = str(free_port())
    proc = _start_dev(tmp_path, port)
    try:
        wait_until(lambda: _ready(port), timeout=30, what="dev server ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    line = next(x.strip() for x in err.splitlines() if " send --url " in x)
    assert line.startswith(".venv/bin/lacuna-webhooks send ")
    # The line as the shell reads it: the same words, the secret whole.
    shown = subprocess.run(
        ["sh", "-c", "printf '%s\\0' " + line.removeprefix(".venv/bin/lacuna-webhooks ")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.split("\0")[:-1] == [
        "send",
        "--url",
        f"http://127.0.0.1:{port}/webhooks/lacuna",
        "--secret",
        secret,
    ]


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_dev_banner_send_line_works_on_ipv6_loopback(tmp_path: Path, host: str) -> None:
    """HOST=::1: the banner printed `--url http://::1:PORT/...`, which `send` refuses (a port
    that is not a number); HOST=[::1] did not even bind. The line, pasted, now gets a 200."""
    port = str(free_port())
    banner = tmp_path / "banner.txt"
    with banner.open("w") as err:
        proc = subprocess.Popen(
            [CLI, "dev"],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "PORT": port, "HOST": host, "LACUNA_LOG_FORMAT": "json"},
            stderr=err,
            text=True,
        )
    try:
        wait_until(lambda: " send --url " in banner.read_text(), timeout=30, what="the banner")
        line = next(x.strip() for x in banner.read_text().splitlines() if " send --url " in x)
        assert f"--url http://[::1]:{port}/webhooks/lacuna " in line
        words = shlex.split(line)
        assert words[0] == ".venv/bin/lacuna-webhooks"
        wait_until(
            lambda: proc.poll() is not None or "serve.started" in banner.read_text(),
            timeout=30,
            what="serve started",
        )
        sent = subprocess.run(
            [CLI, *words[1:]], capture_output=True, text=True, timeout=60, check=False
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "200" in sent.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.parametrize("removed", ["folder", "files", "wal", "wal-behind-a-link"])
def test_a_database_removed_under_serve_gets_503_not_200(
    serve_factory: type[Serve], tmp_path: Path, removed: str
) -> None:
    """The data folder (or the database files, or the WAL alone) removed while `serve`
    runs: it went on answering 200 and /readyz ready, committing into unlinked files, and
    every one of those events was gone at the next start (which created a new, empty
    database). Now: 503 store_unavailable, /readyz 503, one error line."""
    folder = tmp_path / "data"
    db = folder / "events.db"
    url = f"sqlite:///{db}"
    if removed == "wal-behind-a-link":  # SQLite keeps the WAL beside the link's target
        folder.mkdir()
        (tmp_path / "link.db").symlink_to(db)
        url = f"sqlite:///{tmp_path / 'link.db'}"
    serve = serve_factory({"LACUNA_DATABASE_URL": url}).start()
    assert send(serve, "evt_before").status_code == 200
    if removed == "folder":
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    elif removed == "files":
        for path in folder.glob("events.db*"):
            path.unlink()
    else:
        (folder / "events.db-wal").unlink()
    answer = send(serve, "evt_after")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "store_unavailable"
    assert str(tmp_path) not in answer.text  # the server's paths are for its log
    wait_until(
        lambda: httpx.get(f"{serve.base_url}/readyz", timeout=10).status_code == 503,
        timeout=30,
        what="not ready",
    )
    # Logged by the writer process, in serve's format (it printed plain text before).
    (line,) = [x for x in serve.log().splitlines() if "store.sqlite.file_gone" in x]
    assert json.loads(line)["level"] == "error"
    assert httpx.get(f"{serve.base_url}/healthz", timeout=10).status_code == 200


def test_a_stop_with_a_stalled_writer_keeps_its_bound(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """SIGTERM while the SQLite writer process does not answer (stopped here; a hung disk
    alike) and an attempt is in flight: the stop waited for each store call until the stall
    watch killed the writer, a minute on (62 s with LACUNA_SHUTDOWN_TIMEOUT=5), past any
    orchestrator's grace period. It now keeps LACUNA_SHUTDOWN_TIMEOUT plus its fixed
    allowances (workers 5 s, releases 3 s, the writer 6 s)."""
    out = tmp_path / "started.txt"
    serve = serve_factory(
        {
            "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
            "LACUNA_HANDLERS": "tests.e2e.misbehaving_plugin:Misbehaving",
            "LACUNA_MISBEHAVING_PATH": str(out),
            "LACUNA_MISBEHAVING_NAP": "120",
            "LACUNA_HANDLER_TIMEOUT": "300",
            "LACUNA_SHUTDOWN_TIMEOUT": "3",
        }
    ).start()
    assert send(serve, "evt_nap_in_flight").status_code == 200
    (writer,) = writer_children(serve)
    wait_until(lambda: out.exists() and "evt_nap_in_flight" in out.read_text(), what="attempt")
    os.kill(writer, signal.SIGSTOP)
    try:
        serve.signal(signal.SIGTERM)
        assert serve.wait(timeout=3 + 5 + 3 + 6 + 10) == 0
        assert "store.sqlite.writer_stalled" in serve.log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(writer, signal.SIGKILL)


def test_two_serve_processes_on_one_sqlite_file_store_and_deliver_each_event_once(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A second `serve` on the same SQLite file (a rolling restart that starts the new one
    before the old one stops) is allowed (docs/operations.md): each event, sent to either
    or to both, is stored once and delivered once."""
    out = tmp_path / "delivered.txt"
    env = {
        "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}",
        "LACUNA_HANDLERS": RECORDER,
        "LACUNA_RECORDER_PATH": str(out),
    }
    one, two = serve_factory(env).start(), serve_factory(env).start()
    ids = [f"evt_shared_{i:02d}" for i in range(30)]
    for i, event_id in enumerate(ids):
        first, second = (one, two) if i % 2 else (two, one)
        assert send(first, event_id).json()["duplicate"] is False
        if i % 3 == 0:
            assert send(second, event_id).json()["duplicate"] is True
    wait_until(lambda: set(recorded(out)) == set(ids), timeout=60, what="every delivery")
    with sqlite3.connect(tmp_path / "events.db") as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (30,)
    one.signal(signal.SIGTERM)
    two.signal(signal.SIGTERM)
    assert (one.wait(), two.wait()) == (0, 0)
    assert sorted(recorded(out)) == sorted(ids)  # none twice


def test_a_second_serve_on_the_same_sqlite_file_says_so(
    serve_factory: type[Serve], tmp_path: Path
) -> None:
    """A second `serve` on the same SQLite file started without a word (sharing is allowed,
    for a rolling restart, but a forgotten one goes on dispatching unseen). It logs
    serve.sqlite_shared; the first does not; once the first stops, a new one does not."""
    env = {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'events.db'}"}
    first = serve_factory(env).start()
    second = serve_factory(env).start()
    assert "serve.sqlite_shared" in second.log()
    assert "serve.sqlite_shared" not in first.log()
    second.signal(signal.SIGTERM)
    first.signal(signal.SIGTERM)
    assert (first.wait(60), second.wait(60)) == (0, 0)
    third = serve_factory(env).start()
    assert "serve.sqlite_shared" not in third.log()
