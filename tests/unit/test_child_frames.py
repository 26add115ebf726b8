"""The frames of ``child.py``, shared by the SQLite writer process and the handler workers:
each reader's own bound, EOF inside a frame, over a real socket pair; a worker that
finds its parent gone at start; and ``OutputRelay``, a child's output relayed through a pipe
of its parent's, with real processes writing to it."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from lacuna_webhooks import child, plugin_check
from lacuna_webhooks.child import OutputRelay, frame, read_frame, read_frame_blocking
from lacuna_webhooks.dispatch import workers
from lacuna_webhooks.errors import ConfigError
from lacuna_webhooks.store.sqlite import process


def test_a_frame_round_trips_and_ends_cleanly_at_eof() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(frame(b"hello") + frame(b"") + frame(b"x" * 70_000))
        ours.shutdown(socket.SHUT_WR)
        stream = theirs.makefile("rb")
        assert read_frame_blocking(stream, 100_000) == b"hello"
        assert read_frame_blocking(stream, 100_000) == b""
        assert read_frame_blocking(stream, 100_000) == b"x" * 70_000
        assert read_frame_blocking(stream, 100_000) is None


def test_a_frame_cut_short_is_eof_not_data() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(frame(b"hello")[:-2])
        ours.shutdown(socket.SHUT_WR)
        assert read_frame_blocking(theirs.makefile("rb"), 100) is None


def test_a_length_over_the_bound_is_refused_before_reading_it() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(frame(b"y" * 101))
        with pytest.raises(ValueError, match="101 bytes"):
            read_frame_blocking(theirs.makefile("rb"), 100)


async def test_the_async_reader_has_the_same_bound_and_eof() -> None:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    try:
        with ours:
            ours.sendall(frame(b"ok") + frame(b"z" * 11) + frame(b"abc")[:-1])
            assert await read_frame(reader, 10) == b"ok"
            with pytest.raises(ValueError, match="11 bytes"):
                await read_frame(reader, 10)
            await reader.readexactly(11)  # what the refused length announced, left unread
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader, 10)
    finally:
        writer.close()


def test_each_caller_has_its_own_bound() -> None:
    """Both child protocols read through the same functions, each with a bound that fits its
    messages (a writer batch reaches MAX_BATCH_BYTES plus one large event)."""
    assert workers.MAX_FRAME_BYTES == 256 * 1024 * 1024
    assert process.MAX_FRAME_BYTES > process.MAX_BATCH_BYTES


def test_the_writer_child_ends_on_a_corrupt_length(capsys: pytest.CaptureFixture[str]) -> None:
    """A length prefix over the writer's bound ends its child with exit code 1 and one line
    (the parent then restarts it), instead of reading that much."""
    ours, theirs = socket.socketpair()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ours:
            ours.sendall(struct.pack("!I", process.MAX_FRAME_BYTES + 1) + b"x" * 100)
            ours.shutdown(socket.SHUT_WR)
            assert process.child_main(theirs.detach()) == 1
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert "a frame of" in capsys.readouterr().err


@pytest.mark.parametrize("started_by_parent", [True, False])
def test_a_worker_whose_parent_is_already_gone_exits_before_doing_anything(
    started_by_parent: bool,
) -> None:
    """die_with_parent compares getppid() with the pid start_child passed (sys.argv[1]). It
    used to compare two reads of getppid(): a serve killed before the first read left both
    naming the reaper, and the orphan went on to import and run the plugin."""
    parent = os.getpid() if started_by_parent else 1  # 1: what an orphan's getppid() says
    code = (
        "import sys\n"
        f"sys.argv = ['-c', '{parent}']\n"
        "from lacuna_webhooks.child import die_with_parent\n"
        "die_with_parent()\n"
        "print('went on')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("went on" if started_by_parent else "")


#: A child writing whole lines, a line over the (lowered) bound, and a last line without its
#: newline, on its stdout and its stderr.
WRITER = (
    "import os\n"
    "os.write(1, b'first\\n')\n"
    "os.write(2, b'x' * 250 + b'\\nsecond\\n')\n"
    "os.write(1, b'last, no newline')\n"
)
EXPECTED = "first\n" + "x" * 100 + "\nsecond\nlast, no newline\n"


def test_a_childs_output_is_relayed_in_whole_lines_each_bounded(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(child, "MAX_RELAY_LINE_BYTES", 100)
    relay = OutputRelay()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER], stdout=relay.write_fd, stderr=relay.write_fd
    )
    relay.close_write_end()
    relay.start_thread()
    assert writer.wait(timeout=60) == 0
    relay.close()
    assert capfd.readouterr().err == EXPECTED


async def test_the_running_loop_relays_the_same(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(child, "MAX_RELAY_LINE_BYTES", 100)
    relay = OutputRelay()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, stdout=relay.write_fd, stderr=relay.write_fd
    )
    relay.close_write_end()
    relay.start_on_loop()
    assert await asyncio.wait_for(writer.wait(), 60) == 0
    deadline = time.monotonic() + 10
    relayed = ""
    while "second" not in relayed and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # read by the loop, as it comes
        relayed += capfd.readouterr().err
    relay.close()  # and the line without its newline at the end
    assert relayed + capfd.readouterr().err == EXPECTED


def test_a_process_left_holding_the_pipe_keeps_nobody_waiting(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A process in a session of its own (as one a plugin double-forked) holds the write end
    and sleeps: ``close`` does not wait for it, and once closed it holds a pipe nobody reads
    (EPIPE), nothing of this process's."""
    relay = OutputRelay()
    spare = os.dup(relay.write_fd)  # the holder's end, seen from here
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nos.write(1, b'hello\\n')\ntime.sleep(60)\n"],
        stdout=relay.write_fd,
        stderr=relay.write_fd,
        start_new_session=True,
    )
    try:
        relay.close_write_end()
        relay.start_thread()
        deadline = time.monotonic() + 30
        relayed = ""
        while "hello" not in relayed and time.monotonic() < deadline:
            time.sleep(0.05)
            relayed += capfd.readouterr().err
        assert relayed == "hello\n"
        started = time.monotonic()
        relay.close()
        assert time.monotonic() - started < 1.0
        assert sleeper.poll() is None  # still there, still holding its end
        with pytest.raises(BrokenPipeError):
            os.write(spare, b"nobody reads this\n")
    finally:
        os.close(spare)
        sleeper.kill()
        sleeper.wait()


