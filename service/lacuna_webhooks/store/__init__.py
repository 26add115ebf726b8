"""Event stores. ``open_store(url)`` picks the backend from the URL scheme."""

from __future__ import annotations

from ..errors import ConfigError
from .base import (
    AttemptRecord,
    DeliveryRecord,
    EventRecord,
    HandlerState,
    QueueStats,
    ReplayCounts,
    Store,
    TaskRecord,
)


def open_store(
    url: str, *, sqlite_synchronous: str = "full", sqlite_process: bool = False
) -> Store:
    """Build (not yet open) the store for ``url``: ``sqlite:///PATH`` or ``postgresql://...``.

    The driver of each backend is imported only when that backend is chosen. With
    ``sqlite_process`` a SQLite store keeps its connection in a writer process of its own
    (what ``serve`` does) rather than in a thread.
    """
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        return SQLiteStore(
            url.removeprefix("sqlite:///"), synchronous=sqlite_synchronous, process=sqlite_process
        )
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres import PostgresStore
        except ImportError:
            raise ConfigError(
                "LACUNA_DATABASE_URL names PostgreSQL but its driver is not installed: "
                "pip install 'lacuna-webhooks[postgres]'"
            ) from None
        return PostgresStore(url)
    raise ValueError(f"unsupported database URL: {url.split(':', 1)[0]}://...")


__all__ = [
    "AttemptRecord",
    "DeliveryRecord",
    "EventRecord",
    "HandlerState",
    "QueueStats",
    "ReplayCounts",
    "Store",
    "TaskRecord",
    "open_store",
]
