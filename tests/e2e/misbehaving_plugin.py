"""A handler for end-to-end tests that misbehaves as its event id says, loaded as
``tests.e2e.misbehaving_plugin:Misbehaving``.

Every call first appends ``<event id> <pid>`` to ``LACUNA_MISBEHAVING_PATH``
(so a test sees from outside that an attempt started, and in which process);
then, by the event id's prefix:

- ``evt_sleep_``: ``time.sleep(LACUNA_MISBEHAVING_BLOCK)``, blocking its event loop;
- ``evt_spin_``: a CPU loop for ``LACUNA_MISBEHAVING_BLOCK`` seconds, never yielding;
- ``evt_flood_``: prints 200-character lines without pause for ``LACUNA_MISBEHAVING_BLOCK``
  seconds (its output goes through ``serve``, which relays it), never yielding;
- ``evt_raise_<Name>``: raises ``SystemExit(0)``, ``KeyboardInterrupt``,
  ``GeneratorExit``, ``CancelledError``, ``Custom`` (a ``BaseException`` subclass) or
  ``Unprintable`` (an exception whose ``__str__`` raises), ``MetaName`` (its class's
  ``__name__``, a metaclass property, raises), ``ClassProp`` (its ``__class__`` raises) or
  ``StrSub`` (its ``__str__`` returns a ``str`` subclass whose ``__format__`` raises);
- ``evt_bigframe_``: writes an 8 MiB answer frame into its worker's socket to its parent;
  ``evt_forgeresult_``: writes a forged ``done`` for attempt 1 there, with a 900 KB result;
- ``evt_breakloop_``: replaces ``asyncio.timeout`` with ``None`` in its worker process (a
  plugin monkeypatching what its worker runs on), then succeeds;
- ``evt_fail_``: raises ``RuntimeError`` at once (a handler failing fast, every time);
- ``evt_exit_``: ``os._exit(3)``, as a crash would;
- ``evt_hang_``: ``await asyncio.sleep(3600)`` (cooperative, until cut off or killed);
- ``evt_nap_``: ``await asyncio.sleep(LACUNA_MISBEHAVING_NAP)`` (cooperative), then succeeds;
- ``evt_forkhold_``: forks a process that sleeps ``LACUNA_MISBEHAVING_BLOCK`` seconds
  holding every descriptor the worker has, writes ``forked_<event id> <its pid>``, succeeds;
- ``evt_forkexit_``: forks such a process, then ``os._exit(3)``;
- ``evt_killpg_``: ``os.killpg(0, SIGTERM)``, as a handler killing "its" helpers would;
- ``evt_surrogate_``: raises ``FileNotFoundError`` naming a non-UTF-8 file (a surrogate);
- ``evt_nul_``: raises ``ValueError`` whose message holds a NUL;
- ``evt_nulresult_``: returns a result holding a NUL; ``evt_bigresult_``: a 10 MB result;
- ``evt_spawn_``: starts ``sleep 300`` (a helper program), writes ``spawned_<event id> <its
  pid>``, succeeds; ``evt_spawnhang_``: the same, then blocks as ``evt_sleep_``;
- ``evt_delay_<kind>``: raises ``RetryLater`` whose ``delay_seconds`` is not a usable number:
  ``text`` (``"30"``, a peer's Retry-After passed on as it came), ``huge`` (``10**25``, an
  int past 64 bits), ``nan``;
- ``evt_print_``: prints ``LACUNA_WEBHOOK_SECRET`` and a Slack-like URL to ``sys.stdout``,
  to ``sys.stderr`` (with a non-UTF-8 byte), with ``os.write(1, ...)``, from a program given
  ``sys.stdout``, and through ``sys.stdout.buffer``, the last without a newline, then
  succeeds;
- anything else: succeeds.

With ``LACUNA_MISBEHAVING_THREAD=1``, ``__init__`` starts a non-daemon thread that only
``aclose`` stops (in ``serve`` itself the handler is built but never closed).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from lacuna_webhooks import Event, HandlerContext, RetryLater


class Custom(BaseException):
    """A plugin's own BaseException subclass."""


