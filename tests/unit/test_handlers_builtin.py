"""The built-in handlers without servers: settings, event reading, URL rules, registration."""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from lacuna_webhooks.errors import ConfigError, PermanentError, RetryLater
from lacuna_webhooks.events import JobCompleted, JobFailed, parse_event
from lacuna_webhooks.handlers._common import display_title, format_duration, network_timeouts
from lacuna_webhooks.handlers._http import (
    OutboundClient,
    UnsafeURL,
    check_url,
    is_public_address,
    retry_after_seconds,
    transport_failure,
)
from lacuna_webhooks.handlers.base import HandlerContext
from lacuna_webhooks.handlers.email import compose, message_id, parse_smtp_url
from lacuna_webhooks.handlers.slack import build_message
from lacuna_webhooks.models import Event
from lacuna_webhooks.plugins import available, build_handlers
from tests.conftest import make_event


def as_event(payload: dict[str, Any]) -> Event:
    return Event.from_body(orjson.dumps(payload))


# --- registration and settings ----------------------------------------------------------


def test_the_built_ins_are_registered_as_entry_points() -> None:
    """storage, slack and email load like any third-party plugin."""
    names = available()
    assert names["storage"] == "lacuna_webhooks.handlers.storage:StorageHandler"
    assert names["slack"] == "lacuna_webhooks.handlers.slack:SlackHandler"
    assert names["email"] == "lacuna_webhooks.handlers.email:EmailHandler"


def test_build_handlers_gives_each_its_default_events(tmp_path: Path) -> None:
    """storage: job.completed; slack and email: job.completed and job.failed."""
    env = {
        "LACUNA_STORAGE_URL": (tmp_path / "audio").as_uri(),
        "LACUNA_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/secret",
        "LACUNA_EMAIL_SMTP_URL": "smtps://u:p@mail.example",
        "LACUNA_EMAIL_FROM": "a@example.com",
        "LACUNA_EMAIL_TO": "b@example.com",
    }
    built = build_handlers(["storage", "slack", "email"], env)
    assert built.filters == {
        "storage": frozenset({"job.completed"}),
        "slack": frozenset({"job.completed", "job.failed"}),
        "email": frozenset({"job.completed", "job.failed"}),
    }
    assert (tmp_path / "audio").is_dir()


