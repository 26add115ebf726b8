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
import contextlib
import io
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, cast

import orjson
import structlog

from .logsink import NonBlockingSink
from .redact import mask_cut_secret, needs_redaction, redact_text, remember_secrets
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


#: A printed line longer than this is logged up to it (``truncated``), and the rest of it,
#: up to its newline, dropped: a continuation would have lost the context that redaction
#: needs (the start of a URL, of a secret).
MAX_OUTPUT_LINE_BYTES = 64 * 1024
#: A line without its newline is logged after this long without more output.
OUTPUT_IDLE_SECONDS = 1.0
#: At exit, what is left in the pipes gets this long to be logged.
OUTPUT_EXIT_SECONDS = 3.0
_pumps_closing = threading.Event()


def capture_output(configure_logs: Callable[[], None], **context: Any) -> None:
    """Log all that this process prints as ``process.output`` lines, redacted and in the log
    format: ``stream`` (``"stdout"``/``"stderr"``), ``line``, ``context``. For the handler
    worker processes, where a plugin's ``print()`` of a URL or a secret reached the output
    raw.

    File descriptors 1 and 2 become pipes that a thread per stream reads, so that
    everything written to them is caught (``print``, ``sys.__stdout__``, ``os.write(1, ...)``,
    a program the plugin starts with the descriptors it inherits) and ``sys.stdout.fileno()``
    is still a real descriptor (``subprocess.run(..., stdout=sys.stdout)``). The writer never
    runs our code, so no lock of ours is held where a finaliser might print. Lines are cut
    at newlines only; a line without one is logged after ``OUTPUT_IDLE_SECONDS`` without more
    output, or when the stream closes; a line over ``MAX_OUTPUT_LINE_BYTES`` is truncated.
    ``configure_logs`` (``configure(...)``) runs with ``sys.stderr`` on a copy of the
    original descriptor 2, so that the log lines themselves go out, not into the pipe."""
    logs_out = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    sys.stderr = logs_out
    configure_logs()
    pumps: list[threading.Thread] = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        _daemon(_pump, (read_end, name, context, pumps), f"output-{name}", pumps)
        # write_through: each write goes straight to the (locked) binary buffer, so prints
        # from several threads are not lost in the text layer's own pending list.
        pipe = io.TextIOWrapper(
            open(fd, "wb", closefd=False),  # noqa: SIM115 - open as long as the process
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
            write_through=True,
        )
        setattr(sys, name, _NotFromPumps(pipe, pumps, name, context))

    def finish() -> None:
        # At exit (after a traceback, say): the pipes' write ends close, so each pump reads
        # to the end and logs what is left before the process goes; what is written later
        # goes nowhere rather than out unredacted.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        deadline = time.monotonic() + OUTPUT_EXIT_SECONDS
        for pump in list(pumps):
            pump.join(max(deadline - time.monotonic(), 0))
        # A pump still reading (a program the plugin started holds the pipe open) stops
        # logging now: a daemon thread writing while the interpreter finalises its output
        # stream aborts the process.
        _pumps_closing.set()

    atexit.register(finish)


def _daemon(
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
    into: list[threading.Thread] | None = None,
) -> threading.Thread:
    """A daemon thread running ``target(*args)``, started; added to ``into`` first, so that
    it is in the list (``_NotFromPumps`` asks) from its first instruction."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    if into is not None:
        into.append(thread)
    thread.start()
    return thread


class _NotFromPumps:
    """``sys.stdout``/``sys.stderr`` under ``capture_output``: the pipe's text stream (its
    ``fileno``, ``buffer`` and the rest), except that a write from a pump thread itself (a
    finaliser the collector runs there, which prints) is logged from another thread: into
    the pipe it would wait for the very thread that drains it, for ever once the pipe is
    full, or for the stream's lock that a blocked writer holds."""

    def __init__(
        self, pipe: Any, pumps: list[threading.Thread], stream: str, context: dict[str, Any]
    ) -> None:
        self._pipe = pipe
        self._pumps = pumps
        self._stream = stream
        self._context = context

    def write(self, text: str) -> int:
        if threading.current_thread() in self._pumps:
            if text.strip():  # print() writes its newline apart
                _log_later(
                    "info",
                    "process.output",
                    stream=self._stream,
                    line=text.rstrip("\n"),
                    **self._context,
                )
            return len(text)
        written = int(self._pipe.write(text))
        self._pipe.flush()  # at once, not at an exit that a killed worker never runs
        return written

    @property
    def buffer(self) -> Any:
        return _FlushedBuffer(self._pipe.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class _FlushedBuffer:
    """``sys.stdout.buffer`` under ``capture_output``: each write flushed at once."""

    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer

    def write(self, data: Any) -> int:
        written = int(self._buffer.write(data))
        self._buffer.flush()
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)


