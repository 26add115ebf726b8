"""lacuna-webhooks: receive, verify, durably record and dispatch Lacuna Music API webhooks."""

from .errors import (
    ConfigError,
    InvalidSignature,
    InvalidSignatureHeader,
    LacunaError,
    MissingSignature,
    PermanentError,
    RetryLater,
    SignatureError,
    TimestampOutOfTolerance,
)
from .handlers.base import Handler, HandlerContext
from .models import Event
from .signature import construct_event, sign, verify

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Event",
    "Handler",
    "HandlerContext",
    "InvalidSignature",
    "InvalidSignatureHeader",
    "LacunaError",
    "MissingSignature",
    "PermanentError",
    "RetryLater",
    "SignatureError",
    "TimestampOutOfTolerance",
    "__version__",
    "construct_event",
    "sign",
    "verify",
]
