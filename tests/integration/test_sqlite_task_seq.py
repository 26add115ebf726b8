"""SQLite finds a task's events through the task's row (migration 0009, ``events.task_seq``).

The index on ``(task_id, received_at)`` cost a random page write per accept; it is replaced
by one on ``(task_seq, received_at)``, where ``task_seq`` is the rowid of the task's row.
These tests hold the search by task to what it was: every event of the task, newest first,
superseded and duplicate deliveries included, events stored before the migration too.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from lacuna_webhooks.store import open_store
from lacuna_webhooks.store.base import EventFilter
from tests.integration.test_store_contract import NOW, SECOND, event


async def task_ids(store: object, task_id: str) -> list[str]:
    page = await store.search_events(EventFilter(task_id=task_id))  # type: ignore[attr-defined]
    return [record.id for record in page.records]


async def test_search_by_task_finds_every_event_of_the_task(tmp_path: Path) -> None:
    """New, newer, older (superseded) and duplicate events of two tasks, interleaved: the
    search by task returns each task's stored events, newest first, and nothing else."""
    store = open_store(f"sqlite:///{tmp_path / 'events.db'}")
    await store.open()
    try:
        accepts = [
            ("evt_a1", "cm_task_a", 100),
            ("evt_b1", "cm_task_b", 100),
            ("evt_a2", "cm_task_a", 200),
            ("evt_a0", "cm_task_a", 50),  # older than the task's state: superseded
            ("evt_a2", "cm_task_a", 200),  # a duplicate
        ]
        for i, (event_id, task, created) in enumerate(accepts):
            await store.accept(
                event(event_id, task_id=task, created=created), [], now=NOW + i * SECOND
            )
        assert await task_ids(store, "cm_task_a") == ["evt_a0", "evt_a2", "evt_a1"]
        assert await task_ids(store, "cm_task_b") == ["evt_b1"]
        assert await task_ids(store, "cm_no_such_task") == []
        state = await store.get_task("cm_task_a")
        assert state is not None
        assert state.event_id == "evt_a2"  # the superseded event did not move the task back
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "events.db") as conn:
        rows = conn.execute(
            "SELECT e.id, e.task_seq = t.rowid, e.superseded FROM events AS e"
            " JOIN tasks AS t USING (task_id) ORDER BY e.id"
        ).fetchall()
    assert rows == [
        ("evt_a0", 1, 1),
        ("evt_a1", 1, 0),
        ("evt_a2", 1, 0),
        ("evt_b1", 1, 0),
    ]


async def test_the_search_by_task_reads_the_task_seq_index(tmp_path: Path) -> None:
    """The statement walks ``events_task_seq``, not the events table."""
    from lacuna_webhooks.store import searchsql
    from lacuna_webhooks.store.sqlite import operations as ops

    conn = ops.connect(str(tmp_path / "events.db"), "normal")
    try:
        sql, params = searchsql.search_sql(
            "sqlite", EventFilter(task_id="cm_x"), cursor=None, limit=50, now=NOW
        )
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    finally:
        conn.close()
    assert "USING INDEX events_task_seq" in plan
    assert "SCAN e" not in plan


async def test_migration_numbers_the_events_stored_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file at version 8 with events and tasks: after 0009 the search by task finds the old
    events and the new ones together."""
    from lacuna_webhooks.store.sqlite import operations as ops

    path = tmp_path / "events.db"
    everything = ops.migrations()
    monkeypatch.setattr(ops, "migrations", lambda: [m for m in everything if m[0] <= 8])
    conn = sqlite3.connect(path)
    ops.migrate(conn)
    for seq, (event_id, task) in enumerate(
        [("evt_old_1", "cm_old"), ("evt_other", "cm_other"), ("evt_old_2", "cm_old")], 1
    ):
        conn.execute(
            "INSERT INTO events (id, type, received_at, task_id, raw, stream_seq)"
            " VALUES (?, 'job.completed', ?, ?, X'7B7D', ?)",
            (event_id, (NOW + seq * SECOND).timestamp(), task, seq),
        )
        conn.execute(
            "INSERT INTO tasks (task_id, status, event_id, event_type, event_order, updated_at)"
            " VALUES (?, 'ready', ?, 'job.completed', 0, 0)"
            " ON CONFLICT (task_id) DO UPDATE SET event_id = excluded.event_id",
            (task, event_id),
        )
    conn.execute("UPDATE stream_counter SET last = 3")
    conn.commit()
    conn.close()
    monkeypatch.setattr(ops, "migrations", lambda: everything)
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        later = NOW + timedelta(minutes=1)
        await store.accept(event("evt_new", task_id="cm_old", created=10**9), [], now=later)
        assert await task_ids(store, "cm_old") == ["evt_new", "evt_old_2", "evt_old_1"]
        assert await task_ids(store, "cm_other") == ["evt_other"]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "events_task_received" not in indexes
    assert "events_task_seq" in indexes
