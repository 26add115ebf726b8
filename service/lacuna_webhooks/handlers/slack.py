"""The ``slack`` handler: posts a Block Kit message to a Slack incoming webhook.

``job.completed``: the title, the style, and one line per track with its
duration and a link to the audio. ``job.failed``: the title, the error code
and message, and the credits refunded. Any other type (when subscribed with
``LACUNA_SLACK_EVENTS``): the title and the event type.

The webhook URL is a secret (anyone holding it can post): it is never logged
or put in an error message in full. Calls go through ``_http.OutboundClient``
(https only, public addresses only, timeouts, no redirects followed).

Every piece of event text is escaped for mrkdwn (``&``, ``<``, ``>``), in the
blocks and in the top-level ``text`` alike, so a title such as
``<!channel> <https://evil.example|click>`` neither pings nor forges a link;
the header block is ``plain_text``, which Slack never parses. Every block keeps
to Slack's documented limits (header 150 characters, section 3000, 50 blocks):
text is clipped with ``…`` but a ``<url|label>`` link is never cut; its label
is shortened, or an over-long URL is left out with a note.

Slack's answers: 200 (any 2xx) is done; 429 is retried after its ``Retry-After``; 408
and 5xx are retried; a redirect or any other 4xx (``invalid_payload``,
``no_service``, ``channel_is_archived``...) is permanent, with Slack's reason.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import httpx
import orjson
import structlog

from ..errors import ConfigError, PermanentError, RateLimited, RetryLater
from ..events import LacunaEvent, is_job_completed, is_job_failed, parse_event
from ..models import Event
from ..redact import redact_url
from ._common import (
    UNSHOWABLE,
    display_title,
    format_duration,
    network_timeouts,
    peer_text,
    showable_text,
    stored_location,
)
from ._http import (
    OutboundClient,
    UnsafeURL,
    check_url,
    is_public_address,
    retry_after_seconds,
    transport_failure,
)
from .base import HandlerContext

logger = structlog.get_logger("lacuna_webhooks.handlers.slack")

MAX_TRACK_BLOCKS = 20  # Slack allows 50 blocks per message; the rest is summarised
# Slack's documented limits (Block Kit reference): a header's plain_text, a section's text
# (also used for a context element's text), blocks per message, and the top-level text
# (Slack truncates beyond 40 000; ours is a one-line summary, kept to a section's size).
HEADER_LIMIT = 150
SECTION_LIMIT = 3000
MAX_BLOCKS = 50
TEXT_LIMIT = 3000
LINK_TOO_LONG = "(audio link too long to show)"


def escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn treats as control characters (and show
    control and bidi characters as U+FFFD, ``showable_text``)."""
    return showable_text(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    """Clip plain text (a header's plain_text) to ``limit`` characters, ending in ``…``."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_mrkdwn(text: str, limit: int) -> str:
    """Clip escaped mrkdwn to ``limit`` characters, ending in ``…``.

    The cut never falls inside an entity (``&amp;``) nor inside a ``<url|label>``
    link: what would be cut in half is dropped whole. ``text`` must come from
    ``escape`` and ``link``, so every ``&`` starts an entity and every ``<`` a link.
    """
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    lt = head.rfind("<")
    if lt != -1 and ">" not in head[lt:]:
        head = head[:lt]
    # Outside links every "&" starts an entity (a link's URL may hold a bare "&").
    amp = head.rfind("&", head.rfind(">") + 1)
    if amp != -1 and ";" not in head[amp:]:
        head = head[:amp]
    return head + "…"


def _linkable(url: str) -> bool:
    return (
        url.startswith(("https://", "http://"))
        and not any(c in url for c in "<>| \n\r\t")
        and not UNSHOWABLE.search(url)
    )


def link(url: str, label: str, room: int = SECTION_LIMIT) -> str:
    """``<url|label>`` (label escaped) in at most ``room`` characters; the syntax is never cut.

    The label is shortened first; a URL that leaves no room for a label is
    linked bare (``<url>``); one that does not fit at all, or is not a plain
    http(s) URL, is left out and the label is followed by a note instead.
    """
    label_text = escape(label)
    if _linkable(url):
        if len(url) + 3 + len(label_text) <= room:
            return f"<{url}|{label_text}>"
        label_room = room - len(url) - 3
        if label_room >= 8:  # enough for a recognisable label
            return f"<{url}|{clip_mrkdwn(label_text, label_room)}>"
        if len(url) + 2 <= room:
            return f"<{url}>"
        return clip_mrkdwn(f"{label_text} {LINK_TOO_LONG}", room)
    return clip_mrkdwn(label_text, room)


def _context(event: LacunaEvent) -> dict[str, Any]:
    parts = [f"task `{escape(event.task_id)}`"] if event.task_id else []
    parts.append(f"event `{escape(event.id)}`")
    text = clip_mrkdwn(" · ".join(parts), SECTION_LIMIT)
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def _header(text: str) -> dict[str, Any]:
    # plain_text is shown as is (no mentions, no links), so it is clipped, not escaped.
    return {
        "type": "header",
        "text": {
            "type": "plain_text",
            "text": _clip(showable_text(text), HEADER_LIMIT),
            "emoji": True,
        },
    }


def _section(text: str) -> dict[str, Any]:
    """A mrkdwn section; ``text`` is escaped mrkdwn (see ``clip_mrkdwn``)."""
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip_mrkdwn(text, SECTION_LIMIT)}}


def _track_line(index: int, url: str, label: str, duration: str) -> str:
    prefix, suffix = f"*{index}.* ", f" · {duration}"
    return prefix + link(url, label, SECTION_LIMIT - len(prefix) - len(suffix)) + suffix


def build_message(event: Event, stored: str | None = None) -> dict[str, Any]:
    """The JSON body to post for ``event``; ``MalformedEvent`` when its tracks are malformed.

    ``stored`` is where ``storage`` put the audio (its result's ``location``, when this
    handler runs after it): a ``job.completed`` message then names it."""
    typed = parse_event(event)
    title = display_title(typed)
    if is_job_completed(typed):
        tracks = typed.data.tracks
        count = len(tracks)
        summary = f"{title} is ready ({count} track{'s' if count != 1 else ''})"
        blocks = [_header(f"{title} is ready")]
        if typed.data.style:
            blocks.append(_section(f"*Style:* {escape(typed.data.style)}"))
        for index, track in enumerate(tracks[:MAX_TRACK_BLOCKS], start=1):
            label = track.title or track.id
            duration = format_duration(track.duration_seconds)
            blocks.append(_section(_track_line(index, track.audio_url, label, duration)))
        if count > MAX_TRACK_BLOCKS:
            blocks.append(_section(f"…and {count - MAX_TRACK_BLOCKS} more tracks"))
        if stored is not None:
            # Not a link (Slack opens no file:// or s3:// URL): shown escaped, as code.
            blocks.append(_section(f"*Stored:* `{escape(stored)}`"))
    elif is_job_failed(typed):
        error = typed.data.error
        code = (error.code if error else None) or "unknown_error"
        summary = f"{title} failed: {code}"
        blocks = [_header(f"{title} failed")]
        lines = [f"*Error:* `{escape(code)}`"]
        if error and error.message:
            lines.append(escape(error.message))
        blocks.append(_section("\n".join(lines)))
        if typed.data.credits_refunded is not None:
            blocks.append(_section(f"*Credits refunded:* {typed.data.credits_refunded:g}"))
    else:
        summary = f"{title}: {typed.type}"
        blocks = [_header(summary)]
        if typed.task_status:
            blocks.append(_section(f"*Status:* {escape(typed.task_status)}"))
    blocks.append(_context(typed))
    # The top-level text is mrkdwn too (notifications, fallback): escaped like the blocks.
    return {"text": clip_mrkdwn(escape(summary), TEXT_LIMIT), "blocks": blocks[:MAX_BLOCKS]}


class SlackHandler:
    """Posts each event to ``LACUNA_SLACK_WEBHOOK_URL`` (see the module docstring)."""

    name = "slack"
    events: frozenset[str] | None = frozenset({"job.completed", "job.failed"})

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        var = ctx.env_name("WEBHOOK_URL")
        self.url = ctx.require_secret("WEBHOOK_URL")
        try:
            parsed = check_url(self.url, allow_private=ctx.allow_private_urls, what=var)
        except UnsafeURL as exc:
            raise ConfigError(exc.message) from None
        if not ctx.allow_private_urls:
            # An address the outbound rules refuse at every post: refused at start instead
            # of every delivery ending dead with UnsafeURL.
            try:
                literal = ipaddress.ip_address(parsed.host)
            except ValueError:
                literal = None  # a name: resolved, and checked, when posting
            if literal is not None and not is_public_address(literal):
                raise ConfigError(
                    f"{var} points at {literal}, which is not a public address; Slack's "
                    "webhooks are (LACUNA_ALLOW_PRIVATE_URLS=true allows a test server)"
                )
        connect_seconds, read_seconds = network_timeouts(ctx)
        self.http = OutboundClient(
            allow_private=ctx.allow_private_urls,
            connect_timeout_seconds=connect_seconds,
            read_timeout_seconds=read_seconds,
        )

    def __repr__(self) -> str:
        return f"SlackHandler(url={redact_url(self.url)!r})"

    async def handle(self, event: Event) -> None:
        body = orjson.dumps(build_message(event, stored_location()))
        target = redact_url(self.url)
        try:
            response, text = await self.http.post(
                self.url,
                what="the Slack webhook",
                content=body,
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise transport_failure(exc, what="posting to Slack", url=self.url) from None
        status = response.status_code
        reason = peer_text(text, 200) or response.reason_phrase
        if 200 <= status < 300:
            # Slack answers 200 "ok"; a gateway or a Slack-compatible endpoint may answer 201,
            # 202 or 204, and has taken the message all the same: counted as refused, the
            # delivery was dead and a replay posted it twice.
            logger.info("handler.slack.posted", event_id=event.id, event_type=event.type)
            return
        logger.warning(
            "handler.slack.refused", event_id=event.id, status=status, reason=reason, url=target
        )
        if status == 429 or status == 408 or status >= 500:
            # A 429 is RateLimited: retried without spending the budget (docs/delivery.md).
            kind = RateLimited if status == 429 else RetryLater
            raise kind(
                f"Slack answered HTTP {status}: {reason}",
                delay_seconds=retry_after_seconds(
                    response.headers.get("retry-after"), date=response.headers.get("date")
                ),
            )
        if 300 <= status < 400:
            raise PermanentError(
                f"Slack answered HTTP {status} (a redirect): check LACUNA_SLACK_WEBHOOK_URL"
            )
        raise PermanentError(f"Slack refused the message: HTTP {status}: {reason}")

    async def aclose(self) -> None:
        await self.http.aclose()
