"""Helpers shared by the broker handler tests: events and handlers built from settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import orjson

from lacuna_webhooks.handlers.base import HandlerContext
from lacuna_webhooks.models import Event
from tests.conftest import make_event

H = TypeVar("H")


def event(event_type: str = "job.completed", **data: object) -> Event:
    """A fresh event (unique id) of ``event_type``; keywords replace fields of ``data``."""
    return Event.from_body(orjson.dumps(make_event(None, event_type, **data)))  # type: ignore[arg-type]


def build(factory: Callable[[HandlerContext], H], name: str, **settings: str) -> H:
    """The handler ``name`` built as ``plugins.py`` does, from ``LACUNA_<NAME>_<KEY>`` settings."""
    environ = {f"LACUNA_{name.upper()}_{key}": value for key, value in settings.items()}
    return factory(HandlerContext(name=name, environ=environ, timeout_seconds=10))
