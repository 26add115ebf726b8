"""Settings, read once from the environment at start and validated as a whole.

``Settings.from_env(environ)`` checks every variable and raises one
``ConfigError`` naming each bad one; nothing reads the environment later
except handlers, which get their own ``LACUNA_<NAME>_*`` view through
``HandlerContext``.

Secrets from files (SPEC §10): ``read_setting`` is the one reader of a setting
that may instead come from a file named by ``<VAR>_FILE`` (Docker and Kubernetes
mount secrets as files). It serves ``LACUNA_WEBHOOK_SECRET``,
``LACUNA_ADMIN_TOKEN``, ``LACUNA_DATABASE_URL`` and every handler setting.
``secret_problems`` names what makes a secret value impossible (quotes kept by
an env-file loader, whitespace, control characters) so ``serve`` can warn.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError
from .redact import redact_text, redact_url

T = TypeVar("T")

DEFAULT_DATABASE_URL = "sqlite:///./lacuna-webhooks.db"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
# Anchored with \A...\Z, never ^...$ (``$`` also matches before a trailing newline), so a
# ``.match`` elsewhere is as whole as the ``fullmatch`` used here.
HANDLER_NAME_RE = re.compile(r"\A[a-z][a-z0-9_]{0,39}\Z")
FILE_SUFFIX = "_FILE"
# A secret file holds one value; anything larger is the wrong file (or /dev/zero).
MAX_SETTING_FILE_BYTES = 64 * 1024
MAX_INT_DIGITS = 18  # every whole-number bound is below 10**18
MIN_ADMIN_TOKEN_LENGTH = 32  # SPEC §9
# Upper bounds of the numeric settings. Far above any sensible value; without them a huge
# number passed validation and broke later (a timedelta overflow stopped the dispatcher, an
# OverflowError traceback at start, a SQLite integer overflow, a busy loop from a tiny poll).
MAX_TIMEOUT_SECONDS = 86_400.0  # handler timeouts: one day
MAX_DELAY_SECONDS = 30 * 86_400.0  # retry delays: thirty days
MAX_TOLERANCE_SECONDS = 86_400  # the replay window: one day
MAX_BODY_BYTES = 100 * 1024 * 1024
MAX_RETRY_ATTEMPTS = 1_000_000
MAX_CONCURRENCY = 1_000
MIN_POLL_SECONDS, MAX_POLL_SECONDS = 0.01, 3_600.0
MAX_RETENTION_DAYS = 36_500.0
MAX_SHUTDOWN_SECONDS = 3_600.0
# The HTTP server's limits (issue 10): a typo must not switch a cap or a timeout off.
MAX_CONNECTION_SECONDS = 3_600.0  # keep-alive, header, body and commit timeouts
#: Their floor: below it no request can arrive whole or commit (a value meant in ms, say).
MIN_CONNECTION_SECONDS = 0.1
#: Floors of the request-head limits: a signed webhook's head, behind a proxy that adds its
#: X-Forwarded-* lines, is several hundred bytes and at least four lines.
MIN_HEADER_BYTES = 1024
MIN_HEADERS = 8
#: The floor of a retry delay: 1e-320 retried a failing peer as fast as the loop could.
MIN_DELAY_SECONDS = 0.001
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADERS = 10_000
MAX_CONNECTIONS = 1_000_000
# An admin search's time budget: under the SQLite reader's 20 s interrupt, over a window.
MIN_SEARCH_BUDGET_SECONDS, MAX_SEARCH_BUDGET_SECONDS = 0.05, 10.0


def read_setting(environ: Mapping[str, str], var: str) -> str | None:
    """The value of ``var``, or the content of the file that ``<var>_FILE`` names.

    A blank variable counts as unset. From a file, exactly one trailing newline
    (``\\n`` or ``\\r\\n``) is removed and nothing else is changed. Returns
    ``None`` when neither is set. Raises ``ConfigError`` with one line naming the
    variable (never the content) when both are set, or when the file is missing,
    unreadable, not a regular file (a FIFO or a device), empty, larger than 64 KiB or
    not UTF-8.
    """
    file_var = var + FILE_SUFFIX
    value = environ.get(var)
    path = environ.get(file_var)
    has_value = value is not None and value.strip() != ""
    if path is None or not path.strip():
        if has_value:
            check_utf8(var, value)
        return value if has_value else None
    if has_value:
        raise ConfigError(f"{var} and {file_var} are both set: keep one of them")
    return read_file_setting(file_var, path.strip())


def check_utf8(var: str, value: str | None) -> None:
    """``ConfigError`` naming ``var`` (not the value: it may be a secret) if ``value`` holds
    bytes that are not UTF-8 (Python's environment keeps them as lone surrogates, which
    every later ``encode`` refuses with a traceback)."""
    if value is not None and not is_utf8(value):
        raise ConfigError(f"{var} is not valid UTF-8 text")


def is_utf8(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8 (no lone surrogates: bytes that were not UTF-8 in
    the environment or ``argv``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class NotRegularFile(Exception):
    """``read_regular_file``: the path names a FIFO, a device or a socket."""


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of the regular file ``path`` (one more than allowed:
    the caller tells a file that is too large), read once through one descriptor. A FIFO or
    a device named by mistake neither hangs the open nor is read. Raises ``NotRegularFile``,
    or the ``OSError`` of the open or the read (``IsADirectoryError`` for a directory)."""
    # O_NONBLOCK: a FIFO (or a device) must not hang the open; it is then refused below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        return f.read(max_bytes + 1)


