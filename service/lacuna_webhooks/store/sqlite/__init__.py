"""The SQLite backend: ``SQLiteStore`` (``store.py``), the statements its writer runs
(``operations.py`` over ``store/sql/sqlite/queries.sql``), and the writer, a thread
(``writer.py``) or a child process (``process.py``) that group-commits accepts."""

from .operations import connect, migrate, migrations
from .store import SQLiteStore, WriterStats

__all__ = ["SQLiteStore", "WriterStats", "connect", "migrate", "migrations"]
