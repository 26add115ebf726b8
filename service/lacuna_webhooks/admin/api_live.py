"""Admin API area: see admin/__init__.py (filled in by its own branch)."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from .context import AdminContext

#: This area's OpenAPI path items (paths relative to /api/v1).
PATHS: dict[str, Any] = {}


def routes(ctx: AdminContext) -> list[BaseRoute]:
    """This area's routes, mounted under /api/v1."""
    return []
