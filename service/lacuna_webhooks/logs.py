"""structlog setup: JSON lines (console rendering on a TTY), stable event names.

Log events are named ``area.what`` (``webhook.received``, ``delivery.attempt``,
``serve.started``...) with key/value context. Secrets, signature values and
full outbound URLs are never logged: every line, ours and the libraries' (routed
through the standard ``logging`` module), passes ``redact_event``, which redacts
each URL in it and masks each secret value the environment holds (see
``redact``). The HTTP, database, broker and SMTP client libraries log requests
with their full URLs (and, at DEBUG, headers), so their loggers are held at
WARNING whatever ``LACUNA_LOG_LEVEL`` says (``QUIET_LIBRARIES``).
"""

from __future__ import annotations

import asyncio
import atexit
import io
import logging
import sys
import threading
from collections.abc import Iterable
from typing import Any, BinaryIO, cast

import orjson
import structlog

from .redact import needs_redaction, redact_text, remember_secrets
from .redact import redact_url as redact_url  # re-exported: where the handlers used to find it

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


QUIET_LIBRARIES = (
    "aio_pika",
    "aiobotocore",
    "aiohttp",
    "aiokafka",
    "aiomqtt",
    "aiormq",
    "aiosmtplib",
    "asyncpg",
    "boto3",
    "botocore",
    "h11",
    "h2",
    "hpack",
    "httpcore",
    "httpx",
    "kafka",
    "nats",
    "paho",
    "pamqp",
    "redis",
    "s3transfer",
    "urllib3",
    "websockets",
)
"""Client libraries whose loggers are held at WARNING: at INFO and DEBUG they log every
request with its full URL (a Slack webhook URL is a credential, an audio URL carries a
signed token) and sometimes its headers."""


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def redact_event(logger: Any, method_name: str, event_dict: Any) -> Any:
    """structlog processor: every string value (nested ones too) through ``redact_text``.

    Runs after exceptions are rendered to text, so a traceback is redacted too. A value
    is rewritten only when ``needs_redaction`` finds something in it: a line with
    nothing to redact costs one search per value.
    """
    for key, value in event_dict.items():
        if isinstance(value, str):
            if needs_redaction(value):
                event_dict[key] = redact_text(value)
        elif isinstance(value, dict | list | tuple):
            event_dict[key] = _redact_value(value)
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def _orjson_bytes(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str)


