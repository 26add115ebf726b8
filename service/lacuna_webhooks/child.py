"""Start a child process of our own: this interpreter running one of the package's
``child_main(fd)`` functions over a socket pair, and the frames both sides exchange.

Used by the SQLite writer process (``store.sqlite.process``), the handler worker
processes (``dispatch.workers``) and the plugin check at start (``plugin_check``). Imports
nothing of the package's.

A frame is a 4-byte big-endian length and that many bytes (what they hold, pickle or JSON,
is the caller's business). Each reader passes its own bound on the length: a larger prefix
means the stream is corrupt (``ValueError``), and nothing that large is allocated.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

_LEN = struct.Struct("!I")

# The folder holding the ``lacuna_webhooks`` package: the child imports the same code as the
# parent, installed or not (a checkout run with PYTHONPATH, as ``make bench`` does).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _command(module: str, fd: int) -> list[str]:
    """The child's command line: this interpreter running a fixed program (nothing here comes
    from outside) that calls ``module.child_main(fd)``."""
    # The socket is the child's alone: a process it starts (a handler's `os.system("… &")`)
    # must not hold it open past the child's death, or the parent, reading it, would never
    # see that death.
    code = (
        "import os, sys\n"
        f"os.set_inheritable({fd}, False)\n"
        f"if {_PACKAGE_ROOT!r} not in sys.path: sys.path.insert(0, {_PACKAGE_ROOT!r})\n"
        f"from {module} import child_main\n"
        f"sys.exit(child_main({fd}))\n"
    )
    # sys.argv[1]: the parent it was started by, for a child to tell whether that parent is
    # already gone (die_with_parent).
    return [sys.executable, "-c", code, str(os.getpid())]


async def start_child(module: str, theirs: socket.socket) -> asyncio.subprocess.Process:
    """Run ``module.child_main(fd)`` in a new process, ``fd`` being ``theirs``.

    ``module`` is a dotted module path of this package (``lacuna_webhooks.…``). ``theirs``
    is closed in this process whatever happens (the child holds its own copy). Raises
    ``OSError`` when the process cannot be started.
    """
    try:
        return await asyncio.create_subprocess_exec(
            *_command(module, theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            # A process group of its own: a handler's `os.killpg(0, SIGTERM)` (killing "its"
            # helpers' group) reached serve, which drained and exited 0, and was not
            # restarted. serve stops its children itself; they ignore SIGINT and SIGTERM.
            start_new_session=True,
        )
    finally:
        theirs.close()


def start_child_blocking(module: str, theirs: socket.socket) -> subprocess.Popen[bytes]:
    """``start_child`` for a caller without an event loop (a command still starting)."""
    try:
        return subprocess.Popen(  # noqa: S603 - a fixed program (_command)
            _command(module, theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # as start_child: stopped by its parent, not by Ctrl-C
        )
    finally:
        theirs.close()


def _stopped_by_parent(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM in a child: nothing (see ``begin_child``)."""


def begin_child(fd: int) -> socket.socket:
    """What every ``child_main(fd)`` does first: SIGINT and SIGTERM do nothing here, and the
    process dies with its parent (``die_with_parent``); the socket of ``fd``.

    Ctrl-C and a stop reach ``serve``, which stops its children itself. Caught, not ignored:
    an ignored signal stays ignored across exec, so every process a handler started
    shrugged off SIGTERM (an operator's ``kill`` too); a handler is reset by exec."""
    signal.signal(signal.SIGINT, _stopped_by_parent)
    signal.signal(signal.SIGTERM, _stopped_by_parent)
    die_with_parent()
    return socket.socket(fileno=fd)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child: on Linux, have the kernel SIGKILL this process when its parent dies, so
    that code that blocks (and so never reads the closed socket) cannot outlive a killed
    ``serve``; exit at once if that parent is already gone.

    The parent is compared with the one that started us (``sys.argv[1]``, ``_command``), not
    with ``getppid()`` read here first: a parent that died before that read left both
    reads naming the reaper, and the orphan went on to import the plugin."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        parent = int(sys.argv[1])
    except (IndexError, ValueError):
        return  # not started by start_child: nothing to compare with
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def frame(payload: bytes) -> bytes:
    """``payload`` with its length prefix."""
    return _LEN.pack(len(payload)) + payload


def _size(head: bytes, max_bytes: int) -> int:
    (size,) = _LEN.unpack(head)
    if size > max_bytes:
        raise ValueError(f"a frame of {size} bytes (at most {max_bytes})")
    return int(size)


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    """One frame's payload; raises ``asyncio.IncompleteReadError`` at EOF (also within a
    frame) and ``ValueError`` for a length over ``max_bytes``."""
    size = _size(await reader.readexactly(_LEN.size), max_bytes)
    return await reader.readexactly(size)


def read_frame_blocking(stream: BinaryIO, max_bytes: int) -> bytes | None:
    """The same from a blocking binary stream (a socket's ``makefile("rb")``): ``None`` at
    EOF, also within a frame; ``ValueError`` for a length over ``max_bytes``."""
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    size = _size(head, max_bytes)
    data = stream.read(size)
    return data if len(data) == size else None


__all__ = [
    "begin_child",
    "die_with_parent",
    "frame",
    "read_frame",
    "read_frame_blocking",
    "start_child",
    "start_child_blocking",
]
