"""``ScanBudget`` (store/base.py): which searches run in windows, how windows grow, when a
scan stops. The windows themselves are checked on every backend by the store contract
suite (tests/integration/test_store_contract.py, "budgeted search")."""

from __future__ import annotations

from lacuna_webhooks.store.base import EventFilter, ScanBudget
from lacuna_webhooks.store.searchsql import windowed


def test_only_payload_searches_are_windowed() -> None:
    budget = ScanBudget()
    assert budget.windowed(EventFilter(q="x"))
    assert budget.windowed(EventFilter(match=(("data.a", "b"),), type="job.failed"))
    assert not budget.windowed(EventFilter())
    assert not budget.windowed(EventFilter(type="job.failed", status="done"))
    assert not budget.windowed(EventFilter(q="x", task_id="cm1"))  # a handful, by index
    # SQLite: a rare delivery state drives the search from its deliveries, never windowed.
    assert not windowed("sqlite", EventFilter(q="x", status="dead"), budget)
    assert windowed("postgres", EventFilter(q="x", status="dead"), budget)
    assert windowed("sqlite", EventFilter(q="x", status="done"), budget)
    # PostgreSQL: a NUL in a filter matches nothing, in one statement.
    assert not windowed("postgres", EventFilter(match=(("data.a", "b\x00"),)), budget)
    assert not windowed("sqlite", EventFilter(q="x"), None)


def test_windows_grow_at_most_fourfold_and_fit_what_is_left() -> None:
    budget = ScanBudget(seconds=1.0, first_window=1000, max_window=50_000)
    # Fast so far (1000 events in 1 ms): grows four times, no more.
    assert budget.next_window(1000, 1000, 0.001) == 4000
    assert budget.next_window(40_000, 100_000, 0.01) == 50_000  # capped at max_window
    # 100,000 events a second, 0.5 s left: half of it is 25,000 events.
    assert budget.next_window(100_000, 50_000, 0.5) == 25_000
    # Slow: never below one event, nor zero when nothing was measured.
    assert budget.next_window(10, 1, 0.99) == 1
    assert budget.next_window(10, 0, 0.0) == 40


def test_a_scan_stops_at_nine_tenths_of_its_budget() -> None:
    budget = ScanBudget(seconds=0.5)
    assert not budget.spent(0.4)
    assert budget.spent(0.46)
    assert budget.spent(0.6)
    assert ScanBudget(seconds=0).spent(0.0)  # one window a call
