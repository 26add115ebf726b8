"""The ``email`` handler: one mail per event, over SMTP with aiosmtplib.

``LACUNA_EMAIL_SMTP_URL`` says where and how:

- ``smtp://host[:port]`` plain SMTP (port 25), for a local relay;
- ``smtp://host[:port]?starttls=true`` upgrades with STARTTLS, which is then
  required (port 587 by default);
- ``smtps://host[:port]`` implicit TLS (port 465);
- ``user:password@`` in the URL logs in (URL-encode special characters).

Certificates are verified, against the system's CAs or the bundle in
``LACUNA_EMAIL_CA_FILE``. The mail goes from ``LACUNA_EMAIL_FROM`` to the
comma-separated ``LACUNA_EMAIL_TO``, with plain-text and HTML alternatives, a
subject like "Late Night Study is ready" / "Late Night Study failed:
provider_error", and a ``Message-ID`` derived from the event id, so a mail sent
again for the same event is recognisably the same message.

Outcomes: SMTP 4xx replies and connection problems are retried; 5xx replies
(and a server lacking STARTTLS or AUTH that the URL asks for, a malformed event,
or a mail the email libraries refuse to encode) are permanent. When
only some recipients are refused the mail counts as sent (re-sending would
duplicate it for the others) and the refusals are logged. The password is never
logged.
"""

from __future__ import annotations

import hashlib
import html
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib
import structlog

from ..config import parse_bool, read_file_setting
from ..errors import ConfigError, PermanentError, RetryLater
from ..events import is_job_completed, is_job_failed, parse_event
from ..models import Event
from ..redact import remember_secrets, url_secrets
from ._common import (
    Problems,
    display_title,
    format_duration,
    network_timeouts,
    peer_text,
    showable_text,
    stored_location,
)
from .base import HandlerContext

logger = structlog.get_logger("lacuna_webhooks.handlers.email")

_MESSAGE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MESSAGE_ID_SAFE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
#: Most characters of an event id kept in a Message-ID (the header stays one short line).
MESSAGE_ID_PART = 100
#: How much of an SMTP server's reply text an error or a log line keeps (on one line, secrets
#: masked, ``peer_text``): a reply may run to 32 KiB of continuation lines.
REPLY_LIMIT = 300


@dataclass(frozen=True)
class SMTPTarget:
    """What ``LACUNA_EMAIL_SMTP_URL`` says. ``repr`` never shows the password."""

    host: str
    port: int
    use_tls: bool
    start_tls: bool
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        scheme = "smtps" if self.use_tls else "smtp"
        return f"SMTPTarget({scheme}://{user}{self.host}:{self.port}, starttls={self.start_tls})"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def parse_smtp_url(value: str, var: str) -> SMTPTarget:
    """Parse ``smtp(s)://``; raise ``ConfigError`` naming ``var`` (never the password)."""
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 host
        raise ConfigError(f"{var} is not a valid URL") from None
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigError(f"{var} must start with smtp:// or smtps://")
    try:
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise ConfigError(f"{var} has an invalid port") from None
    if not host:
        raise ConfigError(f"{var} has no host")
    start_tls = False
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        if key != "starttls":
            raise ConfigError(f"{var}: unknown option {key!r} (known: starttls)")
        try:
            start_tls = parse_bool(raw)
        except ValueError as exc:
            raise ConfigError(f"{var}: starttls {exc}") from None
    use_tls = parts.scheme == "smtps"
    if use_tls and start_tls:
        raise ConfigError(f"{var}: smtps:// is already TLS; drop ?starttls=true")
    if port is None:
        port = 465 if use_tls else 587 if start_tls else 25
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return SMTPTarget(host, port, use_tls, start_tls, username, password)


def _address(value: str, var: str) -> str:
    if "\r" in value or "\n" in value:
        raise ConfigError(f"{var} must not contain line breaks")
    _, addr = parseaddr(value)
    if not addr or "@" not in addr or addr.startswith("@") or addr.endswith("@"):
        raise ConfigError(f"{var}: {value!r} is not an email address")
    return value.strip()


