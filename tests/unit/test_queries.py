"""Named queries (``store/queries.py``): every SQL dialect defines the shared ones."""

from __future__ import annotations

import inspect
import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pytest

from lacuna_webhooks.models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from lacuna_webhooks.store import outbox
from lacuna_webhooks.store.base import Tally
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
        # an array slice's bounds are no parameters; a parameter as a bound still is
        ("SELECT arr[lo:hi], arr[:a:hi]", "SELECT arr[lo:hi], arr[$1:hi]", ("a",)),
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


def _names_by_query(dialect: str) -> dict[str, set[str]]:
    """Per query of ``dialect``, the ``:name`` parameters its text uses."""
    text = resources.files("lacuna_webhooks.store").joinpath("sql", dialect, "queries.sql")
    found = parse(text.read_text(encoding="utf-8"))
    return {name: set(compile_named(sql)[1]) for name, sql in found.items()}


class _Row(dict[str, Any]):
    """A result row answering 0 for any column it was not given."""

    def __missing__(self, key: str) -> int:
        return 0


def _answer(query: outbox.Query, found: bool) -> Any:
    """A plausible result of ``query``: ``found`` steers the flow into its other branch."""
    if query.shape == "rowcount":
        return 1 if found else 0
    if query.shape == "value":
        return 5 if found else 0  # 0, not None: refill_tokens always answers
    if query.shape == "row":
        return _Row(paused=False, consecutive_failures=99)
    return [_Row(id="evt")] if found and query.row is None else []


_AT = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
_FINISH = outbox.finish_params(
    DeliveryStatus.PENDING,
    Delivery(
        id=1,
        event=Event.from_body(b'{"id": "evt_1", "type": "job.completed", "data": {}}'),
        handler="a",
        status=DeliveryStatus.PENDING,
        attempts=1,
        lease_token=1,
        next_attempt_at=_AT,
        created_at=_AT,
    ),
    Attempt(_AT, _AT, AttemptOutcome.RETRY, "boom"),
    next_attempt_at=_AT,
)
#: Each flow with arguments that reach its queries (both branches are driven below).
_FLOWS: list[tuple[Any, tuple[Any, ...]]] = [
    (outbox.claim, ("a", 1, timedelta(seconds=1), _AT, ["b"])),
    (outbox.finish, (_FINISH,)),
    (outbox.finish, (_FINISH, True)),
    (outbox.finish_counted, (_FINISH, Tally.failure(pause_after=1, reason="failing"))),
    (outbox.finish_counted, (_FINISH, Tally.pause("gone"))),
    (outbox.release, (1, 1, _AT)),
    (outbox.set_paused, ("a", True, "paused", _AT)),
    (outbox.set_paused, ("a", False, None, _AT)),
    (outbox.take_tokens, ("a", 3, 5.0, 1.0, _AT)),
    (outbox.give_back_tokens, ("a", 1, 5.0)),
    (outbox.replay, ("evt", None, _AT)),
    (outbox.replay, ("evt", ["a"], _AT)),
    (outbox.replay_many, (["evt"], None, True, True, _AT)),
    (outbox.replay_many, (["evt"], ["a"], True, True, _AT)),
    (outbox.retry_dead, (None, _AT)),
    (outbox.prune_chunk, (_AT, None, 10)),
    (outbox.prune_chunk, (_AT, timedelta(days=1), 10)),
    (outbox.stats, (_AT, (("b",), ("a",)))),
    (outbox.handler_activity, (_AT, _AT)),
    (outbox.list_events, (None, 5)),
    (outbox.get_event, ("evt",)),
    (outbox.list_deliveries, (None, None, None, 5, None)),
    (outbox.list_attempts, (1,)),
    (outbox.get_task, ("task",)),
    (outbox.handler_states, (True,)),
    (outbox.handler_states, (False,)),
]


def test_every_query_a_flow_runs_gets_every_parameter_it_names() -> None:
    """Each query a flow yields carries every ``:name`` its text uses, in both dialects: a
    missing one would be a KeyError on PostgreSQL and, on SQLite, a binding error reported
    as "store unavailable" (only when that path runs). ``accept`` is PostgreSQL's alone."""
    dialects = {dialect: _names_by_query(dialect) for dialect in ("sqlite", "postgres")}
    missing, ran = [], set()
    for flow, args in _FLOWS:
        for found in (True, False):
            steps = flow(*args)
            try:
                step = next(steps)
                while True:
                    if isinstance(step, outbox.Query):
                        ran.add(step.name)
                        for dialect, names in dialects.items():
                            if lacking := names[step.name] - set(step.params):
                                missing.append((flow.__name__, step.name, dialect, lacking))
                        step = steps.send(_answer(step, found))
                    else:
                        step = steps.send(None)
            except StopIteration:
                pass
    assert missing == []
    assert ran >= SHARED - {
        "write_probe",
        "stream_after",
        "stream_head",
        "search_events",
        "event_bodies",
    }
