"""Admin API area: a generation task's state, and the live stream of events (SPEC §9).

- ``GET /tasks/{task_id}``: the task's latest state (``TaskRecord``), its events (newest
  first, at most ``MAX_TASK_EVENTS``) and the results its latest event's deliveries
  returned. ``?wait=N`` (seconds, ``0 < N <= 60``): answer as soon as the task is ``ready``
  or ``failed``; a task not stored yet is waited for too (an app usually asks before the
  webhook of its task arrived), and is 404 only once the wait is over. At the end of the
  wait a known task is answered as it is, whatever its status.
- ``GET /stream``: Server-Sent Events, one per stored event (``id:`` its cursor, ``event:
  event``, ``data:`` the ``StreamEvent`` JSON), then each new one as it commits. It starts
  after the ``Last-Event-ID`` header (what a browser's ``EventSource`` sends when it
  reconnects), else after ``?after=<cursor>``, else ``?from=now`` (the default) or
  ``?from=beginning``. Every event comes once and in the store's stream order
  (``store/stream.py``), across restarts and replicas. A comment line every
  ``KEEPALIVE_SECONDS`` keeps proxies from closing a quiet stream and lets a client notice a
  dead one. A bad cursor is a 400 before the stream starts; the stream ends when the admin
  listener stops (``AdminContext.stopping``) or the store fails (the client resumes).

Why ``event: event`` and not the event's type: a browser's ``EventSource`` has no catch-all
listener, so named types would hide every type the console does not know in advance; the
type is in the data.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..errors import StoreUnavailable
from ..models import DeliveryStatus
from ..store.base import EventFilter, EventRecord, TaskRecord
from ..store.stream import beyond_head, first_of, follow
from . import offload, openapi
from .api_events import _payload, event_summary
from .context import AdminContext
from .filters import MAX_TEXT
from .responses import BadRequest, NotFound, json_response, shutting_down

log = structlog.get_logger("lacuna_webhooks.admin")

#: Seconds between keepalive comments on a quiet stream.
KEEPALIVE_SECONDS = 15.0
#: The longest ``?wait=`` of ``GET /tasks/{task_id}``, in seconds.
MAX_WAIT_SECONDS = 60.0
#: How many of a task's events ``GET /tasks/{task_id}`` lists (newest first).
MAX_TASK_EVENTS = 100
#: Statuses that end a task (SPEC §2): a ``wait`` answers as soon as one is stored.
FINAL_STATUSES = frozenset({"ready", "failed"})
#: Messages written to the socket in one piece (one write, then the loop is given back).
CHUNK_MESSAGES = 16
#: How many encoded stream messages are kept for the other streams to send, and their most
#: bytes in all (a message of a large body is several times its size: the parsed payload is
#: encoded beside the raw text, quotes escaped; 256 of them once held 1.2 GiB after the
#: streams that read them had closed).
ENCODED_MESSAGES = 256
ENCODED_BYTES = 8 * 1024 * 1024
_ENCODED: dict[str, tuple[EventRecord, bytes]] = {}
_ENCODED_SIZE = [0]  # the bytes _ENCODED holds
_DECIMAL = re.compile(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?", re.ASCII)
_STREAM_PARAMS = ("after", "from")
_FROM = ("now", "beginning")


# --- JSON shapes -------------------------------------------------------------------------------


def stream_event(record: EventRecord) -> dict[str, Any]:
    """What one stream message carries: the event as ``GET /events/{id}`` shows it, without
    its deliveries (``payload`` is null when the body cannot be re-encoded; ``raw`` is the
    body as received, what ``listen`` forwards)."""
    return {
        **event_summary(record),
        "payload": _payload(record.raw),
        "raw": record.raw.decode("utf-8", "replace"),
    }


async def sse_message(cursor: str, record: EventRecord) -> bytes:
    """One Server-Sent Events message (orjson writes no newline, so ``data`` is one line).

    Encoded once per event however many streams send it (the recent ones are kept: every
    stream at the head sends the same events at about the same time); a large body in the
    helper process (offload.py), not on the loop the webhook route shares."""
    message = _ENCODED.get(cursor)
    if message is None or message[0] != record:
        message = (record, await offload.run(len(record.raw), _encode, cursor, record))
        old = _ENCODED.pop(cursor, None)
        if old is not None:
            _ENCODED_SIZE[0] -= len(old[1])
        _ENCODED[cursor] = message
        _ENCODED_SIZE[0] += len(message[1])
        while _ENCODED and (len(_ENCODED) > ENCODED_MESSAGES or _ENCODED_SIZE[0] > ENCODED_BYTES):
            _ENCODED_SIZE[0] -= len(_ENCODED.pop(next(iter(_ENCODED)))[1])
    return message[1]


def _encode(cursor: str, record: EventRecord) -> bytes:
    data = orjson.dumps(stream_event(record), option=orjson.OPT_UTC_Z)
    return b"id: " + cursor.encode("ascii") + b"\nevent: event\ndata: " + data + b"\n\n"


# --- parameters --------------------------------------------------------------------------------


def _wait_seconds(request: Request) -> float | None:
    for name in request.query_params:
        if name != "wait":
            raise BadRequest(f"Unknown parameter {name!r}.", param=name)
    values = request.query_params.getlist("wait")
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("wait may be given once.", param="wait")
    # A JSON-like number only: float() would also take "1_0", "\u0661" (an Arabic-Indic one),
    # surrounding blanks, "infinity" and "nan" (the last two refused by the range below).
    text = values[0]
    # The bound in Decimal: 60.000000000000001 rounds to the float 60.0.
    if not (len(text) <= 20 and _DECIMAL.fullmatch(text) and 0 < Decimal(text) <= MAX_WAIT_SECONDS):
        raise BadRequest(
            f"wait must be a number of seconds above 0 and at most {MAX_WAIT_SECONDS:g}, "
            "written in at most 20 characters.",
            param="wait",
        )
    return float(text)


def _start(request: Request) -> tuple[str | None, bool]:
    """(cursor, from_now) of a stream request; ``BadRequest`` for anything else."""
    query = request.query_params
    for name in query:
        if name not in _STREAM_PARAMS:
            raise BadRequest(f"Unknown parameter {name!r}.", param=name)
        if len(query.getlist(name)) > 1:
            raise BadRequest(f"{name} may be given once.", param=name)
    after, start = query.get("after"), query.get("from")
    if after is not None and start is not None:
        raise BadRequest("Give after or from, not both.", param="from")
    if start is not None and start not in _FROM:
        raise BadRequest("from must be now or beginning.", param="from")
    resume = request.headers.get("last-event-id")
    if resume is not None and resume.strip():
        # A reconnecting EventSource repeats the URL it was opened with: its header wins.
        return resume.strip(), False
    if after is not None:
        return after, False
    return None, start != "beginning"


# --- routes ------------------------------------------------------------------------------------


def routes(ctx: AdminContext) -> list[BaseRoute]:
    """This area's routes, mounted under /api/v1."""
    store = ctx.store

    async def task_json(task: TaskRecord) -> dict[str, Any]:
        page = await store.search_events(
            EventFilter(task_id=task.task_id), limit=MAX_TASK_EVENTS, bodies=False
        )
        results: dict[str, Any] = {}
        for delivery in await store.list_deliveries(event_id=task.event_id, limit=1000):
            done = delivery.status is DeliveryStatus.DONE
            results[delivery.handler] = delivery.result if done else None
        return {
            "task_id": task.task_id,
            "status": task.status,
            "event_id": task.event_id,
            "event_type": task.event_type,
            "event_created": task.event_created,
            "updated_at": task.updated_at,
            "events": [event_summary(r) for r in page.records],
            "results": dict(sorted(results.items())),
        }

    async def get_task(request: Request) -> Response:
        wait = _wait_seconds(request)
        task_id = str(request.path_params["task_id"])
        if not task_id or len(task_id) > MAX_TEXT or "\x00" in task_id:
            raise NotFound(f"No task {task_id[:100]!r}.", param="task_id")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait or 0.0)
        signal = store.stream_signal
        while True:
            mark = signal.mark()  # before the read: an accept just after it still wakes us
            # Shared with the other waits for this task; bounded with every shared read.
            task = await signal.shared(("task", task_id), mark, lambda: store.get_task(task_id))
            left = deadline - loop.time()
            if task is not None and task.status in FINAL_STATUSES:
                break
            if left <= 0:
                break
            if ctx.stopping.is_set():
                # The stop ended the wait early (it never holds serve up). What was found is
                # not the answer asked for: "not stored yet" is a 404, and "still running" an
                # answer, only once the wait is over. The client asks again instead.
                return shutting_down("The service is stopping: the wait ended early. Ask again.")
            await first_of((mark, ctx.stopping), min(left, signal.poll_timeout(loop.time())))
        if task is None:
            raise NotFound(f"No task {task_id[:100]!r}.", param="task_id")
        return json_response(await task_json(task))

    async def stream(request: Request) -> Response:
        cursor, from_now = _start(request)
        try:
            if from_now:
                cursor = await store.stream_head()
            else:
                await store.stream_after(cursor, 0)  # refuse a bad cursor before the 200
                if cursor is not None and beyond_head(cursor, await store.stream_head()):
                    raise ValueError("a cursor after the head")
        except ValueError:
            param = "last-event-id" if request.headers.get("last-event-id") else "after"
            raise BadRequest("That is not a stream cursor of this service.", param=param) from None
        headers = {"x-accel-buffering": "no"}  # nginx: pass each message on at once
        if request.method == "HEAD":
            # The GET's status and headers, and done: a stream would stay open for a body
            # that HEAD never gets (Starlette answers HEAD on every GET route).
            return Response(media_type="text/event-stream", headers=headers)
        return StreamingResponse(
            _messages(ctx, cursor), media_type="text/event-stream", headers=headers
        )

    return [
        # :path: a task id may hold "/" (intake stores one), as an event id may.
        Route("/tasks/{task_id:path}", get_task, methods=["GET"]),
        Route("/stream", stream, methods=["GET"]),
    ]


