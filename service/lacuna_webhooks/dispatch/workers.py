"""Handler worker processes: every handler instance runs its attempts in a child of its own.

``WorkerPool`` is the ``AttemptRunner`` that ``serve`` and ``worker`` use. It
starts one worker process per handler instance (``worker_child.py``), which
builds that handler from the same settings and plugins as the parent and runs
its attempts concurrently on its own event loop. The dispatcher (claims and
outcomes) stays in the parent, beside the store: on SQLite the database keeps
its one writer.

- Wire: a private socket pair. Parent to child: frames of a 4-byte big-endian
  length and a pickle (``run``, ``cancel``, ``ping``, ``stop``); child to parent:
  the same framing around JSON (``ready``, ``failed``, ``done`` with an
  ``Outcome``, ``cancelled``, ``stuck``, ``pong``), so nothing a plugin's process
  sends is unpickled here. The handler runs in that process and can write to the
  socket too: an answer is at most ``MAX_ANSWER_BYTES``, and is checked again on
  arrival (``Outcome.from_wire``) as if the handler had written it.
- Stops: an attempt the dispatcher gives up at a stop is cancelled in the child,
  and its answer awaited up to ``STOP_GRACE_SECONDS``. A handler that finished
  anyway (it blocked, and the cancellation reached it too late) has its outcome
  recorded; one cancelled is released; one that does not answer has its child
  killed before the claim is released, so that no handler finishes work after
  its delivery was given back (it would run a second time after the restart).
- Timeouts: the child cuts an attempt off at the handler's timeout when the
  handler yields. One that does not (``time.sleep``, a CPU loop) is still
  running ``KILL_GRACE_SECONDS`` later and its child does not answer a ping
  within ``KILL_GRACE_SECONDS`` either: the child is killed (SIGKILL) and
  replaced at once. (A child that answers is not blocked: the attempt waited
  behind one that blocked for a while, and its own timeout runs from its start.)
  The overrunning attempt is recorded ``timed_out`` (a retry on the schedule);
  the other attempts that were in flight in that child are
  *released*: given back to the store, due at once, not counted, nothing
  recorded, as they did nothing wrong.
- Crashes: a child that dies on its own (``os._exit``, a signal, a segfault,
  ``SystemExit`` from a callback) has every attempt that was in flight in it
  recorded ``lost`` (retried on the schedule and counted: which one killed it
  cannot be told, and counting is what retires a poison event). It is
  restarted after ``RESTART_DELAYS_SECONDS`` (growing with consecutive crashes;
  reset once a child finishes an attempt). While a handler has no worker the
  dispatcher claims nothing for it; intake never waits for any of this.
- The child ignores SIGINT and SIGTERM (the parent decides when it stops,
  draining first) and asks the kernel to kill it if the parent dies; it also
  exits when the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from ..child import OutputRelay, child_channels, frame, read_frame, start_child
from ..config import Settings
from ..logs import resolved_format
from ..metrics import Metrics
from ..models import Delivery
from ..plugins import HandlerSet
from .attempt import MAX_ERROR_CHARS, Ending, Outcome, storable_text, timed_out

RESTART_DELAYS_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: How long past its timeout an attempt may go unanswered before its worker is killed: the
#: child's own cut-off (at the timeout) answers well within it whenever the handler yields.
KILL_GRACE_SECONDS = 2.0
#: However its worker answers pings, an attempt is killed at the latest this long past its
#: timeout, counted from when it was sent: well inside its lease (the handler's timeout plus
#: ``dispatcher.LEASE_MARGIN``, 30 s, from the claim just before), so that no replica can
#: take the delivery over and run it again while it still runs (docs/workers.md).
OVERRUN_LIMIT_SECONDS = 20.0
#: How long ``close()`` waits for a child to end its attempts and close its handler.
STOP_GRACE_SECONDS = 5.0
#: No message comes near this (an event is at most LACUNA_MAX_BODY_BYTES, twice over when
#: parsed): a larger length prefix means the stream is corrupt.
MAX_FRAME_BYTES = 256 * 1024 * 1024
#: No answer of a worker comes near this (an outcome's error is at most 2000 characters and
#: its result at most 64 KiB of JSON): a larger length prefix is a handler writing to its
#: worker's socket. Bounded by the request's 256 MiB, one such frame was read and parsed on
#: serve's loop: serve's memory went from 58 to 670 MB (an OOM kill in a container) and
#: webhooks waited meanwhile.
MAX_ANSWER_BYTES = 1024 * 1024
#: How long a new child may take to import and build its handler before it counts as failed.
START_TIMEOUT_SECONDS = 60.0
#: After a child's exit, how long its socket may stay open (held by a process it forked)
#: before the parent stops reading it: answers sent just before the exit arrive well within.
EXIT_READ_GRACE_SECONDS = 1.0

logger = structlog.get_logger("lacuna_webhooks.workers")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build its handler exactly as the parent did.

    ``item`` is the handler's ``LACUNA_HANDLERS`` entry; ``environ`` the settings it reads
    (sent over the socket, never on a command line); ``sys_path`` the parent's import path,
    so ``package.module:attr`` plugins resolve the same way.
    """

    name: str
    item: str
    environ: Mapping[str, str] = field(repr=False)
    allow_private_urls: bool
    timeout_seconds: float
    log_format: str
    log_level: str
    sys_path: tuple[str, ...] = ()


