"""Admin API area: bulk replay and backfill (SPEC §9 ``POST /replays``; ``admin/bulk.py``).

``POST /replays`` takes a JSON object: the ``GET /events`` filters (``type``, ``task_id``,
``since``, ``until``, ``handler``, ``status``, ``match`` as a list of ``path:value``, ``q``)
and

- ``all`` (boolean): an empty filter replays *every* stored event, so it must be asked for
  with ``"all": true``; a body with no filter and without it is a 400 (a stray ``POST`` never
  replays the whole store). ``all`` together with a filter is a 400 too (which one was meant?).
- ``handlers`` (non-empty list of configured handler names): backfill: each event gets the
  missing deliveries of these handlers, and their existing ones are made due again. Omitted:
  every existing delivery of each event is made due again, none is created.
- ``missing_only`` (boolean, needs ``handlers``): only create the missing deliveries.
- ``dry_run`` (boolean): count the matching events, write nothing.

A flag left out is false; ``null`` for a flag is a 400 (it is not read as false: a client
that sends ``"dry_run": null`` would otherwise write what it meant to count).

It answers ``{"matched": N, "created": N, "reset": N, "dry_run": bool}`` once the operation
has run (``created`` and ``reset`` are 0 in a dry run). Any bad field is a 400 naming it in
``param``; an unknown handler a 400 naming the configured ones; a second operation while one
runs in this process a 409 ``operation_in_progress``; a store that stays away 503
``store_unavailable``; ``serve`` stopping 503 ``shutting_down`` (the operation ends at its
next batch, what it wrote stays, the message counts it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..config import HANDLER_NAME_RE
from ..store.base import EventFilter
from .api_events import _ERROR, _no_query, _object
from .bodies import json_object
from .bulk import BulkOperation, OperationInProgress, OperationStopped
from .context import AdminContext
from .filters import FILTER_NAMES, MAX_MATCHES, MAX_TEXT, filter_from_json
from .responses import BadRequest, error_response, json_response, shutting_down

#: The body's fields besides the filters.
OPERATION_FIELDS = ("all", "handlers", "missing_only", "dry_run")
#: The most handler names one operation takes.
MAX_HANDLERS = 100


def _flag(body: dict[str, Any], name: str) -> bool:
    # A flag left out is false; a null one is refused, not read as false: these flags
    # guard writes (``dry_run``, ``missing_only``, ``all``), and a client that serialises
    # an unset option as null may well have meant the safe side.
    if name not in body:
        return False
    value = body[name]
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false (leave it out for false).", param=name)
    return value


def _handler(names: Sequence[str], value: Any) -> str:
    if not isinstance(value, str) or not HANDLER_NAME_RE.fullmatch(value):
        raise BadRequest("handlers must hold handler names.", param="handlers")
    if value not in names:
        raise BadRequest(
            f"{value!r} is not a configured handler ({', '.join(names) or 'none'}).",
            param="handlers",
        )
    return value


def operation_from_json(
    handler_names: Sequence[str],
    body: dict[str, Any],
    filters: Mapping[str, frozenset[str] | None] | None = None,
) -> BulkOperation:
    """The ``BulkOperation`` of a ``POST /replays`` body (the CLI builds the same body),
    ``handler_names`` being the configured handlers and ``filters`` the event types each
    gets (``HandlerSet.filters``; absent: every type); ``BadRequest`` naming the field."""
    where = filter_from_json(body, allowed=OPERATION_FIELDS)
    everything = _flag(body, "all")
    if where == EventFilter() and not everything:
        raise BadRequest(
            'Give at least one filter, or "all": true to replay every stored event.',
            param="all",
        )
    if where != EventFilter() and everything:
        raise BadRequest('"all": true replays every event: give it without filters.', param="all")
    handlers: tuple[str, ...] | None = None
    if body.get("handlers") is not None:
        names = body["handlers"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_HANDLERS:
            raise BadRequest(
                f"handlers must be a list of 1 to {MAX_HANDLERS} handler names.",
                param="handlers",
            )
        handlers = tuple(dict.fromkeys(_handler(handler_names, n) for n in names))
    missing_only = _flag(body, "missing_only")
    if missing_only and handlers is None:
        raise BadRequest(
            "missing_only creates the missing deliveries of handlers: name them.",
            param="missing_only",
        )
    return BulkOperation(
        where=where,
        handlers=handlers,
        missing_only=missing_only,
        dry_run=_flag(body, "dry_run"),
        configured=tuple(handler_names),
        filters=dict(filters or {}),
    )


def routes(ctx: AdminContext) -> list[BaseRoute]:
    """This area's routes, mounted under /api/v1."""
    runner = ctx.bulk

    async def replays(request: Request) -> Response:
        _no_query(request)
        operation = operation_from_json(
            ctx.handlers.names, await json_object(request), ctx.handlers.filters
        )
        try:
            task = runner.start(operation)
        except OperationInProgress as exc:
            return error_response(409, "operation_in_progress", str(exc))
        except OperationStopped as exc:
            return shutting_down(str(exc))
        try:
            # Shielded: a client that hangs up leaves the operation to finish (and be logged).
            result = await asyncio.shield(task)
        except OperationStopped as exc:
            return shutting_down(str(exc))
        return json_response(result.json())

    return [Route("/replays", replays, methods=["POST"])]