class Unprintable(Exception):
    """An exception whose ``__str__`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


class BadStr(Exception):
    """An exception whose ``__str__`` raises KeyboardInterrupt (a BaseException)."""

    def __str__(self) -> str:
        raise KeyboardInterrupt


class _NamelessMeta(type):
    @property
    def __name__(cls) -> str:  # type: ignore[override]
        raise RuntimeError("a metaclass whose __name__ raises")


class MetaName(Exception, metaclass=_NamelessMeta):
    """An exception whose class's ``__name__`` (a metaclass property) raises."""


class ClassProp(Exception):
    """An exception whose ``__class__`` raises (``isinstance`` falls back to it)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        raise RuntimeError("no __class__ for you")


class _Unformattable(str):
    __slots__ = ()

    def __format__(self, spec: str) -> str:
        raise RuntimeError("__format__ exploded")

    def strip(self, chars: str | None = None) -> str:
        raise RuntimeError("strip exploded")


class StrSub(Exception):
    """An exception whose ``__str__`` returns a ``str`` subclass that cannot be formatted."""

    def __str__(self) -> str:
        return _Unformattable("a str subclass")


def write_to_parent(data: bytes) -> None:
    """Write ``data`` to this worker's socket to its parent, as a hostile handler can: the
    descriptor is the one the worker's command line passes to ``child_main``."""
    fd = int(re.search(rb"child_main\((\d+)\)", Path("/proc/self/cmdline").read_bytes())[1])  # type: ignore[index]
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view[: 1 << 20]) :]
        except BlockingIOError:  # the worker's socket is non-blocking
            select.select([], [fd], [])


DELAYS: dict[str, object] = {"text": "30", "huge": 10**25, "nan": float("nan")}

RAISES: dict[str, BaseException] = {
    "BadStr": BadStr(),
    "SystemExit": SystemExit(0),
    "KeyboardInterrupt": KeyboardInterrupt(),
    "GeneratorExit": GeneratorExit(),
    "CancelledError": asyncio.CancelledError(),
    "Custom": Custom("a plugin's own BaseException"),
    "Unprintable": Unprintable(),
    "MetaName": MetaName("x"),
    "ClassProp": ClassProp("x"),
    "StrSub": StrSub(),
}


