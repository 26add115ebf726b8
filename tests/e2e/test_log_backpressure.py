"""A reader of ``serve``'s standard error that stops reading never stalls intake.

``serve`` logs one line per webhook. Its standard error here is a pipe, a socket (as
journald's stream is) or a terminal whose other end nobody reads while the webhooks come:
before, once its buffer was full, the event loop waited in that write and every webhook
and /healthz with it. Now each webhook is answered within the bound, and once the reader
reads again every line comes, in order (the backlog is far below its bound here)."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_event, signed
from tests.e2e.conftest import CLI, Serve, wait_until

#: Generous: an answer must not wait for a log reader, but the machine is shared and busy.
ANSWER_BOUND_SECONDS = 5.0
EVENTS = 400  # about 100 KB of request log: more than a pipe, a small socket or a pty holds


def ready(serve: Serve) -> bool:
    try:
        return httpx.get(f"{serve.base_url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def stderr_nobody_reads(kind: str) -> tuple[int, Callable[[], bytes], Callable[[], None]]:
    """(the descriptor serve gets as stderr, a read of its other end, close both)."""
    if kind == "pipe":
        read_end, write_end = os.pipe()
        return write_end, lambda: os.read(read_end, 65536), lambda: _close(read_end, write_end)
    if kind == "socket":
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):  # small buffers: full after a few lines
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return theirs.fileno(), lambda: ours.recv(65536), lambda: (ours.close(), theirs.close())
    master, slave = pty.openpty()
    return slave, lambda: os.read(master, 65536), lambda: _close(master, slave)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("kind", ["pipe", "socket", "terminal"])
def test_a_reader_of_serves_stderr_that_stops_reading_stalls_no_webhook(
    tmp_path: Path, kind: str
) -> None:
    serve = Serve(tmp_path, {"LACUNA_DATABASE_URL": f"sqlite:///{tmp_path}/events.db"})
    fd, read, close = stderr_nobody_reads(kind)
    serve.proc = subprocess.Popen(
        [CLI, "serve"], cwd=tmp_path, env=serve.env, stdout=subprocess.DEVNULL, stderr=fd
    )
    try:
        got = bytearray()
        # Until it is ready nothing is held back: its start-up lines are read as they come.
        deadline = time.monotonic() + 30
        reading = threading.Event()
        reading.set()

        def reader() -> None:
            while True:
                reading.wait()
                try:
                    data = read()
                except OSError:
                    return
                if not data:
                    return
                got.extend(data)

        threading.Thread(target=reader, daemon=True).start()
        while not ready(serve):
            assert time.monotonic() < deadline, "serve did not become ready"
            assert serve.proc.poll() is None, bytes(got).decode(errors="replace")
            time.sleep(0.05)
        reading.clear()  # the reader stops (it may finish the read it is in)
        time.sleep(0.2)
        with httpx.Client(timeout=ANSWER_BOUND_SECONDS) as client:
            for i in range(EVENTS):
                body, headers = signed(make_event(f"evt_backpressure_{i}", task_id=f"t{i}"))
                response = client.post(serve.webhook_url, content=body, headers=headers)
                assert response.status_code == 200, response.text
            assert client.get(f"{serve.base_url}/healthz").status_code == 200
        reading.set()
        received = [f'"evt_backpressure_{i}"'.encode() for i in range(EVENTS)]
        wait_until(
            lambda: all(event_id in got for event_id in received[-3:]),
            what="the held request log lines written once the reader reads again",
        )
        lines = [line for line in bytes(got).splitlines() if b"webhook.received" in line]
        order = [next(i for i, r in enumerate(received) if r in line) for line in lines]
        assert order == list(range(EVENTS))  # every line, in order, none cut
    finally:
        serve.proc.kill()
        serve.proc.wait()
        close()
