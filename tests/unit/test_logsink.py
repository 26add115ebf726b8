"""NonBlockingSink: a reader of standard error that stops reading never makes a write wait.

Each descriptor kind is a real one (a pipe, a socket pair, a pseudo-terminal, a file) whose
reader does not read while the writes are made; a timer that interrupts the main thread ends
a write that waits, which is the defect, instead of hanging the suite. Reads wait with a
timeout for the same reason: the last bytes and the ``on_dropped`` report come from the
flusher thread in either order, and a read made after the last bytes never returns."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lacuna_webhooks.logsink import BACKLOG_BYTES, NonBlockingSink

LINE = b"x" * 199 + b"\n"


@contextmanager
def no_wait_over(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) if the block takes ``seconds``: a write that waited.

    SIGUSR1 from a timer thread, not SIGALRM: that timer is pytest-timeout's."""

    def waited(signum: int, frame: object) -> None:
        raise AssertionError(f"a write waited for the reader ({seconds} s)")

    previous = signal.signal(signal.SIGUSR1, waited)
    timer = threading.Timer(
        seconds, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)
    )
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


def drain(fd: int, until: Callable[[bytes], bool]) -> bytes:
    """Read ``fd`` until ``until(what came)``; fail after 20 s instead of waiting forever."""
    got = bytearray()
    deadline = time.monotonic() + 20
    while not until(bytes(got)):
        assert time.monotonic() < deadline, f"only {len(got)} bytes came"
        if select.select([fd], [], [], 0.1)[0]:
            got += os.read(fd, 65536)
    return bytes(got)


def fill_then_read(sink: NonBlockingSink, read_fd: int, reports: list[int]) -> bytes:
    count = (BACKLOG_BYTES + 2 * 1024 * 1024) // len(LINE)
    with no_wait_over(10):
        for _ in range(count):
            sink.write(LINE)
    assert sink.dropped_total > 0  # past the backlog's bound, writes were dropped
    kept = count - sink.dropped_total
    got = drain(read_fd, lambda data: data.count(b"\n") >= kept and bool(reports))
    assert set(got.split(b"\n")[:-1]) == {LINE[:-1]}  # whole lines only, none cut
    assert reports == [sink.dropped_total]
    return got


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def fill_pipe_then_read(pipe: tuple[int, int], mode: str) -> None:
    read_end, write_end = pipe
    reports: list[int] = []
    sink = NonBlockingSink(write_end, on_dropped=reports.append)
    assert sink.mode == mode
    fill_then_read(sink, read_end, reports)
    sink.close()


def test_a_pipe_nobody_reads_never_makes_a_write_wait(pipe: tuple[int, int]) -> None:
    fill_pipe_then_read(pipe, "nonblocking")


def test_the_inherited_pipe_stays_blocking(pipe: tuple[int, int]) -> None:
    """The flag is on a description of the sink's own: the shell and the other processes
    sharing the original one would otherwise see EAGAIN."""
    NonBlockingSink(pipe[1]).close()
    assert os.get_blocking(pipe[1])


def test_a_pipe_that_cannot_be_opened_again_is_written_while_it_has_room(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    """Where /proc refuses a description of our own (a pipe another user made), writes of
    PIPE_BUF while poll says there is room, which a pipe takes without waiting."""

    def refused(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("lacuna_webhooks.logsink.os.open", refused)
    fill_pipe_then_read(pipe, "pipe")


def test_a_socket_nobody_reads_never_makes_a_write_wait() -> None:
    ours, theirs = socket.socketpair()
    reports: list[int] = []
    try:
        sink = NonBlockingSink(ours.fileno(), on_dropped=reports.append)
        assert sink.mode == "socket"
        fill_then_read(sink, theirs.fileno(), reports)
        sink.close()
    finally:
        ours.close()
        theirs.close()


def test_a_terminal_nobody_reads_never_makes_a_write_wait() -> None:
    """A terminal whose output is not read (or paused with Ctrl-S) fills its buffer."""
    master, slave = pty.openpty()
    reports: list[int] = []
    try:
        sink = NonBlockingSink(slave, on_dropped=reports.append)
        with no_wait_over(10):
            for _ in range((BACKLOG_BYTES // len(LINE)) + 2000):
                sink.write(LINE)
        assert sink.dropped_total > 0
        sink.close(wait=0)
    finally:
        os.close(master)
        os.close(slave)


def test_a_file_takes_every_write(tmp_path: Path) -> None:
    with (tmp_path / "log").open("wb") as file:
        sink = NonBlockingSink(file.fileno())
        assert sink.mode == "file"
        for _ in range(1000):
            sink.write(LINE)
    assert (tmp_path / "log").read_bytes() == LINE * 1000


def test_a_reader_that_is_gone_is_not_an_error() -> None:
    read_end, write_end = os.pipe()
    sink = NonBlockingSink(write_end)
    os.close(read_end)
    try:
        assert sink.write(LINE) == len(LINE)  # EPIPE: dropped, never raised
    finally:
        os.close(write_end)


def test_writes_from_many_threads_keep_each_threads_order() -> None:
    read_end, write_end = os.pipe()
    sink = NonBlockingSink(write_end)

    def writer(n: int) -> None:
        for i in range(2000):
            sink.write(b"%d %06d\n" % (n, i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        got = drain(read_end, lambda d: d.count(b"\n") >= 8000)
        for thread in threads:
            thread.join()
        lines = got.split(b"\n")[:-1]
        for n in range(4):
            mine = [line for line in lines if line.startswith(b"%d " % n)]
            assert mine == [b"%d %06d" % (n, i) for i in range(2000)]
        sink.close()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_dropped_write_counts_its_lines(pipe: tuple[int, int]) -> None:
    """A write is often a loop turn's many lines: ``log.lines_dropped`` counts lines."""
    sink = NonBlockingSink(pipe[1])
    with no_wait_over(10):
        while not sink.dropped_total:
            sink.write(LINE * 3)
    assert sink.dropped_total == 3
    sink.close(wait=0)