def read_file_setting(
    var: str,
    path: str,
    *,
    max_bytes: int = MAX_SETTING_FILE_BYTES,
    strip_newline: bool = True,
    allow_empty: bool = False,
) -> str:
    """The UTF-8 text of the file ``path`` that the setting ``var`` names.

    Only a regular file of at most ``max_bytes`` is read, and it is read once, through one
    descriptor: a FIFO, a device (``/dev/zero``), a directory or a huge file named by mistake
    must neither hang nor bloat the start. ``strip_newline`` removes exactly one trailing
    newline. Raises ``ConfigError`` with one line naming ``var`` and ``path`` (never the
    content) for a missing, unreadable, irregular, empty (unless ``allow_empty``), too
    large or non-UTF-8 file.
    """
    try:
        data = read_regular_file(path, max_bytes)
    except NotRegularFile:
        raise ConfigError(f"{var}: {path} is not a regular file") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{var}: cannot read {path}: {reason}") from None
    if len(data) > max_bytes:
        hint = "; it should hold just the value" if max_bytes == MAX_SETTING_FILE_BYTES else ""
        raise ConfigError(f"{var}: {path} is larger than {_size(max_bytes)}{hint}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{var}: {path} is not UTF-8 text") from None
    if strip_newline and text.endswith("\n"):
        text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip() and not allow_empty:
        raise ConfigError(f"{var}: {path} is empty")
    return text


def _size(size_bytes: int) -> str:
    mib = 1024 * 1024
    return f"{size_bytes // mib} MiB" if size_bytes >= mib else f"{size_bytes // 1024} KiB"


def secret_problems(value: str) -> list[str]:
    """What makes ``value`` impossible as a secret, in words that never quote it.

    Checked: surrounding quotes (``"whsec_…"`` as some env-file loaders leave
    them), a quote at one end only, leading or trailing whitespace, whitespace
    inside, control characters. ``[]`` when nothing is wrong.
    """
    problems: list[str] = []
    inner = value.strip()
    if inner != value:
        problems.append("has leading or trailing whitespace (ignored, but it hints at a copy slip)")
    if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "\"'":
        problems.append(
            "is wrapped in quotes, which are used as part of the secret "
            "(an env-file loader may have kept them)"
        )
    elif inner[:1] in ("'", '"') or inner[-1:] in ("'", '"'):
        problems.append("starts or ends with a quote character")
    if any(c.isspace() for c in inner):
        problems.append("contains whitespace")
    if any(not c.isprintable() and not c.isspace() for c in inner):
        problems.append("contains control characters")
    return problems


class Secret:
    """A string that never shows itself in ``repr`` or ``str``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_bool(value: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off``, any case; else ``ValueError``."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"must be true or false, got {quoted(value)}")


def parse_list(value: str) -> tuple[str, ...]:
    """Comma-separated items, stripped, empty ones dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def positive_int(value: str) -> int:
    """A whole number > 0 in ASCII digits; ``ValueError`` ("must be …") otherwise."""
    text = value.strip()
    # ASCII digits only: int() also takes fullwidth or Arabic-Indic digits and "1_000".
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f"must be a whole number, got {quoted(value)}")
    significant = text.lstrip("+-").lstrip("0")
    if len(significant) > MAX_INT_DIGITS:
        # Past every bound anyway; int() of over 4300 digits raises with Python's own words.
        raise ValueError(f"must be a whole number of at most {MAX_INT_DIGITS} digits")
    # Converted without the leading zeros, which int() counts against its 4300 digits: a
    # PORT of 5000 zeros and 8080 was refused in Python's words (sys.set_int_max_str_digits).
    number = -int(significant or "0") if text.startswith("-") else int(significant or "0")
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {quoted(value)}")
    return number


def quoted(value: str) -> str:
    """``value`` quoted for an error line, cut short: a typo, not a 5000-digit wall. A URL in
    it is shown redacted (``redact_text``): a database or broker URL pasted into the wrong
    variable (``LACUNA_RETENTION_DAYS=postgresql://app:pw@db/x``) must not print its
    password, which the line promises never to show."""
    if "://" in value:
        value = redact_text(value)
    return repr(value) if len(value) <= 40 else repr(value[:40]) + "…"


