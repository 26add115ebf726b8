"""Named queries (``store/queries.py``): every SQL dialect defines the shared ones."""

from __future__ import annotations

import pytest

from lacuna_webhooks.store.queries import SHARED, load, parse


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_each_dialect_defines_every_shared_query(dialect: str) -> None:
    """The shared names (mapped to records by column name in ``rows.py``) exist in both
    dialects, each a non-empty statement."""
    queries = load(dialect)
    assert not SHARED - set(queries), SHARED - set(queries)
    assert all(queries[name] for name in SHARED)


def test_parse_splits_named_blocks_and_refuses_a_name_twice() -> None:
    """Blocks run from their ``-- name:`` header to the next; a repeated name is an error."""
    text = "-- file header\n-- name: one\nSELECT 1\n\n-- name: two\n-- about two\nSELECT 2\n"
    assert parse(text) == {"one": "SELECT 1", "two": "-- about two\nSELECT 2"}
    with pytest.raises(ValueError, match="twice"):
        parse("-- name: one\nSELECT 1\n-- name: one\nSELECT 2\n")
