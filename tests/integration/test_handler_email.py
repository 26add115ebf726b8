"""The email handler against real aiosmtpd servers: plain, STARTTLS and implicit TLS."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import threading
from collections.abc import AsyncIterator
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from lacuna_webhooks.errors import ConfigError, PermanentError, RetryLater
from lacuna_webhooks.handlers.base import HandlerContext
from lacuna_webhooks.handlers.email import MAX_CA_FILE_BYTES, EmailHandler
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import build_handlers
from tests.conftest import make_event
from tests.integration.servers import (  # noqa: F401 - fixtures, used by name
    SMTP_PASSWORD,
    SMTPServer,
    TLSAuthority,
    free_port,
    smtp_plain_fixture,
    smtp_starttls_fixture,
    smtp_tls_fixture,
    tls_ca_fixture,
)


@pytest.fixture(autouse=True)
async def _let_closed_connections_finish() -> AsyncIterator[None]:
    """A failed SMTP client closes its transport, and the socket really closes one loop
    turn later. Give the loop those turns before the test's loop is shut, so a refused
    connection is not reported as a leaked socket."""
    yield
    for _ in range(3):
        await asyncio.sleep(0)


FROM = "Lacuna <lacuna@studio.example>"
TO = "ana@example.com, bo@example.com"


def as_event(payload: dict[str, Any]) -> Event:
    return Event.from_body(orjson.dumps(payload))


def make_handler(smtp_url: str, **env: str) -> EmailHandler:
    environ = {
        "LACUNA_EMAIL_SMTP_URL": smtp_url,
        "LACUNA_EMAIL_FROM": FROM,
        "LACUNA_EMAIL_TO": TO,
        "LACUNA_EMAIL_READ_TIMEOUT": "5",
        **env,
    }
    return EmailHandler(HandlerContext("email", environ=environ, timeout_seconds=20))


def parts(message: Message) -> dict[str, str]:
    """content type -> decoded text of each leaf part."""
    found = {}
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found[part.get_content_type()] = payload.decode(part.get_content_charset() or "utf-8")
    return found


async def test_plain_smtp_delivers_text_and_html(smtp_plain: SMTPServer) -> None:
    """job.completed: subject "<title> is ready", both alternatives, every recipient."""
    handler = make_handler(smtp_plain.url())
    await handler.handle(as_event(make_event("evt_mail_1")))

    (message,) = smtp_plain.inbox.messages
    assert message["Subject"] == "Late Night Study is ready"
    assert message["From"] == FROM
    assert message["To"] == TO
    assert message["Message-ID"] == "<lacuna.evt_mail_1@studio.example>"
    assert message.get_content_type() == "multipart/alternative"
    bodies = parts(message)
    assert "1. trk_01 (3:02): https://cdn.lacuna.example/tracks/trk_01.mp3" in bodies["text/plain"]
    assert (
        '<a href="https://cdn.lacuna.example/tracks/trk_01.mp3">trk_01</a>' in bodies["text/html"]
    )
    assert smtp_plain.inbox.envelopes == [
        ("lacuna@studio.example", ["ana@example.com", "bo@example.com"])
    ]


async def test_job_failed_mail_names_the_error(smtp_plain: SMTPServer) -> None:
    """Subject "<title> failed: <code>", body with message and refund."""
    handler = make_handler(smtp_plain.url())
    await handler.handle(as_event(make_event(event_type="job.failed")))
    (message,) = smtp_plain.inbox.messages
    assert message["Subject"] == "Late Night Study failed: provider_error"
    text = parts(message)["text/plain"]
    assert "Error: provider_error: Upstream failure." in text
    assert "Credits refunded: 10" in text


async def test_a_resent_mail_keeps_its_message_id(smtp_plain: SMTPServer) -> None:
    """The Message-ID comes from the event id, so a retry's mail is recognisably the same."""
    handler = make_handler(smtp_plain.url())
    event = as_event(make_event("evt_again"))
    await handler.handle(event)
    await handler.handle(event)
    ids = [m["Message-ID"] for m in smtp_plain.inbox.messages]
    assert ids == ["<lacuna.evt_again@studio.example>"] * 2


