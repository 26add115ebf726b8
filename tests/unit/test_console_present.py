"""The console's pure presentation helpers (admin/console/present.py) on hostile input, and
the package shipping its templates and static files."""

from __future__ import annotations

import json
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from importlib import resources

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lacuna_webhooks.admin.console.present import (
    MAX_PRETTY_CHARS,
    MAX_SLOW_BYTES,
    build_chart,
    flatten_result,
    hour_buckets,
    http_link,
    parse_payload,
    payload_title,
    pretty_json,
    shown,
)


def test_pretty_json_keeps_every_token_as_received() -> None:
    raw = b'{"a":[1e400,' + b"9" * 5000 + b',"\\u0000\\ud800"],"b":{},"c":[],"d":"x, y: {z}"}'
    text, cut = pretty_json(raw)
    assert not cut
    assert "1e400" in text
    assert "9" * 5000 in text
    assert '"\\u0000\\ud800"' in text
    assert '"d": "x, y: {z}"' in text  # punctuation inside strings is left alone
    assert '"b": {}' in text
    assert '"c": []' in text
    assert text.splitlines()[:3] == ["{", '  "a": [', "    1e400,"]


def test_pretty_json_of_deep_nesting_and_broken_bytes() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    text, _ = pretty_json(deep)
    assert (
        max(len(line) for line in text.splitlines()) <= 2 * 32 + 2
    )  # indentation stops at 32 levels
    broken, _ = pretty_json(b'{"a": "unterminated \\" \xff\x00')
    assert "\ufffd" in broken
    assert "\x00" not in broken


def test_pretty_json_cuts_huge_payloads() -> None:
    text, cut = pretty_json(b'"' + b"a" * (MAX_PRETTY_CHARS + 10) + b'"')
    assert cut
    assert len(text) <= MAX_PRETTY_CHARS


@given(st.binary(max_size=300))
def test_pretty_json_never_raises(raw: bytes) -> None:
    text, _ = pretty_json(raw)
    text.encode("utf-8")  # always encodable: no lone surrogate, no NUL
    assert "\x00" not in text


def test_parse_payload_falls_back_for_what_orjson_refuses() -> None:
    assert parse_payload(b'{"a": 1e400}') == {"a": float("inf")}
    assert parse_payload(b'{"t": "\\ud800"}') == {"t": "\ud800"}
    assert parse_payload(b"[" * 100_000) is None
    assert parse_payload(b"not json") is None
    big = parse_payload(b'{"a": ' + b"9" * 5000 + b', "data": {"title": "t"}}')
    assert big == {"a": "9" * 5000, "data": {"title": "t"}}


def test_payload_title() -> None:
    assert (
        payload_title({"data": {"title": "<b>x</b>"}}) == "<b>x</b>"
    )  # escaping is the template's
    assert payload_title({"data": {"title": "a\x00\ud800"}}) == "a\ufffd?"
    assert payload_title({"data": {"title": 3}}) is None
    assert payload_title(["data"]) is None
    assert payload_title({"data": {"title": "x" * 500}}) == "x" * 200 + "…"


@pytest.mark.parametrize(
    ("value", "link"),
    [
        ("https://files.example/a?b=1", True),
        ("HTTP://files.example/", True),
        ("javascript:alert(1)", False),
        ("JaVaScRiPt:alert(1)", False),
        ("data:text/html,<script>", False),
        ("s3://bucket/key", False),
        ("/relative/path", False),
        ("https://", False),
        ("https://x.example/ a", False),
        ("https://x.example/\nb", False),
        ("http://[::1", False),
    ],
)
def test_only_absolute_http_urls_are_links(value: str, link: bool) -> None:
    assert (http_link(value) == value) is link


