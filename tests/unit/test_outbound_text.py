"""Event text in outbound formats: Slack mrkdwn escaped and within Block Kit limits; mail safe.

Every message is built from hostile events (mentions and forged links in titles,
very long titles, task ids and audio URLs, many tracks, lyrics full of ``<>&|``)
and checked by a validator of Slack's documented limits, not by comparing strings.
"""

from __future__ import annotations

import re
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lacuna_webhooks.handlers.email import compose
from lacuna_webhooks.handlers.slack import (
    HEADER_LIMIT,
    LINK_TOO_LONG,
    MAX_BLOCKS,
    SECTION_LIMIT,
    build_message,
    clip_mrkdwn,
    escape,
    link,
)
from lacuna_webhooks.models import Event
from tests.conftest import make_event

FORGED = "<!channel> <https://evil.example|click here>"
HOSTILE = "<!here> & <@U123> <https://evil.example|x> |pipe| *bold* `code` &amp; >quote"
LINK_RE = re.compile(r"<(https?://[^<>|\s]+)(?:\|([^<>]*))?>")
ENTITY_RE = re.compile(r"&(?:amp|lt|gt);")


def as_event(payload: dict[str, Any]) -> Event:
    # Read as the store reads a stored body (Event.from_stored): intake refuses padded ids now,
    # but the messages must stay safe for any id an event stored earlier holds.
    return Event.from_stored(orjson.dumps(payload))


def track(index: int, **fields: Any) -> dict[str, Any]:
    base = {
        "id": f"trk_{index}",
        "audio_url": f"https://cdn.example/{index}.mp3",
        "duration": 61.0,
        "lyrics": HOSTILE * 50,
    }
    base.update(fields)
    return base


# --- the Slack validator -------------------------------------------------------------------


def check_mrkdwn(text: str, urls: set[str], limit: int) -> None:
    """Within ``limit``; links only to the event's audio URLs, intact; nothing else unescaped."""
    assert text
    assert len(text) <= limit, len(text)
    links = LINK_RE.findall(text)
    for url, label in links:
        assert url in urls, url[:80]
        assert "&" not in ENTITY_RE.sub("", label)
    rest = LINK_RE.sub("", text)
    assert "<" not in rest, rest[:200]  # no mention, no forged or half-cut link
    assert ">" not in rest
    assert "&" not in ENTITY_RE.sub("", rest)  # every & is an entity, none cut in half


def validate_slack_message(message: dict[str, Any], event: Event) -> None:
    """Slack's documented Block Kit limits, and mrkdwn safety for every text."""
    tracks = event.data.get("tracks") or []
    urls = {t["audio_url"] for t in tracks if isinstance(t, dict)}
    check_mrkdwn(message["text"], urls, 40_000)
    blocks = message["blocks"]
    assert 1 <= len(blocks) <= MAX_BLOCKS
    for block in blocks:
        if block["type"] == "header":
            assert block["text"]["type"] == "plain_text"
            assert 1 <= len(block["text"]["text"]) <= HEADER_LIMIT
        elif block["type"] == "section":
            assert block["text"]["type"] == "mrkdwn"
            check_mrkdwn(block["text"]["text"], urls, SECTION_LIMIT)
        elif block["type"] == "context":
            assert 1 <= len(block["elements"]) <= 10
            for element in block["elements"]:
                check_mrkdwn(element["text"], urls, SECTION_LIMIT)
        else:
            pytest.fail(f"unexpected block type {block['type']}")


