"""The console's pages and forms (SPEC §9), each over the store the admin app shares.

Pages: ``/events`` (search), ``/event?id=`` (one event), ``/dead``, ``/handlers``,
``/tail`` (live), ``/activity`` (chart). Forms (``POST``, CSRF-checked): ``/event/replay``,
``/dead/retry``, ``/handlers/pause``, ``/handlers/resume``, ``/sign-out``. Identifiers
travel in query strings and form fields, never in the path, so an event id or handler name
of any characters round-trips intact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ...errors import EventNotFound
from ...models import DeliveryStatus
from ...store.base import PAGE_BODY_BYTES, DeliveryRecord, EventFilter, EventRecord
from ...store.search import DELIVERY_STATES, delivery_state
from ..auth import SESSION_COOKIE, SESSION_SECONDS, make_session, matching_token
from ..bulk import not_taking, replay_configured, retry_dead_configured
from ..context import AdminContext
from ..filters import FILTER_NAMES, filter_from_query, only_params, page_params
from ..health import handler_health
from ..responses import BadRequest
from .present import (
    as_text,
    build_chart,
    flatten_result,
    hour_buckets,
    parse_payload,
    payload_title,
    pretty_json,
)
from .web import (
    Session,
    current_session,
    field,
    form_problem,
    heavy,
    read_form,
    render,
    safe_next,
    same_origin,
    url,
)

#: How many hours the activity chart covers, and how many events it counts at most.
CHART_HOURS = 12
CHART_CAP = 5000
#: How many dead deliveries the dead page lists.
DEAD_LIMIT = 200
_DONE_MESSAGES = {
    "replayed": "Replay requested: the deliveries are due again.",
    "retried": "Retry requested: the dead deliveries are due again.",
    "paused": "Handler paused.",
    "resumed": "Handler resumed.",
    "unchanged": "Nothing to change: it already was so.",
}


def state_of(delivery: DeliveryRecord, now: datetime) -> str:
    """The most specific ``DELIVERY_STATES`` name of a delivery at ``now``."""
    states = delivery_state(
        delivery.status, delivery.next_attempt_at, delivery.lease_until, now
    ) - {"pending"}
    return next(iter(states)) if states else "pending"


def _titles(records: list[EventRecord]) -> list[str | None]:
    """Each event's ``data.title`` (parsing payloads: run it with ``heavy``)."""
    return [payload_title(parse_payload(record.raw)) for record in records]


def _done(request: Request) -> str | None:
    return _DONE_MESSAGES.get(request.query_params.get("done", ""))


@dataclass(frozen=True, slots=True)
class EventRow:
    """One line of the events page."""

    record: EventRecord
    title: str | None
    states: list[tuple[str, str]]  # (handler, state)