def worker_specs(settings: Settings, handlers: HandlerSet) -> list[WorkerSpec]:
    """One spec per built handler instance, paired with its own ``LACUNA_HANDLERS`` item
    by name (``HandlerSet.items``), never by position."""
    return [
        WorkerSpec(
            name=name,
            item=handlers.items.get(name, name),
            environ=dict(settings.environ),
            allow_private_urls=settings.allow_private_urls,
            timeout_seconds=handlers.timeouts.get(name, settings.handler_timeout_seconds),
            # "auto": ours, the console format on a terminal (the worker's output is a pipe)
            log_format=resolved_format(settings.log_format),
            log_level=settings.log_level,
            sys_path=tuple(sys.path),
        )
        for name in handlers.names
    ]


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class _Attempt:
    __slots__ = ("answered", "future", "pinged", "sent_at", "timeout_seconds", "timer")

    def __init__(
        self, future: asyncio.Future[Outcome], timeout_seconds: float, sent_at: float
    ) -> None:
        self.future = future
        self.timeout_seconds = timeout_seconds
        self.sent_at = sent_at  # loop time
        self.timer: asyncio.TimerHandle | None = None
        self.pinged = False  # its worker was found responsive once at its overrun
        self.answered = False  # settled by the handler's own outcome ("done")

    def settle(self, outcome: Outcome) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.future.done():
            self.future.set_result(outcome)


