"""WAL checkpoints beside the SQLite writer process's commits, not inside them.

With SQLite's automatic checkpoint, the commit that takes the WAL past 1000 pages also copies
the WAL into the database file and fsyncs it before it returns. Under ``make bench``'s load
that is one group commit in about forty, and it took 8-16 ms instead of about 1: every
request in it, and the hundred or more queued behind it, waited for the copy
(docs/performance.md, "2026-12-01 (afternoon)"). The writer process therefore turns the
automatic checkpoint off on its connection and runs this thread, with a connection of its
own to the same file:

- after commits, at most every ``INTERVAL_SECONDS``, a ``PASSIVE`` checkpoint copies what the
  WAL holds into the database while the writer goes on committing (SQLite allows one
  checkpoint beside one writer, https://sqlite.org/wal.html#concurrency; this thread's
  SQLite calls release the GIL), and the copied pages are fsynced by this thread too, while
  the writer commits;
- once the WAL holds ``CATCH_UP_FRAMES`` frames, passive rounds repeat until the writer has
  committed at most ``HELD_FRAMES`` frames during one; those few (at most
  ``MAX_HELD_FRAMES``, else the hold waits for a later round) are then copied with the
  writer held between two requests (``commit_lock``). The WAL is then wholly in the
  database, and SQLite starts it over from its beginning at the next commit instead of
  growing it (https://sqlite.org/wal.html#avoiding_excessively_large_wal_files);
- past ``HARD_FRAMES`` (a reader holding an old snapshot kept the WAL from starting over)
  that held checkpoint is a ``RESTART``, which waits up to ``BUSY_TIMEOUT_MS`` for readers
  to finish the read they are in. A reader still there then (a backup, an operator's
  ``sqlite3`` shell) is not waited for again at every round, which would hold the writer
  most of the time: the next ``RESTART`` waits until the WAL has doubled, and the threshold
  is ``HARD_FRAMES`` again once a round finds the WAL below it (it started over).

A checkpoint never changes durability: a commit is durable in the WAL when it returns; a
checkpoint only copies committed pages, and SQLite recovers a checkpoint cut by a crash
(tests/integration/test_sqlite_store.py kills a writer mid-checkpoint). A round that fails
on the file (an I/O error) is logged once and tried again every ``RETRY_SECONDS``, commits or
not, until one succeeds. If the thread itself fails (a bug), it logs why and the writer's
connection gets its automatic checkpoint back, so the WAL never grows without bound.

A full disk is a state of its own (``full``), entered when a commit or a round fails with
SQLite's "database or disk is full" (``disk_full``): the copy into the database file needs
room to grow it, and commits that went on meanwhile took every page freed into the WAL first
(a burst of queued batches and retried outcomes within the second the retry waited), so the
disk was full again and the store never recovered, until the filesystem grew. While ``full``
the writer refuses every write at once (the process answers it unavailable: a 503 for
intake, a retry later for the dispatcher), and this thread tries a ``TRUNCATE`` checkpoint
every ``FULL_RETRY_SECONDS``; once one copied the whole WAL, its file is cut to nothing (its
space goes back to the disk) and writes resume.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading

logger = logging.getLogger(__name__)

#: Checkpoints start at most this often (after a commit): at 16,000 events/s of 1.5 KB, about
#: 1,700 WAL pages (7 MiB) a round.
INTERVAL_SECONDS = 0.05
#: A WAL of at least this many frames (4 MiB of 4 KiB pages, SQLite's own automatic checkpoint
#: threshold: a full disk finds no larger backlog than SQLite's default would leave) is caught
#: up and then started over. 4096 and 12000 measured the same request p99 (docs/performance.md).
CATCH_UP_FRAMES = 1000
#: Passive rounds repeat (each copies what was committed during the one before) until one
#: left at most ``HELD_FRAMES`` frames uncopied, at most ``CATCH_UP_ROUNDS`` times; the held
#: round then has about that many frames to copy and fsync (256 KiB).
CATCH_UP_ROUNDS = 8
HELD_FRAMES = 64
#: The held round is skipped while more than this is left to copy (2 MiB: about 10 ms held;
#: after a long reader ends, hundreds of MiB), and the next round catches up further; unless
#: the WAL is past ``HARD_FRAMES``, when bounding it comes first.
MAX_HELD_FRAMES = 512
#: Past this many frames (64 MiB of 4 KiB pages) the held checkpoint waits for readers.
HARD_FRAMES = 16384
#: How long that ``RESTART`` waits for readers, the writer held meanwhile: short, because
#: intake waits with it. A reader still busy then (an admin search runs up to its 0.5 s
#: budget) ends the round without the restart; the next catch-up tries again.
BUSY_TIMEOUT_MS = 200
#: The automatic checkpoint the writer's connection gets back if this thread fails (SQLite's
#: default, in pages).
FALLBACK_AUTOCHECKPOINT = 1000
#: After a round failed (a full disk, an I/O error), the next one comes this much later even
#: without a commit: commits may be failing for the same reason, and the copy is what frees
#: the WAL once space is back.
RETRY_SECONDS = 1.0
#: While the disk is full (``full``: writes are refused), the checkpoint that ends it is tried
#: this often: writes resume this long at most after space is back.
FULL_RETRY_SECONDS = 0.2
#: SQLite's primary result code for a full disk (or a database at its ``max_page_count``).
SQLITE_FULL = 13


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk or the database is full."""
    while exc is not None:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if (code is not None and code & 0xFF == SQLITE_FULL) or "disk is full" in str(exc):
                return True
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__
    return False


