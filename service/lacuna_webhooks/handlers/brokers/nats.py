"""The ``nats`` handler: publishes each event to NATS JetStream and waits for the PubAck.

Settings (SPEC §8, ``LACUNA_<NAME>_…``): ``URL`` (required; ``nats://`` or
``tls://``, several comma-separated for a cluster), ``SUBJECT`` (default
``lacuna.{type}``), and ``CONNECT_TIMEOUT`` / ``READ_TIMEOUT`` (seconds; the
read timeout bounds the wait for the PubAck).

Message: the event's exact bytes; headers ``Nats-Msg-Id`` (the event id, so
JetStream drops a re-publish within the stream's duplicate window),
``Lacuna-Event-Id`` and ``Lacuna-Event-Type`` (percent-encoded as the ``http``
handler's ``lacuna-event-type``: ``signature.header_text``).

Outcomes: a PubAck is done (also one flagged ``duplicate``). No responders is
checked against the JetStream API: when it answers that no stream holds the
subject, the delivery is dead with that reason; when the API itself does not
answer (JetStream still starting after a restart) it is retried. JetStream
errors 5xx and "store failed" (a full stream with ``discard: new``) are
retried; other JetStream errors (wrong stream, message over the stream's
``max_msg_size``...) and a payload over the server's ``max_payload`` are dead.
Disconnections and timeouts are retried. A subject made invalid by the
event's own type or task id (whitespace, ``*``, ``>``, an empty token) is dead:
it is never sanitized into some other subject.

One client per instance, connected on first use, reconnecting by itself
forever (nats-py), closed by ``aclose``. A PubAck that times out has the
connection checked at once (a PING answered within the connect timeout), and a
connection that does not answer is dropped, so the next attempt connects afresh:
nats-py itself notices a dead connection (a broker host gone without a reset,
a network path that drops every packet) only after two unanswered pings two
minutes apart, and every attempt until then timed out on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from typing import Any, NoReturn

import structlog

from ...errors import ConfigError, PermanentError, RetryLater
from ...models import Event
from ...signature import header_text
from .._common import Problems, network_timeouts
from ..base import HandlerContext
from ._shared import Template, check_url, missing_extra, reason_of

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client as NATSClient
    from nats.js import JetStreamContext
except ImportError:  # pragma: no cover - exercised only without the extra
    raise missing_extra("nats", "nats-py") from None

logger = structlog.get_logger("lacuna_webhooks.handlers.nats")

# A published subject: dot-separated non-empty tokens, no whitespace or control
# characters, no wildcards (which would make it a subscription pattern).
_BAD_SUBJECT_CHARS = re.compile(r"[\s\x00-\x1f\x7f*>]")
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# JetStream error codes that mean "try again later" (flow control), not "never".
_RETRYABLE_ERR_CODES = frozenset({10077, 10023})  # store failed (limits), insufficient resources


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` cannot be published to, or ``None`` when it can."""
    if _BAD_SUBJECT_CHARS.search(subject):
        return f"the subject {subject!r} holds whitespace, a control character or a wildcard"
    if any(not token for token in subject.split(".")):
        return f"the subject {subject!r} has an empty token"
    return None


def _servers(ctx: HandlerContext) -> list[str]:
    """``LACUNA_<NAME>_URL``: a cluster is several URLs, comma-separated; each is checked."""
    servers = [part.strip() for part in ctx.require("URL").split(",") if part.strip()]
    if not servers:
        # `,` passed the start, and each attempt then waited on an empty server pool until
        # its timeout: a typo, not a choice.
        raise ConfigError(f"{ctx.env_name('URL')} names no server")
    for server in servers:
        check_url(ctx.env_name("URL"), server, ("nats", "tls"))
    return servers