def positive_float(value: str) -> float:
    """A finite number > 0; ``ValueError`` ("must be …") otherwise."""
    text = value.strip()
    try:
        # ASCII, no `_`, as whole numbers are read: float() also takes "1_0" and other
        # scripts' digits ("٣" was 3 seconds).
        if not text.isascii() or "_" in text:
            raise ValueError
        number = float(text)
    except ValueError:
        raise ValueError(f"must be a number, got {quoted(value)}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a finite number greater than 0, got {quoted(value)}")
    return number


def _number(value: object) -> str:
    """``2592000``, not ``2.592e+06``: a bound as the user would type it."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def at_most(parse: Callable[[str], T], limit: T, *, minimum: T | None = None) -> Callable[[str], T]:
    """``parse``, then refuse values above ``limit`` (or below ``minimum``) with a line.

    The one parser of bounded numbers, for the global settings and the per-handler
    ``LACUNA_<NAME>_*`` ones alike (``handlers._common``): the same bounds, the same words."""

    def bounded(value: str) -> T:
        number = parse(value)
        if number > limit:  # type: ignore[operator]
            raise ValueError(f"must be at most {_number(limit)}, got {quoted(value)}")
        if minimum is not None and number < minimum:  # type: ignore[operator]
            raise ValueError(f"must be at least {_number(minimum)}, got {quoted(value)}")
        return number

    return bounded


def _port(value: str) -> int:
    number = positive_int(value)
    if number > 65535:
        raise ValueError(f"must be a port number from 1 to 65535, got {quoted(value)}")
    return number


def _host(value: str) -> str:
    host = value.strip()
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"must be an address or host name to listen on, got {quoted(value)}")
    if host.startswith("[") and host.endswith("]"):
        # `[::1]`, as in a URL: the address itself is what a socket binds.
        try:
            return _address_text(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"is not a valid address or host name, got {quoted(value)}") from None
    try:
        # One spelling per address (`0:0::1` is `::1`), so that the webhook and admin
        # listeners are compared as addresses (listeners_clash), not as strings.
        return _address_text(ipaddress.ip_address(host))
    except ValueError:
        try:
            # What the resolver will do with it: an empty label (`a..b`) or one over 63
            # characters fails here, at start, instead of as a traceback from the server.
            name = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"is not a valid address or host name, got {quoted(value)}") from None
    if host != "*" and not _HOST_NAME.fullmatch(name):
        # The idna codec keeps what no host name holds (`,`, `:`, `[`, `%`, an escape): such
        # a typo was looked up, then refused as "could not listen", exit 1, not a setting.
        raise ValueError(f"is not a valid address or host name, got {quoted(value)}")
    return host


#: ``package.module:attr`` of a handler kind that is not an installed plugin.
_OBJECT_PATH = re.compile(
    r"\A[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z", re.ASCII
)


#: A host name as the resolver takes one (after IDNA): labels of letters, digits, `-` and
#: `_` (which /etc/hosts and container names use), joined by dots, one trailing dot allowed.
_HOST_NAME = re.compile(r"\A(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?\Z")


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address's one spelling: compressed IPv6, and an IPv4-mapped one (``::ffff:a.b.c.d``)
    as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


_WILDCARDS = frozenset({"0.0.0.0", "::", "*"})  # noqa: S104 - names, not a bind


def listeners_clash(first: tuple[str, object], second: tuple[str, object]) -> bool:
    """Whether two ``(host, port)`` listeners would take the same socket: the same port on
    the same host, or on hosts one of which is a wildcard address."""
    (host_a, port_a), (host_b, port_b) = first, second
    if port_a != port_b:
        return False
    return host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS


def http_url_problem(value: str) -> str | None:
    """Why ``value`` is not an ``http(s)://host[:port]/…`` URL a request can be sent to, as
    words to follow its name ("must be ...", "has no host"), or ``None`` when it is one.

    One rule for every URL a setting or an argument names (handlers, ``send --url``,
    ``listen --forward-to``): a port outside 1 to 65535 is refused here, where HTTP clients
    accept it and connect elsewhere (84267 is 18731 modulo 65536) or fail at every attempt.
    The value is never echoed (it may hold a token)."""
    if not value.isprintable() or any(c.isspace() for c in value):
        # urlsplit strips leading blanks and controls, httpx then refuses the URL at send.
        return "holds a space or a control character"
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        if "port" in str(exc).lower():
            return "has a port that is not a number from 1 to 65535"
        return "is not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        shown = parts.scheme if parts.scheme.isalnum() else "no"
        return f"must be an http:// or https:// URL, got {shown} scheme"
    if not parts.hostname:
        return "has no host"
    if port == 0:
        return "has a port that is not a number from 1 to 65535 (port 0)"
    import httpx  # here: most commands never check a URL

    try:
        # .host: a host name is IDNA-decoded only there (a bad xn-- label raised at send).
        httpx.URL(value).host  # noqa: B018
    except (httpx.InvalidURL, UnicodeError):
        return "is not a valid URL"
    return None


def _database_url(value: str) -> str:
    url = value.strip()
    if not url.isprintable():
        # A NUL is no file name (the SQLite writer failed to start on it); a newline or an
        # ESC is a paste gone wrong. Not echoed: the URL may hold a password.
        raise ValueError("holds a control character (a newline, a NUL, an escape)")
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        if "?" in url or "#" in url:
            # Taken as part of the file name (a file named `x.db?mode=ro` was created):
            # SQLite URLs here carry no options.
            raise ValueError(
                "must be sqlite:///PATH without a query or fragment (no ? or #): the "
                "SQLite store takes no URL options"
            )
        return url
    if url.startswith(("postgresql://", "postgres://")):
        _check_postgres_url(url)
        return url
    # Shown redacted: a mistyped scheme must not print the password that follows it.
    raise ValueError(f"must be sqlite:///PATH or postgresql://..., got {redact_url(url)!r}")


def _check_postgres_url(url: str) -> None:
    """``ValueError`` (URL shown redacted) unless every ``host[:port]`` of the URL parses.

    The driver would otherwise fail later with its own message, which can quote part of
    a password containing an unescaped ``/`` or ``:``.
    """
    before_query = re.split(r"[?#]", url.partition("://")[2], maxsplit=1)[0]
    userinfo, _, hosts_and_path = before_query.rpartition("@")
    authority = hosts_and_path.split("/", 1)[0]
    if "/" in userinfo:
        raise ValueError(
            f"has a '/' in its user or password (URL-encode it as %2F), got {redact_url(url)!r}"
        )
    for host in authority.split(","):
        if not _HOST_PORT.fullmatch(host):
            raise ValueError(f"has an invalid host or port, got {redact_url(url)!r}")
    # No database named: the driver would take one named after the user, and the
    # migrations would go into whatever database that is.
    database = hosts_and_path.partition("/")[2]
    query = url.partition("?")[2]
    if not database.strip() and not re.search(r"(?:^|&)(?:dbname|database)=[^&]", query):
        raise ValueError(
            "names no database: postgresql://USER:PASSWORD@HOST:PORT/DATABASE, got "
            f"{redact_url(url)!r}"
        )


_HOST_PORT = re.compile(
    r"(?:[A-Za-z0-9._~%-]*|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._~-]+)?\])"
    r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5]?[0-9]{1,4}))?"
)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {quoted(value)}")
        return lowered

    return parse


def is_admin_token_text(token: str) -> bool:
    """Whether ``token`` can be an admin token: visible ASCII (``!`` to ``~``), no space.

    The one rule for ``serve`` (``LACUNA_ADMIN_TOKEN``) and for the CLI that presents a
    token (``--token``): an ``Authorization: Bearer`` header carries nothing else, so a
    token of other characters (``é``, a space) could sign in to the console but never call
    the API."""
    return all("!" <= c <= "~" for c in token)


#: Why a token fails ``is_admin_token_text``, after the setting's name; never the token.
ADMIN_TOKEN_TEXT = "printable ASCII without spaces (an Authorization header carries nothing else)"  # noqa: S105 (a message, not a secret)


def _admin_tokens(value: str) -> tuple[Secret, ...]:
    tokens = parse_list(value)
    if not tokens:
        # `,` read as no token turned the admin API off without a word: a typo, not a choice.
        raise ValueError("names no token (unset it to turn the admin API off)")
    bad = [i for i, token in enumerate(tokens, start=1) if not is_admin_token_text(token)]
    if bad:
        which = ", ".join(f"#{i}" for i in bad)
        raise ValueError(f"must hold tokens of {ADMIN_TOKEN_TEXT} (not so: {which})")
    short = [i for i, token in enumerate(tokens, start=1) if len(token) < MIN_ADMIN_TOKEN_LENGTH]
    if short:
        which = ", ".join(f"#{i}" for i in short)
        raise ValueError(
            f"must hold tokens of at least {MIN_ADMIN_TOKEN_LENGTH} characters each "
            f"(too short: {which})"
        )
    return tuple(Secret(token) for token in tokens)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128)."""
    networks = []
    for item in parse_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"must be addresses or CIDRs like 203.0.113.0/24, got {quoted(item)}"
            ) from None
    if not networks:
        raise ValueError("names no address (unset it to allow every address)")
    return tuple(networks)


