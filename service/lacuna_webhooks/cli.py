"""The command line, and the composition root: the only module that wires everything together.

``lacuna-webhooks serve | worker | dev | send | events | deliveries | replay | backfill |
retry-dead | migrate | handlers | tail | listen``. Errors are one line on stderr
(``lacuna-webhooks: error: ...``) and a non-zero exit: 2 for bad arguments or settings, 1 for
anything else that went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import gc
import math
import os
import re
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import orjson

from . import __version__
from .config import (
    HANDLER_NAME_RE,
    MAX_BODY_BYTES,
    Settings,
    is_utf8,
    parse_list,
    quoted,
    read_file_setting,
    read_setting,
)
from .config import _host as _config_host
from .errors import ConfigError, EventNotFound, LacunaError, StoreUnavailable
from .models import MAX_ID_LENGTH, MAX_TYPE_LENGTH, DeliveryStatus
from .redact import (
    mask_secrets,
    printable,
    printable_json,
    printable_lines,
    redact_text,
    redact_url,
    remember_secrets,
    secret_values,
)
from .store import DeliveryRecord, EventRecord, Store, open_store

if TYPE_CHECKING:
    from .admin.client import AdminClient, EventDetail
    from .listen import Target
    from .plugins import BuildRequest, HandlerSet
    from .store.base import AttemptRecord, EventFilter
    from .tracing import Tracing

PROG = "lacuna-webhooks"
#: Largest ``--limit`` of the list commands (the admin API's bound, SPEC §9, is 500); a
#: bound at all keeps a huge number from overflowing the database's integer.
MAX_LIST_LIMIT = 100_000
T = TypeVar("T")


class CommandError(Exception):
    """A command failed in a way the user can fix; printed as one line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _exists(path: Path, what: str) -> bool:
    """``path.exists()`` for a path the user named (``what``: the option or setting), with a
    path the system cannot look up at all (a name too long for it, a folder it may not
    search) as one ``CommandError`` line: ``Path.exists`` raises every ``OSError`` but a
    missing file's, and ``dev --env-file`` or ``events list`` ended in a traceback."""
    try:
        return path.exists()
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "…"
        raise CommandError(f"{what}: cannot use {shown}: {exc.strerror or exc}", 2) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump; an argument quoted in it (an
        # unrecognized one is quoted raw) with its control characters escaped: a newline
        # split the line, an ESC drove the terminal.
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def _unrecognized(extras: Sequence[str]) -> str:
    """Arguments no command takes, as the usage error names them, without the value of any
    option among them: argparse quoted them whole, and an option a command does not take is
    often a credential given to the wrong one (``migrate --token T``, ``serve --secret=S``)
    or mistyped (``--tokne T``). An option is shown by name (``--token …``, ``--secret=…``,
    ``-t…`` for ``-tT``); a positional argument that follows no option is shown as given, a
    URL in it redacted (``migrate postgresql://app:pw@db/x`` printed the password)."""
    shown: list[str] = []
    after_option = False
    for arg in extras:
        if arg.startswith("-") and len(arg) > 1:
            name, eq, _ = arg.partition("=")
            if not eq and not name.startswith("--") and len(name) > 2:
                shown.append(name[:2] + "…")  # a short option with its value attached
                after_option = False
                continue
            shown.append(name + ("=…" if eq else ""))
            after_option = not eq
        else:
            shown.append("…" if after_option else redact_text(arg) if "://" in arg else arg)
            after_option = False
    return " ".join(shown)


# --- serve ---------------------------------------------------------------------------------


def _settings(
    environ: Mapping[str, str], *, require_secret: bool, with_handlers: bool = False
) -> Settings:
    """``Settings.from_env`` as a command needs it; its ``ConfigError`` is one
    ``CommandError`` line. ``with_handlers`` (``serve``, ``worker``): when the global
    settings are bad, the handlers' own are checked too and listed with them, so every bad
    setting is reported at once (the handlers are otherwise built only once the global
    settings are good)."""
    try:
        return Settings.from_env(environ, require_secret=require_secret)
    except ConfigError as exc:
        problems = list(exc.problems)
        if with_handlers and not any(p.startswith("LACUNA_HANDLERS") for p in problems):
            problems += _handler_problems(environ)
        raise CommandError(f"configuration: {ConfigError(problems)}", exit_code=2) from None


def _handler_problems(environ: Mapping[str, str]) -> list[str]:
    """What ``build_handlers`` finds wrong with ``LACUNA_HANDLERS``'s instances, read with
    the global settings' defaults. The instances it builds are dropped unused, as
    ``_handlers_of`` drops its own."""
    from .plugin_check import build_checked
    from .plugins import BuildRequest

    try:
        build_checked(BuildRequest(tuple(parse_list(environ.get("LACUNA_HANDLERS", ""))), environ))
    except ConfigError as exc:
        return list(exc.problems)
    return []


def log_secret_warnings(settings: Settings) -> None:
    """One ``config.secret_suspicious`` warning per secret that cannot be right.

    Names the variable and what is wrong, never the value; call once at start,
    after logging is configured.
    """
    import structlog

    logger = structlog.get_logger("lacuna_webhooks.config")
    for variable, problem in settings.secret_warnings:
        logger.warning("config.secret_suspicious", variable=variable, problem=problem)


def _handlers_of(settings: Settings) -> HandlerSet:
    """Build every configured handler here too: a bad setting stops the command at start
    with one line, and intake learns each handler's event filter. Their ``handle`` runs
    only in the worker processes."""
    from .logs import configure

    configure(
        log_format=settings.log_format,
        level=settings.log_level,
        secrets=secret_values(settings.environ),
    )
    log_secret_warnings(settings)
    try:
        built = _build(settings, settings.handlers)  # flow-control settings checked too
    except ConfigError as exc:
        raise CommandError(f"configuration: {exc}", exit_code=2) from None
    log_unknown_variables(settings, built.names)
    # Each handler runs (and is closed) in its worker process; these copies are not used.
    return built.without_instances()


def log_unknown_variables(settings: Settings, instances: Sequence[str]) -> None:
    """One ``config.unknown_variable`` warning per ``LACUNA_*`` variable nothing can read (a
    typo such as ``LACUNA_HANDLER``), with the likely intended name, and one
    ``config.unused_variables`` info line listing the settings of handlers that
    ``LACUNA_HANDLERS`` does not configure: the service would otherwise run without them and
    say nothing. Names, never values."""
    import structlog

    from .config import unknown_variables
    from .plugins import available

    logger = structlog.get_logger("lacuna_webhooks.config")
    unknown, unused = unknown_variables(settings.environ, instances, available())
    for variable, hint in unknown:
        logger.warning("config.unknown_variable", variable=variable, hint=hint)
    if unused:
        logger.info(
            "config.unused_variables",
            variables=unused,
            reason="settings of handlers LACUNA_HANDLERS does not configure",
        )


def _build_request(
    settings: Settings, items: Sequence[str], *, check_order: bool = True
) -> BuildRequest:
    """The ``build_handlers`` call of ``items`` with the global values of ``settings``."""
    from .plugins import BuildRequest
    from .retry import RetryPolicy

    return BuildRequest(
        tuple(items),
        settings.environ,
        allow_private_urls=settings.allow_private_urls,
        timeout_seconds=settings.handler_timeout_seconds,
        concurrency=settings.handler_concurrency,
        policy=RetryPolicy(
            max_attempts=settings.retry_max_attempts,
            base_delay_seconds=settings.retry_base_delay_seconds,
            max_delay_seconds=settings.retry_max_delay_seconds,
        ),
        check_order=check_order,
    )


def _build(settings: Settings, items: Sequence[str], *, check_order: bool = True) -> HandlerSet:
    """``build_handlers`` with the global values of ``settings`` (``ConfigError`` as it); a
    third-party plugin is built in a check process, never here (``plugin_check``)."""
    from .plugin_check import build_checked

    return build_checked(
        _build_request(settings, items, check_order=check_order),
        log_format=settings.log_format,
        log_level=settings.log_level,
    )


async def _open_service_store(settings: Settings, handlers: HandlerSet) -> Store:
    """The opened store of ``serve`` or ``worker``; a failure is one line (handlers closed)."""
    # SQLite's writer in a process of its own: the request path never waits for its GIL.
    store = open_store(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        sqlite_process=True,
    )
    try:
        await store.open()
    except ConfigError:
        await handlers.aclose()
        raise
    except (StoreUnavailable, OSError, ValueError) as exc:
        await handlers.aclose()
        raise _store_error(exc, settings.database_url, "cannot open the store") from None
    return store


async def _own_sqlite_file(url: str) -> int | None:
    """Whether another ``serve`` runs on this SQLite file: an exclusive ``flock`` on the
    database file, held until ``serve`` ends (the descriptor returned, closed by the caller
    after the store; ``None`` on PostgreSQL). Two may share the file for a while (a rolling
    restart, docs/operations.md), so a second one is not refused, but it says so:
    ``serve.sqlite_shared`` (they take turns at one write lock and gain nothing; a forgotten
    one keeps dispatching). The CLI's store commands do not take the lock.

    ``flock`` is not the POSIX lock SQLite takes (on Linux the two are independent), but
    closing any descriptor of the file drops this process's POSIX locks on it: the
    descriptor is closed only once the store is."""
    if not url.startswith("sqlite:///"):
        return None
    import fcntl

    import structlog

    log = structlog.get_logger("lacuna_webhooks.cli")
    path = url.removeprefix("sqlite:///")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # removed under us since the store opened it: its own line later
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            log.warning(
                "serve.sqlite_shared",
                path=path,
                hint="another serve runs on this SQLite file: fine for a rolling restart; "
                "stop one, or use PostgreSQL for replicas",
            )
    return fd


def _tracing(environ: Mapping[str, str]) -> Tracing | None:
    """``load_tracing`` (docs/observability.md), its ``ConfigError`` as one line."""
    from .tracing_config import load_tracing

    try:
        return load_tracing(environ)
    except ConfigError as exc:
        raise CommandError(f"configuration: {exc}", exit_code=2) from None


_Prepared: TypeAlias = "tuple[Settings, Tracing | None, HandlerSet]"


def _serve_settings(environ: Mapping[str, str]) -> _Prepared:
    """What ``serve`` checks before it starts anything: the settings, tracing and every
    handler (``CommandError``, one line, for the first bad one)."""
    settings = _settings(environ, require_secret=True, with_handlers=True)
    tracing = _tracing(environ)
    return settings, tracing, _handlers_of(settings)


def _serve(
    environ: Mapping[str, str],
    host: str | None,
    port: int | None,
    prepared: _Prepared | None = None,
    sockets: list[socket.socket] | None = None,
) -> int:
    """``serve``: intake, dispatch and (with a token) the admin listener, until a signal.
    ``prepared``/``sockets``: what ``_serve_settings``/``_bind_webhook`` gave the caller."""
    from .app import create_app
    from .dispatch.workers import WorkerPool, worker_specs
    from .metrics import Metrics
    from .server import WEBHOOK_SHARE, server_config

    settings, tracing, handlers = prepared or _serve_settings(environ)
    _Server = _server_class()
    host = host or settings.host
    port = port or settings.port
    # The port first: a second `serve` on a port in use ends here, with one line, before it
    # has started a store writer, a dispatcher and workers against the same database.
    sockets = sockets or _bind_webhook(host, port)
    interrupted: list[int] = []

    async def run() -> None:
        store = await _open_service_store(settings, handlers)
        owned = await _own_sqlite_file(settings.database_url)
        try:
            metrics = Metrics()
            # Handler code runs in worker processes of its own (docs/workers.md): nothing it
            # does (block, spin, exit, crash) can stall or end intake.
            pool = WorkerPool(worker_specs(settings, handlers), metrics=metrics)
            app = create_app(
                settings,
                store=store,
                handlers=handlers,
                metrics=metrics,
                dispatch=settings.dispatch,
                runner=pool,
                tracing=tracing,
            )
            # The HTTP layer's limits and timeouts (server.py, docs/http.md).
            config = server_config(
                app,
                settings,
                app.state.metrics,
                host=host,
                port=port,
                # the admin listener, when there is one, takes the rest of the file limit
                share=WEBHOOK_SHARE if settings.admin_tokens else 1.0,
            )
            server = _Server(config, app.state, settings.shutdown_timeout_seconds)
            # The admin API on a listener of its own (SPEC §9), or none without a token.
            admin = _admin_listener(settings, store, handlers, metrics, config.host, config.port)
            # uvicorn re-raises the signal that stopped it once it has shut down; after a
            # graceful drain a SIGTERM should end the process with 0, not "killed by signal".
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            signal.signal(signal.SIGHUP, lambda signum, frame: None)
            # Ctrl-C: uvicorn drains, then raises SIGINT again for the handler it found. That
            # was asyncio's, which cancelled this task in the middle of the admin listener's
            # stop and the store's close (a traceback, a bulk operation not answered). Noted
            # instead: the command ends with KeyboardInterrupt (130) once all is closed.
            signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
            admin_task = None if admin is None else asyncio.create_task(admin.serve())
            # Everything built so far (modules, the app, the store, the handler set) lives as
            # long as the process: out of the collector's sight, a full collection no longer
            # walks it on the intake loop. Measured: serve's p99 under `make bench` load
            # 14-28 ms with, 28-34 ms without (docs/performance.md).
            gc.freeze()
            try:
                await server.serve(sockets=sockets)
            except SystemExit:
                # uvicorn logs why (the application's startup failed) and exits 3 itself;
                # end with our one line instead.
                if server.started:
                    raise
            finally:
                if admin is not None and admin_task is not None:
                    await admin.stop(admin_task)
            if not server.started:
                raise CommandError("serve could not start: the reason is logged just above")
        finally:
            await store.close()
            if owned is not None:
                os.close(owned)  # after the store's close: see _own_sqlite_file

    try:
        _run_loop(run())
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sock in sockets:
            sock.close()
        if tracing is not None:
            tracing.shutdown()  # export the spans still queued
    _end_past_stray_threads("serve", 130 if interrupted else 0)
    if interrupted:
        raise KeyboardInterrupt
    return 0


def _end_past_stray_threads(command: str, code: int) -> None:
    """Exit now with ``code`` if a thread that is not ours would keep the process alive.

    ``serve`` and ``worker`` build each handler once to check its settings (the real ones
    run in worker processes); a plugin that starts a non-daemon thread in ``__init__`` left
    that thread behind, and the interpreter waited for it forever after a clean stop, deaf
    to a second SIGTERM. Everything of ours is closed by now: log it, flush, and end."""
    stray = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if not stray:
        return
    import structlog

    structlog.get_logger("lacuna_webhooks").warning(
        f"{command}.threads_left", threads=stray[:10], exit_code=code
    )
    if code == 130:
        print(f"{PROG}: interrupted", file=sys.stderr)
    with contextlib.suppress(Exception):  # StdoutError too: nothing left to tell
        sys.stdout.flush()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, noting when its stop begins: LACUNA_SHUTDOWN_TIMEOUT bounds the
        whole stop (the HTTP drain, then the dispatcher's), not each in turn. The lifespan
        gives the dispatcher what the drain left (app.py)."""

        def __init__(self, config: Any, state: Any, timeout_seconds: float) -> None:
            super().__init__(config)
            self._state = state
            self._timeout_seconds = timeout_seconds

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            self._state.stop_deadline = time.monotonic() + self._timeout_seconds
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # SIGHUP (the terminal `serve` ran in was closed, a supervisor's hangup) is a
            # requested stop too: the same drain as SIGTERM and exit 0, where its default
            # action ended the process at once (129) with attempts running and the store
            # open. uvicorn handles SIGINT and SIGTERM only.
            previous = signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                with super().capture_signals():
                    yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    return Server


class _AdminListener:
    """The admin app's uvicorn server and the socket it was bound to at start.

    The webhook server owns SIGTERM/SIGINT (uvicorn installs its handlers while it serves);
    this one installs none and is stopped by ``serve`` once the webhook server has shut
    down, so one signal ends both and the process still exits 0."""

    def __init__(self, server: Any, sockets: list[socket.socket], ctx: Any) -> None:
        self.server = server
        self.sockets = sockets
        self.ctx = ctx

    async def serve(self) -> None:
        await self.server.serve(sockets=self.sockets)

    async def stop(self, task: asyncio.Task[None]) -> None:
        # Live streams and long-polls end first, and a bulk operation at its next batch (its
        # request is answered): uvicorn waits for every open response.
        self.ctx.stopping.set()
        await self.ctx.bulk.stop()
        self.server.should_exit = True
        try:
            await task
        except SystemExit:  # uvicorn's own exit on a failed startup: logged by it already
            pass
        finally:
            for sock in self.sockets:
                sock.close()
            from .admin import offload

            offload.close()  # the admin app's helper process, if a large body started one


def _admin_listener(
    settings: Settings,
    store: Store,
    handlers: HandlerSet,
    metrics: Any,
    webhook_host: str,
    webhook_port: int,
) -> _AdminListener | None:
    """Bind ``LACUNA_ADMIN_HOST``:``LACUNA_ADMIN_PORT`` and build its server, when admin
    tokens are set; ``None`` (and a log line) otherwise. A socket that cannot be bound is
    one ``CommandError`` line naming the settings."""
    import structlog
    import uvicorn

    from .admin import AdminContext, create_admin_app
    from .admin.app import REFUSAL_HEADERS
    from .config import listeners_clash
    from .metrics import Metrics
    from .server import ADMIN_SHARE, server_config

    log = structlog.get_logger("lacuna_webhooks.admin")
    if not settings.admin_tokens:
        log.info("admin.off", reason="LACUNA_ADMIN_TOKEN is not set: no admin listener")
        return None
    host, port = settings.admin_host, settings.admin_port
    if listeners_clash((webhook_host, webhook_port), (host, port)):
        raise CommandError(
            f"the admin API cannot listen on {host}:{port}, the webhook listener's socket "
            "(LACUNA_ADMIN_HOST, LACUNA_ADMIN_PORT): give it a port of its own",
            exit_code=2,
        )
    ctx = AdminContext(settings=settings, store=store, handlers=handlers, metrics=metrics)
    # Its own Metrics for the HTTP layer: the admin's refusals are not the webhook route's.
    config = server_config(
        create_admin_app(ctx),
        settings,
        Metrics(),
        host=host,
        port=port,
        share=ADMIN_SHARE,
        refusal_headers=REFUSAL_HEADERS,
    )
    sockets = _bind(host, port, "for the admin API (LACUNA_ADMIN_HOST, LACUNA_ADMIN_PORT)")

    class _Quiet(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the webhook server handles the signals for both

    log.info("admin.listening", url=f"http://{_url_host(host)}:{port}/", api="/api/v1")
    return _AdminListener(_Quiet(config), sockets, ctx)


def _bind(host: str, port: int, names: str) -> list[socket.socket]:
    """Sockets bound to every address ``host`` resolves to (SO_REUSEADDR), not yet listening.

    As asyncio's ``create_server`` binds them, but for two cases: an IPv6 socket is IPv6
    only when the host also resolved to an IPv4 address (``::`` alone also takes IPv4, as
    the admin listener always did), and an address this machine cannot bind (``::1`` from
    /etc/hosts with IPv6 off) is skipped while another binds (as Python 3.13 does).

    Bound before anything else starts, so that a port in use, or a host that is not this
    machine's, ends the command with one ``CommandError`` line (``names``: the settings to
    fix) instead of a store, a dispatcher and workers started and stopped again."""
    sockets: list[socket.socket] = []
    first_error: OSError | None = None
    try:
        infos = list(
            dict.fromkeys(
                socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            )
        )
    except OSError as exc:
        first_error = exc
        infos = []
    both = {socket.AF_INET, socket.AF_INET6} <= {info[0] for info in infos}
    for family, kind, proto, _, address in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # no IPv6 on this machine
            first_error = first_error or exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and both:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL:
                for bound in sockets:
                    bound.close()
                raise CommandError(
                    f"could not listen on {host}:{port} {names}: {exc.strerror or exc}"
                ) from None
            first_error = first_error or exc
            continue
        sockets.append(sock)
    if not sockets:
        reason = "no address" if first_error is None else first_error.strerror or first_error
        raise CommandError(f"could not listen on {host}:{port} {names}: {reason}")
    return sockets


def _bind_webhook(host: str, port: int) -> list[socket.socket]:
    """The webhook listener's sockets (``_bind``), or the one line naming HOST and PORT."""
    return _bind(host, port, "(HOST, PORT)")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    # uvloop when installed (uvicorn[standard] brings it), as `uvicorn.run` would choose.
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


def _worker(environ: Mapping[str, str]) -> int:
    """Dispatch without intake (PostgreSQL): claims, handler worker processes, outcomes,
    retention, until SIGTERM or SIGINT; then drains like ``serve`` and exits 0."""
    import structlog

    from .dispatch.service import build_dispatch
    from .dispatch.workers import WorkerPool, worker_specs
    from .metrics import Metrics

    settings = _settings(environ, require_secret=False, with_handlers=True)
    checked = _tracing(environ)  # a bad OTEL_* setting stops here, not in every worker
    if checked is not None:
        checked.shutdown()  # the handler worker processes trace the attempts themselves
    if settings.database_url.startswith("sqlite"):
        raise CommandError(
            "`worker` needs PostgreSQL (LACUNA_DATABASE_URL): on SQLite `serve` runs the "
            "handler workers itself, so the database keeps one writer",
            exit_code=2,
        )
    if not settings.handlers:
        raise CommandError("configuration: LACUNA_HANDLERS names no handler to run", 2)
    handlers = _handlers_of(settings)
    log = structlog.get_logger("lacuna_webhooks.cli")

    async def run() -> None:
        store = await _open_service_store(settings, handlers)
        try:
            metrics = Metrics()
            pool = WorkerPool(worker_specs(settings, handlers), metrics=metrics)
            service = build_dispatch(settings, store, handlers, metrics=metrics, runner=pool)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, stop.set)
            task = asyncio.create_task(service.run(), name="dispatch")
            stopping = asyncio.create_task(stop.wait())
            log.info("worker.started", handlers=handlers.names)
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            await service.stop(settings.shutdown_timeout_seconds)
            await task
            log.info("worker.stopped")
        finally:
            await handlers.aclose()
            await store.close()

    _run_loop(run())
    _end_past_stray_threads("worker", 0)
    return 0


