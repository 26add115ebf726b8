"""WAL checkpoints beside the SQLite writer process's commits, not inside them.

With SQLite's automatic checkpoint, the commit that takes the WAL past 1000 pages also copies
the WAL into the database file and fsyncs it before it returns: under load every tenth or so
group commit took 8 ms instead of 1.7 ms (docs/performance.md, 2026-12-01 "the tail"), and
every request in it or queued behind it waited for that. The writer process therefore turns
the automatic checkpoint off on its connection and runs this thread, with a connection of its
own to the same file:

- after commits, at most every ``INTERVAL_SECONDS``, a ``PASSIVE`` checkpoint copies what the
  WAL holds into the database while the writer goes on committing (SQLite allows one
  checkpoint beside one writer; the thread's SQLite calls release the GIL);
- when the WAL then held ``CATCH_UP_FRAMES`` frames or more, the few frames committed
  meanwhile are copied with the writer held between two requests (``commit_lock``): the WAL
  is then fully copied, and SQLite starts it over from its beginning at the next commit
  instead of growing it;
- past ``HARD_FRAMES`` (a reader holding an old snapshot kept the WAL from starting over) that
  held checkpoint is a ``RESTART``, which waits for readers up to the busy timeout.

So the WAL stays about the size of what the writer commits in one interval plus one passive
checkpoint's duration, and never passes ``HARD_FRAMES`` pages by more than that (the
``journal_size_limit`` then truncates the file at the next restart). A checkpoint never
affects durability: commits are durable in the WAL; the checkpoint only copies them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

logger = logging.getLogger(__name__)

#: Checkpoints start at most this often (after a commit). At 10,000 events/s of 1.5 KB that is
#: about 2,000 WAL pages (8 MiB) per checkpoint.
INTERVAL_SECONDS = 0.05
#: A checkpoint that found at least this many frames (4 MiB of 4 KiB pages: SQLite's own
#: automatic checkpoint threshold) is followed by the short held one that lets the WAL restart.
CATCH_UP_FRAMES = 1000
#: Passive rounds repeat (each copies what was committed during the one before) until one
#: copied at most ``HELD_FRAMES`` frames, at most ``CATCH_UP_ROUNDS`` times; the held round then
#: has about that many frames left to copy (256 KiB: 2 ms at p50 under the bench's load).
CATCH_UP_ROUNDS = 8
HELD_FRAMES = 64
#: Past this many frames (64 MiB of 4 KiB pages) the held checkpoint waits for readers.
HARD_FRAMES = 16384
#: How long that ``RESTART`` waits for readers (the writer is held meanwhile): admin searches
#: end their read transactions within their 0.5 s budget.
BUSY_TIMEOUT_MS = 1000


class Checkpointer:
    """Checkpoints the database of ``conn`` (a file in WAL mode) from a thread of its own.

    ``commit_lock`` must be held around every write of the writer's connection;
    ``committed()`` is called after each. ``conn``'s automatic checkpoint is turned off
    here; ``close()`` ends the thread and its connection (idempotent).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        path = next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main")
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        self.commit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self.checkpoints = 0  # for tests and diagnostics
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A write was committed: a checkpoint is due within ``INTERVAL_SECONDS``."""
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping:
                return
            time.sleep(INTERVAL_SECONDS)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self.checkpoint()
            except sqlite3.Error as exc:
                # The writer's own commits are not affected; the next commit retries.
                logger.warning("store.sqlite.checkpoint_failed: %s", exc)

    def checkpoint(self) -> tuple[int, int]:
        """One round: (WAL frames found, frames copied by the last checkpoint)."""
        _, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        if frames >= CATCH_UP_FRAMES:
            for _ in range(CATCH_UP_ROUNDS):
                _, _, now_copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if now_copied - copied <= HELD_FRAMES:
                    break
                copied = now_copied
            mode = "RESTART" if frames >= HARD_FRAMES else "PASSIVE"
            with self.commit_lock:
                _, frames, copied = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return frames, copied
