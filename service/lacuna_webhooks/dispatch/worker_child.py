"""The handler worker process: builds one handler and runs the attempts its parent sends.

Started by ``workers.HandlerWorker`` (see that module for the wire and the
supervision). Everything a handler raises, ``BaseException`` included, becomes
the ``Outcome`` of its attempt (``attempt.run_attempt``); only what escapes
the event loop itself (``os._exit``, a signal, ``SystemExit`` from a callback)
ends this process, and the parent records and restarts that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pickle
import socket
import sys
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from ..child import begin_child, frame, read_frame
from ..handlers.base import Handler, settle
from ..models import Event
from .attempt import (
    MAX_ERROR_CHARS,
    AttemptExecutor,
    Ending,
    Outcome,
    describe_error,
    run_attempt,
    stranded_thread,
)
from .workers import MAX_FRAME_BYTES, WorkerSpec

if TYPE_CHECKING:
    from ..tracing import Tracing

#: How long the handler's ``aclose`` may take when the worker stops.
ACLOSE_TIMEOUT_SECONDS = 5.0
#: The exit code of a worker that ended itself because its handler broke it (see ``_serve``).
WORKER_BROKEN_EXIT = 70


def _send_json(sock: socket.socket, message: list[Any]) -> None:
    sock.sendall(frame(orjson.dumps(message)))


def child_main(fd: int) -> int:
    """Serve one parent over the socket ``fd`` until it says stop or goes away."""
    sock = begin_child(fd)
    stream = sock.makefile("rb")
    head = stream.read(4)
    if len(head) < 4:
        return 0
    data = stream.read(int.from_bytes(head, "big"))
    stream.close()
    # From our own parent, over a socket pair nobody else holds: not untrusted data.
    _, spec = pickle.loads(data)  # noqa: S301
    assert isinstance(spec, WorkerSpec)
    sys.path[:] = list(spec.sys_path) or sys.path
    built = _build(sock, spec)
    if built is None:
        return 2
    handler, tracing = built
    _send_json(sock, ["ready", os.getpid()])
    try:
        return asyncio.run(_serve(sock, handler, tracing))
    finally:
        if tracing is not None:
            tracing.shutdown()  # export the last attempts' spans before the process ends


def _build(sock: socket.socket, spec: WorkerSpec) -> tuple[Handler, Tracing | None] | None:
    from ..logs import capture_output, configure
    from ..plugins import build_handlers
    from ..redact import secret_values
    from ..tracing_config import load_tracing

    # A spawned process remembers no secrets of its parent's: mask the same values here.
    # What the plugin prints is logged, redacted, as everything else the worker says.
    capture_output(
        lambda: configure(
            log_format=spec.log_format,
            level=spec.log_level,
            secrets=secret_values(spec.environ),
        ),
        handler=spec.name,
    )
    try:
        built = build_handlers(
            [spec.item],
            spec.environ,
            allow_private_urls=spec.allow_private_urls,
            timeout_seconds=spec.timeout_seconds,
            check_order=False,  # the parent checked LACUNA_<NAME>_AFTER against every item
        )
        handler = built.handlers.get(spec.name)
        if handler is None:
            raise LookupError(f"{spec.item!r} built no handler named {spec.name!r}")
        # The same OTEL_* decision as the parent's (which checked it at start); the SDK reads
        # the rest of OTEL_* from this process's environment, inherited from the parent.
        tracing = load_tracing(spec.environ)
    except BaseException as exc:
        # A plugin may raise anything at import or build time; the parent logs it and retries.
        _send_json(sock, ["failed", describe_error(exc)])
        return None
    return handler, tracing


def _forget(running: dict[int, asyncio.Task[None]], attempt_id: int, _: object) -> None:
    running.pop(attempt_id, None)


async def _serve(sock: socket.socket, handler: Handler, tracing: Tracing | None = None) -> int:
    # Jobs an attempt hands to threads (asyncio.to_thread) are known by attempt: one still
    # running past its attempt's timeout has this worker replaced (attempt.AttemptExecutor).
    asyncio.get_running_loop().set_default_executor(AttemptExecutor())
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    log = structlog.get_logger("lacuna_webhooks.worker").bind(handler=handler.name)
    running: dict[int, asyncio.Task[None]] = {}
    broken: list[str] = []  # set by an attempt that this process could not run
    main = asyncio.current_task()
    assert main is not None

    async def attempt(
        attempt_id: int,
        event: Event,
        timeout_seconds: float,
        number: int,
        results: dict[str, Any] | None,
        trace_context: str | None,
    ) -> None:
        try:
            if tracing is None:
                outcome = await run_attempt(
                    handler, event, timeout_seconds, attempt=number, results=results
                )
            else:
                outcome = await tracing.run_attempt(
                    handler,
                    event,
                    timeout_seconds,
                    attempt=number,
                    results=results,
                    trace_context=trace_context,
                )
        except asyncio.CancelledError:
            # Cancelled at a stop (the parent's "cancel" or "stop"). A plain-def handle()
            # still runs in its thread and may yet finish: the parent must kill this
            # worker before it gives the claim back ("stuck"); else nothing was done.
            kind = "stuck" if stranded_thread.get() else "cancelled"
            writer.write(frame(orjson.dumps([kind, attempt_id])))
            raise
        except BaseException as exc:
            # run_attempt answers for whatever the handler does: this is this process's own
            # machinery, broken by the handler (it replaced asyncio.timeout, say). Unanswered,
            # the attempt was recorded as a timeout that "did not yield" 20 s later, and every
            # later one in this worker the same. Answer it, and end this worker: its parent
            # starts a fresh one (the attempts still in flight are cancelled and released).
            error = describe_error(exc)
            log.error("handler_worker.broken", event_id=event.id, error=error)
            broken.append(error)
            outcome = Outcome(
                Ending.FAILED,
                f"WorkerError: the handler's worker process could not run the attempt ({error})"[
                    :MAX_ERROR_CHARS
                ],
            )
            writer.write(frame(orjson.dumps(["done", attempt_id, outcome.to_wire()])))
            main.cancel()
            return
        if stranded_thread.get():
            # Its plain-def handle() still runs in a thread past the timeout: the parent
            # replaces this worker and charges the attempt with the timeout.
            writer.write(frame(orjson.dumps(["stuck", attempt_id])))
            return
        try:
            payload = orjson.dumps(["done", attempt_id, outcome.to_wire()])
        except TypeError:  # run_attempt checked the result: a last guard
            # Without the result, the outcome is text and a float (classify bounds the
            # delay: requested_delay), which always encode.
            log.warning("handler.result_not_stored", event_id=event.id, reason="not JSON")
            bare = Outcome(outcome.ending, outcome.error, outcome.retry_after_seconds)
            payload = orjson.dumps(["done", attempt_id, bare.to_wire()])
        writer.write(frame(payload))

    try:
        while True:
            try:
                # Our parent's frames (see child_main): not untrusted data.
                request = pickle.loads(await read_frame(reader, MAX_FRAME_BYTES))  # noqa: S301
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the parent is gone: nobody is left to answer
            except asyncio.CancelledError:
                if not broken:
                    raise
                break  # an attempt found this process broken (above): end it
            kind = request[0]
            if kind == "run":
                _, attempt_id, event, timeout_seconds, number, results, trace_context = request
                task = asyncio.create_task(
                    attempt(attempt_id, event, timeout_seconds, number, results, trace_context)
                )
                running[attempt_id] = task
                task.add_done_callback(functools.partial(_forget, running, attempt_id))
            elif kind == "ping":  # is this loop responsive? (workers.py, _overrun)
                writer.write(frame(orjson.dumps(["pong", request[1]])))
            elif kind == "cancel":
                task_ = running.get(request[1])
                if task_ is not None:
                    task_.cancel()
            elif kind == "stop":
                break
    finally:
        for task in list(running.values()):
            task.cancel()
        if running:
            await asyncio.wait(list(running.values()), timeout=ACLOSE_TIMEOUT_SECONDS)
        try:
            async with asyncio.timeout(ACLOSE_TIMEOUT_SECONDS):
                await settle(handler.aclose())
        except BaseException as exc:  # a plugin's aclose may raise anything; we exit anyway
            log.warning("handler.aclose_failed", error=describe_error(exc))
        writer.close()
        with contextlib.suppress(Exception):  # the last answers reach the parent first
            async with asyncio.timeout(ACLOSE_TIMEOUT_SECONDS):
                await writer.wait_closed()
    return WORKER_BROKEN_EXIT if broken else 0


__all__ = ["child_main"]