def _store_error(exc: BaseException, url: str, what: str) -> CommandError:
    """One line for a store that cannot be opened; a driver's ``ValueError`` (a DSN it cannot
    parse) is not quoted, since it may hold a piece of the password."""
    if isinstance(exc, ValueError):
        detail = f"the driver cannot use {redact_url(url)}: check its form"
    else:
        detail = str(exc) or type(exc).__name__
    return CommandError(f"{what} (LACUNA_DATABASE_URL): {detail}")


#: Largest ``--env-file`` read (a settings file is a few KiB).
MAX_ENV_FILE_BYTES = 1024 * 1024


_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _load_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; ``#`` comments and blank lines skipped; optional quotes removed.

    Any other line (no ``=``, a key that is not a variable name) is a ``CommandError``
    naming its line number, not its text (it may hold a secret): skipped silently, a typo
    such as ``LACUNA_HANDLERS slack`` would leave a setting unset with no word said."""
    values: dict[str, str] = {}
    if not _exists(path, "--env-file"):
        return values
    try:
        # Read as every settings file is: a FIFO, /dev/zero or a huge file named by mistake
        # must not hang the start or take all memory.
        text = read_file_setting(
            "--env-file",
            str(path),
            max_bytes=MAX_ENV_FILE_BYTES,
            strip_newline=False,
            allow_empty=True,
        )
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None
    # A byte-order mark, which Windows editors write at the start of a UTF-8 file: part of
    # no key (line 1 was refused as "not KEY=VALUE", a message that sent the reader looking
    # for a typo that is not there). python-dotenv and Compose skip it too.
    text = text.removeprefix("\ufeff")
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        if not equals or not _ENV_KEY.fullmatch(key):
            raise CommandError(
                f"--env-file: {path} line {number} is not KEY=VALUE (a comment starts with #)",
                2,
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _dev(environ: Mapping[str, str], env_file: Path) -> int:
    """The ``make run`` path: a development secret kept in a git-ignored ``.env``."""
    existed = _exists(env_file, "--env-file")
    from_file = _load_env_file(env_file)
    env = {**from_file, **environ}
    created: list[str] = []
    configured = any(
        env.get(v, "").strip() for v in ("LACUNA_WEBHOOK_SECRET", "LACUNA_WEBHOOK_SECRET_FILE")
    )
    if not configured:
        env["LACUNA_WEBHOOK_SECRET"] = "whsec_dev_" + secrets.token_urlsafe(24)
        created.append(f"LACUNA_WEBHOOK_SECRET={env['LACUNA_WEBHOOK_SECRET']}")
        # Unset or empty (a copy of .env.example): the log handler the README describes.
        if not env.get("LACUNA_HANDLERS", "").strip():
            env["LACUNA_HANDLERS"] = "log"
            created.append("LACUNA_HANDLERS=log")
    if created:
        try:
            with env_file.open("a", encoding="utf-8") as fh:
                fh.write(
                    "# Generated by `make run` for local development. Never commit this file.\n"
                )
                fh.write("\n".join(created) + "\n")
            os.chmod(env_file, 0o600)
        except OSError as exc:
            raise CommandError(f"--env-file: cannot write {env_file}: {exc.strerror}", 2) from None
    env.setdefault("HOST", "127.0.0.1")
    # A bad setting is its one line before the banner, not after it.
    prepared = _serve_settings(env)
    host, port = prepared[0].host, prepared[0].port
    # A wildcard is no address to send to; an IPv6 literal goes in brackets in a URL.
    shown_host = _url_host("127.0.0.1" if host in {"0.0.0.0", "::", "*"} else host)  # noqa: S104
    # So is a port in use (a second `make run`): the banner would promise a server.
    sockets = _bind_webhook(prepared[0].host, prepared[0].port)
    secret = prepared[0].secret_values[0]  # the one `send` should sign with: the first
    state = "existing" if not created else "secret added now" if existed else "created now"
    print(
        f"\n  lacuna-webhooks {__version__}, development mode\n"
        f"  settings from {env_file} ({state})"
        " and the environment\n"
        f"  webhook secret: {secret}\n"
        f"  database: {redact_url(env.get('LACUNA_DATABASE_URL', 'sqlite:///./lacuna-webhooks.db'))}\n"
        f"  handlers: {env.get('LACUNA_HANDLERS') or '(none)'}\n\n"
        "  Send it a signed test event from another terminal:\n\n"
        f"    .venv/bin/lacuna-webhooks send --url http://{shown_host}:{port}/webhooks/lacuna"
        f" --secret {shlex.quote(secret)}\n\n"
        f"  Then look at it: {_dev_look_command(env_file, from_file, environ)}\n"
        + _dev_admin_line(env, env_file),
        file=sys.stderr,
        flush=True,
    )
    return _serve(env, None, None, prepared, sockets)


def _dev_look_command(
    env_file: Path, from_file: Mapping[str, str], environ: Mapping[str, str]
) -> str:
    """The command that lists the events this server stores. The other commands read the
    environment, not the env file: when the file chose the database, the command reads it
    first (in a subshell), or it would list another database."""
    command = ".venv/bin/lacuna-webhooks events list"
    if "LACUNA_DATABASE_URL" in from_file and "LACUNA_DATABASE_URL" not in environ:
        return f"(set -a; . {shlex.quote(str(env_file))}; set +a; {command})"
    return command


def _dev_admin_line(env: Mapping[str, str], env_file: Path = Path(".env")) -> str:
    """Where the admin API answers in development, when a token is set (never the token);
    else how to turn it on, in ``env_file`` (the file ``dev`` read)."""
    try:
        has_token = bool((read_setting(env, "LACUNA_ADMIN_TOKEN") or "").strip())
    except ConfigError:
        return ""  # serve reports it with the other settings
    if not has_token:
        return (
            f"  Admin API: off (set LACUNA_ADMIN_TOKEN in {env_file} to turn it on;"
            " docs/admin.md)\n"
        )
    host = env.get("LACUNA_ADMIN_HOST", "127.0.0.1").strip() or "127.0.0.1"
    shown = "127.0.0.1" if host in {"0.0.0.0", "::"} else _url_host(host)  # noqa: S104
    port = env.get("LACUNA_ADMIN_PORT", "8001").strip() or "8001"
    return (
        f"  Admin API: http://{shown}:{port}/api/v1/events"
        " (Authorization: Bearer <a token of LACUNA_ADMIN_TOKEN>; docs/admin.md)\n"
        f"  Console: http://{shown}:{port}/ (sign in with that token; docs/console.md)\n"
    )


# --- send ----------------------------------------------------------------------------------


def _send_secret(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, str]:
    """(the secret to sign with, how to name it: position and source, never the value)."""
    if args.secret is not None:
        source, raw = "--secret", args.secret
        if not parse_list(raw):
            raise CommandError("--secret names no secret: pass one, or leave it out", 2)
    else:
        try:
            raw = read_setting(environ, "LACUNA_WEBHOOK_SECRET") or ""
        except ConfigError as exc:
            raise CommandError(f"configuration: {exc}", 2) from None
        has_file = environ.get("LACUNA_WEBHOOK_SECRET_FILE", "").strip()
        source = "LACUNA_WEBHOOK_SECRET" + ("_FILE" if has_file else "")
    secrets = parse_list(raw)
    if not secrets:
        raise CommandError(
            "no secret: pass --secret or set LACUNA_WEBHOOK_SECRET (or LACUNA_WEBHOOK_SECRET_FILE)",
            2,
        )
    if args.secret_index > len(secrets):
        raise CommandError(
            f"--secret-index {args.secret_index}: {source} holds {len(secrets)} secret(s)", 2
        )
    return secrets[
        args.secret_index - 1
    ], f"secret {args.secret_index} of {len(secrets)} ({source})"


def _send_template(args: argparse.Namespace) -> tuple[bytes | None, dict[str, Any] | None]:
    """(exact bytes to send, or None) and (a JSON object to copy and edit per request, or None)."""
    from .send import parse_exact

    edits = bool(args.set or args.id or args.type)
    if args.file:
        limit = MAX_BODY_BYTES  # LACUNA_MAX_BODY_BYTES's own bound: no receiver takes more
        try:
            if args.file == "-":
                body = sys.stdin.buffer.read(limit + 1)
            else:
                with open(args.file, "rb") as fh:
                    body = fh.read(limit + 1)
        except OSError as exc:
            raise CommandError(f"cannot read --file: {exc.strerror}: {args.file}", 2) from None
        if len(body) > limit:
            # /dev/zero or a wrong file: once read whole into memory, without end.
            raise CommandError(f"--file {args.file} is larger than {limit} bytes", 2)
        if not edits:
            return body, None
        try:
            doc = parse_exact(body)
        except ValueError:
            raise CommandError(
                f"--file {args.file} is not JSON, so --set/--id/--type cannot edit it", 2
            ) from None
        if not isinstance(doc, dict):
            raise CommandError(f"--file {args.file} is not a JSON object", 2)
        return None, doc
    return None, None


def _check_http_url(option: str, url: str) -> None:
    """``CommandError`` (exit 2) unless ``url`` is an http(s) URL to send to, by the rule
    of the handlers' URL settings (``handlers.http.parse_url``)."""
    from .handlers.http import parse_url

    try:
        parse_url(url, f"{option} {redact_url(url)!r}")
    except ConfigError as exc:
        raise CommandError(str(exc), 2) from None


