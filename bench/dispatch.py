"""`make bench`, second part: dispatch throughput from a real `serve` to each local broker.

For each of nats, rabbitmq, redis (the local servers on their usual ports),
sqs (moto's server in this process) and http (the `http` handler forwarding to
a receiver in this process, `http.server` in a thread answering 200), one
`serve` with only that handler gets
``--events`` unique signed events from ``--connections`` concurrent senders.
Printed per broker: events/s published and acknowledged (events / time from
the first send to the last successful ``delivery.attempt``) and the p50 of
receipt-to-publish latency (send of the event → its successful attempt as
logged by `serve`, both on this machine's clock). A broker that does not
answer prints ``skipped: <broker> unreachable`` and the others go on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from lacuna_webhooks.samples import sample_event
from lacuna_webhooks.signature import sign

SECRET = "whsec_bench_0123456789abcdef0123456789"
NATS_URL = os.environ.get("LACUNA_BENCH_NATS_URL", "nats://127.0.0.1:4222")
RABBITMQ_URL = os.environ.get("LACUNA_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("LACUNA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def nats_target(tag: str) -> Iterator[dict[str, str]]:
    import nats
    from nats.js.api import StreamConfig

    name, prefix = f"BENCH_{tag}", f"bench{tag}"

    async def setup(add: bool) -> None:
        client = await nats.connect(NATS_URL)
        js = client.jetstream()
        if add:
            await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
        else:
            await js.delete_stream(name)
        await client.close()

    asyncio.run(setup(True))
    try:
        yield {"LACUNA_NATS_URL": NATS_URL, "LACUNA_NATS_SUBJECT": prefix + ".{type}"}
    finally:
        asyncio.run(setup(False))


@contextlib.contextmanager
def rabbitmq_target(tag: str) -> Iterator[dict[str, str]]:
    import aio_pika

    queue = f"lacuna-bench-{tag}"

    async def setup(add: bool) -> None:
        connection = await aio_pika.connect(RABBITMQ_URL)
        channel = await connection.channel()
        if add:
            await channel.declare_queue(queue)
        else:
            await channel.queue_delete(queue)
        await connection.close()

    asyncio.run(setup(True))
    try:
        yield {"LACUNA_RABBITMQ_URL": RABBITMQ_URL, "LACUNA_RABBITMQ_ROUTING_KEY": queue}
    finally:
        asyncio.run(setup(False))


@contextlib.contextmanager
def redis_target(tag: str) -> Iterator[dict[str, str]]:
    import redis

    stream = f"lacuna-bench:{tag}"
    try:
        yield {"LACUNA_REDIS_URL": REDIS_URL, "LACUNA_REDIS_STREAM": stream}
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(stream)
        for key in client.scan_iter("lacuna-seen:*", count=1000):
            client.delete(key)
        client.close()


@contextlib.contextmanager
def sqs_target(tag: str) -> Iterator[dict[str, str]]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client(
            "sqs",
            region_name="us-east-1",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",  # noqa: S106  (moto accepts any credentials)
        )
        queue_url = client.create_queue(QueueName=f"bench-{tag}")["QueueUrl"]
        yield {
            "LACUNA_SQS_QUEUE_URL": queue_url,
            "LACUNA_SQS_ENDPOINT": endpoint,
            "LACUNA_SQS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }
    finally:
        server.stop()


class Receiver(BaseHTTPRequestHandler):
    """The forward target: reads the body, answers 200, logs nothing."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_target(tag: str) -> Iterator[dict[str, str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, name=f"receiver-{tag}", daemon=True)
    thread.start()
    secret = "whsec_" + base64.b64encode(f"bench-receiver-{tag}".encode()).decode()
    try:
        yield {
            "LACUNA_HTTP_URL": f"http://127.0.0.1:{server.server_address[1]}/hook",
            "LACUNA_HTTP_SECRET": secret,
        }
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


TARGETS: dict[str, tuple[tuple[str, int] | None, Callable[[str], Any]]] = {
    "nats": (("127.0.0.1", 4222), nats_target),
    "rabbitmq": (("127.0.0.1", 5672), rabbitmq_target),
    "redis": (("127.0.0.1", 6379), redis_target),
    "sqs (moto)": (None, sqs_target),
    "http": (None, http_target),
}