def test_every_missing_setting_is_reported_at_once() -> None:
    """One ConfigError naming each required variable."""
    with pytest.raises(ConfigError) as caught:
        build_handlers(["storage", "slack", "email"], {})
    text = str(caught.value)
    for var in (
        "LACUNA_STORAGE_URL",
        "LACUNA_SLACK_WEBHOOK_URL",
        "LACUNA_EMAIL_SMTP_URL",
    ):
        assert var in text


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LACUNA_STORAGE_URL": "ftp://x/y"}, "file:///abs/dir or s3://bucket/prefix"),
        ({"LACUNA_STORAGE_URL": "file://host/dir"}, "no host"),
        ({"LACUNA_STORAGE_URL": "s3:///prefix"}, "must name a bucket"),
        (
            {"LACUNA_STORAGE_URL": "s3://b", "LACUNA_STORAGE_S3_ENDPOINT": "minio:9000"},
            "LACUNA_STORAGE_S3_ENDPOINT",
        ),
        ({"LACUNA_STORAGE_URL": "s3://b", "AWS_ACCESS_KEY_ID": "AK"}, "set together"),
        ({"LACUNA_STORAGE_MAX_BYTES": "lots"}, "LACUNA_STORAGE_MAX_BYTES must be a whole number"),
        # An extra digit or five: a bound, as the global numbers have.
        ({"LACUNA_STORAGE_MAX_BYTES": "5" * 15}, "LACUNA_STORAGE_MAX_BYTES must be at most"),
        ({"LACUNA_STORAGE_READ_TIMEOUT": "60"}, "smaller than the handler's attempt timeout"),
    ],
)
def test_bad_storage_settings_name_the_variable(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    base = {"LACUNA_STORAGE_URL": (tmp_path / "a").as_uri()}
    with pytest.raises(ConfigError, match=message):
        build_handlers(["storage"], {**base, **env})


def test_network_timeouts_default_below_the_attempt_timeout() -> None:
    """10 s / 30 s, or half of a shorter attempt timeout."""
    assert network_timeouts(HandlerContext("x", timeout_seconds=60)) == (10, 30)
    assert network_timeouts(HandlerContext("x", timeout_seconds=8)) == (4, 4)


def test_smtp_url_parsing() -> None:
    """Ports by scheme, URL-decoded credentials, STARTTLS when asked; repr hides the password."""
    target = parse_smtp_url("smtp://me%40x.org:p%40ss%2Fw@mail.example?starttls=true", "V")
    assert (target.host, target.port, target.start_tls, target.use_tls) == (
        "mail.example",
        587,
        True,
        False,
    )
    assert (target.username, target.password) == ("me@x.org", "p@ss/w")
    assert "p@ss" not in repr(target)
    assert parse_smtp_url("smtps://mail.example", "V").port == 465
    assert parse_smtp_url("smtp://mail.example", "V").port == 25


# --- reading events ------------------------------------------------------------------


def test_a_completed_event_reads_as_typed_tracks() -> None:
    """The handlers read job.completed through the public models: title and tracks."""
    typed = parse_event(as_event(make_event()))
    assert isinstance(typed, JobCompleted)
    assert display_title(typed) == "Late Night Study"
    assert [(t.id, t.duration_seconds) for t in typed.data.tracks] == [("trk_01", 182.4)]


@pytest.mark.parametrize(
    ("tracks", "reason"),
    [
        ("x", "not a list"),
        ([], "is empty"),
        ([1], r"tracks\[0\] is not an object"),
        ([{"audio_url": "https://a"}], r"tracks\[0\]\.id"),
        ([{"id": "t", "audio_url": ["https://a"]}], r"tracks\[0\]\.audio_url"),
    ],
)
def test_slack_and_email_refuse_malformed_tracks_permanently(tracks: Any, reason: str) -> None:
    """A job.completed whose tracks cannot be read is a PermanentError naming the field."""
    event = as_event(make_event(tracks=tracks))
    with pytest.raises(PermanentError, match=reason):
        build_message(event)
    with pytest.raises(PermanentError, match=reason):
        compose(event, "a@example.com", ["b@example.com"])


def test_a_failure_without_details_is_still_told() -> None:
    """A job.failed without error or title is still reported, as unknown_error."""
    event = as_event(make_event(event_type="job.failed", error=None, title=None))
    typed = parse_event(event)
    assert isinstance(typed, JobFailed)
    assert typed.data.error is None
    assert display_title(typed) == "Task cm123abc"
    assert build_message(event)["text"] == "Task cm123abc failed: unknown_error"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (182.4, "3:02"),
        (59.6, "1:00"),
        (3725, "1:02:05"),
        (None, "?:??"),
        (359999, "99:59:59"),
        (360000, "?:??"),
        (1e308, "?:??"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


# --- messages ------------------------------------------------------------------------


def test_slack_message_for_an_unknown_type_is_short() -> None:
    """A type subscribed through LACUNA_SLACK_EVENTS=* gets the title and the type."""
    body = build_message(as_event(make_event(event_type="job.started")))
    assert body["text"] == "Late Night Study: job.started"


def test_slack_message_caps_track_blocks() -> None:
    """Slack allows 50 blocks: after 20 tracks the rest is summarised."""
    tracks = [{"id": f"t{i}", "audio_url": f"https://c.example/{i}"} for i in range(30)]
    blocks = build_message(as_event(make_event(tracks=tracks)))["blocks"]
    assert len(blocks) == 1 + 1 + 20 + 1 + 1
    assert blocks[-2]["text"]["text"] == "…and 10 more tracks"


def test_message_id_is_derived_from_the_event_id() -> None:
    assert message_id("evt_1.x-y", "Me <me@studio.example>") == "<lacuna.evt_1.x-y@studio.example>"
    unsafe = message_id("evt_1/x y", "Me <me@studio.example>")
    assert unsafe == message_id("evt_1/x y", "me@studio.example")  # the same for every mail
    assert re.fullmatch(r"<lacuna-x\.evt_1_x_y\.[0-9a-f]{32}@studio\.example>", unsafe)


def test_distinct_event_ids_never_share_a_message_id() -> None:
    """Intake takes ids with any character but controls: each unsafe character became `_`, so
    `evt 1`, `evt/1`, `evt_1` (and `evt_é`, `evt_ü`) were one Message-ID, and a mailbox that
    drops a repeated Message-ID (Gmail does) dropped the later events' mails. Ids that are
    not a dot-atom of [A-Za-z0-9_-] keep a readable part and a digest of the whole id."""
    ids = ["evt_1", "evt 1", "evt/1", "evt:1", "evt_\u00e9", "evt_\u00fc", "..", "evt..1", "."]
    ids += ["caf\u00e9", "cafe\u0301", "x" * 255, "x" * 254 + "y"]
    made = [message_id(i, "me@studio.example") for i in ids]
    assert len(set(made)) == len(ids)
    for text in made:
        local = text[1:].split("@")[0]
        assert re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", local), text  # a dot-atom
        assert len(text) < 200


def test_mail_subjects() -> None:
    sender, to = "a@example.com", ["b@example.com"]
    assert compose(as_event(make_event()), sender, to)["Subject"] == "Late Night Study is ready"
    failed = compose(as_event(make_event(event_type="job.failed")), sender, to)
    assert failed["Subject"] == "Late Night Study failed: provider_error"


# --- outbound URL rules --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.100.100.200", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
        ("::ffff:127.0.0.1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    """Loopback, private, link-local, CGNAT, multicast and metadata addresses are not public."""
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    "url", ["http://example.com/a.mp3", "ftp://example.com/a", "file:///etc/passwd", "//x/y"]
)
def test_only_https_without_the_switch(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url, allow_private=False, what="audio")


def test_http_with_the_switch() -> None:
    assert check_url("http://127.0.0.1:8080/a", allow_private=True, what="audio").port == 8080


@pytest.mark.parametrize("url", ["https://cdn.example:84333/a.mp3", "https://cdn.example:0/a"])
def test_a_port_out_of_range_is_a_permanent_refusal(url: str) -> None:
    """httpx takes port 84333; every connect then failed (an ExceptionGroup, retried until
    dead). An audio URL in an event that can never be fetched is a permanent error."""
    with pytest.raises(UnsafeURL, match="port that is not a number from 1 to 65535"):
        check_url(url, allow_private=False, what="audio")


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:9/a.mp3",
        "https://127.0.0.1/a.mp3",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/a",
        "https://[::ffff:127.0.0.1]/a",
        "https://10.0.0.1/a",
    ],
)
async def test_non_public_destinations_are_refused_before_connecting(url: str) -> None:
    """The resolved address is checked: ``localhost`` is refused like ``127.0.0.1``."""
    client = OutboundClient(allow_private=False, connect_timeout_seconds=1, read_timeout_seconds=1)
    try:
        with pytest.raises(UnsafeURL, match="non-public address"):
            async with client.stream_get(url, what="audio"):
                pass
    finally:
        await client.aclose()


def test_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Thu, 01 Jan 2026 00:01:00 GMT", now=now) == 60
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_a_retry_after_date_is_read_against_the_answers_own_date() -> None:
    """The peer wrote its Retry-After date and its Date with one clock: their difference is
    the delay it asks for, whatever our clock says. Without a usable Date, our clock."""
    ours = datetime(2026, 1, 1, tzinfo=UTC)
    retry_at = "Thu, 01 Jan 2026 01:01:00 GMT"  # the peer's clock runs an hour ahead
    peer_now = "Thu, 01 Jan 2026 01:00:00 GMT"
    assert retry_after_seconds(retry_at, date=peer_now, now=ours) == 60
    behind = "Wed, 31 Dec 2025 23:01:00 GMT"  # an hour behind: a date in our past
    assert retry_after_seconds(behind, date="Wed, 31 Dec 2025 23:00:00 GMT", now=ours) == 60
    assert retry_after_seconds(retry_at, date="not a date", now=ours) == 3660
    assert retry_after_seconds(retry_at, date=None, now=ours) == 3660
    assert retry_after_seconds("30", date=peer_now, now=ours) == 30


@pytest.mark.parametrize("value", ["\u00b2", "\u2460", "Fri, 31 Dec 99999999999 23:59:59 GMT"])
def test_a_retry_after_that_is_no_number_or_date_is_ignored_not_raised(value: str) -> None:
    """`²` and `①` pass isdigit() and fail float(); a year past datetime's overflowed. Each
    raised out of the 429 handling: the status lost, the 429 counted against the budget."""
    assert retry_after_seconds(value) is None


def test_a_huge_retry_after_stays_finite() -> None:
    """400 digits read as inf, which the worker's JSON wire sends as null: the retry then
    waited the normal backoff instead of the cap."""
    assert retry_after_seconds("9" * 400) == 1e9


def test_input_shaped_http_errors_are_permanent() -> None:
    """A request httpx or h11 refuses to build is the event's fault: not retried."""
    url = "https://hooks.example/secret/path"
    refused = transport_failure(httpx.LocalProtocolError("Illegal header value"), what="x", url=url)
    assert isinstance(refused, PermanentError)
    unsupported = transport_failure(httpx.UnsupportedProtocol("ftp"), what="x", url=url)
    assert isinstance(unsupported, PermanentError)
    network = transport_failure(httpx.ConnectError(f"reset {url}"), what="x", url=url)
    assert isinstance(network, RetryLater)
    assert "secret/path" not in str(network)
