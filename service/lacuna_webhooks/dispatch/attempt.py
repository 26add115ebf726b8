"""One attempt: what ``handle()`` came to, and what the store records for it. Pure: no I/O.

Two steps, each a pure function with its own tests (``tests/unit/test_attempt.py``):

- ``classify(exception_or_result)`` -> ``Outcome``: what the handler did.
  ``run_attempt`` calls it wherever the handler runs (a worker process, or the
  caller's loop in tests), and the ``Outcome`` is what travels back.
- ``decide(outcome, attempts=, policy=, finished_at=, rand=)`` -> ``Decision``:
  complete, retry at a time, dead, or release (give the claim back uncounted).

=====================  ===========================================  ==================
ending                 from                                         decision
=====================  ===========================================  ==================
``ok``                 ``handle()`` returned                        complete
``permanent``          ``PermanentError``                           dead at once
``gone``               ``PauseHandler`` (the ``http`` handler's     dead at once, and
                       HTTP 410)                                    the handler paused
``retry_later``        ``RetryLater(delay)``                        retry after
                                                                    ``delay`` (capped)
``rate_limited``       ``RateLimited(delay)`` (a peer's 429)        retry after
                                                                    ``delay``, budget
                                                                    not spent (refund)
                                                                    inside the window
``failed``             any other exception, ``BaseException``       retry on the
                       included (``SystemExit``, ``KeyboardInter-   schedule
                       rupt``, ``GeneratorExit``, ``CancelledError``
                       the handler raised itself)
``timed_out``          the handler outlived its timeout (cut off,   retry on the
                       or its worker process killed)                schedule
``lost``               the worker process running it died           retry on the
                       (``os._exit``, a signal, a segfault)         schedule
``interrupted``        ended for no fault of its own (another       release
                       attempt's timeout replaced its worker)
=====================  ===========================================  ==================

Every retry becomes ``dead`` once the attempt budget is spent. A ``rate_limited`` retry does not
spend it while the delivery is younger than ``RetryPolicy.rate_limit_window_seconds()`` (its
attempt is recorded, then refunded: ``Store.retry(refund=True)``); past that window a 429
counts like any failure, so a peer that answers 429 forever still ends the delivery.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import enum
import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import structlog

from ..errors import (
    MAX_RETRY_DELAY_SECONDS,
    PauseHandler,
    PermanentError,
    RateLimited,
    RetryLater,
)
from ..handlers.base import (
    MAX_RESULT_BYTES,
    Handler,
    current_attempt,
    current_results,
    settle,
)
from ..models import AttemptOutcome, Event, json_strings
from ..redact import exception_text, redact_text, value_text
from ..retry import RetryPolicy

MAX_ERROR_CHARS = 2000

logger = structlog.get_logger("lacuna_webhooks.attempt")


def describe_error(exc: BaseException) -> str:
    """``"ValueError: boom"``, with any URL cut to its host (a webhook URL's path is a secret)
    and any known secret value masked (``redact.redact_text``); text every store and the
    workers' JSON wire carry (``storable_text``). Never raises, whatever the exception's
    class does (``redact.exception_text``): the attempt must still end with an outcome."""
    text = exception_text(exc, MAX_ERROR_CHARS * 2)
    return storable_text(redact_text(text))[:MAX_ERROR_CHARS]


def storable_text(text: str) -> str:
    """``text`` with what no store or UTF-8 encoder takes written as escapes: a lone
    surrogate (Python's decoding of a non-UTF-8 file name, ``caf\\udce9``) and NUL
    (``\\x00``: PostgreSQL's text refuses it). Either failed the attempt's outcome: orjson
    refused it on the worker's wire, PostgreSQL refused to record it, and the handler ran
    again and again."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def result_problem(result: dict[str, Any]) -> str | None:
    """Why ``result`` cannot be recorded, or ``None``: not JSON, over ``MAX_RESULT_BYTES``,
    or holding text no store takes (a NUL, a lone surrogate)."""
    problem, _ = _plain_result(result)
    return problem


def _plain_result(result: object) -> tuple[str | None, dict[str, Any] | None]:
    """(why ``result`` cannot be recorded, or ``None``; the result as plain JSON values:
    ``dict``, ``list``, ``str``..., whatever subclasses the handler returned, so that no
    method of a plugin's class runs past this point)."""
    try:
        raw = orjson.dumps(result)  # refuses lone surrogates too
    except TypeError:
        return "it does not encode as JSON", None
    if len(raw) > MAX_RESULT_BYTES:
        return f"its JSON is {len(raw)} bytes (at most {MAX_RESULT_BYTES})", None
    plain = orjson.loads(raw)
    if not isinstance(plain, dict):
        return "it is not a JSON object", None
    if any("\x00" in text for text in json_strings(plain)):
        return "it holds a NUL character, which PostgreSQL cannot store", None
    return None, plain


class Ending(enum.StrEnum):
    """How one run of ``handle()`` ended (see the module docstring's table)."""

    OK = "ok"
    PERMANENT = "permanent"
    GONE = "gone"
    RETRY_LATER = "retry_later"
    RATE_LIMITED = "rate_limited"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. ``result`` is the JSON object ``handle()`` returned, if any;
    ``retry_after_seconds`` is a ``RetryLater``'s own delay."""

    ending: Ending
    error: str | None = None
    retry_after_seconds: float | None = None
    result: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able mapping (what a worker process sends back)."""
        return {
            "ending": self.ending.value,
            "error": self.error,
            "retry_after_seconds": self.retry_after_seconds,
            "result": self.result,
        }

    @classmethod
    def from_wire(cls, value: Mapping[str, Any]) -> Outcome:
        """The inverse of ``to_wire``; raises ``ValueError``/``KeyError``/``TypeError`` on junk."""
        error = value["error"]
        delay = value["retry_after_seconds"]
        result = value["result"]
        if error is not None and not isinstance(error, str):
            raise TypeError("error must be a string")
        if delay is not None and not isinstance(delay, int | float):
            raise TypeError("retry_after_seconds must be a number")
        if result is not None and not isinstance(result, dict):
            raise TypeError("result must be an object")
        if error is not None:
            error = storable_text(error[:MAX_ERROR_CHARS])
        if result is not None:
            # Checked again here: a handler can write to its worker's socket, and a result
            # past MAX_RESULT_BYTES was stored (then parsed on the intake loop by dependents).
            problem, result = _plain_result(result)
            if problem is not None:
                logger.warning("handler.result_not_stored", reason=problem)
        ending = Ending(value["ending"])
        return cls(ending, error, None if delay is None else requested_delay(delay), result)


def requested_delay(value: object) -> float | None:
    """A ``RetryLater``'s ``delay_seconds`` as seconds from 0 to
    ``MAX_RETRY_DELAY_SECONDS``, or ``None`` when it is none or not a number (a string
    from a peer's header, ``nan``, a ``bool``): a plugin's mistake there must still end its
    attempt as a retry, never break the hand-over of the outcome."""
    if issubclass(type(value), bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond a double
        return MAX_RETRY_DELAY_SECONDS if value > 0 else 0.0
    if seconds != seconds:  # nan
        return None
    return min(max(seconds, 0.0), MAX_RETRY_DELAY_SECONDS)


def classify(value: BaseException | object) -> Outcome:
    """The ``Outcome`` of an attempt that raised ``value`` (an exception) or returned it.

    A returned ``dict`` is kept as the result; any other return value is ignored. Never
    raises: what it reads of ``value`` is its real type (``type()``, never ``__class__``,
    which a plugin's exception may make a property that raises) and, failing all else, the
    attempt is a failure (an exception) or done without a result (a returned value)."""
    try:
        return _classify(value)
    except BaseException:
        if isinstance(value, BaseException):  # type-based: its type is checked first
            return Outcome(Ending.FAILED, describe_error(value))
        logger.warning("handler.result_not_stored", reason="it could not be read")
        return Outcome(Ending.OK)


def _classify(value: object) -> Outcome:
    kind = type(value)
    if issubclass(kind, PauseHandler):
        return Outcome(Ending.GONE, describe_error(value))  # type: ignore[arg-type]
    if issubclass(kind, PermanentError):
        return Outcome(Ending.PERMANENT, describe_error(value))  # type: ignore[arg-type]
    if issubclass(kind, RetryLater):
        assert isinstance(value, RetryLater)
        ending = Ending.RATE_LIMITED if issubclass(kind, RateLimited) else Ending.RETRY_LATER
        error = describe_error(value)
        asked = value.delay_seconds
        delay = requested_delay(asked)
        if delay is None and asked is not None:
            shown = storable_text(redact_text(value_text(asked, 40)))
            error = f"{error} (delay_seconds {shown} ignored: not a number of seconds)"
        return Outcome(ending, error[:MAX_ERROR_CHARS], delay)
    if issubclass(kind, BaseException):
        return Outcome(Ending.FAILED, describe_error(value))  # type: ignore[arg-type]
    if not issubclass(kind, dict):
        return Outcome(Ending.OK)
    problem, plain = _plain_result(value)
    if problem is not None:
        # Still done: the handler did its work; only its result cannot be kept.
        logger.warning("handler.result_not_stored", reason=problem)
        return Outcome(Ending.OK)
    return Outcome(Ending.OK, result=plain)


#: Set by ``run_attempt`` in the calling task: the attempt timed out while its plain-``def``
#: ``handle()`` still runs in its thread. Nothing can stop a thread, and a retry beside it
#: would run the handler twice at once for one event: the worker process that holds it is
#: to be replaced (``worker_child`` tells its parent, which kills it as for a handler that
#: blocks its loop).
stranded_thread: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stranded_thread", default=False
)

#: The executor jobs an attempt started (``asyncio.to_thread``, ``loop.run_in_executor(None,
#: …)``: a blocking client such as botocore), when its loop's default executor is an
#: ``AttemptExecutor`` (a worker process's); ``None`` elsewhere.
_attempt_jobs: contextvars.ContextVar[list[concurrent.futures.Future[Any]] | None] = (
    contextvars.ContextVar("attempt_jobs", default=None)
)


class AttemptExecutor(concurrent.futures.ThreadPoolExecutor):
    """A worker process's default executor: it remembers which attempt submitted each job,
    so that an attempt cut off at its timeout while a job of its own still runs in a thread
    strands that thread as a plain-``def`` ``handle()`` does (``stranded_thread``), and its
    worker process is replaced. Cancelling ``asyncio.to_thread`` stops only the waiting: the
    thread reads on (an SQS endpoint answering a byte at a time kept a thread per timed-out
    attempt), until the pool's few threads were all held and every later attempt of the
    worker waited in its queue until its own timeout."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        jobs = _attempt_jobs.get()
        if jobs is not None:  # submitted from an attempt's task (run_attempt set the list)
            jobs[:] = [job for job in jobs if not job.done()]
            jobs.append(future)
        return future


def _jobs_left_running() -> bool:
    """Whether a job this attempt submitted to an ``AttemptExecutor`` still runs; those that
    had not started yet are cancelled (they never will)."""
    jobs = _attempt_jobs.get() or []
    for job in jobs:
        job.cancel()  # only a job that has not started is cancelled
    return any(not job.done() for job in jobs)


def _in_a_thread(
    call: Callable[[Event], object], event: Event
) -> tuple[asyncio.Future[object], threading.Thread]:
    """Start ``call(event)`` in a new daemon thread, in a copy of this context (the attempt
    number, the prerequisites' results); its result or exception settles the future. A
    thread per attempt, not a pool's: a pool smaller than the handler's concurrency would
    leave attempts waiting there past their timeout."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()
    context = contextvars.copy_context()

    def settle_from_thread(value: object, exc: BaseException | None) -> None:
        if future.done():
            return  # the attempt timed out meanwhile
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def run() -> None:
        value: object = None
        error: BaseException | None = None
        # An event loop of the thread's own, current while it runs: a plain def that uses
        # asyncio (`asyncio.get_event_loop().run_in_executor(...)`, `ensure_future(...)`)
        # gets a loop, and a future of that loop it returns is run to its end here. Any
        # other awaitable it returns (a coroutine) is awaited on the worker's loop.
        own = asyncio.new_event_loop()
        asyncio.set_event_loop(own)
        try:
            value = context.run(call, event)
            if asyncio.isfuture(value) and value.get_loop() is own:
                value = own.run_until_complete(value)
        except BaseException as exc:  # the plugin boundary, as for a coroutine
            error = exc
        finally:
            asyncio.set_event_loop(None)
            own.close()
        if isinstance(error, StopIteration):
            # A future cannot hold one (set_exception raised, the attempt hung until its
            # timeout); a coroutine's is a RuntimeError too.
            wrapped = RuntimeError(f"the handler raised StopIteration: {error}")
            wrapped.__cause__ = error
            error = wrapped
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle_from_thread, value, error)

    thread = threading.Thread(target=run, name=f"handle-{event.id[:40]}", daemon=True)
    thread.start()
    return future, thread


def timed_out(timeout_seconds: float, *, killed: bool = False) -> Outcome:
    """The outcome of an attempt cut off at ``timeout_seconds``."""
    how = "; it did not yield, so its worker process was replaced" if killed else ""
    return Outcome(Ending.TIMED_OUT, f"TimeoutError: handler exceeded {timeout_seconds:g}s{how}")


async def run_attempt(
    handler: Handler,
    event: Event,
    timeout_seconds: float,
    *,
    attempt: int | None = None,
    results: Mapping[str, Any] | None = None,
) -> Outcome:
    """Run ``handler.handle(event)`` under ``timeout_seconds``; never raises for its failure.

    ``attempt`` (the delivery's attempt number, 1 for the first) is what the handler reads
    from ``handlers.base.current_attempt`` (the ``http`` handler's ``lacuna-attempt``); it is
    set in the calling task only, which runs this one attempt. ``results`` (the
    prerequisites' results, ``LACUNA_<NAME>_AFTER``) is set the same way in
    ``handlers.base.current_results``.

    Only a cancellation of the calling task itself (a stop) propagates. A blocking handler
    cannot be cut off here: that is the worker process's supervisor's job.
    """
    current_attempt.set(attempt)
    current_results.set(results)
    stranded_thread.set(False)
    _attempt_jobs.set([])
    deadline = asyncio.timeout(timeout_seconds)
    thread: threading.Thread | None = None
    try:
        async with deadline:
            # Typed as returning None; SPEC §6 lets a handler return a JSON object.
            if inspect.iscoroutinefunction(handler.handle):
                result = await settle(handler.handle(event))
            else:
                # A plain `def handle` (requests.post, a blocking client): in a thread of its
                # own, so that it no longer holds the worker's event loop. On that loop its
                # attempts ran one after another, and those waiting past their timeout were
                # recorded as timeouts and their worker replaced.
                future, thread = _in_a_thread(handler.handle, event)
                result = await settle(await future)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            if (thread is not None and thread.is_alive()) or _jobs_left_running():
                stranded_thread.set(True)  # it may still finish: see worker_child
            raise  # we are being stopped: not an outcome of the handler's
        return classify(exc)  # the handler raised CancelledError itself
    except TimeoutError as exc:
        # Ours, or one the handler raised itself (say, its own read timeout).
        if not deadline.expired():
            return classify(exc)
        if (thread is not None and thread.is_alive()) or _jobs_left_running():
            # A thread cannot be stopped: its worker must be (see stranded_thread).
            stranded_thread.set(True)
            return timed_out(timeout_seconds, killed=True)
        return timed_out(timeout_seconds)
    except BaseException as exc:
        # The plugin boundary, the one place that catches everything: whatever a handler
        # raises (SystemExit and KeyboardInterrupt included) is an outcome of its attempt.
        return classify(exc)
    return classify(result)


class Action(enum.StrEnum):
    """What the store is told."""

    COMPLETE = "complete"
    RETRY = "retry"
    DEAD = "dead"
    RELEASE = "release"


@dataclass(frozen=True, slots=True)
class Decision:
    """``action`` with its ``error`` text and, for a retry, when it is due (``retry_at``);
    ``pause``: the handler is to be paused as well (its peer said it is gone); ``refund``: a
    retry whose attempt does not count against the budget (``Store.retry(refund=True)``)."""

    action: Action
    error: str | None = None
    retry_at: datetime | None = None
    pause: bool = False
    refund: bool = False

    @property
    def outcome(self) -> AttemptOutcome | None:
        """The attempt's recorded outcome; ``None`` for a release (nothing is recorded)."""
        return {
            Action.COMPLETE: AttemptOutcome.OK,
            Action.RETRY: AttemptOutcome.RETRY,
            Action.DEAD: AttemptOutcome.DEAD,
        }.get(self.action)


def budget_spent(attempts: int, policy: RetryPolicy) -> Decision | None:
    """``dead`` when a claim finds the budget already spent (earlier claims never recorded
    an outcome: the process running them died), else ``None``: run the handler."""
    if attempts > policy.max_attempts:
        return Decision(
            Action.DEAD, f"attempt budget of {policy.max_attempts} spent without an outcome"
        )
    return None


def decide(
    outcome: Outcome,
    *,
    attempts: int,
    policy: RetryPolicy,
    finished_at: datetime,
    rand: Callable[[], float],
    created_at: datetime | None = None,
) -> Decision:
    """What to record for attempt number ``attempts`` (1-based) that ended in ``outcome``.

    A retry is due ``policy.delay_seconds(attempts, ...)`` after ``finished_at`` (the
    handler's own ``RetryLater`` delay when it gave one, capped); ``None`` from the policy
    (budget spent) makes it ``dead``.

    A ``rate_limited`` outcome (a peer's 429) of a delivery created at ``created_at`` less than
    ``policy.rate_limit_window_seconds()`` before ``finished_at`` is a retry with
    ``refund=True``, whatever the budget; past the window, or without ``created_at``, it is
    decided like ``retry_later``.
    """
    if outcome.ending is Ending.OK:
        return Decision(Action.COMPLETE)
    if outcome.ending is Ending.INTERRUPTED:
        return Decision(Action.RELEASE, outcome.error)
    if outcome.ending is Ending.PERMANENT:
        return Decision(Action.DEAD, outcome.error)
    if outcome.ending is Ending.GONE:
        return Decision(Action.DEAD, outcome.error, pause=True)
    if outcome.ending is Ending.RATE_LIMITED and created_at is not None:
        age = (finished_at - created_at).total_seconds()
        if age < policy.rate_limit_window_seconds():
            wait = policy.wait_seconds(
                attempts, requested_seconds=outcome.retry_after_seconds, rand=rand
            )
            at = finished_at + timedelta(seconds=wait)
            return Decision(Action.RETRY, outcome.error, at, refund=True)
    delay = policy.delay_seconds(attempts, requested_seconds=outcome.retry_after_seconds, rand=rand)
    if delay is None:
        return Decision(Action.DEAD, outcome.error)
    return Decision(Action.RETRY, outcome.error, finished_at + timedelta(seconds=delay))


__all__ = [
    "Action",
    "Decision",
    "Ending",
    "Outcome",
    "budget_spent",
    "classify",
    "decide",
    "describe_error",
    "run_attempt",
    "timed_out",
]
