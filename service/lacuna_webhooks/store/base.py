"""The store contract: a durable inbox (events, deduplicated by id) and outbox (deliveries).

Every backend implements ``Store``; one contract test-suite
(``tests/integration/test_store_contract.py``) runs unchanged over each. Where the
rules live: this docstring (what each operation does to which rows); ``memory.py``, the
reference implementation and test double; ``rules.py``, the decisions every backend
computes the same way (task ordering, commit health); ``store/sql/<dialect>/queries.sql``,
the named statements of each SQL dialect (``queries.py``: the shared ones have the same
names and result columns), mapped to the records below by column name (``rows.py``);
``sqlite/`` and ``postgres/``, each backend's mechanics. A new deliveries column touches
the schema migration, the queries and the record.

Semantics every backend keeps:

- ``accept`` is one transaction: insert the event (dedupe on its id by the
  unique key, never check-then-insert) and one ``pending`` delivery per
  handler name given, due at once; update the per-task state unless the event
  is older than what the task already has (events are ordered by ``created``,
  or by their received time when they carry none; an older event is stored
  with ``superseded`` set and still gets its deliveries). It returns ``True`` for a new
  event, ``False`` for a duplicate (nothing else is written). It returns only
  after the transaction is durably committed; on any failure it raises
  ``StoreUnavailable``.
- ``claim`` takes up to ``limit`` due ``pending`` deliveries of one handler
  whose lease is free or expired, oldest due first, and leases them until
  ``now + lease``; each claim increments ``attempts`` and ``lease_token``.
  An expired lease is claimable again, so a crashed worker loses nothing.
  Where several processes on several machines share one database
  (PostgreSQL), leases are timed by the *database's* clock instead: the
  lease runs until the database's ``now() + lease``, and is expired when the
  database's clock says so; the ``now`` argument then only decides what is due
  (``next_attempt_at <= now``) and stamps ``updated_at``. So replicas whose
  clocks disagree never run one delivery twice at the same time; a replica
  whose clock runs ahead only sees retries due early. ``stats`` counts
  running and due leases by the same clock as ``claim``.
- ``complete`` / ``retry`` / ``dead`` / ``release`` record the outcome only if
  the delivery still carries the claimed ``lease_token`` and a lease (else return
  ``False`` / ``Recorded(False)`` and change nothing); all but ``release`` append the
  ``Attempt`` and set ``last_error`` to its error (``None`` on success). ``release`` moves
  the token on. The ``tally`` of ``complete`` / ``retry`` / ``dead`` (the handler's
  consecutive-failure count, and a pause) is written in the same transaction as the
  outcome, and only when the outcome is: so the next attempt of a retried delivery (and
  anything else claimed after it) always sees the count and the pause its attempt made.
- ``replay``, ``replay_many`` and ``retry_dead`` revoke any live claim on the
  deliveries they reset (``lease_token`` moved on, ``last_error`` cleared): the
  operator's new run wins over an attempt still running, whose outcome is refused.
  A live lease is kept, so the delivery is never claimed (run) beside that attempt;
  when the attempt ends (its ``complete``/``retry``/``dead``/``release`` refused) the
  lease ends with it and the delivery is due at once; reset twice meanwhile, the lease
  is left to expire. An expired lease is cleared.
- ``replay_many`` is ``replay`` over a batch of events in one short transaction: it creates
  the missing deliveries of the named handlers (backfill, ``create``) and resets the existing
  ones as ``replay`` does (``reset``); events no longer stored are skipped, not an error.
- Flow control (``docs/flow-control.md``): ``set_paused`` pauses or resumes a handler by
  name (a row per handler, kept across restarts and seen by every replica); resuming also
  clears its consecutive-failure count. The outcomes keep that count, each by its
  ``Tally`` (``LACUNA_<NAME>_PAUSE_AFTER_FAILURES``): a failure pauses the handler when
  the count reaches ``pause_after``, in the outcome's transaction. ``claim`` itself does
  not look at the paused set: the dispatcher reads ``paused_handlers`` and skips them.
  ``take_tokens`` / ``give_back_tokens`` keep one token bucket per handler
  (``LACUNA_<NAME>_RATE_LIMIT``), shared by every process of the store; on PostgreSQL
  refilled by the database's clock (``now`` is then unused), elsewhere by ``now``.
- ``wait_for_work`` returns early when new work may be due (an accept in this
  process, or a NOTIFY from another replica), else after ``timeout_seconds``.
- The live stream (``stream.py``): ``stream_after`` hands out every stored event once, in
  an order that never changes behind a cursor once given, across restarts and replicas;
  ``stream_head`` is the cursor of "now"; ``stream_signal`` wakes followers when an accept
  may have committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from ..models import Attempt, AttemptOutcome, Delivery, DeliveryStatus, Event
from .stream import StreamSignal


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A stored event, for admin commands.

    ``size`` is the body's length in bytes (``len(raw)`` when not given). A read that did
    not load the body (``search_events(bodies=False)``, the admin client's listings) leaves
    ``raw`` empty, ``b""``, which no stored body is (an event is a JSON object), while
    ``size`` still says how large it is: ``has_body`` tells them apart."""

    id: str
    type: str
    created: int | None
    received_at: datetime
    task_id: str | None
    superseded: bool
    raw: bytes
    size: int = -1

    def __post_init__(self) -> None:
        if self.size < 0:
            object.__setattr__(self, "size", len(self.raw))

    @property
    def has_body(self) -> bool:
        """Whether ``raw`` holds the body (else it was not read: see the class docstring)."""
        return bool(self.raw) or self.size == 0

    def without_body(self) -> EventRecord:
        """This record with ``raw`` left out (``size`` kept)."""
        return replace(self, raw=b"", size=self.size)

    def to_event(self) -> Event:
        if not self.has_body:
            raise ValueError(f"event {self.id!r} was read without its body")
        return Event.from_stored(self.raw)  # stored: accepted once already


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A delivery row, for admin commands and stats."""

    id: int
    event_id: str
    event_type: str
    handler: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    lease_until: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    # The JSON object the handler returned when it completed the delivery (SPEC §6), else None.
    result: dict[str, Any] | None = None

    def running(self, now: datetime) -> bool:
        return (
            self.status is DeliveryStatus.PENDING
            and self.lease_until is not None
            and self.lease_until > now
        )


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One recorded attempt of a delivery."""

    delivery_id: int
    attempt: int
    started_at: datetime
    finished_at: datetime
    outcome: AttemptOutcome
    error: str | None

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """The latest known state of one generation task (``data.id``)."""

    task_id: str
    status: str | None
    event_id: str
    event_type: str
    event_created: int | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which stored events an admin search, bulk replay or backfill is about (SPEC §9
    ``GET /events``); every field given must hold (AND). ``None``/empty: no condition.

    - ``type``: the event type, exactly; ``task_id``: ``data.id``, exactly.
    - ``since`` / ``until``: ``received_at`` bounds, ``since <= received_at < until``.
    - ``handler`` + ``status``: events that have a delivery of that handler (with that
      status, one of ``pending``, ``running``, ``due``, ``waiting``, ``done``, ``dead``, when
      given; ``status`` alone: a delivery of any handler with that status).
    - ``match``: ``(dotted.path, value)`` pairs; the payload field at the path (object keys
      only) equals the value: a JSON string equal to it, or a number, boolean or ``null``
      whose JSON text equals it.
    - ``q``: a substring of the raw payload bytes (as UTF-8 text), case-sensitive.
    """

    type: str | None = None
    task_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    handler: str | None = None
    status: str | None = None
    match: tuple[tuple[str, str], ...] = ()
    q: str | None = None


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of a search, newest first; ``next_cursor`` (opaque, store-made) fetches the
    next older page, ``None`` when this was the last one.

    ``complete`` is ``False`` when the search stopped at its ``ScanBudget`` before the page
    was full or the end was reached: ``records`` (at most ``limit``, even none) are every
    match between the cursor given and ``next_cursor`` (never ``None`` then), which resumes
    the scan exactly where it stopped; ``searched_to`` is the ``received_at`` the scan
    reached (every event received after it, down to the cursor given, was examined).
    ``True``: as without a budget, and ``searched_to`` is ``None``.

    A page of bodies may also end early at its byte budget (``search_events``' ``max_bytes``):
    fewer than ``limit`` records, ``complete`` ``True`` and ``next_cursor`` after the last
    record, so following it skips nothing."""

    records: list[EventRecord]
    next_cursor: str | None
    complete: bool = True
    searched_to: datetime | None = None


