"""`make bench`: a real `serve` against a bare Starlette endpoint, under the same load.

Both run as one uvicorn process on this machine; the load is unique, validly
signed ~1.5 KB events over keep-alive connections, driven by wrk when it is
installed (else by a small asyncio client, which is slower and says so).
Prints accepted events/s, p50/p99 latency, peak RSS, and last the lines
`p99 ratio: N.NN` (serve's p99 latency / the bare endpoint's) and
`ratio: 0.NN` (events accepted per second by `serve` / requests per second of
the bare endpoint). `--baseline DIR` also runs another checkout's `serve` in
each round, right after this one's, for a side-by-side comparison on a machine
whose speed drifts; `--rounds N` repeats and prints the medians. The events are
signed once, so every run must start within the 300 s signature window.
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


def make_requests(path: Path, count: int, threads: int = 2) -> int:
    """Write `count` signed unique events; return the body size of the first.

    ``path`` gets one "signature<TAB>body" line per event (the Python client reads it);
    ``wrk_requests(path, n)`` gets, for wrk's thread n of ``threads``, every n-th event as a
    ready HTTP/1.1 request, each after its length in 8 digits, so that wrk.lua reads them one
    at a time instead of loading them all before its thread starts (see wrk.lua)."""
    now = int(time.time())
    size = 0
    wrk_files = [wrk_requests(path, n).open("wb") for n in range(threads)]
    with path.open("wb") as fh:
        for i in range(count):
            event = sample_event(event_id=f"evt_bench_{now}_{i:08d}", created=now)
            event["data"]["tracks"][0]["lyrics"] = PADDING
            body = orjson.dumps(event)
            size = size or len(body)
            signature = sign(body, SECRET, now).encode()
            fh.write(signature + b"\t" + body + b"\n")
            request = (
                b"POST /webhooks/lacuna HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"x-lacuna-signature: " + signature + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wrk_files[i % threads].write(b"%08d" % len(request) + request)
        # On disk before any run: else the kernel writes these hundreds of MB back during the
        # first `serve` run, whose fsyncs then queue behind them (the "first-run stall", a
        # p99 of 250-570 ms in the first serve of each invocation: docs/performance.md).
        for out in (fh, *wrk_files):
            out.flush()
            os.fsync(out.fileno())
    for out in wrk_files:
        out.close()
    return size


def wrk_requests(path: Path, thread: int) -> Path:
    """The file of wrk's thread ``thread`` next to the events file ``path`` (make_requests)."""
    return path.with_name(f"{path.name}.{thread}.http")


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


def _tree(pid: int) -> list[int]:
    """The server and its child processes (serve's SQLite writer)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def peak_rss_mib(pid: int) -> float:
    """Peak RSS of the server and its child processes, summed."""
    return sum(_vm_hwm_kib(p) for p in _tree(pid)) / 1024


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of the server and each of its child processes, by pid."""
    return {p: _cpu_seconds(p) for p in _tree(pid)}


def run_wrk(port: int, requests: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "BENCH_REQUESTS": str(requests)}
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
            before = tree_cpu(proc.pid)
            result = load(port, requests, args)
            after = tree_cpu(proc.pid)
            rss = peak_rss_mib(proc.pid)
            # CPU per answered request, in µs: the server process, then its children (serve's
            # SQLite writer) summed. Steadier than req/s on a machine whose speed drifts.
            spent = {p: after[p] - before.get(p, 0.0) for p in after}
            answered = max(result["requests"], 1)
            result["cpu_us"] = spent.pop(proc.pid) / answered * 1e6
            result["child_cpu_us"] = sum(spent.values()) / answered * 1e6
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return result, rss


def measure_serve(
    requests: Path, args: argparse.Namespace, source: Path | None
) -> tuple[dict[str, float], float, float]:
    """One `serve` run on a fresh database: (load result, peak RSS MiB, stored events/s).
    ``source``: another checkout whose ``service/`` package is run instead of this one."""
    port = free_port()
    db = args.workdir / f"bench-{port}.db"
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
    # `python -m lacuna_webhooks` from the checkout's own tree, for this one and --baseline
    # alike: the venv's console script imports the entry module of the installed version,
    # which an older checkout may not have.
    env["PYTHONPATH"] = str((source or HERE.parent).resolve() / "service")
    cmd = [sys.executable, "-m", "lacuna_webhooks", "serve"]
    served, rss = measure(cmd, env, port, requests, args, "/healthz")
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    return served, rss, stored / served["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (10)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent senders (64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--requests", type=int, default=0, help="events to pre-sign (auto)")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--handlers", default="", help="LACUNA_HANDLERS for serve (none)")
    parser.add_argument("--keep", action="store_true", help="keep server logs in the workdir")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add ../main main`): its serve is measured "
        "right after this one's, in the same round",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of bare + serve (1)")
    args = parser.parse_args()
    args.workdir = Path(tempfile.mkdtemp(prefix="lacuna-bench-"))
    # Enough unique events for the whole run: wrk starts over from the first when it runs out,
    # and a repeat is a duplicate, not an accepted event.
    count = args.requests or 40_000 * args.duration
    requests = args.workdir / "requests.tsv"
    size = make_requests(requests, count, args.threads)
    driver = (
        "wrk" if shutil.which("wrk") else "python asyncio client (install wrk for truer figures)"
    )
    print(
        f"machine: {os.cpu_count()} cores, {sys.platform}; load: {driver}, "
        f"{args.connections} connections, {args.duration}s, {size}-byte events"
    )

    rows: list[tuple[str, dict[str, float], float, float]] = []
    ratios: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        port = free_port()
        bare, bare_rss = measure(
            [sys.executable, str(HERE / "bare.py"), str(port)],
            dict(os.environ),
            port,
            requests,
            args,
            "/webhooks/lacuna",
        )
        rows.append(("bare starlette (ceiling)", bare, bare["rps"], bare_rss))
        for label, source in [
            ("lacuna-webhooks serve", None),
            ("serve, --baseline", args.baseline),
        ]:
            if label != "lacuna-webhooks serve" and source is None:
                continue
            served, rss, rate = measure_serve(requests, args, source)
            rows.append((label, served, rate, rss))
            ratios.setdefault(label, []).append(
                (rate / bare["rps"], served["p99_ms"] / max(bare["p99_ms"], 1e-6))
            )

    print(
        f"{'':28}{'req/s':>10}{'stored/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}"
        f"{'peak RSS MiB':>14}{'CPU µs/req':>12}{'+children':>10}"
    )
    for label, result, rate, rss in rows:
        print(
            f"{label:28}{result['rps']:>10.0f}{rate:>10.0f}{result['p50_ms']:>9.2f}"
            f"{result['p99_ms']:>9.2f}{result['non2xx']:>9}{rss:>14.1f}"
            f"{result['cpu_us']:>12.1f}{result['child_cpu_us']:>10.1f}"
        )
    if args.baseline:
        base = ratios["serve, --baseline"]
        print(
            f"baseline ({args.baseline}): ratio {statistics.median(r for r, _ in base):.2f}, "
            f"p99 ratio {statistics.median(p for _, p in base):.2f}"
        )
    mine = ratios["lacuna-webhooks serve"]
    print(f"synchronous={args.synchronous}; stored/s = unique events found stored afterwards")
    # Medians over --rounds; each round measures bare and serve back to back.
    print(f"p99 ratio: {statistics.median(p for _, p in mine):.2f} (serve p99 / bare p99)")
    print(f"ratio: {statistics.median(r for r, _ in mine):.2f}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
