"""What ``lacuna-webhooks send`` does, apart from parsing its arguments (that is ``cli.py``).

- ``--set PATH=VALUE`` edits the event before signing: ``PATH`` is keys joined by
  ``.`` with ``[N]`` list indexes (``data.tracks[0].duration``); ``VALUE`` is
  JSON when it parses as JSON (``61.5``, ``true``, ``null``, ``"quoted"``,
  ``{"a": 1}``), else the text itself. Missing objects and lists on the way are
  created; an index may point at an existing item or one past the end (append).
- ``--count N --concurrency C``: N signed POSTs, at most C in flight, each
  signed when sent (fresh ``t``) and, unless the id is fixed, with a fresh event id;
  ``Summary`` gives status counts and latency percentiles.

Every refusal is a ``SendError``: one line for the user, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import orjson

from .models import json_default
from .signature import HEADER, sign

# One path step: `.key` (or a leading key) or `[N]`. Keys hold anything but `.[]=`.
_STEP = re.compile(r"(?:^|\.)([^.\[\]=]+)|\[([0-9]+)\]")  # ASCII digits: \d takes any script's
MAX_INDEX = 10_000  # a typo like [100000000] must not build a huge list


class SendError(Exception):
    """A ``send`` option cannot be used as given; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """One ``--set``: the path's steps (keys and indexes) and the value to put there."""

    text: str
    steps: tuple[str | int, ...]
    value: Any


def parse_assignment(text: str) -> Assignment:
    """``PATH=VALUE`` as an ``Assignment``; ``SendError`` for a bad path."""
    path, sep, raw = text.partition("=")
    if not sep:
        raise SendError(f"--set {text!r}: expected PATH=VALUE, e.g. data.title=Rainy Day")
    return Assignment(text, parse_path(path, text), parse_value(raw))


def parse_path(path: str, text: str | None = None) -> tuple[str | int, ...]:
    """``data.tracks[0].duration`` -> ``("data", "tracks", 0, "duration")``."""
    where = f"--set {text or path!r}"
    steps: list[str | int] = []
    position = 0
    while position < len(path):
        match = _STEP.match(path, position)
        if match is None or match.end() == position or (position == 0 and match.group(2)):
            raise SendError(
                f"{where}: bad path at {path[position:]!r} (keys joined by '.', "
                "list indexes as [N], e.g. data.tracks[0].duration)"
            )
        key, index = match.group(1), match.group(2)
        if key is not None:
            if key != key.strip() or not key:
                raise SendError(f"{where}: the key {key!r} has spaces around it")
            steps.append(key)
        else:
            # Compared as text first: int() refuses more than 4300 digits with a ValueError
            # (a traceback, `--set 'a[<5000 digits>]=1'`), and such an index is past the bound.
            significant = index.lstrip("0")
            number = int(significant or "0") if len(significant) <= len(str(MAX_INDEX)) else None
            if number is None or number > MAX_INDEX:
                shown = index if len(index) <= 20 else index[:20] + "…"
                raise SendError(f"{where}: index [{shown}] is larger than {MAX_INDEX}")
            steps.append(number)
        position = match.end()
    if not steps:
        raise SendError(f"{where}: the path is empty")
    return tuple(steps)


def _exact_int(text: str) -> int | Decimal:
    # orjson writes integers of 64 bits at most: a longer one is kept as a Decimal, exact.
    return int(text) if len(text) <= 18 else Decimal(text)