def _trusted_proxies(value: str) -> str:
    """``*``, or comma-separated addresses and CIDRs, normalized for uvicorn's proxy check.

    uvicorn keeps anything that does not parse as an address or a strict network as a
    literal that no client address ever equals: a typo (``127.0.0.0/33``, ``10.0.0.1/8``)
    would silently stop trusting the proxy (every webhook behind it then refused by
    ``LACUNA_ALLOWED_SOURCE_IPS``, or logged from the wrong address)."""
    items = parse_list(value)
    if items == ("*",):
        return "*"
    if "*" in items:
        raise ValueError("must be * alone, or addresses and CIDRs without it")
    normalized = []
    for item in items:
        try:
            if "/" in item:
                normalized.append(str(ipaddress.ip_network(item, strict=False)))
            else:
                normalized.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(
                f"must be *, or addresses or CIDRs like 10.0.0.0/8, got {quoted(item)}"
            ) from None
    if not normalized:
        raise ValueError("names no address (unset it to trust 127.0.0.1)")
    return ",".join(normalized)


#: Every global ``LACUNA_*`` variable the service or its CLI reads (docs/configuration.md);
#: each may also be given as ``<NAME>_FILE``. A handler's own are ``LACUNA_<NAME>_*``.
#: tests/unit/test_config.py checks this against every name the package's source reads.
GLOBAL_VARIABLES = frozenset(
    {
        "LACUNA_ADMIN_HOST",
        "LACUNA_ADMIN_PORT",
        "LACUNA_ADMIN_SEARCH_BUDGET",
        "LACUNA_ADMIN_TOKEN",
        "LACUNA_ADMIN_URL",
        "LACUNA_ALLOWED_SOURCE_IPS",
        "LACUNA_ALLOW_PRIVATE_URLS",
        "LACUNA_BODY_TIMEOUT",
        "LACUNA_COMMIT_TIMEOUT",
        "LACUNA_DATABASE_URL",
        "LACUNA_DISPATCH",
        "LACUNA_HANDLERS",
        "LACUNA_HANDLER_CONCURRENCY",
        "LACUNA_HANDLER_TIMEOUT",
        "LACUNA_HEADER_TIMEOUT",
        "LACUNA_KEEPALIVE_TIMEOUT",
        "LACUNA_LOG_FORMAT",
        "LACUNA_LOG_LEVEL",
        "LACUNA_MAX_BODY_BYTES",
        "LACUNA_MAX_CONNECTIONS",
        "LACUNA_MAX_HEADERS",
        "LACUNA_MAX_HEADER_BYTES",
        "LACUNA_POLL_INTERVAL",
        "LACUNA_RETENTION_DAYS",
        "LACUNA_RETRY_BASE_DELAY",
        "LACUNA_RETRY_MAX_ATTEMPTS",
        "LACUNA_RETRY_MAX_DELAY",
        "LACUNA_SHUTDOWN_TIMEOUT",
        "LACUNA_SQLITE_SYNCHRONOUS",
        "LACUNA_TRUSTED_PROXIES",
        "LACUNA_WEBHOOK_SECRET",
        "LACUNA_WEBHOOK_TOLERANCE",
    }
)