async def _messages(ctx: AdminContext, cursor: str | None) -> AsyncIterator[bytes]:
    # Something for a proxy or client to see at once. (No `retry:` hint: some SSE clients,
    # httpx-sse among them, hand out a message without data for it.)
    yield b": stream open\n\n"
    try:
        async for batch in follow(
            ctx.store, cursor, stopping=ctx.stopping, idle_seconds=KEEPALIVE_SECONDS
        ):
            if not batch:
                yield b": keepalive\n\n"
            for start in range(0, len(batch), CHUNK_MESSAGES):
                chunk = batch[start : start + CHUNK_MESSAGES]
                yield b"".join([await sse_message(position, record) for position, record in chunk])
                # A stream replaying a backlog writes without ever waiting (the socket keeps
                # up): give the loop back after each chunk, so intake's requests interleave
                # instead of queueing behind a whole batch of encoding.
                await asyncio.sleep(0)
    except StoreUnavailable as exc:
        # The client resumes from its last id once the store answers again.
        log.warning("admin.stream_ended", reason=exc.message)
    except ValueError:
        log.warning("admin.stream_ended", reason="cursor refused by the store")


# --- OpenAPI -----------------------------------------------------------------------------------

_ERROR = {
    "description": "Refused (error envelope)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_TIME = {"type": "string", "format": "date-time"}

openapi.SCHEMAS.update(
    {
        "TaskState": {
            "type": "object",
            "required": [
                "task_id",
                "status",
                "event_id",
                "event_type",
                "event_created",
                "updated_at",
                "events",
                "results",
            ],
            "properties": {
                "task_id": {"type": "string"},
                "status": {
                    "type": ["string", "null"],
                    "description": "data.status of the task's latest event (ready, failed…)",
                },
                "event_id": {"type": "string", "description": "the latest event"},
                "event_type": {"type": "string"},
                "event_created": {"type": ["integer", "null"]},
                "updated_at": _TIME,
                "events": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/EventSummary"},
                    "maxItems": MAX_TASK_EVENTS,
                    "description": "newest first",
                },
                "results": {
                    "type": "object",
                    "additionalProperties": {"type": ["object", "null"]},
                    "description": "per handler of the latest event: the result its "
                    "completed delivery returned, null while not done or without one",
                },
            },
        },
        "StreamEvent": {
            "allOf": [
                {"$ref": "#/components/schemas/EventSummary"},
                {
                    "type": "object",
                    "required": ["payload", "raw"],
                    "properties": {
                        "payload": {
                            "description": "the body as JSON; null when it cannot be "
                            "re-encoded (see raw)"
                        },
                        "raw": {"type": "string", "description": "the body as received"},
                    },
                },
            ]
        },
    }
)