#: ``search_events``' default ``max_bytes``: the most body bytes one page holds (the first
#: event of a page is always there, whatever its size). Pages of events with their bodies
#: (the console's events list) stop early at it with a ``next_cursor``, so an admin read holds
#: a bounded amount of memory in the process intake shares, whatever ``limit`` and the sizes.
PAGE_BODY_BYTES = 4 * 1024 * 1024

#: ``ScanBudget.seconds`` of the admin API unless ``LACUNA_ADMIN_SEARCH_BUDGET`` says.
DEFAULT_SEARCH_BUDGET_SECONDS = 0.5
#: The first window of a budgeted scan (events), and the largest any window grows to.
FIRST_SCAN_WINDOW = 1000
MAX_SCAN_WINDOW = 200_000


@dataclass(frozen=True, slots=True)
class ScanBudget:
    """How long one ``search_events`` call may scan bodies (``match``, ``q``) before it
    answers with what it found (``EventPage.complete`` ``False``).

    The scan walks the events newest first in windows of the ``received_at`` index: the
    first of ``first_window`` events, each next one sized from the rate measured so far to
    take about half of what is left of ``seconds`` (at least one event, at most four times
    the last window and ``max_window``). After each window the scan stops when the page is
    full and one more match is known (``next_cursor`` after its last row), when the events
    run out, or when ``seconds`` are spent (``spent``: nine tenths of them; ``next_cursor``
    at the scan's position), so a page takes about ``seconds``. At least one window is
    always scanned (``seconds=0``: exactly one per call), so following ``next_cursor``
    always makes progress. Only searches with ``match`` or ``q`` and without ``task_id``
    (a handful of events, by index) are windowed (on SQLite, not those a rare delivery
    state drives either: they read only that state's deliveries); the others answer as
    without a budget, never incomplete."""

    seconds: float = DEFAULT_SEARCH_BUDGET_SECONDS
    first_window: int = FIRST_SCAN_WINDOW
    max_window: int = MAX_SCAN_WINDOW

    def windowed(self, where: EventFilter) -> bool:
        """Whether a search of ``where`` reads bodies beyond what an index bounds."""
        return bool(where.match or where.q is not None) and where.task_id is None

    def spent(self, elapsed: float) -> bool:
        """Whether a scan that has run ``elapsed`` seconds stops: the budget is spent, or so
        little is left (a tenth) that another window would mostly cost its own overhead."""
        return elapsed >= self.seconds * 0.9

    def next_window(self, window: int, scanned: int, elapsed: float) -> int:
        """The size of the window after one of ``window`` events, ``scanned`` events having
        taken ``elapsed`` seconds in all."""
        grown = min(window * 4, self.max_window)
        if elapsed <= 0 or scanned <= 0:
            return max(1, grown)
        left = max(self.seconds - elapsed, 0.0)
        fitting = int(scanned / elapsed * left / 2)
        return max(1, min(grown, fitting))


