"""The pure attempt decision: ``classify`` (what a handler came to) and ``decide`` (what the
store records), with ``run_attempt`` at the plugin boundary. No I/O, no clock."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from lacuna_webhooks.dispatch.attempt import (
    Action,
    Decision,
    Ending,
    Outcome,
    budget_spent,
    classify,
    decide,
    run_attempt,
    stranded_thread,
    timed_out,
)
from lacuna_webhooks.errors import PauseHandler, PermanentError, RateLimited, RetryLater
from lacuna_webhooks.handlers.base import current_attempt
from lacuna_webhooks.models import AttemptOutcome, Event
from lacuna_webhooks.retry import RetryPolicy
from tests.conftest import make_event

NOW = datetime(2025, 11, 21, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, base_delay_seconds=5.0, max_delay_seconds=60.0)


class Custom(BaseException):
    """A plugin's own BaseException subclass."""


def decide_now(outcome: Outcome, attempts: int = 1) -> Decision:
    return decide(outcome, attempts=attempts, policy=POLICY, finished_at=NOW, rand=lambda: 0.5)


# -- classify ----------------------------------------------------------------------------------


def test_a_return_is_ok_and_a_returned_object_is_its_result() -> None:
    """None or a non-object return is ok without a result; a dict is kept as the result."""
    assert classify(None) == Outcome(Ending.OK)
    assert classify("done") == Outcome(Ending.OK)
    assert classify({"location": "file:///x"}) == Outcome(
        Ending.OK, result={"location": "file:///x"}
    )


def test_handler_errors_keep_their_kind() -> None:
    """PermanentError is permanent; RetryLater keeps its delay; anything else failed."""
    assert classify(PermanentError("gone")) == Outcome(Ending.PERMANENT, "PermanentError: gone")
    assert classify(RetryLater("busy", delay_seconds=7)) == Outcome(
        Ending.RETRY_LATER, "RetryLater: busy", 7
    )
    assert classify(ValueError("boom")) == Outcome(Ending.FAILED, "ValueError: boom")


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (SystemExit(0), "SystemExit: 0"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        (GeneratorExit(), "GeneratorExit"),
        (asyncio.CancelledError(), "CancelledError"),
        (Custom("mine"), "Custom: mine"),
    ],
)
def test_base_exceptions_are_failures_like_any_other(exc: BaseException, text: str) -> None:
    """Every BaseException is an ordinary failed attempt, retried on the schedule."""
    assert classify(exc) == Outcome(Ending.FAILED, text)
    assert decide_now(classify(exc)) == Decision(Action.RETRY, text, NOW + timedelta(seconds=5))


def test_classify_never_raises_whatever_the_exceptions_class_does() -> None:
    """An exception whose class's ``__name__`` (a metaclass property), whose ``__class__``,
    or whose ``__str__``'s ``str`` subclass raises, or whose name and message are 50 MB: a
    failed attempt with a bounded text. Raising there left the attempt unanswered."""
    from tests.e2e.misbehaving_plugin import ClassProp, MetaName, StrSub

    assert classify(MetaName("x")) == Outcome(Ending.FAILED, "MetaName: x")
    assert classify(ClassProp("x")) == Outcome(Ending.FAILED, "ClassProp: x")
    assert classify(StrSub()) == Outcome(Ending.FAILED, "StrSub: a str subclass")

    class Huge(type):
        @property
        def __name__(cls) -> str:  # type: ignore[override]
            return "N" * 50_000_000

    class Big(Exception, metaclass=Huge):
        pass

    outcome = classify(Big("m" * 50_000_000))
    assert outcome.ending is Ending.FAILED
    assert outcome.error is not None
    assert len(outcome.error) <= 2000
    assert outcome.error.startswith("Big: mmm")  # type.__name__, not the metaclass's


def test_a_returned_dict_subclass_is_kept_as_plain_json() -> None:
    """A result of a ``dict`` subclass whose methods raise is recorded as the plain object it
    encodes to; nothing of the plugin's class is kept."""

    class Weird(dict[str, object]):
        def __contains__(self, key: object) -> bool:
            raise RuntimeError("no")

    outcome = classify(Weird(a=1))
    assert outcome == Outcome(Ending.OK, result={"a": 1})
    assert type(outcome.result) is dict


def test_error_text_hides_url_paths() -> None:
    """A URL in an error keeps only its scheme and host (its path may be a secret)."""
    outcome = classify(ValueError("POST https://hooks.slack.com/services/T/B/SECRET failed"))
    assert outcome.error == "ValueError: POST https://hooks.slack.com/… failed"


