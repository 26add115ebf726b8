"""Build third-party handler plugins at start in a process of their own, never in ``serve``'s.

``serve`` and ``worker`` build every configured handler once at start, to check its settings
and learn its event filter, then drop it: handlers run only in their worker processes
(``dispatch.workers``). Building a plugin runs its code, its module's import and its
factory. Run in ``serve``'s process, that code could end it (``os._exit(0)`` at import: exit
code 0 and not a word, and the shipped systemd unit does not restart on 0) or leave a thread
behind that shares the GIL with intake for as long as ``serve`` runs (a thread spinning at
import made every webhook about 3.4 times slower).

So when ``LACUNA_HANDLERS`` names code that is not this package's
(``plugins.runs_foreign_code``), ``check_in_child`` makes the same ``build_handlers`` call in
a child process (``child.start_child_blocking``), and ``resolve_checked`` the CLI's lighter
``resolve_items`` (names and default filters, nothing built). The child says which item it is
about to load before each one (``["loading", ITEM]``), then answers ``["answer", VALUE]`` or
``["problems", [LINE, ...]]``, and is stopped: a plugin's threads, atexit hooks and child
processes end with it. A child that ends without an answer names the item it was loading,
in one ``ConfigError`` line, as a plugin that raises does; so does one still loading an item
after ``CHECK_TIMEOUT_SECONDS``. The child's end is its exit, not the socket's EOF: a process
the plugin forked holds the socket too. For the same reason the child's standard output and
error are a pipe read here and relayed (``child.OutputRelay``), never this process's own: a
process the plugin left in a session of its own, beyond the group kill, held them open, and
whatever read the command's output through a pipe waited for it.

The child answers in JSON frames, never pickle: the plugin's code runs in that process, and
whatever it writes to the socket must not be able to run code in ``serve``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .child import (
    begin_child,
    child_channels,
    frame,
    read_frame_blocking,
    start_child_blocking,
)
from .errors import ConfigError
from .plugins import (
    MAX_PLUGIN_PROBLEMS,
    BuildRequest,
    HandlerSet,
    _plugin_error,
    bounded_problems,
    instances_of,
    resolve_items,
    runs_foreign_code,
)

_LENGTH = struct.Struct("!I")  # a frame's length prefix (child.frame)
#: The largest frame either side reads (the request: the environment; the answer: the set).
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: How long the child may take to start, and then to load (import and build) each item: as
#: long as a handler's worker process may take to start (``dispatch.workers``'
#: ``START_TIMEOUT_SECONDS``), so a plugin slower than that, which could never run, stops
#: the start with one line, where its import or constructor blocking hung it for ever.
CHECK_TIMEOUT_SECONDS = 60.0
#: How long the child may take to end once it answered (its plugin's non-daemon threads, its
#: atexit hooks) before it is killed, with whatever it started in its process group.
EXIT_GRACE_SECONDS = 2.0


def build_checked(
    request: BuildRequest, *, log_format: str = "auto", log_level: str = "info"
) -> HandlerSet:
    """``request.build()`` here when it loads only this package's handlers, else in a child
    process (``check_in_child``, whose set holds no handler object). ``ConfigError`` as
    they raise it. ``log_format``/``log_level``: how the child logs (``LACUNA_LOG_*``)."""
    if runs_foreign_code(request.items):
        return check_in_child(request, log_format=log_format, log_level=log_level)
    return request.build()


def resolve_checked(
    items: Sequence[str], *, log_format: str = "auto", log_level: str = "info"
) -> list[tuple[str, frozenset[str] | None]]:
    """``plugins.resolve_items(items)`` (each item's instance name and its kind's own event
    filter, nothing built), in a child process when an item is a third-party plugin.
    ``ConfigError`` as it raises, or naming the item whose code ended the child."""
    if not runs_foreign_code(items):
        return resolve_items(items)
    answer = _ask(("resolve", tuple(items)), tuple(items), log_format, log_level)
    try:
        return [
            (str(name), None if types is None else frozenset(str(t) for t in types))
            for name, types in answer
        ]
    except (TypeError, ValueError) as exc:
        raise ConfigError(_unreadable(exc)) from None


def check_in_child(request: BuildRequest, *, log_format: str, log_level: str) -> HandlerSet:
    """``request.build()`` in a child process: the checked set, holding no handler object
    (``HandlerSet.without_instances``). Raises ``ConfigError`` with every problem found, or
    naming the item whose code ended the child; ``KeyboardInterrupt`` (Ctrl-C while a
    plugin's import blocks) stops the child and is raised on."""
    answer = _ask(("build", request), request.items, log_format, log_level)
    if not isinstance(answer, dict):
        raise ConfigError(_unreadable(TypeError("not an object")))
    return _handler_set(answer, request)


def _ask(task: tuple[str, Any], items: Sequence[str], log_format: str, log_level: str) -> Any:
    """Run ``task`` (loading ``items``, in order) in a new child; its answer (JSON), or
    ``ConfigError``, also for a child that takes over ``CHECK_TIMEOUT_SECONDS`` to start or
    to load one item."""
    from .logs import resolved_format

    # "auto" is the console format on a terminal: ours, not the child's pipe.
    log_format = resolved_format(log_format)
    try:
        # Its output (its log lines: what the plugin prints is logged there) is relayed.
        ours, theirs, output = child_channels()
    except OSError as exc:  # out of descriptors (EMFILE), say: nothing is left open
        raise ConfigError(_not_started(exc)) from None
    try:
        proc = start_child_blocking("lacuna_webhooks.plugin_check", theirs, output)
    except OSError as exc:
        ours.close()
        output.close()
        raise ConfigError(_not_started(exc)) from None
    output.start_thread()
    loading: str | None = None
    loaded = 0  # how many of `items` the child said it is loading, or loaded
    deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
    answered = False
    try:
        with contextlib.suppress(OSError):  # a child already gone: its EOF says so below
            ours.sendall(frame(pickle.dumps((tuple(sys.path), task, log_format, log_level))))
        with _Frames(ours, proc.pid) as frames:
            while True:
                try:
                    data = frames.next(deadline)
                    message = orjson.loads(data) if data is not None else None
                except ValueError:
                    message = ["garbled"]
                except _Overdue:
                    raise ConfigError(_overdue(loading)) from None
                if message is None:
                    raise ConfigError(_ended(loading, _wait(proc)))
                match message:
                    # Each item in turn, once (a plugin writing to the socket cannot name
                    # another, nor put the deadline off again and again).
                    case ["loading", str(item)] if loaded < len(items) and item == items[loaded]:
                        loading = item
                        loaded += 1
                        deadline = time.monotonic() + CHECK_TIMEOUT_SECONDS
                    case ["problems", list(problems)]:
                        answered = True
                        # Its plugins' lines, bounded as the child bounds them: a plugin
                        # can write this frame itself.
                        most = (len(items) + 1) * 3 * MAX_PLUGIN_PROBLEMS
                        raise ConfigError(
                            bounded_problems(problems, most) or _unreadable(ValueError())
                        )
                    case ["answer", answer]:
                        answered = True
                        return answer
                    case _:
                        raise ConfigError(
                            f"LACUNA_HANDLERS: the {loading!r} handler wrote to the socket of "
                            "the process that checks it; its answer could not be read"
                        )
    finally:
        ours.close()
        try:
            _stop(proc, EXIT_GRACE_SECONDS if answered else 0.0)
        finally:
            output.close()  # what the child wrote is relayed; a process it left gets EPIPE


def _not_started(exc: OSError) -> str:
    return f"LACUNA_HANDLERS: the process that checks the handler plugins did not start: {exc}"


class _Frames:
    """The frames the child writes to ``sock``, up to the child's end: EOF, or the child's
    exit, whichever comes first. A process the plugin forked holds a copy of the socket (a
    fork keeps every descriptor): a child that exited without answering left the parent
    waiting for an EOF that came only when that process ended, for ever for one that sleeps.
    What the child wrote before it exited is in the socket's buffer, and is read."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._ended = False
        self._exited = False
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None  # no pidfd (Linux < 5.3): EOF alone ends the frames

    def __enter__(self) -> _Frames:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)

    def next(self, deadline: float) -> bytes | None:
        """The next frame's payload; ``None`` once the child's frames ended (also within a
        frame); ``ValueError`` for a length over ``MAX_FRAME_BYTES``; ``_Overdue`` when it
        has not come by ``deadline`` (``time.monotonic``)."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(self._buffer)
                if size > MAX_FRAME_BYTES:
                    raise ValueError(f"a frame of {size} bytes (at most {MAX_FRAME_BYTES})")
                end = _LENGTH.size + size
                if len(self._buffer) >= end:
                    payload = bytes(self._buffer[_LENGTH.size : end])
                    del self._buffer[:end]
                    return payload
            if self._ended:
                return None
            self._fill(deadline)

    def _fill(self, deadline: float) -> None:
        # select's relative timeout, not a sleep: see _exited.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Overdue
        if not self._exited:
            waiting: list[Any] = [self._sock]
            if self._pidfd is not None:
                waiting.append(self._pidfd)
            readable, _, _ = select.select(waiting, [], [], remaining)
            if not readable:
                raise _Overdue
            # Exited: what it wrote is all in the buffer; read on without waiting.
            self._exited = self._pidfd in readable
        try:
            data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = b""  # the child exited and all it wrote is read
        except OSError:
            data = b""
        self._ended = not data
        self._buffer += data


class _Overdue(Exception):
    """The child did not write its next frame in time."""


def _overdue(loading: str | None) -> str:
    if loading is None:
        return (
            "LACUNA_HANDLERS: the process that checks the handler plugins did not start "
            f"within {CHECK_TIMEOUT_SECONDS:g} s"
        )
    return (
        f"LACUNA_HANDLERS: the {loading!r} handler was still being imported or built after "
        f"{CHECK_TIMEOUT_SECONDS:g} s, when its worker process would be given up too: a "
        "plugin must not block at import or in its constructor (connect lazily, in handle())"
    )


def _unreadable(exc: BaseException) -> str:
    return (
        "LACUNA_HANDLERS: the answer of the process that checks the handler plugins could "
        f"not be read ({type(exc).__name__}): a plugin wrote to its socket"
    )


def _ended(loading: str | None, returncode: int | None) -> str:
    if returncode is None:
        how = "ended its connection"
    elif returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        how = f"was killed by signal {name or -returncode}"
    else:
        how = f"exited with code {returncode}"
    if loading is None:
        return f"LACUNA_HANDLERS: the process that checks the handler plugins {how} at start"
    return (
        f"LACUNA_HANDLERS: the {loading!r} handler ended the process that checks it "
        f"({how} while it was imported or built): a plugin must not exit or kill its process"
    )


def _wait(proc: Any) -> int | None:
    """The child's exit status once it ended (``None``: still running, it is killed)."""
    exited = _exited(proc, EXIT_GRACE_SECONDS)
    _stop(proc, 0.0)
    return proc.returncode if exited else None


def _exited(proc: Any, seconds: float) -> bool:
    """Whether the child ends within ``seconds``, without reaping it: while it is a zombie
    its pid, the id of its process group, cannot be another process's (``_stop``).

    Waits on a pidfd with ``select``'s relative timeout, not with ``time.sleep``: under
    libfaketime (a replica whose clock is off, tests/e2e/test_clock_skew.py) the absolute
    sleep that ``time.sleep`` asks for failed with EINVAL and ended ``serve``'s start."""
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except OSError:
        pidfd = None  # gone already, or no pidfd (Linux < 5.3): no wait, just the check
    try:
        if pidfd is not None and seconds > 0:
            select.select([pidfd], [], [], seconds)  # readable once the process ended
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # reaped already
    except OSError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stop(proc: Any, grace: float) -> None:
    """Give the child ``grace`` seconds to end, then kill its process group (its session:
    what the plugin started too) and reap it."""
    if proc.returncode is not None:
        return  # reaped (by _wait, which stopped the group first)
    if grace:
        _exited(proc, grace)
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait()  # killed: no timeout, whose wait would sleep (see _exited)


def _handler_set(built: Mapping[str, Any], request: BuildRequest) -> HandlerSet:
    """The ``HandlerSet`` the child described (``_describe``), of which only what building
    the plugins tells is taken: each instance's name and item, and its event filter. The
    rest (timeouts, concurrency, retry policies, AFTER) is read again here from the
    environment (``plugins.instances_of``), which also checks the names against
    ``LACUNA_HANDLERS``. A plugin runs in the child and can write an answer of its own to its
    socket: it once set a timeout of 1e308 (every claim then failed, for every handler), a
    handler name holding a NUL, a handler that was never configured, a worker importing
    another ``module:attr``, or an AFTER cycle. One ``ConfigError`` line for an answer that
    does not fit."""
    try:
        names = built["names"]
        items = built["items"]
        filters = built["filters"]
        if not (
            isinstance(names, list)
            and isinstance(items, dict)
            and isinstance(filters, dict)
            and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names) == len(items)
            and all(isinstance(items.get(n), str) for n in names)
            and all(
                f is None or (isinstance(f, list) and all(isinstance(t, str) for t in f))
                for f in filters.values()
            )
        ):
            raise ValueError("not the shape of an answer")
        return instances_of(
            request,
            {n: items[n] for n in names},
            {n: None if f is None else frozenset(f) for n, f in filters.items()},
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(_unreadable(exc)) from None


def _describe(built: HandlerSet) -> dict[str, Any]:
    """What the parent takes of the checked set (``_handler_set``): names, items, filters.
    The rest it reads again from the environment, so it is not sent."""
    return {
        "names": built.names,
        "items": dict(built.items),
        "filters": {n: None if f is None else sorted(f) for n, f in built.filters.items()},
    }


def _too_many_types(answer: Any) -> str:
    """The line for an answer over ``MAX_FRAME_BYTES``: the instance with the largest filter
    (in either answer's shape, ``_describe``'s or ``resolve_items``')."""
    if isinstance(answer, dict):
        filters, labels = answer["filters"], answer["items"]
    else:
        filters, labels = dict(answer), {}
    counts = {n: len(f) for n, f in filters.items() if f is not None}
    largest = max(counts, key=counts.__getitem__, default="")
    return (
        f"LACUNA_HANDLERS: the {labels.get(largest, largest)!r} handler subscribes to "
        f"{counts.get(largest, 0)} event types, too many to check (the answer is over "
        f"{MAX_FRAME_BYTES} bytes): give it `events = None` (every type) or set "
        f"LACUNA_{largest.upper()}_EVENTS"
    )


def child_main(fd: int) -> int:
    """The child: build what the parent asks, answer, end."""
    sock = begin_child(fd)
    with sock.makefile("rb") as stream:
        data = read_frame_blocking(stream, MAX_FRAME_BYTES)
    if data is None:
        return 0
    # From our own parent, over a socket pair nobody else holds: not untrusted data.
    sys_path, (what, argument), log_format, log_level = pickle.loads(data)  # noqa: S301
    sys.path[:] = list(sys_path) or sys.path
    environ = argument.environ if isinstance(argument, BuildRequest) else os.environ

    from .logs import capture_output, configure
    from .redact import secret_values

    # What a plugin prints at import is logged, redacted, as in its worker process.
    capture_output(
        lambda: configure(log_format=log_format, level=log_level, secrets=secret_values(environ)),
        handler="check",
    )

    def send(message: list[Any] | bytes) -> None:
        # The parent stops reading at the first answer (one a plugin forged, too): a later
        # send is refused, which is no reason for a traceback in the logs.
        with contextlib.suppress(OSError):
            sock.sendall(frame(message if isinstance(message, bytes) else orjson.dumps(message)))

    current: list[str] = []  # the item being loaded

    def loading(item: str) -> None:
        current[:] = [item]
        send(["loading", item])

    try:
        if what == "build":
            answer: Any = _describe(argument.build(on_item=loading))
        else:
            answer = [
                [name, None if types is None else sorted(types)]
                for name, types in resolve_items(argument, on_item=loading)
            ]
    except ConfigError as exc:
        send(["problems", list(exc.problems)])
    except BaseException as exc:
        # The plugin's own, past its boundary: a KeyboardInterrupt it raised (SIGINT does
        # nothing here: no real Ctrl-C reaches this process) was a traceback in the logs and
        # "killed by signal SIGINT"; or one its thread sent (_thread.interrupt_main).
        item = current[0] if current else "?"
        send(
            [
                "problems",
                [f"LACUNA_HANDLERS: the {item!r} handler failed to start: {_plugin_error(exc)}"],
            ]
        )
    else:
        encoded = orjson.dumps(["answer", answer])
        if len(encoded) > MAX_FRAME_BYTES:
            # Else the parent refused the frame and blamed the plugin for writing to the
            # socket: say what is too large instead.
            send(["problems", [_too_many_types(answer)]])
        else:
            send(encoded)
    return 0