#: Read but not yet logged, per stream, at most this much; past it what is read is
#: dropped (and counted) rather than held: a plugin printing faster than lines are logged.
MAX_OUTPUT_BACKLOG_BYTES = 16 * 1024 * 1024


def _pump(fd: int, stream: str, context: dict[str, Any], pumps: list[threading.Thread]) -> None:
    """Read ``fd`` until it closes and hand the chunks to a thread that logs them. Reading
    takes no lock a writer might hold: a thread that prints while it holds the log
    output's lock (a finaliser run mid-line) waits only for this read, never for the
    logging that waits for that lock."""
    chunks: queue.SimpleQueue[bytes | int | None] = queue.SimpleQueue()
    backlog = [0]  # bytes queued; an approximate count is enough for a cap
    _daemon(_emit_lines, (chunks, backlog, stream, context), f"output-{stream}-log", pumps)
    dropped = 0
    while chunk := os.read(fd, 65536):
        if backlog[0] > MAX_OUTPUT_BACKLOG_BYTES:
            dropped += len(chunk)
            continue
        if dropped:
            chunks.put(dropped)
            dropped = 0
        backlog[0] += len(chunk)
        chunks.put(chunk)
    os.close(fd)
    if dropped:
        chunks.put(dropped)
    chunks.put(None)


def _emit_lines(
    chunks: queue.SimpleQueue[bytes | int | None],
    backlog: list[int],
    stream: str,
    context: dict[str, Any],
) -> None:
    """Log the lines of ``chunks`` (see ``capture_output``) until ``None``."""
    log = structlog.get_logger("lacuna_webhooks.output")

    def emit(line: bytes, **extra: Any) -> None:
        if _pumps_closing.is_set():
            return
        text = line.decode("utf-8", "backslashreplace").rstrip("\r")
        if extra:
            text = mask_cut_secret(redact_text(text))
        log.info("process.output", stream=stream, line=text, **extra, **context)

    pending = b""
    dropping = 0  # bytes of a truncated line dropped so far, until its newline
    while True:
        try:
            chunk = chunks.get(timeout=OUTPUT_IDLE_SECONDS)
        except queue.Empty:
            chunk = b""  # idle: the line without its newline goes out as it is
        if isinstance(chunk, int):
            log.info("process.output_dropped", stream=stream, bytes=chunk, **context)
            continue
        if not chunk:
            if pending:
                emit(pending)
                pending = b""
            if chunk is None:
                return
            continue
        backlog[0] -= len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if dropping and lines:
            dropping += len(lines.pop(0)) + 1
            log.info("process.output_dropped", stream=stream, bytes=dropping, **context)
            dropping = 0
        if dropping:
            dropping += len(pending)
            pending = b""
        for line in lines:
            if len(line) > MAX_OUTPUT_LINE_BYTES:
                emit(line[:MAX_OUTPUT_LINE_BYTES], truncated=True)
            else:
                emit(line)
        if len(pending) > MAX_OUTPUT_LINE_BYTES:
            emit(pending[:MAX_OUTPUT_LINE_BYTES], truncated=True)
            dropping = len(pending) - MAX_OUTPUT_LINE_BYTES
            pending = b""


#: What ``configure`` was last given (the format resolved), for child processes to use.
_configured: tuple[str, str] | None = None


def configured() -> tuple[str, str] | None:
    """(log format, level) of this process's last ``configure``, or ``None`` if it has not
    run: a child process (the SQLite writer) configures its own logging the same way."""
    return _configured


def resolved_format(log_format: str) -> str:
    """``"console"`` or ``"json"``: what ``configure(log_format=...)`` renders in this
    process, ``"auto"`` being the console format when standard error is a terminal. What a
    child process is given: its standard error is a pipe to this one (``child.OutputRelay``),
    where ``"auto"`` would always be JSON."""
    if log_format == "console" or (
        log_format == "auto" and sys.stderr is not None and sys.stderr.isatty()
    ):
        return "console"
    return "json"


def configure(
    *, log_format: str = "auto", level: str = "info", secrets: Iterable[str] = ()
) -> None:
    """Configure structlog (and route stdlib logging, e.g. uvicorn's, through the same format).

    ``secrets`` (usually ``redact.secret_values(environ)``) are masked in every line.
    """
    global _json_chain, _configured
    remember_secrets(secrets)
    _json_chain = None
    use_console = resolved_format(log_format) == "console"
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
            logger_factory=structlog.PrintLoggerFactory(file=_stderr_text()),
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
    handler = logging.StreamHandler(_stderr_text())
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


#: Lines waiting to be logged by a thread of their own (``_log_later``):
#: (logger method name, event, fields); an Event marks a point ``logs_settled`` waits for.
_later: queue.SimpleQueue[tuple[str, str, dict[str, Any]] | threading.Event | None] = (
    queue.SimpleQueue()
)
_later_logger: threading.Thread | None = None
_later_start = threading.Lock()


