"""The command line, and the composition root: the only module that wires everything together.

``lacuna-webhooks serve | dev | send | events | deliveries | replay | retry-dead | migrate |
handlers``. Errors are one line on stderr (``lacuna-webhooks: error: ...``) and a non-zero
exit: 2 for bad arguments or settings, 1 for anything else that went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson

from . import __version__
from .config import Settings
from .errors import ConfigError, EventNotFound, LacunaError, StoreUnavailable
from .models import DeliveryStatus
from .store import DeliveryRecord, EventRecord, Store, open_store

PROG = "lacuna-webhooks"
T = TypeVar("T")


class CommandError(Exception):
    """A command failed in a way the user can fix; printed as one line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line instead of argparse's usage dump.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- serve ---------------------------------------------------------------------------------


def _settings(environ: Mapping[str, str], *, require_secret: bool) -> Settings:
    try:
        return Settings.from_env(environ, require_secret=require_secret)
    except ConfigError as exc:
        raise CommandError(f"configuration: {exc}", exit_code=2) from None


def _serve(environ: Mapping[str, str], host: str | None, port: int | None) -> int:
    import uvicorn

    from .app import create_app
    from .logs import configure
    from .plugins import build_handlers
    from .server import server_config

    settings = _settings(environ, require_secret=True)
    configure(log_format=settings.log_format, level=settings.log_level)
    try:
        handlers = build_handlers(
            settings.handlers,
            settings.environ,
            allow_private_urls=settings.allow_private_urls,
            timeout_seconds=settings.handler_timeout_seconds,
        )
    except ConfigError as exc:
        raise CommandError(f"configuration: {exc}", exit_code=2) from None

    async def run() -> None:
        # SQLite's writer in a process of its own: the request path never waits for its GIL.
        store = open_store(
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            sqlite_process=True,
        )
        try:
            await store.open()
        except (StoreUnavailable, OSError) as exc:
            await handlers.aclose()
            raise CommandError(f"cannot open the store (LACUNA_DATABASE_URL): {exc}") from None
        try:
            app = create_app(settings, store=store, handlers=handlers)
            # The HTTP layer's limits and timeouts (server.py, docs/http.md).
            config = server_config(
                app,
                settings,
                app.state.metrics,
                host=host or settings.host,
                port=port or settings.port,
            )
            server = uvicorn.Server(config)
            # uvicorn re-raises the signal that stopped it once it has shut down; after a
            # graceful drain a SIGTERM should end the process with 0, not "killed by signal".
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            await server.serve()
            if not server.started:
                raise CommandError(f"could not listen on {config.host}:{config.port} (HOST, PORT)")
        finally:
            await store.close()

    # uvloop when installed (uvicorn[standard] brings it), as `uvicorn.run` would choose.
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run())
    return 0


def _load_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; ``#`` comments and blank lines skipped; optional quotes removed."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _dev(environ: Mapping[str, str], env_file: Path) -> int:
    """The ``make run`` path: a development secret kept in a git-ignored ``.env``."""
    env = {**_load_env_file(env_file), **environ}
    created: list[str] = []
    if not env.get("LACUNA_WEBHOOK_SECRET", "").strip():
        env["LACUNA_WEBHOOK_SECRET"] = "whsec_dev_" + secrets.token_urlsafe(24)
        created.append(f"LACUNA_WEBHOOK_SECRET={env['LACUNA_WEBHOOK_SECRET']}")
        if "LACUNA_HANDLERS" not in env:
            env["LACUNA_HANDLERS"] = "log"
            created.append("LACUNA_HANDLERS=log")
    if created:
        with env_file.open("a", encoding="utf-8") as fh:
            fh.write("# Generated by `make run` for local development. Never commit this file.\n")
            fh.write("\n".join(created) + "\n")
        os.chmod(env_file, 0o600)
    env.setdefault("HOST", "127.0.0.1")
    host, port = env["HOST"], env.get("PORT", "8000")
    shown_host = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host  # noqa: S104
    secret = env["LACUNA_WEBHOOK_SECRET"].split(",")[0].strip()
    print(
        f"\n  lacuna-webhooks {__version__}, development mode\n"
        f"  settings from {env_file} ({'created now' if created else 'existing'})"
        " and the environment\n"
        f"  webhook secret: {secret}\n"
        f"  database: {env.get('LACUNA_DATABASE_URL', 'sqlite:///./lacuna-webhooks.db')}\n"
        f"  handlers: {env.get('LACUNA_HANDLERS') or '(none)'}\n\n"
        "  Send it a signed test event from another terminal:\n\n"
        f"    .venv/bin/lacuna-webhooks send --url http://{shown_host}:{port}/webhooks/lacuna"
        f" --secret {secret}\n\n"
        "  Then look at it: .venv/bin/lacuna-webhooks events list\n",
        file=sys.stderr,
        flush=True,
    )
    return _serve(env, None, None)


