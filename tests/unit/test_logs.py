"""logs.py: the batched stderr writer and URL redaction."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from lacuna_webhooks import logs
from lacuna_webhooks.logs import LoopBatchedFile, redact_url


@pytest.fixture(autouse=True)
def _restore_structlog() -> Any:
    """Tests here configure logging globally: put the previous configuration back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = threading.excepthook, sys.unraisablehook
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    threading.excepthook, sys.unraisablehook = hooks
    logging.captureWarnings(False)


class CountingRaw(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def test_lines_of_one_loop_turn_are_one_write() -> None:
    raw = CountingRaw()
    out = LoopBatchedFile(raw)

    async def main() -> tuple[bytes, int]:
        for i in range(30):
            out.write(b"line %d\n" % i)
            out.flush()
        before = raw.getvalue()
        await asyncio.sleep(0)  # the turn ends
        return before, raw.writes

    before, writes = asyncio.run(main())
    assert before == b""  # nothing is written in the middle of the turn
    assert writes == 1
    assert raw.getvalue() == b"".join(b"line %d\n" % i for i in range(30))


def test_outside_a_loop_lines_are_written_at_once() -> None:
    raw = CountingRaw()
    out = LoopBatchedFile(raw)
    out.write(b"a\n")
    out.flush()
    assert raw.getvalue() == b"a\n"


def test_a_loop_closed_before_its_turn_ended_loses_nothing() -> None:
    """Lines pending when a loop is dropped are written by the next flush, in order, and a
    new loop schedules its own drain."""
    raw = CountingRaw()
    out = LoopBatchedFile(raw)
    loop = asyncio.new_event_loop()

    async def log(text: bytes) -> None:
        out.write(text)
        out.flush()

    loop.run_until_complete(log(b"first\n"))  # its drain is scheduled, never run
    loop.close()

    async def later() -> None:
        await log(b"second\n")
        await asyncio.sleep(0)

    asyncio.run(later())
    assert raw.getvalue() == b"first\nsecond\n"


def test_a_closed_stream_is_not_an_error() -> None:
    raw = io.BytesIO()
    out = LoopBatchedFile(raw)
    raw.close()
    out.write(b"lost\n")
    out.flush()  # nowhere left to write: silently dropped, never raised


def test_redact_url_keeps_scheme_and_host_only() -> None:
    assert (
        redact_url("https://user:pw@hooks.slack.com/services/T/B/X") == "https://hooks.slack.com/…"
    )
    assert redact_url("not a url") == "…"


def _render_with(configure_output: str, log: Callable[[Any], None]) -> list[dict[str, Any]]:
    """Configure JSON logging onto a fresh stderr, run ``log(logger)``, parse what came out."""
    raw = CountingRaw()
    stderr = io.TextIOWrapper(raw, encoding="utf-8")
    old = sys.stderr
    sys.stderr = stderr
    try:
        logs.configure(log_format=configure_output, level="info")
        log(structlog.get_logger("test"))
        logs._batched_stderr().drain()
    finally:
        sys.stderr = old
    return [orjson.loads(line) for line in raw.getvalue().splitlines()]


ENTRIES = [
    {"status": 200, "outcome": "accepted", "event_id": f"evt_{i}", "latency_ms": 1.5}
    for i in range(3)
]


def test_info_lines_renders_what_info_renders_one_line_each() -> None:
    """``info_lines`` gives the same JSON lines as one ``info`` per entry (the timestamps
    aside), through the same processors and output."""

    def one_by_one(logger: Any) -> None:
        for entry in ENTRIES:
            logger.info("webhook.received", **entry)

    def together(logger: Any) -> None:
        logger.info_lines("webhook.received", ENTRIES)

    singles = _render_with("json", one_by_one)
    batched = _render_with("json", together)
    assert len(batched) == 3
    for line in (*singles, *batched):
        assert line.pop("timestamp").endswith("Z")
    assert batched == singles
    assert batched[0] == {**ENTRIES[0], "event": "webhook.received", "level": "info"}


def _raw_lines(log: Callable[[Any], None], secrets: tuple[str, ...] = ()) -> list[bytes]:
    """``_render_with``'s output as bytes, each timestamp replaced by ``T``."""
    raw = CountingRaw()
    old = sys.stderr
    sys.stderr = io.TextIOWrapper(raw, encoding="utf-8")
    try:
        logs.configure(log_format="json", level="info", secrets=secrets)
        log(structlog.get_logger("test"))
        logs._batched_stderr().drain()
    finally:
        sys.stderr = old
    return [
        re.sub(rb'"timestamp":"[^"]+"', b'"timestamp":"T"', x) for x in raw.getvalue().splitlines()
    ]


def test_info_lines_renders_byte_for_byte_what_the_chain_renders() -> None:
    """``info_lines`` renders plain entries itself (the request log's hot path): the lines
    must be the chain's, key order, redaction of URLs and secrets and all; an entry it does
    not render itself (a nested value, ``exc_info``, bound context) goes through the chain,
    in its place among the others."""
    secret = "whsec_test_info_lines_0123456789"
    entries: list[dict[str, Any]] = [
        {"status": 200, "outcome": "accepted", "event_id": "evt_1", "event_type": None},
        {"status": 400, "outcome": "x", "client": "10.0.0.1", "latency_ms": 0.25, "ok": True},
        {"event_id": "https://user:pw@example.com/hook?token=abc", "note": f"key {secret}"},
        {"nested": {"url": "https://user:pw@example.com/x"}, "n": 1},
        {"level": "first", "timestamp": 5},
        {"exc_info": False, "after": "exc"},
    ]

    def one_by_one(logger: Any) -> None:
        for entry in entries:
            logger.info("webhook.received", **entry)

    def together(logger: Any) -> None:
        logger.info_lines("webhook.received", entries)

    singles = _raw_lines(one_by_one, (secret,))
    batched = _raw_lines(together, (secret,))
    assert batched == singles
    assert len(batched) == len(entries)
    text = b"\n".join(batched)
    for secret_part in (secret.encode(), b"pw@", b"token"):
        assert secret_part not in text

    def bound(logger: Any) -> None:
        logger.bind(request="r1").info_lines("webhook.received", entries[:2])

    def bound_singles(logger: Any) -> None:
        for entry in entries[:2]:
            logger.bind(request="r1").info("webhook.received", **entry)

    assert _raw_lines(bound) == _raw_lines(bound_singles)

    # A secret that is also a word of the line the chain adds ("received", of the event's
    # name): masked there too, on every line, as the chain masks it.
    weird = ("received",)
    assert _raw_lines(together, weird) == _raw_lines(one_by_one, weird)
    assert all(b'"event":"webhook.received"' not in line for line in _raw_lines(together, weird))


def test_info_lines_respects_the_level() -> None:
    raw = CountingRaw()
    old = sys.stderr
    sys.stderr = io.TextIOWrapper(raw, encoding="utf-8")
    try:
        logs.configure(log_format="json", level="warning")
        structlog.get_logger("test").info_lines("webhook.received", ENTRIES)
        logs._batched_stderr().drain()
    finally:
        sys.stderr = old
    assert raw.getvalue() == b""


# --- nothing secret in a log line ----------------------------------------------------------

SLACK_URL = "https://hooks.slack.com/services/T0001/B0001/SlackPathSecret"
AUDIO_URL = "https://cdn.example/tracks/a.mp3?X-Amz-Signature=AudioTokenSecret"


@pytest.fixture
def _forget_secrets() -> Any:
    from lacuna_webhooks import redact

    saved = redact._known, redact._known_re
    yield
    redact._known, redact._known_re = saved


def _lines(level: str, log: Callable[[], None], secrets: tuple[str, ...] = ()) -> str:
    """Configure JSON logging at ``level`` onto a fresh stderr, run ``log()``, return the text."""
    raw = CountingRaw()
    stderr = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    old = sys.stderr
    sys.stderr = stderr
    try:
        logs.configure(log_format="json", level=level, secrets=secrets)
        log()
        logs._batched_stderr().drain()
    finally:
        sys.stderr = old
    return raw.getvalue().decode()


@pytest.mark.usefixtures("_forget_secrets")
@pytest.mark.parametrize("level", ["info", "debug"])
def test_client_libraries_do_not_log_requests_at_info_or_debug(level: str) -> None:
    """httpx logs every request with its full URL at INFO (httpcore, asyncpg, botocore...
    alike at DEBUG): below WARNING they are silent whatever LACUNA_LOG_LEVEL says."""

    def log() -> None:
        for name in ("httpx", "httpcore.http11", "asyncpg", "botocore.endpoint", "aio_pika"):
            logging.getLogger(name).info('HTTP Request: POST %s "HTTP/1.1 200 OK"', SLACK_URL)
            logging.getLogger(name).debug("send_request_headers.started %s", AUDIO_URL)
        logging.getLogger("lacuna_webhooks.x").info("ours is kept")

    text = _lines(level, log)
    assert "ours is kept" in text
    assert "HTTP Request" not in text
    assert "send_request_headers" not in text


@pytest.mark.usefixtures("_forget_secrets")
def test_library_warnings_still_show_with_urls_redacted() -> None:
    def log() -> None:
        logging.getLogger("httpx").warning("giving up on %s and %s", SLACK_URL, AUDIO_URL)

    text = _lines("info", log)
    line = orjson.loads(text.splitlines()[-1])
    assert line["event"] == ("giving up on https://hooks.slack.com/… and https://cdn.example/…")
    assert line["logger"] == "httpx"


@pytest.mark.usefixtures("_forget_secrets")
def test_every_value_of_our_lines_is_redacted_tracebacks_included() -> None:
    """URLs lose path, query and userinfo, and remembered secret values are masked, in
    plain values, nested ones and rendered exceptions alike."""

    def log() -> None:
        logger = structlog.get_logger("test")
        logger.warning(
            "handler.refused",
            url=AUDIO_URL,
            detail={"tried": [SLACK_URL], "password": "pw-Secret-42"},
            note="smtp said no to pw-Secret-42",
        )
        try:
            raise RuntimeError(f"cannot reach {SLACK_URL} with pw-Secret-42")
        except RuntimeError:
            logger.exception("delivery.crashed")
        logging.getLogger("uvicorn.error").error("boom", exc_info=RuntimeError(SLACK_URL))

    text = _lines("info", log, secrets=("pw-Secret-42",))
    for secret in ("SlackPathSecret", "AudioTokenSecret", "pw-Secret-42", "/services/"):
        assert secret not in text
    first, crashed, stdlib = (orjson.loads(line) for line in text.splitlines())
    assert first["url"] == "https://cdn.example/…"
    assert first["detail"] == {"tried": ["https://hooks.slack.com/…"], "password": "**********"}
    assert (
        "RuntimeError: cannot reach https://hooks.slack.com/… with **********"
        in crashed["exception"]
    )
    assert "https://hooks.slack.com/…" in stdlib["exception"]


@pytest.mark.usefixtures("_forget_secrets")
def test_what_python_prints_itself_is_a_redacted_line_too() -> None:
    """A thread's uncaught exception, a warning and an unraisable exception (a plugin's, a
    library's) were printed by Python to stderr as they were: the webhook URL whole."""

    class Leaky:
        def __del__(self) -> None:
            raise RuntimeError(f"closing {SLACK_URL} with pw-Secret-42")

    class Falsy(Exception):
        """Falsy, and its type cannot be built without arguments: the hook raised."""

        def __init__(self, detail: str) -> None:
            super().__init__(detail)

        def __len__(self) -> int:
            return 0

    def fails() -> None:
        raise RuntimeError(f"could not post to {SLACK_URL} with pw-Secret-42")

    def fails_falsy() -> None:
        raise Falsy(f"posting to {SLACK_URL}")

    def log() -> None:
        thread = threading.Thread(target=fails, name="plugin-poster")
        thread.start()
        thread.join()
        thread = threading.Thread(target=fails_falsy, name="plugin-falsy")
        thread.start()
        thread.join()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"retrying {AUDIO_URL} (pw-Secret-42)", UserWarning, stacklevel=1)
        Leaky()  # its __del__ raises where nobody can catch it
        assert logs.logs_settled(10)  # its line is logged by a thread of its own

    text = _lines("info", log, secrets=("pw-Secret-42",))
    for secret in ("SlackPathSecret", "AudioTokenSecret", "pw-Secret-42", "/services/"):
        assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    thread, falsy, warned, unraisable = lines
    assert falsy["thread"] == "plugin-falsy"
    assert "Falsy: posting to https://hooks.slack.com/…" in falsy["exception"]
    assert (thread["event"], thread["thread"]) == ("thread.uncaught_exception", "plugin-poster")
    assert (
        "RuntimeError: could not post to https://hooks.slack.com/… with **********"
        in (thread["exception"])
    )
    assert warned["logger"] == "py.warnings"
    assert "retrying https://cdn.example/… (**********)" in warned["event"]
    assert unraisable["event"] == "unraisable_exception"
    assert "closing https://hooks.slack.com/… with **********" in unraisable["exception"]


