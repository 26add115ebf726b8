"""The HTML console (SPEC §9), served at ``/`` of the admin listener (filled in by its own
branch)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from ..context import AdminContext


def routes(ctx: AdminContext) -> list[BaseRoute]:
    """The console's routes, mounted at ``/``; they authenticate with the session cookie."""
    return []