HOSTILE_EVENTS = {
    "forged title": make_event(title=FORGED),
    "hostile text everywhere": make_event(
        title=HOSTILE, style=HOSTILE, tracks=[track(1, title=HOSTILE)]
    ),
    "very long title": make_event(title="<&>|" * 5000),
    "very long style": make_event(style="xy" + "&" * 4000),
    "very long task id": make_event(task_id="cm" + "<&>" * 84),  # data.id holds 255 at most
    "very long event id": make_event("evt_" + "&<" * 120),
    "over-long audio url": make_event(
        tracks=[track(1, audio_url="https://cdn.example/" + "a" * 5000)]
    ),
    "audio url leaving no room for a label": make_event(
        tracks=[track(1, audio_url="https://cdn.example/" + "b" * 2960)]
    ),
    "long audio url and long label": make_event(
        tracks=[track(1, audio_url="https://cdn.example/" + "c" * 2000, title="&" * 3000)]
    ),
    "audio url with bare &": make_event(
        tracks=[track(1, audio_url="https://cdn.example/x?a=1&b=2", title="t&" * 2000)]
    ),
    "audio url with a pipe and brackets": make_event(
        tracks=[track(1, audio_url="https://evil.example/|<!channel>")]
    ),
    "many tracks": make_event(tracks=[track(i, title=HOSTILE) for i in range(200)]),
    "failed with a huge message": make_event(
        event_type="job.failed",
        title=FORGED,
        error={"code": "<!channel>" * 500, "message": HOSTILE * 200},
    ),
    "unknown type with a forged title": make_event(event_type="job.<started>", title=FORGED),
}


@pytest.mark.parametrize("name", list(HOSTILE_EVENTS))
def test_slack_messages_from_hostile_events_respect_slacks_limits(name: str) -> None:
    """Every block, and the top-level text, passes the validator."""
    event = as_event(HOSTILE_EVENTS[name])
    validate_slack_message(build_message(event), event)


def test_a_forged_title_neither_pings_nor_links_in_text_or_blocks() -> None:
    """`<!channel> <https://evil.example|click here>` reaches Slack escaped everywhere."""
    message = build_message(as_event(make_event(title=FORGED)))
    escaped = "&lt;!channel&gt; &lt;https://evil.example|click here&gt;"
    assert message["text"].startswith(escaped)
    blocks = message["blocks"]
    mrkdwn = [message["text"]]
    mrkdwn += [b["text"]["text"] for b in blocks if b["type"] == "section"]
    mrkdwn += [e["text"] for b in blocks if b["type"] == "context" for e in b["elements"]]
    assert not any("<!channel>" in text or "<https://evil" in text for text in mrkdwn)
    # The header is plain_text, which Slack shows as typed and never parses for mentions or
    # links; escaping it would show "&lt;" literally.
    header = message["blocks"][0]["text"]
    assert header == {"type": "plain_text", "text": f"{FORGED} is ready", "emoji": True}


def test_an_over_long_audio_url_is_left_out_with_a_note() -> None:
    """A URL that cannot fit a section is omitted, the label and a note kept."""
    url = "https://cdn.example/" + "a" * 5000
    message = build_message(as_event(make_event(tracks=[track(1, audio_url=url)])))
    line = message["blocks"][2]["text"]["text"]
    assert line.startswith(f"*1.* trk_1 {LINK_TOO_LONG}")
    assert "https://" not in line


def test_a_long_audio_url_keeps_its_link_with_a_shortened_label() -> None:
    """The label gives way before the link does; the URL stays whole."""
    url = "https://cdn.example/" + "c" * 2000
    message = build_message(
        as_event(make_event(tracks=[track(1, audio_url=url, title="x" * 3000)]))
    )
    line = message["blocks"][2]["text"]["text"]
    assert len(line) <= SECTION_LIMIT
    ((found, label),) = LINK_RE.findall(line)
    assert found == url
    assert label.endswith("…")


def test_track_blocks_are_capped_and_summarised() -> None:
    """Many tracks: at most 20 track sections, then '…and N more tracks'."""
    message = build_message(as_event(make_event(tracks=[track(i) for i in range(200)])))
    assert len(message["blocks"]) <= MAX_BLOCKS
    assert message["blocks"][-2]["text"]["text"] == "…and 180 more tracks"


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("abc&amp;def", 6, "abc…"),  # would end inside &amp;
        ("abc&amp;def", 9, "abc&amp;…"),
        ("ab <https://x.example/a|label> cd", 12, "ab …"),  # would cut the link
        ("<https://x.example/?a&b|l> tail&lt;", 34, "<https://x.example/?a&b|l> tail…"),
        ("short", 10, "short"),
    ],
)
def test_clip_mrkdwn_never_cuts_an_entity_or_a_link(text: str, limit: int, expected: str) -> None:
    assert clip_mrkdwn(text, limit) == expected