class NatsHandler:
    """Publishes to JetStream (see the module docstring)."""

    name = "nats"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        problems = Problems()  # every bad setting at once, not the first
        self.servers = problems.read(functools.partial(_servers, ctx)) or []
        subject = problems.read(
            functools.partial(Template.parse, ctx, "SUBJECT", "lacuna.{type}", subject_problem)
        )
        timeouts = problems.read(functools.partial(network_timeouts, ctx))
        problems.check()
        assert subject is not None
        assert timeouts is not None
        self.subject = subject
        self.connect_timeout_seconds, self.ack_timeout_seconds = timeouts
        self._client: NATSClient | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._check: asyncio.Task[None] | None = None  # the connection check after a timeout

    def __repr__(self) -> str:
        return f"NatsHandler(name={self.name!r}, subject={self.subject.text!r})"

    async def _jetstream(self) -> JetStreamContext:
        async with self._lock:
            if self._js is not None and self._client is not None and not self._client.is_closed:
                return self._js
            client = NATSClient()
            try:
                # Bounded here: with reconnects unlimited, nats-py would retry a first
                # connection forever instead of failing this attempt.
                await asyncio.wait_for(
                    client.connect(
                        servers=self.servers,
                        connect_timeout=max(1, round(self.connect_timeout_seconds)),
                        max_reconnect_attempts=-1,  # never give up once connected
                        reconnect_time_wait=1,
                        error_cb=self._on_error,
                        name=f"lacuna-webhooks {self.name}",
                    ),
                    timeout=self.connect_timeout_seconds,
                )
            except Exception as exc:  # nats-py raises OSError, NoServersError, TimeoutError...
                await self._close(client)
                raise RetryLater(f"cannot connect to NATS: {self._reason(exc)}") from None
            self._client = client
            self._js = client.jetstream(timeout=self.ack_timeout_seconds)
            return self._js

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports each failed reconnect here; one quiet line instead of its traceback.
        logger.warning("handler.nats.connection_error", handler=self.name, error=self._reason(exc))

    def _reason(self, exc: BaseException) -> str:
        return reason_of(exc, *self.servers)

    async def handle(self, event: Event) -> None:
        subject = self.subject.render(event)
        problem = subject_problem(subject)
        if problem:
            raise PermanentError(f"cannot publish event {event.id!r} to NATS: {problem}")
        if _BAD_HEADER_CHARS.search(event.id):  # intake refuses such ids: only older rows
            raise PermanentError("the event id holds control characters (NATS headers)")
        headers = {
            "Nats-Msg-Id": event.id,
            "Lacuna-Event-Id": event.id,
            # Any non-blank type is accepted: control characters, spaces at either end (which
            # nats-py strips) and non-ASCII go percent-encoded, as the http handler sends it.
            "Lacuna-Event-Type": header_text(event.type),
        }
        js = await self._jetstream()
        try:
            ack = await js.publish(subject, event.raw, headers=headers)
        except nats.js.errors.NoStreamResponseError:
            await self._no_stream(js, subject)
        except nats.js.errors.APIError as exc:
            reason = self._api_reason(exc)
            if (exc.code or 0) >= 500 or exc.err_code in _RETRYABLE_ERR_CODES:
                raise RetryLater(f"JetStream refused {subject!r} for now: {reason}") from None
            raise PermanentError(f"JetStream refused {subject!r}: {reason}") from None
        except nats.errors.MaxPayloadError:
            raise PermanentError(
                f"the event ({len(event.raw)} bytes) is larger than the NATS server's max_payload"
            ) from None
        except nats.errors.BadSubjectError:
            raise PermanentError(f"NATS rejected the subject {subject!r}") from None
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            if isinstance(exc, TimeoutError):
                self._check_connection()
            raise RetryLater(f"publishing to NATS failed: {self._reason(exc)}") from None
        logger.info(
            "handler.nats.published",
            event_id=event.id,
            subject=subject,
            stream=ack.stream,
            seq=ack.seq,
            duplicate=bool(ack.duplicate),
        )

    def _check_connection(self) -> None:
        """After a PubAck timed out: check the connection in the background (the attempt
        ends now, within its own timeout), one check at a time."""
        client = self._client
        if client is None or (self._check is not None and not self._check.done()):
            return
        self._check = asyncio.create_task(self._drop_if_dead(client))

    async def _drop_if_dead(self, client: NATSClient) -> None:
        """Drop ``client`` when it does not answer a PING within the connect timeout: a slow
        JetStream (a PubAck late, the server answering) keeps its connection, a dead one
        does not keep every later attempt timing out on it."""
        try:
            await client.flush(timeout=max(1, round(self.connect_timeout_seconds)))
            return
        except Exception as exc:  # nats-py's TimeoutError, a closed or broken connection
            reason = self._reason(exc)
        async with self._lock:
            if self._client is not client:
                return
            self._client, self._js = None, None
        logger.warning(
            "handler.nats.connection_dropped",
            handler=self.name,
            reason=f"a PubAck timed out and the connection did not answer a PING: {reason}",
        )
        await self._close(client)

    async def _no_stream(self, js: JetStreamContext, subject: str) -> NoReturn:
        """Tell "no stream holds this subject" (dead) from "JetStream not answering" (retry)."""
        try:
            await js.find_stream_name_by_subject(subject)
        except nats.js.errors.NotFoundError:
            raise PermanentError(
                f"no JetStream stream holds the subject {subject!r} (create one, or change "
                "the handler's SUBJECT)"
            ) from None
        except Exception as exc:  # the API did not answer: JetStream down or still recovering
            raise RetryLater(f"JetStream is not answering: {self._reason(exc)}") from None
        raise RetryLater(f"JetStream had no responder for {subject!r}; its stream exists")

    @staticmethod
    def _api_reason(exc: Any) -> str:
        description = getattr(exc, "description", None) or str(exc)
        return f"{description} (code {exc.code}, err_code {exc.err_code})"

    async def _close(self, client: NATSClient) -> None:
        if not client.is_closed:
            try:
                # nats-py writes out what it has buffered and awaits the transport's drain
                # before it closes, which on a connection that takes no more bytes could
                # wait for ever: bounded, for the dead-connection check and shutdown alike.
                async with asyncio.timeout(self.connect_timeout_seconds):
                    await client.close()
            except Exception as exc:  # closing a broken connection must not stop shutdown
                logger.warning("handler.nats.close_failed", error=self._reason(exc))

    async def aclose(self) -> None:
        check, self._check = self._check, None
        if check is not None and not check.done():
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
        client, self._client, self._js = self._client, None, None
        if client is not None:
            await self._close(client)
