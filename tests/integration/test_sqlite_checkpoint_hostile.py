"""The writer process's checkpoint thread under hostile conditions, on real files and with
real peer processes (store/sqlite/checkpoint.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lacuna_webhooks.store.sqlite import checkpoint
from lacuna_webhooks.store.sqlite.checkpoint import Checkpointer
from lacuna_webhooks.store.sqlite.operations import connect

PROMPT = 10.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    """The writer's connection, opened as the writer process opens it."""
    c = connect(str(db), "full")
    c.execute("CREATE TABLE pad (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    try:
        yield c
    finally:
        c.close()


def commit_pages(c: sqlite3.Connection, pages: int, lock: threading.Lock) -> None:
    """About ``pages`` WAL frames in one transaction, under the writer's lock."""
    with lock:
        c.execute("BEGIN")
        for _ in range(pages):
            c.execute("INSERT INTO pad (body) VALUES (zeroblob(3900))")
        c.execute("COMMIT")


@contextmanager
def snapshot_held(db: Path) -> Iterator[None]:
    """Another process with a read transaction open on the file (an operator's ``sqlite3``
    shell, a backup, a long admin read): it pins its snapshot until the block ends."""
    script = textwrap.dedent(
        """
        import sqlite3, sys
        r = sqlite3.connect(sys.argv[1], isolation_level=None)
        r.execute("BEGIN")
        r.execute("SELECT count(*) FROM pad").fetchone()
        print("reading", flush=True)
        sys.stdin.read()
        r.execute("COMMIT")
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "reading\n"
            yield
            proc.communicate("", PROMPT)  # the read ends
            assert proc.returncode == 0
        finally:
            proc.kill()


def test_a_reader_pinning_the_wal_does_not_hold_the_writer_at_every_round(
    db: Path, conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``HARD_FRAMES`` the held round is a RESTART, which holds the writer (and intake
    with it) while it waits up to ``BUSY_TIMEOUT_MS`` for readers. A reader that keeps an old
    snapshot for longer cannot be waited out: the RESTART is not tried again at every round
    (which held intake about four fifths of the time) but only once the WAL has doubled; it
    starts from ``HARD_FRAMES`` again once the WAL has started over."""
    monkeypatch.setattr(checkpoint, "INTERVAL_SECONDS", 3600.0)  # rounds run here, one by one
    monkeypatch.setattr(checkpoint, "CATCH_UP_FRAMES", 100)
    monkeypatch.setattr(checkpoint, "HARD_FRAMES", 400)
    monkeypatch.setattr(checkpoint, "BUSY_TIMEOUT_MS", 10)
    cp = Checkpointer(conn)
    held: list[str] = []
    cp._conn.set_trace_callback(lambda sql: held.append(sql) if "RESTART" in sql else None)
    try:
        with snapshot_held(db):
            for _ in range(36):  # from about 100 to about 3700 frames: over three doublings
                commit_pages(conn, 100, cp.commit_lock)
                cp.checkpoint()
            assert 1 <= len(held) <= 4, len(held)  # at 400, 800, 1600, 3200 (it was 33)
        commit_pages(conn, 100, cp.commit_lock)
        cp.checkpoint()  # catches up; the WAL starts over at the next commit
        commit_pages(conn, 100, cp.commit_lock)
        frames, _ = cp.checkpoint()
        assert 0 < frames <= 200, frames
        held.clear()
        with snapshot_held(db):
            for _ in range(5):
                commit_pages(conn, 100, cp.commit_lock)
                cp.checkpoint()
        assert len(held) == 1, held  # from HARD_FRAMES again
    finally:
        cp.close()


_CHILD_SHUTDOWN = """
import pickle, socket, subprocess, sys, threading
from lacuna_webhooks.child import read_frame_blocking
from lacuna_webhooks.store.sqlite import process
from lacuna_webhooks.store.sqlite.operations import connect

path = sys.argv[1]
PEER = (
    "import sqlite3, sys\\n"
    "c = sqlite3.connect(sys.argv[1], timeout=0)\\n"
    "print(c.execute('PRAGMA journal_mode = DELETE').fetchone()[0])\\n"
)
seen = []


def probe(sql):
    # The writer's connection runs this while it is still open, after the checkpointer
    # closed its file descriptor: can another process take the file out of WAL mode now?
    if "wal_autocheckpoint = 1000" in sql:
        peer = subprocess.run([sys.executable, "-c", PEER, path], capture_output=True, text=True)
        seen.append(peer.stdout.strip() or "locked")


def open_traced(p):
    c = connect(p, "full")
    c.set_trace_callback(probe)
    return c


ours, theirs = socket.socketpair()


def parent():
    ours.sendall(process._frame(("hello", open_traced, (path,), None, None, None)))
    stream = ours.makefile("rb")
    assert pickle.loads(read_frame_blocking(stream, 1 << 20))[0] == "ok"
    ours.shutdown(socket.SHUT_WR)  # the end of serve: the child sees EOF and closes
    stream.read()
    stream.close()
    ours.close()


thread = threading.Thread(target=parent)
thread.start()
code = process.child_main(theirs.detach())
thread.join()
print(code, ",".join(seen))
"""


def test_the_writer_process_closes_without_dropping_the_files_lock(db: Path) -> None:
    """The checkpointer has a file descriptor of its own on the database (for its fsync);
    closing any descriptor of a file drops every POSIX lock the process holds on it, the
    writer connection's SHARED lock included. The writer process closed that descriptor
    before the writer's connection: in between, another process could take the file out of
    WAL mode (or, closing, think itself the last user and delete the WAL) under a live
    connection. Run for real: ``child_main`` serving a parent over a socket pair, probed
    from a peer process at the writer connection's last statement."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD_SHUTDOWN, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    code, _, seen = done.stdout.strip().partition(" ")
    assert code == "0"
    assert "delete" not in seen.split(","), seen  # the peer never got the file
    with sqlite3.connect(db) as peer:
        assert peer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert peer.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    peer.close()
    assert not Path(f"{db}-wal").exists()  # the last connection folded the WAL in