class LoopBatchedFile:
    """A binary file for ``BytesLogger`` that writes once per event-loop turn.

    Under load many requests finish in the same turn of the loop; their lines are
    joined and written with one system call when the turn ends, instead of one write
    (and one flush) per line. A line is never held longer than that turn. Lines
    logged outside a running loop (other threads, start-up, shutdown) are written at
    once, together with anything still pending; exit flushes the rest. A SIGKILL
    loses at most the lines of the turn it interrupted.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        atexit.register(self.drain)

    def write(self, data: bytes) -> int:
        with self._lock:
            self._pending.append(data)
        return len(data)

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.drain()
            return
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self.drain)

    def drain(self) -> None:
        with self._lock:
            self._scheduled_on = None
            if not self._pending:
                return
            data = b"".join(self._pending)
            self._pending.clear()
            try:
                self._raw.write(data)
                self._raw.flush()
            except (OSError, ValueError):
                pass  # stderr is gone (closed pipe, interpreter exit): nowhere left to write


#: The processor list ``configure`` gave structlog for JSON lines (``None``: another format
#: or configuration). ``info_lines`` renders a line itself when a logger runs exactly these.
_json_chain: list[Any] | None = None
#: Value types the JSON chain passes through unchanged but for redaction of strings.
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _batching(base: type[Any]) -> type[Any]:
    """``base`` (a filtering bound logger) plus ``info_lines``: many lines of one event at once."""

    class BatchingBoundLogger(base):  # type: ignore[misc]
        def info_lines(self, event: str, entries: Iterable[dict[str, Any]]) -> None:
            """``info(event, **entry)`` for each entry: the same lines, handed to the output
            in one piece instead of one call per line.

            With ``configure``'s JSON chain, an entry of plain values (strings, numbers,
            booleans, ``None``) on a logger without bound context is rendered here, as the
            chain would render it (the level, the timestamp, ``redact_event``, orjson), in
            about a tenth of the chain's time: the request log (intake.py) writes one line per
            webhook. The lines of one call share one timestamp: they are logged together.
            """
            if not self.is_enabled_for(logging.INFO):
                return
            chain = _json_chain
            # configure's TimeStamper when this logger runs its JSON chain: render directly
            stamper = (
                chain[1]
                if chain is not None and self._processors is chain and not self._context
                else None
            )
            stamp: Any = None
            redact_all = False
            rendered: list[Any] = []
            for entry in entries:
                if (
                    stamper is not None
                    and "exc_info" not in entry
                    and _PLAIN.issuperset(map(type, entry.values()))
                ):
                    if stamp is None:
                        stamp = stamper(None, "info", {})["timestamp"]
                        # The chain redacts every value of a line, these three too.
                        redact_all = any(map(needs_redaction, (event, "info", stamp)))
                    line = {**entry, "event": event, "level": "info", "timestamp": stamp}
                    if redact_all or any(
                        type(v) is str and needs_redaction(v) for v in entry.values()
                    ):
                        redact_event(None, "info", line)
                    rendered.append(orjson.dumps(line, default=str))
                    continue
                try:
                    args, kw = self._process_event("info", event, entry)
                except structlog.DropEvent:
                    continue
                if kw or len(args) != 1 or not isinstance(args[0], str | bytes):
                    self._logger.info(*args, **kw)  # a renderer of another kind: one by one
                else:
                    rendered.append(args[0])
            if rendered:
                # The output adds the last newline itself, as it does for a single line.
                newline: Any = b"\n" if isinstance(rendered[0], bytes) else "\n"
                self._logger.msg(newline.join(rendered))

    return BatchingBoundLogger


#: A line printed without its newline is logged once it reaches this many bytes, so that
#: output that never ends a line cannot grow without bound.
MAX_OUTPUT_LINE_BYTES = 64 * 1024


class _OutputLines(io.BufferedIOBase):
    """A writable binary stream that logs each line written to it as a ``process.output``
    line (redacted like every other line) instead of printing it as it came. A line is
    logged as soon as its newline is written, so nothing waits in a buffer for an exit that
    may never run its ``atexit`` (a worker that is killed); ``flush`` logs a line without
    its newline as it stands."""

    def __init__(self, stream: str, context: dict[str, Any]) -> None:
        super().__init__()
        self._stream = stream
        self._context = context
        self._partial = bytearray()
        self._lock = threading.Lock()  # print() from a plugin's threads too

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        with self._lock:
            self._partial += chunk
            *lines, rest = bytes(self._partial).split(b"\n")
            if len(rest) >= MAX_OUTPUT_LINE_BYTES:
                lines.append(rest)
                rest = b""
            self._partial = bytearray(rest)
        for line in lines:
            self._log(line)
        return len(chunk)

    def flush(self) -> None:
        with self._lock:
            rest, self._partial = bytes(self._partial), bytearray()
        if rest:
            self._log(rest)

    def close(self) -> None:
        if not self.closed:
            self.flush()
        super().close()

    def _log(self, line: bytes) -> None:
        text = line.decode("utf-8", "backslashreplace").rstrip("\r")
        structlog.get_logger("lacuna_webhooks.output").info(
            "process.output", stream=self._stream, line=text, **self._context
        )


def capture_output(**context: Any) -> None:
    """Log what this process prints (``sys.stdout``, ``sys.stderr``, their ``.buffer``) as
        ``process.output`` lines with ``stream`` (``"stdout"``/``"stderr"``), ``line`` and
        ``context``, through ``configure``'s chain: redacted, and in the log format, each as soon
    as its newline is written (or at a ``flush``). For the
        handler worker processes, where a plugin's ``print()`` of a URL or a secret would
        otherwise reach the output raw. Call after ``configure`` (whose output keeps the real
        stderr). Writes to the file descriptors themselves (``os.write(1, ...)``, a program the
        plugin starts) are not seen."""
    for name in ("stdout", "stderr"):
        stream = io.TextIOWrapper(
            # a write-only BufferedIOBase: typeshed's wrapped-buffer protocol wants reads too
            _OutputLines(name, context),  # type: ignore[type-var]
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
            write_through=True,
        )
        atexit.register(stream.close)  # a last line without its newline
        setattr(sys, name, stream)


#: What ``configure`` was last given (the format resolved), for child processes to use.
_configured: tuple[str, str] | None = None


def configured() -> tuple[str, str] | None:
    """(log format, level) of this process's last ``configure``, or ``None`` if it has not
    run: a child process (the SQLite writer) configures its own logging the same way."""
    return _configured


def configure(
    *, log_format: str = "auto", level: str = "info", secrets: Iterable[str] = ()
) -> None:
    """Configure structlog (and route stdlib logging, e.g. uvicorn's, through the same format).

    ``secrets`` (usually ``redact.secret_values(environ)``) are masked in every line.
    """
    global _json_chain, _configured
    remember_secrets(secrets)
    _json_chain = None
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    _configured = ("console" if use_console else "json", level)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        # Plain tracebacks: the default one (with rich) prints local variables.
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if use_console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    if use_console:
        structlog.configure(
            processors=[*shared, structlog.processors.format_exc_info, redact_event, renderer],
            wrapper_class=_batching(structlog.make_filtering_bound_logger(_LEVELS[level])),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )
    else:
        # One line per request is on the hot path: render straight to bytes with orjson.
        # info_lines renders plain entries as this chain does (level, timestamp, redaction,
        # orjson): a change here is a change there.
        chain: list[Any] = [
            *shared,
            structlog.processors.format_exc_info,
            redact_event,
            structlog.processors.JSONRenderer(serializer=_orjson_bytes),
        ]
        structlog.configure(
            processors=chain,
            wrapper_class=_batching(structlog.make_filtering_bound_logger(_LEVELS[level])),
            logger_factory=structlog.BytesLoggerFactory(file=cast(BinaryIO, _batched_stderr())),
            cache_logger_on_first_use=True,
        )
        _json_chain = chain
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.add_logger_name,
                structlog.processors.format_exc_info,
                redact_event,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # uvicorn's default log config (any earlier ``uvicorn.Config`` in this process, a
    # library's or a test's) gives its loggers their own unredacted handlers and stops them
    # propagating: take them back so every line goes through the handler above.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        stdlib = logging.getLogger(name)
        stdlib.handlers[:] = []
        stdlib.propagate = True
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, _LEVELS[level]))
    # What Python prints itself went to stderr raw, secrets and all: a warning a library
    # or a plugin gives (`warnings.warn(f"... {url}")`), an exception that ends a thread (a
    # plugin's or a library's), one raised where nobody can catch it (a __del__). Each is
    # a redacted log line instead.
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as the default hook: a thread's sys.exit() is no error
    thread = args.thread.name if args.thread is not None else None
    # `is None`, not `or`: an exception may be falsy (a __len__ of 0), and its type may
    # need arguments; the hook then raised and the line was lost.
    exc = args.exc_value if args.exc_value is not None else _bare(args.exc_type)
    exc_info = (args.exc_type, exc, args.exc_traceback)
    structlog.get_logger("lacuna_webhooks").error(
        "thread.uncaught_exception", thread=thread, exc_info=exc_info
    )


def _bare(exc_type: type[BaseException]) -> BaseException:
    try:
        return exc_type()
    except Exception:  # a type that needs arguments
        return RuntimeError(exc_type.__name__)


def _log_unraisable(args: Any) -> None:
    exc = args.exc_value if args.exc_value is not None else _bare(args.exc_type)
    structlog.get_logger("lacuna_webhooks").error(
        "unraisable_exception",
        message=args.err_msg or "Exception ignored",
        object=_safe_repr(args.object),
        exc_info=(args.exc_type, exc, args.exc_traceback),
    )


def _safe_repr(value: object) -> str | None:
    if value is None:
        return None
    try:
        return repr(value)[:200]
    except Exception:  # a repr that raises: the unraisable hook must not
        return f"<{type(value).__name__}>"


_BATCHED: dict[int, LoopBatchedFile] = {}


def _batched_stderr() -> LoopBatchedFile:
    """One ``LoopBatchedFile`` per stderr stream (``configure`` may run more than once)."""
    raw = sys.stderr.buffer
    batched = _BATCHED.get(id(raw))
    if batched is None or batched._raw is not raw:
        batched = _BATCHED[id(raw)] = LoopBatchedFile(raw)
    return batched
