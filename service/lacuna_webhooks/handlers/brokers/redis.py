"""The ``redis`` handler: appends each event to a Redis stream, at most once per event id.

Settings (SPEC §8, ``LACUNA_<NAME>_…``): ``URL`` (required; ``redis://``,
``rediss://`` or ``unix://``, password and database as redis-py reads them),
``STREAM`` (default ``lacuna:events``; ``{type}`` and ``{task_id}`` allowed),
``MAXLEN`` (approximate trim, ``XADD MAXLEN ~ N``; unset = no trim),
``DEDUPE_TTL`` (seconds an event id is remembered per stream, default 86400),
``CONNECT_TIMEOUT`` and ``READ_TIMEOUT`` (seconds).

Entry: fields ``id`` (event id), ``type`` (event type) and ``payload`` (the
event's exact bytes). Deduplication: one Lua script, run atomically by Redis,
looks up a marker key for (stream, event id); when absent it runs ``XADD`` and
sets the marker to the new entry's id with ``DEDUPE_TTL``; when present it
adds nothing. So a retry after a lost reply, a second replica or a second
worker never adds a second entry for the same event while the marker lives
(the marker is ``lacuna-seen:`` + SHA-256 of stream and event id, so no event
id can collide with another stream's markers). Redis Cluster is not supported
(the two keys of a script may live on different slots).

Outcomes: the script's reply is done. Connection errors, timeouts, a server
still loading, out of memory, a read-only replica → retried. Refused
authentication or permission (``NOAUTH``, ``WRONGPASS``, ``NOPERM``), a key of
the wrong type, and any other error reply → dead with Redis's reason.

One client (redis-py's connection pool) per instance, connecting on first
use and again after a loss by itself, closed by ``aclose``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

import structlog

from ...errors import PermanentError, RetryLater
from ...models import Event
from .._common import Problems, int_setting, network_timeouts
from ..base import HandlerContext
from ._shared import Template, broker_url, missing_extra, reason_of

try:
    import redis.asyncio
    import redis.exceptions
except ImportError:  # pragma: no cover - exercised only without the extra
    raise missing_extra("redis", "redis") from None

logger = structlog.get_logger("lacuna_webhooks.handlers.redis")

DEFAULT_DEDUPE_TTL_SECONDS = 86_400
# Upper bounds, far above real use: a typo is one line at start, not a Redis error on every
# attempt (``SET … EX`` past its range is "invalid expire time").
MAX_DEDUPE_TTL_SECONDS = 10 * 366 * 86_400
MAX_MAXLEN = 10**12

# KEYS[1] stream, KEYS[2] marker; ARGV id, type, payload, marker TTL (s), MAXLEN ('' = none).
# Returns {1, entry id} when added, {0, entry id of the first add} for a duplicate.
XADD_ONCE = """
local seen = redis.call('GET', KEYS[2])
if seen then return {0, seen} end
local entry
if ARGV[5] == '' then
  entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'type', ARGV[2], 'payload', ARGV[3])
else
  entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
                     'id', ARGV[1], 'type', ARGV[2], 'payload', ARGV[3])
end
redis.call('SET', KEYS[2], entry, 'EX', ARGV[4])
return {1, entry}
"""

# Error replies that a later attempt can get past.
_TRANSIENT_REPLIES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
)


def marker_key(stream: str, event_id: str) -> str:
    """The key remembering that ``event_id`` was added to ``stream``."""
    digest = hashlib.sha256(f"{stream}\x00{event_id}".encode()).hexdigest()
    return f"lacuna-seen:{digest}"


_ENTRY_ID = re.compile(rb"[0-9]+-[0-9]+")


def _script_reply(reply: Any) -> tuple[bool, bytes]:
    """``(added, entry id)`` of ``XADD_ONCE``'s reply; ``RetryLater`` for any other reply.
    Done only on the script's own answer: a peer that answers every command ``+OK`` (a
    proxy, another server on the port) was taken as done, the entry never added."""
    if isinstance(reply, list | tuple) and len(reply) == 2 and reply[0] in (0, 1):
        entry = reply[1].encode() if isinstance(reply[1], str) else reply[1]
        if isinstance(entry, bytes) and _ENTRY_ID.fullmatch(entry):
            return bool(reply[0]), entry
    raise RetryLater(
        f"Redis answered the publishing script with {str(reply)[:60]!r}, not a stream entry: "
        "is the URL a Redis server?"
    )


class RedisHandler:
    """Appends to a Redis stream (see the module docstring)."""

    name = "redis"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        problems = Problems()  # every bad setting at once, not the first
        url = problems.read(functools.partial(broker_url, ctx, "URL", ("redis", "rediss", "unix")))
        stream = problems.read(functools.partial(Template.parse, ctx, "STREAM", "lacuna:events"))
        maxlen = problems.read(functools.partial(int_setting, ctx, "MAXLEN", 0, MAX_MAXLEN))
        dedupe_ttl_seconds = problems.read(
            functools.partial(
                int_setting, ctx, "DEDUPE_TTL", DEFAULT_DEDUPE_TTL_SECONDS, MAX_DEDUPE_TTL_SECONDS
            )
        )
        timeouts = problems.read(functools.partial(network_timeouts, ctx))
        problems.check()
        assert url is not None
        assert stream is not None
        assert dedupe_ttl_seconds is not None
        assert timeouts is not None
        self.url, self.stream = url, stream
        self.maxlen = maxlen or None
        self.dedupe_ttl_seconds = dedupe_ttl_seconds
        connect_seconds, read_seconds = timeouts
        # Built now (no I/O until the first command); redis-py connects and reconnects itself.
        self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            self.url,
            socket_connect_timeout=connect_seconds,
            socket_timeout=read_seconds,
            health_check_interval=30,
        )
        self._xadd_once = self.client.register_script(XADD_ONCE)

    def __repr__(self) -> str:
        return f"RedisHandler(name={self.name!r}, stream={self.stream.text!r})"

    def _reason(self, exc: BaseException) -> str:
        return reason_of(exc, self.url)

    async def handle(self, event: Event) -> None:
        stream = self.stream.render(event)
        args: list[bytes | str | int] = [
            event.id,
            event.type,
            event.raw,
            self.dedupe_ttl_seconds,
            self.maxlen if self.maxlen is not None else "",
        ]
        try:
            reply = await self._xadd_once(keys=[stream, marker_key(stream, event.id)], args=args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if isinstance(
                exc, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)
            ):
                raise PermanentError(f"Redis refused the login: {self._reason(exc)}") from None
            raise RetryLater(f"Redis is unreachable: {self._reason(exc)}") from None
        except _TRANSIENT_REPLIES as exc:
            raise RetryLater(f"Redis cannot take the entry now: {self._reason(exc)}") from None
        except redis.exceptions.RedisError as exc:
            raise PermanentError(f"Redis refused XADD to {stream!r}: {self._reason(exc)}") from None
        added, entry = _script_reply(reply)
        logger.info(
            "handler.redis.published",
            event_id=event.id,
            stream=stream,
            entry=entry.decode() if isinstance(entry, bytes) else entry,
            duplicate=not added,
        )

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:  # closing a broken pool must not stop shutdown
            logger.warning("handler.redis.close_failed", error=self._reason(exc))
