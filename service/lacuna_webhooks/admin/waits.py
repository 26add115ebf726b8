"""Long-polls that ``serve`` stopping cuts short answer ``503 shutting_down``.

``GET /tasks/{task_id}?wait=N`` (``api_live.py``) ends its wait at once when the admin
listener stops (``AdminContext.stopping``), so it never holds the stop up. What it found by
then is not the answer the client asked for: a task not stored yet is a 404 only once the
wait is over, and a task still running is answered as it is only then. So a wait that the
stop ended early, without the task ``ready`` or ``failed``, is answered ``503
shutting_down`` with ``Retry-After``: the client asks again (another replica, or this one
restarted) instead of taking "no such task" or "still running" for the outcome.

(The live stream ends on shutdown too; a client resumes it with its last id. A bulk
operation answers its own ``503 shutting_down``, ``api_bulk.py``.)
"""

from __future__ import annotations

import asyncio

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .api_live import FINAL_STATUSES
from .context import AdminContext
from .responses import NotFound, error_response

#: The long-poll routes of ``api_live.routes`` (paths under /api/v1).
WAIT_ROUTES = frozenset({"/tasks/{task_id:path}"})
#: The ``Retry-After`` of a wait the stop cut short, in seconds.
RETRY_AFTER_SECONDS = 1


def shutting_down() -> Response:
    return error_response(
        503,
        "shutting_down",
        "The service is stopping: the wait ended early. Ask again.",
        error_type="api_error",
        headers={"retry-after": str(RETRY_AFTER_SECONDS)},
    )


def _wait(request: Request) -> float | None:
    # Called once the route answered, so ``wait`` is valid (else it was a 400).
    text = request.query_params.get("wait")
    return None if text is None else float(text)


def stop_ends_wait(ctx: AdminContext, route: Route) -> Route:
    """``route`` whose answer is ``503 shutting_down`` when ``ctx.stopping`` ended its
    ``?wait=`` before the wait was over and before the task was final."""
    endpoint = route.endpoint

    async def wrapped(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        started = loop.time()

        def cut_short() -> bool:
            wait = _wait(request)
            return ctx.stopping.is_set() and wait is not None and loop.time() - started < wait

        try:
            response: Response = await endpoint(request)
        except NotFound:
            if cut_short():
                return shutting_down()
            raise
        if response.status_code == 200 and cut_short():
            status = orjson.loads(bytes(response.body)).get("status")
            if status not in FINAL_STATUSES:
                return shutting_down()
        return response

    return Route(route.path, wrapped, methods=sorted(route.methods or ()), name=route.name)


def with_stop(ctx: AdminContext, routes: list[BaseRoute]) -> list[BaseRoute]:
    """``routes`` with every long-poll of ``WAIT_ROUTES`` wrapped by ``stop_ends_wait``."""
    return [
        stop_ends_wait(ctx, r) if isinstance(r, Route) and r.path in WAIT_ROUTES else r
        for r in routes
    ]


__all__ = ["RETRY_AFTER_SECONDS", "WAIT_ROUTES", "shutting_down", "stop_ends_wait", "with_stop"]