class Console:
    """The console's views over one ``AdminContext``."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx

    # -- sign-in ---------------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        """``GET`` the form, or ``POST`` the admin token into a session cookie."""
        next_page = safe_next(request.query_params.get("next"))
        try:
            only_params(request.query_params, ("next",))
        except BadRequest as exc:
            return await render(request, "error.html", 400, message=exc.message)
        if request.method == "GET":
            if current_session(request, self.ctx) is not None:
                return RedirectResponse(next_page, status_code=303)
            return await render(request, "sign_in.html", next_page=next_page, error=None)
        if not same_origin(request):
            return await render(request, "error.html", 403, message="Sign-in from another site.")
        form = await read_form(request)
        if form is None:
            return await render(request, "error.html", 413, message="Form too large.")
        if (problem := form_problem(form, (), ("token", "next"))) is not None:
            return await render(request, "error.html", 400, message=problem)
        presented = field(form, "token")
        token = (
            None if presented is None else matching_token(presented, self.ctx.settings.admin_tokens)
        )
        next_page = safe_next(field(form, "next"))
        if token is None:
            return await render(
                request,
                "sign_in.html",
                401,
                next_page=next_page,
                error="That is not an admin token of this service.",
            )
        response = RedirectResponse(next_page, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            make_session(token, now=time.time()),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def sign_out(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        response = RedirectResponse("/sign-in", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    # -- events ----------------------------------------------------------------------------

    async def events(self, request: Request, session: Session) -> Response:
        # The search form sends every input, the empty ones too: an empty value is not
        # given. The rest is read by the API's own rules (filters.py): an unknown
        # parameter or one given twice is a 400 with the API's message, on the page.
        query = QueryParams(
            [(n, v) for n, v in request.query_params.multi_items() if v.strip() != ""]
        )
        values: dict[str, Any] = {n: query.get(n) for n in FILTER_NAMES if n != "match"}
        values["match"] = query.getlist("match")
        form = {n: values.get(n) or ("" if n != "match" else []) for n in FILTER_NAMES}
        error: str | None = None
        rows: list[EventRow] = []
        next_cursor: str | None = None
        searched_to: datetime | None = None  # set when the search stopped at its budget
        try:
            where = filter_from_query(query)
            limit, cursor = page_params(query)
            try:
                # The titles need the bodies: the page holds at most PAGE_BODY_BYTES of them
                # (fewer rows than limit then, and an "Older" link that goes on from there).
                found = await self.ctx.store.search_events(
                    where,
                    cursor=cursor,
                    limit=limit,
                    budget=self.ctx.scan_budget(),
                    max_bytes=PAGE_BODY_BYTES,
                )
            except ValueError:
                raise BadRequest("That page link is stale: search again.", param="cursor") from None
            now = self.ctx.clock()
            titles = await heavy(sum(len(r.raw) for r in found.records), _titles, found.records)
            for record, title in zip(found.records, titles, strict=True):
                deliveries = await self.ctx.store.list_deliveries(event_id=record.id, limit=100)
                states = sorted((d.handler, state_of(d, now)) for d in deliveries)
                rows.append(EventRow(record, title, states))
            next_cursor = found.next_cursor
            if not found.complete:
                searched_to = found.searched_to
        except BadRequest as exc:
            error = exc.message
        older = None
        if next_cursor is not None:
            older = url("/events", {**values, "limit": query.get("limit"), "cursor": next_cursor})
        return await render(
            request,
            "events.html",
            400 if error else 200,
            session=session,
            rows=rows,
            form=form,
            error=error,
            older=older,
            searched_to=searched_to,
            paged=bool(query.get("cursor")),
            states=DELIVERY_STATES,
            handler_names=self.ctx.handlers.names,
            filtered=bool(values.get("match")) or any(values.get(n) for n in FILTER_NAMES),
        )

    async def event(self, request: Request, session: Session) -> Response:
        event_id = request.query_params.get("id", "")
        record = await self.ctx.store.get_event(event_id) if event_id else None
        if record is None:
            return await render(
                request, "error.html", 404, session=session, message="No such event in the store."
            )
        now = self.ctx.clock()
        deliveries = await self.ctx.store.list_deliveries(event_id=record.id, limit=100)
        shown = []
        for delivery in sorted(deliveries, key=lambda d: d.handler):
            attempts = await self.ctx.store.list_attempts(delivery.id)
            shown.append(
                {
                    "delivery": delivery,
                    "state": state_of(delivery, now),
                    "attempts": attempts,
                    "result": None if delivery.result is None else flatten_result(delivery.result),
                    "last_error": None
                    if delivery.last_error is None
                    else as_text(delivery.last_error),
                }
            )
        payload_text, cut = await heavy(len(record.raw), pretty_json, record.raw)
        # "Deliver to" a handler only where intake would have (LACUNA_<NAME>_EVENTS)
        missing = [
            n
            for n in self.ctx.handlers.subscribers(record.type)
            if n not in {d.handler for d in deliveries}
        ]
        return await render(
            request,
            "event.html",
            session=session,
            record=record,
            title=(await heavy(len(record.raw), _titles, [record]))[0],
            payload=payload_text,
            cut=cut,
            deliveries=shown,
            missing=missing,
            done=_done(request),
        )

    async def replay(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        event_id = field(form, "id") or ""
        handler = field(form, "handler")
        if (refused := await self._unconfigured(request, session, handler)) is not None:
            return refused
        try:
            if handler is None:
                # As the API: the configured handlers' deliveries, never a removed one's.
                await replay_configured(
                    self.ctx.store, event_id, self.ctx.handlers.names, now=self.ctx.clock()
                )
            else:
                record = await self.ctx.store.get_event(event_id)
                if record is None:
                    raise EventNotFound(event_id)
                if not_taking(self.ctx.handlers.filters, record.type, [handler]):
                    return await render(
                        request,
                        "error.html",
                        400,
                        session=session,
                        message=f"{handler!r} does not take {record.type!r} events "
                        f"(LACUNA_{handler.upper()}_EVENTS).",
                    )
                await self.ctx.store.replay(event_id, [handler], now=self.ctx.clock())
        except EventNotFound:
            return await render(
                request, "error.html", 404, session=session, message="No such event in the store."
            )
        return RedirectResponse(url("/event", {"id": event_id, "done": "replayed"}), 303)

    async def _unconfigured(
        self, request: Request, session: Session, handler: str | None
    ) -> Response | None:
        """The 400 page for a form naming a handler this service does not configure, else
        ``None``: a delivery made pending for it would wait for ever (nothing runs it) and
        keep its event from being pruned."""
        if handler is None or handler in self.ctx.handlers.names:
            return None
        return await render(
            request,
            "error.html",
            400,
            session=session,
            message=f"{handler!r} is not a configured handler: nothing would run it.",
        )

    # -- dead deliveries -------------------------------------------------------------------

    async def dead(self, request: Request, session: Session) -> Response:
        handler = request.query_params.get("handler") or None
        deliveries = await self.ctx.store.list_deliveries(
            status=DeliveryStatus.DEAD, handler=handler, limit=DEAD_LIMIT
        )
        by_handler: dict[str, int] = {}
        for d in deliveries:
            by_handler[d.handler] = by_handler.get(d.handler, 0) + 1
        return await render(
            request,
            "dead.html",
            session=session,
            deliveries=[
                (d, None if d.last_error is None else as_text(d.last_error)) for d in deliveries
            ],
            by_handler=sorted(by_handler.items()),
            handler=handler,
            limit=DEAD_LIMIT,
            done=_done(request),
        )

    async def retry(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        """Retry one dead delivery (``id`` = its event, ``handler``) or every dead one of
        ``handler`` (no ``id``). ``handler`` is required (``action`` checks it): no form
        of the console retries every handler's dead deliveries at once."""
        handler = field(form, "handler")
        event_id = field(form, "id")
        now = self.ctx.clock()
        if (refused := await self._unconfigured(request, session, handler)) is not None:
            return refused
        if handler is None:  # action() refuses such a form first; never read as "all"
            return await render(
                request, "error.html", 400, session=session, message="Name the handler to retry."
            )
        if event_id is not None:
            dead = await self.ctx.store.list_deliveries(
                status=DeliveryStatus.DEAD, handler=handler, event_id=event_id, limit=1
            )
            if dead:
                await self.ctx.store.replay(event_id, [handler], now=now)
        else:
            await retry_dead_configured(
                self.ctx.store, self.ctx.handlers.names, handler=handler, now=now
            )
        return RedirectResponse(url("/dead", {"done": "retried"}), 303)

    # -- handlers --------------------------------------------------------------------------

    async def handlers(self, request: Request, session: Session) -> Response:
        rows = await handler_figures(self.ctx)
        return await render(
            request, "handlers.html", session=session, rows=rows, done=_done(request)
        )

    async def pause(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        return await self._set_paused(request, session, form, paused=True)

    async def resume(
        self, request: Request, session: Session, form: dict[str, list[str]]
    ) -> Response:
        return await self._set_paused(request, session, form, paused=False)

    async def _set_paused(
        self, request: Request, session: Session, form: dict[str, list[str]], *, paused: bool
    ) -> Response:
        name = field(form, "name")
        if name is None or name not in self.ctx.handlers.names:
            return await render(
                request,
                "error.html",
                404,
                session=session,
                message="That handler is not configured in this service.",
            )
        changed = await self.ctx.store.set_paused(
            name,
            paused,
            reason="paused from the console" if paused else None,
            now=self.ctx.clock(),
        )
        done = ("paused" if paused else "resumed") if changed else "unchanged"
        return RedirectResponse(url("/handlers", {"done": done}), 303)

    # -- live tail and activity ------------------------------------------------------------

    async def tail(self, request: Request, session: Session) -> Response:
        return await render(request, "tail.html", session=session)

    async def activity(self, request: Request, session: Session) -> Response:
        now = self.ctx.clock()
        starts = hour_buckets(now, CHART_HOURS)
        accepted, capped_a = await self._received(EventFilter(since=starts[0]))
        dead, capped_d = await self._received(EventFilter(since=starts[0], status="dead"))
        waiting, capped_w = await self._received(EventFilter(since=starts[0], status="waiting"))
        failed = {**dead, **waiting}
        chart = build_chart(
            starts,
            list(accepted.values()),
            list(failed.values()),
            capped=capped_a or capped_d or capped_w,
        )
        return await render(
            request, "activity.html", session=session, chart=chart, hours=CHART_HOURS
        )

    async def _received(self, where: EventFilter) -> tuple[dict[str, datetime], bool]:
        """The received times of up to ``CHART_CAP`` events ``where`` selects, by id, and
        whether the cap cut the count."""
        found: dict[str, datetime] = {}
        cursor: str | None = None
        while len(found) < CHART_CAP:
            batch = await self.ctx.store.search_events(
                where, cursor=cursor, limit=500, bodies=False
            )
            found.update((r.id, r.received_at) for r in batch.records)
            cursor = batch.next_cursor
            if cursor is None:
                return found, False
        return found, len(found) >= CHART_CAP


@dataclass(frozen=True, slots=True)
class HandlerRow:
    """What the handlers page shows of one handler instance."""

    name: str
    kind: str
    configured: bool
    paused: bool
    reason: str | None
    concurrency: int | None
    events: str
    queue: dict[str, int]  # due, running, waiting, dead
    capped: bool  # the queue counts stopped at a cap: lower bounds
    consecutive_failures: int
    last_error: str | None
    extra: dict[str, str]  # the last hour: attempts, success ratio, p50 / p95 duration


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} s"


