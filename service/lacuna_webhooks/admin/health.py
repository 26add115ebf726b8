"""Handler health (SPEC §9 ``GET /handlers``), shared by the API and the console.

``handler_health(ctx)`` gives one dict per configured instance, in ``LACUNA_HANDLERS``
order, from three sources: the configuration (kind, concurrency, flow-control settings),
the store's flow-control rows (paused, why, since when, consecutive failures) and
``Store.handler_activity`` over the last ``WINDOW`` (queue, attempts, success ratio,
p50/p95 durations, last error).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ..dispatch.flow import FlowControl, read_flow_control
from ..errors import ConfigError
from ..store.base import HandlerActivity
from .context import AdminContext

#: The window of the attempt figures.
WINDOW = timedelta(hours=1)


def _flow(ctx: AdminContext) -> dict[str, FlowControl]:
    try:
        return read_flow_control(ctx.handlers.names, ctx.settings.environ)
    except ConfigError:  # serve refused such settings at start; a test context may hold them
        return {}


async def handler_health(ctx: AdminContext) -> list[dict[str, Any]]:
    """Each configured instance: ``name``, ``kind``, ``paused`` (with ``paused_reason`` and
    ``paused_since``, else ``null``), ``concurrency``, ``rate_limit`` (``{"count",
    "period_seconds"}`` or ``null``), ``pause_after_failures`` (or ``null``), ``queue``
    (``due``, ``running``, ``waiting``, ``dead``: counts now), ``attempts`` and
    ``succeeded`` over the last hour, ``success_ratio`` (0..1, ``null`` without attempts),
    ``p50_seconds`` / ``p95_seconds`` (``null`` without attempts), ``consecutive_failures``,
    ``last_error`` / ``last_error_at`` (the latest failed attempt of the hour, or ``null``).
    Raises ``StoreUnavailable``."""
    now = ctx.clock()
    states = {state.handler: state for state in await ctx.store.handler_states()}
    activity = {a.handler: a for a in await ctx.store.handler_activity(now=now, since=now - WINDOW)}
    flow = _flow(ctx)
    default_concurrency = ctx.settings.handler_concurrency
    found = []
    for name in ctx.handlers.names:
        state = states.get(name)
        act = activity.get(name) or HandlerActivity(handler=name)
        control = flow.get(name) or FlowControl()
        paused = state is not None and state.paused
        rate = control.rate_limit
        found.append(
            {
                "name": name,
                "kind": ctx.handlers.kinds.get(name, name),
                "paused": paused,
                "paused_reason": state.reason if paused and state is not None else None,
                "paused_since": state.updated_at if paused and state is not None else None,
                "concurrency": ctx.handlers.concurrency.get(name, default_concurrency),
                "rate_limit": None
                if rate is None
                else {"count": rate.count, "period_seconds": rate.period_seconds},
                "pause_after_failures": control.pause_after_failures,
                "queue": {
                    "due": act.due,
                    "running": act.running,
                    "waiting": act.waiting,
                    "dead": act.dead,
                },
                "attempts": act.attempts,
                "succeeded": act.succeeded,
                "success_ratio": act.succeeded / act.attempts if act.attempts else None,
                "p50_seconds": act.p50_seconds,
                "p95_seconds": act.p95_seconds,
                "consecutive_failures": 0 if state is None else state.consecutive_failures,
                "last_error": act.last_error,
                "last_error_at": act.last_error_at,
            }
        )
    return found


__all__ = ["WINDOW", "handler_health"]
