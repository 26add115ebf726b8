"""Start a child process of our own: this interpreter running one of the package's
``child_main(fd)`` functions over a socket pair, and the frames both sides exchange.

Used by the SQLite writer process (``store.sqlite.process``), the handler worker
processes (``dispatch.workers``) and the plugin check at start (``plugin_check``). Imports
nothing of the package's.

A child that runs a plugin's code writes its output into an ``OutputRelay``'s pipe, never
into this process's own standard output and error (see that class).

A frame is a 4-byte big-endian length and that many bytes (what they hold, pickle or JSON,
is the caller's business). Each reader passes its own bound on the length: a larger prefix
means the stream is corrupt (``ValueError``), and nothing that large is allocated.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
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


async def start_child(
    module: str, theirs: socket.socket, output: OutputRelay | None = None
) -> asyncio.subprocess.Process:
    """Run ``module.child_main(fd)`` in a new process, ``fd`` being ``theirs``.

    ``module`` is a dotted module path of this package (``lacuna_webhooks.…``). ``theirs``
    is closed in this process whatever happens (the child holds its own copy); so is the
    write end of ``output``, the child's descriptors 1 and 2 (without it, this process's
    own). Raises ``OSError`` when the process cannot be started.
    """
    out = output.write_fd if output is not None else None
    try:
        return await asyncio.create_subprocess_exec(
            *_command(module, theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            # A process group of its own: a handler's `os.killpg(0, SIGTERM)` (killing "its"
            # helpers' group) reached serve, which drained and exited 0, and was not
            # restarted. serve stops its children itself; they ignore SIGINT and SIGTERM.
            start_new_session=True,
        )
    finally:
        theirs.close()
        if output is not None:
            output.close_write_end()


def start_child_blocking(
    module: str, theirs: socket.socket, output: OutputRelay | None = None
) -> subprocess.Popen[bytes]:
    """``start_child`` for a caller without an event loop (a command still starting)."""
    out = output.write_fd if output is not None else None
    try:
        return subprocess.Popen(  # noqa: S603 - a fixed program (_command)
            _command(module, theirs.fileno()),
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # as start_child: stopped by its parent, not by Ctrl-C
        )
    finally:
        theirs.close()
        if output is not None:
            output.close_write_end()


#: A line of a child's output longer than this is relayed cut at it, and the rest of it, up
#: to its newline, dropped. Far above what a child's logging writes (a printed line is
#: logged up to 64 KiB: ``logs.MAX_OUTPUT_LINE_BYTES``): only memory is bounded here.
MAX_RELAY_LINE_BYTES = 1024 * 1024
#: Once the child ended, at most this much of what is left in its pipe is relayed: a process
#: it started that holds the pipe and writes on cannot keep its parent reading.
MAX_FINAL_RELAY_BYTES = 4 * 1024 * 1024
#: How long ``OutputRelay.close`` waits for its thread to relay what is left.
RELAY_CLOSE_SECONDS = 2.0
_CHUNK = 64 * 1024


class OutputRelay:
    """A child's descriptors 1 and 2: one pipe whose read end stays here, each line read
    from it written to this process's standard error, until ``close``.

    A child given this process's own descriptors passes them to every process it forks,
    and a plugin's code runs there: a process it double-forked into a session of its own
    (``setsid``: out of reach of the process-group kill) held them for as long as it ran,
    and whatever read this process's output through a pipe (``lacuna-webhooks handlers
    2>&1 | cat``, ``subprocess.run(capture_output=True)``, a supervisor) waited for its
    end. What a child writes here is its log lines: a plugin's prints are ``process.output``
    lines there, redacted and bounded (``logs.capture_output``), so they are relayed as they
    are, whole lines, each at most ``MAX_RELAY_LINE_BYTES``. ``close``, once the child has
    ended, relays what is left (at most ``MAX_FINAL_RELAY_BYTES``) and closes the read
    end: a process still holding the write end gets EPIPE, and holds nothing of ours.

    Read by a thread of its own (``start_thread``: a caller without an event loop) or by
    the running loop (``start_on_loop``)."""

    def __init__(self) -> None:
        self._read_fd, self.write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._write_open = True
        self._pending = bytearray()
        self._dropping = False  # the rest of a line cut at MAX_RELAY_LINE_BYTES
        self._closed = False
        self._wake: int | None = None  # closed by ``close`` to end the thread
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def close_write_end(self) -> None:
        """Close this process's copy of the write end (the child holds its own)."""
        if self._write_open:
            self._write_open = False
            os.close(self.write_fd)

    def start_thread(self) -> None:
        wake, self._wake = os.pipe()
        self._thread = threading.Thread(
            target=self._run, args=(wake,), name="child-output", daemon=True
        )
        self._thread.start()

    def start_on_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read_fd, self._on_readable)

    def close(self) -> None:
        """Relay what is left (bounded) and stop reading; call once the child has ended."""
        if self._closed:
            return
        self._closed = True
        self.close_write_end()
        if self._thread is not None and self._wake is not None:
            os.close(self._wake)  # wakes the thread, which finishes (and closes the pipe)
            # Not for ever: a thread held up writing to a standard error nobody reads ends
            # the pipe itself once it can.
            self._thread.join(RELAY_CLOSE_SECONDS)
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):  # the loop closed already
                self._loop.remove_reader(self._read_fd)
        self._finish()

    def _run(self, wake: int) -> None:
        try:
            at_end = False
            while True:
                waiting = [wake] if at_end else [self._read_fd, wake]
                readable, _, _ = select.select(waiting, [], [])
                if wake in readable:
                    break
                at_end = not self._read(_CHUNK)  # at EOF: nothing more; wait for close
            self._finish()
        finally:
            os.close(wake)

    def _on_readable(self) -> None:
        if not self._read(_CHUNK) and self._loop is not None:
            self._loop.remove_reader(self._read_fd)  # EOF: nothing more will come

    def _finish(self) -> None:
        try:
            self._read(MAX_FINAL_RELAY_BYTES)
            if self._pending and not self._dropping:
                self._emit(bytes(self._pending) + b"\n")  # a last line without its newline
            self._pending.clear()
        finally:
            os.close(self._read_fd)

    def _read(self, most: int) -> bool:
        """Relay what the pipe holds now, up to about ``most`` bytes; ``False`` at its end."""
        read = 0
        while read < most:
            try:
                data = os.read(self._read_fd, _CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            read += len(data)
            self._relay(data)
        return True

    def _relay(self, data: bytes) -> None:
        # A few steps per read, not per line (a read is shorter than the line cap): a handler
        # printing without pause must cost serve's event loop little more than the copy.
        first = data.find(b"\n")
        if first < 0:  # the line in progress goes on
            if not self._dropping:
                self._pending += data
                if len(self._pending) > MAX_RELAY_LINE_BYTES:
                    self._emit(bytes(self._pending[:MAX_RELAY_LINE_BYTES]) + b"\n")
                    self._pending.clear()
                    self._dropping = True
            return
        out: list[bytes] = []
        if self._dropping:
            self._dropping = False  # the newline that ends the line cut short
        else:
            self._pending += data[:first]
            out.append(bytes(self._pending[:MAX_RELAY_LINE_BYTES]) + b"\n")
        last = data.rfind(b"\n")
        if last - first <= MAX_RELAY_LINE_BYTES:  # the lines between: none can be too long
            out.append(data[first + 1 : last + 1])
        else:
            for line in data[first + 1 : last].split(b"\n"):
                out.append(line[:MAX_RELAY_LINE_BYTES] + b"\n")
        self._pending[:] = data[last + 1 :]
        self._emit(b"".join(out))

    def _emit(self, data: bytes) -> None:
        if self._loop is not None:
            _to_stderr_unless_full(data)
        else:
            _to_stderr(data)


def child_channels() -> tuple[socket.socket, socket.socket, OutputRelay]:
    """What a child needs before it starts: a socket pair (ours, its end) and the relay of
    its output (never this process's own stdout and stderr, which a process the child's
    plugin code started in a session of its own would hold open: ``OutputRelay``).

    Raises ``OSError`` (out of descriptors, EMFILE, say) with nothing left open."""
    ours, theirs = socket.socketpair()
    try:
        return ours, theirs, OutputRelay()
    except OSError:
        ours.close()
        theirs.close()
        raise


def _to_stderr_unless_full(data: bytes) -> None:
    """``_to_stderr`` for the event loop, which must never wait for a reader of this
    process's standard error: through its ``logs.stderr_sink`` (kept while the reader is
    behind, dropped past the sink's bound). A slow reader of serve's output (a pipe into a
    slow program) let a flooding handler stall /healthz and intake for seconds at a time."""
    from .logs import stderr_sink

    sink = stderr_sink()
    if sink is None:
        _to_stderr(data)  # no descriptor (a test's capture): nothing to wait for
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()  # what its text layer holds goes first
    sink.write(data)


def _to_stderr(data: bytes) -> None:
    """``data`` to this process's standard error, at once; nothing when it is gone."""
    stream = sys.stderr
    if not data or stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        buffer = getattr(stream, "buffer", None)
        if buffer is None:
            stream.write(data.decode("utf-8", "backslashreplace"))
        else:
            stream.flush()  # what its text layer holds goes first
            buffer.write(data)
            buffer.flush()
        stream.flush()


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
    try:
        parent = int(sys.argv[1])
    except (IndexError, ValueError):
        # Not started by start_child (a test calling a child_main in its own process): no
        # parent of ours to die with, and that process's own parent is none of our business.
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
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
    "OutputRelay",
    "begin_child",
    "die_with_parent",
    "frame",
    "read_frame",
    "read_frame_blocking",
    "start_child",
    "start_child_blocking",
]