def _log_unraisable(args: Any) -> None:
    """``sys.unraisablehook``: queue the line for a thread of its own. The collector runs
    finalisers wherever it runs, also in a thread that is writing a log line and holds the
    output's lock: logging from here then waited for that lock for ever (a worker hung by
    a plugin finaliser that failed while a line was written)."""
    exc = args.exc_value if args.exc_value is not None else _bare(args.exc_type)
    _log_later(
        "error",
        "unraisable_exception",
        message=args.err_msg or "Exception ignored",
        object=_safe_repr(args.object),
        exc_info=(args.exc_type, exc, args.exc_traceback),
    )


def _log_later(level: str, event: str, **fields: Any) -> None:
    """Log a line at ``level`` (``"info"``, ``"error"``) from the ``log-later`` thread rather
    than this one: for code that may run where this thread holds a lock of the log output
    (a finaliser)."""
    global _later_logger
    _later.put((level, event, fields))
    if _later_logger is None and _later_start.acquire(blocking=False):
        # Started once; a caller that finds the start under way leaves its line queued.
        _later_logger = _daemon(_log_queued, (), "log-later")
        atexit.register(_end_log_later, _later_logger)


def _log_queued() -> None:
    log = structlog.get_logger("lacuna_webhooks")
    while (entry := _later.get()) is not None:
        if isinstance(entry, threading.Event):
            entry.set()  # logs_settled(): all before it is logged
            continue
        level, event, fields = entry
        getattr(log, level)(event, **fields)


def logs_settled(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until every line queued by ``_log_later`` so far is
    logged (for tests and orderly stops); ``True`` when it is (or none is queued)."""
    if _later_logger is None:
        return True
    reached = threading.Event()
    _later.put(reached)
    return reached.wait(timeout)


def _end_log_later(thread: threading.Thread) -> None:
    # What is queued is logged, then the thread ends: a daemon thread still writing while
    # the interpreter finalises its output stream aborts the process.
    _later.put(None)
    thread.join(OUTPUT_EXIT_SECONDS)


def _safe_repr(value: object) -> str | None:
    if value is None:
        return None
    try:
        return repr(value)[:200]
    except Exception:  # a repr that raises: the unraisable hook must not
        return f"<{type(value).__name__}>"


_BATCHED: dict[int, LoopBatchedFile] = {}
_SINKS: dict[tuple[int, int, int], NonBlockingSink] = {}


def stderr_sink() -> NonBlockingSink | None:
    """The ``NonBlockingSink`` of this process's current ``sys.stderr`` (one per file it is
    on), or ``None`` when that stream has no descriptor (a test's capture, a closed stream):
    every log line, and the handler workers' output that ``serve`` relays, goes through it,
    so that no reader of standard error, however slow, makes the process wait
    (``logsink``)."""
    stream = sys.stderr
    if stream is None:
        return None
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    key = (fd, info.st_dev, info.st_ino)
    sink = _SINKS.get(key)
    if sink is None:
        sink = _SINKS[key] = NonBlockingSink(fd, on_dropped=_report_dropped)
    return sink


def _report_dropped(lines: int) -> None:
    structlog.get_logger("lacuna_webhooks.logs").warning(
        "log.lines_dropped",
        lines=lines,
        reason="standard error's reader fell behind by more than the backlog bound",
    )


class _SinkText:
    """A text stream over a ``NonBlockingSink`` for the stdlib handler and the console
    renderer: what one thread writes is passed on whole at its ``flush`` (``print`` and
    ``StreamHandler`` write a line and its newline apart, then flush)."""

    def __init__(self, sink: NonBlockingSink, isatty: bool) -> None:
        self._sink = sink
        self._isatty = isatty
        self._local = threading.local()

    def write(self, text: str) -> int:
        parts: list[str] | None = getattr(self._local, "parts", None)
        if parts is None:
            parts = self._local.parts = []
        parts.append(text)
        return len(text)

    def flush(self) -> None:
        parts: list[str] | None = getattr(self._local, "parts", None)
        if parts:
            data = "".join(parts).encode("utf-8", "backslashreplace")
            parts.clear()
            self._sink.write(data)

    def isatty(self) -> bool:
        return self._isatty


def _stderr_text() -> Any:
    """``sys.stderr``, or the same through its ``NonBlockingSink`` when it has one."""
    sink = stderr_sink()
    if sink is None:
        return sys.stderr
    return _SinkText(sink, isatty=bool(sys.stderr.isatty()))


def _batched_stderr() -> LoopBatchedFile:
    """One ``LoopBatchedFile`` per stderr stream (``configure`` may run more than once),
    writing through the stream's ``NonBlockingSink`` when it has one."""
    raw = sys.stderr.buffer
    target: Any = stderr_sink() or raw
    batched = _BATCHED.get(id(raw))
    if batched is None or batched._raw is not target:
        batched = _BATCHED[id(raw)] = LoopBatchedFile(target)
    return batched