# --- OpenAPI -----------------------------------------------------------------------------------

_TEXT = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT}
_BOOL = {"type": "boolean"}
_BODY_PROPERTIES: dict[str, Any] = {
    "type": {**_TEXT, "description": "event type, exactly"},
    "task_id": {**_TEXT, "description": "data.id, exactly"},
    "since": {
        "type": ["string", "number"],
        "description": "received at or after: RFC 3339 or Unix seconds",
    },
    "until": {
        "type": ["string", "number"],
        "description": "received before: RFC 3339 or Unix seconds",
    },
    "handler": {**_TEXT, "description": "events with a delivery of this handler"},
    "status": {
        "enum": ["pending", "due", "running", "waiting", "done", "dead"],
        "description": "events with a delivery in this state (of `handler` when given)",
    },
    "match": {
        "type": "array",
        "items": {"type": "string"},
        "maxItems": MAX_MATCHES,
        "description": "<dotted.path>:<value> conditions: payload field equals value",
    },
    "q": {**_TEXT, "description": "substring of the raw payload (case-sensitive)"},
    "all": {**_BOOL, "description": "true: every stored event (only without filters)"},
    "handlers": {
        "type": "array",
        "items": {"type": "string"},
        "minItems": 1,
        "maxItems": MAX_HANDLERS,
        "description": "create these handlers' missing deliveries (backfill) and reset theirs; "
        "omitted: reset every existing delivery",
    },
    "missing_only": {**_BOOL, "description": "with handlers: only create what is missing"},
    "dry_run": {**_BOOL, "description": "count the matching events, write nothing"},
}
assert set(FILTER_NAMES) | set(OPERATION_FIELDS) == set(_BODY_PROPERTIES)

#: This area's OpenAPI path items (paths relative to /api/v1).
PATHS: dict[str, Any] = {
    "/replays": {
        "post": {
            "operationId": "bulkReplay",
            "summary": "Bulk replay and backfill over the events the GET /events filters select",
            "description": "Runs in batches of 500 events (one short transaction each) and "
            "answers when done. One operation at a time per process (409 otherwise).",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": _BODY_PROPERTIES,
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "What the operation did",
                    "content": {
                        "application/json": {
                            "schema": _object(
                                {
                                    "matched": {"type": "integer", "minimum": 0},
                                    "created": {"type": "integer", "minimum": 0},
                                    "reset": {"type": "integer", "minimum": 0},
                                    "dry_run": {"type": "boolean"},
                                },
                                additional=False,
                            )
                        }
                    },
                },
                "400": _ERROR,
                "401": _ERROR,
                "409": _ERROR,
                "413": _ERROR,
                "503": _ERROR,
            },
        }
    }
}


__all__ = ["MAX_HANDLERS", "OPERATION_FIELDS", "PATHS", "operation_from_json", "routes"]
