"""Admin API area: events, deliveries and handlers (SPEC §9).

- ``GET /events``: the filter language of ``filters.py``; a page of event summaries.
- ``GET /events/{event_id}``: the event, its payload, its deliveries with their attempts.
- ``POST /events/{event_id}/replay``: ``{"handlers": [...]}`` (optional) → ``{"replayed": N}``.
  ``event_id`` is the rest of the path and may hold ``/`` (written as is or as ``%2F``).
- ``GET /deliveries``: ``status`` / ``handler`` / ``event_id``; newest first, by cursor.
- ``POST /deliveries/retry-dead``: ``{"handler": ...}`` (optional) → ``{"retried": N}``.
- ``GET /handlers``: ``health.handler_health`` of every configured instance.
- ``POST /handlers/{name}/pause`` (``{"reason": ...}`` optional) and ``/resume``.

Every bad parameter or body is a 400 (a body over ``bodies.MAX_BODY_BYTES`` a 413), an
unknown event or handler a 404, all in the error envelope; the store's failures are 503.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..config import HANDLER_NAME_RE
from ..errors import EventNotFound
from ..models import MAX_PAUSE_REASON_LENGTH, DeliveryStatus, pause_reason_problem
from ..store import Store
from ..store.base import PAGE_BODY_BYTES, AttemptRecord, DeliveryRecord, EventRecord
from ..store.search import decode_cursor, delivery_state, encode_cursor
from . import offload, openapi
from .bodies import json_object, only_fields
from .bulk import not_taking, replay_configured, retry_dead_configured
from .context import AdminContext
from .filters import FILTER_NAMES, MAX_TEXT, filter_from_query, page_params
from .health import handler_health
from .responses import JSON, BadRequest, NotFound, json_response, page_response

#: The most deliveries ``GET /events/{id}`` shows for one event (one per handler in practice).
MAX_EVENT_DELIVERIES = 1000
#: Deliveries ``GET /deliveries`` reads at a time (``_deliveries_page``).
DELIVERY_CHUNK = 50
#: A pause's reason when the request gives none.
DEFAULT_PAUSE_REASON = "paused by an operator (admin API)"
_DELIVERY_STATUSES = tuple(s.value for s in DeliveryStatus)


# --- JSON shapes -------------------------------------------------------------------------------


def event_summary(record: EventRecord) -> dict[str, Any]:
    """An event in a listing: its columns and body size, not its body (a listing reads none:
    ``search_events(bodies=False)``)."""
    return {
        "id": record.id,
        "type": record.type,
        "created": record.created,
        "received_at": record.received_at,
        "task_id": record.task_id,
        "superseded": record.superseded,
        "size": record.size,
    }


def _payload(raw: bytes) -> Any:
    """The body as JSON for an answer, or ``None`` when it cannot be re-encoded (nesting
    deeper than the encoder writes, numbers beyond a double, lone surrogates): ``raw``
    then still shows it."""
    try:
        payload = orjson.loads(raw)
        orjson.dumps(payload)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return None
    return payload


def event_json(summary: dict[str, Any], raw: bytes, deliveries: list[dict[str, Any]]) -> bytes:
    """``GET /events/{id}``'s answer, encoded: the summary, the body parsed (``payload``)
    and as text (``raw``), the deliveries (module-level: ``offload.run`` may run it in the
    helper process)."""
    return orjson.dumps(
        {
            **summary,
            "payload": _payload(raw),
            "raw": raw.decode("utf-8", "replace"),
            "deliveries": deliveries,
        },
        option=orjson.OPT_UTC_Z,
    )


def delivery_json(record: DeliveryRecord, now: datetime) -> dict[str, Any]:
    """A delivery; ``state`` is its ``search.py`` state now (``due``, ``running``,
    ``waiting``, ``done`` or ``dead``)."""
    states = delivery_state(record.status, record.next_attempt_at, record.lease_until, now)
    return {
        "id": record.id,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "handler": record.handler,
        "status": record.status.value,
        "state": next(s for s in ("due", "running", "waiting", "done", "dead") if s in states),
        "attempts": record.attempts,
        "next_attempt_at": record.next_attempt_at,
        "lease_until": record.lease_until,
        "last_error": record.last_error,
        "result": record.result,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


def attempt_json(record: AttemptRecord) -> dict[str, Any]:
    return {
        "attempt": record.attempt,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "duration_seconds": record.duration_seconds,
        "outcome": record.outcome.value,
        "error": record.error,
    }


# --- parameters --------------------------------------------------------------------------------


def _known_handler(ctx: AdminContext, value: Any, param: str) -> str:
    if not isinstance(value, str) or not HANDLER_NAME_RE.fullmatch(value):
        raise BadRequest(f"{param} must be a handler name.", param=param)
    if value not in ctx.handlers.names:
        raise BadRequest(
            f"{value!r} is not a configured handler ({', '.join(ctx.handlers.names) or 'none'}).",
            param=param,
        )
    return value


def _single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"{name} may be given once.", param=name)
    return values[0] if values else None


def _no_query(request: Request) -> None:
    for name in request.query_params:
        raise BadRequest(f"Unknown parameter {name!r}.", param=name)


def _path_id(request: Request) -> str:
    event_id = str(request.path_params["event_id"])
    if not event_id or len(event_id) > MAX_TEXT or "\x00" in event_id:
        raise NotFound(f"No event {event_id[:100]!r}.", param="event_id")
    return event_id


# --- reads -------------------------------------------------------------------------------------


def _result_bytes(record: DeliveryRecord) -> int:
    return 0 if record.result is None else len(orjson.dumps(record.result))


async def _deliveries_page(
    store: Store,
    *,
    status: DeliveryStatus | None,
    handler: str | None,
    event_id: str | None,
    limit: int,
    before: int | None,
) -> tuple[list[DeliveryRecord], bool]:
    """A page of ``GET /deliveries`` and whether more follow it. Read ``DELIVERY_CHUNK`` at a
    time, and ended before the delivery whose ``result`` would bring the page's results past
    ``PAGE_BODY_BYTES`` (the first always comes): a result is up to 64 KiB, so a page of 500
    could hold 32 MiB of them, parsed, in the process intake shares. A page cut short says
    so with its cursor, which goes on from its last delivery."""
    page: list[DeliveryRecord] = []
    held = 0
    while True:
        want = min(DELIVERY_CHUNK, limit - len(page))
        found = await store.list_deliveries(
            status=status, handler=handler, event_id=event_id, limit=want + 1, before=before
        )
        more = len(found) > want
        for record in found[:want]:
            held += _result_bytes(record)
            if page and held > PAGE_BODY_BYTES:
                return page, True
            page.append(record)
        if not more or len(page) >= limit:
            return page, more
        before = page[-1].id


# --- routes ------------------------------------------------------------------------------------


def routes(ctx: AdminContext) -> list[BaseRoute]:
    """This area's routes, mounted under /api/v1."""
    store = ctx.store

    async def list_events(request: Request) -> Response:
        where = filter_from_query(request.query_params)
        limit, cursor = page_params(request.query_params)
        try:
            # The summaries need no body: none is read, so a page of any limit and any
            # body sizes holds only its rows (docs/admin.md, "Memory").
            page = await store.search_events(
                where, cursor=cursor, limit=limit, budget=ctx.scan_budget(), bodies=False
            )
        except ValueError:
            raise BadRequest("cursor is not one this service made.", param="cursor") from None
        return page_response(
            [event_summary(r) for r in page.records], page.next_cursor, complete=page.complete
        )

    async def get_event(request: Request) -> Response:
        _no_query(request)
        event_id = _path_id(request)
        record = await store.get_event(event_id)
        if record is None:
            raise NotFound(f"No event {event_id[:100]!r}.", param="event_id")
        now = ctx.clock()
        deliveries = []
        for d in await store.list_deliveries(event_id=event_id, limit=MAX_EVENT_DELIVERIES):
            shown = delivery_json(d, now)
            shown["attempt_log"] = [attempt_json(a) for a in await store.list_attempts(d.id)]
            deliveries.append(shown)
        deliveries.sort(key=lambda d: d["id"])
        # Parsing and encoding the body is in proportion to its size: a large one is done
        # in the helper process (offload.py), not on the loop the webhook route shares.
        body = await offload.run(
            len(record.raw), event_json, event_summary(record), record.raw, deliveries
        )
        return Response(body, media_type=JSON)

    async def replay_event(request: Request) -> Response:
        _no_query(request)
        event_id = _path_id(request)
        body = await json_object(request)
        only_fields(body, ("handlers",))
        handlers: list[str] | None = None
        if body.get("handlers") is not None:
            names = body["handlers"]
            if not isinstance(names, list) or not names:
                raise BadRequest(
                    "handlers must be a non-empty list of handler names.", param="handlers"
                )
            handlers = [_known_handler(ctx, name, "handlers") for name in names]
            record = await store.get_event(event_id)
            if record is None:
                raise NotFound(f"No event {event_id[:100]!r}.", param="event_id")
            refused = not_taking(ctx.handlers.filters, record.type, handlers)
            if refused:
                raise BadRequest(
                    f"{refused[0]!r} does not take {record.type!r} events (its "
                    f"LACUNA_{refused[0].upper()}_EVENTS): intake makes no such delivery.",
                    param="handlers",
                )
        try:
            if handlers is None:
                # Every existing delivery of a configured handler (not of a removed one).
                count = await replay_configured(
                    store, event_id, ctx.handlers.names, now=ctx.clock()
                )
            else:
                count = await store.replay(event_id, handlers, now=ctx.clock())
        except EventNotFound:
            raise NotFound(f"No event {event_id[:100]!r}.", param="event_id") from None
        return json_response({"event_id": event_id, "replayed": count})

    async def list_deliveries(request: Request) -> Response:
        query = request.query_params
        for name in query:
            if name not in ("status", "handler", "event_id", "limit", "cursor"):
                raise BadRequest(f"Unknown parameter {name!r}.", param=name)
        status = _single(request, "status")
        if status is not None and status not in _DELIVERY_STATUSES:
            raise BadRequest(
                f"status must be one of {', '.join(_DELIVERY_STATUSES)}.", param="status"
            )
        handler = _single(request, "handler")
        if handler is not None and not HANDLER_NAME_RE.fullmatch(handler):
            raise BadRequest("handler must be a handler name.", param="handler")
        event_id = _single(request, "event_id")
        if event_id is not None and (
            not event_id or len(event_id) > MAX_TEXT or "\x00" in event_id
        ):
            raise BadRequest(f"event_id must be 1 to {MAX_TEXT} characters.", param="event_id")
        limit, cursor = page_params(query)
        before = None
        if cursor is not None:
            try:
                (before,) = decode_cursor(cursor, 1)
            except ValueError:
                before = None
            if not isinstance(before, int) or isinstance(before, bool) or before < 1:
                raise BadRequest("cursor is not one this service made.", param="cursor")
        page, more = await _deliveries_page(
            store,
            status=None if status is None else DeliveryStatus(status),
            handler=handler,
            event_id=event_id,
            limit=limit,
            before=before,
        )
        next_cursor = encode_cursor(page[-1].id) if more and page else None
        now = ctx.clock()
        return page_response([delivery_json(d, now) for d in page], next_cursor)

    async def retry_dead(request: Request) -> Response:
        _no_query(request)
        body = await json_object(request)
        only_fields(body, ("handler",))
        handler = None
        if body.get("handler") is not None:
            handler = _known_handler(ctx, body["handler"], "handler")
        count = await retry_dead_configured(
            store, ctx.handlers.names, handler=handler, now=ctx.clock()
        )
        return json_response({"handler": handler, "retried": count})

    async def list_handlers(request: Request) -> Response:
        _no_query(request)
        return page_response(await handler_health(ctx), None)

    def _handler_name(request: Request) -> str:
        name = str(request.path_params["name"])
        if name not in ctx.handlers.names:
            raise NotFound(f"No configured handler {name[:100]!r}.", param="name")
        return name

    async def pause(request: Request) -> Response:
        _no_query(request)
        name = _handler_name(request)
        body = await json_object(request)
        only_fields(body, ("reason",))
        reason = body.get("reason")
        if reason is None:
            reason = DEFAULT_PAUSE_REASON
        elif not isinstance(reason, str):
            raise BadRequest("reason must be a string.", param="reason")
        elif problem := pause_reason_problem(reason):
            raise BadRequest(f"reason {problem}.", param="reason")
        changed = await store.set_paused(name, True, reason=reason, now=ctx.clock())
        return json_response({"name": name, "paused": True, "changed": changed})

    async def resume(request: Request) -> Response:
        _no_query(request)
        name = _handler_name(request)
        only_fields(await json_object(request), ())
        changed = await store.set_paused(name, False, reason=None, now=ctx.clock())
        return json_response({"name": name, "paused": False, "changed": changed})

    return [
        Route("/events", list_events, methods=["GET"]),
        # Event ids may hold "/" (models.py): the id is the rest of the path, "%2F" or "/"
        # alike (the server decodes the path), and a POST ending in "/replay" is a replay.
        Route("/events/{event_id:path}/replay", replay_event, methods=["POST"]),
        Route("/events/{event_id:path}", get_event, methods=["GET"]),
        Route("/deliveries", list_deliveries, methods=["GET"]),
        Route("/deliveries/retry-dead", retry_dead, methods=["POST"]),
        Route("/handlers", list_handlers, methods=["GET"]),
        Route("/handlers/{name}/pause", pause, methods=["POST"]),
        Route("/handlers/{name}/resume", resume, methods=["POST"]),
    ]