#: Prefixes of the variables the project's own tests and tools read (``LACUNA_TEST_*``,
#: docs/development.md; ``LACUNA_CONSOLE_SCREENSHOTS``, docs/console.md): never a typo.
DEVELOPMENT_PREFIXES = ("LACUNA_TEST_", "LACUNA_CONSOLE_")


def unknown_variables(
    environ: Mapping[str, str], instances: Iterable[str], kinds: Iterable[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """The ``LACUNA_*`` variables in ``environ`` that nothing reads, set to a non-empty value
    (empty is unset): neither a global one (``GLOBAL_VARIABLES``, or its ``_FILE`` form) nor
    a setting of a configured handler instance (``LACUNA_<NAME>_*`` for each of
    ``instances``). Two lists: ``(variable, hint)`` for names nothing could read (a typo
    such as ``LACUNA_HANDLER``; ``hint`` is the closest known name), and the settings of
    installed handler ``kinds`` that no instance is configured for (a shared ``.env``, or a
    handler left out of ``LACUNA_HANDLERS``). Names only, never values: the caller logs them."""
    prefixes = tuple(f"LACUNA_{name.upper()}_" for name in instances)
    known = sorted(GLOBAL_VARIABLES | {f"{v}_FILE" for v in GLOBAL_VARIABLES})
    unconfigured = tuple(
        f"LACUNA_{kind}_" for kind in {k.upper() for k in kinds} - {n.upper() for n in instances}
    )
    unknown: list[tuple[str, str]] = []
    unused: list[str] = []
    for var in sorted(environ):
        if (
            not var.startswith("LACUNA_")
            or not environ[var].strip()
            or var in known
            or var.startswith((*prefixes, *DEVELOPMENT_PREFIXES))
        ):
            continue
        if var.startswith(unconfigured):
            unused.append(var)
            continue
        close = difflib.get_close_matches(var, [*known, *(p + "…" for p in prefixes)], n=1)
        unknown.append((var, f"did you mean {close[0]}?" if close else "no setting has this name"))
    return unknown, unused


def split_handler_item(item: str) -> tuple[str | None, str]:
    """One ``LACUNA_HANDLERS`` item as ``(NAME or None, KIND)`` (SPEC §6).

    ``NAME=KIND`` names an instance; a plain ``KIND`` is ``(None, KIND)``: its name is the
    kind itself, or for ``package.module:attr`` the object's ``name`` attribute (see
    ``plugins.load_factory``). Pure: validation is ``Settings.from_env``'s.
    """
    name, sep, kind = item.partition("=")
    if not sep:
        return None, item.strip()
    return name.strip(), kind.strip()


def _handler_items(value: str) -> tuple[str, ...]:
    """``LACUNA_HANDLERS``: items ``KIND`` or ``NAME=KIND``; a name given twice is refused
    (names of ``package.module:attr`` items are known only once loaded: ``build_handlers``
    checks those)."""
    items = parse_list(value)
    seen: set[str] = set()
    for item in items:
        name, kind = split_handler_item(item)
        if not kind:
            raise ValueError(f"item {item!r} names no handler kind (NAME=KIND)")
        key = name if name is not None else kind
        if key in seen:
            raise ValueError(f"names {key!r} twice: give each instance its own NAME=KIND")
        seen.add(key)
    return items


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment (see the README's table)."""

    webhook_secrets: tuple[Secret, ...] = ()
    # LACUNA_ADMIN_TOKEN(_FILE): read and validated now for the admin API (SPEC §9).
    admin_tokens: tuple[Secret, ...] = ()
    tolerance_seconds: int = 300
    max_body_bytes: int = 1_048_576
    database_url: str = DEFAULT_DATABASE_URL
    handlers: tuple[str, ...] = ()
    host: str = "0.0.0.0"  # noqa: S104 - a webhook receiver listens publicly by design
    port: int = 8000
    # The admin API's own listener (SPEC §9), opened only when admin tokens are set.
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001
    # How long one admin search may scan bodies before answering with what it found.
    admin_search_budget_seconds: float = 0.5
    retry_max_attempts: int = 10
    retry_base_delay_seconds: float = 5.0
    retry_max_delay_seconds: float = 3600.0
    allow_private_urls: bool = False
    handler_timeout_seconds: float = 60.0
    handler_concurrency: int = 4
    poll_interval_seconds: float = 1.0
    retention_days: float = 30.0
    shutdown_timeout_seconds: float = 20.0
    dispatch: bool = True
    sqlite_synchronous: str = "full"
    trusted_proxies: str = "127.0.0.1"
    # The HTTP layer (server.py, docs/http.md). Keep-alive outlives common proxies' 60 s.
    keepalive_timeout_seconds: float = 75.0
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    max_header_bytes: int = 16_384
    max_headers: int = 100
    max_connections: int = 1024
    commit_timeout_seconds: float = 5.0
    allowed_source_ips: tuple[IPNetwork, ...] | None = None
    log_format: str = "auto"
    log_level: str = "info"
    # (variable, problem) for secrets that cannot be right; `serve` logs each once at start.
    secret_warnings: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def secret_values(self) -> tuple[str, ...]:
        return tuple(s.reveal() for s in self.webhook_secrets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, require_secret: bool = True) -> Settings:
        """Read and validate every variable; raise one ``ConfigError`` listing each problem."""
        problems: list[str] = []
        values: dict[str, object] = {}
        #: The settings (``values`` keys) whose own check failed: a check across settings
        #: skips them, or it would judge the default in their place and add a false line.
        failed: set[str] = set()

        warnings: list[tuple[str, str]] = []

        def read(
            attr: str, var: str, parse: Callable[[str], object], *, from_file: bool = False
        ) -> None:
            try:
                if from_file:
                    raw = read_setting(environ, var)  # checks the text is UTF-8
                else:
                    raw = environ.get(var)
                    check_utf8(var, raw)
            except ConfigError as exc:
                problems.extend(exc.problems)
                failed.add(attr)
                return
            if raw is None or (raw.strip() == "" and attr != "handlers"):
                return
            try:
                values[attr] = parse(raw)
            except ValueError as exc:
                problems.append(f"{var} {exc}")
                failed.add(attr)

        def good(*attrs: str) -> bool:
            """Whether none of ``attrs`` failed its own check (unset is good: the default)."""
            return failed.isdisjoint(attrs)

        def secrets_of(var: str) -> tuple[Secret, ...]:
            """Comma-separated secrets from ``var`` or ``<var>_FILE``; warnings noted."""
            try:
                raw = read_setting(environ, var) or ""
            except ConfigError as exc:
                problems.extend(exc.problems)
                return ()
            items = parse_list(raw)
            for problem in secret_problems(raw) if len(items) <= 1 else []:
                warnings.append((var, problem))
            for index, item in enumerate(items if len(items) > 1 else [], start=1):
                warnings.extend(
                    (var, f"secret {index} of {len(items)} {problem}")
                    for problem in secret_problems(item)
                )
            return tuple(Secret(item) for item in items)

        secrets = secrets_of("LACUNA_WEBHOOK_SECRET")
        if secrets:
            values["webhook_secrets"] = secrets
        elif require_secret and not any(p.startswith("LACUNA_WEBHOOK_SECRET") for p in problems):
            problems.append(
                "LACUNA_WEBHOOK_SECRET is not set: copy the signing secret from the Lacuna "
                "dashboard (several, comma-separated, while rotating), or name a file "
                "holding it in LACUNA_WEBHOOK_SECRET_FILE"
            )
        admin_var = "LACUNA_ADMIN_TOKEN"
        try:
            raw_tokens = read_setting(environ, admin_var)
        except ConfigError as exc:
            problems.extend(exc.problems)
            failed.add("admin_tokens")
            raw_tokens = None
        if raw_tokens is not None:
            try:
                values["admin_tokens"] = _admin_tokens(raw_tokens)
            except ValueError as exc:
                source = admin_var + (FILE_SUFFIX if environ.get(admin_var + FILE_SUFFIX) else "")
                problems.append(f"{source} {exc}")
                failed.add("admin_tokens")
            else:
                warnings.extend((admin_var, p) for p in secret_problems(raw_tokens))
        read(
            "tolerance_seconds",
            "LACUNA_WEBHOOK_TOLERANCE",
            at_most(positive_int, MAX_TOLERANCE_SECONDS),
        )
        read("max_body_bytes", "LACUNA_MAX_BODY_BYTES", at_most(positive_int, MAX_BODY_BYTES))
        read("database_url", "LACUNA_DATABASE_URL", _database_url, from_file=True)
        read("handlers", "LACUNA_HANDLERS", _handler_items)
        read("host", "HOST", _host)
        read("port", "PORT", _port)
        read("admin_host", "LACUNA_ADMIN_HOST", _host)
        read("admin_port", "LACUNA_ADMIN_PORT", _port)
        read(
            "admin_search_budget_seconds",
            "LACUNA_ADMIN_SEARCH_BUDGET",
            at_most(positive_float, MAX_SEARCH_BUDGET_SECONDS, minimum=MIN_SEARCH_BUDGET_SECONDS),
        )
        read(
            "retry_max_attempts",
            "LACUNA_RETRY_MAX_ATTEMPTS",
            at_most(positive_int, MAX_RETRY_ATTEMPTS),
        )
        delay = at_most(positive_float, MAX_DELAY_SECONDS, minimum=MIN_DELAY_SECONDS)
        read("retry_base_delay_seconds", "LACUNA_RETRY_BASE_DELAY", delay)
        read("retry_max_delay_seconds", "LACUNA_RETRY_MAX_DELAY", delay)
        read("allow_private_urls", "LACUNA_ALLOW_PRIVATE_URLS", parse_bool)
        read(
            "handler_timeout_seconds",
            "LACUNA_HANDLER_TIMEOUT",
            at_most(positive_float, MAX_TIMEOUT_SECONDS),
        )
        read(
            "handler_concurrency",
            "LACUNA_HANDLER_CONCURRENCY",
            at_most(positive_int, MAX_CONCURRENCY),
        )
        read(
            "poll_interval_seconds",
            "LACUNA_POLL_INTERVAL",
            at_most(positive_float, MAX_POLL_SECONDS, minimum=MIN_POLL_SECONDS),
        )
        read(
            "retention_days",
            "LACUNA_RETENTION_DAYS",
            at_most(positive_float, MAX_RETENTION_DAYS),
        )
        read(
            "shutdown_timeout_seconds",
            "LACUNA_SHUTDOWN_TIMEOUT",
            at_most(positive_float, MAX_SHUTDOWN_SECONDS),
        )
        read("dispatch", "LACUNA_DISPATCH", parse_bool)
        read("sqlite_synchronous", "LACUNA_SQLITE_SYNCHRONOUS", _choice("full", "normal"))
        read("trusted_proxies", "LACUNA_TRUSTED_PROXIES", _trusted_proxies)
        connection_seconds = at_most(
            positive_float, MAX_CONNECTION_SECONDS, minimum=MIN_CONNECTION_SECONDS
        )
        read("keepalive_timeout_seconds", "LACUNA_KEEPALIVE_TIMEOUT", connection_seconds)
        read("header_timeout_seconds", "LACUNA_HEADER_TIMEOUT", connection_seconds)
        read("body_timeout_seconds", "LACUNA_BODY_TIMEOUT", connection_seconds)
        read(
            "max_header_bytes",
            "LACUNA_MAX_HEADER_BYTES",
            at_most(positive_int, MAX_HEADER_BYTES, minimum=MIN_HEADER_BYTES),
        )
        read(
            "max_headers",
            "LACUNA_MAX_HEADERS",
            at_most(positive_int, MAX_HEADERS, minimum=MIN_HEADERS),
        )
        read(
            "max_connections",
            "LACUNA_MAX_CONNECTIONS",
            at_most(positive_int, MAX_CONNECTIONS),
        )
        read("commit_timeout_seconds", "LACUNA_COMMIT_TIMEOUT", connection_seconds)
        read("allowed_source_ips", "LACUNA_ALLOWED_SOURCE_IPS", _networks)
        read("log_format", "LACUNA_LOG_FORMAT", _choice("auto", "json", "console"))
        read("log_level", "LACUNA_LOG_LEVEL", _choice("debug", "info", "warning", "error"))

        base = values.get("retry_base_delay_seconds", cls.retry_base_delay_seconds)
        cap = values.get("retry_max_delay_seconds", cls.retry_max_delay_seconds)
        if (
            good("retry_base_delay_seconds", "retry_max_delay_seconds")
            and isinstance(base, float)
            and isinstance(cap, float)
            and cap < base
        ):
            problems.append(
                f"LACUNA_RETRY_MAX_DELAY ({cap:g}) must not be smaller than "
                f"LACUNA_RETRY_BASE_DELAY ({base:g})"
            )
        kept = values.get("retention_days", cls.retention_days)
        window = values.get("tolerance_seconds", cls.tolerance_seconds)
        if (
            good("retention_days", "tolerance_seconds")
            and isinstance(kept, float)
            and isinstance(window, int)
            and kept * 86400 < 4 * window
        ):
            # An event's signed request stays valid up to `window` after its `t`, which may
            # be up to `window` before it arrived: pruned sooner, a replay of it inside the
            # window is a new event, and its handlers run again. Twice more for replicas'
            # clocks, each of which may be off by up to `window` (an intake off by more
            # refuses fresh requests): one stamps `received_at` early, another prunes by its
            # own clock (found with one intake 55 s behind, retention 2x a 60 s window).
            problems.append(
                f"LACUNA_RETENTION_DAYS ({kept:g}) must keep events for at least four times "
                f"LACUNA_WEBHOOK_TOLERANCE ({4 * window} s), or a replayed request would be "
                "taken for a new event once the first was pruned (twice the signature window, "
                "and as much again for replicas' clocks that disagree)"
            )
        for item in values.get("handlers", ()):  # type: ignore[attr-defined]
            name, kind = split_handler_item(item)
            if name is not None and not HANDLER_NAME_RE.fullmatch(name):
                problems.append(
                    f"LACUNA_HANDLERS item {quoted(item)}: an instance NAME is a lowercase "
                    "letter followed by up to 39 lowercase letters, digits and _"
                )
            # `package.module:attr` is dotted identifiers on both sides: anything else (a URL
            # pasted here, `postgresql://app:pw@db/x`) was imported, and quoted whole.
            if not (HANDLER_NAME_RE.fullmatch(kind) or _OBJECT_PATH.fullmatch(kind)):
                problems.append(
                    f"LACUNA_HANDLERS names {quoted(kind)}: a handler kind is lowercase "
                    "letters, digits and _ (or package.module:attr for a handler not installed "
                    "as a plugin)"
                )
        clash = listeners_clash(
            (str(values.get("host", cls.host)), values.get("port", cls.port)),
            (
                str(values.get("admin_host", cls.admin_host)),
                values.get("admin_port", cls.admin_port),
            ),
        )
        if (
            clash
            and values.get("admin_tokens")
            and good("host", "port", "admin_host", "admin_port")
        ):
            problems.append(
                "LACUNA_ADMIN_PORT must differ from PORT when LACUNA_ADMIN_HOST and HOST "
                "overlap: the admin API never shares the webhook listener"
            )
        url = values.get("database_url", cls.database_url)
        if (
            values.get("dispatch") is False
            and good("database_url")
            and str(url).startswith("sqlite")
        ):
            problems.append(
                "LACUNA_DISPATCH=false needs PostgreSQL: on SQLite only `serve` may dispatch "
                "(the database has one writer), so nothing would ever deliver"
            )
        if values.get("dispatch") is False and good("handlers") and not values.get("handlers"):
            # Deliveries are made at intake, for the handlers it is configured with: with
            # none, every event would be stored with no delivery and no worker would run it.
            problems.append(
                "LACUNA_DISPATCH=false needs LACUNA_HANDLERS, the same list as the workers': "
                "each event's deliveries are made here, at intake, one per handler it names"
            )
        if problems:
            raise ConfigError(problems)
        return cls(
            environ=dict(environ),
            secret_warnings=tuple(warnings),
            **values,  # type: ignore[arg-type]
        )
