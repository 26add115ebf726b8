"""``tail`` and ``listen``: follow the admin API's live stream (``GET /api/v1/stream``) of a
deployment, usually a remote one, from a shell.

- ``tail`` prints one line per event as it is stored (``--json``: the stream's event JSON).
- ``listen --forward-to URL`` posts each event to an app on this machine, signed with
  Standard Webhooks headers as the ``http`` handler signs them (``--secret whsec_…``;
  ``signature.signed_headers``), and keeps the cursor of the last event it forwarded in a
  local file, written atomically after each forward. Started again (after Ctrl-C, a
  crash, a laptop that slept), it resumes right after that event: nothing is skipped.

Both say when they lose the stream and reconnect with backoff (with jitter, at most
``MAX_BACKOFF_SECONDS``), resuming after the last event they handled. A stream that stays
silent longer than ``READ_TIMEOUT_SECONDS`` (the server sends a keepalive every 15 s) is
taken as lost: a sleeping laptop's dead connection is noticed, and so is one that sends
more than ``MAX_MESSAGE_CHARS`` (16 MiB) without ending a message (an endless line would
otherwise be buffered whole). ``listen`` retries a local
app that fails or refuses (any answer but 2xx) with the same backoff until it takes the
event, so one event is never skipped for the next; an event cut off mid-forward by Ctrl-C
is sent again on restart (the app deduplicates on ``webhook-id``, the event id).

A refusal that retrying cannot fix ends the command with one line: a wrong token (401), a
cursor of another deployment (400), no stream at that URL (404, 501, any answer but 200
other than 408, 429, 502, 503 and 504, which are reconnected).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from httpx_sse import EventSource, SSEError, aconnect_sse

from .admin.client import AdminClient
from .config import (
    ADMIN_TOKEN_TEXT,
    NotRegularFile,
    is_admin_token_text,
    read_regular_file,
    read_setting,
)
from .errors import ConfigError
from .redact import printable, printable_json
from .signature import signed_headers, standard_webhooks_key
from .store import Store
from .store.stream import follow

#: Longest pause between two reconnects, or two tries of the local app (seconds).
MAX_BACKOFF_SECONDS = 30.0
#: First pause after a failure (seconds); doubles each time, with jitter.
FIRST_BACKOFF_SECONDS = 0.5
#: A stream silent this long is taken as lost (three missed keepalives).
READ_TIMEOUT_SECONDS = 45.0
#: Seconds to wait for the local app's answer to one forward.
FORWARD_TIMEOUT_SECONDS = 30.0
#: Most characters one stream message (its lines up to the blank line that ends it) may
#: hold. A message carries its event's body twice (``payload`` and ``raw``, JSON-escaped):
#: at most about 3 times the body, so events up to 5 MiB (LACUNA_MAX_BODY_BYTES is 1 MiB by
#: default) fit. Past it the stream is taken as lost and reconnected; the third time in a
#: row at the same place, ``listen`` stops with one line instead of looping.
MAX_MESSAGE_CHARS = 16 * 1024 * 1024
#: How many times in a row a message past ``MAX_MESSAGE_CHARS`` may come at one cursor.
MAX_OVERSIZED_IN_A_ROW = 3


class ListenError(Exception):
    """A refusal that retrying cannot fix; ``str()`` is one line for the user."""


class ArgumentError(ListenError):
    """A ``ListenError`` about what the command was given (an option, a setting, the cursor
    file it names): exit code 2, as every command's bad arguments (docs/cli.md)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the admin API is, and the token to present."""

    url: str
    token: str


def admin_target(url: str | None, token: str | None, environ: Mapping[str, str]) -> Target:
    """``--url`` / ``--token``, else ``LACUNA_ADMIN_URL`` / ``LACUNA_ADMIN_TOKEN`` (or its
    ``_FILE``; of several comma-separated tokens, the first), for every command that reaches
    a remote admin API (``tail``, ``listen``, ``replay``, ``backfill``). ``ListenError``
    names what is missing or wrong, and never echoes the URL or the token: a URL may carry
    credentials (``http://user:password@host``), which must not reach a terminal or a log."""
    url = check_admin_url((url or environ.get("LACUNA_ADMIN_URL") or "").strip())
    if token is None:
        try:
            token = read_setting(environ, "LACUNA_ADMIN_TOKEN")
        except ConfigError as exc:
            raise ArgumentError(str(exc)) from None
        token = (token or "").split(",")[0]
    token = token.strip()
    if not token:
        raise ArgumentError("give the admin token: --token or LACUNA_ADMIN_TOKEN")
    if not is_admin_token_text(token):
        # The rule `serve` applies to LACUNA_ADMIN_TOKEN; never echoed (it is a credential).
        raise ArgumentError(f"--token / LACUNA_ADMIN_TOKEN must be {ADMIN_TOKEN_TEXT}")
    return Target(url.rstrip("/"), token)