# --- OpenAPI -----------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(
    properties: dict[str, Any], *, nullable: bool = False, additional: bool | None = None
) -> dict[str, Any]:
    """An object schema requiring every one of its properties: the API writes every field
    of an answer, null where there is no value, so the list is the properties' names."""
    schema: dict[str, Any] = {
        "type": ["object", "null"] if nullable else "object",
        "required": list(properties),
    }
    if additional is not None:
        schema["additionalProperties"] = additional
    schema["properties"] = properties
    return schema


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _page_of(name: str, *, budgeted: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "data": {"type": "array", "items": _ref(name)},
        "next_cursor": {
            "type": ["string", "null"],
            "description": "pass it back as `cursor` for the next page; null only after the "
            "last. A page may hold fewer than `limit` items while it is not null: follow it.",
        },
    }
    if budgeted:
        properties["complete"] = {
            "type": "boolean",
            "description": "false: the search stopped at its time budget "
            "(LACUNA_ADMIN_SEARCH_BUDGET) before the page was full; `data` holds every "
            "match found so far (fewer than `limit`, even none) and `next_cursor` (not null) "
            "resumes the scan where it stopped. Follow it: more may match.",
        }
    return _object(properties, additional=False)


_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_ERROR = _json(_ref("Error"), "Refused (error envelope)")