class Misbehaving:
    name = "misbehaving"
    events: frozenset[str] | None = None

    def __init__(self, ctx: HandlerContext) -> None:
        self.path = Path(ctx.require("PATH"))
        self.block_seconds = float(ctx.get("BLOCK", "60") or 60)
        self.aclose_block_seconds = float(ctx.get("ACLOSE_BLOCK", "0") or 0)
        self.nap_seconds = float(ctx.get("NAP", "1") or 1)
        self.closed = threading.Event()
        if ctx.get("THREAD", "") == "1":
            threading.Thread(target=self.closed.wait, name="plugin-flusher").start()

    async def handle(self, event: Event) -> dict[str, str] | None:
        with self.path.open("a") as fh:
            fh.write(f"{event.id} {os.getpid()}\n")
        if event.id.startswith("evt_sleep_"):
            time.sleep(self.block_seconds)  # noqa: ASYNC251 - blocking the loop is the point
        elif event.id.startswith("evt_offload_"):
            # A blocking client in asyncio's executor (botocore's reads): the loop answers,
            # the thread does not stop when the attempt is cut off.
            await asyncio.to_thread(time.sleep, self.block_seconds)
        elif event.id.startswith("evt_spin_"):
            end = time.monotonic() + self.block_seconds
            while time.monotonic() < end:
                pass
        elif event.id.startswith("evt_raise_"):
            raise RAISES[event.id.removeprefix("evt_raise_")]
        elif event.id.startswith("evt_fail_"):
            raise RuntimeError("fails fast")
        elif event.id.startswith("evt_exit_"):
            os._exit(3)
        elif event.id.startswith("evt_hang_"):
            await asyncio.sleep(3600)
        elif event.id.startswith("evt_nap_"):
            await asyncio.sleep(self.nap_seconds)
        elif event.id.startswith(("evt_forkhold_", "evt_forkexit_")):
            child = os.fork()
            if child == 0:
                time.sleep(self.block_seconds)  # noqa: ASYNC251 - in the forked process
                os._exit(0)
            with self.path.open("a") as fh:
                fh.write(f"forked_{event.id} {child}\n")
            if event.id.startswith("evt_forkexit_"):
                os._exit(3)
        elif event.id.startswith("evt_killpg_"):
            os.killpg(0, signal.SIGTERM)
        elif event.id.startswith("evt_surrogate_"):
            raise FileNotFoundError(b"/data/caf\xe9.mp3".decode("utf-8", "surrogateescape"))
        elif event.id.startswith("evt_nul_"):
            raise ValueError("upstream \x00 failure")
        elif event.id.startswith(("evt_spawn_", "evt_spawnhang_")):
            helper = subprocess.Popen(["sleep", "300"])  # noqa: ASYNC220 - the point
            with self.path.open("a") as fh:
                fh.write(f"spawned_{event.id} {helper.pid}\n")
            if event.id.startswith("evt_spawnhang_"):
                time.sleep(self.block_seconds)  # noqa: ASYNC251 - blocking the loop is the point
        elif event.id.startswith("evt_delay_"):
            delay = DELAYS[event.id.removeprefix("evt_delay_")]
            raise RetryLater("busy", delay_seconds=delay)  # type: ignore[arg-type]
        elif event.id.startswith("evt_flood_"):
            end = time.monotonic() + self.block_seconds
            while time.monotonic() < end:
                for _ in range(100):
                    print("flood " + "x" * 194)
        elif event.id.startswith("evt_print_"):
            secret = os.environ["LACUNA_WEBHOOK_SECRET"]
            print(f"plugin debug: secret={secret}")  # a careless plugin is the point
            print(
                "posting to https://hooks.slack.com/services/T000/B000/XXXXSECRETPATH",
                file=sys.stderr,
            )
            sys.stderr.buffer.write(b"caf\xe9 " + secret.encode() + b"\n")
            os.write(1, b"fd " + secret.encode() + b"\n")
            # A program given our stdout (sys.stdout.fileno() must be a real descriptor)
            subprocess.run(["echo", "child", secret], stdout=sys.stdout, check=True)  # noqa: ASYNC221
            sys.stdout.buffer.write(b"no newline " + secret.encode())
            sys.stdout.flush()
        elif event.id.startswith("evt_breakloop_"):
            # Breaks this worker's own machinery, not just this attempt.
            asyncio.timeout = None  # type: ignore[assignment]
        elif event.id.startswith("evt_bigframe_"):
            # An 8 MiB answer (a pong) written into its worker's socket.
            payload = b'["pong",1,"' + b"x" * (8 * 1024 * 1024) + b'"]'
            write_to_parent(len(payload).to_bytes(4, "big") + payload)
        elif event.id.startswith("evt_forgeresult_"):
            # A forged answer for attempt 1 (this one, in a worker that ran nothing before):
            # done, with a result of 900 KB (a handler's own result is at most 64 KiB).
            outcome = {"ending": "ok", "error": None, "retry_after_seconds": None}
            message = orjson.dumps(["done", 1, {**outcome, "result": {"x": "y" * 900_000}}])
            write_to_parent(len(message).to_bytes(4, "big") + message)
        elif event.id.startswith("evt_nulresult_"):
            return {"x": "a\x00b"}
        elif event.id.startswith("evt_bigresult_"):
            return {"x": "y" * 10_000_000}
        return None

    async def aclose(self) -> None:
        self.closed.set()
        # LACUNA_MISBEHAVING_ACLOSE_BLOCK: block the event loop for that long while closing.
        time.sleep(self.aclose_block_seconds)  # noqa: ASYNC251 - blocking is the point


class SyncMisbehaving(Misbehaving):
    """The same, with ``handle`` a plain ``def`` (a blocking client's plugin): it writes
    ``<event id> <pid>`` too, then ``evt_sleep_`` blocks for ``BLOCK`` seconds and
    ``evt_meet_`` waits until four ``evt_meet_`` attempts run at once (a barrier)."""

    name = "misbehaving"
    meeting = threading.Barrier(4, timeout=30)

    def handle(self, event: Event) -> dict[str, str] | None:  # type: ignore[override]
        with self.path.open("a") as fh:
            fh.write(f"{event.id} {os.getpid()}\n")
        if event.id.startswith("evt_sleep_"):
            time.sleep(self.block_seconds)
        elif event.id.startswith("evt_meet_"):
            self.meeting.wait()
        return {"thread": threading.current_thread().name}


def started(path: Path) -> list[tuple[str, int]]:
    """(event id, pid) of every attempt started so far, in order."""
    if not path.exists():
        return []
    return [
        (line.split()[0], int(line.split()[1]))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