def test_outcome_round_trips_over_the_wire() -> None:
    """What a worker process sends back (JSON) is the same outcome on arrival."""
    outcome = Outcome(Ending.RETRY_LATER, "RetryLater", 2.5, {"a": [1]})
    assert Outcome.from_wire(orjson.loads(orjson.dumps(outcome.to_wire()))) == outcome
    with pytest.raises((ValueError, KeyError, TypeError)):
        Outcome.from_wire({"ending": "exploded", "error": None})


def test_an_outcome_from_the_wire_is_checked_again() -> None:
    """A handler can write to its worker's socket: what arrives is bounded as the worker
    bounds it (a result over 64 KiB dropped, the error cut, the delay clamped)."""
    outcome = Outcome.from_wire(
        {
            "ending": "retry_later",
            "error": "e" * 100_000,
            "retry_after_seconds": -1e300,
            "result": {"x": "y" * 900_000},
        }
    )
    assert outcome == Outcome(Ending.RETRY_LATER, "e" * 2000, 0.0, None)


# -- decide ------------------------------------------------------------------------------------


def test_ok_completes() -> None:
    assert decide_now(Outcome(Ending.OK)) == Decision(Action.COMPLETE)
    assert Decision(Action.COMPLETE).outcome is AttemptOutcome.OK


def test_permanent_is_dead_whatever_the_budget() -> None:
    decision = decide_now(Outcome(Ending.PERMANENT, "PermanentError: x"), attempts=1)
    assert decision == Decision(Action.DEAD, "PermanentError: x")
    assert decision.outcome is AttemptOutcome.DEAD


def test_gone_is_dead_and_pauses_the_handler() -> None:
    """PauseHandler (an http endpoint's 410) classifies as gone: dead at once whatever the
    budget, with the pause flag set; no other ending asks for a pause."""
    outcome = classify(PauseHandler("410: the endpoint is gone"))
    assert outcome == Outcome(Ending.GONE, "PauseHandler: 410: the endpoint is gone")
    assert Outcome.from_wire(outcome.to_wire()) == outcome
    decision = decide_now(outcome, attempts=1)
    assert decision == Decision(Action.DEAD, outcome.error, pause=True)
    assert decision.outcome is AttemptOutcome.DEAD
    for ending in set(Ending) - {Ending.GONE}:
        assert decide_now(Outcome(ending, "E"), attempts=1).pause is False


@pytest.mark.parametrize("ending", [Ending.FAILED, Ending.TIMED_OUT, Ending.LOST])
def test_failures_retry_on_the_doubling_schedule_then_die(ending: Ending) -> None:
    """Attempt n retries base * 2**(n-1) s after it finished; the last attempt is dead."""
    outcome = Outcome(ending, "E")
    assert decide_now(outcome, 1).retry_at == NOW + timedelta(seconds=5)
    assert decide_now(outcome, 2).retry_at == NOW + timedelta(seconds=10)
    assert decide_now(outcome, 2).outcome is AttemptOutcome.RETRY
    assert decide_now(outcome, 3) == Decision(Action.DEAD, "E")


def test_retry_later_delay_is_used_and_capped() -> None:
    """A handler's own delay replaces the schedule, capped at the policy's maximum."""
    assert decide_now(Outcome(Ending.RETRY_LATER, "R", 30)).retry_at == NOW + timedelta(seconds=30)
    assert decide_now(Outcome(Ending.RETRY_LATER, "R", 9999)).retry_at == NOW + timedelta(
        seconds=60
    )
    assert decide_now(Outcome(Ending.RETRY_LATER, "R", 30), attempts=3).action is Action.DEAD


def test_rate_limited_is_its_own_ending_and_keeps_its_delay() -> None:
    """A ``RateLimited`` (a peer's 429) classifies as ``rate_limited`` with its delay; a plain
    ``RetryLater`` (say a 503) stays ``retry_later``."""
    limited = classify(RateLimited("HTTP 429", delay_seconds=2.0))
    assert (limited.ending, limited.retry_after_seconds) == (Ending.RATE_LIMITED, 2.0)
    assert classify(RetryLater("HTTP 503", delay_seconds=2.0)).ending is Ending.RETRY_LATER
    assert Outcome.from_wire(limited.to_wire()) == limited


