"""Dispatch-side store throughput: N claim + complete cycles, no handler in between.

``python bench/claim_cycle.py [--events N] [--batch B] [--backend sqlite|postgres]
[--synchronous full|normal] [--process] [--dsn DSN]``
accepts N events for one handler, then claims them B at a time and completes each, and
prints one line: ``<backend> cycles/s <figure>``. Run it with ``PYTHONPATH`` set to another
checkout's ``service`` folder to measure that checkout's store (the store/outbox.py change
was measured so, old and new alternating in one session: see CHANGELOG.md).
PostgreSQL: a scratch database (``--scratch``, made afresh through DSN's) holds the run.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from lacuna_webhooks.models import Attempt, AttemptOutcome, Event
from lacuna_webhooks.store import Store
from lacuna_webhooks.store.postgres import PostgresStore
from lacuna_webhooks.store.sqlite import SQLiteStore

LEASE = timedelta(seconds=60)


async def cycles(store: Store, events: int, batch: int) -> float:
    now = datetime.now(UTC)
    for i in range(events):
        body = orjson.dumps({"id": f"evt_{i}", "type": "job.completed", "data": {"n": i}})
        await store.accept(Event.from_body(body), ["a"], now=now)
    started = time.perf_counter()
    done = 0
    while done < events:
        claimed = await store.claim(handler="a", limit=batch, lease=LEASE, now=now)
        for delivery in claimed:
            at = datetime.now(UTC)
            ok = Attempt(outcome=AttemptOutcome.OK, started_at=at, finished_at=at)
            assert await store.complete(delivery, ok)
        done += len(claimed)
    return events / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--process", action="store_true", help="SQLite: the writer process")
    parser.add_argument("--scratch", default="lacuna_claim_cycle", help="database to (re)make")
    args = parser.parse_args()
    store: Store
    if args.backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="lacuna-cycle-")
        store = SQLiteStore(
            str(Path(folder) / "cycle.db"), synchronous=args.synchronous, process=args.process
        )
    else:
        import asyncpg

        conn = await asyncpg.connect(args.dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{args.scratch}"')
        await conn.execute(f'CREATE DATABASE "{args.scratch}"')
        await conn.close()
        store = PostgresStore(args.dsn.rsplit("/", 1)[0] + "/" + args.scratch)
    await store.open()
    try:
        rate = await cycles(store, args.events, args.batch)
    finally:
        await store.close()
    print(f"{args.backend} cycles/s {rate:.0f}")


if __name__ == "__main__":
    asyncio.run(main())