openapi.SCHEMAS.update(
    {
        "EventSummary": _object(
            {
                "id": {"type": "string"},
                "type": {"type": "string"},
                "created": {"type": ["integer", "null"]},
                "received_at": _TIME,
                "task_id": {"type": ["string", "null"]},
                "superseded": {"type": "boolean"},
                "size": {"type": "integer", "minimum": 0, "description": "body bytes"},
            }
        ),
        "Attempt": _object(
            {
                "attempt": {"type": "integer"},
                "started_at": _TIME,
                "finished_at": _TIME,
                "duration_seconds": {"type": "number"},
                "outcome": {"enum": ["ok", "retry", "dead"]},
                "error": {"type": ["string", "null"]},
            }
        ),
        "Delivery": _object(
            {
                "id": {"type": "integer"},
                "event_id": {"type": "string"},
                "event_type": {"type": "string"},
                "handler": {"type": "string"},
                "status": {"enum": list(_DELIVERY_STATUSES)},
                "state": {"enum": ["due", "running", "waiting", "done", "dead"]},
                "attempts": {"type": "integer"},
                "next_attempt_at": _TIME,
                "lease_until": _TIME_OR_NULL,
                "last_error": {"type": ["string", "null"]},
                "result": {"type": ["object", "null"]},
                "created_at": _TIME,
                "updated_at": _TIME,
            }
        ),
        "DeliveryWithAttempts": {
            "allOf": [
                _ref("Delivery"),
                _object({"attempt_log": {"type": "array", "items": _ref("Attempt")}}),
            ]
        },
        "EventDetail": {
            "allOf": [
                _ref("EventSummary"),
                _object(
                    {
                        "payload": {
                            "description": "the body as JSON; null when it cannot be "
                            "re-encoded (see raw)"
                        },
                        "raw": {"type": "string", "description": "the body as received"},
                        "deliveries": {
                            "type": "array",
                            "items": _ref("DeliveryWithAttempts"),
                        },
                    }
                ),
            ]
        },
        "Handler": _object(
            {
                "name": {"type": "string"},
                "kind": {"type": "string"},
                "paused": {"type": "boolean"},
                "paused_reason": {"type": ["string", "null"]},
                "paused_since": _TIME_OR_NULL,
                "concurrency": {"type": "integer"},
                "rate_limit": {
                    "type": ["object", "null"],
                    "required": ["count", "period_seconds"],
                    "properties": {
                        "count": {"type": "integer"},
                        "period_seconds": {"type": "number"},
                    },
                },
                "pause_after_failures": {"type": ["integer", "null"]},
                "queue": {
                    "type": "object",
                    "required": ["due", "running", "waiting", "dead"],
                    "properties": {
                        k: {"type": "integer", "minimum": 0}
                        for k in ("due", "running", "waiting", "dead")
                    },
                },
                "attempts": {"type": "integer", "description": "in the last hour"},
                "succeeded": {"type": "integer", "description": "in the last hour"},
                "success_ratio": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "p50_seconds": {"type": ["number", "null"]},
                "p95_seconds": {"type": ["number", "null"]},
                "consecutive_failures": {"type": "integer"},
                "last_error": {"type": ["string", "null"]},
                "last_error_at": _TIME_OR_NULL,
            }
        ),
        "HandlerState": _object(
            {
                "name": {"type": "string"},
                "paused": {"type": "boolean"},
                "changed": {"type": "boolean", "description": "false: it already was so"},
            }
        ),
    }
)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
_PAGE_PARAMS = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size (default 50)"),
    _query("cursor", {"type": "string"}, "next_cursor of the previous page"),
]
_FILTER_PARAMS = [
    _query("type", _TEXT, "event type, exactly"),
    _query("task_id", _TEXT, "data.id, exactly"),
    _query("since", _TEXT, "received at or after: RFC 3339 or Unix seconds"),
    _query("until", _TEXT, "received before: RFC 3339 or Unix seconds"),
    _query("handler", _TEXT, "events with a delivery of this handler"),
    _query(
        "status",
        {"enum": ["pending", "due", "running", "waiting", "done", "dead"]},
        "events with a delivery in this state (of `handler` when given)",
    ),
    {
        **_query(
            "match",
            {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "<dotted.path>:<value>: payload field equals value (repeatable)",
        ),
        "style": "form",
        "explode": True,
    },
    _query("q", _TEXT, "substring of the raw payload (case-sensitive)"),
]
assert {p["name"] for p in _FILTER_PARAMS} == set(FILTER_NAMES)
_EVENT_ID = {
    "name": "event_id",
    "in": "path",
    "required": True,
    "description": "The event id; it may hold `/`, sent as is or percent-encoded (`%2F`)",
    "schema": {"type": "string"},
}
_HANDLER_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ERRORS = {"400": _ERROR, "401": _ERROR, "503": _ERROR}
_BODY_ERRORS = {**_ERRORS, "413": _ERROR}


def _body(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": properties,
                }
            }
        },
    }