@dataclass(frozen=True, slots=True)
class ReplayCounts:
    """What one ``replay_many`` wrote: deliveries ``created`` (backfill) and ``reset``."""

    created: int = 0
    reset: int = 0


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Outbox figures for ``/metrics``: the whole outbox, and ``by_handler`` the same
    figures per handler name (only handlers with a pending or dead delivery appear)."""

    pending: int  # pending deliveries, due or not, leased or not
    due: int  # pending, due now, not leased
    running: int  # pending with a live lease
    dead: int
    oldest_due_age_seconds: float  # 0 when nothing is due
    by_handler: Mapping[str, QueueStats] = field(default_factory=dict, compare=False)

    @classmethod
    def combine(cls, by_handler: Mapping[str, QueueStats]) -> QueueStats:
        """The outbox totals of per-handler figures (what every backend's ``stats`` returns:
        one grouped query, summed here)."""
        parts = by_handler.values()
        return cls(
            pending=sum(p.pending for p in parts),
            due=sum(p.due for p in parts),
            running=sum(p.running for p in parts),
            dead=sum(p.dead for p in parts),
            oldest_due_age_seconds=max((p.oldest_due_age_seconds for p in parts), default=0.0),
            by_handler=dict(by_handler),
        )


@dataclass(frozen=True, slots=True)
class HandlerActivity:
    """One handler's queue now and its attempts in a recent window (admin ``GET /handlers``).

    ``due`` / ``running`` / ``waiting`` split its pending deliveries as ``search.py``'s
    ``delivery_state`` does; ``dead`` counts its dead ones. ``attempts`` (and ``succeeded``,
    those whose outcome was ``ok``) finished at or after the window's start; ``p50_seconds``
    / ``p95_seconds`` are nearest-rank percentiles of their durations (``None`` without
    attempts); ``last_error`` / ``last_error_at`` the latest failed attempt of the window."""

    handler: str
    due: int = 0
    running: int = 0
    waiting: int = 0
    dead: int = 0
    attempts: int = 0
    succeeded: int = 0
    p50_seconds: float | None = None
    p95_seconds: float | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class HandlerState:
    """A handler's flow-control row: paused or not (and why), and its consecutive failed
    attempts (reset by a success or a resume). No row means running with no failures."""

    handler: str
    paused: bool
    reason: str | None
    consecutive_failures: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Tally:
    """What a recorded outcome does to its handler's flow-control row (``HandlerState``),
    written in the outcome's own transaction (``complete`` / ``retry`` / ``dead``'s
    ``tally``; without one the row is left alone, as for a refunded 429). Build one with:

    - ``Tally.success()``: the handler's run of failures ends (the count is set to 0,
      written only when it is not 0 already);
    - ``Tally.failure(pause_after=, reason=)``: one more consecutive failure; when the count
      reaches ``pause_after`` (``None``: never) and the handler is not paused yet, it is
      paused with ``reason``;
    - ``Tally.pause(reason)``: pause the handler with ``reason`` (its endpoint is gone),
      unless it is paused already; the count is left as it is.
    """

    kind: Literal["success", "failure", "pause"]
    pause_after: int | None = None
    reason: str | None = None

    @classmethod
    def success(cls) -> Tally:
        return cls("success")

    @classmethod
    def failure(cls, *, pause_after: int | None, reason: str) -> Tally:
        return cls("failure", pause_after, reason)

    @classmethod
    def pause(cls, reason: str) -> Tally:
        return cls("pause", None, reason)

    @property
    def may_pause(self) -> bool:
        """Whether applying it can pause the handler."""
        return self.kind == "pause" or (self.kind == "failure" and self.pause_after is not None)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What ``complete`` / ``retry`` / ``dead`` did. ``recorded``: the outcome (and its
    ``Tally``) was written; ``False`` when the claim was stale, and then nothing was, not
    even the count. ``paused``: this call paused the handler (its tally's ``pause_after``
    was reached, or it was a ``Tally.pause``); ``False`` when it was paused already. Truthy
    exactly when ``recorded``, as the ``bool`` these methods once returned."""

    recorded: bool
    paused: bool = False

    def __bool__(self) -> bool:
        return self.recorded


