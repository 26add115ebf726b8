"""Handlers: what happens to an event once it is stored. See ``handlers.base``."""

from .base import Handler, HandlerContext, HandlerFactory, RecordingHandler

__all__ = ["Handler", "HandlerContext", "HandlerFactory", "RecordingHandler"]
