"""Intake latency while a handler blocks, against the same `serve` with an idle handler.

Runs `serve` (SQLite) under the same wrk load as `make bench`, three times:
without a handler ("none": intake alone), with a handler that returns at once
("idle": every event is also claimed, run and recorded), and with a handler
whose every attempt calls `time.sleep(30)` ("blocked": its worker process is
stuck for the whole run, so after the first claims nothing is dispatched).
With `--compare DIR` (another checkout's `service/` directory, e.g. the
previous code) the runs are repeated with that code, side by side. Prints
p50/p99 and accepted events/s per run.

    .venv/bin/python bench/blocking.py [--duration 10] [--connections 64] [--compare DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import SECRET, free_port, load, make_requests, wait_ready  # noqa: E402 - after path

PLUGIN = """
import time


class Blocker:
    name = "blocker"
    events = None

    def __init__(self, ctx):
        self.seconds = float(ctx.get("SLEEP", "0") or 0)

    async def handle(self, event):
        if self.seconds:
            time.sleep(self.seconds)  # blocks whatever event loop runs it

    async def aclose(self):
        return None
"""


def run(
    code: Path, phase: str, workdir: Path, requests: Path, args: argparse.Namespace
) -> dict[str, float]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "PYTHONPATH": os.pathsep.join([str(code), str(workdir)]),
        "LACUNA_WEBHOOK_SECRET": SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{workdir / f'{phase}-{port}.db'}",
        "LACUNA_HANDLERS": "" if phase == "none" else "blocker_plugin:Blocker",
        "LACUNA_BLOCKER_SLEEP": "30" if phase == "blocked" else "0",
        "LACUNA_BLOCKER_TIMEOUT": "60",
        "LACUNA_LOG_LEVEL": "warning",
        "LACUNA_LOG_FORMAT": "json",
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    cmd = [sys.executable, "-m", "lacuna_webhooks", "serve"]
    with (workdir / f"{phase}-{port}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
            return load(port, requests, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                # Code that runs handlers on its own loop cannot drain a blocked handler.
                print(f"  ({phase}: serve did not stop within 60 s of SIGTERM; killed)")
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent senders (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--compare", type=Path, help="another checkout's service/ directory")
    args = parser.parse_args()
    args.keep = False
    codes = {"this": HERE.parent / "service"}
    if args.compare:
        codes["compare"] = args.compare
    with tempfile.TemporaryDirectory(prefix="lacuna-block-") as tmp:
        workdir = Path(tmp)
        args.workdir = workdir
        (workdir / "blocker_plugin.py").write_text(PLUGIN)
        requests = workdir / "requests.txt"
        make_requests(requests, 40_000 * args.duration, args.threads)
        for label, code in codes.items():
            for phase in ("none", "idle", "blocked"):
                r = run(code, phase, workdir, requests, args)
                print(
                    f"{label:8} {phase:8} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
                    f"{r['rps']:8.0f} req/s  non2xx {r['non2xx']}  errors {r['errors']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
