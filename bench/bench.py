"""`make bench`: a real `serve` against a bare Starlette endpoint, under the same load.

Both run as one uvicorn process on this machine; the load is unique, validly
signed ~1.5 KB events over keep-alive connections, driven by wrk when it is
installed (else by a small asyncio client, which is slower and says so).
Prints accepted events/s, p50/p99 latency, peak RSS, and last the line
`ratio: 0.NN` (events accepted per second by `serve` / requests per second of
the bare endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from lacuna_webhooks.samples import sample_event
from lacuna_webhooks.signature import sign

HERE = Path(__file__).resolve().parent
SECRET = "whsec_bench_0123456789abcdef0123456789"
PADDING = "la " * 365  # lyrics that bring an event to about 1.5 KB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_requests(path: Path, count: int) -> int:
    """Write `count` signed unique events; return the body size of the first."""
    now = int(time.time())
    size = 0
    with path.open("wb") as fh:
        for i in range(count):
            event = sample_event(event_id=f"evt_bench_{now}_{i:08d}", created=now)
            event["data"]["tracks"][0]["lyrics"] = PADDING
            body = orjson.dumps(event)
            size = size or len(body)
            fh.write(sign(body, SECRET, now).encode() + b"\t" + body + b"\n")
    return size


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit("bench: server did not start")


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def peak_rss_mib(pid: int) -> float:
    """Peak RSS of the server and its child processes (serve's SQLite writer), summed."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    return sum(_vm_hwm_kib(p) for p in pids) / 1024


def run_wrk(port: int, requests: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "BENCH_REQUESTS": str(requests), "BENCH_THREADS": str(args.threads)}
    out = subprocess.run(
        [
            "wrk",
            f"-t{args.threads}",
            f"-c{args.connections}",
            f"-d{args.duration}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "wrk.lua"),
            f"http://127.0.0.1:{port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH "))
    fields = dict(item.split("=") for item in line.split()[1:])
    seconds = int(fields["duration_us"]) / 1e6
    return {
        "requests": int(fields["requests"]),
        "seconds": seconds,
        "rps": int(fields["requests"]) / seconds,
        "p50_ms": int(fields["p50_us"]) / 1000,
        "p99_ms": int(fields["p99_us"]) / 1000,
        "non2xx": int(fields["non2xx"]),
        "errors": int(fields["errors"]),
    }


async def _python_load(port: int, lines: list[bytes], args: argparse.Namespace) -> dict[str, float]:
    cursor = iter(range(len(lines)))
    latencies: list[float] = []
    non2xx = 0
    stop_at = time.monotonic() + args.duration

    async def connection() -> None:
        nonlocal non2xx
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop_at:
            i = next(cursor, None)
            if i is None:
                break
            sig, body = lines[i].split(b"\t", 1)
            writer.write(
                b"POST /webhooks/lacuna HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                b"\r\nx-lacuna-signature: "
                + sig
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            started = time.perf_counter()
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 2"):
                non2xx += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(args.connections)))
    seconds = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "rps": len(latencies) / seconds,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "non2xx": non2xx,
        "errors": 0,
    }


def load(port: int, requests: Path, args: argparse.Namespace) -> dict[str, float]:
    if shutil.which("wrk"):
        return run_wrk(port, requests, args)
    return asyncio.run(_python_load(port, requests.read_bytes().splitlines(), args))


def measure(
    cmd: list[str],
    env: dict[str, str],
    port: int,
    requests: Path,
    args: argparse.Namespace,
    ready_path: str,
) -> tuple[dict[str, float], float]:
    log_path = args.workdir / f"server-{port}.log" if args.keep else Path(os.devnull)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc)
            result = load(port, requests, args)
            rss = peak_rss_mib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return result, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent senders (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--requests", type=int, default=0, help="events to pre-sign (auto)")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--handlers", default="", help="LACUNA_HANDLERS for serve (none)")
    parser.add_argument("--keep", action="store_true", help="keep server logs in the workdir")
    args = parser.parse_args()
    args.workdir = Path(tempfile.mkdtemp(prefix="lacuna-bench-"))
    # Enough unique events for the whole run: wrk starts over from the first when it runs out,
    # and a repeat is a duplicate, not an accepted event.
    count = args.requests or 40_000 * args.duration
    requests = args.workdir / "requests.tsv"
    size = make_requests(requests, count)
    driver = (
        "wrk" if shutil.which("wrk") else "python asyncio client (install wrk for truer figures)"
    )
    print(
        f"machine: {os.cpu_count()} cores, {sys.platform}; load: {driver}, "
        f"{args.connections} connections, {args.duration}s, {size}-byte events"
    )

    port = free_port()
    bare, bare_rss = measure(
        [sys.executable, str(HERE / "bare.py"), str(port)],
        dict(os.environ),
        port,
        requests,
        args,
        "/webhooks/lacuna",
    )
    port = free_port()
    db = args.workdir / "bench.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "LACUNA_WEBHOOK_SECRET": SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{db}",
        "LACUNA_SQLITE_SYNCHRONOUS": args.synchronous,
        "LACUNA_HANDLERS": args.handlers,
        "LACUNA_LOG_FORMAT": "json",
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    cli = str(Path(sys.executable).parent / "lacuna-webhooks")
    served, served_rss = measure([cli, "serve"], env, port, requests, args, "/healthz")
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    accepted_rate = stored / served["seconds"]

    print(f"{'':28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'peak RSS MiB':>14}")
    print(
        f"{'bare starlette (ceiling)':28}{bare['rps']:>10.0f}{bare['p50_ms']:>9.2f}"
        f"{bare['p99_ms']:>9.2f}{bare['non2xx']:>9}{bare_rss:>14.1f}"
    )
    print(
        f"{'lacuna-webhooks serve':28}{served['rps']:>10.0f}{served['p50_ms']:>9.2f}"
        f"{served['p99_ms']:>9.2f}{served['non2xx']:>9}{served_rss:>14.1f}"
    )
    print(
        f"serve: {stored} unique events stored durably (synchronous={args.synchronous}) "
        f"= {accepted_rate:.0f} accepted events/s"
    )
    print(f"ratio: {accepted_rate / bare['rps']:.2f}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
