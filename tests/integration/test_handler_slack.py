"""The slack handler against a real HTTP server standing in for Slack's incoming webhooks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from structlog.testing import capture_logs

from lacuna_webhooks.errors import ConfigError, PermanentError, RateLimited, RetryLater
from lacuna_webhooks.handlers._http import UnsafeURL
from lacuna_webhooks.handlers.base import HandlerContext
from lacuna_webhooks.handlers.slack import SlackHandler
from lacuna_webhooks.models import Event, json_strings
from tests.conftest import make_event
from tests.integration.servers import SlowResponse, free_port, raw_http

HOOK_PATH = "/services/T000/B000/XXXXsecretXXXX"
# Control characters but tab and line feed, DEL, C1, bidi embeddings, overrides, isolates.
UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def as_event(payload: dict[str, Any]) -> Event:
    return Event.from_body(orjson.dumps(payload))


def make_handler(url: str, *, allow_private: bool = True, **env: str) -> SlackHandler:
    environ = {"LACUNA_SLACK_WEBHOOK_URL": url, "LACUNA_SLACK_READ_TIMEOUT": "1", **env}
    return SlackHandler(
        HandlerContext(
            "slack", environ=environ, allow_private_urls=allow_private, timeout_seconds=10
        )
    )


@pytest.fixture
async def slack(httpserver: HTTPServer) -> AsyncIterator[SlackHandler]:
    handler = make_handler(httpserver.url_for(HOOK_PATH))
    yield handler
    await handler.aclose()


def posted(server: HTTPServer) -> list[dict[str, Any]]:
    return [orjson.loads(request.get_data()) for request, _ in server.log]


async def test_job_completed_posts_title_style_and_each_track(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """Block Kit: a header, the style, one line per track with link and duration, a context."""
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    event = as_event(
        make_event(
            "evt_done_1",
            tracks=[
                {"id": "trk_01", "audio_url": "https://cdn.example/1.mp3", "duration": 182.4},
                {"id": "trk_02", "audio_url": "https://cdn.example/2.mp3", "duration": 61},
            ],
        )
    )
    await slack.handle(event)

    ((request, _),) = httpserver.log
    assert request.headers["content-type"] == "application/json"
    body = orjson.loads(request.get_data())
    assert body["text"] == "Late Night Study is ready (2 tracks)"
    blocks = body["blocks"]
    assert blocks[0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Late Night Study is ready", "emoji": True},
    }
    assert blocks[1]["text"]["text"] == "*Style:* lofi hip hop, mellow piano, 70 bpm"
    assert blocks[2]["text"]["text"] == "*1.* <https://cdn.example/1.mp3|trk_01> · 3:02"
    assert blocks[3]["text"]["text"] == "*2.* <https://cdn.example/2.mp3|trk_02> · 1:01"
    assert blocks[4]["type"] == "context"
    assert "evt_done_1" in blocks[4]["elements"][0]["text"]


async def test_job_failed_posts_the_error_and_the_refund(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """The error code and message, and the credits refunded."""
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    await slack.handle(as_event(make_event(event_type="job.failed")))
    (body,) = posted(httpserver)
    assert body["text"] == "Late Night Study failed: provider_error"
    texts = [b["text"]["text"] for b in body["blocks"] if b["type"] in ("header", "section")]
    assert texts == [
        "Late Night Study failed",
        "*Error:* `provider_error`\nUpstream failure.",
        "*Credits refunded:* 10",
    ]


async def test_text_from_the_event_cannot_inject_links_or_mentions(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """<, > and & from event data are escaped, so `<!channel>` stays text."""
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    await slack.handle(as_event(make_event(style="<!channel> & <http://evil|click>")))
    (body,) = posted(httpserver)
    assert body["blocks"][1]["text"]["text"] == (
        "*Style:* &lt;!channel&gt; &amp; &lt;http://evil|click&gt;"
    )


@pytest.mark.parametrize("status", [201, 202, 204])
async def test_any_2xx_is_done(slack: SlackHandler, httpserver: HTTPServer, status: int) -> None:
    """A gateway or Slack-compatible endpoint that takes the message with another 2xx: it was
    counted as refused (dead), and a replay posted the message twice."""
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("", status=status)
    await slack.handle(as_event(make_event()))
    assert len(posted(httpserver)) == 1


async def test_control_and_bidi_characters_from_the_event_are_shown_as_replacements(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """A NUL, an escape or U+202E (which shows "evil\u202egpj.exe" as "evilexe.jpg") went into
    the message raw; each is U+FFFD now, and an audio URL holding one is not made a link."""
    httpserver.expect_request(HOOK_PATH, method="POST").respond_with_data("ok")
    tracks = [{"id": "trk_01", "audio_url": "https://cdn.example/a\x00b.mp3", "duration": 1}]
    event = make_event(title="Late\x00Night \u202egpj.exe", style="lofi\x1b[2J", tracks=tracks)
    await slack.handle(as_event(event))
    (body,) = posted(httpserver)
    texts = json_strings(body)
    assert not any(UNSHOWABLE.search(text) for text in texts)
    assert body["blocks"][0]["text"]["text"] == "Late\ufffdNight \ufffdgpj.exe is ready"
    assert body["blocks"][1]["text"]["text"] == "*Style:* lofi\ufffd[2J"
    assert body["blocks"][2]["text"]["text"] == "*1.* trk_01 · 0:01"


async def test_429_is_retried_after_retry_after(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """Slack's rate limit: retry after the seconds it asks for."""
    httpserver.expect_request(HOOK_PATH).respond_with_data(
        "rate_limited", status=429, headers={"Retry-After": "30"}
    )
    with pytest.raises(RateLimited, match="429") as caught:  # does not spend the budget
        await slack.handle(as_event(make_event()))
    assert caught.value.delay_seconds == 30


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_server_error_is_retried(
    slack: SlackHandler, httpserver: HTTPServer, status: int
) -> None:
    """5xx is transient."""
    httpserver.expect_request(HOOK_PATH).respond_with_data("oops", status=status)
    with pytest.raises(RetryLater, match=f"HTTP {status}"):
        await slack.handle(as_event(make_event()))


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "invalid_payload"),
        (403, "action_prohibited"),
        (404, "no_service"),
        (410, "channel_is_archived"),
    ],
)
async def test_other_client_errors_are_permanent_with_slacks_reason(
    slack: SlackHandler, httpserver: HTTPServer, status: int, reason: str
) -> None:
    """A refused webhook will not start working on retry; the reason says why."""
    httpserver.expect_request(HOOK_PATH).respond_with_data(reason, status=status)
    with pytest.raises(PermanentError, match=f"HTTP {status}: {reason}"):
        await slack.handle(as_event(make_event()))


