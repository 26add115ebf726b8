"""The pure parts of ``tail`` and ``listen`` (listen.py): where the admin API and token come
from, the backoff, the cursor file, a tail line, the option parsers, and the signed headers
``listen`` and the ``http`` handler share. The commands themselves run against a real
``serve`` in tests/e2e/test_live.py."""

from __future__ import annotations

import asyncio
import base64
import http.server
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from lacuna_webhooks import listen
from lacuna_webhooks.cli import main
from lacuna_webhooks.listen import ListenError, Target
from lacuna_webhooks.signature import signed_headers, standard_webhooks_key

SECRET = "whsec_" + base64.b64encode(b"a-unit-test-secret-of-32-bytes!!").decode()


def test_admin_target_from_options_or_environment(tmp_path: Path) -> None:
    env = {"LACUNA_ADMIN_URL": "http://admin:8001/", "LACUNA_ADMIN_TOKEN": "tok_a,tok_b"}
    assert listen.admin_target(None, None, env) == Target("http://admin:8001", "tok_a")
    assert listen.admin_target("https://x", "tok_c", env) == Target("https://x", "tok_c")
    token_file = tmp_path / "token"
    token_file.write_text("tok_file\n")
    from_file = {"LACUNA_ADMIN_URL": "http://a", "LACUNA_ADMIN_TOKEN_FILE": str(token_file)}
    assert listen.admin_target(None, None, from_file).token == "tok_file"


@pytest.mark.parametrize(
    ("url", "token", "env", "says"),
    [
        (None, "t", {}, "--url"),
        ("ftp://x", "t", {}, "admin listener"),
        ("http://x", None, {}, "--token"),
        ("http://x", None, {"LACUNA_ADMIN_TOKEN": "a", "LACUNA_ADMIN_TOKEN_FILE": "/f"}, "both"),
    ],
)
def test_admin_target_says_what_is_missing(
    url: str | None, token: str | None, env: dict[str, str], says: str
) -> None:
    with pytest.raises(ListenError, match=says):
        listen.admin_target(url, token, env)


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    for failures in range(1, 12):
        base = min(listen.MAX_BACKOFF_SECONDS, listen.FIRST_BACKOFF_SECONDS * 2 ** (failures - 1))
        for _ in range(20):
            assert 0.75 * base <= listen.backoff(failures) <= base
    assert listen.backoff(10_000) <= listen.MAX_BACKOFF_SECONDS


def test_cursor_file_round_trip_and_replace(tmp_path: Path) -> None:
    path = tmp_path / "state" / "listen" / "c.json"
    assert listen.read_cursor_file(path) is None
    listen.write_cursor_file(path, "cur_1", url="http://a", event_id="evt_1")
    listen.write_cursor_file(path, "cur_2", url="http://a", event_id="evt_2")
    assert listen.read_cursor_file(path) == "cur_2"
    assert orjson.loads(path.read_bytes())["event_id"] == "evt_2"
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # no temporary file left
    path.write_text("{}")
    with pytest.raises(ListenError, match="no cursor"):
        listen.read_cursor_file(path)
    path.write_text("not json")
    with pytest.raises(ListenError, match="is not a cursor file"):
        listen.read_cursor_file(path)