def test_rate_limited_retries_refunded_whatever_the_budget_inside_the_window() -> None:
    """A young delivery's 429 on its last attempt is retried (``refund``), after the peer's
    delay held within the policy's floor and cap; a plain ``RetryLater`` there is dead."""
    created = NOW - timedelta(seconds=10)
    outcome = Outcome(Ending.RATE_LIMITED, "429", 1.0)
    decision = decide(
        outcome, attempts=3, policy=POLICY, finished_at=NOW, rand=lambda: 0.5, created_at=created
    )
    assert decision == Decision(Action.RETRY, "429", NOW + timedelta(seconds=5), refund=True)
    plain = Outcome(Ending.RETRY_LATER, "503", 1.0)
    late = decide(
        plain, attempts=3, policy=POLICY, finished_at=NOW, rand=lambda: 0.5, created_at=created
    )
    assert late.action is Action.DEAD


def test_rate_limited_spends_the_budget_past_the_window() -> None:
    """Past ``rate_limit_window_seconds`` (here the 60 s cap: the schedule spans 15 s) a 429
    counts: mid-budget it is a plain retry, on the last attempt it is dead."""
    assert POLICY.rate_limit_window_seconds() == 60.0
    created = NOW - timedelta(seconds=60)
    outcome = Outcome(Ending.RATE_LIMITED, "429", 1.0)
    mid = decide(
        outcome, attempts=1, policy=POLICY, finished_at=NOW, rand=lambda: 0.5, created_at=created
    )
    assert mid == Decision(Action.RETRY, "429", NOW + timedelta(seconds=5))
    last = decide(
        outcome, attempts=3, policy=POLICY, finished_at=NOW, rand=lambda: 0.5, created_at=created
    )
    assert last == Decision(Action.DEAD, "429")


def test_rate_limit_window_is_the_schedule_span_when_longer_than_the_cap() -> None:
    """Defaults (10 attempts, 5 s, 3600 s): the schedule spans 2555 s, so the window is the
    3600 s cap; with a 100 s cap the capped schedule (5+10+...+80, then 100 s each) wins."""
    assert RetryPolicy().rate_limit_window_seconds() == 3600.0
    capped = RetryPolicy(max_attempts=10, base_delay_seconds=5.0, max_delay_seconds=100.0)
    assert capped.rate_limit_window_seconds() == 5 + 10 + 20 + 40 + 80 + 4 * 100


def test_interrupted_is_released_and_records_nothing() -> None:
    """An attempt ended for another attempt's fault goes back uncounted, whatever the budget."""
    decision = decide_now(Outcome(Ending.INTERRUPTED, "replaced"), attempts=3)
    assert decision.action is Action.RELEASE
    assert decision.outcome is None


def test_jitter_comes_from_the_injected_random() -> None:
    low = decide(Outcome(Ending.FAILED), attempts=1, policy=POLICY, finished_at=NOW, rand=lambda: 0)
    high = decide(
        Outcome(Ending.FAILED), attempts=1, policy=POLICY, finished_at=NOW, rand=lambda: 1
    )
    assert (low.retry_at, high.retry_at) == (NOW + timedelta(seconds=4), NOW + timedelta(seconds=6))


def test_budget_spent_only_past_max_attempts() -> None:
    """A claim numbered past the budget is dead without running; up to it, the handler runs."""
    assert budget_spent(3, POLICY) is None
    spent = budget_spent(4, POLICY)
    assert spent is not None
    assert spent.action is Action.DEAD
    assert "spent" in (spent.error or "")


def test_timed_out_text_says_whether_the_worker_was_replaced() -> None:
    assert timed_out(5).error == "TimeoutError: handler exceeded 5s"
    assert "replaced" in (timed_out(0.5, killed=True).error or "")


# -- run_attempt: the plugin boundary ---------------------------------------------------------


class Raising:
    name = "raising"
    events = None

    def __init__(self, exc: BaseException | None = None, result: object = None) -> None:
        self.exc = exc
        self.result = result

    async def handle(self, event: Event) -> object:
        if self.exc is not None:
            raise self.exc
        return self.result

    async def aclose(self) -> None:
        return None


EVENT = Event.from_body(orjson.dumps(make_event("evt_attempt")))


@pytest.mark.parametrize(
    "exc", [SystemExit(0), KeyboardInterrupt(), GeneratorExit(), asyncio.CancelledError(), Custom()]
)
async def test_run_attempt_turns_every_base_exception_into_an_outcome(exc: BaseException) -> None:
    """Nothing a handler raises escapes run_attempt: it is the attempt's outcome."""
    outcome = await run_attempt(Raising(exc), EVENT, 5)  # type: ignore[arg-type]
    assert outcome.ending is Ending.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith(type(exc).__name__)


async def test_run_attempt_keeps_a_returned_result() -> None:
    outcome = await run_attempt(Raising(result={"k": 1}), EVENT, 5)  # type: ignore[arg-type]
    assert outcome == Outcome(Ending.OK, result={"k": 1})