class Checkpointer:
    """Checkpoints the database of ``conn`` (a file in WAL mode) from a thread of its own.

    ``commit_lock`` must be held around every write of the writer's connection, and
    ``committed()`` called after each. ``conn``'s automatic checkpoint is off while this
    runs; ``close()`` ends the thread, closes its connection and gives ``conn`` its
    automatic checkpoint back (idempotent). The writer calls ``disk_full()`` when a write
    failed on a full disk, and refuses writes while ``full`` is true. Raises
    ``sqlite3.Error`` or ``OSError`` if the file cannot be opened a second time.

    ``close()`` also closes this object's own descriptor of the file (for its fsync), and
    closing any descriptor of a file drops every POSIX lock the process holds on it: the
    SHARED lock of ``conn`` too, which keeps other processes from taking the file out of WAL
    mode or deleting its WAL. A writer that is done should therefore close ``conn`` first
    (the last connection, this one, then checkpoints the WAL into the file as it closes).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        path = next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main")
        self._writer = conn
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Read-only is enough to fsync on POSIX: the pages a passive round copied reach the
            # disk here, beside the commits, and the held round only syncs the last few.
            self._db_fd = os.open(path, os.O_RDONLY)
        except BaseException:
            self._conn.close()
            raise
        self.commit_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False  # the last round failed: logged once, and once when it recovers
        self._synced = 0  # ``copied`` as of the last fsync (SQLite counts since the restart)
        self._failed = False
        #: The disk is full: the writer refuses writes until a checkpoint freed the WAL.
        self.full = False
        self.checkpoints = 0  # passive rounds, for tests and diagnostics
        self.holds = 0  # held rounds after which the WAL starts over
        self._restart_frames = HARD_FRAMES  # a held round from this many frames is a RESTART
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A write was committed: a checkpoint is due within ``INTERVAL_SECONDS``. Called by
        the writer's thread, outside ``commit_lock``."""
        if self._failed:
            self._failed = False
            self._fall_back()
        self._wake.set()

    def disk_full(self) -> None:
        """A write failed on a full disk: ``full`` until a checkpoint has copied and cut the
        WAL (writer's thread, outside ``commit_lock``)."""
        if not self.full:
            self.full = True
            logger.error("store.sqlite.disk_full: writes refused until a checkpoint frees the WAL")
        self._wake.set()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._conn.close()
        os.close(self._db_fd)
        with contextlib.suppress(sqlite3.Error):
            self._fall_back()

    def _fall_back(self) -> None:
        """The writer's connection checkpoints by itself again (writer's thread only)."""
        self._writer.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_AUTOCHECKPOINT}")

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.wait(INTERVAL_SECONDS):
                return
            self._wake.clear()
            try:
                self.checkpoint()
            except (sqlite3.Error, OSError) as exc:
                # A full disk, an I/O error: committed events are safe in the WAL. Logged
                # once per streak; tried again after RETRY_SECONDS, commits or not, or
                # FULL_RETRY_SECONDS on a full disk (no commit eats the space meanwhile).
                if is_disk_full(exc) and not self.full:
                    self.full = True
                    logger.error("store.sqlite.disk_full: writes refused until a checkpoint")
                if not self._failing:
                    self._failing = True
                    logger.warning("store.sqlite.checkpoint_failed: %s (retrying)", exc)
                if self._stop.wait(FULL_RETRY_SECONDS if self.full else RETRY_SECONDS):
                    return
                self._wake.set()
                continue
            except Exception:
                logger.exception("store.sqlite.checkpointer_failed: automatic checkpoints back on")
                self._failed = True  # the writer's thread turns them back on (its connection)
                return
            if self._failing:
                self._failing = False
                logger.info("store.sqlite.checkpoint_recovered")

    def _passive(self) -> tuple[int, int]:
        """One passive round and the fsync of what it copied: (WAL frames, frames copied)."""
        _, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        if copied < self._synced:  # the WAL started over since
            self._synced = 0
        if copied > self._synced:
            os.fsync(self._db_fd)
            self._synced = copied
        return frames, copied

    def checkpoint(self) -> tuple[int, int]:
        """Passive rounds, then the held one when the WAL is large enough to start over:
        (WAL frames, frames copied) of the last round. The WAL's frame count is that of the
        WAL since it last started over (``-1`` from SQLite when the file is not in WAL
        mode). While ``full``, one ``TRUNCATE`` instead (``_free``)."""
        if self.full:
            return self._free()
        frames, copied = self._passive()
        if frames < HARD_FRAMES:
            self._restart_frames = HARD_FRAMES
        if frames < CATCH_UP_FRAMES:
            return frames, copied
        for _ in range(CATCH_UP_ROUNDS):
            if frames - copied <= HELD_FRAMES:
                break
            frames, copied = self._passive()
        if frames - copied > MAX_HELD_FRAMES and frames < HARD_FRAMES:
            return frames, copied  # too much left to hold the writer for: the next round
        mode = "RESTART" if frames >= self._restart_frames else "PASSIVE"
        with self.commit_lock:
            busy, frames, copied = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        if mode == "RESTART" and busy:  # a reader outlasted the wait: not again before
            self._restart_frames = 2 * max(frames, self._restart_frames)
        self.holds += 1
        return frames, copied

    def _free(self) -> tuple[int, int]:
        """On a full disk: copy the whole WAL into the database and cut the WAL's file to
        nothing, the writer held (it refuses writes anyway). ``full`` ends once the WAL is
        wholly copied; a reader that kept it from being cut only delays the space it gives
        back (the WAL then starts over at its beginning, taking no new space)."""
        with self.commit_lock:
            busy, frames, copied = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        self.checkpoints += 1
        self._synced = 0
        if not busy or frames == copied:
            self.full = False
            logger.warning("store.sqlite.disk_full_recovered: writes resume")
        return frames, copied
