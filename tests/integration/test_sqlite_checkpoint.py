"""The writer process's checkpoint thread (store/sqlite/checkpoint.py), on a real file.

The writer's commits must no longer copy the WAL into the database (that copy and its fsync
were the slow commit one time in forty under load); the thread must copy it instead, start
the WAL over so that it stays bounded, and hand the automatic checkpoint back if it fails.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lacuna_webhooks.store.sqlite import checkpoint
from lacuna_webhooks.store.sqlite.checkpoint import Checkpointer
from lacuna_webhooks.store.sqlite.operations import connect

PAGE = 4096
PROMPT = 10.0


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """The writer's connection, opened as the writer process opens it."""
    c = connect(str(tmp_path / "events.db"), "full")
    c.execute("CREATE TABLE pad (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    try:
        yield c
    finally:
        c.close()


def commit_pages(c: sqlite3.Connection, pages: int, *, lock: threading.Lock | None = None) -> None:
    """About ``pages`` WAL frames, one small transaction each (a row that fills a page)."""
    for _ in range(pages):
        if lock is None:
            c.execute("INSERT INTO pad (body) VALUES (zeroblob(3900))")
        else:
            with lock:
                c.execute("INSERT INTO pad (body) VALUES (zeroblob(3900))")


def wal_frames(c: sqlite3.Connection) -> int:
    """Frames in the WAL since it last started over (a passive checkpoint reports them)."""
    _, frames, _ = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames)


def wal_bytes(c: sqlite3.Connection) -> int:
    path = next(row[2] for row in c.execute("PRAGMA database_list") if row[1] == "main")
    return os.path.getsize(f"{path}-wal")


def test_commits_leave_the_wal_to_the_thread(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the thread idle, commits grow the WAL past SQLite's automatic threshold (1000
    pages: the commits no longer copy it); one round of the thread copies it and the next
    commit starts it over."""
    monkeypatch.setattr(checkpoint, "INTERVAL_SECONDS", 3600.0)  # the thread never gets round
    monkeypatch.setattr(checkpoint, "CATCH_UP_FRAMES", 1000)
    cp = Checkpointer(conn)
    try:
        commit_pages(conn, 1500)
        assert wal_bytes(conn) >= 1500 * PAGE  # SQLite's own checkpoint would restart at 1000
        frames, copied = cp.checkpoint()
        assert cp.holds == 1
        assert frames == copied >= 1500  # all of it in the database file
        commit_pages(conn, 1)
        with sqlite3.connect(conn.execute("PRAGMA database_list").fetchone()[2]) as peer:
            assert wal_frames(peer) <= 5  # the WAL started over
    finally:
        cp.close()


def test_the_wal_stays_bounded_while_the_thread_runs(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits under the writer's lock, as the writer process makes them: the thread starts
    the WAL over again and again, and the file never holds much more than the catch-up
    threshold (without the thread, with automatic checkpoints off, it would reach 6000
    pages)."""
    monkeypatch.setattr(checkpoint, "INTERVAL_SECONDS", 0.005)
    monkeypatch.setattr(checkpoint, "CATCH_UP_FRAMES", 500)
    cp = Checkpointer(conn)
    largest = 0
    try:
        for _ in range(60):
            commit_pages(conn, 100, lock=cp.commit_lock)
            cp.committed()
            largest = max(largest, wal_bytes(conn))
    finally:
        cp.close()
    assert cp.holds >= 2
    assert largest < 3000 * PAGE, largest
    assert conn.execute("SELECT count(*) FROM pad").fetchone()[0] == 6000


def test_a_failed_thread_hands_the_automatic_checkpoint_back(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the thread ends it with one logged error; the writer's next commit turns
    SQLite's automatic checkpoint back on, so the WAL cannot grow without bound."""
    monkeypatch.setattr(checkpoint, "INTERVAL_SECONDS", 0.0)

    def broken(self: Checkpointer) -> tuple[int, int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Checkpointer, "checkpoint", broken)
    caplog.set_level(logging.ERROR, logger=checkpoint.__name__)
    cp = Checkpointer(conn)
    try:
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        cp.committed()
        cp._thread.join(PROMPT)
        assert not cp._thread.is_alive()
        assert "store.sqlite.checkpointer_failed" in caplog.text
        cp.committed()  # the writer's thread, after its next commit
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        cp.close()


def test_a_failing_round_is_retried_without_waiting_for_a_commit(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An SQLite or OS error in a round (a full disk, an I/O error) is logged once and the
    round tried again after ``RETRY_SECONDS`` even if no commit comes (with a full disk the
    commits fail too, and the copy is what frees the WAL); the thread goes on, and its
    recovery is logged."""
    monkeypatch.setattr(checkpoint, "INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(checkpoint, "RETRY_SECONDS", 0.01)
    calls: list[int] = []
    real = Checkpointer.checkpoint

    def flaky(self: Checkpointer) -> tuple[int, int]:
        calls.append(1)
        if len(calls) <= 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self)

    monkeypatch.setattr(Checkpointer, "checkpoint", flaky)
    caplog.set_level(logging.INFO, logger=checkpoint.__name__)
    cp = Checkpointer(conn)
    try:
        commit_pages(conn, 10)
        cp.committed()  # one commit, then none
        _wait(lambda: cp.checkpoints >= 1)
        _wait(lambda: "store.sqlite.checkpoint_recovered" in caplog.text)
        assert len(calls) == 4
        assert caplog.text.count("store.sqlite.checkpoint_failed") == 1  # once per streak
        assert cp._thread.is_alive()
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    finally:
        cp.close()
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # close() gives it back


@pytest.mark.parametrize(
    ("frames", "held"),
    [(3000, False), (1200, True), (20000, True)],
    ids=["much-left", "little-left", "past-hard-frames"],
)
def test_the_writer_is_held_only_for_a_short_copy(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch, frames: int, held: bool
) -> None:
    """After the passive rounds, the writer is held for the rest only when little is left to
    copy (after a long reader ends, hundreds of MiB were copied under the hold: 200 ms of
    intake stalled), unless the WAL is past ``HARD_FRAMES``. The passive rounds' figures are
    given here; the rest is SQLite's."""
    monkeypatch.setattr(checkpoint, "INTERVAL_SECONDS", 3600.0)
    monkeypatch.setattr(checkpoint, "CATCH_UP_FRAMES", 1000)
    cp = Checkpointer(conn)
    monkeypatch.setattr(cp, "_passive", lambda: (frames, 1000))  # 1000 copied each round
    try:
        cp.checkpoint()
    finally:
        cp.close()
    assert cp.holds == int(held)


def _wait(condition: Callable[[], bool]) -> None:
    """Poll a condition set by the checkpoint thread; fail after ``PROMPT`` seconds."""
    for _ in range(int(PROMPT / 0.005)):
        if condition():
            return
        threading.Event().wait(0.005)
    raise AssertionError("the checkpoint thread did not get there in time")