async def test_run_attempt_cuts_off_a_handler_that_yields() -> None:
    class Hangs(Raising):
        async def handle(self, event: Event) -> object:
            await asyncio.Event().wait()
            return None

    outcome = await run_attempt(Hangs(), EVENT, 0.01)  # type: ignore[arg-type]
    assert outcome == timed_out(0.01)


class Blocking:
    """A plain-``def`` handler: it waits for ``barrier`` (every attempt at once), or for
    ``release`` when given one, and returns its attempt number, read in its thread."""

    name = "blocking"
    events = None

    def __init__(
        self, barrier: threading.Barrier | None = None, release: threading.Event | None = None
    ) -> None:
        self.barrier = barrier
        self.release = release

    def handle(self, event: Event) -> object:
        if self.release is not None:
            self.release.wait(30)
        if self.barrier is not None:
            self.barrier.wait()
        if event.id == "evt_raise":
            raise SystemExit(3)
        return {"attempt": current_attempt.get()}

    async def aclose(self) -> None:
        return None


async def test_a_plain_def_handle_runs_in_a_thread_beside_the_others() -> None:
    """Four attempts of a plain-``def`` handler that each wait for all four can only end
    if they run at once: they did not, each held the event loop until it returned. Its
    context (the attempt number) and its exceptions are the attempt's as for a coroutine."""
    handler = Blocking(barrier=threading.Barrier(4, timeout=20))
    outcomes = await asyncio.gather(
        *(run_attempt(handler, EVENT, 30, attempt=n) for n in (1, 2, 3, 4))  # type: ignore[arg-type]
    )
    assert [o.result for o in outcomes] == [{"attempt": n} for n in (1, 2, 3, 4)]
    assert not stranded_thread.get()
    raised = Event.from_body(orjson.dumps(make_event("evt_raise")))
    outcome = await run_attempt(Blocking(), raised, 5)  # type: ignore[arg-type]
    assert outcome == Outcome(Ending.FAILED, "SystemExit: 3")


class UsesAsyncio(Blocking):
    """A plain ``def`` that hands its work to asyncio, as the event id says."""

    def handle(self, event: Event) -> object:
        if event.id == "evt_executor":
            return asyncio.get_event_loop().run_in_executor(None, lambda: {"via": "executor"})
        if event.id == "evt_future":

            async def later() -> object:
                await asyncio.sleep(0)
                return {"via": "future"}

            return asyncio.ensure_future(later())
        if event.id == "evt_coroutine":
            return asyncio.sleep(0, result={"via": "coroutine"})
        raise StopIteration("x")


@pytest.mark.parametrize(
    ("event_id", "outcome"),
    [
        ("evt_executor", Outcome(Ending.OK, result={"via": "executor"})),
        ("evt_future", Outcome(Ending.OK, result={"via": "future"})),
        ("evt_coroutine", Outcome(Ending.OK, result={"via": "coroutine"})),
        ("evt_stop", Outcome(Ending.FAILED, "RuntimeError: the handler raised StopIteration: x")),
    ],
)
async def test_a_plain_def_handle_may_use_asyncio_and_raise_anything(
    event_id: str, outcome: Outcome
) -> None:
    """In its thread, a plain def that used the loop (`get_event_loop().run_in_executor`,
    `ensure_future`) failed every attempt: "There is no current event loop in thread". And
    a StopIteration, which no future can hold, hung the attempt until its timeout."""
    event = Event.from_body(orjson.dumps(make_event(event_id)))
    assert await run_attempt(UsesAsyncio(), event, 5) == outcome  # type: ignore[arg-type]


async def test_a_plain_def_handle_past_its_timeout_strands_its_worker() -> None:
    """Nothing stops a thread: an attempt whose thread outlives the timeout is a timeout
    whose worker is to be replaced (``stranded_thread``), as for a handler that blocks."""
    release = threading.Event()
    try:
        outcome = await run_attempt(Blocking(release=release), EVENT, 0.05)  # type: ignore[arg-type]
        assert outcome == timed_out(0.05, killed=True)
        assert stranded_thread.get()
    finally:
        release.set()
    outcome = await run_attempt(Blocking(), EVENT, 5)  # type: ignore[arg-type]
    assert outcome.ending is Ending.OK
    assert not stranded_thread.get()


async def test_cancelling_run_attempt_propagates() -> None:
    """A stop (the caller's task cancelled) is not an outcome: the cancellation goes through."""

    class Hangs(Raising):
        async def handle(self, event: Event) -> object:
            await asyncio.Event().wait()
            return None

    task = asyncio.create_task(run_attempt(Hangs(), EVENT, 60))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
