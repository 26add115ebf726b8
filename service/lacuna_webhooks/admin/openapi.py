"""The OpenAPI 3.1 document of ``/api/v1`` (served at ``/api/v1/openapi.json``).

Each area module exports ``PATHS`` (its routes' path items, paths relative to ``/api/v1``)
and may add shared schemas to ``COMPONENTS``; ``document()`` assembles them. A test checks
that every route of the app is in the document and schemathesis checks that every answer
conforms to it.
"""

from __future__ import annotations

from typing import Any

#: Schemas every area may reference as ``#/components/schemas/<name>``.
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "code", "message", "param"],
                "properties": {
                    "type": {"type": "string"},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    },
}

#: Responses every route can give.
ERROR_RESPONSES: dict[str, Any] = {
    "400": {
        "description": "Bad query or body",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    },
    "401": {
        "description": "No or wrong token",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    },
}

#: The HTTP layer's answer, before any route (server.py, docs/http.md): a request line and
#: headers over LACUNA_MAX_HEADER_BYTES (16 KiB by default) or LACUNA_MAX_HEADERS lines. A
#: long query (many `match` values) meets it first. Added to every operation by ``document``.
_HEADERS_TOO_LARGE: dict[str, Any] = {
    "description": "Request line and headers too large",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def document(*path_sets: dict[str, Any]) -> dict[str, Any]:
    """The whole document from the areas' ``PATHS``."""
    paths: dict[str, Any] = {}
    for path_set in path_sets:
        paths.update(path_set)
    for item in paths.values():
        for operation in item.values():
            # Every route can get the HTTP layer's answer too: it comes before any route.
            operation["responses"] = {**operation["responses"], "431": _HEADERS_TOO_LARGE}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lacuna-webhooks admin API",
            "version": "1",
            "description": "Search, replay, backfill and watch the events this receiver "
            "stored (docs/admin.md).",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


__all__ = ["ERROR_RESPONSES", "SCHEMAS", "document"]
