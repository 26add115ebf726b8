"""Settings, read once from the environment at start and validated as a whole.

``Settings.from_env(environ)`` checks every variable and raises one
``ConfigError`` naming each bad one; nothing reads the environment later
except handlers, which get their own ``LACUNA_<NAME>_*`` view through
``HandlerContext``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

DEFAULT_DATABASE_URL = "sqlite:///./lacuna-webhooks.db"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
HANDLER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


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
    raise ValueError(f"must be true or false, got {value!r}")


def parse_list(value: str) -> tuple[str, ...]:
    """Comma-separated items, stripped, empty ones dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"must be a whole number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a finite number greater than 0, got {value!r}")
    return number


def _port(value: str) -> int:
    number = _positive_int(value)
    if number > 65535:
        raise ValueError(f"must be a port number from 1 to 65535, got {value!r}")
    return number


def _database_url(value: str) -> str:
    url = value.strip()
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    if url.startswith(("postgresql://", "postgres://")):
        return url
    raise ValueError(f"must be sqlite:///PATH or postgresql://..., got {value!r}")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return lowered

    return parse


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128)."""
    networks = []
    for item in parse_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"must be addresses or CIDRs like 203.0.113.0/24, got {item!r}"
            ) from None
    if not networks:
        raise ValueError("names no address (unset it to allow every address)")
    return tuple(networks)


def _handler_names(value: str) -> tuple[str, ...]:
    names = parse_list(value)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"names {name!r} twice")
        seen.add(name)
    return names


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment (see the README's table)."""

    webhook_secrets: tuple[Secret, ...] = ()
    tolerance_seconds: int = 300
    max_body_bytes: int = 1_048_576
    database_url: str = DEFAULT_DATABASE_URL
    handlers: tuple[str, ...] = ()
    host: str = "0.0.0.0"  # noqa: S104 - a webhook receiver listens publicly by design
    port: int = 8000
    retry_max_attempts: int = 10
    retry_base_delay_seconds: float = 5.0
    retry_max_delay_seconds: float = 3600.0
    allow_private_urls: bool = False
    handler_timeout_seconds: float = 60.0
    handler_concurrency: int = 4
    poll_interval_seconds: float = 1.0
    retention_days: float = 30.0
    shutdown_timeout_seconds: float = 20.0
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
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def secret_values(self) -> tuple[str, ...]:
        return tuple(s.reveal() for s in self.webhook_secrets)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, require_secret: bool = True) -> Settings:
        """Read and validate every variable; raise one ``ConfigError`` listing each problem."""
        problems: list[str] = []
        values: dict[str, object] = {}

        def read(attr: str, var: str, parse: Callable[[str], object]) -> None:
            raw = environ.get(var)
            if raw is None or (raw.strip() == "" and attr != "handlers"):
                return
            try:
                values[attr] = parse(raw)
            except ValueError as exc:
                problems.append(f"{var} {exc}")

        raw_secrets = environ.get("LACUNA_WEBHOOK_SECRET", "")
        secrets = tuple(Secret(s) for s in parse_list(raw_secrets))
        if secrets:
            values["webhook_secrets"] = secrets
        elif require_secret:
            problems.append(
                "LACUNA_WEBHOOK_SECRET is not set: copy the signing secret from the Lacuna "
                "dashboard (several, comma-separated, while rotating)"
            )
        read("tolerance_seconds", "LACUNA_WEBHOOK_TOLERANCE", _positive_int)
        read("max_body_bytes", "LACUNA_MAX_BODY_BYTES", _positive_int)
        read("database_url", "LACUNA_DATABASE_URL", _database_url)
        read("handlers", "LACUNA_HANDLERS", _handler_names)
        read("host", "HOST", str.strip)
        read("port", "PORT", _port)
        read("retry_max_attempts", "LACUNA_RETRY_MAX_ATTEMPTS", _positive_int)
        read("retry_base_delay_seconds", "LACUNA_RETRY_BASE_DELAY", _positive_float)
        read("retry_max_delay_seconds", "LACUNA_RETRY_MAX_DELAY", _positive_float)
        read("allow_private_urls", "LACUNA_ALLOW_PRIVATE_URLS", parse_bool)
        read("handler_timeout_seconds", "LACUNA_HANDLER_TIMEOUT", _positive_float)
        read("handler_concurrency", "LACUNA_HANDLER_CONCURRENCY", _positive_int)
        read("poll_interval_seconds", "LACUNA_POLL_INTERVAL", _positive_float)
        read("retention_days", "LACUNA_RETENTION_DAYS", _positive_float)
        read("shutdown_timeout_seconds", "LACUNA_SHUTDOWN_TIMEOUT", _positive_float)
        read("sqlite_synchronous", "LACUNA_SQLITE_SYNCHRONOUS", _choice("full", "normal"))
        read("trusted_proxies", "LACUNA_TRUSTED_PROXIES", str.strip)
        read("keepalive_timeout_seconds", "LACUNA_KEEPALIVE_TIMEOUT", _positive_float)
        read("header_timeout_seconds", "LACUNA_HEADER_TIMEOUT", _positive_float)
        read("body_timeout_seconds", "LACUNA_BODY_TIMEOUT", _positive_float)
        read("max_header_bytes", "LACUNA_MAX_HEADER_BYTES", _positive_int)
        read("max_headers", "LACUNA_MAX_HEADERS", _positive_int)
        read("max_connections", "LACUNA_MAX_CONNECTIONS", _positive_int)
        read("commit_timeout_seconds", "LACUNA_COMMIT_TIMEOUT", _positive_float)
        read("allowed_source_ips", "LACUNA_ALLOWED_SOURCE_IPS", _networks)
        read("log_format", "LACUNA_LOG_FORMAT", _choice("auto", "json", "console"))
        read("log_level", "LACUNA_LOG_LEVEL", _choice("debug", "info", "warning", "error"))

        base = values.get("retry_base_delay_seconds", cls.retry_base_delay_seconds)
        cap = values.get("retry_max_delay_seconds", cls.retry_max_delay_seconds)
        if isinstance(base, float) and isinstance(cap, float) and cap < base:
            problems.append(
                f"LACUNA_RETRY_MAX_DELAY ({cap:g}) must not be smaller than "
                f"LACUNA_RETRY_BASE_DELAY ({base:g})"
            )
        for name in values.get("handlers", ()):  # type: ignore[attr-defined]
            if ":" not in name and not HANDLER_NAME_RE.match(name):
                problems.append(
                    f"LACUNA_HANDLERS names {name!r}: a handler name is lowercase letters, "
                    "digits and _ (or package.module:attr for a handler not installed as a plugin)"
                )
        if problems:
            raise ConfigError(problems)
        return cls(environ=dict(environ), **values)  # type: ignore[arg-type]