def check_admin_url(url: str) -> str:
    """``url`` checked as the admin listener's ``http(s)://host[:port][/path]``, else a
    ``ListenError`` that says what is wrong without echoing it."""
    what = "--url / LACUNA_ADMIN_URL"
    if not url:
        raise ArgumentError(
            "give the admin API's address: --url http://HOST:8001 or LACUNA_ADMIN_URL"
        )
    if len(url) > 2000:
        raise ArgumentError(f"{what} is longer than 2000 characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise ArgumentError(f"{what} is not a valid URL: it holds a space or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        raise ArgumentError(f"{what} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        shown = f"a {parts.scheme}: URL" if parts.scheme.isalnum() else "something else"
        raise ArgumentError(f"{what} must be the admin listener's http(s):// URL, got {shown}")
    if "@" in parts.netloc:
        raise ArgumentError(
            f"{what} must not hold credentials (user:password@): the admin API takes a bearer"
            " token (--token or LACUNA_ADMIN_TOKEN)"
        )
    if not parts.hostname or port == 0 or parts.query or parts.fragment:
        raise ArgumentError(f"{what} must be http(s)://HOST[:PORT], without a query or fragment")
    try:
        # .host: a host name is IDNA-decoded only there (a bad xn-- label raised at send).
        httpx.URL(url).host  # noqa: B018
    except (httpx.InvalidURL, UnicodeError):
        raise ArgumentError(f"{what} is not a valid URL") from None
    return url


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1, 2, …): doubling from
    ``FIRST_BACKOFF_SECONDS``, capped, with up to 25 % jitter so many listeners do not
    reconnect in step."""
    exponent = min(max(0, failures - 1), 16)  # past 16 doublings the cap holds anyway
    base = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2.0**exponent)
    return base * (0.75 + random.random() * 0.25)  # jitter, not a secret


# --- the cursor file ---------------------------------------------------------------------------


def default_cursor_file(target: Target, forward_to: str, environ: Mapping[str, str]) -> Path:
    """``$XDG_STATE_HOME/lacuna-webhooks/listen/<hash>.json`` (``~/.local/state`` without
    it): one file per (deployment, local URL) pair, so two listeners never share one."""
    state = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    key = hashlib.sha256(f"{target.url}\n{forward_to}".encode()).hexdigest()[:16]
    return Path(state) / "lacuna-webhooks" / "listen" / f"{key}.json"


#: A cursor file this command wrote is about 200 bytes; anything much larger is another file.
MAX_CURSOR_FILE_BYTES = 64 * 1024


def read_cursor_file(path: Path) -> str | None:
    """The saved cursor, or ``None`` when there is no file yet; ``ListenError`` for a file
    that is not one this command wrote (also a FIFO, a device or a directory: refused, never
    read, so that a FIFO cannot hang the start and ``/dev/zero`` cannot fill memory)."""
    try:
        data = read_regular_file(path, MAX_CURSOR_FILE_BYTES)
    except FileNotFoundError:
        return None
    except (NotRegularFile, IsADirectoryError):
        raise ArgumentError(f"the cursor file {path} is not a regular file") from None
    except OSError as exc:
        raise ListenError(f"cannot read the cursor file {path}: {exc.strerror}") from None
    if len(data) > MAX_CURSOR_FILE_BYTES:
        raise ArgumentError(f"{path} is not a cursor file (larger than 64 KiB)")
    try:
        saved = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ArgumentError(f"{path} is not a cursor file ({exc})") from None
    cursor = saved.get("cursor") if isinstance(saved, dict) else None
    if not isinstance(cursor, str) or not cursor:
        raise ArgumentError(f"{path} holds no cursor: delete it to start from now")
    if not is_cursor(cursor):
        raise ArgumentError(
            f"{path} holds no cursor this service made: delete it to start from now"
        )
    return cursor


#: What a stream cursor can be: it goes back in the Last-Event-ID header, so visible ASCII
#: only (the service's own are base64url, at most 200 characters: store/stream.py).
_CURSOR = re.compile(r"[!-~]{1,200}")


def is_cursor(value: str) -> bool:
    """Whether ``value`` can be a stream cursor (and so a Last-Event-ID header value)."""
    return _CURSOR.fullmatch(value) is not None


def write_cursor_file(path: Path, cursor: str, *, url: str, event_id: str) -> None:
    """Replace the file atomically (a temporary file fsynced, then renamed over it): a crash
    leaves the old cursor or the new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = orjson.dumps({"cursor": cursor, "url": url, "event_id": event_id})
    with temporary.open("wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # the rename itself: durable once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def check_cursor_folder(path: Path) -> None:
    """``ListenError`` unless the cursor file can be replaced (its folder made if missing, a
    file created in it and removed): found now, not after the first event was forwarded,
    when the command could only stop and forward that event again on its next start."""
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ListenError(f"cannot keep the cursor file {path}: {exc}") from None


# --- following the stream ----------------------------------------------------------------------

OnEvent = Callable[[str, dict[str, Any]], Awaitable[None]]


async def follow_stream(
    target: Target,
    cursor: str | None,
    on_event: OnEvent,
    *,
    from_beginning: bool = False,
    say: Callable[[str], None],
) -> None:
    """Call ``on_event(cursor, event)`` for each event of the stream after ``cursor`` (else
    from now, or from the beginning), in order, for ever: a lost stream is reported with
    ``say`` and reconnected with backoff, resuming after the last event ``on_event``
    returned for. ``ListenError`` for a refusal retrying cannot fix."""
    failures = 0
    oversized = 0  # messages past MAX_MESSAGE_CHARS in a row, all after this same cursor
    lost = False
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_SECONDS)
    async with AdminClient(target.url, target.token) as client:
        while True:
            headers = {} if cursor is None else {"last-event-id": cursor}
            params = {} if cursor is not None or not from_beginning else {"from": "beginning"}
            reason: str
            try:
                async with aconnect_sse(
                    client.http,
                    "GET",
                    client.base + "/stream",
                    headers=headers,
                    params=params,
                    timeout=timeout,
                ) as connected:
                    response = connected.response
                    source = EventSource(_BoundedMessages(response))  # type: ignore[arg-type]
                    if response.status_code != 200:
                        await response.aread()
                        _refusal(response, cursor)
                        raise httpx.HTTPStatusError(
                            f"{response.status_code}", request=response.request, response=response
                        )
                    if lost:
                        say(f"stream: reconnected to {shown_url(client.base)}/stream")
                    lost = False
                    failures = 0
                    async for message in source.aiter_sse():
                        if message.event != "event" or not message.id:
                            continue
                        if not is_cursor(message.id):
                            # Saved, it could never be sent back: every restart would fail.
                            raise ListenError(
                                "the stream sent an event id that is not a cursor this service"
                                f" makes ({printable(message.id[:200])}): is "
                                f"{shown_url(client.base)} the admin API of lacuna-webhooks?"
                            )
                        try:
                            event = orjson.loads(message.data)
                        except orjson.JSONDecodeError:
                            event = None
                        if not isinstance(event, dict):
                            raise ListenError(
                                "the stream sent a message that is not an event's JSON object "
                                f"(id {printable(message.id[:200])})"
                            )
                        await on_event(message.id, event)
                        cursor = message.id
                        oversized = 0
                reason = "the server ended it"
            except httpx.HTTPStatusError as exc:
                reason = f"the server answered {exc.response.status_code}"
            except httpx.ReadTimeout:
                reason = f"nothing heard for {READ_TIMEOUT_SECONDS:g} s"
            except (httpx.HTTPError, SSEError) as exc:
                reason = str(exc) or type(exc).__name__
            except MessageTooLarge:
                reason = f"a message longer than {MAX_MESSAGE_CHARS // 1024 // 1024} MiB"
                oversized += 1
                if oversized >= MAX_OVERSIZED_IN_A_ROW:
                    # The same place each time: an event too large to take, not a glitch.
                    # Looping would re-read it twice a second for ever and skip nothing.
                    raise ListenError(
                        f"the stream's next event (after cursor {cursor or 'start'}) is a "
                        f"message longer than {MAX_MESSAGE_CHARS // 1024 // 1024} MiB, "
                        f"{MAX_OVERSIZED_IN_A_ROW} times in a row: too large to take"
                    ) from None
            failures += 1
            lost = True
            delay = backoff(failures)
            say(f"stream: lost ({reason}); reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)


class MessageTooLarge(Exception):
    """The stream sent more than ``MAX_MESSAGE_CHARS`` without ending a message."""


# The end of an SSE message: a line terminator (CRLF, CR or LF) followed by another.
_BLANK_LINE = re.compile(r"(?:\r\n|\r(?!\n)|\n)[\r\n]")


class _BoundedMessages:
    """A stream response whose text fails with ``MessageTooLarge`` once more than
    ``MAX_MESSAGE_CHARS`` arrive after the last blank line (the end of a message).

    httpx-sse buffers a line, and a message's data lines, without bound: a server that
    streams one endless line (or endless ``data:`` lines) would take all memory. Only
    ``headers`` and ``aiter_text`` are what ``EventSource`` reads of a response.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.headers = response.headers
        self._response = response

    async def aiter_text(self) -> AsyncIterator[str]:
        pending = 0  # characters since the last blank line
        tail = ""  # the last two characters, for a terminator split between chunks
        async for text in self._response.aiter_text():
            window = tail + text
            ends = [m.end() for m in _BLANK_LINE.finditer(window)]
            pending = len(window) - ends[-1] if ends else pending + len(text)
            if pending > MAX_MESSAGE_CHARS:
                raise MessageTooLarge
            tail = window[-2:]
            yield text


#: The answers that another try may not get (a proxy whose upstream is restarting, a server
#: shedding load, a timeout): the stream is reconnected with backoff. Any other answer but
#: 200 ends the command with one line.
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})


def _refusal(response: httpx.Response, cursor: str | None) -> None:
    """Raise ``ListenError`` for an answer that another try would get again."""
    status = response.status_code
    if status == 401:
        raise ListenError("the admin API refused the token (401): check --token")
    if status == 400 and cursor is not None:
        raise ListenError(
            "the admin API refused the saved cursor (400): it belongs to another deployment "
            "or database; delete the cursor file to start from now"
        )
    if status not in RETRYABLE_STATUSES:
        # 404, 405, 501, a redirect, any answer another try gets again: not a stream, and
        # reconnecting to it would loop for ever.
        raise ListenError(f"no live stream at that URL ({status}): is --url the admin API?")


# --- tail --------------------------------------------------------------------------------------


def tail_line(event: dict[str, Any]) -> str:
    """One line for an event: received time, type, id, task and title (control characters
    shown escaped, so an event cannot move the terminal's cursor)."""
    payload = event.get("payload")
    data = payload.get("data") if isinstance(payload, dict) else None
    title = data.get("title") if isinstance(data, dict) else None
    parts = [
        str(event.get("received_at", ""))[:19].replace("T", " "),
        str(event.get("type", "")),
        str(event.get("id", "")),
        str(event.get("task_id") or "-"),
    ]
    if isinstance(title, str):
        parts.append(title)
    return "  ".join(printable(part) for part in parts)


async def tail(
    target: Target, *, as_json: bool, from_beginning: bool, out: TextIO, say: Callable[[str], None]
) -> None:
    async def show(cursor: str, event: dict[str, Any]) -> None:
        if as_json:
            event = {k: v for k, v in event.items() if k != "raw"}
            out.write(printable_json(orjson.dumps(event).decode()) + "\n")
        else:
            out.write(tail_line(event) + "\n")
        out.flush()

    say(f"following {shown_url(target.url)}/api/v1/stream (Ctrl-C to stop)")
    await follow_stream(target, None, show, from_beginning=from_beginning, say=say)


async def tail_store(
    store: Store,
    *,
    as_json: bool,
    from_beginning: bool,
    out: TextIO,
    say: Callable[[str], None],
) -> None:
    """``tail`` without an admin API: follow the stream of the store ``LACUNA_DATABASE_URL``
    names, directly (events another process stores are seen within about a second)."""
    from .admin.api_live import stream_event

    cursor = None if from_beginning else await store.stream_head()
    say("following the store's stream (Ctrl-C to stop)")
    async for batch in follow(store, cursor, stopping=asyncio.Event(), idle_seconds=3600.0):
        for _, record in batch:
            event = stream_event(record)
            if as_json:
                shown = {k: v for k, v in event.items() if k != "raw"}
                out.write(
                    printable_json(orjson.dumps(shown, option=orjson.OPT_UTC_Z).decode()) + "\n"
                )
            else:
                out.write(
                    tail_line({**event, "received_at": record.received_at.isoformat()}) + "\n"
                )
        out.flush()


# --- listen ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Forwarder:
    """Posts each event to ``url`` until the app answers 2xx, then saves the cursor."""

    url: str
    keys: tuple[bytes, ...]
    events: frozenset[str] | None
    cursor_file: Path
    admin_url: str
    say: Callable[[str], None]
    http: httpx.AsyncClient
    forwarded: int = 0

    async def __call__(self, cursor: str, event: dict[str, Any]) -> None:
        event_id, event_type = str(event.get("id", "")), str(event.get("type", ""))
        if self.events is None or event_type in self.events:
            await self._deliver(event_id, event_type, str(event.get("raw", "")).encode())
        # Saved only now: a crash before this line forwards the event again, never skips it.
        write_cursor_file(self.cursor_file, cursor, url=self.admin_url, event_id=event_id)

    async def _deliver(self, event_id: str, event_type: str, body: bytes) -> None:
        failures = 0
        while True:
            # webhook-id and webhook-timestamp always (the app deduplicates on the id); the
            # signature with --secret.
            headers = signed_headers(event_id, event_type, body, self.keys, int(time.time()))
            headers["lacuna-attempt"] = str(failures + 1)
            started = time.monotonic()
            try:
                response = await self.http.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                took = (time.monotonic() - started) * 1000
                if 200 <= response.status_code < 300:
                    self.forwarded += 1
                    self.say(f"-> {event_id} {event_type}: {response.status_code} ({took:.0f} ms)")
                    return
                problem = f"answered {response.status_code}"
            failures += 1
            delay = backoff(failures)
            self.say(f"-> {event_id} {event_type}: {problem}; trying again in {delay:.1f} s")
            await asyncio.sleep(delay)


def parse_events(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    names = frozenset(item.strip() for item in value.split(",") if item.strip())
    if not names:
        raise ArgumentError("--events names no event type")
    return names


def parse_secret(value: str | None) -> tuple[bytes, ...]:
    if value is None:
        return ()
    try:
        keys = tuple(standard_webhooks_key(item) for item in value.split(",") if item.strip())
    except ValueError as exc:
        raise ArgumentError(f"--secret {exc}") from None
    if not keys:
        # `--secret ,` (or an empty $VAR) was read as no secret: every event then went to the
        # app unsigned, though a secret was asked for.
        raise ArgumentError("--secret names no secret: pass one, or leave it out")
    return keys


async def listen(
    target: Target,
    *,
    forward_to: str,
    keys: tuple[bytes, ...],
    events: frozenset[str] | None,
    cursor_file: Path,
    from_beginning: bool,
    say: Callable[[str], None],
) -> None:
    cursor = read_cursor_file(cursor_file)
    check_cursor_folder(cursor_file)
    if cursor is None:
        where = "the first stored event" if from_beginning else "now"
        say(
            f"following {shown_url(target.url)}/api/v1/stream from {where}; "
            f"cursor file {cursor_file}"
        )
    else:
        say(
            f"resuming {shown_url(target.url)}/api/v1/stream after the last forwarded event "
            f"({cursor_file})"
        )
    say(f"forwarding to {shown_url(forward_to)}" + ("" if keys else " (unsigned: no --secret)"))
    async with httpx.AsyncClient(
        timeout=FORWARD_TIMEOUT_SECONDS, follow_redirects=False, trust_env=False
    ) as http:
        forward = Forwarder(forward_to, keys, events, cursor_file, shown_url(target.url), say, http)
        await follow_stream(target, cursor, forward, from_beginning=from_beginning, say=say)


def run(main: Awaitable[None], say: Callable[[str], None], *, signal_exit: bool = False) -> int:
    """Run ``main`` until it raises or SIGINT / SIGTERM / SIGHUP arrives; then stop cleanly,
    saying ``stopped``: exit code 0 (``listen``: its documented clean stop), or with
    ``signal_exit`` (``tail``) 128 + the signal's number, as for every other command (Ctrl-C:
    130)."""
    received: list[int] = []

    async def supervised() -> int:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, stop, signum)
        try:
            await task
        except asyncio.CancelledError:
            say("stopped")
            return 128 + received[0] if signal_exit and received else 0
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        return 0

    return asyncio.run(supervised())


def stderr_say(line: str) -> None:
    """One status line on stderr, control characters shown escaped: event ids and types,
    and the server's error texts, come from the network and must not drive the terminal."""
    print(f"lacuna-webhooks: {printable(line)}", file=sys.stderr, flush=True)


def shown_url(url: str) -> str:
    """``url`` as a status line or the cursor file shows it: without user and password,
    query or fragment (where a token may hide), keeping scheme, host and path."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


__all__ = [
    "ArgumentError",
    "ListenError",
    "Target",
    "admin_target",
    "backoff",
    "check_cursor_folder",
    "default_cursor_file",
    "follow_stream",
    "listen",
    "read_cursor_file",
    "run",
    "shown_url",
    "stderr_say",
    "tail",
    "tail_line",
    "tail_store",
    "write_cursor_file",
]