#: This area's OpenAPI path items (paths relative to /api/v1).
PATHS: dict[str, Any] = {
    "/events": {
        "get": {
            "operationId": "listEvents",
            "summary": "Search stored events, newest first",
            "description": "The items are summaries (`size`, not the body: no body is read, "
            "whatever `limit`). "
            "A search reading payloads (`match`, `q`) stops at its time budget "
            "(LACUNA_ADMIN_SEARCH_BUDGET, 0.5 s by default) with `complete: false`: the page "
            "may hold fewer than `limit` events, even none, while `next_cursor` is not null. "
            "Following `next_cursor` until it is null returns every match once, in order.",
            "parameters": [*_FILTER_PARAMS, *_PAGE_PARAMS],
            "responses": {
                "200": _json(_page_of("EventSummary", budgeted=True), "A page of events"),
                **_ERRORS,
            },
        }
    },
    "/events/{event_id}": {
        "get": {
            "operationId": "getEvent",
            "summary": "One event with its payload, deliveries, attempts and results",
            "parameters": [_EVENT_ID],
            "responses": {
                "200": _json(_ref("EventDetail"), "The event"),
                "404": _ERROR,
                **_ERRORS,
            },
        }
    },
    "/events/{event_id}/replay": {
        "post": {
            "operationId": "replayEvent",
            "summary": "Make the event's deliveries due again (of `handlers`, created if missing)",
            "parameters": [_EVENT_ID],
            "requestBody": _body(
                {"handlers": {"type": "array", "items": {"type": "string"}, "minItems": 1}}
            ),
            "responses": {
                "200": _json(
                    _object(
                        {
                            "event_id": {"type": "string"},
                            "replayed": {"type": "integer", "minimum": 0},
                        }
                    ),
                    "How many deliveries were reset or created",
                ),
                "404": _ERROR,
                **_BODY_ERRORS,
            },
        }
    },
    "/deliveries": {
        "get": {
            "operationId": "listDeliveries",
            "summary": "Deliveries, newest first",
            "description": "A page ends early, with `next_cursor` set, before the delivery "
            f"whose `result` would bring the page's results past {PAGE_BODY_BYTES >> 20} MiB "
            "(the first delivery "
            "always comes): it may hold fewer than `limit` while `next_cursor` is not null.",
            "parameters": [
                _query("status", {"enum": list(_DELIVERY_STATUSES)}, "stored status"),
                _query("handler", _TEXT, "handler name"),
                _query("event_id", _TEXT, "one event's deliveries"),
                *_PAGE_PARAMS,
            ],
            "responses": {"200": _json(_page_of("Delivery"), "A page of deliveries"), **_ERRORS},
        }
    },
    "/deliveries/retry-dead": {
        "post": {
            "operationId": "retryDead",
            "summary": "Make every dead delivery (of `handler`) due again with a fresh budget",
            "requestBody": _body({"handler": {"type": "string"}}),
            "responses": {
                "200": _json(
                    _object(
                        {
                            "handler": {"type": ["string", "null"]},
                            "retried": {"type": "integer", "minimum": 0},
                        }
                    ),
                    "How many dead deliveries were made due",
                ),
                **_BODY_ERRORS,
            },
        }
    },
    "/handlers": {
        "get": {
            "operationId": "listHandlers",
            "summary": "Each configured handler instance with its health",
            "responses": {"200": _json(_page_of("Handler"), "Every instance"), **_ERRORS},
        }
    },
    "/handlers/{name}/pause": {
        "post": {
            "operationId": "pauseHandler",
            "summary": "Pause a handler (every replica stops claiming its deliveries)",
            "parameters": [_HANDLER_NAME],
            "requestBody": _body(
                {"reason": {"type": "string", "minLength": 1, "maxLength": MAX_PAUSE_REASON_LENGTH}}
            ),
            "responses": {
                "200": _json(_ref("HandlerState"), "Paused"),
                "404": _ERROR,
                **_BODY_ERRORS,
            },
        }
    },
    "/handlers/{name}/resume": {
        "post": {
            "operationId": "resumeHandler",
            "summary": "Resume a handler (clears its consecutive failures)",
            "parameters": [_HANDLER_NAME],
            "requestBody": _body({}),
            "responses": {
                "200": _json(_ref("HandlerState"), "Running"),
                "404": _ERROR,
                **_BODY_ERRORS,
            },
        }
    },
}


__all__ = ["PATHS", "attempt_json", "delivery_json", "event_summary", "routes"]