async def test_event_text_cannot_inject_html_or_headers(smtp_plain: SMTPServer) -> None:
    """Titles are escaped in HTML and flattened in the subject."""
    handler = make_handler(smtp_plain.url())
    title = "<script>x</script>\r\nBcc: victim@example.com"
    await handler.handle(as_event(make_event(title=title)))
    (message,) = smtp_plain.inbox.messages
    assert message["Bcc"] is None
    assert "\n" not in message["Subject"]
    assert "<script>" not in parts(message)["text/html"]
    assert "&lt;script&gt;" in parts(message)["text/html"]


async def test_control_and_bidi_characters_from_the_event_do_not_reach_the_mail(
    smtp_plain: SMTPServer,
) -> None:
    """A NUL, an escape sequence or U+202E in event text went into the Subject and both parts
    raw: a NUL breaks RFC 5322, an escape repaints a terminal reader, U+202E reverses what
    follows. Each is shown as U+FFFD; line breaks stay line breaks in the body."""
    handler = make_handler(smtp_plain.url())
    event = make_event(
        "evt_failed_ctl",
        "job.failed",
        title="Late\x00Night\x1b[2J \u202egpj.exe",
        error={
            "type": "api_error",
            "code": "provider\x07error",
            "message": "first\rsecond\x7f\x9b31m",
            "param": None,
        },
    )
    await handler.handle(as_event(event))
    (message,) = smtp_plain.inbox.messages
    unshowable = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
    subject = str(make_header(decode_header(message["Subject"])))
    assert not unshowable.search(subject)
    assert subject == "Late\ufffdNight\ufffd[2J \ufffdgpj.exe failed: provider\ufffderror"
    for part, text in parts(message).items():
        assert not unshowable.search(text.replace("\r\n", "\n")), part
        assert "Late\ufffdNight" in text, part
    assert "first\nsecond\ufffd\ufffd31m" in parts(message)["text/plain"].replace("\r\n", "\n")


async def test_starttls_with_login_and_a_private_ca(
    smtp_starttls: SMTPServer, tls_ca: TLSAuthority
) -> None:
    """smtp://user:pass@host?starttls=true, the server's certificate checked against CA_FILE."""
    handler = make_handler(smtp_starttls.url(), LACUNA_EMAIL_CA_FILE=tls_ca.ca_file)
    await handler.handle(as_event(make_event()))
    assert len(smtp_starttls.inbox.messages) == 1


async def test_implicit_tls(smtp_tls: SMTPServer, tls_ca: TLSAuthority) -> None:
    """smtps:// (TLS from the first byte), the certificate checked against CA_FILE."""
    handler = make_handler(smtp_tls.url(), LACUNA_EMAIL_CA_FILE=tls_ca.ca_file)
    await handler.handle(as_event(make_event()))
    assert len(smtp_tls.inbox.messages) == 1


