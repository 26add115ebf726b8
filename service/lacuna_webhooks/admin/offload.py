"""Work on large stored bodies in a helper process, off the intake's interpreter.

Parsing or encoding a stored body (``orjson``, the console's re-indenting) holds the GIL
for its whole length, and the admin listener shares ``serve``'s process with the webhook
route: one admin read of a 16 MB event held intake for about half a second, and a worker
thread did not help (the GIL again). ``run(size, fn, *args)`` runs ``fn(*args)`` here when
the bodies it works on total less than ``INLINE_BYTES`` (the hand-over would cost more than
the work), else in one helper process: ``serve`` then only copies the bytes there and back.

The helper is started at first need, with ``spawn`` (a fresh interpreter: nothing of this
process's threads or sockets), ignores SIGINT and SIGTERM as ``serve``'s other children do
(a terminal's Ctrl-C reaches the whole group; ``serve`` ends it), and exits with its parent.
One whose process died is replaced at the next call; the call that met the loss runs its
work here instead. ``fn`` and its arguments must pickle (module-level functions, plain
values and records).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")

#: Bodies totalling less than this are worked on here (parsing 64 KiB takes about 0.1 ms).
INLINE_BYTES = 64 * 1024

_pool: ProcessPoolExecutor | None = None


def _quiet_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _helper() -> ProcessPoolExecutor:
    global _pool  # one helper per process, as the console has one worker thread
    if _pool is None:
        _pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_quiet_signals,
        )
    return _pool


async def run(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; in the helper process when ``size`` (the bytes of body it works on)
    is at least ``INLINE_BYTES``. Raises what ``fn`` raises."""
    if size < INLINE_BYTES:
        return fn(*args)
    try:
        return await asyncio.wrap_future(_helper().submit(fn, *args))
    except BrokenProcessPool:  # the helper died (killed, out of memory): a new one next time
        close()
        return fn(*args)


def close() -> None:
    """End the helper, if one runs (``serve`` calls it when the admin listener stops)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["INLINE_BYTES", "close", "run"]