def test_flatten_result() -> None:
    rows = flatten_result(
        {
            "location": "s3://b/t/",
            "tracks": [{"url": "https://x.example/t.mp3", "size": 10**30}],
            "empty": {},
            "none": None,
        }
    )
    assert [(r.key, r.text, r.href) for r in rows] == [
        ("location", "s3://b/t/", None),
        ("tracks[0].url", "https://x.example/t.mp3", "https://x.example/t.mp3"),
        ("tracks[0].size", str(10**30), None),
        ("empty", "{}", None),
        ("none", "null", None),
    ]
    deep: object = "bottom"
    for _ in range(100):
        deep = {"k": deep}
    assert len(flatten_result(deep)) == 1
    many = flatten_result({"list": list(range(2000))})
    assert len(many) == 501
    assert many[-1].key == "…"


def test_chart_counts_into_hours() -> None:
    now = datetime(2026, 11, 30, 15, 20, tzinfo=UTC)
    starts = hour_buckets(now, 3)
    assert starts == [datetime(2026, 11, 30, h, tzinfo=UTC) for h in (13, 14, 15)]
    accepted = [now, now - timedelta(minutes=30), starts[0], starts[0] - timedelta(seconds=1)]
    chart = build_chart(starts, accepted, [now])
    assert [(b.accepted, b.failed) for b in chart.bars] == [(1, 0), (1, 0), (1, 1)]
    assert chart.top == 1
    assert build_chart(starts, [], []).top == 1  # never a division by zero


def test_templates_and_static_files_ship_in_the_package() -> None:
    package = resources.files("lacuna_webhooks.admin.console")
    for name in ("console.css", "tail.js"):
        assert (package / "static" / name).is_file()
    for name in ("base.html", "events.html", "event.html", "dead.html", "handlers.html"):
        assert (package / "templates" / name).is_file()
    script = (package / "static" / "tail.js").read_text()
    assert "innerHTML" not in script  # text only


def test_pretty_json_of_an_ordinary_payload_is_orjsons() -> None:
    raw = b'{"id":"evt_1","data":{"title":"\\u003cb\\u003e","n":[1,2.5,null,true]}}'
    text, cut = pretty_json(raw)
    assert not cut
    assert text == orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    # An integer past 64 bits is not rounded into a float: its digits stay as sent.
    big, _ = pretty_json(b'{"n": 12345678901234567890123}')
    assert big == '{\n  "n": 12345678901234567890123\n}'


def test_large_payloads_skip_the_pure_python_paths() -> None:
    """Past ``MAX_SLOW_BYTES`` a payload orjson cannot print is shown as received, and the
    standard library's parser is not tried (the console shares serve's interpreter)."""
    raw = b'{"n": 12345678901234567890123, "pad": "' + b"x" * MAX_SLOW_BYTES + b'"}'
    text, cut = pretty_json(raw)
    assert (text, cut) == (raw.decode(), False)
    assert parse_payload(b'{"a": 1e400, "pad": "' + b"x" * MAX_SLOW_BYTES + b'"}') is None


def test_shown_escapes_exactly_what_displays_as_nothing_or_reorders() -> None:
    """Every control (but tab and line feed), format, line- and paragraph-separator character
    of this Python's Unicode database is escaped, but the zero-width (non-)joiner; every other
    character is left as it is (one probe per category)."""
    keep = {"\t", "\n", "\u200c", "\u200d"}
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        category = unicodedata.category(char)
        escaped = category in ("Cc", "Cf", "Zl", "Zp") and char not in keep
        if escaped:
            assert shown(char).startswith("\\u"), hex(code)
        elif category != "Cs" and (code % 97 == 0 or char in keep):  # Cs: as_text's U+FFFD
            assert shown(char) == char, hex(code)
    for char in ("\u202e", "\u2066", "\u200b", "\ufeff", "\x1b", "\x85", "\u2028", "\U000e0041"):
        assert char not in shown(f"a{char}b")
        assert shown(f"a{char}b").startswith("a\\u")


def test_a_payload_shown_is_the_same_json() -> None:
    value = {"title": "Late \u202ethgiN\u200b", "tag": "\U000e0041", "esc": "\x1b[0m", "ok": "é 🎵"}
    text = shown(json.dumps(value, ensure_ascii=False))
    assert json.loads(text) == value
    assert "é 🎵" in text
