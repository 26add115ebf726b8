"""The handler extension point: one protocol, one context, and a test double beside it.

A handler is built once at start by a *factory* (usually its class) called
with a ``HandlerContext``, and then receives every stored event whose type it
subscribes to::

    class DiscordHandler:
        name = "discord"
        events = frozenset({"job.completed"})      # None: every type

        def __init__(self, ctx: HandlerContext) -> None:
            self.url = ctx.require("WEBHOOK_URL")  # reads LACUNA_DISCORD_WEBHOOK_URL

        async def handle(self, event: Event) -> None:
            ...  # raise PermanentError / RetryLater; anything else is retried

        async def aclose(self) -> None: ...

Every setting a handler reads through its context may come from a file instead:
``LACUNA_DISCORD_WEBHOOK_URL_FILE=/run/secrets/discord-url`` (one trailing newline
removed; both forms set, or an unreadable file, is a ``ConfigError`` naming the
variable). Read secrets with ``ctx.secret`` / ``ctx.require_secret``: a value
that cannot be right (quotes kept by an env-file loader, inner whitespace) is
then warned about once, at start, without showing it. Read settings in
``__init__``, so that every problem stops ``serve`` at start.

It is registered under the entry-point group ``lacuna_webhooks.handlers`` (or
named as ``package.module:attr`` in ``LACUNA_HANDLERS``). A factory raises
``ConfigError`` naming the variable when its settings are wrong, which stops
``serve`` at start. Delivery is at least once: ``handle`` may run again for
the same event after a crash, so make it idempotent (the event id is a good key).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

from ..config import read_setting, secret_problems
from ..errors import ConfigError
from ..models import Event

logger = structlog.get_logger("lacuna_webhooks.config")


@runtime_checkable
class Handler(Protocol):
    """What the dispatcher calls. ``events`` is the default subscription (``None``: all).

    ``handle`` may return a JSON object (a ``dict`` of JSON values): it is recorded as the
    delivery's result (SPEC §6); any other return value is ignored."""

    name: str
    events: frozenset[str] | None

    async def handle(self, event: Event) -> dict[str, Any] | None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class HandlerContext:
    """What a handler factory gets: its instance name, its own settings and the shared
    safety switches. ``kind`` is the ``LACUNA_HANDLERS`` KIND it was built from (``http``
    for ``app=http``; ``None`` when built outside ``build_handlers``)."""

    name: str
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    allow_private_urls: bool = False
    timeout_seconds: float = 60.0
    kind: str | None = None

    @property
    def prefix(self) -> str:
        """``LACUNA_<NAME>_``: where this handler's settings live."""
        return f"LACUNA_{self.name.upper()}_"

    def env_name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def get(self, key: str, default: str | None = None) -> str | None:
        """``LACUNA_<NAME>_<KEY>`` (or the file ``LACUNA_<NAME>_<KEY>_FILE`` names),
        stripped; ``default`` when unset or blank.

        Raises ``ConfigError`` naming the variable when both forms are set or the
        file cannot be read (see ``config.read_setting``).
        """
        return _stripped(read_setting(self.environ, self.env_name(key)), default)

    def require(self, key: str) -> str:
        """Like ``get`` but a missing value is a ``ConfigError`` naming the variable."""
        value = self.get(key)
        if value is None:
            var = self.env_name(key)
            raise ConfigError(
                f"{var} is required by the {self.name} handler (or {var}_FILE naming a file)"
            )
        return value

    def secret(self, key: str, default: str | None = None) -> str | None:
        """Like ``get``, for a secret: logs ``config.secret_suspicious`` (variable and
        problem, never the value) for a value that cannot be right."""
        raw = read_setting(self.environ, self.env_name(key))
        for problem in secret_problems(raw) if raw is not None else []:
            logger.warning("config.secret_suspicious", variable=self.env_name(key), problem=problem)
        return _stripped(raw, default)

    def require_secret(self, key: str) -> str:
        """Like ``secret`` but a missing value is a ``ConfigError`` naming the variable."""
        value = self.secret(key)
        if value is None:
            return self.require(key)
        return value


def _stripped(value: str | None, default: str | None) -> str | None:
    if value is None or not value.strip():
        return default
    return value.strip()


HandlerFactory = Callable[[HandlerContext], Handler]

current_attempt: ContextVar[int | None] = ContextVar("lacuna_attempt", default=None)
"""Which attempt of its delivery a ``handle()`` call is (1 for the first), when the caller says.

The dispatcher sets it (``current_attempt.set(delivery.attempts)``) in the task that
runs one attempt, so ``handle(event)`` keeps its signature and plugins may read it
(``current_attempt.get()``; ``None`` when run outside the dispatcher)."""


#: The largest result ``handle()`` may return, as JSON (``orjson.dumps``): a larger one is
#: dropped (``handler.result_not_stored``) and the delivery is still done. It is stored with
#: its delivery and read back by its dependents (a 200 MB result once held webhook answers).
MAX_RESULT_BYTES = 64 * 1024

current_results: ContextVar[Mapping[str, Any] | None] = ContextVar("lacuna_results", default=None)
"""The results of the handlers this one runs after (``LACUNA_<NAME>_AFTER``, SPEC §6), when
it has an AFTER setting: ``{"<handler>": <its result object, or None>}``, one key per
handler named there (None: it returned no result, ended dead, or had no delivery for the
event). ``None`` for a handler without AFTER or run outside the dispatcher. Set like
``current_attempt``, in the task that runs the one attempt; read it inside ``handle``."""


current_traceparent: ContextVar[str | None] = ContextVar("lacuna_traceparent", default=None)
"""The W3C ``traceparent`` of the running attempt's span while tracing is on
(docs/observability.md), else ``None``. Set like ``current_attempt``; a handler that calls
out passes it on (the ``http`` handler sends it as the ``traceparent`` header) so the peer's
spans join the trace of the request that received the event."""


class RecordingHandler:
    """A handler for tests: records every event, and fails as scripted.

    ``script`` is consumed one item per call: ``None`` succeeds, an exception
    instance is raised. When empty, calls succeed. ``block`` (an asyncio.Event)
    makes calls wait until it is set.
    """

    def __init__(
        self,
        name: str = "recorder",
        events: frozenset[str] | None = None,
        script: list[BaseException | None] | None = None,
    ) -> None:
        self.name = name
        self.events = events
        self.script = list(script or [])
        self.calls: list[Event] = []
        self.closed = False
        self.block: asyncio.Event | None = None

    async def handle(self, event: Event) -> None:
        self.calls.append(event)
        if self.block is not None:
            await self.block.wait()
        if self.script:
            outcome = self.script.pop(0)
            if outcome is not None:
                raise outcome

    async def aclose(self) -> None:
        self.closed = True


async def settle(value: object) -> object:
    """``value`` awaited when it is awaitable, else itself: a plugin's ``handle()`` or
    ``aclose()`` written as a plain ``def`` has done its work when it returns (awaiting its
    ``None`` failed the attempt after the work was done, and it was retried until dead)."""
    if inspect.isawaitable(value):
        return await value
    return value


__all__ = [
    "MAX_RESULT_BYTES",
    "Handler",
    "HandlerContext",
    "HandlerFactory",
    "RecordingHandler",
    "current_attempt",
    "current_results",
    "current_traceparent",
    "settle",
]