def _header_text(text: str, limit: int = 200) -> str:
    flat = " ".join(showable_text(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def message_id(event_id: str, sender: str) -> str:
    """``<lacuna.{event id}@{sender's domain}>``: the same for every mail about one event,
    and never the same for two events (a mailbox may drop a repeated Message-ID: Gmail
    does). An id that is not a dot-atom of ``[A-Za-z0-9_-]`` up to ``MESSAGE_ID_PART``
    characters is written ``lacuna-x.{its safe characters, others as _}.{SHA-256, 32 hex}``
    (``evt 1`` and ``evt_1`` both made ``lacuna.evt_1`` before)."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "lacuna-webhooks.invalid"
    if len(event_id) <= MESSAGE_ID_PART and _MESSAGE_ID_SAFE.fullmatch(event_id):
        return f"<lacuna.{event_id}@{domain}>"
    readable = _MESSAGE_ID_UNSAFE.sub("_", event_id)[:MESSAGE_ID_PART] or "_"
    digest = hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"<lacuna-x.{readable}.{digest}@{domain}>"


def _link_html(url: str, label: str) -> str:
    if url.startswith(("https://", "http://")):
        return f'<a href="{html.escape(url, quote=True)}">{html.escape(label)}</a>'
    return html.escape(label)


def compose(
    event: Event, sender: str, recipients: list[str], stored: str | None = None
) -> EmailMessage:
    """The mail for ``event``; ``MalformedEvent`` when its tracks are malformed.

    ``stored`` is where ``storage`` put the audio (its result's ``location``, when this
    handler runs after it): a ``job.completed`` mail then names it."""
    text_lines: list[str] = []
    html_parts: list[str] = []
    typed = parse_event(event)
    title = display_title(typed)
    if is_job_completed(typed):
        subject = f"{title} is ready"
        text_lines.append(f"{title} is ready.")
        html_parts.append(f"<h2>{html.escape(title)} is ready</h2>")
        style = typed.data.style
        if style:
            text_lines.append(f"Style: {style}")
            html_parts.append(f"<p>Style: {html.escape(style)}</p>")
        text_lines.append("")
        items = []
        for index, track in enumerate(typed.data.tracks, start=1):
            label = track.title or track.id
            duration = format_duration(track.duration_seconds)
            text_lines.append(f"{index}. {label} ({duration}): {track.audio_url}")
            items.append(f"<li>{_link_html(track.audio_url, label)} ({duration})</li>")
        html_parts.append(f"<ol>{''.join(items)}</ol>")
        if stored is not None:
            text_lines.append(f"Stored: {stored}")
            html_parts.append(f"<p>Stored: <code>{html.escape(stored)}</code></p>")
    elif is_job_failed(typed):
        error = typed.data.error
        code = (error.code if error else None) or "unknown_error"
        message = error.message if error else None
        subject = f"{title} failed: {code}"
        text_lines.append(f"{title} failed.")
        text_lines.append(f"Error: {code}" + (f": {message}" if message else ""))
        html_parts.append(f"<h2>{html.escape(title)} failed</h2>")
        html_parts.append(
            f"<p>Error: <code>{html.escape(code)}</code>"
            + (f" {html.escape(message)}" if message else "")
            + "</p>"
        )
        refunded = typed.data.credits_refunded
        if refunded is not None:
            text_lines.append(f"Credits refunded: {refunded:g}")
            html_parts.append(f"<p>Credits refunded: {refunded:g}</p>")
    else:
        subject = f"{title}: {typed.type}"
        text_lines.append(subject)
        html_parts.append(f"<h2>{html.escape(subject)}</h2>")
    footer = f"Task {typed.task_id or '-'}, event {typed.id}"
    text_lines += ["", f"-- {footer}"]
    html_parts.append(f'<p style="color:#666;font-size:small">{html.escape(footer)}</p>')

    msg = EmailMessage()
    msg["Subject"] = _header_text(subject)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id(event.id, sender)
    msg["X-Lacuna-Event-Id"] = _header_text(event.id, 255)
    # Event text is everywhere in both parts: made showable once, on the whole of each.
    msg.set_content(showable_text("\n".join(text_lines) + "\n"))
    msg.add_alternative(
        showable_text("<!doctype html><html><body>" + "".join(html_parts) + "</body></html>\n"),
        subtype="html",
    )
    return msg


#: Largest PEM bundle ``LACUNA_<NAME>_CA_FILE`` may name (the public CA bundle is ~0.2 MiB).
MAX_CA_FILE_BYTES = 4 * 1024 * 1024


def _tls_context(ctx: HandlerContext) -> ssl.SSLContext | None:
    """The TLS context trusting the PEM bundle ``LACUNA_<NAME>_CA_FILE`` names, else None
    (the system's CAs). The file is read as every file setting is (``read_file_setting``:
    a FIFO or ``/dev/zero`` once hung the start inside OpenSSL); ``ConfigError`` naming the
    variable when it is unusable or holds no certificate."""
    var = ctx.env_name("CA_FILE")
    ca_file = ctx.get("CA_FILE")
    if ca_file is None:
        return None
    pem = read_file_setting(var, ca_file, max_bytes=MAX_CA_FILE_BYTES, strip_newline=False)
    try:
        return ssl.create_default_context(cadata=pem)
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"{var}: cannot load {ca_file}: {exc}") from None


def _recipients(ctx: HandlerContext) -> list[str]:
    """``LACUNA_<NAME>_TO``: comma-separated addresses, at least one, each checked."""
    var = ctx.env_name("TO")
    recipients = [_address(item, var) for item in ctx.require("TO").split(",") if item.strip()]
    if not recipients:
        raise ConfigError(f"{var} names no recipient")
    return recipients


class EmailHandler:
    """Mails each event to ``LACUNA_EMAIL_TO`` (see the module docstring)."""

    name = "email"
    events: frozenset[str] | None = frozenset({"job.completed", "job.failed"})

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        problems = Problems()  # every bad setting at once, not the first
        smtp_url = problems.read(lambda: ctx.require_secret("SMTP_URL"))
        target = None
        if smtp_url is not None:
            # The password as the AUTH PLAIN / LOGIN tokens it is sent in too: a server that
            # echoes what it was sent in its 535 put them in the error. serve and the workers
            # remember them from the environment; this covers a handler built elsewhere.
            remember_secrets(url_secrets(smtp_url, secret_path=False))
            target = problems.read(lambda: parse_smtp_url(smtp_url, ctx.env_name("SMTP_URL")))
        sender = problems.read(lambda: _address(ctx.require("FROM"), ctx.env_name("FROM")))
        recipients = problems.read(lambda: _recipients(ctx))
        tls_context = problems.read(lambda: _tls_context(ctx))
        timeouts = problems.read(lambda: network_timeouts(ctx))
        problems.check()
        assert target is not None
        assert sender is not None
        assert recipients is not None
        assert timeouts is not None
        self.target, self.sender, self.recipients = target, sender, recipients
        self.tls_context = tls_context
        self.connect_timeout_seconds, self.timeout_seconds = timeouts

    async def handle(self, event: Event) -> None:
        try:
            msg = compose(event, self.sender, self.recipients, stored_location())
        except ValueError as exc:
            # The email package refuses what it cannot put in a header; the same event
            # would be refused on every retry.
            raise PermanentError(f"event {event.id}: cannot build the mail: {exc}") from None
        where = self.target.where
        try:
            refused = await self._send(msg)
        except ValueError as exc:
            # Input-shaped (an address or header the SMTP library cannot encode): permanent.
            raise PermanentError(f"{where}: the mail cannot be sent: {exc}") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(
                f"{r.recipient}: {r.code} {peer_text(r.message, REPLY_LIMIT)}"
                for r in exc.recipients
            )
            if codes and all(code >= 500 for code in codes):
                raise PermanentError(f"{where} refused every recipient: {detail}") from None
            raise RetryLater(f"{where} refused the recipients for now: {detail}") from None
        except aiosmtplib.SMTPResponseException as exc:
            detail = f"{where} answered {exc.code} {peer_text(exc.message, REPLY_LIMIT)}"
            if exc.code >= 500:
                raise PermanentError(detail) from None
            raise RetryLater(detail) from None
        except aiosmtplib.SMTPNotSupported as exc:
            raise PermanentError(f"{where}: {exc}") from None
        except aiosmtplib.SMTPException as exc:
            # aiosmtplib reports a missing STARTTLS/AUTH extension with the base class;
            # the server will not grow one on retry, so that is permanent.
            if type(exc) is aiosmtplib.SMTPException and "not supported" in str(exc):
                raise PermanentError(f"{where}: {exc}") from None
            raise RetryLater(
                f"sending mail through {where} failed: {type(exc).__name__}: {exc}"
            ) from None
        except OSError as exc:
            raise RetryLater(
                f"sending mail through {where} failed: {type(exc).__name__}: {exc}"
            ) from None
        if refused:
            logger.warning(
                "handler.email.recipients_refused",
                event_id=event.id,
                refused={
                    addr: f"{r.code} {peer_text(r.message, REPLY_LIMIT)}"
                    for addr, r in refused.items()
                },
            )
        logger.info(
            "handler.email.sent",
            event_id=event.id,
            event_type=event.type,
            smtp=where,
            recipients=len(self.recipients) - len(refused),
            message_id=msg["Message-ID"],
        )

    async def _send(self, msg: EmailMessage) -> dict[str, aiosmtplib.SMTPResponse]:
        """Connect (within the connect timeout), log in if asked, send, quit."""
        client = aiosmtplib.SMTP(
            hostname=self.target.host,
            port=self.target.port,
            username=self.target.username,
            password=self.target.password,
            use_tls=self.target.use_tls,
            start_tls=self.target.start_tls,
            tls_context=self.tls_context,
            timeout=self.timeout_seconds,
        )
        await client.connect(timeout=self.connect_timeout_seconds)
        try:
            refused, _ = await client.send_message(
                msg,
                sender=parseaddr(self.sender)[1],
                recipients=[parseaddr(r)[1] for r in self.recipients],
            )
        finally:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()  # the mail's fate is already decided; just drop the line
        return refused

    async def aclose(self) -> None:
        return None
