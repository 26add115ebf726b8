"""What the broker handlers share: destination templates, URL checks and secret scrubbing.

Templates (SPEC §8): ``SUBJECT``, ``ROUTING_KEY`` and ``STREAM`` may hold
``{type}`` (the event type) and ``{task_id}`` (``data.id``; ``_`` when the
event has none), nothing else; ``{{`` and ``}}`` are literal braces. A bad
template is a ``ConfigError`` naming the variable, raised at start.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from ...errors import ConfigError
from ...logs import redact_url
from ...models import Event
from ..base import HandlerContext

PLACEHOLDERS = ("type", "task_id")
NO_TASK_ID = "_"  # what {task_id} becomes for an event without data.id


def missing_extra(kind: str, library: str) -> ConfigError:
    """The one config line for a broker handler whose client library is not installed."""
    return ConfigError(
        f"the {kind} handler needs the {library} library: "
        f"pip install 'lacuna-webhooks[{kind}]' (or [brokers] for every broker handler)"
    )


@dataclass(frozen=True, slots=True)
class Template:
    """A destination name with ``{type}`` / ``{task_id}`` placeholders, parsed once at start."""

    text: str
    fields: frozenset[str]

    @classmethod
    def parse(
        cls,
        ctx: HandlerContext,
        key: str,
        default: str,
        check: Callable[[str], str | None] | None = None,
    ) -> Template:
        """Read and validate ``LACUNA_<NAME>_<KEY>``; ``ConfigError`` naming it when bad.

        ``check`` returns a problem (or ``None``) for a rendered name; it is
        run on a sample rendering so that a template that can never be valid
        (``lacuna..{type}`` for NATS) fails at start instead of at each event.
        """
        var = ctx.env_name(key)
        text = ctx.get(key, default) or default
        fields: set[str] = set()
        try:
            for _literal, name, spec, conversion in string.Formatter().parse(text):
                if name is None:
                    continue
                if name not in PLACEHOLDERS or spec or conversion:
                    shown = "{" + name + ("!" + conversion if conversion else "")
                    shown += (":" + spec if spec else "") + "}"
                    raise ConfigError(
                        f"{var} has the placeholder {shown}; only {{type}} and {{task_id}} "
                        "are replaced (write {{ and }} for literal braces)"
                    )
                fields.add(name)
        except ValueError as exc:  # unbalanced braces
            raise ConfigError(f"{var} is not a valid template ({exc}): {text!r}") from None
        template = cls(text, frozenset(fields))
        if check is not None:
            problem = check(template.render_values("job.completed", "task1"))
            if problem:
                raise ConfigError(f"{var} gives an invalid name: {problem}")
        return template

    def render_values(self, event_type: str, task_id: str) -> str:
        return self.text.format_map({"type": event_type, "task_id": task_id})

    def render(self, event: Event) -> str:
        """The destination name for ``event``."""
        return self.render_values(event.type, event.task_id or NO_TASK_ID)


def broker_url(ctx: HandlerContext, key: str, schemes: Sequence[str]) -> str:
    """``LACUNA_<NAME>_<KEY>``, required, with one of ``schemes`` and a host.

    The error text shows the URL redacted (credentials are never echoed).
    """
    url = ctx.require(key)
    check_url(ctx.env_name(key), url, schemes)
    return url


def check_url(var: str, url: str, schemes: Sequence[str]) -> None:
    """``ConfigError`` naming ``var`` unless ``url`` has one of ``schemes`` and a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (reading it validates the port)
    except ValueError:
        raise ConfigError(f"{var} is not a valid URL: {redact_url(url)}") from None
    if parts.scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{var} must start with {wanted}, got {redact_url(url)}")
    if not parts.hostname and parts.scheme != "unix":
        raise ConfigError(f"{var} has no host: {redact_url(url)}")


def scrub(text: str, *urls: str) -> str:
    """``text`` with each URL's password (and the URL itself) replaced, for logs and errors."""
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "***")
    return text


def reason_of(exc: BaseException, *urls: str) -> str:
    """A one-line reason for ``exc``: its type and text, secrets scrubbed, at most 300 chars."""
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return scrub(text, *urls)[:300]