class Store(Protocol):
    """See the module docstring for the semantics each method must keep."""

    #: Notified when an accept of this process committed (and, on PostgreSQL, on a NOTIFY
    #: of any replica); its ``poll_seconds`` bounds how late anything else is seen.
    stream_signal: StreamSignal

    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return when the store answers and its writes commit; raise ``StoreUnavailable``
        otherwise. After a write failed for a reason of the database, a probe write must
        commit before ``ping`` passes again (``rules.CommitHealth``; ``/readyz``)."""

    async def accept(
        self,
        event: Event,
        handlers: Sequence[str],
        *,
        now: datetime,
        trace_context: str | None = None,
    ) -> bool:
        """See the module docstring. ``trace_context`` (the receiving request's W3C
        ``traceparent``, given only while tracing is on) is stored with a new event and comes
        back as ``Delivery.trace_context`` with each claim of its deliveries."""

    async def claim(
        self,
        *,
        handler: str,
        limit: int,
        lease: timedelta,
        now: datetime,
        after: Sequence[str] = (),
    ) -> list[Delivery]:
        """Lease due deliveries of ``handler`` (see the module docstring: on PostgreSQL the
        lease times come from the database's clock and ``now`` only decides what is due).

        ``after`` (``LACUNA_<NAME>_AFTER``, SPEC §6) skips a delivery while its event has a
        *pending* delivery of one of those handlers; ended ones (done, dead) and handlers
        with no delivery for the event do not hold it back."""

    async def complete(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        """Mark the claimed delivery done, record ``attempt`` (with its result) and apply
        ``tally`` to its handler's row, in one transaction (see ``Recorded``)."""

    async def retry(
        self,
        delivery: Delivery,
        attempt: Attempt,
        *,
        at: datetime,
        refund: bool = False,
        tally: Tally | None = None,
    ) -> Recorded:
        """Make the claimed delivery due again at ``at``, record ``attempt`` and apply
        ``tally``, in one transaction: the retry is never claimed before its count and pause
        are written.

        ``refund``: the attempt does not count against the budget (a ``RateLimited`` 429,
        docs/delivery.md): the attempt row is still written, with the claim's number, but
        ``attempts`` is decremented again (never below 0), as ``release`` does."""

    async def dead(
        self, delivery: Delivery, attempt: Attempt, *, tally: Tally | None = None
    ) -> Recorded:
        """Give the claimed delivery up (``dead``), record ``attempt`` and apply ``tally``,
        in one transaction."""

    async def release(self, delivery: Delivery, *, now: datetime | None = None) -> bool:
        """Give an unfinished claim back (graceful stop): due at once, ``attempts`` undone,
        ``lease_token`` moved on (a late outcome of this claim is refused), ``updated_at``
        set to ``now`` when given (else left as it was), and ``wait_for_work`` nudged."""

    async def clock_offset(self) -> timedelta | None:
        """How far the store's own clock is ahead of this process's wall clock, for a store
        shared by processes on several machines (PostgreSQL: its ``clock_timestamp()``,
        against the midpoint of the wall clock read around the query); ``None`` where this
        process's clock is the store's (SQLite, memory). Raises ``StoreUnavailable``."""

    async def clock_stepped_back(
        self, *, by: timedelta, now: datetime, written_since: datetime | None = None
    ) -> int:
        """The clock that wrote this store's schedules (the one machine of a SQLite file)
        stepped back ``by``: every ``pending`` delivery due after ``now`` was scheduled that
        much further off than meant, and is brought forward by ``by``, never before ``now``;
        how many. With ``written_since`` (the clock stepped forward before, to that time),
        only deliveries whose ``updated_at`` is after it: those written before are of the
        clock before the step forward, which this one is back to. Leases are left alone.
        PostgreSQL changes nothing (0): its schedules are shared by replicas whose clocks
        did not step."""

    async def wait_for_work(self, timeout_seconds: float) -> None: ...

    async def stats(
        self, *, now: datetime, after: Mapping[str, Sequence[str]] | None = None
    ) -> QueueStats:
        """The outbox's figures at ``now``. ``after`` (handler -> its prerequisite handlers,
        ``LACUNA_<NAME>_AFTER``) says which due deliveries ``claim`` holds back: those count
        as pending but not due (nor in the oldest due age) while a prerequisite's delivery of
        the same event is pending."""

    async def prune(self, *, received_before: datetime, keep: timedelta | None = None) -> int:
        """Delete events received before the cutoff whose deliveries are all done or dead
        (with their deliveries and attempts); return how many events were deleted. ``keep``
        (the retention) is checked by the database's clock too on PostgreSQL, whose replicas'
        clocks may disagree: an event is pruned only when both clocks say it is old."""

    async def list_events(
        self, *, limit: int = 50, event_type: str | None = None
    ) -> list[EventRecord]:
        """Newest first."""

    async def get_event(self, event_id: str) -> EventRecord | None: ...

    async def search_events(
        self,
        where: EventFilter,
        *,
        cursor: str | None = None,
        limit: int = 50,
        budget: ScanBudget | None = None,
        bodies: bool = True,
        max_bytes: int | None = PAGE_BODY_BYTES,
    ) -> EventPage:
        """The events ``where`` selects, newest first (``received_at``, then arrival), at
        most ``limit``, after the page that returned ``cursor``. Raises ``ValueError`` for a
        cursor this store did not make (the admin API answers 400). With a ``budget``, a
        scan of bodies may stop early: ``EventPage.complete`` ``False`` (see there); a
        client that follows ``next_cursor`` sees every match once, in order, either way.

        Memory: the search itself never holds the bodies it scans (the conditions on them run
        in the database), only those of the page it returns. ``bodies=False``: none at all,
        each record's ``raw`` empty and its ``size`` the body's length (what a listing
        shows). Else the page stops before the event whose body would bring its bodies past
        ``max_bytes`` (the first event always comes; ``None``: no bound), with
        ``next_cursor`` after its last record; the bodies past it are never read."""

    async def list_deliveries(
        self,
        *,
        status: DeliveryStatus | None = None,
        handler: str | None = None,
        event_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
        dispatching: bool = False,
    ) -> list[DeliveryRecord]:
        """Newest first (by id); with ``before``, only deliveries whose id is smaller (the
        admin API's cursor). ``dispatching``: the dispatcher's own read (the results of an
        event's earlier handlers); on SQLite it runs on the writer's connection, never behind
        an admin search on the reader, and every other read (the admin's, the console's)
        runs on the reader, never in the writer's queue. Other backends ignore it."""

    async def list_attempts(self, delivery_id: int) -> list[AttemptRecord]:
        """Oldest first."""

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def stream_after(
        self, cursor: str | None, limit: int, max_bytes: int | None = None
    ) -> list[tuple[str, EventRecord]]:
        """Up to ``limit`` events after ``cursor`` (``None``: from the first stored), oldest
        first, each with its own cursor (opaque, ``stream.py``). Every event is handed out
        once: an event that commits later never sorts before a cursor already given.
        With ``max_bytes``, it stops before the event whose body (``raw``) would bring the
        bodies past that many bytes, and never reads that event's body (the first event
        is always returned). ``ValueError`` for a cursor this store did not make (the admin
        API answers 400)."""

    async def stream_head(self) -> str:
        """The cursor of "now": ``stream_after`` of it gives only events not yet handed
        out by then (on PostgreSQL, possibly some that committed an instant before)."""

    async def replay(self, event_id: str, handlers: Sequence[str] | None, *, now: datetime) -> int:
        """Make the event's deliveries pending and due again with a fresh attempt budget:
        those of ``handlers`` (created when missing) or, with ``None``, every existing one.
        Raise ``EventNotFound``; return how many deliveries were reset or created."""

    async def replay_many(
        self,
        event_ids: Sequence[str],
        handlers: Sequence[str] | None,
        *,
        now: datetime,
        create: bool = True,
        reset: bool = True,
    ) -> ReplayCounts:
        """``replay`` of a batch of events (a few hundred ids) in one transaction.

        With ``handlers``: a missing delivery of each named handler is created (``create``:
        pending, due at ``now``, as ``accept`` makes it) and an existing one is reset as
        ``replay`` resets it (``reset``); with ``None``: every existing delivery of the events
        is reset (``reset``) and none is created. Ids the store does not hold (pruned since
        they were found) are skipped. Returns the counts; nudges ``wait_for_work`` (and, on
        PostgreSQL, the other replicas) when it wrote any."""

    async def retry_dead(self, *, handler: str | None, now: datetime) -> int:
        """Make every dead delivery (of ``handler``) pending, due now, with a fresh budget."""

    async def set_paused(
        self, handler: str, paused: bool, *, reason: str | None, now: datetime
    ) -> bool:
        """Pause (with ``reason``) or resume ``handler``; ``True`` when this call changed
        its state, ``False`` when it already was so. Resuming clears the failure count."""

    async def paused_handlers(self) -> dict[str, HandlerState]:
        """The paused handlers by name (cheap: the dispatcher reads it every claim pass)."""

    async def handler_states(self) -> list[HandlerState]:
        """Every handler's row, by name."""

    async def handler_activity(self, *, now: datetime, since: datetime) -> list[HandlerActivity]:
        """``HandlerActivity`` of every handler that has a pending or dead delivery, or an
        attempt finished at or after ``since``, by name. Pending deliveries are split by
        ``now`` (leases by the database's clock on PostgreSQL, as ``claim``)."""

    async def take_tokens(
        self, handler: str, *, want: int, capacity: float, per_second: float, now: datetime
    ) -> int:
        """Refill ``handler``'s bucket (created full) at ``per_second`` since it was last
        touched, never above ``capacity``; take up to ``want`` whole tokens, atomically, and
        return how many were taken (0 to ``want``)."""

    async def give_back_tokens(self, handler: str, count: int, *, capacity: float) -> None:
        """Put ``count`` unused tokens back (never above ``capacity``)."""


def attempt_error(attempt: Attempt) -> str | None:
    """The error text stored for an attempt, bounded so a huge message cannot bloat rows."""
    if attempt.error is None:
        return None
    return attempt.error[:2000]


__all__ = [
    "DEFAULT_SEARCH_BUDGET_SECONDS",
    "FIRST_SCAN_WINDOW",
    "MAX_SCAN_WINDOW",
    "PAGE_BODY_BYTES",
    "AttemptRecord",
    "DeliveryRecord",
    "EventFilter",
    "EventPage",
    "EventRecord",
    "HandlerActivity",
    "HandlerState",
    "QueueStats",
    "Recorded",
    "ScanBudget",
    "Store",
    "Tally",
    "TaskRecord",
    "attempt_error",
]