# --- send ----------------------------------------------------------------------------------


def _send(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import httpx

    from .samples import sample_event
    from .signature import sign

    secret = args.secret or environ.get("LACUNA_WEBHOOK_SECRET", "").split(",")[0].strip()
    if not secret:
        raise CommandError("no secret: pass --secret or set LACUNA_WEBHOOK_SECRET", 2)
    if args.file:
        try:
            body = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
        except OSError as exc:
            raise CommandError(f"cannot read --file: {exc.strerror}: {args.file}", 2) from None
    else:
        body = orjson.dumps(sample_event(args.type))
    if not args.url.startswith(("http://", "https://")):
        raise CommandError(f"--url must start with http:// or https://, got {args.url!r}", 2)
    header = sign(body, secret)
    try:
        response = httpx.post(
            args.url,
            content=body,
            headers={"x-lacuna-signature": header, "content-type": "application/json"},
            timeout=args.timeout,
        )
    except httpx.HTTPError as exc:
        raise CommandError(f"could not POST to {args.url}: {exc}") from None
    print(f"{response.status_code} {response.reason_phrase}")
    print(response.text)
    return 0 if response.is_success else 1


# --- store commands ------------------------------------------------------------------------


def _with_store(environ: Mapping[str, str], work: Callable[[Store], Awaitable[T]]) -> T:
    settings = _settings(environ, require_secret=False)
    url = settings.database_url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
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
    except StoreUnavailable as exc:
        raise CommandError(f"store unavailable (LACUNA_DATABASE_URL): {exc}") from None


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    if not rows:
        return "(none)"
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
        "created_at": record.created_at.isoformat(),
        "updated_at": record.updated_at.isoformat(),
    }


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


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
    now = datetime.now(UTC)
    if args.events_command == "list":
        records = _with_store(
            environ, lambda s: s.list_events(limit=args.limit, event_type=args.type)
        )
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

    async def show(store: Store) -> tuple[EventRecord | None, list[DeliveryRecord], dict[int, Any]]:
        record = await store.get_event(args.event_id)
        if record is None:
            return None, [], {}
        deliveries = await store.list_deliveries(event_id=args.event_id, limit=1000)
        attempts = {d.id: await store.list_attempts(d.id) for d in deliveries}
        return record, deliveries, attempts

    record, deliveries, attempts = _with_store(environ, show)
    if record is None:
        raise CommandError(f"no event {args.event_id!r} in the store")
    if args.json:
        doc = _event_json(record)
        doc["payload"] = orjson.loads(record.raw)
        doc["deliveries"] = [
            {
                **_delivery_json(d, now),
                "attempts_log": [
                    {
                        "attempt": a.attempt,
                        "started_at": a.started_at.isoformat(),
                        "outcome": a.outcome.value,
                        "duration_ms": round(a.duration_seconds * 1000, 1),
                        "error": a.error,
                    }
                    for a in attempts[d.id]
                ],
            }
            for d in deliveries
        ]
        _print_json(doc)
        return 0
    print(f"event     {record.id}\ntype      {record.type}\ntask      {record.task_id or '-'}")
    print(f"received  {_iso(record.received_at)}" + ("  (superseded)" if record.superseded else ""))
    print("\ndeliveries")
    print(_deliveries_table(deliveries, now))
    for d in deliveries:
        for a in attempts[d.id]:
            error = f"  {a.error}" if a.error else ""
            print(
                f"  {d.handler} attempt {a.attempt}: {a.outcome.value} at {_iso(a.started_at)}"
                f" ({a.duration_seconds * 1000:.0f} ms){error}"
            )
    print("\npayload")
    print(orjson.dumps(orjson.loads(record.raw), option=orjson.OPT_INDENT_2).decode())
    return 0


