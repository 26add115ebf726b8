"""Standard error that never makes the process wait for its reader.

``serve``'s event loop writes the request log. When whoever reads its standard error stops
reading (a terminal paused with Ctrl-S, a stuck log shipper or container log driver, a pipe
into a program that stalled), a plain write blocks as soon as the pipe's 64 KiB are full,
and intake blocks with it. ``NonBlockingSink`` is the remedy Docker offers as its
``mode=non-blocking`` log option, inside the process: a write that the reader cannot take at
once is kept, in order, in a backlog of at most ``BACKLOG_BYTES`` that a thread writes out
as the reader catches up; past that bound whole writes are dropped, counted, and reported in
one ``log.lines_dropped`` warning once the backlog is written (docs/observability.md).

How a write is kept from waiting depends on what the descriptor is:

- a socket (journald's stream, say): ``send`` with ``MSG_DONTWAIT``;
- a pipe, FIFO or terminal: a description of its own, opened through ``/proc/self/fd`` with
  ``O_NONBLOCK`` (setting the flag on the inherited description would change it for every
  process sharing it: the shell, after we exit); where that open is refused (a pipe another
  user made), each write waits for ``select`` to say the descriptor takes more and writes at
  most ``PIPE_BUF`` bytes, which a pipe with room takes whole;
- anything else (a regular file, ``/dev/null``): plain writes, which wait for no reader.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import select
import socket
import stat
import threading
from collections.abc import Callable

#: What may wait for a slow reader before writes are dropped (Docker's non-blocking log mode
#: keeps 1 MiB by default; a burst of request logs from a busy ``serve`` is larger).
BACKLOG_BYTES = 4 * 1024 * 1024
#: At exit, how long what is still kept may take to be written: a reader that never comes
#: back must not hold a stopping process.
EXIT_WAIT_SECONDS = 2.0
#: The flusher thread looks this often whether it should stop (an exit), while it waits.
_POLL_SECONDS = 0.25


class NonBlockingSink:
    """Writes bytes to descriptor ``fd`` without waiting for its reader.

    ``write(data)`` never blocks on the reader (see the module's docstring for how, by kind
    of descriptor) and never raises: on a descriptor that is gone (``EPIPE``, closed) the
    data is dropped. Writes keep their order. ``on_dropped(count)``, called from the flusher
    thread without any lock held once the backlog is written, reports how many lines were
    dropped meanwhile (it may write to this sink). Thread-safe.
    """

    def __init__(self, fd: int, on_dropped: Callable[[int], None] | None = None) -> None:
        self._fd = fd
        self._own_fd: int | None = None
        self._sock: socket.socket | None = None
        self._mode = _mode_of(fd)
        if self._mode == "pipe":
            with contextlib.suppress(OSError):
                self._own_fd = os.open(
                    f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                )
                self._fd = self._own_fd
                self._mode = "nonblocking"
        elif self._mode == "socket":
            try:
                self._sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                self._mode = "pipe"  # select before each write then
        self._on_dropped = on_dropped
        self._lock = threading.Lock()
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_bytes = 0
        self.dropped = 0  # lines dropped since the last report
        self.dropped_total = 0  # ever, for tests and diagnostics
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()
        atexit.register(self.close)

    @property
    def mode(self) -> str:
        """``"file"``, ``"nonblocking"``, ``"socket"`` or ``"pipe"`` (select before each
        write): how writes avoid waiting."""
        return self._mode

    def write(self, data: bytes) -> int:
        """Write ``data`` now, or keep it for the flusher, or drop it: ``len(data)``."""
        if not data:
            return 0
        with self._lock:
            if self._backlog:
                self._keep(data)
                return len(data)
            try:
                written = self._write_now(data)
            except OSError:
                return len(data)  # the reader is gone: nowhere to write
            if written < len(data):
                # The rest of a write already begun is always kept: dropping it would leave
                # half a line for the next one to run into.
                self._backlog.append(data[written:])
                self._backlog_bytes += len(data) - written
                self._start_flusher()
        return len(data)

    def flush(self) -> None:
        """Nothing to do: each write reaches the descriptor or the backlog at once."""

    def close(self, wait: float = EXIT_WAIT_SECONDS) -> None:
        """Give what is kept ``wait`` seconds to be written, then stop (idempotent)."""
        flusher = self._flusher
        if flusher is not None:
            flusher.join(wait)
        self._closing.set()
        if flusher is not None:
            flusher.join(_POLL_SECONDS * 2)

    def _keep(self, data: bytes) -> None:
        if self._backlog_bytes + len(data) > BACKLOG_BYTES:
            lines = data.count(b"\n") or 1  # a write is often a loop turn's many lines
            self.dropped += lines
            self.dropped_total += lines
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)

    def _write_now(self, data: bytes) -> int:
        """As much of ``data`` as the descriptor takes without waiting (raises ``OSError``
        when it is gone)."""
        if self._mode == "socket":
            assert self._sock is not None
            try:
                return self._sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return 0
        if self._mode == "nonblocking":
            try:
                return os.write(self._fd, data)
            except BlockingIOError:
                return 0
        if self._mode == "pipe":
            return self._write_while_room(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        return len(data)

    def _write_while_room(self, data: bytes) -> int:
        """A blocking descriptor: ``PIPE_BUF`` at a time (a pipe with room takes that whole,
        POSIX), each while ``select`` says it takes more."""
        start = 0
        while start < len(data):
            if not _writable(self._fd, 0):
                break
            start += os.write(self._fd, memoryview(data)[start : start + select.PIPE_BUF])
        return start

    def _start_flusher(self) -> None:
        if self._flusher is None and not self._closing.is_set():
            self._flusher = threading.Thread(
                target=self._flush_backlog, daemon=True, name="stderr-flusher"
            )
            self._flusher.start()

    def _flush_backlog(self) -> None:
        fd = self._sock.fileno() if self._sock is not None else self._fd
        while True:
            try:
                writable = _writable(fd, _POLL_SECONDS)
            except (OSError, ValueError):
                writable = False
                self._closing.set()
            with self._lock:
                if writable:
                    try:
                        while self._backlog:
                            data = self._backlog[0]
                            written = self._write_now(data)
                            self._backlog_bytes -= written
                            if written < len(data):
                                self._backlog[0] = data[written:]
                                break
                            self._backlog.popleft()
                    except OSError:  # the reader is gone: what is kept goes nowhere
                        self._backlog.clear()
                        self._backlog_bytes = 0
                if not self._backlog or self._closing.is_set():
                    self._flusher = None
                    dropped, self.dropped = self.dropped, 0
                    break
        if dropped and self._on_dropped is not None and not self._closing.is_set():
            self._on_dropped(dropped)


def _writable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` takes a write without waiting, waiting up to ``timeout`` seconds
    (``poll``, not ``select``: a descriptor may be numbered past ``FD_SETSIZE``)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(
        events & (select.POLLOUT | select.POLLERR | select.POLLHUP)
        for _, events in poller.poll(timeout * 1000)
    )


def _mode_of(fd: int) -> str:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "file"  # nothing there: writes fail, and are dropped
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd)):
        return "pipe"
    return "file"