async def test_an_untrusted_certificate_is_not_accepted(smtp_tls: SMTPServer) -> None:
    """Without the CA bundle the test certificate fails verification: nothing is sent."""
    handler = make_handler(smtp_tls.url())
    with pytest.raises(RetryLater, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await handler.handle(as_event(make_event()))
    assert smtp_tls.inbox.messages == []


async def test_a_wrong_password_is_permanent_and_never_shown(
    smtp_starttls: SMTPServer, tls_ca: TLSAuthority
) -> None:
    """535 from AUTH is a 5xx: dead at once; neither the error nor the logs show a password."""
    handler = make_handler(
        smtp_starttls.url(password="wrong-pass-123"), LACUNA_EMAIL_CA_FILE=tls_ca.ca_file
    )
    with capture_logs() as logs, pytest.raises(PermanentError, match="535") as caught:
        await handler.handle(as_event(make_event()))
    for text in (str(caught.value), repr(logs), repr(handler.target)):
        assert "wrong-pass-123" not in text
        assert SMTP_PASSWORD not in text


async def test_starttls_required_by_the_url_but_not_offered_is_permanent(
    smtp_plain: SMTPServer,
) -> None:
    """?starttls=true never falls back to plain text."""
    handler = make_handler(smtp_plain.url() + "?starttls=true")
    with pytest.raises(PermanentError, match="STARTTLS"):
        await handler.handle(as_event(make_event()))
    assert smtp_plain.inbox.messages == []


@pytest.mark.parametrize(
    ("where", "reply", "error"),
    [
        ("rcpt", "450 4.2.1 mailbox busy", RetryLater),
        ("rcpt", "550 5.1.1 no such user", PermanentError),
        ("data", "451 4.3.0 try again later", RetryLater),
        ("data", "554 5.7.1 rejected as spam", PermanentError),
    ],
)
async def test_smtp_4xx_is_retried_and_5xx_is_permanent(
    smtp_plain: SMTPServer, where: str, reply: str, error: type[Exception]
) -> None:
    """The reply class decides: 4xx transient, 5xx permanent, with the server's words."""
    setattr(smtp_plain.inbox, f"{where}_reply", reply)
    handler = make_handler(smtp_plain.url())
    with pytest.raises(error, match=reply.split(" ", 1)[0]) as caught:
        await handler.handle(as_event(make_event()))
    assert type(caught.value) is error
    assert smtp_plain.inbox.messages == []


async def test_a_long_multiline_reply_is_one_short_line_in_the_error(
    smtp_plain: SMTPServer,
) -> None:
    """The server's words are kept (the code and their start), on one line and cut: a reply
    of 30 continuation lines went whole, line breaks and all, into the attempt's error."""
    smtp_plain.inbox.data_reply = "\r\n".join(
        # Words, not "x" * 900: a run of one letter may be (part of) a secret another test
        # made the process remember, and would come back masked.
        [f"554-5.7.1 line {i} " + "mailbox over quota " * 50 for i in range(30)] + ["554 5.7.1 end"]
    )
    handler = make_handler(smtp_plain.url())
    with pytest.raises(
        PermanentError, match=r"answered 554 5\.7\.1 line 0 mailbox over quota"
    ) as caught:
        await handler.handle(as_event(make_event()))
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 400


async def test_an_unreachable_server_is_retried() -> None:
    """Connection refused is transient."""
    handler = make_handler(f"smtp://127.0.0.1:{free_port()}")
    with pytest.raises(RetryLater, match=r"127\.0\.0\.1"):
        await handler.handle(as_event(make_event()))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LACUNA_EMAIL_SMTP_URL": "http://mail.example"}, "must start with smtp:// or smtps://"),
        ({"LACUNA_EMAIL_SMTP_URL": "smtp://mail.example?tls=1"}, "unknown option 'tls'"),
        ({"LACUNA_EMAIL_SMTP_URL": "smtps://mail.example?starttls=true"}, "already TLS"),
        ({"LACUNA_EMAIL_FROM": "not an address"}, "LACUNA_EMAIL_FROM"),
        ({"LACUNA_EMAIL_TO": " , "}, "LACUNA_EMAIL_TO names no recipient"),
        ({"LACUNA_EMAIL_CA_FILE": "/nonexistent/ca.pem"}, "LACUNA_EMAIL_CA_FILE"),
    ],
)
def test_bad_settings_stop_start_naming_the_variable(env: dict[str, str], message: str) -> None:
    """Each bad setting is one ConfigError line naming its variable."""
    base = {
        "LACUNA_EMAIL_SMTP_URL": "smtp://u:topsecret@mail.example",
        "LACUNA_EMAIL_FROM": FROM,
        "LACUNA_EMAIL_TO": TO,
    }
    with pytest.raises(ConfigError, match=message) as caught:
        EmailHandler(HandlerContext("email", environ={**base, **env}))
    assert "topsecret" not in str(caught.value)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge", "not-pem"])