def test_link_drops_or_shortens_but_never_breaks_the_syntax() -> None:
    url = "https://cdn.example/" + "z" * 40
    assert link(url, "a<b>") == f"<{url}|a&lt;b&gt;>"
    assert link(url, "x" * 100, room=len(url) + 3 + 10) == f"<{url}|{'x' * 9}…>"
    assert link(url, "label", room=len(url) + 4) == f"<{url}>"
    assert link(url, "label", room=len(url)) == f"label {LINK_TOO_LONG}"
    assert link(url, "label", room=10) == "label (au…"
    assert link("javascript:alert(1)", "<!here>") == "&lt;!here&gt;"


hostile_text = st.text(alphabet="<>&|!@ *_`~\nabcé", min_size=0, max_size=60).map(lambda s: s * 80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    title=hostile_text,
    style=hostile_text,
    task_id=hostile_text,
    label=hostile_text,
    url_tail=st.integers(0, 4000),
    count=st.integers(1, 60),
)
def test_slack_messages_from_random_hostile_text_respect_slacks_limits(
    title: str, style: str, task_id: str, label: str, url_tail: int, count: int
) -> None:
    """Whatever the event text, the message passes the validator."""
    tracks = [
        track(i, title=label or None, audio_url=f"https://cdn.example/{i}/" + "u" * url_tail)
        for i in range(count)
    ]
    payload = make_event(title=title, style=style, task_id=(task_id or "cm1")[:255], tracks=tracks)
    event = as_event(payload)
    validate_slack_message(build_message(event), event)


def test_escape_covers_the_three_control_characters() -> None:
    assert escape("a & <b> c") == "a &amp; &lt;b&gt; c"


# --- email ------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def html_part(message: EmailMessage) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/html":
            return str(part.get_content())
    raise AssertionError("no HTML part")


EMAIL_HOSTILE = {
    **HOSTILE_EVENTS,
    "script and header injection": make_event(
        # CR/LF in an id is refused at intake now; U+2028 still reaches the mail code.
        "evt_x\u2028Bcc: victim@example.com",
        title="<script>alert(1)</script>\r\nBcc: victim@example.com\u2028X-Evil: 1",
        style='"><img src=x onerror=alert(1)>',
        tracks=[track(1, audio_url='https://cdn.example/"onmouseover="alert(1)', title="<b>")],
    ),
    "javascript url": make_event(tracks=[track(1, audio_url="javascript:alert(1)")]),
}


@pytest.mark.parametrize("name", list(EMAIL_HOSTILE))
def test_mail_from_hostile_events_has_escaped_html_and_one_line_headers(name: str) -> None:
    """Only our own tags in the HTML part; links only to the event's http(s) audio URLs;
    the Subject and every other header one line, and no header the event invented."""
    event = as_event(EMAIL_HOSTILE[name])
    message = compose(event, "Lacuna <a@example.com>", ["b@example.com"])
    assert set(message.keys()) == {
        "Subject",
        "From",
        "To",
        "Date",
        "Message-ID",
        "X-Lacuna-Event-Id",
        "Content-Type",
        "MIME-Version",
    }
    for key, value in message.items():
        assert "\r" not in value, key
        assert "\n" not in value, key
    assert "<" not in message["Subject"] or "&lt;" not in message["Subject"]
    parser = _Tags()
    parser.feed(html_part(message))
    urls = {t["audio_url"] for t in event.data.get("tracks") or []}
    for tag, attrs in parser.tags:
        assert tag in {"html", "body", "h2", "p", "ol", "li", "a", "code"}, tag
        for attr, value in attrs:
            if tag == "a":
                assert attr == "href"
                assert value in urls
                assert value is not None
                assert value.startswith(("https://", "http://"))
            else:
                assert (tag, attr) == ("p", "style")
