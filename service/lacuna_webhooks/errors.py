"""The exception tree of lacuna-webhooks.

Every exception the package raises on purpose derives from ``LacunaError``;
each class docstring is its default message::

    LacunaError
    ├── ConfigError                   a setting is missing or malformed (names the variable)
    ├── WebhookError                  a request must be refused; carries status, code, type, param
    │   ├── PayloadTooLarge           413 payload_too_large
    │   ├── SourceNotAllowed          403 source_not_allowed (LACUNA_ALLOWED_SOURCE_IPS)
    │   ├── MalformedRequest          400 malformed_request (HTTP framing; server.py)
    │   ├── RequestTimeout            408 request_timeout (headers or body too slow; server.py)
    │   ├── HeadersTooLarge           431 headers_too_large (server.py)
    │   ├── ServerBusy                503 server_busy (no connection left to shed; server.py)
    │   ├── SignatureError            401, the request is not proven authentic
    │   │   ├── MissingSignature      401 missing_signature
    │   │   ├── InvalidSignatureHeader 401 invalid_signature_header
    │   │   ├── TimestampOutOfTolerance 401 timestamp_out_of_tolerance
    │   │   └── InvalidSignature      401 invalid_signature
    │   ├── InvalidJSON               400 invalid_json
    │   ├── InvalidPayload            400 invalid_payload (param names the field)
    │   └── StoreUnavailable          503 store_unavailable (also raised by stores)
    ├── EventNotFound                 an admin command named an event the store does not hold
    └── HandlerError                  raised by a handler to steer the dispatcher
        ├── PermanentError            do not retry: the delivery is dead at once
        │   └── MalformedEvent        an event lacks a field a reader depends on (``param``)
        └── RetryLater                retry after ``delay_seconds`` (or the default schedule)
            └── RateLimited           the peer answered 429: retried without spending the budget

Anything else a handler raises counts as a transient failure and is retried on
the schedule.
"""

from __future__ import annotations


class LacunaError(Exception):
    """lacuna-webhooks failed."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message if message is not None else (type(self).__doc__ or "").strip()
        super().__init__(self.message)


class ConfigError(LacunaError):
    """The configuration is invalid."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class WebhookError(LacunaError):
    """The webhook request was refused."""

    status_code: int = 400
    code: str = "invalid_request"
    error_type: str = "invalid_request_error"

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class PayloadTooLarge(WebhookError):
    """The request body is larger than the configured limit."""

    status_code = 413
    code = "payload_too_large"


class SourceNotAllowed(WebhookError):
    """The request comes from an address outside LACUNA_ALLOWED_SOURCE_IPS."""

    status_code = 403
    code = "source_not_allowed"


class MalformedRequest(WebhookError):
    """The request is not valid HTTP/1.1 (framing, chunk sizes, Content-Length with
    Transfer-Encoding)."""

    status_code = 400
    code = "malformed_request"


class RequestTimeout(WebhookError):
    """The request was not received in time."""

    status_code = 408
    code = "request_timeout"


class HeadersTooLarge(WebhookError):
    """The request headers are too large or too many."""

    status_code = 431
    code = "headers_too_large"


class ServerBusy(WebhookError):
    """The server has no connection to spare; retry later."""

    status_code = 503
    code = "server_busy"
    error_type = "api_error"


class SignatureError(WebhookError):
    """The request signature could not be verified."""

    status_code = 401
    code = "invalid_signature"
    error_type = "authentication_error"


class MissingSignature(SignatureError):
    """The x-lacuna-signature header is missing."""

    code = "missing_signature"


class InvalidSignatureHeader(SignatureError):
    """The x-lacuna-signature header is malformed."""

    code = "invalid_signature_header"


class TimestampOutOfTolerance(SignatureError):
    """The signature timestamp is outside the tolerated window."""

    code = "timestamp_out_of_tolerance"


class InvalidSignature(SignatureError):
    """No signature matches the body and the configured secrets."""

    code = "invalid_signature"


class InvalidJSON(WebhookError):
    """The request body is not a JSON object."""

    code = "invalid_json"


class InvalidPayload(WebhookError):
    """The event is missing a required field or has one of the wrong type."""

    code = "invalid_payload"


class StoreUnavailable(WebhookError):
    """The event store is unavailable; retry later."""

    status_code = 503
    code = "store_unavailable"
    error_type = "api_error"


class EventNotFound(LacunaError):
    """No such event in the store."""


class HandlerError(LacunaError):
    """A handler failed."""


class PermanentError(HandlerError):
    """The handler failed permanently; retrying cannot help."""


class PauseHandler(PermanentError):
    """The handler's peer is gone for good (the ``http`` handler's HTTP 410, SPEC §7): this
    delivery is dead and the handler is paused until an operator resumes it
    (``lacuna-webhooks handlers resume NAME``), so its other deliveries wait instead of
    dying one by one. Raise it from ``handle()``; see docs/flow-control.md."""


class MalformedEvent(PermanentError):
    """The event lacks a field its reader depends on, or has it with the wrong type.

    Raised by ``lacuna_webhooks.events.parse_event``; ``param`` is the field's path
    (``data.tracks[0].audio_url``). A ``PermanentError``: the same event cannot
    become well-formed on retry.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


#: The longest delay a ``RetryLater`` (or a peer's ``Retry-After``) is read as: the retry
#: schedule caps it far lower anyway, and the workers' JSON wire carries it as a float (an
#: int past 64 bits, or a float overflowing to inf, cannot be written).
MAX_RETRY_DELAY_SECONDS = 1e9


class RetryLater(HandlerError):
    """The handler asks to be retried later."""

    def __init__(self, message: str | None = None, *, delay_seconds: float | None = None) -> None:
        self.delay_seconds = delay_seconds
        super().__init__(message)


class RateLimited(RetryLater):
    """The peer answered HTTP 429 (rate limited); retry later.

    Unlike a plain ``RetryLater`` it does not spend the attempt budget
    (``LACUNA_RETRY_MAX_ATTEMPTS``) while the delivery is younger than its rate-limit window
    (docs/delivery.md, "Rate-limited attempts"). A 503 is not this: the peer is failing, and
    its attempt counts even with a ``Retry-After``.
    """