#: This area's OpenAPI path items (paths relative to /api/v1).
PATHS: dict[str, Any] = {
    "/tasks/{task_id}": {
        "get": {
            "operationId": "getTask",
            "summary": "A generation task's latest state, its events and its results",
            "parameters": [
                {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 60},
                    "description": "seconds to wait for the task to be ready or failed (also "
                    "for it to appear); answers as soon as it is",
                },
            ],
            "responses": {
                "200": {
                    "description": "The task",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/TaskState"}}
                    },
                },
                "400": _ERROR,
                "401": _ERROR,
                "404": _ERROR,
                "503": _ERROR,
            },
        }
    },
    "/stream": {
        "get": {
            "operationId": "streamEvents",
            "summary": "Server-Sent Events: each stored event once, then each new one live",
            "description": "Each message: `id:` its cursor, `event: event`, `data:` a "
            "StreamEvent as JSON. Resumes after the Last-Event-ID header, else after "
            "`after`, else from now (or `from=beginning`). A `: keepalive` comment every "
            f"{KEEPALIVE_SECONDS:g} seconds.",
            "parameters": [
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "the id of the last message seen",
                },
                {
                    "name": "from",
                    "in": "query",
                    "required": False,
                    "schema": {"enum": list(_FROM)},
                    "description": "where to start without a cursor (default now)",
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "the id of the last message seen (wins over the query)",
                },
            ],
            "responses": {
                "200": {
                    "description": "An endless stream of messages (text/event-stream)",
                    "content": {
                        "text/event-stream": {
                            "schema": {"type": "string"},
                            "x-message-schema": {"$ref": "#/components/schemas/StreamEvent"},
                        }
                    },
                },
                "400": _ERROR,
                "401": _ERROR,
                "503": _ERROR,
            },
        }
    },
}


__all__ = [
    "KEEPALIVE_SECONDS",
    "MAX_WAIT_SECONDS",
    "PATHS",
    "routes",
    "sse_message",
    "stream_event",
]
