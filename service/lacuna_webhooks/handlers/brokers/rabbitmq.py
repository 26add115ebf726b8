"""The ``rabbitmq`` handler: publishes each event to an AMQP 0-9-1 exchange with confirms.

Settings (SPEC §8, ``LACUNA_<NAME>_…``): ``URL`` (required; ``amqp://`` or
``amqps://``, credentials and virtual host as in RabbitMQ's URI spec),
``EXCHANGE`` (default ``""``, the default exchange, where the routing key is a
queue name), ``ROUTING_KEY`` (default ``lacuna.{type}``), ``CONNECT_TIMEOUT``
and ``READ_TIMEOUT`` (seconds; the read timeout bounds the wait for the
publisher confirm).

Message: the event's exact bytes, persistent (delivery mode 2),
``message_id`` = event id, ``type`` = event type (each the SHA-256 hex of the
value when it is over AMQP's 255 bytes), headers ``lacuna-event-id`` and
``lacuna-event-type`` (the exact values), ``content_type``
``application/json``, ``app_id`` ``lacuna-webhooks``; published
``mandatory`` on a channel in confirm mode. AMQP has no broker-side
deduplication: a re-publish after a lost confirm reaches consumers twice, so
consumers drop a ``message_id`` they have already processed (docs/brokers.md).

Outcomes: the broker's ack is done. Returned as unroutable (no queue bound
for the key) → retried (a consumer may not have declared its queue yet). A
nack, a blocked connection (resource alarm: the publish times out), a lost
connection → retried. Channel closed with 404 (exchange missing), 403 (access
refused), 406 (precondition failed, e.g. over ``max_message_size``), and a
login refused → dead with the broker's reason. A routing key over AMQP's 255
bytes is dead (a property of the event's own type or task id: it is never
shortened into another destination).

One connection and one channel per instance, opened on first use and opened
again after a loss (by the next attempt), closed by ``aclose``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from urllib.parse import unquote, urlsplit

import structlog

from ...errors import PermanentError, RetryLater
from ...models import Event
from .._common import Problems, network_timeouts
from ..base import HandlerContext
from ._shared import Template, broker_url, missing_extra, reason_of

try:
    import aio_pika
    import aiormq.exceptions
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
except ImportError:  # pragma: no cover - exercised only without the extra
    raise missing_extra("rabbitmq", "aio-pika") from None

logger = structlog.get_logger("lacuna_webhooks.handlers.rabbitmq")

SHORTSTR_MAX_BYTES = 255  # AMQP 0-9-1 short strings: routing key, exchange, message_id, type


def _shortstr_problem(what: str, value: str) -> str | None:
    size = len(value.encode())
    if size > SHORTSTR_MAX_BYTES:
        return f"the {what} is {size} bytes; AMQP allows {SHORTSTR_MAX_BYTES}"
    return None


def shortstr(value: str) -> str:
    """``value`` when it fits an AMQP short string, else its SHA-256 hex: stable, so a
    consumer's dedupe by ``message_id`` still holds. Intake bounds ids and types in
    characters (255, 128), and an accepted event must not be dead for its bytes (the
    ``lacuna-event-id`` / ``-type`` headers carry the exact values; the ``sqs`` handler's
    ``fifo_id`` is the same rule)."""
    if len(value.encode()) <= SHORTSTR_MAX_BYTES:
        return value
    return hashlib.sha256(value.encode()).hexdigest()


# Closed by the broker for a reason the same publish cannot get past.
_PERMANENT = (
    aiormq.exceptions.ChannelNotFoundEntity,  # 404: exchange missing
    aiormq.exceptions.ChannelAccessRefused,  # 403
    aiormq.exceptions.ChannelPreconditionFailed,  # 406: e.g. message over max_message_size
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,  # ACCESS_REFUSED at login
    aiormq.exceptions.ConnectionNotAllowed,  # 530: no access to the virtual host
)


def _closed_while_opening(exc: BaseException) -> bool:
    """Whether aiormq's ``InvalidFrameError`` is the broker's ``Connection.Close`` where
    ``Connection.OpenOk`` was due: RabbitMQ's answer to a virtual host that does not exist
    or that the user may not use (530 NOT_ALLOWED). aiormq reports it by the frame's repr
    only, so the broker's own text is lost."""
    text = str(exc)
    return (
        isinstance(exc, aiormq.exceptions.InvalidFrameError)
        and "Connection.OpenOk" in text
        and "Connection.Close" in text
    )


