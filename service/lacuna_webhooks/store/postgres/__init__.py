"""The PostgreSQL backend: ``PostgresStore`` (``store.py``) over the named queries of
``store/sql/postgres/queries.sql``; asyncpg is imported here only."""

from .store import DEFAULT_CHANNEL, MIGRATE_LOCK_KEY, PRUNE_LOCK_KEY, PostgresStore

__all__ = ["DEFAULT_CHANNEL", "MIGRATE_LOCK_KEY", "PRUNE_LOCK_KEY", "PostgresStore"]