class _Child:
    """One running worker process, its socket and its output."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        output: OutputRelay,
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.output = output
        self.attempts: dict[int, _Attempt] = {}
        self.overrun: set[int] = set()  # attempts it was killed for
        self.cancelled: set[int] = set()  # attempts cancelled at a stop
        self.pings: dict[int, int] = {}  # ping id -> the attempt past its timeout
        self.killed = False
        self.stopped = False  # killed at a stop: what was in flight in it is released
        self.exited = False  # the process has ended (its socket may live on in a fork)

    def send(self, message: tuple[Any, ...]) -> None:
        self.writer.write(frame(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))

    def kill(self) -> None:
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.end_group()

    def end_group(self) -> None:
        """SIGKILL what is left of the worker's process group (its own session: the group
        id is its pid): processes its handler started or forked. They outlived the worker
        when it was replaced, and ``serve`` when it stopped (a hung ``ffmpeg`` per retry).
        A process that left the group (``setsid``) is beyond reach, as with any
        supervisor but a cgroup (the systemd unit's)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def reap(self) -> int:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        code = await self.proc.wait()
        self.end_group()  # also after a clean exit: what the handler left running
        # Its last lines relayed; a process it left outside its group (setsid) holds only
        # the pipe, no longer read, never serve's own output.
        self.output.close()
        return code


class HandlerWorker:
    """The supervised worker process of one handler instance."""

    def __init__(
        self,
        spec: WorkerSpec,
        on_ready: Callable[[], None],
        metrics: Metrics | None = None,
    ) -> None:
        self.spec = spec
        self._on_ready = on_ready
        self._metrics = metrics
        self._child: _Child | None = None
        self._ids = itertools.count(1)
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._crashes = 0
        self.restarts = 0  # children started after the first, for tests and diagnostics
        self._log = logger.bind(handler=spec.name)

    @property
    def ready(self) -> bool:
        return self._child is not None and not self._child.exited and not self._stopping

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    def start(self) -> None:
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"handler-worker-{self.spec.name}"
        )

    async def run(self, delivery: Delivery, timeout_seconds: float) -> Outcome:
        child = self._child
        if child is None or child.exited or self._stopping:
            return Outcome(Ending.INTERRUPTED, "the handler's worker process is not running")
        attempt_id = next(self._ids)
        loop = asyncio.get_running_loop()
        attempt = _Attempt(loop.create_future(), timeout_seconds, loop.time())
        child.attempts[attempt_id] = attempt
        attempt.timer = loop.call_later(
            timeout_seconds + KILL_GRACE_SECONDS, self._overrun, child, attempt_id
        )
        child.send(
            (
                "run",
                attempt_id,
                delivery.event,
                timeout_seconds,
                delivery.attempts,
                delivery.results,
                delivery.trace_context,
            )
        )
        try:
            # Shielded: the future must outlive a cancellation, for _outcome_at_stop.
            return await asyncio.shield(attempt.future)
        except asyncio.CancelledError:
            outcome = await self._outcome_at_stop(child, attempt_id, attempt)
            if outcome is None:
                raise
            # The handler finished before the cancellation reached it: its outcome is
            # recorded like any (released, it ran a second time after the restart).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return outcome

    async def _outcome_at_stop(
        self, child: _Child, attempt_id: int, attempt: _Attempt
    ) -> Outcome | None:
        """The dispatcher gave the attempt up (a stop). Ask the child to cancel it and wait
        up to ``STOP_GRACE_SECONDS`` for its answer: the handler's own outcome (it finished
        first, or it blocked and the cancellation came too late) is returned, to be
        recorded. Otherwise (cancelled, or no answer: the child is killed, so the handler
        cannot finish after its claim is given back) ``None``: the claim is released."""
        if not attempt.future.done() and self._child is child and not child.exited:
            child.cancelled.add(attempt_id)
            child.send(("cancel", attempt_id))
            await asyncio.wait({attempt.future}, timeout=STOP_GRACE_SECONDS)
            if not attempt.future.done() and not child.killed:
                self._kill_at_stop(child, "an attempt did not end when cancelled at the stop")
        if attempt.answered:
            return attempt.future.result()
        if child.attempts.pop(attempt_id, None) is not None and attempt.timer is not None:
            attempt.timer.cancel()  # an answer after this is dropped: the claim goes back
        return None

    async def close(self) -> None:
        """Ask the child to stop (it cancels its attempts and closes its handler); kill it
        when it has not exited within ``STOP_GRACE_SECONDS``."""
        self._stopping = True
        child = self._child
        if child is not None:
            child.send(("stop",))
            try:
                await asyncio.wait_for(asyncio.shield(child.proc.wait()), STOP_GRACE_SECONDS)
            except TimeoutError:
                self._log.warning("handler_worker.stop_timeout", pid=child.proc.pid)
                child.kill()
        if self._supervisor is not None:
            if child is None:
                self._supervisor.cancel()  # sleeping before a restart, or starting one
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    # -- supervision -------------------------------------------------------------------------

    async def _supervise(self) -> None:
        first = True
        while not self._stopping:
            if not first:
                self.restarts += 1
            first = False
            child = await self._spawn()
            if child is None:
                await self._backoff("start_failed")
                continue
            self._child = child
            self._log.info("handler_worker.started", pid=child.proc.pid)
            self._on_ready()
            watch = asyncio.create_task(self._watch_exit(child))
            try:
                await self._read(child)
            finally:
                watch.cancel()
            killed = bool(child.overrun)
            code = await self._lost(child)
            if self._stopping:
                return
            if killed:
                self._count("timeout")
                continue  # replaced at once: it was killed on purpose, not crashing
            self._log.error(
                "handler_worker.exited",
                pid=child.proc.pid,
                exit=_exit_text(code),
            )
            await self._backoff("crash")

    async def _backoff(self, reason: str) -> None:
        self._count(reason)
        delay = RESTART_DELAYS_SECONDS[min(self._crashes, len(RESTART_DELAYS_SECONDS) - 1)]
        self._crashes += 1
        self._log.warning("handler_worker.restarting", reason=reason, restart_in_seconds=delay)
        await asyncio.sleep(delay)

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.worker_restarts.labels(self.spec.name, reason).inc()

    async def _spawn(self) -> _Child | None:
        try:
            parent, theirs, output = child_channels()
        except OSError as exc:
            # Out of descriptors (EMFILE), say: a start that failed, tried again after the
            # backoff. Raised, it ended the supervisor: the handler had no worker for good.
            self._log.error("handler_worker.start_failed", error=str(exc))
            return None
        try:
            proc = await start_child("lacuna_webhooks.dispatch.worker_child", theirs, output)
        except OSError as exc:
            parent.close()
            output.close()
            self._log.error("handler_worker.start_failed", error=str(exc))
            return None
        output.start_on_loop()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        child = _Child(proc, reader, writer, output)
        try:
            child.send(("hello", self.spec))
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                reply = orjson.loads(await read_frame(reader, MAX_ANSWER_BYTES))
            if reply[0] == "ready":
                return child
            self._log.error(
                "handler_worker.start_failed", error=storable_text(str(reply[1]))[:MAX_ERROR_CHARS]
            )
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            TimeoutError,
            ValueError,  # a corrupt frame, or JSON that is not (orjson's error is one)
            IndexError,
        ):
            self._log.error("handler_worker.start_failed", error="no answer from the new worker")
        except BaseException:
            child.kill()  # cancelled while starting (a stop): leave no child behind
            await child.reap()
            raise
        child.kill()
        await child.reap()
        return None

    async def _watch_exit(self, child: _Child) -> None:
        """End ``_read`` when the process has exited, even if its socket stays open: a
        process the handler forked holds a copy, and the death would go unseen (attempts
        sent into a dead socket, nothing delivered, a stop held up) until that one exits."""
        await child.proc.wait()
        child.exited = True  # no new attempt goes into a dead process meanwhile
        # Answers written just before the exit are still arriving: read them first.
        await asyncio.sleep(EXIT_READ_GRACE_SECONDS)
        transport = child.writer.transport
        if not transport.is_closing():
            transport.abort()

    async def _read(self, child: _Child) -> None:
        """Settle attempts from the child's answers until its socket closes."""
        try:
            while True:
                reply = orjson.loads(await read_frame(child.reader, MAX_ANSWER_BYTES))
                if reply[0] == "pong":
                    self._answered(child, int(reply[1]))
                    continue
                if reply[0] == "stuck":
                    # A plain-def handle() still running in its thread past the timeout.
                    if int(reply[1]) in child.attempts and not child.killed:
                        if int(reply[1]) in child.cancelled:
                            self._kill_at_stop(
                                child, "a plain-def handle() still ran when cancelled at the stop"
                            )
                        else:
                            self._kill_for(child, int(reply[1]))
                    continue
                if reply[0] == "cancelled":
                    # Cancelled at a stop before it finished: nothing to record.
                    attempt = child.attempts.pop(int(reply[1]), None)
                    if attempt is not None:
                        attempt.settle(Outcome(Ending.INTERRUPTED, "cancelled at the stop"))
                    continue
                if reply[0] != "done":
                    raise ValueError(f"unexpected message {reply[0]!r}")
                attempt_id = int(reply[1])
                try:
                    outcome = Outcome.from_wire(reply[2])
                except (ValueError, KeyError, TypeError, IndexError) as exc:
                    # Still an outcome for the attempt: popped and left unsettled, its
                    # delivery stayed running and its slot taken until a restart.
                    attempt = child.attempts.pop(attempt_id, None)
                    if attempt is not None:
                        attempt.settle(
                            Outcome(
                                Ending.FAILED,
                                "WorkerProtocolError: the handler's worker answered an "
                                f"outcome that cannot be read ({type(exc).__name__})",
                            )
                        )
                    raise
                attempt = child.attempts.pop(attempt_id, None)
                if attempt is not None:
                    attempt.answered = not attempt.future.done()
                    attempt.settle(outcome)
                    self._crashes = 0  # a child that finishes attempts is a working one
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the child exited, or was killed
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            # An answer that makes no sense: treat the child as lost.
            self._log.error("handler_worker.protocol_error", error=repr(exc)[:200])
            child.kill()

    def _overrun(self, child: _Child, attempt_id: int) -> None:
        """An attempt is still unanswered ``KILL_GRACE_SECONDS`` past its timeout, counted
        from when it was sent. Either a handler blocks the worker's loop, or the attempt
        waited behind one that blocked for a while and then returned, and has been running
        for less than its own timeout (which the worker enforces from its start). Ask the
        worker's loop (a ping): no answer within ``KILL_GRACE_SECONDS`` is a blocked loop.
        An answer gives the attempt one more timeout; past that it is killed all the same
        (a handler that ignores its cancellation)."""
        attempt = child.attempts.get(attempt_id)
        if attempt is None or child.killed:
            return  # answered meanwhile, or the worker is already on its way out
        if attempt.pinged:
            self._kill_for(child, attempt_id)
            return
        ping = next(self._ids)
        child.pings[ping] = attempt_id
        child.send(("ping", ping))
        loop = asyncio.get_running_loop()
        attempt.timer = loop.call_later(KILL_GRACE_SECONDS, self._unanswered, child, ping)

    def _answered(self, child: _Child, ping: int) -> None:
        """The worker's loop answered: the attempt runs, cooperatively; its own timeout ends
        it. Checked again one timeout later, and no later than ``OVERRUN_LIMIT_SECONDS``
        past its timeout: given a whole second timeout, an attempt that had waited behind a
        blocking one (or a handler that ignores its cancellation) outlived its lease, and
        another replica ran the delivery again beside it."""
        attempt_id = child.pings.pop(ping, None)
        attempt = None if attempt_id is None else child.attempts.get(attempt_id)
        if attempt_id is None or attempt is None:
            return
        if attempt.timer is not None:
            attempt.timer.cancel()
        attempt.pinged = True
        loop = asyncio.get_running_loop()
        latest = attempt.sent_at + attempt.timeout_seconds + OVERRUN_LIMIT_SECONDS
        delay = min(attempt.timeout_seconds + KILL_GRACE_SECONDS, latest - loop.time())
        attempt.timer = loop.call_later(max(0.0, delay), self._overrun, child, attempt_id)

    def _unanswered(self, child: _Child, ping: int) -> None:
        attempt_id = child.pings.pop(ping, None)
        if attempt_id is not None and attempt_id in child.attempts and not child.killed:
            self._kill_for(child, attempt_id)

    def _kill_at_stop(self, child: _Child, reason: str) -> None:
        """Kill the worker before the claims of its cancelled attempts go back (``_lost``
        settles what was in flight in it as interrupted: released, not counted)."""
        self._log.warning(
            "handler_worker.killed",
            pid=child.proc.pid,
            reason=reason,
            in_flight=len(child.attempts),
        )
        child.stopped = True
        child.kill()

    def _kill_for(self, child: _Child, attempt_id: int) -> None:
        """Kill the worker for ``attempt_id``'s overrun; the reader then sees its socket
        close, and only that attempt is charged (``_lost``)."""
        child.overrun.add(attempt_id)
        self._log.warning(
            "handler_worker.killed",
            pid=child.proc.pid,
            reason="an attempt outlived its timeout without yielding",
            timeout_seconds=child.attempts[attempt_id].timeout_seconds,
            in_flight=len(child.attempts),
        )
        child.kill()

    async def _lost(self, child: _Child) -> int:
        """The child is gone: settle what was in flight in it (see the module docstring)."""
        if self._child is child:
            self._child = None
        if not child.killed:
            # Its socket closed: a child on its way out (its exit code says why: it was
            # always "killed by SIGKILL" here) or one that closed the socket but lingers.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.proc.wait()), EXIT_READ_GRACE_SECONDS)
        child.kill()
        code = await child.reap()
        attempts, child.attempts = child.attempts, {}
        for attempt_id, attempt in attempts.items():
            # Only the attempts it was killed for are charged: the others were waiting behind
            # the one that blocked (or, being later, had not yet outlived their own timeout).
            if attempt_id in child.overrun:
                attempt.settle(timed_out(attempt.timeout_seconds, killed=True))
            elif child.overrun or child.stopped or self._stopping:
                why = (
                    "its worker process was replaced after another attempt's timeout"
                    if child.overrun
                    else "its worker process was lost while stopping"
                )
                attempt.settle(Outcome(Ending.INTERRUPTED, why))
            else:
                attempt.settle(
                    Outcome(
                        Ending.LOST,
                        f"WorkerLost: the handler's worker process {_exit_text(code)}"
                        " during the attempt",
                    )
                )
        return code


class WorkerPool:
    """The ``AttemptRunner`` of ``serve`` and ``worker``: a ``HandlerWorker`` per handler."""

    def __init__(self, specs: list[WorkerSpec], *, metrics: Metrics | None = None) -> None:
        self.specs = specs
        self.metrics = metrics
        self.workers: dict[str, HandlerWorker] = {}

    async def start(self, on_ready: Callable[[], None]) -> None:
        for spec in self.specs:
            worker = HandlerWorker(spec, on_ready, self.metrics)
            self.workers[spec.name] = worker
            worker.start()

    def ready(self, handler: str) -> bool:
        worker = self.workers.get(handler)
        return worker is not None and worker.ready

    async def run(self, delivery: Delivery, timeout_seconds: float) -> Outcome:
        worker = self.workers.get(delivery.handler)
        if worker is None:
            return Outcome(Ending.INTERRUPTED, "no worker process for this handler")
        return await worker.run(delivery, timeout_seconds)

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self.workers.values()))


__all__ = [
    "KILL_GRACE_SECONDS",
    "RESTART_DELAYS_SECONDS",
    "HandlerWorker",
    "WorkerPool",
    "WorkerSpec",
    "worker_specs",
]