def _deliveries(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    now = datetime.now(UTC)
    status = DeliveryStatus(args.status) if args.status else None
    records = _with_store(
        environ,
        lambda s: s.list_deliveries(
            status=status, handler=args.handler, event_id=args.event, limit=args.limit
        ),
    )
    if args.json:
        _print_json([_delivery_json(r, now) for r in records])
    else:
        print(_deliveries_table(records, now))
    return 0


def _replay(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    handlers = args.handler or None
    try:
        count = _with_store(
            environ, lambda s: s.replay(args.event_id, handlers, now=datetime.now(UTC))
        )
    except EventNotFound:
        raise CommandError(f"no event {args.event_id!r} in the store") from None
    if count == 0:
        raise CommandError(
            f"event {args.event_id} has no deliveries to replay; name one with --handler"
        )
    print(f"replayed {args.event_id}: {count} deliveries due now (a running `serve` sends them)")
    return 0


def _retry_dead(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    count = _with_store(
        environ, lambda s: s.retry_dead(handler=args.handler, now=datetime.now(UTC))
    )
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
    except StoreUnavailable as exc:
        raise CommandError(f"store unavailable (LACUNA_DATABASE_URL): {exc}") from None
    print(f"schema is up to date ({settings.database_url.split('://', 1)[0]})")
    return 0


def _handlers() -> int:
    from .plugins import available

    for name, target in sorted(available().items()):
        print(f"{name:12} {target}")
    return 0


# --- parser ----------------------------------------------------------------------------------


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value!r}")
    return number


def _port(value: str) -> int:
    number = _positive(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Receive and dispatch Lacuna Music API webhooks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the service (settings from the environment)")
    serve.add_argument("--host", help="listen address (default: $HOST or 0.0.0.0)")
    serve.add_argument("--port", type=_port, help="listen port (default: $PORT or 8000)")

    dev = sub.add_parser("dev", help="run for local development (what `make run` does)")
    dev.add_argument("--env-file", default=".env", help="settings file (default: .env)")

    send = sub.add_parser("send", help="sign and POST a sample or given event")
    send.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/webhooks/lacuna")
    send.add_argument("--type", default="job.completed", choices=["job.completed", "job.failed"])
    send.add_argument("--file", help="send this JSON file's exact bytes instead ('-': stdin)")
    send.add_argument("--secret", help="signing secret (default: $LACUNA_WEBHOOK_SECRET)")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    events = sub.add_parser("events", help="list or show stored events")
    events_sub = events.add_subparsers(dest="events_command", required=True, parser_class=_Parser)
    events_list = events_sub.add_parser("list", help="newest first")
    events_list.add_argument("--limit", type=_positive, default=50)
    events_list.add_argument("--type", help="only this event type")
    events_list.add_argument("--json", action="store_true", help="machine-readable output")
    events_show = events_sub.add_parser("show", help="one event, its deliveries and attempts")
    events_show.add_argument("event_id")
    events_show.add_argument("--json", action="store_true", help="machine-readable output")

    deliveries = sub.add_parser("deliveries", help="list deliveries")
    deliveries_sub = deliveries.add_subparsers(
        dest="deliveries_command", required=True, parser_class=_Parser
    )
    deliveries_list = deliveries_sub.add_parser("list", help="newest first")
    deliveries_list.add_argument("--status", choices=[s.value for s in DeliveryStatus])
    deliveries_list.add_argument("--handler")
    deliveries_list.add_argument("--event", help="only this event id")
    deliveries_list.add_argument("--limit", type=_positive, default=50)
    deliveries_list.add_argument("--json", action="store_true", help="machine-readable output")

    replay = sub.add_parser("replay", help="deliver a stored event again")
    replay.add_argument("event_id")
    replay.add_argument(
        "--handler", action="append", help="only this handler (repeatable; default: all of its)"
    )

    retry_dead = sub.add_parser("retry-dead", help="make dead deliveries due again")
    retry_dead.add_argument("--handler", help="only this handler's")

    sub.add_parser("migrate", help="apply pending schema migrations")
    sub.add_parser("handlers", help="list installed handler plugins")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ if environ is None else environ)
    try:
        match args.command:
            case "serve":
                return _serve(env, args.host, args.port)
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
            case "retry-dead":
                return _retry_dead(args, env)
            case "migrate":
                return _migrate(env)
            case "handlers":
                return _handlers()
    except CommandError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"{PROG}: error: configuration: {exc}", file=sys.stderr)
        return 2
    except LacunaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
