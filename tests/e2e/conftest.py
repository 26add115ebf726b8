"""A real ``lacuna-webhooks serve`` process per test, on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_SECRET

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "lacuna-webhooks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """One ``serve`` process; ``start()`` returns once ``/readyz`` answers 200.

    ``wrapper`` is a command that execs ``serve`` (e.g. ``["prlimit", "--nofile=256"]``).
    """

    wrapper: tuple[str, ...] = ()

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
            "PYTHONPATH": str(REPO),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LACUNA_WEBHOOK_SECRET": TEST_SECRET,
            "LACUNA_LOG_FORMAT": "json",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"serve-{self.port}.log"
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/webhooks/lacuna"

    def start(self, timeout: float = 30.0) -> Serve:
        self.starts += 1
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*self.wrapper, CLI, "serve"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        pytest.fail(f"serve did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a `serve` or `worker` still running as its service manager would: SIGTERM, then
    SIGKILL if it has not exited 30 s later; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[type[Serve]]:
    made: list[Serve] = []

    class _Serve(Serve):
        def __init__(self, env: Mapping[str, str], workdir: Path = tmp_path) -> None:
            super().__init__(workdir, env)
            made.append(self)

    yield _Serve
    for s in made:
        s.stop()


def children(serve: Serve) -> dict[int, str]:
    """``serve``'s child processes: pid -> command line (the SQLite writer's runs
    ``store.sqlite.process``, each handler worker's ``worker_child``)."""
    assert serve.proc is not None
    tasks = Path(f"/proc/{serve.proc.pid}/task")
    found: dict[int, str] = {}
    for task in tasks.iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue  # exited between the two reads
            found[int(pid)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def handler_workers(serve: Serve) -> list[int]:
    """The process ids of ``serve``'s handler worker processes."""
    return [pid for pid, cmd in children(serve).items() if "worker_child" in cmd]


def wait_until(predicate: object, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; fail with ``what`` after ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")