def _out_of_descriptors() -> OutputRelay:
    raise OSError(errno.EMFILE, "Too many open files")


async def test_a_worker_whose_output_pipe_cannot_be_made_is_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``os.pipe()`` failing (EMFILE) in ``_spawn`` raised out of the supervisor, which ended:
    the handler had no worker for as long as serve ran. Now a failed start, tried again after
    the backoff, its socket pair closed."""
    monkeypatch.setattr(child, "OutputRelay", _out_of_descriptors)
    monkeypatch.setattr(workers, "RESTART_DELAYS_SECONDS", (0.01,))
    spec = workers.WorkerSpec(
        name="log",
        item="log",
        environ={},
        allow_private_urls=False,
        timeout_seconds=5.0,
        log_format="json",
        log_level="info",
    )
    worker = workers.HandlerWorker(spec, on_ready=lambda: None)
    fds = len(os.listdir("/proc/self/fd"))
    worker.start()
    supervisor = worker._supervisor
    assert supervisor is not None
    await asyncio.wait({supervisor}, timeout=0.5)  # tries again every 10 ms meanwhile
    ended = supervisor.exception() if supervisor.done() else None
    assert ended is None
    assert worker.restarts >= 3
    assert len(os.listdir("/proc/self/fd")) == fds
    await worker.close()


def test_a_check_whose_output_pipe_cannot_be_made_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same at the plugin check: a ``ConfigError`` naming why, its socket pair closed."""
    monkeypatch.setattr(child, "OutputRelay", _out_of_descriptors)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match=r"did not start: .*Too many open files"):
        plugin_check._ask(("build", None), [], "json", "info")
    assert len(os.listdir("/proc/self/fd")) == fds
