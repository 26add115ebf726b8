"""The ``sqs`` handler: sends each event to an Amazon SQS queue (or an SQS-compatible API).

Settings (SPEC §8, ``LACUNA_<NAME>_…``): ``QUEUE_URL`` (required, ``https://``
or ``http://``), ``REGION`` (default: the AWS chain's, else the region in an
``sqs.<region>.amazonaws.com`` queue URL), ``ENDPOINT`` (for compatible APIs
and local test servers), ``CONNECT_TIMEOUT`` and ``READ_TIMEOUT`` (seconds).
Credentials come from the AWS credential chain (environment, shared files,
instance or task role), never from our settings.

Message: the body is the event's bytes (valid UTF-8 JSON, sent unchanged as
SQS's string body); message attributes ``event_id`` and ``event_type``
(String; percent-encoded as the ``http`` handler's headers when they hold a
character SQS refuses: a control character, U+FFFE, U+FFFF). FIFO queues
(URL ending in ``.fifo``): ``MessageGroupId`` = the task id (``data.id``; the
event id when absent), so one task's events stay in order, and
``MessageDeduplicationId`` = the event id, so SQS drops a re-publish within
its 5-minute deduplication interval. Both are used as they are when they fit
SQS's rules (at most 128 of ``A-Za-z0-9`` and ASCII punctuation), else
replaced by the SHA-256 hex of the value (stable, so deduplication still
holds). Standard queues have no deduplication.

Outcomes: the SendMessage reply is done: a ``MessageId``, and the ``MD5OfMessageBody``
of the body sent when the reply has one. A 2xx without them (a proxy's or another
server's page at the endpoint, answered 200) is retried, never taken as sent: botocore
reads any 200 as an empty reply. Connection errors, timeouts,
throttling and 5xx replies → retried. Queue missing, access denied, message
too long or invalid, and other 4xx → dead with SQS's reason. botocore's own
retries are off: the dispatcher owns the retry schedule.

One boto3 client per instance (thread-safe, pooled HTTP connections), called
in a worker thread so the event loop never blocks; closed by ``aclose``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

import structlog

from ...errors import PermanentError, RetryLater
from ...models import Event
from ...signature import header_text
from .._common import Problems, network_timeouts
from ..base import HandlerContext
from ._shared import broker_url, missing_extra, reason_of

try:
    import boto3.session
    import botocore.config
    import botocore.exceptions
except ImportError:  # pragma: no cover - exercised only without the extra
    raise missing_extra("sqs", "boto3") from None

logger = structlog.get_logger("lacuna_webhooks.handlers.sqs")

# SQS's rule for MessageGroupId and MessageDeduplicationId.
_FIFO_ID = re.compile(r"[A-Za-z0-9!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}")
_REGION_IN_HOST = re.compile(r"^sqs\.([a-z0-9-]+)\.amazonaws\.com")
_THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "KmsThrottled",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
    }
)


# What SQS takes in a message body and a String attribute value (SendMessage): anything
# else ("#x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF") is refused.
_NOT_SQS_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def attribute_text(value: str) -> str:
    """``value`` as a String attribute value: itself when SQS takes every character of it,
    else percent-encoded as the ``http`` handler's headers are (``header_text``). Intake
    takes any non-blank type without NUL: one holding an ESC or U+FFFF made SQS refuse the
    whole message, and the accepted event ended dead."""
    return header_text(value) if _NOT_SQS_TEXT.search(value) else value


def fifo_id(value: str) -> str:
    """``value`` when SQS accepts it as a group or deduplication id, else its SHA-256 hex."""
    if _FIFO_ID.fullmatch(value):
        return value
    return hashlib.sha256(value.encode()).hexdigest()


def reply_problem(reply: Any, body: str) -> str | None:
    """Why ``reply`` is not SQS's SendMessage answer for ``body``, or ``None`` when it is.

    botocore takes any 2xx as success and parses what it can: an HTML page, an empty body
    or ``{}`` from something else at the endpoint became ``{}``, and the attempt was done
    with no message in the queue (docs/brokers.md: done only after the broker's
    acknowledgement)."""
    message_id = reply.get("MessageId") if isinstance(reply, dict) else None
    if not isinstance(message_id, str) or not message_id.strip():
        return "the reply has no MessageId (is QUEUE_URL / ENDPOINT an SQS API?)"
    digest = reply.get("MD5OfMessageBody")
    if digest is not None:
        expected = hashlib.md5(body.encode("utf-8"), usedforsecurity=False).hexdigest()
        if not isinstance(digest, str) or digest.lower() != expected:
            return "the reply's MD5OfMessageBody is not that of the message sent"
    return None


class SQSHandler:
    """Sends to an SQS queue (see the module docstring)."""

    name = "sqs"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        problems = Problems()  # every bad setting at once, not the first
        queue_url = problems.read(
            functools.partial(broker_url, ctx, "QUEUE_URL", ("https", "http"))
        )
        self.endpoint = (
            problems.read(functools.partial(broker_url, ctx, "ENDPOINT", ("https", "http")))
            if ctx.get("ENDPOINT")
            else None
        )
        host_region = _REGION_IN_HOST.match(urlsplit(queue_url or "").hostname or "")
        region: str | None = None
        try:
            session = boto3.session.Session()
            region = (
                ctx.get("REGION")
                or session.region_name
                or (host_region.group(1) if host_region else None)
            )
        except botocore.exceptions.BotoCoreError as exc:
            # An AWS_CONFIG_FILE that does not parse, an AWS_PROFILE it does not hold: one
            # line naming the cause (a path, a profile name; no credential), not a traceback.
            problems.lines.append(
                f"the {ctx.name} handler cannot read the AWS configuration: {exc}"
            )
        else:
            # Without a usable queue URL its host cannot name the region: that line is enough.
            if not region and queue_url is not None:
                problems.lines.append(
                    f"{ctx.env_name('REGION')} is required by the {ctx.name} handler: the AWS "
                    "configuration names no region and the queue URL holds none"
                )
        timeouts = problems.read(functools.partial(network_timeouts, ctx))
        problems.check()
        assert queue_url is not None
        assert region is not None
        assert timeouts is not None
        self.queue_url, self.region = queue_url, region
        self.fifo = urlsplit(self.queue_url).path.rstrip("/").endswith(".fifo")
        connect_seconds, read_seconds = timeouts
        self.client: Any = session.client(
            "sqs",
            region_name=self.region,
            endpoint_url=self.endpoint,
            config=botocore.config.Config(
                connect_timeout=connect_seconds,
                read_timeout=read_seconds,
                retries={"total_max_attempts": 1},  # the dispatcher retries, with backoff
            ),
        )

    def __repr__(self) -> str:
        return f"SQSHandler(name={self.name!r}, queue_url={self.queue_url!r})"

    def _reason(self, exc: BaseException) -> str:
        return reason_of(exc, self.queue_url)

    def request(self, event: Event) -> dict[str, Any]:
        """The SendMessage parameters for ``event``."""
        params: dict[str, Any] = {
            "QueueUrl": self.queue_url,
            "MessageBody": event.raw.decode("utf-8"),
            "MessageAttributes": {
                "event_id": {"DataType": "String", "StringValue": attribute_text(event.id)},
                "event_type": {"DataType": "String", "StringValue": attribute_text(event.type)},
            },
        }
        if self.fifo:
            params["MessageGroupId"] = fifo_id(event.task_id or event.id)
            params["MessageDeduplicationId"] = fifo_id(event.id)
        return params

    async def handle(self, event: Event) -> None:
        try:
            params = self.request(event)
        except UnicodeDecodeError:
            raise PermanentError("the event body is not UTF-8; SQS takes text only") from None
        try:
            reply = await asyncio.to_thread(self.client.send_message, **params)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            reason = f"{code}: {error.get('Message', '')}".strip(": ")
            if code in _THROTTLING or status >= 500 or status == 429:
                raise RetryLater(f"SQS cannot take the message now: {reason}") from None
            raise PermanentError(f"SQS refused the message: {reason}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            # Connection refused or reset, timeouts, no credentials yet (an instance role
            # that is still being fetched): all may pass.
            raise RetryLater(f"sending to SQS failed: {self._reason(exc)}") from None
        problem = reply_problem(reply, params["MessageBody"])
        if problem is not None:
            raise RetryLater(f"SQS did not confirm the message: {problem}")
        logger.info(
            "handler.sqs.sent",
            event_id=event.id,
            message_id=reply.get("MessageId"),
            fifo=self.fifo,
        )

    async def aclose(self) -> None:
        await asyncio.to_thread(self.client.close)
