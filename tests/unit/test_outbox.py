"""The outbox's flows (``store/outbox.py``) as plain generators: which queries they ask for,
in what order, and what they make of the answers. The contract suite runs the same flows on
real SQLite and PostgreSQL (tests/integration/test_store_contract.py); these pin the steps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lacuna_webhooks.errors import EventNotFound
from lacuna_webhooks.store import outbox
from lacuna_webhooks.store.base import Recorded, Tally
from lacuna_webhooks.store.outbox import NUDGE, Nudge, Query
from lacuna_webhooks.store.rows import QueueRow

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)


def play(
    flow: Callable[..., outbox.Flow[Any]], answers: list[Any], *args: Any
) -> tuple[list[str], Any]:
    """Run a flow answering its queries from ``answers`` in order; the steps it took (query
    names, and "NUDGE") and its result."""
    steps: list[str] = []
    replies = iter(answers)
    gen = flow(*args)
    try:
        step = next(gen)
        while True:
            if isinstance(step, Nudge):
                steps.append("NUDGE")
                step = gen.send(None)
            else:
                assert isinstance(step, Query)
                steps.append(step.name)
                step = gen.send(next(replies))
    except StopIteration as stop:
        return steps, stop.value


def test_a_stale_finish_ends_a_revoked_lease_and_nudges_only_when_it_did() -> None:
    params = {"id": 7, "lease_token": 3}
    assert play(outbox.finish, [1], params) == (["finish"], Recorded(True))
    assert play(outbox.finish, [0, 1], params) == (
        ["finish", "end_revoked", "NUDGE"],
        Recorded(False),
    )
    assert play(outbox.finish, [0, 0], params) == (["finish", "end_revoked"], Recorded(False))


def test_a_success_resets_the_count_in_the_finish_statement() -> None:
    params = {"id": 7, "lease_token": 3}
    assert play(outbox.finish, [1], params, True) == (["finish_success"], Recorded(True))
    assert play(outbox.finish, [0, 0], params, True) == (
        ["finish_success", "end_revoked"],
        Recorded(False),
    )


def test_release_nudges_when_released() -> None:
    assert play(outbox.release, [1], 7, 3, NOW) == (["release", "NUDGE"], True)


PARAMS = {"id": 7, "lease_token": 3, "handler": "a", "finished_at": NOW}


def test_a_counted_failure_pauses_at_the_limit_once() -> None:
    row = {"consecutive_failures": 3, "paused": False}
    three, four = Tally.failure(pause_after=3, reason="r"), Tally.failure(pause_after=4, reason="r")
    assert play(outbox.finish_counted, [1, row, "a"], PARAMS, three) == (
        ["finish", "count_failure", "pause"],
        Recorded(True, paused=True),
    )
    assert play(outbox.finish_counted, [1, row], PARAMS, four) == (
        ["finish", "count_failure"],
        Recorded(True),
    )
    paused = {"consecutive_failures": 9, "paused": True}
    assert play(outbox.finish_counted, [1, paused], PARAMS, three) == (
        ["finish", "count_failure"],
        Recorded(True),
    )
    # Paused by someone else between the count and the pause: not "paused here".
    assert play(outbox.finish_counted, [1, row, None], PARAMS, three) == (
        ["finish", "count_failure", "pause"],
        Recorded(True),
    )


def test_a_stale_outcome_is_neither_counted_nor_paused() -> None:
    for tally in (Tally.failure(pause_after=1, reason="r"), Tally.pause("gone")):
        assert play(outbox.finish_counted, [0, 0], PARAMS, tally) == (
            ["finish", "end_revoked"],
            Recorded(False),
        )


def test_a_pause_tally_pauses_without_counting() -> None:
    assert play(outbox.finish_counted, [1, "a"], PARAMS, Tally.pause("gone")) == (
        ["finish", "pause"],
        Recorded(True, paused=True),
    )


def test_finish_call_keeps_the_one_statement_flow_for_the_hot_path() -> None:
    """No tally or a success: ``finish``, one statement (PostgreSQL: no BEGIN/COMMIT); a
    failure or a pause: ``finish_counted``, which PostgreSQL runs in one transaction."""
    assert outbox.finish_call(PARAMS, None) == (outbox.finish, (PARAMS, False))
    assert outbox.finish_call(PARAMS, Tally.success()) == (outbox.finish, (PARAMS, True))
    failure = Tally.failure(pause_after=None, reason="r")
    assert outbox.finish_call(PARAMS, failure) == (outbox.finish_counted, (PARAMS, failure))
    assert outbox.finish in outbox.AUTOCOMMIT
    assert outbox.finish_counted not in outbox.AUTOCOMMIT


def test_take_tokens_spends_whole_tokens_only() -> None:
    assert play(outbox.take_tokens, [2.7, 2], "a", 5, 10.0, 1.0, NOW) == (
        ["refill_tokens", "spend_tokens"],
        2,
    )
    assert play(outbox.take_tokens, [0.4], "a", 5, 10.0, 1.0, NOW) == (["refill_tokens"], 0)


def test_replay_of_an_unknown_event_raises_before_writing() -> None:
    with pytest.raises(EventNotFound):
        play(outbox.replay, [None], "evt_x", None, NOW)


def test_stats_sums_a_handler_given_in_parts() -> None:
    """SQLite gives a handler's pending and dead counts in two rows; PostgreSQL in one."""
    parts = [
        QueueRow("a", 3, 2, 1, 0, NOW - timedelta(seconds=30)),
        QueueRow("a", 0, 0, 0, 4, None),
    ]
    _, stats = play(outbox.stats, [parts], NOW, ((), ()))
    a = stats.by_handler["a"]
    assert (a.pending, a.due, a.running, a.dead) == (3, 2, 1, 4)
    assert a.oldest_due_age_seconds == 30.0


def test_nudge_is_one_value() -> None:
    assert repr(NUDGE) == "NUDGE"
