"""The dispatcher: claims due deliveries from the store, has them run, records each outcome.

One loop (``run``) per process, beside the store it claims from (on SQLite,
``serve``'s writer process). Each handler has its own ``concurrency`` slots,
and the loop claims for a handler only as many deliveries as it has free
slots, and only while its runner is ready (its worker process is up), so a
slow or failing handler never delays another one (and the webhook route never
waits for any handler: it only stores). The loop sleeps on whichever comes
first: the store's ``wait_for_work`` (an accept in this process, a NOTIFY from
another replica, or the poll interval), a slot being freed, a worker becoming
ready, or ``stop``.

Each attempt is handed to the ``AttemptRunner`` (``runner.py``): in ``serve``
and ``worker`` a worker process per handler (``workers.py``), which ends an
attempt that overruns its timeout even when it blocks. What the attempt came
to, and what is recorded for it, are the pure ``classify`` and ``decide`` of
``attempt.py`` (its docstring has the table).

Attempts are counted by the store when a delivery is claimed, so a handler
that crashes its process is still retired after ``max_attempts`` claims: a
claim that finds the budget already spent records ``dead`` without running
the handler again. Retention pruning is a task of its own (``retention.py``).

Flow control (``flow.py``, docs/flow-control.md): a claim pass skips the handlers the
store says are paused. That set is read again at most every half poll interval (one
small query, not one per pass), so a pause made anywhere stops new attempts on every
replica within ``poll_interval_seconds``; attempts already running finish. A handler
whose attempt raised ``PauseHandler`` (a 410), or that reached its
``PAUSE_AFTER_FAILURES``, is paused in the store by the dispatcher that saw it, in the
transaction that records that attempt (``Tally``), so its retry is never due before the
pause; this dispatcher claims nothing more for it, and never starts that retry (a claim
of it already on its way is given back). For a
handler with a ``RATE_LIMIT`` the pass first takes tokens from its bucket in the store
(shared by every replica) and claims at most that many; tokens the claim did not use are
given back. With none left it looks again when the next token is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

import structlog

from ..errors import StoreUnavailable
from ..metrics import Metrics
from ..models import Attempt, AttemptOutcome, Delivery
from ..plugins import HandlerSet
from ..retry import RetryPolicy
from ..store.base import Recorded, Store, Tally
from .attempt import Action, Decision, budget_spent, decide, describe_error
from .flow import FlowControl
from .runner import AttemptRunner, InProcessRunner

LEASE_MARGIN = timedelta(seconds=30)
"""Added to a handler's timeout for its lease: the timeout fires (and a blocked worker is
killed) well before anyone else may take the delivery over, leaving time to record it."""
#: An outcome the store failed to record is tried again after this, doubling up to the max,
#: until RECORD_SAFETY_SECONDS before the claim's lease ends (Dispatcher._record).
RECORD_RETRY_FIRST_SECONDS = 0.25
RECORD_RETRY_MAX_SECONDS = 5.0
RECORD_SAFETY_SECONDS = 5.0
#: At stop, the claims of cancelled attempts are given back within this many seconds in all.
RELEASE_BUDGET_SECONDS = 3.0

DEFAULT_TIMEOUT_SECONDS = 60.0
MAX_STORE_BACKOFF_SECONDS = 5.0
#: The wall clock moving against the monotonic one by more than this between two claim
#: passes is a step (NTP's slew moves both alike; reading the two clocks costs microseconds).
CLOCK_STEP_SECONDS = 1.0
#: How often (monotonic seconds) a watching dispatcher reads the store's own clock again
#: (``Store.clock_offset``: PostgreSQL's), and at once after a step of the wall clock.
CLOCK_SYNC_SECONDS = 10.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    """Runs the configured handlers on the deliveries the store holds. See the module docstring.

    ``runner`` runs the attempts (default: ``InProcessRunner(handlers)``, on this loop: for
    tests; ``serve`` and ``worker`` pass a ``WorkerPool``). ``clock`` and ``rand`` are
    injected so tests can control time and jitter. ``flow`` holds each handler's
    flow-control settings (``flow.read_flow_control``); a handler missing from it has none.

    ``monotonic`` (``serve`` and ``worker`` pass a clock that never steps and counts the
    machine's sleep: ``CLOCK_BOOTTIME`` on Linux) turns on watching
    ``clock``, before each claim pass:

    - For steps: the wall clock's offset from the monotonic one is compared with the last
      pass's. When the wall clock stepped back, the store's schedules written before the
      step lie that much further off than meant, and ``Store.clock_stepped_back`` brings
      them forward (SQLite: one machine wrote them all); ``dispatcher.clock_stepped_back`` /
      ``dispatcher.clock_stepped_forward`` are logged.
    - Against the store's own clock (``Store.clock_offset``; PostgreSQL's, shared by every
      replica), read every ``CLOCK_SYNC_SECONDS`` and after a step: every time this
      dispatcher decides (what is due, a retry's time, an attempt's start) is ``clock()``
      plus that offset, so replicas whose clocks disagree, or a worker whose clock is behind
      the intake's, schedule and claim by one clock. ``dispatcher.clock_offset`` is logged
      when the offset moves by more than ``CLOCK_STEP_SECONDS``.

    Without it (tests that move ``clock`` by hand), nothing is watched and ``clock`` is used
    as it is.
    """

    def __init__(
        self,
        store: Store,
        handlers: HandlerSet,
        *,
        policy: RetryPolicy,
        runner: AttemptRunner | None = None,
        concurrency: int = 4,
        poll_interval_seconds: float = 1.0,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        rand: Callable[[], float] = random.random,
        flow: Mapping[str, FlowControl] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.store = store
        self.handlers = handlers
        self.policy = policy
        self.runner: AttemptRunner = runner or InProcessRunner(handlers)
        self.concurrency = concurrency
        self.poll_interval_seconds = poll_interval_seconds
        self.metrics = metrics
        self.wall_clock = clock
        self.rand = rand
        self.monotonic = monotonic
        # The wall clock minus the monotonic one at the last claim pass (None: not yet read).
        self._clock_offset: float | None = None
        # After a step forward (and until a step back): the first time of the clock ahead,
        # which every schedule written since is at or after, and none written before.
        self._written_since: datetime | None = None
        # The store's clock minus the wall clock (zero for a store without a clock of its own),
        # and when it was read (monotonic seconds; None: never).
        self.store_offset = timedelta(0)
        self._store_offset_read_at: float | None = None
        self._log = structlog.get_logger("lacuna_webhooks.dispatcher")
        self._free = {n: handlers.concurrency.get(n, concurrency) for n in handlers.names}
        self.flow = dict(flow or {})
        # The paused handlers (name -> reason) as last read from the store, and when
        # (monotonic seconds; None: never read yet).
        self._paused: dict[str, str | None] = {}
        self._paused_read_at: float | None = None
        # The deliveries whose outcome is being written with a tally that may pause their
        # handler; and how many pauses this process made (a read of the paused set that began
        # before one of them landed may not show it, and is dropped).
        self._pausing: set[int] = set()
        self._pauses_here = 0
        # A wake-up per rate-limited handler whose bucket was empty: when its next token is due.
        self._token_timers: dict[str, asyncio.TimerHandle] = {}
        self._inflight: dict[asyncio.Task[None], Delivery] = {}
        # Per running delivery id, its newest claim: a claim of a delivery already running
        # here (its lease ran out by the clock, which stepped forward) is not run twice;
        # the running attempt records under that newer lease instead.
        self._leases: dict[int, Delivery] = {}
        self._stopping = False
        # Set when a slot frees or stop() is called: either means "look again now".
        self._wake = asyncio.Event()
        # Replaced (after being set) whenever a claim pass or an attempt finishes; drain()
        # waits on it instead of sleeping.
        self._progress = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._waiting = False
        self._runner_started = False
        self._runner_closed = False

    # -- public API ------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until ``stop()``; then return. Cancelling ``run`` abandons in-flight
        attempts the same way ``stop(0)`` would."""
        if self._loop_task is not None:
            raise RuntimeError("Dispatcher.run() is already running")
        if not self._runner_started:
            self._runner_started = True
            await self.runner.start(self._wake.set)
        self._loop_task = asyncio.create_task(self._loop(), name="dispatcher-loop")
        self._loop_task.add_done_callback(self._loop_ended)
        self._log.info("dispatcher.started", handlers=self.handlers.names)
        try:
            await self._loop_task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                self._loop_task.cancel()
                await self._abandon()
                raise
            # stop() cut the loop short because a store call outlived its bound.
        finally:
            self._log.info("dispatcher.stopped")

    async def stop(self, timeout_seconds: float) -> None:
        """Stop claiming; let in-flight attempts finish for up to ``timeout_seconds``, then
        cancel the rest, close the runner (a worker process gets ``STOP_GRACE_SECONDS`` to
        exit before it is killed) and ``release`` them (due again at once, not counted)."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + max(0.0, timeout_seconds)
        if self._loop_task is not None and not self._loop_task.done():
            # The loop exits at its next wake-up; only a store call that hangs keeps it.
            done, _ = await asyncio.wait({self._loop_task}, timeout=max(0.0, timeout_seconds))
            if not done:
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task
        if self._inflight:
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.wait(set(self._inflight), timeout=remaining)
        await self._abandon()

    async def drain(self, timeout_seconds: float = 10.0) -> None:
        """Return once nothing is due (``stats().due == 0``) and nothing is in flight.

        Waits on the loop's progress rather than sleeping. Raises ``TimeoutError``
        after ``timeout_seconds`` (e.g. when ``run`` is not running, or when due
        deliveries belong to a handler this dispatcher does not have).
        """
        async with asyncio.timeout(timeout_seconds):
            while True:
                progress = self._progress  # taken first, so no progress between checks is missed
                if not self._inflight:
                    stats = await self.store.stats(now=self.clock(), after=self.handlers.after)
                    if stats.due == 0 and not self._inflight:
                        return
                await progress.wait()

    @property
    def in_flight(self) -> int:
        """How many attempts are running now."""
        return len(self._inflight)

    @property
    def idle(self) -> bool:
        """The loop is waiting for work (or a poll) and no attempt is running."""
        return self._waiting and not self._inflight

    # -- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        backoff = 0.0
        waited_out = True  # the last backoff ran its course (none yet: the first failure)
        work: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self._claim_pass()
                    if work is None or work.done():
                        if work is not None:
                            work.result()  # surfaces a StoreUnavailable from the last wait
                        work = asyncio.create_task(
                            self.store.wait_for_work(self.poll_interval_seconds)
                        )
                    backoff = 0.0
                except Exception as exc:
                    if work is not None and work.done():
                        work = None  # its failure was just surfaced; a fresh wait comes later
                    # Doubled only after a wait that ran its course: woken early (an attempt
                    # ending, a nudge), a failure tries again at the same pace. Doubled per
                    # failure, the attempts that ended in one outage took it to the maximum
                    # within 100 ms, and deliveries stood still that long after it.
                    backoff = min(
                        max(
                            backoff * 2 if waited_out else backoff, self.poll_interval_seconds, 0.05
                        ),
                        MAX_STORE_BACKOFF_SECONDS,
                    )
                    if isinstance(exc, StoreUnavailable):
                        self._log.warning(
                            "dispatcher.store_unavailable",
                            error=describe_error(exc),
                            retry_in_seconds=backoff,
                        )
                    else:
                        # A bug (a store breaking its contract, a row it cannot return): log
                        # it loudly and keep dispatching. Ending the loop here once stopped
                        # every delivery while /readyz still said ready.
                        self._log.error(
                            "dispatcher.claim_failed", retry_in_seconds=backoff, exc_info=exc
                        )
                    self._notify_progress()
                    waited_out = False
                    try:
                        async with asyncio.timeout(backoff):
                            await self._wake.wait()
                    except TimeoutError:
                        waited_out = True
                    continue
                self._notify_progress()
                if self._stopping:
                    break
                woken = asyncio.create_task(self._wake.wait())
                self._waiting = True
                try:
                    await asyncio.wait({work, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    self._waiting = False
                    woken.cancel()
        finally:
            for timer in self._token_timers.values():
                timer.cancel()
            if work is not None:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                    await work

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Only a broken store contract gets here (stores raise StoreUnavailable); say so
            # loudly, since deliveries stop until the process restarts.
            self._log.error("dispatcher.crashed", exc_info=exc)

    async def _claim_pass(self) -> None:
        """Claim for every handler with free slots and not paused; start an attempt per
        delivery."""
        await self._follow_clock()
        await self._refresh_paused()
        for name in self.handlers.names:
            free = self._free[name]
            if free <= 0 or self._stopping or name in self._paused or not self.runner.ready(name):
                continue
            rate = self.flow.get(name, FlowControl()).rate_limit
            limit = free
            if rate is not None:
                limit = await self.store.take_tokens(
                    name,
                    want=free,
                    capacity=rate.count,
                    per_second=rate.per_second,
                    now=self.clock(),
                )
                if limit == 0:
                    self._wake_for_token(name, 1.0 / rate.per_second)
                    continue
            lease = timedelta(seconds=self._timeout(name)) + LEASE_MARGIN
            claimed = await self.store.claim(
                handler=name,
                limit=limit,
                lease=lease,
                now=self.clock(),
                after=self.handlers.after.get(name, ()),
            )
            if rate is not None and len(claimed) < limit:
                await self.store.give_back_tokens(name, limit - len(claimed), capacity=rate.count)
            for delivery in claimed:
                # Stopping, or an attempt of this handler paused it while the claim was on its
                # way, or this is the retry of an attempt whose outcome (which may pause the
                # handler) is committed but not yet answered: give the claim back uncounted.
                if delivery.id in self._leases:
                    self._leases[delivery.id] = delivery  # running here already: see above
                    self._log.warning(
                        "delivery.lease_renewed",
                        delivery_id=delivery.id,
                        handler=name,
                        reason="its lease ran out while its attempt ran (a clock step?)",
                    )
                elif self._stopping or name in self._paused or delivery.id in self._pausing:
                    await self._release(delivery)
                else:
                    self._start(delivery)

    def clock(self) -> datetime:
        """Now, for every decision: the wall clock, plus the store's clock's offset from it
        when the store has a clock of its own and the dispatcher watches it (``monotonic``)."""
        return self.wall_clock() + self.store_offset

    async def _follow_clock(self) -> None:
        """Notice a step of the wall clock since the last pass, and follow the store's clock
        (``monotonic``, see the class docstring). A step back has the store bring the
        schedules written before it forward by the step: a retry due in 5 s, or an event
        accepted just before (due at once), no longer waits the step out. Read again next
        pass if the store fails."""
        if self.monotonic is None:
            return
        mono = self.monotonic()
        offset = self.wall_clock().timestamp() - mono
        last = self._clock_offset
        stepped = last is not None and abs(offset - last) > CLOCK_STEP_SECONDS
        if (
            stepped
            or self._store_offset_read_at is None
            or mono - self._store_offset_read_at >= CLOCK_SYNC_SECONDS
        ):
            store_offset = await self.store.clock_offset() or timedelta(0)
            if abs((store_offset - self.store_offset).total_seconds()) > CLOCK_STEP_SECONDS:
                self._log.info(
                    "dispatcher.clock_offset",
                    store_ahead_seconds=round(store_offset.total_seconds(), 3),
                )
            self.store_offset = store_offset
            self._store_offset_read_at = mono
        if last is not None and last - offset > CLOCK_STEP_SECONDS:
            by = timedelta(seconds=last - offset)
            # After a step forward, only what was written since is moved: what was written
            # before it is of a clock as far behind as this one is now (a step forward then
            # back moved a retry written before both an hour early).
            moved = await self.store.clock_stepped_back(
                by=by, now=self.clock(), written_since=self._written_since
            )
            self._written_since = None
            self._log.warning(
                "dispatcher.clock_stepped_back",
                seconds=round(by.total_seconds(), 3),
                deliveries_moved=moved,
            )
        elif last is not None and offset - last > CLOCK_STEP_SECONDS:
            self._log.warning("dispatcher.clock_stepped_forward", seconds=round(offset - last, 3))
            self._written_since = self.clock() - timedelta(seconds=offset - last)
        self._clock_offset = offset

    # -- flow control ----------------------------------------------------------------------

    async def _refresh_paused(self) -> None:
        """Read the paused set from the store unless it was read less than half a poll
        interval ago; log and export what changed since the last read."""
        now = time.monotonic()
        if (
            self._paused_read_at is not None
            and now - self._paused_read_at < self.poll_interval_seconds / 2
        ):
            return
        pauses = self._pauses_here
        states = await self.store.paused_handlers()
        if self._pauses_here != pauses:
            return  # it may predate a pause made here meanwhile: read again next pass
        self._paused_read_at = now
        paused = {name: state.reason for name, state in states.items()}
        for name in self.handlers.names:
            if name in paused and name not in self._paused:
                self._log.warning("handler.paused", handler=name, reason=paused[name])
            elif name in self._paused and name not in paused:
                self._log.info("handler.resumed", handler=name)
            if self.metrics is not None:
                self.metrics.handler_paused.labels(name).set(1 if name in paused else 0)
        self._paused = paused

    def _wake_for_token(self, name: str, seconds: float) -> None:
        """Look again when ``name``'s next token is due (the poll wakes the loop anyway, so
        never later than that)."""
        timer = self._token_timers.get(name)
        if (
            timer is not None
            and not timer.cancelled()
            and timer.when() > asyncio.get_running_loop().time()
        ):
            return
        delay = min(seconds, self.poll_interval_seconds)
        self._token_timers[name] = asyncio.get_running_loop().call_later(delay, self._wake.set)

    def _tally(self, name: str, decision: Decision) -> Tally | None:
        """What the attempt's outcome does to the handler's consecutive-failure count, kept
        for every handler (``GET /handlers`` shows it), written by the store in the same
        transaction as the outcome: a success resets it, a failure counts and pauses the
        handler when it reaches its ``PAUSE_AFTER_FAILURES`` (if set), a ``PauseHandler``
        pauses it. A refunded 429 is the peer pacing us, not failing: not counted either
        way."""
        if decision.pause:
            return Tally.pause(f"its endpoint is gone: {decision.error}")
        if decision.refund:
            return None
        if decision.action is Action.COMPLETE:
            return Tally.success()
        # Without a limit the failure is counted and never pauses (reason unused).
        limit = self.flow.get(name, FlowControl()).pause_after_failures
        reason = f"{limit} consecutive failed attempts; the last: {decision.error}"
        return Tally.failure(pause_after=limit, reason=reason)

    def _paused_here(self, name: str, reason: str | None, *, cause: str) -> None:
        """This process paused ``name``: stop claiming for it now, say so once."""
        self._paused[name] = reason
        self._pauses_here += 1
        self._log.warning("handler.paused", handler=name, reason=reason, cause=cause)
        if self.metrics is not None:
            self.metrics.handler_paused.labels(name).set(1)
            self.metrics.handler_pauses.labels(name, cause).inc()

    # -- one attempt -----------------------------------------------------------------------

    def _start(self, delivery: Delivery) -> None:
        self._free[delivery.handler] -= 1
        self._leases[delivery.id] = delivery
        task = asyncio.create_task(self._deliver(delivery), name=f"delivery-{delivery.id}")
        self._inflight[task] = delivery
        task.add_done_callback(self._finished)

    def _lease(self, delivery: Delivery) -> Delivery:
        """``delivery`` under its newest claim here (``_leases``), for recording or release."""
        newest = self._leases.get(delivery.id)
        if newest is None or newest.lease_token == delivery.lease_token:
            return delivery
        return dataclasses.replace(delivery, lease_token=newest.lease_token)

    def _finished(self, task: asyncio.Task[None]) -> None:
        delivery = self._inflight.pop(task)
        self._leases.pop(delivery.id, None)
        self._free[delivery.handler] += 1
        if not task.cancelled() and (exc := task.exception()) is not None:
            # _deliver records every handler failure itself; reaching this is a bug in the
            # store or here. The lease runs out and the delivery is retried.
            self._log.error("delivery.crashed", delivery_id=delivery.id, exc_info=exc)
        self._wake.set()
        self._notify_progress()

    def _policy(self, handler: str) -> RetryPolicy:
        """The handler instance's own retry schedule (``LACUNA_<NAME>_RETRY_*``), else the
        global one."""
        return self.handlers.policies.get(handler, self.policy)

    def _timeout(self, handler: str) -> float:
        return self.handlers.timeouts.get(handler, DEFAULT_TIMEOUT_SECONDS)

    async def _deliver(self, delivery: Delivery) -> None:
        """Run one attempt and record its outcome. Never raises for a handler's failure."""
        name = delivery.handler
        started = self.clock()
        t0 = time.perf_counter()
        # The claim's lease ends timeout + LEASE_MARGIN after it was taken (just now): an
        # outcome may be recorded until shortly before, not after (another claim may run it).
        record_until = (
            asyncio.get_running_loop().time()
            + self._timeout(name)
            + LEASE_MARGIN.total_seconds()
            - RECORD_SAFETY_SECONDS
        )
        after = self.handlers.after.get(name, ())
        if after:
            try:
                delivery = await self._with_results(delivery, after)
            except StoreUnavailable as exc:
                # Not the handler's doing: give the claim back uncounted; it comes round again.
                self._log.warning(
                    "delivery.results_unavailable",
                    delivery_id=delivery.id,
                    error=describe_error(exc),
                )
                await self._release(delivery)
                return
        policy = self._policy(name)
        decision = budget_spent(delivery.attempts, policy)
        result = None
        if decision is None:
            outcome = await self.runner.run(delivery, self._timeout(name))
            result = outcome.result
            decision = decide(
                outcome,
                attempts=delivery.attempts,
                policy=policy,
                finished_at=self.clock(),
                rand=self.rand,
                created_at=delivery.created_at,
            )
        now = self.clock()
        duration = time.perf_counter() - t0
        # Its end is its start plus its length by the monotonic clock: the wall clock stepping
        # while it ran recorded a length of -3597 s or an hour (events show, p50/p95).
        finished = started + timedelta(seconds=duration)
        delivery = self._lease(delivery)
        if decision.action is Action.RELEASE:
            # Not the handler's doing (another attempt's timeout replaced its worker): the
            # claim goes back uncounted and nothing is recorded.
            await self._release(delivery)
            self._log.warning(
                "delivery.released",
                event_id=delivery.event.id,
                handler=name,
                delivery_id=delivery.id,
                attempt=delivery.attempts,
                reason=decision.error,
            )
            return
        outcome_ = decision.outcome
        assert outcome_ is not None  # every action but a release records an attempt
        attempt = Attempt(
            started_at=started,
            finished_at=finished,
            outcome=outcome_,
            error=decision.error,
            result=result if decision.action is Action.COMPLETE else None,
        )
        # The outcome and its count (and a pause) are one write: were they two, the retry
        # could be claimed and run in between, and the count and the pause land late or wrong.
        tally = self._tally(name, decision)
        may_pause = tally is not None and tally.may_pause
        if may_pause:
            self._pausing.add(delivery.id)
        try:
            done = await self._record(delivery, decision, attempt, tally, record_until)
        finally:
            if may_pause:
                self._pausing.discard(delivery.id)
        newer = self._lease(delivery)
        if newer.lease_token != delivery.lease_token:
            # Claimed again while the outcome was being written (refused, then: not ours):
            # give that claim back so the delivery comes round again, uncounted.
            await self._release(newer)
        if done.paused and tally is not None:
            cause = "gone" if tally.kind == "pause" else "failures"
            self._paused_here(name, tally.reason, cause=cause)
        if self.metrics is not None:
            self.metrics.deliveries.labels(name, outcome_.value).inc()
            self.metrics.handler_latency.labels(name).observe(duration)
        log = self._log.info if outcome_ is AttemptOutcome.OK else self._log.warning
        retry_in = None
        if decision.retry_at is not None:
            retry_in = round((decision.retry_at - now).total_seconds(), 3)
        log(
            "delivery.attempt",
            event_id=delivery.event.id,
            event_type=delivery.event.type,
            handler=name,
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            outcome=outcome_.value,
            duration_ms=round(duration * 1000, 3),
            error=decision.error,
            retry_in_seconds=retry_in,
            recorded=done.recorded,
        )

    async def _record(
        self,
        delivery: Delivery,
        decision: Decision,
        attempt: Attempt,
        tally: Tally | None,
        record_until: float,
    ) -> Recorded:
        """Write the attempt's outcome under the claim ``delivery`` holds. A store that
        fails (a lock held, a full disk, a restarting writer) is tried again, with backoff,
        while the claim's lease has time left (``record_until``, loop time): given up at once, the
        finished attempt was forgotten and its handler ran again once the lease ran out."""
        loop = asyncio.get_running_loop()
        delay = RECORD_RETRY_FIRST_SECONDS
        while True:
            try:
                if decision.action is Action.COMPLETE:
                    return await self.store.complete(delivery, attempt, tally=tally)
                if decision.retry_at is not None:
                    return await self.store.retry(
                        delivery, attempt, at=decision.retry_at, refund=decision.refund, tally=tally
                    )
                return await self.store.dead(delivery, attempt, tally=tally)
            except StoreUnavailable as exc:
                if self._stopping or loop.time() + delay > record_until:
                    # The lease runs out and the delivery is claimed again: at least once,
                    # as promised (and counted then: nothing of this attempt was written).
                    self._log.warning(
                        "delivery.record_failed",
                        delivery_id=delivery.id,
                        error=describe_error(exc),
                    )
                    return Recorded(False)
                self._log.warning(
                    "delivery.record_retry",
                    delivery_id=delivery.id,
                    retry_in_seconds=delay,
                    error=describe_error(exc),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECORD_RETRY_MAX_SECONDS)

    # -- shutdown --------------------------------------------------------------------------

    async def _with_results(self, delivery: Delivery, after: tuple[str, ...]) -> Delivery:
        """The delivery with its prerequisites' results (SPEC §6): one key per handler in
        ``after``; ``None`` for one that recorded no result or has no delivery of the event."""
        rows = await self.store.list_deliveries(
            event_id=delivery.event.id, limit=1000, dispatching=True
        )
        found = {row.handler: row.result for row in rows if row.handler in after}
        return dataclasses.replace(delivery, results={h: found.get(h) for h in after})

    async def _abandon(self) -> None:
        """Cancel whatever is still in flight, end the runner (no handler code may still run
        once a claim is given back), then give each claim back to the store."""
        # Under their newest claims, taken now: a task's end forgets its claims.
        abandoned = [(task, self._lease(d)) for task, d in self._inflight.items()]
        for task, _ in abandoned:
            task.cancel()
        if abandoned:
            await asyncio.wait([task for task, _ in abandoned])
        if self._runner_started and not self._runner_closed:
            self._runner_closed = True
            await self.runner.close()
        budget = asyncio.get_running_loop().time() + RELEASE_BUDGET_SECONDS
        for task, delivery in abandoned:
            if not task.cancelled():
                # Its handler finished before the cancellation reached it (a blocking one):
                # _deliver recorded that outcome. Released, it would run a second time.
                continue
            # Bounded together: against a store that hangs (a stopped SQLite writer) each
            # release waited for it, and the stop outlived its bound by a minute. A claim not
            # given back is taken again when its lease runs out.
            left = budget - asyncio.get_running_loop().time()
            if left > 0:
                try:
                    async with asyncio.timeout(left):
                        await self._release(delivery)
                except TimeoutError:
                    self._log.warning(
                        "delivery.release_failed",
                        delivery_id=delivery.id,
                        error="the store did not answer in time; the lease runs out instead",
                    )
            self._log.warning(
                "delivery.abandoned",
                event_id=delivery.event.id,
                handler=delivery.handler,
                delivery_id=delivery.id,
                attempt=delivery.attempts,
            )

    async def _release(self, delivery: Delivery) -> None:
        try:
            await self.store.release(delivery, now=self.clock())
        except StoreUnavailable as exc:
            # Not fatal: the lease runs out and the delivery is claimed again later.
            self._log.warning(
                "delivery.release_failed", delivery_id=delivery.id, error=describe_error(exc)
            )

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


__all__ = ["DEFAULT_TIMEOUT_SECONDS", "LEASE_MARGIN", "Dispatcher"]
