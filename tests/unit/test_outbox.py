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
    assert play(outbox.finish, [1], params) == (["finish"], True)
    assert play(outbox.finish, [0, 1], params) == (["finish", "end_revoked", "NUDGE"], False)
    assert play(outbox.finish, [0, 0], params) == (["finish", "end_revoked"], False)


def test_release_nudges_when_released() -> None:
    assert play(outbox.release, [1], 7, 3, NOW) == (["release", "NUDGE"], True)


def test_count_failure_pauses_at_the_limit_once() -> None:
    row = {"consecutive_failures": 3, "paused": False}
    assert play(outbox.count_failure, [row, "a"], "a", 3, "r", NOW) == (
        ["count_failure", "pause"],
        True,
    )
    assert play(outbox.count_failure, [row], "a", 4, "r", NOW) == (["count_failure"], False)
    paused = {"consecutive_failures": 9, "paused": True}
    assert play(outbox.count_failure, [paused], "a", 3, "r", NOW) == (["count_failure"], False)


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