def parse_exact(raw: bytes | str) -> Any:
    """JSON text with every number kept as written, to edit and send again: integers of up
    to 18 characters as ``int``, every other number as a ``decimal.Decimal`` (``1e400``,
    ``1.50``, an integer of 40 digits), which ``dumps`` writes back with the same digits
    (``1e400`` as ``1E+400``). The
    receiver reads any number RFC 8259 allows (``models.parse_json``), so a body it would
    take must not be refused, rounded or rewritten here. Raises ``ValueError`` for text
    that is not JSON (``NaN`` and ``Infinity`` included) or bytes that are not UTF-8."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_int=_exact_int, parse_float=Decimal, parse_constant=_not_json)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not UTF-8 JSON text: {exc}") from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def dumps(doc: Any) -> bytes:
    """``doc`` as compact JSON bytes, the numbers of ``parse_exact`` as they were written.
    Raises ``TypeError`` for a value JSON cannot hold."""
    return orjson.dumps(doc, default=json_default)


def parse_value(raw: str) -> Any:
    """JSON when ``raw`` parses as JSON (numbers exact, ``parse_exact``), else ``raw``
    itself (a string)."""
    try:
        return parse_exact(raw)
    except ValueError:
        return raw


def _label(steps: Sequence[str | int]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text or "the event"


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, Decimal):
        return "a number"
    return f"a {type(value).__name__.replace('str', 'string').replace('bool', 'boolean')}"


def apply(doc: dict[str, Any], assignment: Assignment) -> None:
    """Put ``assignment.value`` at its path in ``doc``, creating what is missing on the way."""
    where = f"--set {assignment.text!r}"
    current: Any = doc
    steps = assignment.steps
    for depth, step in enumerate(steps):
        last = depth == len(steps) - 1
        here = _label(steps[:depth])
        if isinstance(step, str):
            if not isinstance(current, dict):
                raise SendError(f"{where}: {here} is {_kind(current)}, not an object")
            if last:
                current[step] = assignment.value
                return
            child = current.get(step)
            if child is None:
                child = [] if isinstance(steps[depth + 1], int) else {}
                current[step] = child
            current = child
        else:
            if not isinstance(current, list):
                raise SendError(f"{where}: {here} is {_kind(current)}, not a list")
            if step > len(current):
                raise SendError(
                    f"{where}: {here} has {len(current)} item(s); [{step}] is past its end "
                    f"(use [{len(current)}] to append)"
                )
            if step == len(current):
                current.append(None)
            if last:
                current[step] = assignment.value
                return
            if current[step] is None:
                current[step] = [] if isinstance(steps[depth + 1], int) else {}
            current = current[step]


@dataclass(frozen=True, slots=True)
class Signed:
    """One request ready to POST, and what it was signed with."""

    body: bytes
    header: str
    timestamp: int
    event_id: str | None
    event_type: str | None


def sign_body(body: bytes, secret: str, timestamp: int | None = None) -> Signed:
    """Sign ``body`` now (or at ``timestamp``); read its id and type back for the report."""
    t = int(time.time()) if timestamp is None else timestamp
    try:
        doc = parse_exact(body)
    except ValueError:
        doc = None
    event_id = doc.get("id") if isinstance(doc, dict) else None
    event_type = doc.get("type") if isinstance(doc, dict) else None
    return Signed(
        body,
        sign(body, secret, t),
        t,
        event_id if isinstance(event_id, str) else None,
        event_type if isinstance(event_type, str) else None,
    )


@dataclass(slots=True)
class Summary:
    """What a ``--count`` run saw: statuses (``error: <kind>`` for no answer) and latencies."""

    statuses: Counter[str] = field(default_factory=Counter)
    latencies_seconds: list[float] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    first_timestamp: int | None = None
    last_timestamp: int | None = None

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    @property
    def all_succeeded(self) -> bool:
        return all(s.isdigit() and s.startswith("2") for s in self.statuses)

    def percentile_ms(self, fraction: float) -> float:
        """Nearest-rank percentile of the answered requests' latencies, in milliseconds."""
        ordered = sorted(self.latencies_seconds)
        if not ordered:
            return math.nan
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1] * 1000

    def lines(self, url: str, concurrency: int) -> list[str]:
        rate = self.count / self.elapsed_seconds if self.elapsed_seconds > 0 else math.inf
        statuses = ", ".join(
            f"{status} x{n}"
            for status, n in sorted(self.statuses.items(), key=lambda item: (-item[1], item[0]))
        )
        lines = [
            f"sent {self.count} events to {url} in {self.elapsed_seconds:.2f} s "
            f"({rate:.1f}/s, concurrency {concurrency})",
            f"status: {statuses}",
        ]
        if self.latencies_seconds:
            lines.append(
                "latency ms: "
                + "  ".join(
                    f"{name} {self.percentile_ms(q):.1f}"
                    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
                )
            )
        return lines


async def run_load(
    url: str,
    make_body: Callable[[int], bytes],
    secret: str,
    *,
    count: int,
    concurrency: int,
    timeout_seconds: float,
) -> Summary:
    """POST ``count`` signed bodies (``make_body(i)``), at most ``concurrency`` at once."""
    summary = Summary()
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(limits=limits, timeout=timeout_seconds) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                signed = sign_body(make_body(index), secret)
                if summary.first_timestamp is None:
                    summary.first_timestamp = signed.timestamp
                summary.last_timestamp = signed.timestamp
                started = time.perf_counter()
                try:
                    response = await client.post(
                        url,
                        content=signed.body,
                        headers={HEADER: signed.header, "content-type": "application/json"},
                    )
                except httpx.HTTPError as exc:
                    summary.statuses[f"error: {type(exc).__name__}"] += 1
                    continue
                summary.latencies_seconds.append(time.perf_counter() - started)
                summary.statuses[str(response.status_code)] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
        summary.elapsed_seconds = time.perf_counter() - started
    return summary