def test_an_unusable_ca_file_is_one_line_without_hanging(tmp_path: Path, kind: str) -> None:
    """LACUNA_EMAIL_CA_FILE is read like every file setting: only a regular file of at most
    4 MiB. A FIFO named by mistake used to hang the start inside OpenSSL (no writer ever
    came), /dev/zero or a huge file to be read whole."""
    path = tmp_path / "ca.pem"
    unblock = None
    if kind == "fifo":
        os.mkfifo(path)
        # Before the fix open() blocked here: a writer that comes later lets the test end.
        unblock = threading.Timer(5.0, lambda: path.open("wb").close())
        unblock.start()
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "directory":
        path = tmp_path
    elif kind == "huge":
        with path.open("wb") as f:
            f.truncate(MAX_CA_FILE_BYTES + 1)  # sparse: no disk used
    else:
        path.write_text("not a certificate\n")
    expected = {
        "fifo": "is not a regular file",
        "device": "is not a regular file",
        "directory": "(is not a regular file|Is a directory)",
        "huge": "is larger than 4 MiB",
        "not-pem": "cannot load",
    }[kind]
    try:
        with pytest.raises(ConfigError) as caught:
            make_handler("smtp://mail.example", LACUNA_EMAIL_CA_FILE=str(path))
    finally:
        if unblock is not None:
            unblock.cancel()
    (problem,) = caught.value.problems
    assert problem.startswith("LACUNA_EMAIL_CA_FILE: ")
    assert str(path) in problem
    assert re.search(expected, problem), problem


def test_ca_file_and_other_bad_handler_files_are_reported_together(tmp_path: Path) -> None:
    """Every unusable *_FILE of every handler instance is one line, all in one ConfigError."""
    fifo = tmp_path / "url.fifo"
    os.mkfifo(fifo)
    environ = {
        "LACUNA_EMAIL_SMTP_URL": "smtp://mail.example",
        "LACUNA_EMAIL_FROM": FROM,
        "LACUNA_EMAIL_TO": TO,
        "LACUNA_EMAIL_CA_FILE": "/dev/zero",
        "LACUNA_SLACK_WEBHOOK_URL_FILE": str(fifo),
    }
    with pytest.raises(ConfigError) as caught:
        build_handlers(["email", "slack"], environ)
    assert caught.value.problems == [
        "LACUNA_EMAIL_CA_FILE: /dev/zero is not a regular file",
        f"LACUNA_SLACK_WEBHOOK_URL_FILE: {fifo} is not a regular file",
    ]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("code", ["535", "454"])
async def test_a_server_echoing_the_auth_exchange_leaks_no_password(
    mechanism: str, code: str
) -> None:
    """A server whose refusal of AUTH quotes what it was sent (`535 5.7.8 bad credentials
    AG1haWxlcgBT…`): the password went into the attempt's error and the log as the base64
    of AUTH PLAIN (`\\0user\\0password`) or AUTH LOGIN (the password alone), which any
    reader decodes. They are masked like the password itself."""
    password = "Sm7p-echo-P4ss"
    sent: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await say("220 echo ESMTP")
            while line := (await reader.readline()).decode().strip():
                verb, _, rest = line.partition(" ")
                if verb.upper() == "EHLO":
                    await say("250-echo")
                    await say(f"250 AUTH {mechanism}")
                elif verb.upper() == "AUTH":
                    words = rest.split(" ")[1:]  # the initial response, if any
                    while mechanism == "LOGIN" and len(words) < 2:
                        await say("334 " + ("VXNlcm5hbWU6" if not words else "UGFzc3dvcmQ6"))
                        words.append((await reader.readline()).decode().strip())
                    sent.extend(words)
                    await say(f"{code} 5.7.8 bad credentials: {' '.join(words)}")
                elif verb.upper() == "QUIT":
                    await say("221 bye")
                    break
                else:
                    await say("250 ok")
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        handler = make_handler(f"smtp://mailer:{password}@127.0.0.1:{port}")
        error = PermanentError if code == "535" else RetryLater
        with capture_logs() as logs, pytest.raises(error, match=code) as caught:
            await handler.handle(as_event(make_event()))
    finally:
        server.close()
        await server.wait_closed()
    assert sent  # the server did receive the credentials, and quoted them
    for text in (str(caught.value), repr(logs)):
        assert password not in text
        for token in sent:
            assert token.rstrip("=") not in text or base64.b64decode(token + "==") == b"mailer"