def test_a_cursor_file_that_is_no_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A FIFO at the cursor file's path hung ``listen`` at start (the open waited for a
    writer); a device or a huge file would have been read whole. Each is one clear error."""
    fifo = tmp_path / "c.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ListenError, match="not a regular file"):
        listen.read_cursor_file(fifo)
    with pytest.raises(ListenError, match="not a regular file"):
        listen.read_cursor_file(Path("/dev/zero"))
    with pytest.raises(ListenError, match="not a regular file"):
        listen.read_cursor_file(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (listen.MAX_CURSOR_FILE_BYTES + 1))
    with pytest.raises(ListenError, match="not a cursor file"):
        listen.read_cursor_file(big)


def test_default_cursor_file_is_per_deployment_and_app(tmp_path: Path) -> None:
    env = {"XDG_STATE_HOME": str(tmp_path)}
    one = listen.default_cursor_file(Target("http://a", "t"), "http://127.0.0.1:3000/", env)
    two = listen.default_cursor_file(Target("http://b", "t"), "http://127.0.0.1:3000/", env)
    three = listen.default_cursor_file(Target("http://a", "t"), "http://127.0.0.1:4000/", env)
    assert len({one, two, three}) == 3
    assert one.parent == tmp_path / "lacuna-webhooks" / "listen"


def test_tail_line_shows_fields_and_escapes_control_characters() -> None:
    event = {
        "id": "evt_1",
        "type": "job.completed",
        "received_at": "2026-12-01T03:30:00.123456Z",
        "task_id": "cm1",
        "payload": {"data": {"title": "Rain\x1b[2J\nfall"}},
    }
    line = listen.tail_line(event)
    assert line == "2026-12-01 03:30:00  job.completed  evt_1  cm1  Rain\\x1b[2J\\nfall"
    assert listen.tail_line({"id": "e", "type": "t", "payload": None}).endswith("e  -")


def test_option_parsers() -> None:
    assert listen.parse_events("job.completed, job.failed,") == {"job.completed", "job.failed"}
    assert listen.parse_events(None) is None
    with pytest.raises(ListenError):
        listen.parse_events(" , ")
    assert listen.parse_secret(SECRET) == (standard_webhooks_key(SECRET),)
    assert listen.parse_secret(None) == ()
    with pytest.raises(ListenError, match="--secret"):
        listen.parse_secret("whsec_not*base64")
    # Given but naming none (an empty shell variable): it forwarded every event unsigned.
    for value in ("", " , ", ","):
        with pytest.raises(ListenError, match="--secret names no secret"):
            listen.parse_secret(value)


def test_signed_headers_verify_with_the_standardwebhooks_library() -> None:
    body = b'{"id":"evt_1","type":"job.completed"}'
    now = int(time.time())
    headers = signed_headers("evt_1", "job.completed", body, (standard_webhooks_key(SECRET),), now)
    assert headers["webhook-id"] == "evt_1"
    assert headers["lacuna-event-type"] == "job.completed"
    assert headers["content-type"] == "application/json"
    assert headers["webhook-timestamp"] == str(now)
    assert Webhook(SECRET).verify(body, headers) == orjson.loads(body)


def test_without_a_secret_the_standard_webhooks_id_and_timestamp_are_still_sent() -> None:
    """cli.md: `webhook-id` (the app deduplicates on it) and `webhook-timestamp` always; only
    the signature needs --secret. Without one, neither was sent."""
    headers = signed_headers("evt_1", "job.completed", b"{}", (), 1763731200)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == "1763731200"
    assert "webhook-signature" not in headers


def test_cli_refuses_a_bad_forward_url_or_missing_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["listen", "--forward-to", "localhost:3000"], environ={}) == 2
    assert "--forward-to" in capsys.readouterr().err
    assert (
        main(["listen", "--forward-to", "http://127.0.0.1:3000"], environ={}) == 2
    )  # a missing argument
    assert "LACUNA_ADMIN_URL" in capsys.readouterr().err
    # tail without an admin API follows the local store: none here, and it says both ways.
    assert main(["tail"], environ={"LACUNA_DATABASE_URL": "sqlite:///./no/such.db"}) == 1
    err = capsys.readouterr().err
    assert "no database" in err
    assert "LACUNA_ADMIN_URL" in err


class _HostileStream(http.server.BaseHTTPRequestHandler):
    """An admin API gone bad: the first stream carries an event whose id and type hold
    terminal escape sequences, then ends; the next sends a message whose data is JSON but no
    object."""

    protocol_version = "HTTP/1.1"
    served = 0

    def do_GET(self) -> None:
        type(self).served += 1
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        if type(self).served == 1:
            event = {"id": "evt_\x1b[31m", "type": "job.\x1b]0;owned\x07", "raw": "{}"}
            self.wfile.write(b"id: c1\nevent: event\ndata: " + orjson.dumps(event) + b"\n\n")
        else:
            self.wfile.write(b"id: c2\nevent: event\ndata: [1, 2]\n\n")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


async def test_hostile_stream_one_line_no_traceback_no_secret_no_escape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``listen`` against a server that sends escape sequences in an event's id and type,
    drops the stream, then sends JSON that is not an object: the status lines show the
    escapes escaped, never the URL's password or query token, and the bad message ends the
    command with a ``ListenError`` (one line), not an AttributeError traceback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostileStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    target = Target(f"http://user:pa55word@127.0.0.1:{port}/?token=s3cret", "adm_tok")
    try:
        with pytest.raises(ListenError, match="not an event's JSON object"):
            await asyncio.wait_for(
                listen.listen(
                    target,
                    forward_to=f"http://127.0.0.1:{port}/app?key=app-s3cret",
                    keys=(),
                    events=None,
                    cursor_file=tmp_path / "cursor.json",
                    from_beginning=False,
                    say=listen.stderr_say,
                ),
                30,
            )
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "reconnected" in err
    assert "-> evt_" in err
    assert "\x1b" not in err
    assert "\x07" not in err
    assert "\\x1b[31m" in err
    for secret in ("pa55word", "s3cret", "user:"):
        assert secret not in err
    saved = orjson.loads((tmp_path / "cursor.json").read_bytes())
    assert saved["cursor"] == "c1"
    assert "pa55word" not in saved["url"]


class _C1Stream(_HostileStream):
    """An event whose fields hold what JSON does not escape: DEL, CSI as one C1 character
    (``\x9b``, a control sequence of its own on an 8-bit terminal) and a line separator."""

    served = 0

    def do_GET(self) -> None:
        type(self).served += 1
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        if type(self).served == 1:
            event = {"id": "evt_\x9b2J", "type": "job\x7f", "payload": {"t": "a\u2028b"}}
            self.wfile.write(b"id: c1\nevent: event\ndata: " + orjson.dumps(event) + b"\n\n")
        else:
            self.wfile.write(b"id: c2\nevent: event\ndata: [1, 2]\n\n")


@pytest.mark.parametrize("as_json", [True, False])
async def test_tail_prints_an_event_escaped(as_json: bool) -> None:
    """``tail --json`` wrote the stream's JSON as orjson writes it: characters JSON leaves
    raw (DEL, C1 controls, U+2028) reached the terminal. Now escaped as JSON escapes them
    (the same values for jq), as the text lines escape them."""
    import io

    _C1Stream.served = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _C1Stream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = io.StringIO()
    try:
        with pytest.raises(ListenError):
            await asyncio.wait_for(
                listen.tail(
                    Target(f"http://127.0.0.1:{server.server_address[1]}", "adm_tok"),
                    as_json=as_json,
                    from_beginning=False,
                    out=out,
                    say=lambda line: None,
                ),
                30,
            )
    finally:
        server.shutdown()
        server.server_close()
    text = out.getvalue()
    for c in ("\x9b", "\x7f", "\u2028"):
        assert c not in text
    if as_json:
        event = orjson.loads(text)
        assert (event["id"], event["type"]) == ("evt_\x9b2J", "job\x7f")
        assert event["payload"] == {"t": "a\u2028b"}


def test_shown_url_keeps_host_and_path_only() -> None:
    assert listen.shown_url("https://u:p@admin.example:8001/base/?t=1#f") == (
        "https://admin.example:8001/base/"
    )
    assert listen.shown_url("http://127.0.0.1:8001") == "http://127.0.0.1:8001"


def test_an_unwritable_cursor_folder_is_refused_before_any_forward(tmp_path: Path) -> None:
    """A cursor file in a folder that cannot be made or written (here under /proc, which
    even root cannot write; reading it finds no file, so the start looks fresh) is one
    ListenError before the stream is opened, not an OSError after the first forward (the
    old code only found out then, or, with the server away, never)."""
    with pytest.raises(ListenError, match="cannot keep the cursor file"):
        asyncio.run(
            asyncio.wait_for(
                listen.listen(
                    Target("http://127.0.0.1:9", "adm_tok"),  # never reached
                    forward_to="http://127.0.0.1:9/app",
                    keys=(),
                    events=None,
                    cursor_file=Path("/proc/lacuna-webhooks-test/cursor.json"),
                    from_beginning=False,
                    say=lambda _: None,
                ),
                10,
            )
        )
    listen.check_cursor_folder(tmp_path / "new" / "cursor.json")
    assert (tmp_path / "new").is_dir()
    assert list((tmp_path / "new").iterdir()) == []


#: A listen command line whose every argument is good: each case adds the bad one.
LISTEN = ["listen", "--forward-to", "http://127.0.0.1:9/x", "--url", "http://127.0.0.1:9"]
LISTEN += ["--token", "t" * 40]


@pytest.mark.parametrize(
    "argv",
    [
        ["tail", "--url", "ftp://x"],
        ["tail", "--url", "http://127.0.0.1:9", "--token", "bad_tok_é"],
        ["tail", "--url", "http://127.0.0.1:9", "--token", ""],
        [*LISTEN, "--secret", "whsec_%%%"],
        [*LISTEN, "--events", ","],
        [*LISTEN, "--cursor-file", "/"],  # a directory
    ],
)
def test_tail_and_listen_bad_arguments_exit_2_like_every_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/cli.md: 2 for bad arguments. `replay --url ftp://x` gave 2 and `tail --url
    ftp://x` the same line with 1."""
    assert main(argv, environ={}) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacuna-webhooks: error: ")
    assert len(err.strip().splitlines()) == 1, err


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers each GET with the next status of ``statuses`` (the last one after that)."""

    statuses: ClassVar[list[int]] = []
    served = 0

    def do_GET(self) -> None:
        cls = type(self)
        status = cls.statuses[min(cls.served, len(cls.statuses) - 1)]
        cls.served += 1
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("statuses", "lost"),
    [([501], 0), ([403], 0), ([500], 0), ([410], 0), ([301], 0), ([503, 429, 404], 2)],
)
async def test_an_answer_another_try_gets_again_ends_tail_with_one_line(
    statuses: list[int], lost: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL that answers 501 (or 403, 500, 410, a redirect...) has no stream: one line, as
    a 404 ends it. It was reconnected for ever. 408, 429, 502, 503 and 504 are retried."""
    import io

    monkeypatch.setattr(listen, "backoff", lambda failures: 0.01)
    handler = type("Answers", (_Answers,), {"statuses": statuses, "served": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    said: list[str] = []
    try:
        with pytest.raises(ListenError, match=rf"no live stream at that URL \({statuses[-1]}\)"):
            await asyncio.wait_for(
                listen.tail(
                    Target(f"http://127.0.0.1:{server.server_address[1]}", "adm_tok"),
                    as_json=False,
                    from_beginning=False,
                    out=io.StringIO(),
                    say=said.append,
                ),
                10,
            )
    finally:
        server.shutdown()
        server.server_close()
    assert sum("stream: lost" in line for line in said) == lost


def test_ctrl_c_ends_tail_with_130(tmp_path: Path) -> None:
    """Ctrl-C on `tail` says `stopped` and exits 130, as docs/cli.md says of every command
    (it exited 0; only `listen` stops with 0)."""
    import signal
    import subprocess
    import sys

    env = {**os.environ, "LACUNA_DATABASE_URL": f"sqlite:///{tmp_path / 'tail.db'}"}
    env.pop("LACUNA_ADMIN_URL", None)
    command = [sys.executable, "-m", "lacuna_webhooks"]
    subprocess.run([*command, "migrate"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [*command, "tail"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        assert "following" in proc.stderr.readline().decode()
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert err == "lacuna-webhooks: stopped\n"
