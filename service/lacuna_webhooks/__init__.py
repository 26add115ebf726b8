"""lacuna-webhooks: receive, verify, durably record and dispatch Lacuna Music API webhooks."""

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