def _send(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import copy

    import httpx

    from .samples import sample_of_type
    from .send import SendError, apply, dumps, parse_assignment, run_load, sign_body

    _check_http_url("--url", args.url)
    secret, secret_name = _send_secret(args, environ)
    try:
        assignments = [parse_assignment(text) for text in args.set or []]
    except SendError as exc:
        raise CommandError(str(exc), 2) from None
    exact, template = _send_template(args)
    event_type = args.type or "job.completed"

    def make_body(index: int) -> bytes:
        if exact is not None:
            return exact
        doc = copy.deepcopy(template) if template is not None else sample_of_type(event_type)
        if template is not None and args.type:
            doc["type"] = args.type
        if args.id:
            doc["id"] = args.id
        for assignment in assignments:
            apply(doc, assignment)
        return dumps(doc)

    try:
        first_body = make_body(0)
    except SendError as exc:
        raise CommandError(str(exc), 2) from None
    except TypeError as exc:  # orjson: a value it cannot write
        raise CommandError(f"--set: {exc}", 2) from None

    if args.count > 1:
        summary = asyncio.run(
            run_load(
                args.url,
                lambda i: first_body if i == 0 else make_body(i),
                secret,
                count=args.count,
                concurrency=args.concurrency,
                timeout_seconds=args.timeout,
            )
        )
        print(
            f"signed with {secret_name}, t={summary.first_timestamp}..{summary.last_timestamp}",
            file=sys.stderr,
        )
        print("\n".join(printable(line) for line in summary.lines(args.url, args.concurrency)))
        return 0 if summary.all_succeeded else 1

    signed = sign_body(first_body, secret)
    try:
        response = httpx.post(
            args.url,
            content=signed.body,
            headers={"x-lacuna-signature": signed.header, "content-type": "application/json"},
            timeout=args.timeout,
        )
    except httpx.HTTPError as exc:
        raise CommandError(f"could not POST to {redact_url(args.url)}: {exc}") from None
    # On stderr, so stdout stays the answer alone (status line, then body).
    print(
        printable(
            f"signed {signed.event_id or '(no id)'} ({signed.event_type or 'no type'}) with "
            f"{secret_name}, t={signed.timestamp}"
        ),
        file=sys.stderr,
    )
    # The answer comes from the network: its reason and body escaped (printable), newlines kept.
    print(printable(f"{response.status_code} {response.reason_phrase}"))
    print(printable_lines(response.text))
    if response.status_code == 401 and _error_code(response.content) == (
        "timestamp_out_of_tolerance"
    ):
        print(_clock_hint(signed.timestamp, response.headers.get("date")), file=sys.stderr)
    return 0 if response.is_success else 1


def _error_code(body: bytes) -> str | None:
    """The ``error.code`` of an error envelope, else ``None``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _clock_hint(signed_at: int, date: str | None) -> str:
    """What ``send`` says when the receiver found its signature's time outside its window:
    how far the receiver's clock (its answer's ``Date``) is from ours, when it says."""
    from .handlers._http import http_date

    window = "its LACUNA_WEBHOOK_TOLERANCE (300 s unless set)"
    when = http_date(date) if date else None
    if when is None:
        return (
            f"the receiver's clock and this machine's (t={signed_at}) disagree by more than "
            f"{window}: check both clocks (NTP)"
        )
    apart = round(when.timestamp() - signed_at)
    way = "ahead of" if apart > 0 else "behind"
    return (
        f"the receiver's clock (its Date: {printable(date or '')}) is about {abs(apart)} s "
        f"{way} this machine's (t={signed_at}), more than {window}: set the clock that is "
        "wrong right (NTP)"
    )


# --- store commands ------------------------------------------------------------------------


def _with_store(environ: Mapping[str, str], work: Callable[[Store], Awaitable[T]]) -> T:
    settings = _settings(environ, require_secret=False)
    url = settings.database_url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not _exists(path, "LACUNA_DATABASE_URL"):
            raise CommandError(f"no database at {path} (LACUNA_DATABASE_URL={url})")

    async def run() -> T:
        store = open_store(url, sqlite_synchronous=settings.sqlite_synchronous)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (StoreUnavailable, ValueError) as exc:
        raise _store_error(exc, url, "store unavailable") from None


# --- where a store command works: a remote admin API, or LACUNA_DATABASE_URL ----------------
#
# One rule for every command that is also an admin API operation (events, deliveries,
# replay, backfill, retry-dead, handlers and its pause/resume, tail): --url, else
# LACUNA_ADMIN_URL, names the admin API to work through; only when neither is given does the
# command open LACUNA_DATABASE_URL itself. Never the local store while an admin URL is set.


def _admin_remote(args: argparse.Namespace, environ: Mapping[str, str]) -> Target | None:
    """The remote admin API to work through (``--url``/``--token``, else ``LACUNA_ADMIN_URL``
    / ``LACUNA_ADMIN_TOKEN``, as ``listen.admin_target`` reads them), or ``None`` to work on
    ``LACUNA_DATABASE_URL`` directly. A bad URL or token, or ``--token`` without a URL, is a
    usage error (exit 2): the command never falls back to the local store."""
    from . import listen

    if args.url is None and not environ.get("LACUNA_ADMIN_URL", "").strip():
        if args.token is not None:
            raise CommandError("--token needs --url (or LACUNA_ADMIN_URL)", exit_code=2)
        return None
    try:
        return listen.admin_target(args.url, args.token, environ)
    except listen.ListenError as exc:
        raise CommandError(str(exc), exit_code=2) from None


#: The admin API's answers that refuse the request itself (a bad filter, a body too large):
#: usage errors, exit 2. Every other refusal, and an API that cannot be reached, is exit 1.
USAGE_STATUSES = (400, 413)


def _on_remote(
    target: Target,
    work: Callable[[AdminClient], Awaitable[T]],
    *,
    usage: Sequence[int] = USAGE_STATUSES,
) -> T:
    """``work`` with a client of ``target``; its ``AdminError`` as one ``CommandError`` line
    (exit 2 for an answer in ``usage``, else 1)."""
    from .admin.client import AdminClient, AdminError

    async def run() -> T:
        async with AdminClient(target.url, target.token) as client:
            return await work(client)

    try:
        return asyncio.run(run())
    except AdminError as exc:
        raise CommandError(str(exc), exit_code=2 if exc.status in usage else 1) from None


def _local_or_remote(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    local: Callable[[], T],
    remote: Callable[[AdminClient], Awaitable[T]],
    *,
    usage: Sequence[int] = USAGE_STATUSES,
) -> T:
    """``remote`` through the admin API of ``_admin_remote``, else ``local()`` (which opens
    the store itself, after its own checks of the local settings): the one place a store
    command chooses. Both give the same value, which the command prints the same way."""
    target = _admin_remote(args, environ)
    if target is None:
        return local()
    return _on_remote(target, remote, usage=usage)


#: Records asked for in one page of a listing (the admin API's most, SPEC §9).
PAGE_SIZE = 500
#: Pages without a record a listing follows before it stops: a search cut short by its time
#: budget (``LACUNA_ADMIN_SEARCH_BUDGET``, 0.5 s by default) gives one, so this is hours of
#: searching; a server answering empty pages with new cursors for ever gives them at once.
MAX_EMPTY_PAGES = 10_000


async def _collect(
    fetch: Callable[[str | None, int], Awaitable[tuple[list[T], str | None]]], limit: int
) -> list[T]:
    """Up to ``limit`` records of a listing, newest first: ``fetch(cursor, size)`` gives a
    page and the cursor of the next (``None`` after the last), followed until ``limit`` is
    reached. A search that stopped at its time budget gives a page of fewer records than
    asked, even none, and a cursor that resumes it: the walk goes on, but never to a cursor
    it was given before (the listing would go round for ever) nor past
    ``MAX_EMPTY_PAGES`` pages without a record."""
    found: list[T] = []
    cursor: str | None = None
    seen: set[str] = set()
    empty = 0
    while len(found) < limit:
        records, next_cursor = await fetch(cursor, min(PAGE_SIZE, limit - len(found)))
        found += records
        if next_cursor is None:
            break
        if next_cursor in seen:
            raise CommandError(
                "the listing gave a page ending where it started or where an earlier page"
                " ended (it would go round for ever): stopped"
            )
        empty += not records
        if empty >= MAX_EMPTY_PAGES:
            raise CommandError(
                f"the listing gave {empty} pages without a record and still a next one: stopped"
            )
        seen.add(next_cursor)
        cursor = next_cursor
    return found[:limit]


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _event_json(record: EventRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "type": record.type,
        "created": record.created,
        "received_at": record.received_at.isoformat(),
        "task_id": record.task_id,
        "superseded": record.superseded,
    }


def _delivery_status(record: DeliveryRecord, now: datetime) -> str:
    return "running" if record.running(now) else record.status.value


def _delivery_json(record: DeliveryRecord, now: datetime) -> dict[str, Any]:
    return {
        "id": record.id,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "handler": record.handler,
        "status": _delivery_status(record, now),
        "attempts": record.attempts,
        "next_attempt_at": record.next_attempt_at.isoformat(),
        "last_error": record.last_error,
        "result": record.result,
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def _print_json(value: Any) -> None:
    # Values from the store and the network: escaped as JSON escapes them (printable_json).
    print(printable_json(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()))


def _stored_payload(raw: bytes) -> Any:
    """A stored body to print: parsed (to indent it), or its bytes as they are when orjson
    cannot read or write it back out (a number beyond a double, such as ``1e400``, which
    would print changed; a body nested deeper than orjson writes, accepted before
    ``MAX_JSON_DEPTH``)."""
    try:
        payload = orjson.loads(raw)
        orjson.dumps(payload)
    except (orjson.JSONDecodeError, TypeError):
        return orjson.Fragment(raw)
    return payload


def _deliveries_table(records: Sequence[DeliveryRecord], now: datetime) -> str:
    return _table(
        [
            [
                str(d.id),
                d.event_id,
                d.handler,
                _delivery_status(d, now),
                str(d.attempts),
                _iso(d.next_attempt_at) if d.status is DeliveryStatus.PENDING else "-",
                (d.last_error or "")[:60],
            ]
            for d in records
        ],
        ["id", "event", "handler", "status", "attempts", "next attempt", "last error"],
    )


def _events(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.events_command == "list":
        return _events_list(args, environ)
    return _events_show(args, environ)


def _events_list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``events list``: ``GET /events`` (page after page) or the store's ``search_events``,
    with the same filters, newest first, at most ``--limit``."""
    values = _filter_values(args)

    def local() -> list[EventRecord]:
        from .store.base import ScanBudget

        where = _event_filter(values)
        budget = ScanBudget(_settings(environ, require_secret=False).admin_search_budget_seconds)

        async def search(store: Store) -> list[EventRecord]:
            async def page(cursor: str | None, size: int) -> tuple[list[EventRecord], str | None]:
                found = await store.search_events(
                    where, cursor=cursor, limit=size, budget=budget, bodies=False
                )
                return found.records, found.next_cursor

            return await _collect(page, args.limit)

        return _with_store(environ, search)

    async def remote(client: AdminClient) -> list[EventRecord]:
        async def page(cursor: str | None, size: int) -> tuple[list[EventRecord], str | None]:
            return await client.list_events(values, cursor=cursor, limit=size)

        return await _collect(page, args.limit)

    records = _local_or_remote(args, environ, local, remote)
    if args.json:
        _print_json([_event_json(r) for r in records])
    else:
        print(
            _table(
                [
                    [r.id, r.type, r.task_id or "-", _iso(r.received_at)]
                    + (["superseded"] if r.superseded else [""])
                    for r in records
                ],
                ["id", "type", "task", "received", "note"],
            )
        )
    return 0


