"""Keeping secrets out of log lines and error messages.

Two layers, both applied to every log line (``logs.configure``) and to every
stored attempt error (``dispatcher.describe_error``) through ``redact_text``:

- **URLs by shape.** ``redact_url`` cuts a URL to ``scheme://host[:port]``, with
  ``/…`` standing for whatever followed: the userinfo (``user:password@``), the
  path (a Slack incoming-webhook path *is* the credential; a presigned URL may
  carry its token in the path), the query (``X-Amz-Signature=…``) and the
  fragment never show. ``file:`` and ``s3:`` URLs name our own storage, not a
  secret, and keep their path (without query or fragment).
- **Known values.** ``secret_values(environ)`` lists the secret values the
  environment holds (``LACUNA_WEBHOOK_SECRET``, every ``LACUNA_*``/``AWS_*``
  variable named like a secret, the password and secret-looking query values
  of every URL setting, the path of every ``*_WEBHOOK_URL``); ``remember_secrets`` makes
  ``redact_text`` replace each of them, wherever it appears, with ``MASK``.
  Values shorter than ``MIN_SECRET_CHARS`` are not remembered (masking every
  ``guest`` or ``1234`` would garble unrelated text; such a value protects
  nothing anyway).

This module imports nothing of ours, so ``config``, ``logs`` and the handlers
can all use it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "**********"
MIN_SECRET_CHARS = 6
_KEEP_PATH_SCHEMES = frozenset({"file", "s3", "sqlite"})
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
# host (a name, an IPv4 address or a bracketed IPv6 address) and an optional numeric port
_HOST_PORT = re.compile(r"(?:[A-Za-z0-9._~%-]*|\[[0-9A-Fa-f:.%A-Za-z]+\])(?::[0-9]*)?")
_SECRET_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|TOKEN|SECRET_KEY|ACCESS_KEY|ACCESS_KEY_ID|API_KEY|PRIVATE_KEY"
    r"|CREDENTIALS?)$",
    re.IGNORECASE,
)
_SECRET_QUERY_KEY = re.compile(r"sig|token|secret|pass|key|cred|auth", re.IGNORECASE)
_URL_NAME = re.compile(r"(URL|URI|DSN|ENDPOINT|ENDPOINTS|SERVERS?|BROKERS?)$", re.IGNORECASE)
_SECRET_PATH_NAME = re.compile(r"WEBHOOK_URL$", re.IGNORECASE)

_known: tuple[str, ...] = ()
_known_re: re.Pattern[str] | None = None


def redact_url(url: str) -> str:
    """``https://u:p@hooks.example/T0/B0/xyz?t=1#f`` -> ``https://hooks.example/…``.

    Enough to tell which endpoint, never its credentials, path, query or fragment
    (``file:`` and ``s3:`` URLs keep their path). Something that is not a
    ``scheme://…`` URL becomes ``…``; a host that does not look like one (as in a
    mistyped ``user:pass/word@host``) becomes ``scheme://…``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return "…"
    if scheme.lower() in _KEEP_PATH_SCHEMES:
        return f"{scheme}://{re.split(r'[?#]', rest, maxsplit=1)[0]}"
    authority = re.split(r"[/?#\\]", rest, maxsplit=1)[0]
    tail = rest[len(authority) :]
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    elif "@" in re.split(r"[?#]", tail, maxsplit=1)[0]:
        # "user:pass/word@host": the "host" before the "/" may be part of a password.
        return f"{scheme}://…"
    if not _HOST_PORT.fullmatch(authority):
        return f"{scheme}://…"
    return f"{scheme}://{authority}" + ("/…" if tail.strip("/") else "")


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (``redact_url``) and every remembered
    secret value replaced by ``MASK``."""
    if "://" in text:
        text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return mask_secrets(text)


def needs_redaction(text: str) -> bool:
    """Whether ``redact_text`` would change ``text`` (a quick test: a URL or a secret in it)."""
    return "://" in text or (_known_re is not None and _known_re.search(text) is not None)


def mask_secrets(text: str) -> str:
    """``text`` with every remembered secret value replaced by ``MASK`` (URLs left whole:
    for messages of our own, which already show URLs redacted and may show a URL's form,
    such as ``sqlite:///PATH``)."""
    return text if _known_re is None else _known_re.sub(MASK, text)


def mask_cut_secret(text: str) -> str:
    """``text`` with a remembered secret's beginning at its very end (at least 4 of its
    characters) replaced by ``MASK``: for text cut at an arbitrary point (a line truncated
    at its cap), where the rest of the secret, and so the whole value, never arrives."""
    for value in _known:
        for size in range(len(value) - 1, 3, -1):
            if text.endswith(value[:size]):
                return text[:-size] + MASK
    return text


def remember_secrets(values: Iterable[str]) -> None:
    """Add ``values`` (those of at least ``MIN_SECRET_CHARS``) to what ``redact_text`` masks."""
    global _known, _known_re  # one process-wide list, filled at start
    fresh = {v for v in values if len(v) >= MIN_SECRET_CHARS}
    # Longest first, so a secret containing another is masked whole.
    _known = tuple(sorted(fresh.union(_known), key=len, reverse=True))
    # One pattern for all of them: a line is searched once, not once per secret.
    _known_re = re.compile("|".join(map(re.escape, _known))) if _known else None


def secret_values(environ: Mapping[str, str]) -> set[str]:
    """Every secret value in ``environ``'s ``LACUNA_*`` and ``AWS_*`` variables.

    A variable named like a secret (``…SECRET``, ``…PASSWORD``, ``…TOKEN``, ``…KEY``,
    ``…KEY_ID``…) gives its value and each of its comma-separated items; a URL
    setting (``…URL``, ``…DSN``, ``…ENDPOINT``, ``…SERVERS``, ``…BROKERS``) gives the
    password of each URL in it and the query values whose key looks secret (``token``,
    ``sig``, ``password``, ``key``…); a ``…WEBHOOK_URL`` also gives
    its path (the credential of an incoming webhook) and the whole URL; a ``…HEADERS``
    JSON object gives its values. Values are
    given as written and URL-decoded. ``NAME_FILE`` variables count as ``NAME`` with the
    content of the file they name.
    """
    found: set[str] = set()
    for name, raw in _with_file_values(environ):
        if not name.upper().startswith(("LACUNA_", "AWS_")) or not raw.strip():
            continue
        if _SECRET_NAME.search(name):
            found.add(raw.strip())
            found.update(item.strip() for item in raw.split(","))
        if _URL_NAME.search(name):
            for url in re.split(r"[\s,]+", raw.strip()):
                found.update(url_secrets(url, secret_path=bool(_SECRET_PATH_NAME.search(name))))
        if name.upper().endswith("_HEADERS"):
            found.update(header_secrets(raw))
    return {v for v in found if v}


def header_secrets(raw: str | None) -> set[str]:
    """The values of a ``…_HEADERS`` JSON object (extra request headers: API keys, bearer
    tokens), each whole and its last word (the token of ``Bearer <token>``): a peer that
    echoes a request's headers in its refusal put them in the error text."""
    try:
        headers = json.loads(raw or "{}")
    except ValueError:
        return set()  # the setting's own check reports it
    if not isinstance(headers, dict):
        return set()
    found: set[str] = set()
    for value in headers.values():
        if isinstance(value, str) and value.strip():
            found.add(value.strip())
            found.add(value.split()[-1])
    return found


def _with_file_values(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``environ``'s items, plus ``(NAME, file content)`` for each ``NAME_FILE`` naming a
    readable regular file of at most 64 KiB (the ``*_FILE`` convention for secrets kept in
    files)."""
    items = list(environ.items())
    for name, path in environ.items():
        if not name.upper().endswith("_FILE") or not path.strip():
            continue
        file = Path(path.strip())
        try:
            if not file.is_file():  # a FIFO or a device could block or never end
                continue
            with file.open("rb") as f:
                content = f.read(65537)
        except OSError:
            continue  # the setting's own check reports it
        if len(content) <= 65536:
            items.append((name[: -len("_FILE")], content.decode("utf-8", "replace").strip()))
    return items


def _sent_credentials(username: str, password: str) -> set[str]:
    """The encodings a client sends a URL's user and password in, as written and as decoded
    (percent-decoded parts, UTF-8 and Latin-1), each of which reads back to the password: a
    peer that echoes what it was sent in its refusal puts them in the error text.

    - HTTP ``Authorization: Basic`` (RFC 7617): base64 of ``user:password``, as httpx and
      most clients send it;
    - SMTP ``AUTH PLAIN`` (RFC 4616): base64 of ``\\0user\\0password``; ``AUTH LOGIN``:
      base64 of the password alone (a server answering ``535 … <what you sent>``).

    Each also without its ``=`` padding, which an echo may drop."""
    found: set[str] = set()
    for user, secret in {(username, password), (unquote(username), unquote(password))}:
        for encoding in ("utf-8", "latin-1"):
            try:
                user_bytes, secret_bytes = user.encode(encoding), secret.encode(encoding)
            except UnicodeEncodeError:
                continue
            for sent in (
                user_bytes + b":" + secret_bytes,
                b"\0" + user_bytes + b"\0" + secret_bytes,
                secret_bytes,
            ):
                token = base64.b64encode(sent).decode("ascii")
                found.update({token, token.rstrip("=")})
    return found


def url_secrets(url: str, *, secret_path: bool) -> set[str]:
    """The secrets ``url`` holds, as written and URL-decoded: its password and the tokens a
    client sends it in (``Basic``, SMTP ``AUTH``: ``_sent_credentials``), its query values
    whose key looks secret, and with ``secret_path`` the whole URL and its path (an incoming
    webhook's credential)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        # Not even a URL: whatever sits between "://" and the last "@" may be credentials.
        _, _, rest = url.partition("://")
        userinfo = rest.rpartition("@")[0]
        return {userinfo, userinfo.partition(":")[2]} if userinfo else set()
    found = {
        value
        for key, value in parse_qsl(parts.query) + parse_qsl(parts.fragment)
        if _SECRET_QUERY_KEY.search(key)
    }
    if password:
        found.update({password, unquote(password)})
        found.update(_sent_credentials(parts.username or "", password))
    if secret_path and parts.path.strip("/"):
        found.update({url, parts.path, unquote(parts.path)})
    return found


__all__ = [
    "MASK",
    "MIN_SECRET_CHARS",
    "exception_text",
    "header_secrets",
    "json_escape",
    "mask_secrets",
    "needs_redaction",
    "printable",
    "printable_json",
    "printable_lines",
    "redact_text",
    "redact_url",
    "remember_secrets",
    "secret_values",
    "url_secrets",
]


#: ``type.__name__`` itself: a plugin's metaclass may define its own ``__name__`` (a property
#: that raises, or returns 50 MB), which ``type(exc).__name__`` would call.
_TYPE_NAME: Any = type.__dict__["__name__"]
UNREADABLE_MESSAGE = "(its message could not be read)"


def exception_text(exc: BaseException, limit: int) -> str:
    """``"ValueError: boom"`` for any exception a plugin raised, at most about ``limit``
    characters (not redacted: see ``redact_text``). It never raises and calls nothing of the
    exception's class but ``__str__``, whose failure (or non-``str`` result) is
    ``UNREADABLE_MESSAGE``: a metaclass's ``__name__``, a ``__str__`` that raises or
    returns a ``str`` subclass whose ``__format__``/``strip`` raise once escaped from the
    code that describes an attempt's error (the attempt was then never answered, and
    recorded a timeout 20 s later) or a plugin's start failure (a traceback)."""
    cls = type(exc)
    try:
        name = str.__str__(_TYPE_NAME.__get__(cls, type(cls)))
    except BaseException:
        name = "Exception"
    try:
        # str.__str__: the exact text of a str subclass, none of its own methods.
        message = str.__str__(str(exc))[: limit + 1].strip()
    except BaseException:
        message = UNREADABLE_MESSAGE
    text = f"{name[:200]}: {message}" if message else name[:200]
    return text[: limit + 1]


def value_text(value: object, limit: int) -> str:
    """``repr(value)`` of something a plugin made, at most ``limit`` characters (not
    redacted), or ``"(unreadable)"`` when its ``__repr__`` raises or returns no ``str``: it
    never raises, as ``exception_text``."""
    try:
        return str.__str__(repr(value))[:limit]
    except BaseException:
        return "(unreadable)"


def printable(text: str) -> str:
    """``text`` for a terminal or a one-line message: control characters (a newline, an ESC
    starting a terminal escape sequence, a NUL) written as ``\\n``, ``\\x1b``, ``\\x00``.
    Ids, types, errors and settings come from senders, handlers and operators; printed raw
    they forged table rows, split one-line errors and drove the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def printable_lines(text: str) -> str:
    """``text`` of several lines (an HTTP answer's body) for a terminal: each line as
    ``printable`` writes it, the newlines between them kept (a CR is escaped: it would move
    the cursor back over what was printed)."""
    if text.isprintable():
        return text
    return "\n".join(printable(line) for line in text.split("\n"))


def printable_json(text: str) -> str:
    """JSON text for a terminal, meaning the same: every character that is not printable is
    written as a ``\\uXXXX`` escape, but the newlines, tabs and spaces between values. A
    JSON document holds raw control characters only as that whitespace (a CR becomes a
    newline); any other, in a string (DEL, a C1 control such as CSI ``\\x9b``, a line
    separator), is escaped as JSON escapes it: a value from the network (a handler's result,
    a stored payload, an event of the stream) cannot drive the terminal, and ``jq`` still
    reads the same values."""
    if text.isprintable():
        return text
    out: list[str] = []
    for c in text:
        if c.isprintable() or c in "\n\t ":
            out.append(c)
        elif c == "\r":
            out.append("\n")
        else:
            out.append(json_escape(c))
    return "".join(out)


def json_escape(char: str) -> str:
    """``char`` as JSON writes it escaped: ``\\u202e``, or a surrogate pair past U+FFFF."""
    if ord(char) > 0xFFFF:
        high, low = divmod(ord(char) - 0x10000, 0x400)
        return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"
    return f"\\u{ord(char):04x}"