@pytest.mark.usefixtures("_forget_secrets")
def test_uvicorn_loggers_configured_earlier_are_taken_back() -> None:
    """An earlier ``uvicorn.Config`` with its default log config (own handlers, no
    propagation) must not keep uvicorn's lines out of our redacting handler."""
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    uvicorn.Config(app)  # applies uvicorn.config.LOGGING_CONFIG to its loggers
    assert logging.getLogger("uvicorn").propagate is False

    def log() -> None:
        logging.getLogger("uvicorn.error").error("boom %s", SLACK_URL)

    text = _lines("info", log)
    (line,) = (orjson.loads(x) for x in text.splitlines())
    assert line["event"] == "boom https://hooks.slack.com/…"


CAPTURE_SCRIPT = r"""
import gc, json, os, subprocess, sys, threading, time
from lacuna_webhooks.logs import MAX_OUTPUT_LINE_BYTES, capture_output, configure
from lacuna_webhooks.redact import secret_values

secret = os.environ["LACUNA_WEBHOOK_SECRET"]
capture_output(
    lambda: configure(log_format="json", secrets=secret_values(os.environ)), handler="h"
)
print("plain " + secret)
print("to stderr", file=sys.stderr)
sys.stderr.buffer.write(b"caf\xe9\n")
print("dunder", file=sys.__stdout__, flush=True)
os.write(1, b"fd write\n")
subprocess.run(["echo", "child program"], stdout=sys.stdout, check=True)
sys.stdout.write("header\nkey=" + secret[:6])
sys.stdout.write(secret[6:] + "\n")  # one line written in two pieces
threads = [
    threading.Thread(target=lambda n=n: [print(f"t{n} {i}") for i in range(200)])
    for n in range(4)
]
for t in threads:
    t.start()
for t in threads:
    t.join()


class Noisy:
    def __del__(self) -> None:
        print("finalised")


end = time.monotonic() + 0.2
while time.monotonic() < end:  # finalisers that print, run by the collector mid-print
    a, b = Noisy(), Noisy()
    a.other, b.other = b, a
    del a, b
    sys.stdout.write("y\n")
gc.collect()
filler = "x" * (MAX_OUTPUT_LINE_BYTES - 10)
print(filler + secret + " and the rest of a very long line")
print("after the long line")
sys.stdout.write("no newline at exit")
"""


