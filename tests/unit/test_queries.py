"""Named queries (``store/queries.py``): every SQL dialect defines the shared ones."""

from __future__ import annotations

import inspect
import re

import pytest

from lacuna_webhooks.store import outbox
from lacuna_webhooks.store.queries import SHARED, compile_named, load, parameters, parse


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


def test_compile_named_numbers_each_name_once_and_leaves_casts_and_literals() -> None:
    """``:name`` becomes ``$n`` (one number per distinct name, by first use); ``::type`` casts,
    string literals, quoted identifiers and comments keep their colons."""
    sql = (
        "SELECT :a::text, ':b', \"x:y\", now() + :lease::interval, arr[1:2] -- :c\n"
        "/* :z */ FROM t WHERE a = :a AND b = :b"
    )
    compiled, names = compile_named(sql)
    assert compiled == (
        "SELECT $1::text, ':b', \"x:y\", now() + $2::interval, arr[1:2] -- :c\n"
        "/* :z */ FROM t WHERE a = $1 AND b = $3"
    )
    assert names == ("a", "lease", "b")


@pytest.mark.parametrize(
    ("sql", "compiled", "names"),
    [
        # an escape string: \' is a quote inside it, not its end
        ("SELECT E'it\\'s :x', :y", "SELECT E'it\\'s :x', $1", ("y",)),
        ("SELECT e'\\\\', :y, ':z'", "SELECT e'\\\\', $1, ':z'", ("y",)),
        # dollar-quoted strings, with and without a tag
        ("SELECT $$ :x ' $$, :y", "SELECT $$ :x ' $$, $1", ("y",)),
        ("SELECT $fn$ a:b $$ $fn$, :y", "SELECT $fn$ a:b $$ $fn$, $1", ("y",)),
        # block comments nest
        ("SELECT 1 /* a /* :n */ :m */ + :y", "SELECT 1 /* a /* :n */ :m */ + $1", ("y",)),
        # an identifier ending in e (or holding $) is no string prefix
        (
            "SELECT type, name||':x' FROM t WHERE a$b = :y",
            "SELECT type, name||':x' FROM t WHERE a$b = $1",
            ("y",),
        ),
        # a cast right after a parameter, a name used twice, a name a prefix of another
        (
            "SELECT :after::text[], :id, :ids, :id::int",
            "SELECT $1::text[], $2, $3, $2::int",
            ("after", "id", "ids"),
        ),
    ],
)
def test_compile_named_reads_literals_and_comments_as_postgresql_does(
    sql: str, compiled: str, names: tuple[str, ...]
) -> None:
    """What PostgreSQL's lexer takes for a string or a comment keeps its ``:name`` text; a
    real parameter after one is still numbered."""
    assert compile_named(sql) == (compiled, names)


def test_compile_named_refuses_an_unterminated_comment() -> None:
    with pytest.raises(ValueError, match="unterminated"):
        compile_named("SELECT :a /* /* */ :b")


def test_every_postgres_query_is_compiled() -> None:
    """No ``:name`` is left in PostgreSQL's compiled queries, and each query's names match
    its highest ``$n``."""
    texts, names = load("postgres"), parameters("postgres")
    for name, sql in texts.items():
        assert compile_named(sql)[1] == (), name
        numbers = [int(n) for n in re.findall(r"\$(\d+)", sql)]
        assert max(numbers, default=0) == len(names[name]), name


def test_every_query_a_flow_names_is_shared() -> None:
    """The flows (``outbox.py``) name only queries that both dialects define."""
    source = inspect.getsource(outbox)
    named = set(re.findall(r'Query\(\s*"([a-z_]+)"', source))
    assert named, "no Query found in outbox.py"
    assert named - {"accept_event", "upsert_task", "mark_superseded", "insert_deliveries"} <= (
        SHARED
    )
