"""What a PromQL expression reads: its metric names, and the labels it matches or groups on.

Enough of PromQL for the expressions of ``deploy/prometheus/alerts.yaml`` and
``deploy/grafana/lacuna-webhooks.json`` (tests/e2e/test_observability.py checks each name
against a real ``/metrics``): selectors ``name{label=~"..."}``, range ``[5m]``, functions,
aggregations with ``by``/``without``, vector matching ``on``/``ignoring``, Grafana's
``$variables``. Not a full parser: an expression it cannot read raises ``ValueError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_SELECTOR = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}')
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_NUMBER_WORDS = frozenset({"inf", "nan"})
KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "atan2",
    }
)


@dataclass
class Reads:
    """The metric names (as written) an expression selects, and every label it names."""

    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    # metric name -> the labels matched in its selectors
    matched: dict[str, set[str]] = field(default_factory=dict)
    # metric name -> the (label, value) pairs its selectors require exactly (``label="value"``)
    equal: dict[str, set[tuple[str, str]]] = field(default_factory=dict)


def reads(expr: str) -> Reads:
    """The metric names and labels of ``expr``; ``ValueError`` when it cannot be read."""
    found = Reads()
    # Selectors first, on the text as written: a matcher's value may hold any character.
    for selector in _SELECTOR.finditer(expr):
        name = selector.group(1)
        labels = set()
        for matcher in _MATCHER.finditer(selector.group(2)):
            label, op, value = matcher.groups()
            labels.add(label)
            if name and op == "=" and "$" not in value:
                found.equal.setdefault(name, set()).add((label, value))
        if _MATCHER.sub("", selector.group(2)).strip(" ,"):
            raise ValueError(f"cannot read the matchers {selector.group(2)!r} in {expr!r}")
        found.labels |= labels
        if name and name.lower() not in KEYWORDS:
            found.matched.setdefault(name, set()).update(labels)
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    for grouping in _GROUPING.finditer(text):
        found.labels |= {label.strip() for label in grouping.group(2).split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)
    for ident in _IDENT.finditer(text):
        name, call = ident.group(1), ident.group(2)
        if call or name.lower() in KEYWORDS or name.lower() in _NUMBER_WORDS:
            continue  # a function or aggregation, an operator word, a number
        if re.fullmatch(r"[0-9.e+-]+", name):
            continue
        found.metrics.add(name)
    leftover = re.sub(r"[\w$.:\s()+\-*/%^<>=!,\"]", "", text)
    if leftover:
        raise ValueError(f"cannot read {leftover!r} in {expr!r}")
    return found


__all__ = ["KEYWORDS", "Reads", "reads"]