def test_captured_output_is_logged_line_by_line_and_redacted(tmp_path: Path) -> None:
    """capture_output in a process of its own (it takes descriptors 1 and 2): print, the
    stderr buffer, sys.__stdout__, os.write(1), a child program given sys.stdout (which has
    a real fileno), four threads, and finalisers that print while the collector runs mid-
    print (it deadlocked a worker when the capture logged under a lock of its own): every
    line is a process.output log line, the secret masked also when written in two pieces,
    a line past MAX_OUTPUT_LINE_BYTES truncated without the start of the secret at its cut,
    the last line without a newline logged at exit."""
    secret = "whsec_c2VjcmV0c2VjcmV0MTIzNA=="
    done = subprocess.run(
        [sys.executable, "-c", CAPTURE_SCRIPT],
        env={**os.environ, "LACUNA_WEBHOOK_SECRET": secret},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == b""  # all of it went to the log
    assert secret.encode() not in done.stderr
    assert b"whsec_c2Vj" not in done.stderr
    every = [json.loads(x) for x in done.stderr.splitlines()]
    lines = [x for x in every if x["event"] == "process.output"]
    # A finaliser printing while a print of the same thread is under way gets Python's own
    # "reentrant call" error (as with any stdout): logged, no hang.
    others = [x for x in every if x["event"] not in ("process.output", "process.output_dropped")]
    assert all("reentrant call" in x["exception"] for x in others), others[:1]
    printed = [(x["stream"], x["line"]) for x in lines]
    for expected in [
        ("stdout", "plain **********"),
        ("stderr", "to stderr"),
        ("stderr", "caf\\xe9"),
        ("stdout", "dunder"),
        ("stdout", "fd write"),
        ("stdout", "child program"),
        ("stdout", "header"),
        ("stdout", "key=**********"),
    ]:
        assert expected in printed, expected
    # A finaliser run late (its object freed with a logged traceback that held it) may
    # print onto either end of these lines, as onto any stdout.
    texts = [t for s, t in printed if s == "stdout"]
    assert any("after the long line" in t for t in texts)
    assert any("no newline at exit" in t for t in texts)  # logged at exit
    # Threads' prints may share a line (print writes its text and its newline apart, as
    # on any stdout), but none is lost.
    said = re.findall(r"t\d \d+", "\n".join(t for _, t in printed))
    assert sorted(said) == sorted(f"t{n} {i}" for n in range(4) for i in range(200))
    (long,) = [x for x in lines if x.get("truncated")]
    # Cut at the cap inside the secret: its start masked (a finaliser's print may shift the
    # cut; fewer than four characters of it are left as they are).
    assert not any(long["line"].endswith(secret[:k]) for k in range(4, len(secret)))
    assert len(long["line"]) < 70_000
