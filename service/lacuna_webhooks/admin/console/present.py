"""Pure helpers that turn stored values into what the console's templates show.

Everything here treats an event's bytes as hostile: a payload may hold NUL escapes, lone
surrogates, numbers no float holds (``1e400``, 5000-digit integers), nesting thousands deep
or megabytes of text. Nothing here raises on such input; the templates escape the text.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson

from ...redact import json_escape

#: Payloads larger than this are shown cut, with a note (a page stays usable).
MAX_PRETTY_CHARS = 2_000_000
#: The slow paths (re-indenting token by token, the standard library's parser) are pure
#: Python: payloads larger than this skip them (shown as received; no title), so a console
#: page never keeps the interpreter busy for long beside the webhook route.
MAX_SLOW_BYTES = 128 * 1024
#: Indentation stops growing past this depth (deep nesting must not make output quadratic).
MAX_INDENT_DEPTH = 32
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"?|[{}\[\],:]|\s+|[^\s{}\[\],:"]+', re.DOTALL)


def as_text(value: str) -> str:
    """``value`` with what HTML cannot carry replaced: NUL and lone surrogates become U+FFFD."""
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _hidden_class() -> re.Pattern[str]:
    """The characters ``shown`` writes as escapes: control characters but tab and line feed
    (Cc), and those that display as nothing or reorder the text that follows them (Cf: the
    bidirectional overrides and isolates of "Trojan Source", CVE-2021-42574, zero-width
    spaces, the BOM, tag characters; Zl, Zp), from this Python's Unicode database. Only
    planes 0, 1 and 14 hold such characters (planes 2 and 3 are ideographs, 15 and 16 private
    use; tests/unit/test_console_present.py checks all of them): 40 ms at import instead of
    0.3 s. The zero-width joiner and non-joiner stay: scripts and emoji need them, and they
    reorder nothing."""
    keep = {"\t", "\n", "\u200c", "\u200d"}
    ranges: list[list[int]] = []
    for code in itertools.chain(*(range(plane << 16, (plane + 1) << 16) for plane in (0, 1, 14))):
        char = chr(code)
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") and char not in keep:
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return re.compile(
        "[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges) + "]"
    )


_HIDDEN = _hidden_class()


def _escape(match: re.Match[str]) -> str:
    return json_escape(match.group())  # JSON's form, so that a payload stays the same JSON


def shown(value: str) -> str:
    """``as_text(value)`` as the console displays it: each character of ``_HIDDEN`` written
    as its JSON escape (``\\u202e``), so that nothing in a payload, a title or an error can
    display as nothing, disguise one value as another, or reverse the text after it. A
    payload stays the same JSON. Form values keep ``as_text``: they must post back exactly."""
    return as_text(_HIDDEN.sub(_escape, value))  # NUL too: "\\u0000", as JSON writes it


def pretty_json(raw: bytes) -> tuple[str, bool]:
    """``(text, cut)``: the payload indented two spaces a level. What orjson parses is
    written back by orjson (fast: a megabyte in milliseconds); anything else (numbers past
    64 bits or ``1e400``, lone surrogates, nesting past orjson's limits) is re-indented
    token by token, each token kept exactly as received (past ``MAX_SLOW_BYTES``, the text is
    shown as received), so no payload fails. ``cut`` is
    true when the text was longer than ``MAX_PRETTY_CHARS`` and shortened."""
    if _LONG_DIGITS.search(raw):  # orjson would turn an integer past 64 bits into a float
        return _reindent(raw)
    try:
        text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return _reindent(raw)
    cut = len(text) > MAX_PRETTY_CHARS
    return (text[:MAX_PRETTY_CHARS] if cut else text), cut


def _reindent(raw: bytes) -> tuple[str, bool]:
    """``pretty_json`` without parsing: whitespace between tokens replaced by indentation
    (larger than ``MAX_SLOW_BYTES``: the text as received)."""
    text = as_text(raw.decode("utf-8", "replace"))
    cut = len(text) > MAX_PRETTY_CHARS
    if cut:
        text = text[:MAX_PRETTY_CHARS]
    if len(raw) > MAX_SLOW_BYTES:
        return text, cut
    out: list[str] = []
    depth = 0

    def newline() -> None:
        out.append("\n" + "  " * min(depth, MAX_INDENT_DEPTH))

    tokens = [m.group(0) for m in _TOKEN_RE.finditer(text)]
    tokens = [t for t in tokens if not t.isspace()]
    for i, tok in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("{", "["):
            out.append(tok)
            if following in ("}", "]"):
                continue
            depth += 1
            newline()
        elif tok in ("}", "]"):
            previous = tokens[i - 1] if i else ""
            if previous not in ("{", "["):
                depth = max(0, depth - 1)
                newline()
            out.append(tok)
        elif tok == ",":
            out.append(",")
            newline()
        elif tok == ":":
            out.append(": ")
        else:
            out.append(tok)
    return "".join(out), cut


def parse_payload(raw: bytes) -> Any:
    """The payload as Python values, or ``None`` when no JSON parser here can hold it (or
    only the standard library's could, and it is larger than ``MAX_SLOW_BYTES``)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    if len(raw) > MAX_SLOW_BYTES:
        return None
    try:  # lone surrogates, 1e400, 5000-digit integers: what orjson refuses
        return json.loads(raw.decode("utf-8", "replace"), parse_int=_big_int)
    except (ValueError, RecursionError):
        return None


def _big_int(text: str) -> int | str:
    """An integer, or its digits as text past what ``int()`` converts (4300 digits)."""
    try:
        return int(text)
    except ValueError:
        return text


def payload_title(payload: Any) -> str | None:
    """``data.title`` when it is a string (shortened to 200 characters), else ``None``."""
    if isinstance(payload, dict):
        data = payload.get("data")
        if isinstance(data, dict) and isinstance(data.get("title"), str):
            title: str = data["title"]
            return as_text(title[:200] + ("…" if len(title) > 200 else ""))
    return None


def http_link(value: str) -> str | None:
    """``value`` when it is an absolute ``http``/``https`` URL (the only kind the console
    makes into a link), else ``None``."""
    if len(value) > 4000 or any(c.isspace() or ord(c) < 32 for c in value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if parts.scheme.lower() in ("http", "https") and parts.netloc:
        return value
    return None


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One leaf of a handler's result: its path (``tracks[0].url``), its text, and the
    URL to link to when the text is an http(s) URL."""

    key: str
    text: str
    href: str | None


def flatten_result(value: Any, *, max_rows: int = 500, max_depth: int = 20) -> list[ResultRow]:
    """The leaves of a result object as rows, in order; deeper or longer parts are summed
    up in one row each rather than dropped silently."""
    rows: list[ResultRow] = []

    def walk(item: Any, key: str, depth: int) -> None:
        if len(rows) >= max_rows:
            return
        if depth > max_depth and isinstance(item, dict | list):
            rows.append(ResultRow(key, as_text(orjson.dumps(item).decode()[:2000]), None))
            return
        if isinstance(item, dict):
            if not item:
                rows.append(ResultRow(key, "{}", None))
            for name, child in item.items():
                walk(child, f"{key}.{name}" if key else str(name), depth + 1)
        elif isinstance(item, list):
            if not item:
                rows.append(ResultRow(key, "[]", None))
            for index, child in enumerate(item):
                walk(child, f"{key}[{index}]", depth + 1)
        elif isinstance(item, str):
            rows.append(ResultRow(key, as_text(item), http_link(item)))
        else:
            rows.append(ResultRow(key, as_text(json.dumps(item)), None))

    walk(value, "", 0)
    if len(rows) >= max_rows:
        rows.append(ResultRow("…", f"more than {max_rows} values; see GET /api/v1/events", None))
    return rows


@dataclass(frozen=True, slots=True)
class Bar:
    """One hour of the activity chart."""

    start: datetime
    accepted: int
    failed: int


@dataclass(frozen=True, slots=True)
class Chart:
    """The activity chart's hours (oldest first) and its scale."""

    bars: list[Bar]
    top: int  # the y axis' maximum (at least 1)
    capped: bool  # some series hit the counting cap: its figures are lower bounds


def hour_buckets(now: datetime, hours: int) -> list[datetime]:
    """The starts of the last ``hours`` whole hours, oldest first, the current one last."""
    current = now.replace(minute=0, second=0, microsecond=0)
    return [current - timedelta(hours=hours - 1 - i) for i in range(hours)]


def build_chart(
    starts: Sequence[datetime],
    accepted: Sequence[datetime],
    failed: Sequence[datetime],
    *,
    capped: bool = False,
) -> Chart:
    """Count ``accepted`` and ``failed`` received times into the hours that begin at
    ``starts`` (times outside them are ignored)."""

    def counts(times: Sequence[datetime]) -> list[int]:
        found = [0] * len(starts)
        for when in times:
            for i in range(len(starts) - 1, -1, -1):
                if when >= starts[i]:
                    if when < starts[i] + timedelta(hours=1):
                        found[i] += 1
                    break
        return found

    a, f = counts(accepted), counts(failed)
    bars = [Bar(start, a[i], f[i]) for i, start in enumerate(starts)]
    return Chart(bars, max([1, *a, *f]), capped)


__all__ = [
    "MAX_PRETTY_CHARS",
    "Bar",
    "Chart",
    "ResultRow",
    "as_text",
    "build_chart",
    "flatten_result",
    "hour_buckets",
    "http_link",
    "parse_payload",
    "payload_title",
    "pretty_json",
    "shown",
]