def _events_show(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``events show ID``: ``GET /events/{id}`` or the store; the same text or document."""
    now = datetime.now(UTC)

    async def show(store: Store) -> EventDetail | None:
        record = await store.get_event(args.event_id)
        if record is None:
            return None
        deliveries = await store.list_deliveries(event_id=args.event_id, limit=1000)
        return record, [(d, await store.list_attempts(d.id)) for d in deliveries]

    def local() -> EventDetail:
        detail = _with_store(environ, show)
        if detail is None:
            raise CommandError(f"no event {args.event_id!r} in the store")
        return detail

    async def remote(client: AdminClient) -> EventDetail:
        return await client.get_event(args.event_id)

    record, deliveries = _local_or_remote(args, environ, local, remote)
    if args.json:
        doc = _event_json(record)
        doc["payload"] = _stored_payload(record.raw)
        doc["deliveries"] = [
            {**_delivery_json(d, now), "attempts_log": [_attempt_json(a) for a in attempts]}
            for d, attempts in deliveries
        ]
        _print_json(doc)
        return 0
    print(f"event     {printable(record.id)}\ntype      {printable(record.type)}")
    print(f"task      {printable(record.task_id or '-')}")
    print(f"received  {_iso(record.received_at)}" + ("  (superseded)" if record.superseded else ""))
    print("\ndeliveries")
    print(_deliveries_table([d for d, _ in deliveries], now))
    for d, attempts in deliveries:
        for a in attempts:
            error = f"  {printable(a.error)}" if a.error else ""
            print(
                f"  {printable(d.handler)} attempt {a.attempt}: {a.outcome.value} at"
                f" {_iso(a.started_at)} ({a.duration_seconds * 1000:.0f} ms){error}"
            )
    results = [d for d, _ in deliveries if d.result is not None]
    if results:
        # SPEC §6: what each handler returned (e.g. storage: where it put the files).
        print("\nresults")
        for d in results:
            print(f"  {printable(d.handler)}: {printable_json(orjson.dumps(d.result).decode())}")
    print("\npayload")
    _print_json(_stored_payload(record.raw))
    return 0


def _attempt_json(record: AttemptRecord) -> dict[str, Any]:
    return {
        "attempt": record.attempt,
        "started_at": record.started_at.isoformat(),
        "outcome": record.outcome.value,
        "duration_ms": round(record.duration_seconds * 1000, 1),
        "error": record.error,
    }


def _deliveries(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``deliveries list``: ``GET /deliveries`` (page after page) or the store."""
    now = datetime.now(UTC)

    def local() -> list[DeliveryRecord]:
        status = DeliveryStatus(args.status) if args.status else None
        return _with_store(
            environ,
            lambda s: s.list_deliveries(
                status=status, handler=args.handler, event_id=args.event, limit=args.limit
            ),
        )

    async def remote(client: AdminClient) -> list[DeliveryRecord]:
        async def page(cursor: str | None, size: int) -> tuple[list[DeliveryRecord], str | None]:
            return await client.list_deliveries(
                status=args.status,
                handler=args.handler,
                event_id=args.event,
                cursor=cursor,
                limit=size,
            )

        return await _collect(page, args.limit)

    records = _local_or_remote(args, environ, local, remote)
    if args.json:
        _print_json([_delivery_json(r, now) for r in records])
    else:
        print(_deliveries_table(records, now))
    return 0


#: The filter options of ``events list``, ``replay`` and ``backfill`` (the filters of
#: ``GET /events``), as (option, the API's name).
_FILTER_OPTIONS = (
    ("--type", "type"),
    ("--task-id", "task_id"),
    ("--since", "since"),
    ("--until", "until"),
    ("--handler", "handler"),
    ("--status", "status"),
    ("--match", "match"),
    ("--q", "q"),
)


def _remote_call(remote: Target, path: str, body: dict[str, Any], *, bulk: bool = False) -> Any:
    """``POST path`` on the remote admin API; its refusal as one line (exit 2 for a 400).
    Only a ``bulk`` operation waits up to ``BULK_TIMEOUT_SECONDS`` for its answer; anything
    else gives up after ``TIMEOUT_SECONDS`` (a hung listener is not waited on for an hour)."""
    from .admin.client import BULK_TIMEOUT_SECONDS

    return _on_remote(
        remote,
        lambda client: client.post(path, body, read_timeout=BULK_TIMEOUT_SECONDS if bulk else None),
    )


def _filter_values(args: argparse.Namespace) -> dict[str, Any]:
    """The filter options given, by the API's names (``match`` a list)."""
    values: dict[str, Any] = {}
    for _, name in _FILTER_OPTIONS:
        value = getattr(args, name)
        if value is None or value == []:
            continue
        if name == "handler" and isinstance(value, list):
            if len(value) > 1:
                raise CommandError("--handler (the filter) may be given once", exit_code=2)
            value = value[0]
        values[name] = value
    return values


def _option_of(param: str | None, **special: str) -> str:
    """The option that sets the API's parameter ``param`` (``task_id``: ``--task-id``)."""
    return {"task_id": "--task-id", **special}.get(param or "", f"--{param}")


def _event_filter(values: Mapping[str, Any]) -> EventFilter:
    """The store's filter of ``_filter_values``, checked as the admin API checks it: a bad
    value is one line naming its option, exit 2."""
    from .admin.filters import build_filter
    from .admin.responses import BadRequest

    try:
        return build_filter(values)
    except BadRequest as exc:
        raise CommandError(f"{_option_of(exc.param)}: {exc.message}", exit_code=2) from None


def _filter_body(args: argparse.Namespace, *, everything: bool) -> dict[str, Any]:
    """The ``POST /replays`` filter fields of the options given (``--all`` or at least one
    filter, not both: an empty filter replays every stored event)."""
    body = _filter_values(args)
    options = ", ".join(option for option, _ in _FILTER_OPTIONS)
    if not body and not everything:
        raise CommandError(
            f"give at least one filter ({options}) or --all to take every stored event",
            exit_code=2,
        )
    if body and everything:
        raise CommandError("--all takes every stored event: give it without filters", exit_code=2)
    if everything:
        body["all"] = True
    return body


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bulk_answer(answer: Any) -> bool:
    """``answer`` has the shape of ``POST /replays``'s (a remote answer is not trusted: a
    proxy or another service at that URL may answer anything)."""
    return (
        isinstance(answer, dict)
        and all(_count(answer.get(k)) for k in ("matched", "created", "reset"))
        and isinstance(answer.get("dry_run"), bool)
    )


def _bulk(
    args: argparse.Namespace, environ: Mapping[str, str], body: dict[str, Any], handler_option: str
) -> dict[str, Any]:
    """Run a ``POST /replays`` body remotely or on the store directly; the answer."""
    remote = _admin_remote(args, environ)
    if remote is not None:
        answer = _remote_call(remote, "/replays", body, bulk=True)
        if not _bulk_answer(answer):
            raise CommandError("the admin API answered POST /replays with an unexpected answer")
        # What the local operation gives, nothing more: --json prints the same document.
        return {key: answer[key] for key in ("matched", "created", "reset", "dry_run")}
    from .admin.api_bulk import operation_from_json
    from .admin.bulk import run_bulk
    from .admin.responses import BadRequest

    # Handler names are checked against, and a replay limited to, LACUNA_HANDLERS.
    names = _configured_names(environ)
    filters = None
    if body.get("handlers") and environ.get("LACUNA_HANDLERS", "").strip():
        # Each handler's event filter (LACUNA_<NAME>_EVENTS), as intake applies it.
        try:
            settings = _settings(environ, require_secret=False)
            filters = _build(settings, settings.handlers).filters
        except ConfigError as exc:
            raise CommandError(f"configuration: {exc}", exit_code=2) from None
    try:
        operation = operation_from_json(names, body, filters)
    except BadRequest as exc:
        option = _option_of(exc.param, handlers=handler_option)
        raise CommandError(f"{option}: {exc.message}", exit_code=2) from None
    from .store.base import ScanBudget

    if not environ.get("LACUNA_HANDLERS", "").strip():
        # No configuration to go by: a replay resets every existing delivery.
        operation = dataclasses.replace(operation, configured=None)
    seconds = _settings(environ, require_secret=False).admin_search_budget_seconds
    budget = ScanBudget(seconds)
    result = _with_store(environ, lambda s: run_bulk(s, operation, budget=budget))
    return result.json()


def _bulk_report(answer: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    if args.json:
        _print_json(answer)
    elif answer["dry_run"]:
        print(f"{answer['matched']} events match (dry run: nothing written)")
    else:
        print(
            f"{what}: {answer['matched']} events matched; {answer['created']} deliveries created,"
            f" {answer['reset']} made due again (a running `serve` sends them)"
        )
    return 0


def _replay(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.event_id is None:
        body = _filter_body(args, everything=args.all)
        if args.to:
            body["handlers"] = list(dict.fromkeys(args.to))
        if args.dry_run:
            body["dry_run"] = True
        return _bulk_report(_bulk(args, environ, body, "--to"), args, "replay")
    given = [o for o, n in _FILTER_OPTIONS if n != "handler" and getattr(args, n) not in (None, [])]
    given += [o for o, on in (("--all", args.all), ("--dry-run", args.dry_run)) if on]
    if given:
        raise CommandError(
            f"EVENT_ID replays one event: {', '.join(given)} select events in bulk (drop"
            " EVENT_ID to use them)",
            exit_code=2,
        )
    handlers = list(dict.fromkeys([*(args.handler or []), *(args.to or [])])) or None
    remote = _admin_remote(args, environ)
    if remote is not None:
        from .admin.client import path_segment

        path = f"/events/{path_segment(args.event_id)}/replay"
        answer = _remote_call(remote, path, {} if handlers is None else {"handlers": handlers})
        count = answer.get("replayed") if isinstance(answer, dict) else None
        if not _count(count):
            raise CommandError("the admin API answered the replay with an unexpected answer")
    else:
        from .admin.bulk import not_taking, replay_configured

        # Without LACUNA_HANDLERS there is no configuration to go by: every delivery.
        known = environ.get("LACUNA_HANDLERS", "").strip()
        configured = _configured_names(environ) if known else None
        _refuse_unconfigured(handlers or [], configured or [])
        filters = _configured_filters(environ) if known and handlers is not None else {}

        async def replay_named(s: Store, names: list[str] | None) -> int:
            record = await s.get_event(args.event_id)
            if record is None:
                raise EventNotFound(args.event_id)
            # As the admin API: a handler whose LACUNA_<NAME>_EVENTS leaves the type out
            # gets no delivery of it from a replay, as it got none from intake.
            refused = not_taking(filters, record.type, names or [])
            if refused:
                raise CommandError(
                    f"{refused[0]!r} does not take {record.type!r} events "
                    f"(LACUNA_{refused[0].upper()}_EVENTS)",
                    exit_code=2,
                )
            return await s.replay(args.event_id, names, now=datetime.now(UTC))

        try:
            count = _with_store(
                environ,
                lambda s: (
                    replay_configured(s, args.event_id, configured, now=datetime.now(UTC))
                    if handlers is None and configured is not None
                    else replay_named(s, handlers)
                ),
            )
        except EventNotFound:
            raise CommandError(f"no event {args.event_id!r} in the store") from None
    if count == 0:
        raise CommandError(
            f"event {args.event_id} has no deliveries to replay; name one with --handler"
        )
    if args.json:
        _print_json({"event_id": args.event_id, "replayed": count})
        return 0
    print(
        f"replayed {printable(args.event_id)}: {count} deliveries due now"
        " (a running `serve` sends them)"
    )
    return 0


def _backfill(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Create the missing deliveries of ``args.name`` over the filtered events."""
    body = _filter_body(args, everything=args.all)
    body["handlers"] = [args.name]
    body["missing_only"] = True
    if args.dry_run:
        body["dry_run"] = True
    return _bulk_report(_bulk(args, environ, body, "HANDLER"), args, f"backfill {args.name}")


def _refuse_unconfigured(names: Sequence[str], configured: Sequence[str]) -> None:
    """``CommandError`` (exit 2) for the first of ``names`` that LACUNA_HANDLERS does not
    configure, as the admin API refuses it: a delivery made pending for it would wait for
    ever (nothing runs it, and an event with a pending delivery is never pruned)."""
    for name in names:
        if name not in configured:
            raise CommandError(
                f"--handler: {name!r} is not a configured handler"
                f" ({', '.join(configured) or 'none: LACUNA_HANDLERS is empty'})",
                exit_code=2,
            )


def _retry_dead(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``retry-dead``: ``POST /deliveries/retry-dead`` (the deployment checks the name
    against its handlers) or the store, by the same rule (``admin.bulk``)."""

    def local() -> int:
        from .admin.bulk import retry_dead_configured

        # As `replay`: with LACUNA_HANDLERS, its handlers only (a removed handler's dead
        # deliveries would be pending for ever); without it, no configuration to go by.
        known = environ.get("LACUNA_HANDLERS", "").strip()
        configured = _configured_names(environ) if known else None
        if configured is not None and args.handler is not None:
            _refuse_unconfigured([args.handler], configured)

        async def retry(s: Store) -> int | None:
            # No configuration to check the name against: a name with no delivery at all in
            # the store is a typo (`storag`), not "0 due again" and exit 0.
            if (
                configured is None
                and args.handler is not None
                and not await s.list_deliveries(handler=args.handler, limit=1)
            ):
                return None
            return await retry_dead_configured(
                s, configured, handler=args.handler, now=datetime.now(UTC)
            )

        count = _with_store(environ, retry)
        if count is None:
            raise CommandError(
                f"--handler: the store holds no delivery of a handler named {args.handler!r}",
                exit_code=2,
            )
        return count

    count = _local_or_remote(args, environ, local, lambda client: client.retry_dead(args.handler))
    print(f"{count} dead deliveries are due again (a running `serve` sends them)")
    return 0


def _migrate(environ: Mapping[str, str]) -> int:
    settings = _settings(environ, require_secret=False)

    async def run() -> None:
        store = open_store(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous)
        await store.open()  # applies pending migrations
        await store.close()

    try:
        asyncio.run(run())
    except (StoreUnavailable, ValueError) as exc:
        raise _store_error(exc, settings.database_url, "store unavailable") from None
    print(printable(f"schema is up to date ({settings.database_url.split('://', 1)[0]})"))
    return 0


def _handlers(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """The installed handler kinds, then each configured instance (``LACUNA_HANDLERS``)
    with its kind and whether its settings build: ``ok`` or the first problem's line.
    Exit status 2 when an instance's settings are wrong (as ``serve`` would refuse).
    With ``pause NAME`` / ``resume NAME`` it pauses or resumes that instance instead."""
    from .plugins import available, check_after

    if args.action is not None:
        return _pause_or_resume(args, environ)
    remote = _admin_remote(args, environ)
    if remote is not None:
        return _handlers_remote(remote)

    print("installed handler kinds:")
    for name, target in sorted(available().items()):
        print(printable(f"  {name:12} {target}"))
    settings = _settings(environ, require_secret=False)
    if not settings.handlers:
        print("configured instances: none (LACUNA_HANDLERS is empty)")
        return 0
    rows: list[list[str]] = []
    failed = False
    after: dict[str, tuple[str, ...]] = {}
    names: list[str] | None = None
    for index, item in enumerate(settings.handlers):
        try:
            built = _build(settings, [item], check_order=False)
        except ConfigError as exc:
            failed = True
            if names is None:
                names = _resolved_names(environ, len(settings.handlers))
            name, kind = _instance_of(item)
            rows.append([names[index] if names else name, kind, mask_secrets(exc.problems[0])])
            continue
        name = built.names[0]
        after[name] = built.after.get(name, ())
        waits = f" (after {', '.join(after[name])})" if after[name] else ""
        rows.append([name, built.kinds[name] + waits, "ok"])
        asyncio.run(built.aclose())
    print("configured instances (LACUNA_HANDLERS):")
    print(_table(rows, ["name", "kind", "settings"]))
    order = check_after(after) if not failed else []
    for problem in order:
        print(printable(f"order: {problem}"))
    print("state:")
    for line in _configured_lines(environ):
        # A pause reason is any text an admin API caller gave: it must not drive the terminal.
        print(f"  {printable(line)}")
    return 2 if failed or order else 0


def _instance_of(item: str) -> tuple[str, str]:
    from .config import split_handler_item

    name, kind = split_handler_item(item)
    return name or kind, kind


def _resolved_names(environ: Mapping[str, str], count: int) -> list[str] | None:
    """The instance names ``LACUNA_HANDLERS`` resolves to, one per item in order (a
    ``package.module:attr`` item is named after its object's ``name``, as ``serve`` names
    it), or ``None`` when the list itself does not resolve (an unknown kind)."""
    try:
        names = _configured_names(environ)
    except CommandError:
        return None
    return names if len(names) == count else None


def _configured_names(environ: Mapping[str, str]) -> list[str]:
    """The handler names ``LACUNA_HANDLERS`` configures (without building the handlers, so
    a handler whose own settings are wrong can still be paused)."""
    return list(_resolved(environ))


def _resolved(environ: Mapping[str, str]) -> dict[str, frozenset[str] | None]:
    """Per configured handler name, its kind's own event filter; nothing built, and a
    third-party plugin loaded in a check process, never here (``plugin_check``)."""
    from .plugin_check import resolve_checked

    settings = _settings(environ, require_secret=False)
    try:
        resolved = resolve_checked(
            settings.handlers, log_format=settings.log_format, log_level=settings.log_level
        )
    except ConfigError as exc:
        raise CommandError(f"configuration: {exc}", exit_code=2) from None
    return dict(resolved)


def _configured_filters(environ: Mapping[str, str]) -> dict[str, frozenset[str] | None]:
    """Per configured handler name, the event types it takes (``LACUNA_<NAME>_EVENTS`` or
    its kind's default; ``None``: every type), without building the handlers."""
    from .plugins import parse_events

    return {
        name: parse_events(
            environ.get(f"LACUNA_{name.upper()}_EVENTS"), default, f"LACUNA_{name.upper()}_EVENTS"
        )
        for name, default in _resolved(environ).items()
    }


def _configured_lines(environ: Mapping[str, str]) -> list[str]:
    """One line per configured handler: running, or paused with the reason and since when."""
    names = _configured_names(environ)
    try:
        states = {s.handler: s for s in _with_store(environ, lambda s: s.handler_states())}
    except CommandError as exc:
        return [f"{name:12} state unknown ({exc})" for name in names]
    lines = []
    for name in names:
        state = states.get(name)
        if state is None:
            lines.append(_state_line(name, paused=False, reason=None, since=None, failures=0))
        else:
            lines.append(
                _state_line(
                    name,
                    paused=state.paused,
                    reason=state.reason,
                    since=state.updated_at,
                    failures=state.consecutive_failures,
                )
            )
    return lines


def _state_line(
    name: str, *, paused: bool, reason: str | None, since: datetime | None, failures: int
) -> str:
    """A handler's line under ``state:``, from the store or ``GET /handlers`` alike."""
    if paused:
        return f"{name:12} paused since {_iso(since)}: {reason or '-'}"
    tail = f" ({failures} consecutive failed attempts)" if failures else ""
    return f"{name:12} running{tail}"


def _handlers_remote(target: Target) -> int:
    """``handlers`` through ``GET /handlers``: the deployment's configured instances and
    their state, in the local listing's columns and lines. Each instance's settings are
    ``ok``: the deployment built every one when it started (it refuses to start
    otherwise). The installed kinds are the local installation's, so not listed here."""
    from .listen import shown_url

    found = _on_remote(target, lambda client: client.handlers())
    where = printable(shown_url(target.url))
    if not found:
        print(f"configured instances: none (LACUNA_HANDLERS of {where} is empty)")
        return 0
    print(f"configured instances (LACUNA_HANDLERS of {where}):")
    print(_table([[h.name, h.kind, "ok"] for h in found], ["name", "kind", "settings"]))
    print("state:")
    for h in found:
        line = _state_line(
            h.name,
            paused=h.paused,
            reason=h.paused_reason,
            since=h.paused_since,
            failures=h.consecutive_failures,
        )
        # A pause reason is any text an admin API caller gave: it must not drive the terminal.
        print(f"  {printable(line)}")
    return 0


def _pause_or_resume(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``handlers pause NAME`` / ``handlers resume NAME``: persisted in the store, so every
    replica sees it within ``LACUNA_POLL_INTERVAL`` (docs/flow-control.md); remotely
    ``POST /handlers/{name}/pause`` or ``/resume``, whose 404 for a name the deployment does
    not configure is exit 2, as the local refusal."""
    pause = args.action == "pause"
    reason = args.reason if pause else None

    def local() -> bool:
        names = _configured_names(environ)
        if args.name not in names:
            known = ", ".join(names) or "none"
            raise CommandError(
                f"no handler {args.name!r} in LACUNA_HANDLERS (configured: {known})", exit_code=2
            )
        return _with_store(
            environ,
            lambda s: s.set_paused(args.name, pause, reason=reason, now=datetime.now(UTC)),
        )

    changed = _local_or_remote(
        args,
        environ,
        local,
        lambda client: client.set_paused(args.name, pause, reason=reason),
        usage=(*USAGE_STATUSES, 404),
    )
    name = printable(args.name)
    if pause:
        print(
            f"paused {name}: its deliveries wait (every replica stops starting attempts"
            " within LACUNA_POLL_INTERVAL)"
            if changed
            else f"{name} was already paused"
        )
    else:
        print(
            f"resumed {name}: its waiting deliveries are sent now"
            if changed
            else f"{name} was not paused"
        )
    return 0


# --- parser ----------------------------------------------------------------------------------


#: What a whole-number argument of more digits reads as: past every bound (the settings'
#: rule, config.MAX_INT_DIGITS).
_HUGE_ARGUMENT = 10**18


def _positive(value: str) -> int:
    # ASCII digits only, as the settings' (config.positive_int): int() also takes "1_000" and
    # other scripts' digits, and refuses more than 4300 digits as if they were no number.
    text = value.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {quoted(value)}")
    significant = text.lstrip("+-").lstrip("0")  # int() counts leading zeros as digits
    number = int(significant or "0") if len(significant) <= 18 else _HUGE_ARGUMENT
    if text.startswith("-"):
        number = -number
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {quoted(value)}")
    return number


def _bounded(limit: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = _positive(value)
        if number > limit:
            raise argparse.ArgumentTypeError(f"must be at most {limit}, got {quoted(value)}")
        return number

    return parse


def _listen_host(value: str) -> str:
    """``--host``: checked as ``HOST`` is (config._host), so that a bad one is a usage error,
    not a traceback from the resolver."""
    try:
        return _config_host(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: Largest --timeout (a day): far past any answer, and far from what the clock can hold.
MAX_SEND_TIMEOUT_SECONDS = 86_400.0


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0 or number > MAX_SEND_TIMEOUT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a number above 0 and at most {MAX_SEND_TIMEOUT_SECONDS:.0f}, got {value!r}"
        )
    return number


def _event_type(value: str) -> str:
    if not value.strip() or len(value) > MAX_TYPE_LENGTH or value != value.strip():
        raise argparse.ArgumentTypeError(
            f"must be a type such as job.completed (1 to {MAX_TYPE_LENGTH} characters, "
            f"no surrounding spaces), got {value!r}"
        )
    return value


def _event_id(value: str) -> str:
    if not value.strip() or len(value) > MAX_ID_LENGTH:
        raise argparse.ArgumentTypeError(
            f"must be a non-empty id of at most {MAX_ID_LENGTH} characters, got {value!r}"
        )
    return value


def _handler_name(value: str) -> str:
    # Every handler's name has this shape (config.HANDLER_NAME_RE); `replay --handler` with
    # any other name created a delivery that no handler could ever take, due forever.
    if not HANDLER_NAME_RE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"must be a handler name (lowercase letters, digits and _), got {value!r}"
        )
    return value


def _pause_reason(value: str) -> str:
    # The admin API's rule for the same field (models.pause_reason_problem).
    from .models import pause_reason_problem

    problem = pause_reason_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _remote_options(
    parser: argparse.ArgumentParser, *, local: bool = True, inherited: bool = False
) -> None:
    """``--url`` and ``--token``, the same for every command that can work through an admin
    API (``_admin_remote`` reads them). ``local``: without them the command works on
    ``LACUNA_DATABASE_URL``. ``inherited``: the options of a subcommand whose parent has
    them too (``handlers --url U pause NAME`` and ``handlers pause NAME --url U`` alike):
    left unset, they keep the parent's value."""
    fallback = "; neither: LACUNA_DATABASE_URL directly" if local else ""
    default: Any = argparse.SUPPRESS if inherited else None
    group = parser.add_argument_group("admin API (docs/cli.md#local-or-remote)")
    group.add_argument(
        "--url",
        default=default,
        help="a remote admin API, e.g. http://10.0.0.5:8001"
        f" (default: $LACUNA_ADMIN_URL{fallback})",
    )
    group.add_argument(
        "--token",
        default=default,
        help="its admin token (default: $LACUNA_ADMIN_TOKEN, the first of several)",
    )


def _admin_args(parser: argparse.ArgumentParser, *, local: bool) -> None:
    _remote_options(parser, local=local)
    parser.add_argument(
        "--from",
        dest="start",
        choices=["now", "beginning"],
        default="now",
        help=(
            "where to start without a saved cursor (default now)"
            if not local
            else "now: the events stored from now on (default); beginning: every stored event first"
        ),
    )


def _tail(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from . import listen

    target = _admin_remote(args, environ)
    if target is None:
        return _tail_store(args, environ)
    try:
        main = listen.tail(
            target,
            as_json=args.json,
            from_beginning=args.start == "beginning",
            out=sys.stdout,
            say=listen.stderr_say,
        )
        return listen.run(main, listen.stderr_say, signal_exit=True)
    except listen.ArgumentError as exc:
        raise CommandError(str(exc), exit_code=2) from None
    except listen.ListenError as exc:
        raise CommandError(str(exc)) from None


def _tail_store(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``tail`` without ``--url`` / ``LACUNA_ADMIN_URL``: the store of LACUNA_DATABASE_URL."""
    from . import listen

    settings = _settings(environ, require_secret=False)
    url = settings.database_url
    if url.startswith("sqlite:///") and not _exists(
        Path(url.removeprefix("sqlite:///")), "LACUNA_DATABASE_URL"
    ):
        raise CommandError(
            f"no database at {url.removeprefix('sqlite:///')} (LACUNA_DATABASE_URL; to follow an"
            " admin API instead: --url or LACUNA_ADMIN_URL)"
        )

    async def run() -> None:
        store = open_store(url, sqlite_synchronous=settings.sqlite_synchronous)
        await store.open()
        try:
            await listen.tail_store(
                store,
                as_json=args.json,
                from_beginning=args.start == "beginning",
                out=sys.stdout,
                say=listen.stderr_say,
            )
        finally:
            await store.close()

    try:
        return listen.run(run(), listen.stderr_say, signal_exit=True)
    except (StoreUnavailable, ValueError) as exc:
        raise _store_error(exc, url, "store unavailable") from None


def _listen(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from . import listen

    forward_to = args.forward_to
    _check_http_url("--forward-to", forward_to)
    try:
        target = listen.admin_target(args.url, args.token, environ)
        cursor_file = (
            Path(args.cursor_file)
            if args.cursor_file
            else listen.default_cursor_file(target, forward_to, environ)
        )
        main = listen.listen(
            target,
            forward_to=forward_to,
            keys=listen.parse_secret(args.secret),
            events=listen.parse_events(args.events),
            cursor_file=cursor_file,
            from_beginning=args.start == "beginning",
            say=listen.stderr_say,
        )
        return listen.run(main, listen.stderr_say)
    except listen.ArgumentError as exc:
        raise CommandError(str(exc), exit_code=2) from None
    except listen.ListenError as exc:
        raise CommandError(str(exc)) from None
    except BrokenPipeError:
        raise  # its status lines' reader went away (`2>&1 | head`): 141, as every command
    except OSError as exc:
        raise CommandError(f"cannot keep the cursor file: {exc}") from None


def _port(value: str) -> int:
    number = _positive(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {quoted(value)}")
    return number


def _filter_arguments(
    parser: argparse.ArgumentParser, *, handler_help: str, repeatable_handler: bool
) -> None:
    """The filters of ``GET /events`` (``_FILTER_OPTIONS``)."""
    filters = parser.add_argument_group("filters (as GET /api/v1/events)")
    filters.add_argument("--type", type=_event_type, help="event type, exactly")
    filters.add_argument("--task-id", dest="task_id", help="data.id, exactly")
    filters.add_argument("--since", help="received at or after: RFC 3339 or Unix seconds")
    filters.add_argument("--until", help="received before: RFC 3339 or Unix seconds")
    filters.add_argument(
        "--handler",
        action="append" if repeatable_handler else "store",
        type=_handler_name,
        help=handler_help,
    )
    filters.add_argument(
        "--status",
        choices=["pending", "due", "running", "waiting", "done", "dead"],
        help="events with a delivery in this state (of --handler when given)",
    )
    filters.add_argument(
        "--match",
        action="append",
        metavar="PATH:VALUE",
        help="payload field equals value, e.g. data.title:Late Night Study (repeatable)",
    )
    filters.add_argument("--q", help="substring of the raw payload (case-sensitive)")


def _bulk_arguments(parser: argparse.ArgumentParser, *, handler_help: str) -> None:
    """The filters of ``GET /events`` and the options of a bulk operation."""
    _filter_arguments(parser, handler_help=handler_help, repeatable_handler=True)
    parser.add_argument(
        "--all", action="store_true", help="every stored event (instead of filters)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count the matching events, write nothing"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Receive and dispatch Lacuna Music API webhooks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser(
        "serve",
        help="run the service (settings from the environment)",
        description="Intake (the webhook route) and, unless LACUNA_DISPATCH=false, dispatch:"
        " each handler runs in a worker process of its own that serve supervises"
        " (docs/workers.md).",
    )
    serve.add_argument(
        "--host", type=_listen_host, help="listen address (default: $HOST or 0.0.0.0)"
    )
    serve.add_argument("--port", type=_port, help="listen port (default: $PORT or 8000)")

    sub.add_parser(
        "worker",
        help="dispatch without intake: run the handlers on stored deliveries (PostgreSQL only;"
        " see docs/workers.md)",
        description="Claim due deliveries and run each handler in a worker process of its own,"
        " without the HTTP intake. PostgreSQL only: on SQLite `serve` does this itself. Pair"
        " it with `serve` under LACUNA_DISPATCH=false to scale intake and dispatch apart.",
    )

    dev = sub.add_parser("dev", help="run for local development (what `make run` does)")
    dev.add_argument("--env-file", default=".env", help="settings file (default: .env)")

    send = sub.add_parser("send", help="sign and POST a sample or given event")
    send.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/webhooks/lacuna")
    send.add_argument(
        "--type",
        type=_event_type,
        help="event type (default job.completed); job.completed and job.failed get a "
        "realistic sample, any other type a minimal one",
    )
    send.add_argument("--file", help="send this JSON file's exact bytes instead ('-': stdin)")
    send.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="edit the event, e.g. data.title=Rainy Day or data.tracks[0].duration=61.5 "
        "(VALUE is JSON when it parses, else text; repeatable)",
    )
    send.add_argument("--id", type=_event_id, help="event id (send it again to see a duplicate)")
    send.add_argument(
        "--secret", help="signing secret(s), comma-separated (default: $LACUNA_WEBHOOK_SECRET)"
    )
    send.add_argument(
        "--secret-index",
        type=_positive,
        default=1,
        metavar="N",
        help="sign with the Nth of several secrets (default 1)",
    )
    send.add_argument(
        "--count", type=_bounded(1_000_000), default=1, help="events to send (default 1)"
    )
    send.add_argument(
        "--concurrency", type=_bounded(1000), default=1, help="requests in flight (default 1)"
    )
    send.add_argument("--timeout", type=_seconds, default=10.0, help="seconds (default 10)")

    events = sub.add_parser("events", help="list or show stored events")
    events_sub = events.add_subparsers(dest="events_command", required=True, parser_class=_Parser)
    events_list = events_sub.add_parser(
        "list",
        help="newest first",
        description="The stored events the filters select (all without them), newest first:"
        " GET /api/v1/events of an admin API, or LACUNA_DATABASE_URL directly.",
    )
    events_list.add_argument(
        "--limit", type=_bounded(MAX_LIST_LIMIT), default=50, help="at most N events (default 50)"
    )
    _filter_arguments(
        events_list,
        handler_help="events with a delivery of this handler",
        repeatable_handler=False,
    )
    events_list.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_options(events_list)
    events_show = events_sub.add_parser("show", help="one event, its deliveries and attempts")
    events_show.add_argument("event_id", type=_event_id)
    events_show.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_options(events_show)

    deliveries = sub.add_parser("deliveries", help="list deliveries")
    deliveries_sub = deliveries.add_subparsers(
        dest="deliveries_command", required=True, parser_class=_Parser
    )
    deliveries_list = deliveries_sub.add_parser("list", help="newest first")
    deliveries_list.add_argument("--status", choices=[s.value for s in DeliveryStatus])
    deliveries_list.add_argument("--handler", type=_handler_name)
    deliveries_list.add_argument("--event", type=_event_id, help="only this event id")
    deliveries_list.add_argument("--limit", type=_bounded(MAX_LIST_LIMIT), default=50)
    deliveries_list.add_argument("--json", action="store_true", help="machine-readable output")
    _remote_options(deliveries_list)

    replay = sub.add_parser(
        "replay",
        help="deliver stored events again: one by id, or every event the filters select",
        description="With EVENT_ID: that event's deliveries are due again (--handler: only"
        " those, created if missing). Without it: every event the filters select (or --all),"
        " in batches that never hold the store for long; --to HANDLER creates the missing"
        " deliveries of HANDLER and makes its existing ones due again, without --to every"
        " existing delivery is made due again.",
    )
    replay.add_argument(
        "event_id", nargs="?", type=_event_id, help="one event (omit it to use the filters)"
    )
    _bulk_arguments(
        replay,
        handler_help="with EVENT_ID: only this handler (repeatable);"
        " without: events with a delivery of this handler",
    )
    replay.add_argument(
        "--to",
        action="append",
        type=_handler_name,
        metavar="HANDLER",
        help="create HANDLER's missing deliveries and make its existing ones due (repeatable)",
    )

    backfill = sub.add_parser(
        "backfill",
        help="create a handler's missing deliveries over stored events (a handler added later)",
        description="Every event the filters select (or --all) that has no delivery of"
        " HANDLER gets one, due now; existing deliveries are left as they are.",
    )
    backfill.add_argument("name", type=_handler_name, metavar="HANDLER")
    _bulk_arguments(backfill, handler_help="events with a delivery of this handler")

    retry_dead = sub.add_parser("retry-dead", help="make dead deliveries due again")
    retry_dead.add_argument("--handler", type=_handler_name, help="only this handler's")
    _remote_options(retry_dead)

    tail = sub.add_parser(
        "tail",
        help="print each event as a deployment stores it (the admin API's live stream)",
        description="Follow GET /api/v1/stream of an admin API (--url, or LACUNA_ADMIN_URL):"
        " one line per event (received, type, id, task, title); reconnects by itself when the"
        " stream is lost. Without an admin API, follow the store of LACUNA_DATABASE_URL.",
    )
    _admin_args(tail, local=True)
    tail.add_argument("--json", action="store_true", help="one JSON object per line")

    listen = sub.add_parser(
        "listen",
        help="forward a deployment's events to a local app, signed, resuming where it stopped",
        description="Follow GET /api/v1/stream of an admin API and POST each event to"
        " --forward-to with Standard Webhooks headers; the last forwarded event's cursor is"
        " kept in a local file, so a restart (after Ctrl-C, a crash, a laptop that slept)"
        " resumes right after it. A failing local app is retried until it takes the event.",
    )
    _admin_args(listen, local=False)
    listen.add_argument("--forward-to", required=True, help="e.g. http://127.0.0.1:3000/hooks")
    listen.add_argument(
        "--secret", help="whsec_… secret(s) to sign with, comma-separated (default: unsigned)"
    )
    listen.add_argument(
        "--events", help="only these event types, comma-separated (the others are skipped)"
    )
    listen.add_argument(
        "--cursor-file",
        help="where the cursor is kept (default: one file per --url and --forward-to under"
        " $XDG_STATE_HOME/lacuna-webhooks/listen)",
    )

    sub.add_parser("migrate", help="apply pending schema migrations")
    handlers = sub.add_parser(
        "handlers",
        help="list installed handler kinds, the configured instances and their state;"
        " pause or resume one",
    )
    _remote_options(handlers)
    actions = handlers.add_subparsers(dest="action", parser_class=_Parser)
    pause = actions.add_parser(
        "pause", help="stop starting attempts of a handler, on every replica, until resumed"
    )
    pause.add_argument("name", help="a handler name from LACUNA_HANDLERS")
    pause.add_argument(
        "--reason",
        type=_pause_reason,
        default="paused by an operator",
        help="recorded and shown (1 to 1000 characters)",
    )
    _remote_options(pause, inherited=True)
    resume = actions.add_parser("resume", help="let a paused handler's deliveries go again")
    resume.add_argument("name", help="a handler name from LACUNA_HANDLERS")
    _remote_options(resume, inherited=True)
    return parser


def _refuse_non_utf8(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error (exit 2) for any text argument that is not UTF-8.

    Python keeps such bytes of ``argv`` as lone surrogates; passed on, they failed in
    whatever encoded them first, and a store's driver refusing one was reported as a bad
    ``LACUNA_DATABASE_URL`` or a pruned cursor."""
    names = _argument_names(parser)
    for dest, value in vars(args).items():
        texts = value if isinstance(value, list | tuple) else [value]
        for text in texts:
            if isinstance(text, str) and not is_utf8(text):
                parser.error(f"argument {names.get(dest, dest)}: not valid UTF-8 text")


def _argument_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each destination's name as argparse shows it (``--type``, ``ID``), over subcommands."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names.update(_argument_names(sub))
        elif action.option_strings:
            names.setdefault(action.dest, "/".join(action.option_strings))
        else:
            names.setdefault(action.dest, str(action.metavar or action.dest))
    return names


class StdoutError(Exception):
    """Standard output cannot be written (a full disk, ``> /dev/full``, a closed descriptor):
    not an ``OSError``, so that no handler of the command's own file errors takes it."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(exc.strerror or str(exc))


class _GuardedStdout:
    """``sys.stdout`` while a command runs: a write or flush that fails (but for a closed
    pipe, 141 as before) is a ``StdoutError``, which ``main`` reports as one line; a
    standard output closed before start (``>&-``: Python's ``sys.stdout`` is ``None`` and
    ``print`` dropped the output silently) fails its first write the same way. Anything
    else is the stream's own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if self._stream is None:
            raise StdoutError(OSError(errno.EBADF, os.strerror(errno.EBADF)))
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutError(exc) from None

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutError(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stdout_to_devnull(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null: the interpreter's own flush at exit then
    writes what is left in its buffer there, instead of failing again with a traceback (or
    an ``Exception ignored`` message and exit code 120)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # without a descriptor
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The command line's entry point: the command's exit code. Standard output is flushed
    before it returns, so that an error writing it is reported here, as one line."""
    stdout = sys.stdout
    if stdout is None:
        _reserve_descriptor(1)
    if sys.stderr is None:
        # `serve 2>&-`: its log lines (and its workers' relayed output) go nowhere, but do
        # go: logging configured on no stderr ended serve at its start (AttributeError).
        _reserve_descriptor(2)
        with contextlib.suppress(OSError):
            sys.stderr = open(  # noqa: SIM115 - the process's stderr, open as long as it runs
                2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False
            )
    guarded = _GuardedStdout(stdout)
    sys.stdout = guarded
    try:
        try:
            return _main(argv, environ)
        finally:
            guarded.flush()  # within main: its error is one line, not the interpreter's
    except StdoutError as exc:
        _stdout_to_devnull(stdout)
        with contextlib.suppress(OSError, ValueError):
            print(f"{PROG}: error: cannot write to standard output: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly, as other tools do.
        # stdout now points at /dev/null, so the interpreter's own flush at exit cannot
        # raise a second time (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        _stdout_to_devnull(stdout)
        return 141  # 128 + SIGPIPE, what a shell shows for a tool killed by it
    finally:
        if sys.stdout is guarded:
            sys.stdout = stdout


def _reserve_descriptor(fd: int) -> None:
    """Open /dev/null as descriptor ``fd`` (1 or 2) when it is closed (``>&-``, ``2>&-``:
    Python's ``sys.stdout`` or ``sys.stderr`` is ``None``), so that no file the command opens
    (the database, a child's output pipe) becomes that descriptor, where a program it starts
    would write its output."""
    try:
        os.fstat(fd)
    except OSError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)


def _main(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.error(f"unrecognized arguments: {_unrecognized(extras)}")
    _refuse_non_utf8(parser, args)
    env = dict(os.environ if environ is None else environ)
    # Error lines below (and every log line) mask the secret values the environment holds.
    remember_secrets(secret_values(env))
    if getattr(args, "token", None):
        remember_secrets([args.token])
    try:
        match args.command:
            case "serve":
                return _serve(env, args.host, args.port)
            case "worker":
                return _worker(env)
            case "dev":
                return _dev(env, Path(args.env_file))
            case "send":
                return _send(args, env)
            case "events":
                return _events(args, env)
            case "deliveries":
                return _deliveries(args, env)
            case "replay":
                return _replay(args, env)
            case "backfill":
                return _backfill(args, env)
            case "retry-dead":
                return _retry_dead(args, env)
            case "migrate":
                return _migrate(env)
            case "tail":
                return _tail(args, env)
            case "listen":
                return _listen(args, env)
            case "handlers":
                return _handlers(args, env)
    except CommandError as exc:
        print(f"{PROG}: error: {printable(mask_secrets(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"{PROG}: error: configuration: {printable(mask_secrets(str(exc)))}", file=sys.stderr)
        return 2
    except LacunaError as exc:
        print(f"{PROG}: error: {printable(mask_secrets(str(exc)))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # One line, not silence: after a Ctrl-C during a bulk operation the user must know
        # it stopped (a remote one finishes on the server, docs/cli.md).
        print(f"{PROG}: interrupted", file=sys.stderr)
        # A Ctrl-C between a coroutine's creation and its first step (the event loop still
        # being made) leaves it never awaited: Python's RuntimeWarning about that, logged
        # after the line above when the coroutine is collected, tells the user nothing.
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        return 130
    return 2
