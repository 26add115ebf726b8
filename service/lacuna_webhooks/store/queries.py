"""Named queries: ``store/sql/<dialect>/queries.sql``, one file per SQL dialect.

A file is a list of blocks, each headed by a line ``-- name: <name>``; the block's text up
to the next header is the statement (comments included). Both dialects define the queries
in ``SHARED`` under the same names with the same result columns, and ``rows.py`` maps them
to records by column name, so a column added to deliveries touches the schema, the queries
and the record, not each backend's code. Each dialect adds the statements of its own
mechanics (SQLite's group-commit trigger, PostgreSQL's locks and NOTIFY).

Parameters are named (``:name``) in both dialects, so one flow (``outbox.py``) passes one
dict of values to either. SQLite takes them as they are; for PostgreSQL, whose driver takes
positional ``$1..``, ``load("postgres")`` compiles each ``:name`` into ``$n`` once
(``compile_named``) and ``parameters("postgres")`` gives each query's names in ``$n`` order.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

#: Queries every SQL dialect defines, with the same result columns.
SHARED = frozenset(
    {
        # the outbox's flows (outbox.py)
        "claim",
        "finish",
        "finish_success",
        "end_revoked",
        "release",
        "lock_event",
        "replay_all",
        "replay_handlers",
        "lock_events",
        "replay_many_all",
        "replay_many_reset",
        "replay_many_create",
        "lock_dead_events",
        "retry_dead",
        "prune_lock",
        "prune_candidates",
        "prune_delete",
        "stats",
        "list_events",
        "get_event",
        "list_deliveries",
        "list_attempts",
        "get_task",
        "pause",
        "resume",
        "handler_states",
        "paused_handlers",
        "count_failure",
        "refill_tokens",
        "spend_tokens",
        "handler_queue",
        "handler_attempts",
        "handler_last_errors",
        # the backends' own code
        "write_probe",
        "stream_after",
        "stream_head",
        "search_events",
        "event_bodies",
    }
)

_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """The named blocks of a queries file; ``ValueError`` on a name defined twice."""
    parts = _HEADER.split(text)
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"query {name!r} is defined twice")
        found[name] = body.strip()
    return found


# What ``compile_named`` steps over whole, as PostgreSQL's lexer reads it: string literals
# (``E'...'`` with backslash escapes, ``$tag$...$tag$``), quoted identifiers, line comments,
# the ``::type`` cast; ``/*`` starts a comment, which nests; else a ``:name`` parameter, unless
# right after a name (``arr[lo:hi]``, an array slice).
_TOKEN = re.compile(
    r"(?P<skip>(?<![A-Za-z0-9_$])[Ee]'(?:[^'\\]|\\.|'')*'"
    r"|'(?:[^']|'')*'"
    r"|\"(?:[^\"]|\"\")*\""
    r"|(?<![A-Za-z0-9_$])\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$"
    r"|--[^\n]*|::)"
    r"|(?P<comment>/\*)"
    r"|(?<![A-Za-z0-9_]):(?P<name>[A-Za-z_][A-Za-z0-9_]*)",
    re.DOTALL,
)
_COMMENT_MARK = re.compile(r"/\*|\*/")


def _comment_end(sql: str, start: int) -> int:
    """Where the block comment opened at ``start`` ends (PostgreSQL nests them); ``ValueError``
    when it never does."""
    depth, position = 0, start
    while match := _COMMENT_MARK.search(sql, position):
        depth += 1 if match.group() == "/*" else -1
        position = match.end()
        if depth == 0:
            return position
    raise ValueError(f"unterminated /* comment at offset {start}")


def compile_named(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with each ``:name`` replaced by ``$n`` (one number per distinct name, in order
    of first use) and the names in that order. ``::type`` casts, string literals (``'...'``,
    ``E'...'``, ``$$...$$``), quoted identifiers and comments (nested ones too) are left
    alone. ``ValueError`` for an unterminated block comment."""
    names: dict[str, int] = {}
    out: list[str] = []
    position = 0
    while match := _TOKEN.search(sql, position):
        out.append(sql[position : match.start()])
        name = match.group("name")
        if match.group("comment") is not None:
            position = _comment_end(sql, match.start())
            out.append(sql[match.start() : position])
            continue
        if name is None:
            out.append(match.group(0))
        else:
            out.append(f"${names.setdefault(name, len(names) + 1)}")
        position = match.end()
    out.append(sql[position:])
    return "".join(out), tuple(names)


@functools.cache
def _compiled(dialect: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    path = resources.files("lacuna_webhooks.store").joinpath("sql", dialect, "queries.sql")
    found = parse(path.read_text(encoding="utf-8"))
    if dialect != "postgres":
        return found, {}
    texts: dict[str, str] = {}
    names: dict[str, tuple[str, ...]] = {}
    for name, sql in found.items():
        texts[name], names[name] = compile_named(sql)
    return texts, names


def load(dialect: str) -> dict[str, str]:
    """The named queries of ``dialect`` (``sqlite`` or ``postgres``), read once; PostgreSQL's
    with their ``:name`` parameters compiled into ``$n``."""
    return _compiled(dialect)[0]


def parameters(dialect: str) -> dict[str, tuple[str, ...]]:
    """Per query, the parameter names in ``$n`` order (PostgreSQL; empty for SQLite, which
    takes ``:name`` itself)."""
    return _compiled(dialect)[1]


__all__ = ["SHARED", "compile_named", "load", "parameters", "parse"]