class RabbitMQHandler:
    """Publishes to a RabbitMQ exchange (see the module docstring)."""

    name = "rabbitmq"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        problems = Problems()  # every bad setting at once, not the first
        url = problems.read(functools.partial(broker_url, ctx, "URL", ("amqp", "amqps")))
        self.exchange_name = ctx.get("EXCHANGE", "") or ""
        problem = _shortstr_problem("exchange name", self.exchange_name)
        if problem:
            problems.lines.append(f"{ctx.env_name('EXCHANGE')}: {problem}")
        routing_key = problems.read(
            lambda: Template.parse(
                ctx,
                "ROUTING_KEY",
                "lacuna.{type}",
                lambda key: _shortstr_problem("routing key", key),
            )
        )
        timeouts = problems.read(functools.partial(network_timeouts, ctx))
        problems.check()
        assert url is not None
        assert routing_key is not None
        assert timeouts is not None
        self.url, self.routing_key = url, routing_key
        self.connect_timeout_seconds, self.confirm_timeout_seconds = timeouts
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"RabbitMQHandler(name={self.name!r}, exchange={self.exchange_name!r})"

    async def _open_exchange(self) -> AbstractExchange:
        async with self._lock:
            if self._connection is None or self._connection.is_closed:
                await self._close_quietly()
                self._connection = await aio_pika.connect(
                    self.url, timeout=self.connect_timeout_seconds
                )
            if self._exchange is None or self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                # Not declared (not even passively): the operator owns the topology; a
                # missing exchange shows as the broker's 404 on publish.
                self._exchange = await self._channel.get_exchange(self.exchange_name, ensure=False)
            return self._exchange

    def _reason(self, exc: BaseException) -> str:
        return reason_of(exc, self.url)

    def _vhost(self) -> str:
        """The virtual host the URL names (AMQP URI spec: the path, percent-decoded; "/"
        when it has none)."""
        path = urlsplit(self.url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    async def handle(self, event: Event) -> None:
        routing_key = self.routing_key.render(event)
        problem = _shortstr_problem("routing key", routing_key)
        if problem:
            raise PermanentError(f"cannot publish event {event.id!r} to RabbitMQ: {problem}")
        message = aio_pika.Message(
            event.raw,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=shortstr(event.id),
            type=shortstr(event.type),
            headers={"lacuna-event-id": event.id, "lacuna-event-type": event.type},
            content_type="application/json",
            app_id="lacuna-webhooks",
        )
        try:
            exchange = await self._open_exchange()
            await exchange.publish(
                message,
                routing_key,
                mandatory=True,
                timeout=self.confirm_timeout_seconds,
            )
        except aiormq.exceptions.PublishError as exc:
            raise RetryLater(
                f"RabbitMQ returned the message as unroutable (exchange {self.exchange_name!r}, "
                f"routing key {routing_key!r}): no queue is bound for it yet: {self._reason(exc)}"
            ) from None
        except _PERMANENT as exc:
            await self._drop_channel()
            raise PermanentError(f"RabbitMQ refused the message: {self._reason(exc)}") from None
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
            # A nack, a lost or blocked connection, a channel closed under us: all transient.
            # The connection goes too: aio-pika's `is_closed` turns true only once `close()`
            # is called, not when the socket dies, so a lost connection was reused (and
            # failed) at every attempt until serve restarted.
            async with self._lock:
                await self._close_quietly()
            if _closed_while_opening(exc):
                raise PermanentError(
                    f"RabbitMQ closed the connection instead of opening virtual host "
                    f"{self._vhost()!r}: it does not exist, or the user may not use it "
                    "(NOT_ALLOWED, 530); create it or fix the URL's path"
                ) from None
            raise RetryLater(f"publishing to RabbitMQ failed: {self._reason(exc)}") from None
        logger.info(
            "handler.rabbitmq.published",
            event_id=event.id,
            exchange=self.exchange_name,
            routing_key=routing_key,
        )

    async def _drop_channel(self) -> None:
        """Forget a channel the broker closed, so the next attempt opens a fresh one."""
        async with self._lock:
            if self._channel is not None and self._channel.is_closed:
                self._channel = None
                self._exchange = None

    async def _close_quietly(self) -> None:
        connection, self._connection, self._channel, self._exchange = (
            self._connection,
            None,
            None,
            None,
        )
        if connection is not None and not connection.is_closed:
            try:
                async with asyncio.timeout(self.connect_timeout_seconds):  # a dead peer
                    await connection.close()
            except Exception as exc:  # closing a broken connection must not stop shutdown
                logger.warning("handler.rabbitmq.close_failed", error=self._reason(exc))

    async def aclose(self) -> None:
        async with self._lock:
            await self._close_quietly()