async def test_a_redirect_is_not_followed(slack: SlackHandler, httpserver: HTTPServer) -> None:
    """Slack never redirects a webhook; a redirect means a wrong URL."""
    httpserver.expect_request(HOOK_PATH).respond_with_data(
        "", status=302, headers={"Location": "http://169.254.169.254/"}
    )
    with pytest.raises(PermanentError, match="redirect"):
        await slack.handle(as_event(make_event()))
    assert len(httpserver.log) == 1


@pytest.mark.parametrize("location", ["//[::1", "https://[::1/x"])
async def test_a_redirect_to_an_unparsable_location_is_permanent(
    location: str,
) -> None:
    """A Location httpx cannot parse was a RemoteProtocolError, retried; still a redirect."""
    answer = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
    async with raw_http(answer.encode()) as base:
        handler = make_handler(base + HOOK_PATH)
        try:
            with pytest.raises(PermanentError, match="redirect to an invalid URL"):
                await handler.handle(as_event(make_event()))
        finally:
            await handler.aclose()


async def test_a_stalled_slack_times_out_and_is_retried(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """The read timeout turns a hung endpoint into a retry."""
    slow = SlowResponse(2.5)  # longer than LACUNA_SLACK_READ_TIMEOUT=1
    httpserver.expect_request(HOOK_PATH).respond_with_handler(slow)
    with pytest.raises(RetryLater, match="ReadTimeout"):
        await slack.handle(as_event(make_event()))
    assert await asyncio.to_thread(slow.served.wait, 10)


async def test_an_unreachable_slack_is_retried() -> None:
    """Connection refused is transient."""
    handler = make_handler(f"http://127.0.0.1:{free_port()}{HOOK_PATH}")
    try:
        with pytest.raises(RetryLater, match="ConnectError"):
            await handler.handle(as_event(make_event()))
    finally:
        await handler.aclose()


async def test_the_webhook_url_never_appears_in_errors_or_logs(
    slack: SlackHandler, httpserver: HTTPServer
) -> None:
    """The URL's path is the secret: errors and logs carry only scheme and host."""
    httpserver.expect_request(HOOK_PATH).respond_with_data("no_service", status=404)
    with capture_logs() as logs, pytest.raises(PermanentError) as caught:
        await slack.handle(as_event(make_event()))
    assert "XXXXsecretXXXX" not in str(caught.value)
    assert logs, "the refusal is logged"
    assert "XXXXsecretXXXX" not in repr(logs)
    assert "XXXXsecretXXXX" not in repr(slack)


async def test_a_malformed_completed_event_is_permanent(slack: SlackHandler) -> None:
    """Tracks that are not a list: dead at once, no request sent."""
    payload = make_event()
    payload["data"]["tracks"] = {"id": "trk_01"}
    with pytest.raises(PermanentError, match="not a list"):
        await slack.handle(as_event(payload))


async def test_without_the_switch_a_loopback_webhook_is_refused(httpserver: HTTPServer) -> None:
    """https://localhost resolves to loopback: refused before any connection."""
    handler = make_handler(f"https://localhost:{httpserver.port}{HOOK_PATH}", allow_private=False)
    try:
        with pytest.raises(UnsafeURL, match="non-public"):
            await handler.handle(as_event(make_event()))
    finally:
        await handler.aclose()
    assert httpserver.log == []


def test_an_http_webhook_url_stops_start_without_the_switch() -> None:
    """Plain http is a configuration error naming the variable, not the URL."""
    with pytest.raises(ConfigError, match="LACUNA_SLACK_WEBHOOK_URL must be an https URL") as e:
        make_handler(f"http://hooks.example{HOOK_PATH}", allow_private=False)
    assert "XXXXsecretXXXX" not in str(e.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.5", "[::1]", "[64:ff9b::7f00:1]"])
def test_a_webhook_url_at_a_private_address_stops_start(host: str) -> None:
    """An address literal the outbound rules refuse at every post: refused at start (it
    started, and every delivery ended dead with UnsafeURL)."""
    with pytest.raises(ConfigError, match="is not a public address") as e:
        make_handler(f"https://{host}{HOOK_PATH}", allow_private=False)
    assert "XXXXsecretXXXX" not in str(e.value)
    make_handler(f"https://{host}{HOOK_PATH}", allow_private=True)  # a test server: fine


def test_a_missing_webhook_url_stops_start() -> None:
    with pytest.raises(ConfigError, match="LACUNA_SLACK_WEBHOOK_URL is required"):
        SlackHandler(HandlerContext("slack", environ={}))
