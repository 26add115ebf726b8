"""lacuna-webhooks: receive, verify, durably record and dispatch Lacuna Music API webhooks."""

from __future__ import annotations

# Not `from typing import TYPE_CHECKING`: typing (and re) take milliseconds to import, before
# the console script's Ctrl-C handling can start (_entry.py). Type checkers read it as theirs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .errors import (
        ConfigError,
        InvalidSignature,
        InvalidSignatureHeader,
        LacunaError,
        MalformedEvent,
        MissingSignature,
        PermanentError,
        RetryLater,
        SignatureError,
        TimestampOutOfTolerance,
    )
    from .events import (
        GenerationTask,
        JobCompleted,
        JobFailed,
        LacunaEvent,
        ProviderError,
        Track,
        UnknownEvent,
        is_job_completed,
        is_job_failed,
        parse_event,
    )
    from .handlers.base import Handler, HandlerContext
    from .models import Event
    from .signature import construct_event, sign, verify

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Event",
    "GenerationTask",
    "Handler",
    "HandlerContext",
    "InvalidSignature",
    "InvalidSignatureHeader",
    "JobCompleted",
    "JobFailed",
    "LacunaError",
    "LacunaEvent",
    "MalformedEvent",
    "MissingSignature",
    "PermanentError",
    "ProviderError",
    "RetryLater",
    "SignatureError",
    "TimestampOutOfTolerance",
    "Track",
    "UnknownEvent",
    "__version__",
    "construct_event",
    "is_job_completed",
    "is_job_failed",
    "parse_event",
    "sign",
    "verify",
]


#: Where each public name lives. Loaded on first use (PEP 562): ``import lacuna_webhooks``
#: imports nothing else, so the console script (``_entry``) can catch a Ctrl-C from the
#: start of every import of ours.
_LAZY = {
    "ConfigError": ".errors",
    "Event": ".models",
    "GenerationTask": ".events",
    "Handler": ".handlers.base",
    "HandlerContext": ".handlers.base",
    "InvalidSignature": ".errors",
    "InvalidSignatureHeader": ".errors",
    "JobCompleted": ".events",
    "JobFailed": ".events",
    "LacunaError": ".errors",
    "LacunaEvent": ".events",
    "MalformedEvent": ".errors",
    "MissingSignature": ".errors",
    "PermanentError": ".errors",
    "ProviderError": ".events",
    "RetryLater": ".errors",
    "SignatureError": ".errors",
    "TimestampOutOfTolerance": ".errors",
    "Track": ".events",
    "UnknownEvent": ".events",
    "construct_event": ".signature",
    "is_job_completed": ".events",
    "is_job_failed": ".events",
    "parse_event": ".events",
    "sign": ".signature",
    "verify": ".signature",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
