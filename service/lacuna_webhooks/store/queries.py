"""Named queries: ``store/sql/<dialect>/queries.sql``, one file per SQL dialect.

A file is a list of blocks, each headed by a line ``-- name: <name>``; the block's text up
to the next header is the statement (comments included). Both dialects define the queries
in ``SHARED`` under the same names with the same result columns, and ``rows.py`` maps them
to records by column name, so a column added to deliveries touches the schema, the queries
and the record, not each backend's code. Each dialect adds the statements of its own
mechanics (SQLite's group-commit trigger, PostgreSQL's locks and NOTIFY).
"""

from __future__ import annotations

import functools
import re
from importlib import resources

#: Queries every SQL dialect defines, with the same result columns.
SHARED = frozenset(
    {
        "claim",
        "release",
        "replay_all",
        "retry_dead",
        "stats",
        "list_events",
        "get_event",
        "list_deliveries",
        "list_attempts",
        "get_task",
        "write_probe",
        "pause",
        "resume",
        "handler_states",
        "paused_handlers",
        "count_failure",
        "count_success",
        "refill_tokens",
        "spend_tokens",
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


@functools.cache
def load(dialect: str) -> dict[str, str]:
    """The named queries of ``dialect`` (``sqlite`` or ``postgres``), read once."""
    path = resources.files("lacuna_webhooks.store").joinpath("sql", dialect, "queries.sql")
    return parse(path.read_text(encoding="utf-8"))


__all__ = ["SHARED", "load", "parse"]