async def send_all(url: str, bodies: list[tuple[str, bytes]], connections: int) -> dict[str, float]:
    """POST every event; return event id -> wall-clock time of its send."""
    sent: dict[str, float] = {}
    queue = list(reversed(bodies))

    async def sender(client: httpx.AsyncClient) -> None:
        while queue:
            event_id, body = queue.pop()
            headers = {"x-lacuna-signature": sign(body, SECRET, int(time.time()))}
            sent[event_id] = time.time()
            response = await client.post(url, content=body, headers=headers)
            response.raise_for_status()

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(sender(client) for _ in range(connections)))
    return sent


def published(log: Path, handler: str) -> dict[str, float]:
    """event id -> time of its successful delivery attempt, from serve's JSON log."""
    done: dict[str, float] = {}
    for line in log.read_bytes().splitlines():
        if b"delivery.attempt" not in line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if entry.get("handler") == handler and entry.get("outcome") == "ok":
            stamp = datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00"))
            done[str(entry["event_id"])] = stamp.timestamp()
    return done


def run_one(kind: str, label: str, env: dict[str, str], args: argparse.Namespace) -> str:
    port = free_port()
    log = args.workdir / f"serve-{kind}.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LACUNA_")},
        "LACUNA_WEBHOOK_SECRET": SECRET,
        "LACUNA_DATABASE_URL": f"sqlite:///{args.workdir / f'{kind}.db'}",
        "LACUNA_HANDLERS": kind,
        "LACUNA_LOG_FORMAT": "json",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **env,
    }
    cli = str(Path(sys.executable).parent / "lacuna-webhooks")
    with log.open("wb") as out:
        proc = subprocess.Popen([cli, "serve"], env=full_env, stdout=out, stderr=out)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                return f"{label}: serve did not start (see {log})"
            time.sleep(0.1)
        now = int(time.time())
        bodies = []
        for _ in range(args.events):
            event = sample_event(event_id=f"evt_bench_{uuid.uuid4().hex}", created=now)
            bodies.append((str(event["id"]), orjson.dumps(event)))
        sent = asyncio.run(send_all(f"{base}/webhooks/lacuna", bodies, args.connections))
        deadline = time.monotonic() + args.timeout
        done = published(log, kind)
        while len(done) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.25)
            done = published(log, kind)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not done:
        return f"{label}: no successful delivery.attempt logged (see {log})"
    seconds = max(done.values()) - min(sent.values())
    latencies = [(done[i] - sent[i]) * 1000 for i in done if i in sent]
    missing = len(sent) - len(done)
    done_as, verb = ("forwarded", "forward") if kind == "http" else ("published", "publish")
    acknowledged = "" if kind == "http" else " and acknowledged"
    return (
        f"{label + ':':<12}{len(done) / seconds:>8.0f} events/s {done_as}{acknowledged}, "
        f"p50 receipt-to-{verb} {statistics.median(latencies):.1f} ms"
        + (f" ({missing} not {done_as} within {args.timeout:g} s)" if missing else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="events per broker (2000)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent senders (16)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait (60)")
    parser.add_argument("--only", default="", help="comma-separated targets (all)")
    args = parser.parse_args()
    args.workdir = Path(tempfile.mkdtemp(prefix="lacuna-bench-dispatch-"))
    wanted = {b.strip() for b in args.only.split(",") if b.strip()}
    print(f"dispatch: {args.events} events per broker, {args.connections} senders")
    try:
        for label, (address, target) in TARGETS.items():
            kind = label.split()[0]
            if wanted and kind not in wanted:
                continue
            if address is not None and not reachable(*address):
                print(f"skipped: {kind} unreachable")
                continue
            tag = uuid.uuid4().hex[:10]
            try:
                with target(tag) as env:
                    print(run_one(kind, label, env, args), flush=True)
            except ImportError as exc:
                print(f"skipped: {kind} ({exc.name} not installed: pip install '.[brokers]')")
            except Exception as exc:  # one broker's trouble must not hide the others' lines
                print(f"skipped: {kind} failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