async def handler_figures(ctx: AdminContext) -> list[HandlerRow]:
    """Each configured handler instance as the handlers page shows it, from the same
    ``handler_health`` as ``GET /api/v1/handlers``."""
    rows = []
    for health in await handler_health(ctx):
        name = health["name"]
        types = ctx.handlers.filters.get(name)
        rate = health["rate_limit"]
        ratio = health["success_ratio"]
        figures = {
            "Rate limit": "—"
            if rate is None
            else f"{rate['count']} per {rate['period_seconds']:g} s",
            "Pauses after": "—"
            if health["pause_after_failures"] is None
            else f"{health['pause_after_failures']} failures in a row",
            "Attempts, last hour": str(health["attempts"]),
            "Succeeded": "—" if ratio is None else f"{health['succeeded']} ({ratio:.0%})",
            "Duration p50 / p95": f"{_seconds(health['p50_seconds'])} / "
            f"{_seconds(health['p95_seconds'])}",
        }
        reason = health["paused_reason"]
        last_error = health["last_error"]
        rows.append(
            HandlerRow(
                name=name,
                kind=str(health["kind"]),
                configured=True,
                paused=bool(health["paused"]),
                reason=None if reason is None else as_text(reason),
                concurrency=health["concurrency"],
                events="all" if types is None else ", ".join(sorted(types)),
                queue=dict(health["queue"]),
                capped=False,
                consecutive_failures=int(health["consecutive_failures"]),
                last_error=None if last_error is None else as_text(last_error),
                extra=figures,
            )
        )
    return rows


__all__ = ["CHART_HOURS", "Console", "EventRow", "HandlerRow", "handler_figures", "state_of"]
